#!/usr/bin/env bash
# Set up a development environment from nothing: a virtualenv in .venv with numpy, the test
# tools and vmmpy itself built (Rust extension included) in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
