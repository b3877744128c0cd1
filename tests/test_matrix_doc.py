"""The test matrix (docs/test-matrix.md) shows what a run proved, not what tests declare: a passing
test gives ✓, a failing one ✗, a skipped one 'skipped' with its reason, and a combination no test
that ran declares stays blank. A covers mark outside the vocabulary stops any run naming the test,
and the committed page was made from the suite's current declarations."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tools import test_matrix as tm

ROOT = Path(__file__).resolve().parent.parent

SYNTHETIC = '''
import pytest

@pytest.mark.covers(operation="suspend", guest="abtest", via="cli")
def test_passes():
    pass

@pytest.mark.covers(operation="suspend", guest="abtest", via="cli", restore="lazy")
def test_fails():
    assert False

@pytest.mark.covers(operation="suspend", guest="abtest", via="cli", vendor="amd")
def test_is_skipped():
    pytest.skip("no amd host here")

@pytest.mark.covers(operation="migrate-live", guest="hash", via="cli")
def test_deselected():
    pass

@pytest.mark.covers(operation="migrate-{live}", guest="abtest", via="cli", streams="{streams}", tls="{tls}")
@pytest.mark.parametrize("tls", [False, True])
@pytest.mark.parametrize("streams", [2, 3])
@pytest.mark.parametrize("live", [False, True], ids=["warm", "live"])
def test_parametrized(live, streams, tls):
    assert not (live and streams == 3 and tls)

@pytest.mark.parametrize("device", [
    pytest.param("nvme", marks=pytest.mark.covers(operation="state-move", guest="nvmetest", device="nvme", via="machine")),
    pytest.param("none"),
])
def test_one_parameter_set_declares(device):
    pass

def test_declares_nothing():
    pass
'''


def run_pytest(directory: Path, *args: str) -> subprocess.CompletedProcess:
    """pytest in ``directory`` with the matrix plugin loaded as any project would load it."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run([sys.executable, "-m", "pytest", "-p", "tests.matrix_plugin", "-p", "no:cacheprovider", "-q", *args],
                          cwd=directory, env=env, capture_output=True, text=True, timeout=120)


def tables(markdown: str) -> dict[str, dict[str, dict[str, str]]]:
    """Section title -> row label -> column label -> cell, for every table on the page."""
    found: dict[str, dict[str, dict[str, str]]] = {}
    section, header = None, None
    for line in markdown.splitlines():
        if line.startswith("## "):
            section, header = line[3:], None
        elif line.startswith("|") and section:
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            if header is None:
                header = cells
            elif not set(line) <= {"|", "-"}:
                found.setdefault(section, {})[cells[0]] = dict(zip(header[1:], cells[1:]))
        else:
            header = None
    return found


@pytest.fixture(scope="module")
def synthetic_run(tmp_path_factory):
    directory = tmp_path_factory.mktemp("synthetic")
    (directory / "test_synthetic.py").write_text(SYNTHETIC)
    result = run_pytest(directory, "--matrix-results", "results.json", "-k", "not deselected")
    assert result.returncode == 1, result.stdout + result.stderr  # test_fails and one parametrized case fail
    page = directory / "matrix.md"
    assert tm.main([str(directory / "results.json"), "-o", str(page)]) == 1, "failures make the tool exit 1"
    return json.loads((directory / "results.json").read_text()), page.read_text()


def test_each_cell_shows_the_outcome_of_the_test_that_ran(synthetic_run):
    _, page = synthetic_run
    suspend = tables(page)["Suspend and restore"]["abtest (vmmrun/vmmctl)"]
    assert suspend["intel · eager"].startswith("✓ #")
    assert suspend["intel · lazy"].startswith("✗ #")
    assert suspend["amd · eager"].startswith("skipped #")
    assert suspend["amd · lazy"] == "", "no test declares it: not covered"
    assert "test_synthetic.py::test_is_skipped` skipped (no amd host here)" in page
    assert "- `test_synthetic.py::test_fails`: failed (call failed)" in page, "listed under what is not proved"


def test_a_declared_test_that_did_not_run_fills_nothing(synthetic_run):
    results, page = synthetic_run
    assert "test_synthetic.py::test_deselected" not in {t["test"] for t in results["tests"]}
    assert "hash" not in " ".join(tables(page)["Live migration"]["amd"]), "its column exists only when a test ran"
    assert tables(page)["At a glance"]["guest: **hash**"]["Live migration"] == ""
    assert "- guest **hash**: proved by no test that passed." in page


def test_placeholders_take_the_parameter_ids_and_values(synthetic_run):
    results, page = synthetic_run
    declared = {t["test"].split("::")[1]: (t["outcome"], t["covers"]) for t in results["tests"]}
    outcome, [covers] = declared["test_parametrized[live-3-True]"]
    assert outcome == "failed"
    assert (covers["operation"], covers["streams"], covers["tls"]) == ("migrate-live", 3, True)
    assert declared["test_parametrized[warm-2-False]"][1][0]["operation"] == "migrate-warm"
    assert declared["test_one_parameter_set_declares[nvme]"][1][0]["device"] == "nvme"
    assert "test_one_parameter_set_declares[none]" not in declared and "test_declares_nothing" not in declared
    live = tables(page)["Live migration"]  # options down, guests across
    assert live["intel · 3 streams · TLS"]["abtest (vmmrun/vmmctl)"].startswith("✗")
    assert live["intel · 2 streams · TLS"]["abtest (vmmrun/vmmctl)"].startswith("✓")
    assert live["amd"]["abtest (vmmrun/vmmctl)"] == "", "a row per vendor is always there, covered or not"
    together = tables(page)["Migration options together"]
    assert together["**TLS**"]["warm"] == "✓" and together["**TLS**"]["key"] == ""
    assert together["**TLS**"]["live"] == "✗", "a failure among a cell's tests shows, whatever else passed"


