"""docs/api.md is a contract: its Python blocks run, in order, as one script in an empty
directory, and each ``print(...)  # -> TEXT`` line (indented ones too) prints TEXT."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

from tests.test_readme import blocks

API_DOC = Path(__file__).resolve().parent.parent / "docs" / "api.md"
#: Three guests of a few seconds each, one checkpoint and one live migration on loopback.
RUN_TIMEOUT_S = 240


def test_the_api_doc_runs_and_prints_what_its_comments_say(tmp_path):
    code = "\n\n".join(code for _, code in blocks("python", API_DOC))
    expected = [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*->\s*(.*)$", code, re.M)]
    assert len(expected) >= 6, "docs/api.md documents too little output"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=RUN_TIMEOUT_S)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected
    assert sorted(p.name for p in tmp_path.iterdir()) == ["vm0.ckp", "vm0.ckp.kern", "vm0.ckp.meta"]
