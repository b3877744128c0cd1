"""The README is a contract: its walk-through runs, in order, as a new user would type it.

Every ``sh`` block of the sections "Run a guest", "Save and restore" and "Migrate" runs in one
bash session, in a fresh directory, with ``.venv/bin`` first on ``PATH`` and a fresh default run
directory (``VMMPY_RUN_DIR``); "host B" is the README's own ``--run-dir host-b``. The commands run
verbatim. What the harness adds is only what a person at a terminal does between them:

- after a command started with ``&``, it waits (bounded) until that guest answers ``vmmctl
  --status`` (a waiting destination answers too), failing with the job's exit if it died;
- each other command must exit 0, except that ``echo $?`` lines check the exit status their
  comment documents (``# 1: powered off``).

The ``python`` block runs as a script; each ``print(...)  # -> TEXT`` line must print TEXT. The
"Measure" commands run for minutes, so they are checked by their options: each flag they use
must be one their ``--help`` lists.
"""

from __future__ import annotations

import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
WALK_SECTIONS = ("Run a guest", "Save and restore", "Migrate")
#: The whole walk-through: guests of 256 MiB that boot, checkpoint, restore twice and migrate twice.
WALK_TIMEOUT_S = 240
READY_TIMEOUT_S = 30


def blocks(language: str) -> list[tuple[str, str]]:
    """(section title, code) for each fenced block of ``language``, in README order."""
    found, section = [], ""
    lines = README.read_text().splitlines()
    i = 0
    while i < len(lines):
        line = lines[i]
        if line.startswith("## "):
            section = line[3:].strip()
        if line.strip() == f"```{language}":
            j = lines.index("```", i + 1)
            found.append((section, "\n".join(lines[i + 1 : j])))
            i = j
        i += 1
    return found


def command_lines(code: str) -> list[str]:
    return [line for line in code.splitlines() if line.strip() and not line.lstrip().startswith("#")]


def script_for(lines: list[str]) -> str:
    """The walk-through as one bash script, with the waits and checks described above."""
    out = [
        "set -u",
        'trap \'kill $(jobs -p) 2>/dev/null; wait\' EXIT',
        "fail() { echo \"README walk-through: $*\" >&2; exit 1; }",
        # Wait until the guest a background command started answers (bounded), or its job died.
        "ready() {",
        "    local pid=$1 name=$2; shift 2",
        f"    for _ in $(seq 1 {READY_TIMEOUT_S * 20}); do",
        '        kill -0 "$pid" 2>/dev/null || { wait "$pid"; fail "a background vmmrun exited $? before serving $name"; }',
        '        vmmctl "$@" --vm="$name" --status >/dev/null 2>&1 && return 0',
        "        sleep 0.05",
        "    done",
        f'    fail "$name did not answer within {READY_TIMEOUT_S} s"',
        "}",
    ]
    for n, line in enumerate(lines):
        if line.lstrip().startswith("echo $?"):
            expected = re.search(r"#\s*(\d+)\b", line)
            assert expected, f"README: {line!r} documents no exit status"
            out.append(f'[ "$rc" = {expected.group(1)} ] || fail "expected exit {expected.group(1)}, got $rc from the previous command"')
            continue
        body = line.split(" #", 1)[0].rstrip()
        if body.endswith("&"):
            argv = shlex.split(body[:-1])
            run_dir = [f"--run-dir={argv[argv.index('--run-dir') + 1]}"] if "--run-dir" in argv else []
            out.append(body)
            out.append(f"ready $! {shlex.quote(argv[-1])} {' '.join(run_dir)}")
            continue
        out.append(f"{body}; rc=$?")
        following = lines[n + 1] if n + 1 < len(lines) else ""
        if not following.lstrip().startswith("echo $?"):
            out.append(f'[ "$rc" = 0 ] || fail "exit $rc: {body.replace(chr(34), chr(39))}"')
    # The walk-through ends with its last guest destroyed: nothing is left running on either "host".
    out.append('for d in "" --run-dir=host-b; do [ "$(vmmctl $d --list --json)" = "[]" ] || fail "left running: $(vmmctl $d --list)"; done')
    return "\n".join(out) + "\n"


def test_the_walk_through_runs_in_order_on_one_host(tmp_path):
    walk = [code for section, code in blocks("sh") if section in WALK_SECTIONS]
    assert len(walk) >= 4, "the README's walk-through blocks were not found"
    lines = [line for code in walk for line in command_lines(code)]
    script = script_for(lines)
    env = dict(os.environ)
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env.get('PATH', '')}"
    env["VMMPY_RUN_DIR"] = str(tmp_path / "run")
    done = subprocess.run(["bash", "-c", script], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=WALK_TIMEOUT_S)
    assert done.returncode == 0, f"{done.stderr}\n--- the script:\n{script}"
    # What the walk-through made is what it says it makes.
    for name in ("vm0.ckp", "vm0.ckp.kern", "vm0.ckp.meta", "mig.key", "console.log", "console-b.log"):
        assert (tmp_path / name).is_file(), name
    assert oct((tmp_path / "mig.key").stat().st_mode & 0o777) == "0o600"
    assert b"abtest" in (tmp_path / "console.log").read_bytes()


def test_the_python_example_prints_what_its_comments_say(tmp_path):
    (code,) = [code for _, code in blocks("python")]
    expected = [m.group(1).strip() for m in re.finditer(r"^print\(.*\)\s*#\s*->\s*(.*)$", code, re.M)]
    assert expected, "the example documents no output"
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == expected


@pytest.mark.parametrize("module", ["tools.bench", "tools.soak"])
def test_the_measure_commands_use_options_that_exist(module):
    uses = [line for _, code in blocks("sh") for line in command_lines(code) if f"-m {module} " in line + " "]
    assert uses, f"the README no longer shows {module}"
    helped = subprocess.run([sys.executable, "-m", module, "--help"], cwd=README.parent, capture_output=True,
                            text=True, timeout=60)
    assert helped.returncode == 0, helped.stderr
    for line in uses:
        for flag in re.findall(r"(?<!\S)(--[a-z][a-z0-9-]*)", line.split(" #", 1)[0]):
            assert flag in helped.stdout, f"README: {module} has no {flag} ({line.strip()})"
