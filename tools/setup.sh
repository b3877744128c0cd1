#!/usr/bin/env bash
# Set up a development environment from nothing: a virtualenv in .venv with numpy, the test
# tools and vmmpy itself built (Rust extension included) in editable mode.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m venv .venv
.venv/bin/pip install --quiet --upgrade pip
.venv/bin/pip install --quiet -e '.[test]'
# Compile vmmpy's bytecode now, as installing a wheel does. An editable install leaves it to the
# first import, and where PYTHONDONTWRITEBYTECODE is set (as on these machines) no import ever
# writes it: every vmmrun and vmmctl would compile all of vmmpy's modules again when it starts,
# about 0.3 s of CPU each (docs/performance.md). A module edited later is compiled on import as
# before; run this line again to cache it.
.venv/bin/python -m compileall -q python/vmmpy