def test_without_the_option_nothing_is_written(tmp_path):
    (tmp_path / "test_synthetic.py").write_text(SYNTHETIC)
    result = run_pytest(tmp_path, "-k", "passes")
    assert result.returncode == 0, result.stdout + result.stderr
    assert sorted(p.name for p in tmp_path.iterdir() if p.is_file()) == ["test_synthetic.py"]


def test_a_covers_mark_outside_the_vocabulary_stops_the_run_naming_the_test(tmp_path):
    (tmp_path / "test_typos.py").write_text('''
import pytest

@pytest.mark.covers(operation="migrate-live", guest="abtest", via="cli", compres="lz4")
def test_misspelt_dimension(): pass

@pytest.mark.covers(operation="suspend", guest="abtest", via="cli", vendor="arm")
def test_unknown_value(): pass

@pytest.mark.covers(operation="migrate-warm", guest="abtest", via="cli", restore="lazy")
def test_dimension_of_another_operation(): pass

@pytest.mark.covers(operation="migrate-warm", guest="abtest", via="cli", streams=True)
def test_a_bool_for_a_number(): pass

@pytest.mark.covers(operation="migrate-{mode}", guest="abtest", via="cli")
def test_no_such_parameter(): pass

@pytest.mark.covers(operation="suspend", guest="abtest")
def test_a_required_dimension_left_out(): pass
''')
    result = run_pytest(tmp_path, "--matrix-results", "results.json")
    assert result.returncode == 4, result.stdout + result.stderr
    for line in [
        "test_typos.py::test_misspelt_dimension: @pytest.mark.covers: unknown dimension 'compres': known are operation, guest,",
        "test_typos.py::test_unknown_value: @pytest.mark.covers: vendor='arm' is not in the vocabulary: 'intel', 'amd'",
        "test_typos.py::test_dimension_of_another_operation: @pytest.mark.covers: restore='lazy' means nothing for operation "
        "'migrate-warm' (it applies to checkpoint, suspend)",
        "test_typos.py::test_a_bool_for_a_number: @pytest.mark.covers: streams=True is not in the vocabulary: a whole number from 1 to 16",
        "test_typos.py::test_no_such_parameter: @pytest.mark.covers: operation='migrate-{mode}': the test has no parameter 'mode'",
        "test_typos.py::test_a_required_dimension_left_out: @pytest.mark.covers: via is missing: every mark names it ('cli', 'api',",
    ]:
        assert line in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


@pytest.mark.parametrize("content, message", [
    (None, "cannot be read"),
    ("{", "not JSON"),
    ('{"format": "something else"}', "not a test matrix results file (written by pytest --matrix-results)"),
    ('{"format": "vmmpy-test-matrix-results", "version": 9}', "version 9; this tool reads version 1"),
    ('{"format": "vmmpy-test-matrix-results", "version": 1, "tests": [{"test": "t::x", "outcome": "passed", '
     '"covers": [{"operation": "suspend", "guest": "abtest", "via": "cli", "vendor": "arm"}]}]}',
     "test t::x: vendor='arm' is not in the vocabulary"),
    ('{"format": "vmmpy-test-matrix-results", "version": 1, "tests": [{"test": "t::x", "outcome": "maybe", "covers": []}]}',
     "test t::x: outcome 'maybe' is not one of passed, failed, skipped, not run"),
])
def test_a_bad_results_file_is_refused_naming_it(tmp_path, capsys, content, message):
    path = tmp_path / "results.json"
    if content is not None:
        path.write_text(content)
    assert tm.main([str(path), "-o", str(tmp_path / "out.md")]) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"test_matrix: results file '{path}': ") and message in err, err
    assert not (tmp_path / "out.md").exists()


def test_the_committed_matrix_was_made_from_the_suites_current_declarations(tmp_path):
    """Every covers mark in the suite is in the vocabulary (collection would stop otherwise), and
    docs/test-matrix.md was generated from exactly these declarations: a mark added, removed or
    changed without regenerating the page fails here."""
    result = subprocess.run([sys.executable, "-m", "pytest", "--collect-only", "-q", "-m", "covers", "-p", "no:cacheprovider",
                             "--matrix-results", str(tmp_path / "declared.json")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    declared = tm.read_results(tmp_path / "declared.json")
    assert len(declared.tests) >= 60 and all(t.outcome == "not run" for t in declared.tests)
    page = (ROOT / tm.DOC).read_text()
    match = re.search(r"<!-- declarations (\w+) -->", page)
    assert match, "docs/test-matrix.md carries the digest of the declarations it was made from"
    assert match.group(1) == tm.declarations_digest(declared), (
        "docs/test-matrix.md is out of date with the covers marks: regenerate it with .venv/bin/python -m tools.test_matrix --run")
