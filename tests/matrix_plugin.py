"""The pytest side of the test matrix (tools/test_matrix.py makes docs/test-matrix.md).

A test says what it proves with ``@pytest.mark.covers(operation=..., guest=..., via=..., ...)``,
one mark per combination, in tools/test_matrix.py's vocabulary. A value that holds ``{name}``
takes the test's parameter ``name``: its id where the parametrize gave one (``ids=[...]`` or
``pytest.param(..., id=...)``), else its value; ``"{streams}"`` for a number, ``"{tls}"`` for a
bool. Marks go on the function or, for one parameter set, on ``pytest.param(..., marks=...)``.

Every collected test's marks are checked at collection in every run, not only when a matrix is
made: a dimension or value outside the vocabulary stops the run (exit 4) with a line naming the
test, the dimension and the value, so a typo can never make a column of its own.

With ``--matrix-results FILE`` each selected test that declares coverage is recorded with its
outcome (passed, failed, skipped with the reason, or not run) and FILE is written when the run
ends. Loaded by tests/conftest.py; elsewhere with ``-p tests.matrix_plugin``.
"""

from __future__ import annotations

import os
import platform
import re
import shlex
import subprocess
import time
from pathlib import Path

import pytest

from tools.test_matrix import DIMENSIONS, CoversError, Record, Results, check_covers, write_results

MARKER = "covers"
PLACEHOLDER = re.compile(r"\{(\w+)\}")
_COVERS = pytest.StashKey[dict]()  # nodeid -> the combinations its marks declare
_OUTCOMES = pytest.StashKey[dict]()  # nodeid -> (outcome, reason)
_SELECTED = pytest.StashKey[list]()  # nodeids of the selected tests that declare coverage, in run order


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.getgroup("vmmpy").addoption(
        "--matrix-results", metavar="FILE", default=None,
        help="record each test marked covers(...) and its outcome in FILE, for tools/test_matrix.py (docs/test-matrix.md)")


def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", f"{MARKER}(**dimensions): what this test proves works together, one combination per "
                                       "mark, in tools/test_matrix.py's vocabulary (docs/test-matrix.md)")
    config.stash[_COVERS] = {}
    config.stash[_OUTCOMES] = {}
    config.stash[_SELECTED] = []


def _parameter_texts(item: pytest.Item) -> dict[str, str]:
    """Each parameter of a parametrized test as a placeholder reads it: its id when the
    parametrize gave one for that parameter alone, else its value as text."""
    callspec = getattr(item, "callspec", None)
    if callspec is None:
        return {}
    texts = {name: str(value) for name, value in callspec.params.items()}
    for mark in item.iter_markers("parametrize"):
        names = mark.args[0]
        names = [n.strip() for n in names.split(",")] if isinstance(names, str) else list(names)
        if len(names) != 1 or names[0] not in callspec.params:
            continue
        # Which of the parametrize's values this test got (pytest keeps no public index of it).
        value, ids = callspec.params[names[0]], mark.kwargs.get("ids")
        plain = [v.values[0] if _is_param(v) else v for v in mark.args[1]]
        at = [i for i, v in enumerate(plain) if type(v) is type(value) and v == value]
        if len(at) != 1:
            continue
        given = mark.args[1][at[0]].id if _is_param(mark.args[1][at[0]]) else None
        if given is None and isinstance(ids, list | tuple) and at[0] < len(ids):
            given = ids[at[0]]
        if given is not None:
            texts[names[0]] = str(given)
    return texts


def _is_param(value: object) -> bool:
    """A ``pytest.param(...)`` parameter set."""
    return all(hasattr(value, a) for a in ("values", "marks", "id"))


def _resolve(name: str, value: object, texts: dict[str, str]) -> object:
    if not isinstance(value, str) or not PLACEHOLDER.search(value):
        return value
    missing = [p for p in PLACEHOLDER.findall(value) if p not in texts]
    if missing:
        raise CoversError(f"{name}={value!r}: the test has no parameter {missing[0]!r}")
    text = PLACEHOLDER.sub(lambda m: texts[m.group(1)], value)
    kind = DIMENSIONS[name].kind if name in DIMENSIONS else str
    if kind is int and text.isdigit():
        return int(text)
    if kind is bool and text in ("True", "False"):
        return text == "True"
    return text


def declared(item: pytest.Item) -> list[dict]:
    """The combinations an item's covers marks declare (CoversError naming what is wrong)."""
    texts = _parameter_texts(item)
    combos = []
    for mark in item.iter_markers(MARKER):
        if mark.args:
            raise CoversError(f"covers takes dimension=value pairs only, got {mark.args!r}")
        combos.append(check_covers({k: _resolve(k, v, texts) for k, v in mark.kwargs.items()}))
    return combos


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    covers, errors = config.stash[_COVERS], []
    for item in items:
        try:
            combos = declared(item)
        except CoversError as err:
            errors.append(f"{item.nodeid}: @pytest.mark.covers: {err}")
            continue
        if combos:
            covers[item.nodeid] = combos
    if errors:
        raise pytest.UsageError("test matrix declarations outside the vocabulary (tools/test_matrix.py):\n" + "\n".join(errors))


def pytest_collection_finish(session: pytest.Session) -> None:
    covers = session.config.stash[_COVERS]
    session.config.stash[_SELECTED][:] = [item.nodeid for item in session.items if item.nodeid in covers]


@pytest.hookimpl(wrapper=True, tryfirst=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    report = yield
    if item.nodeid in item.config.stash[_COVERS]:
        _note(item.config.stash[_OUTCOMES], report)
    return report


def _note(outcomes: dict, report: pytest.TestReport) -> None:
    """Fold one phase's report into the test's outcome: a failure in any phase fails it, a skip
    (or an expected failure) skips it, and it passed if its call did."""
    previous = outcomes.get(report.nodeid, ("not run", None))
    if previous[0] == "failed":
        return
    if report.failed:
        outcomes[report.nodeid] = ("failed", f"{report.when} failed")
    elif report.skipped:
        if hasattr(report, "wasxfail"):
            reason = f"expected to fail: {report.wasxfail}"
        else:
            reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        outcomes[report.nodeid] = ("skipped", reason.removeprefix("Skipped: "))
    elif report.when == "call":
        outcomes[report.nodeid] = ("passed", None)


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    config = session.config
    path = config.getoption("--matrix-results")
    if not path:
        return
    covers, outcomes = config.stash[_COVERS], config.stash[_OUTCOMES]
    tests = []
    for nodeid in config.stash[_SELECTED]:
        outcome, reason = outcomes.get(nodeid, ("not run", None))
        tests.append(Record(nodeid, outcome, reason, covers[nodeid]))
    write_results(path, Results(_run_info(config), tests))


def _run_info(config: pytest.Config) -> dict:
    """When, where and how: the args pytest was given (without the results file, and relative to
    the project), the commit, the platform."""
    root = Path(config.rootpath)
    args, given = [], list(config.invocation_params.args)
    while given:
        arg = given.pop(0)
        if arg == "--matrix-results":
            given = given[1:]
            continue
        if arg.startswith("--matrix-results="):
            continue
        if os.path.isabs(arg) and Path(arg).is_relative_to(root):
            arg = str(Path(arg).relative_to(root))
        args.append(arg)
    try:
        git = ["git", "-C", str(root)]
        commit = subprocess.run([*git, "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=10).stdout.strip()
        changed = subprocess.run([*git, "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True, timeout=10).stdout
        commit = (commit + (" with uncommitted changes" if changed.strip() else "")) or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    return {"finished": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()), "pytest_args": [shlex.quote(a) for a in args],
            "commit": commit, "platform": f"{platform.system()} {platform.machine()}, {os.cpu_count()} CPUs",
            "python": platform.python_version()}
