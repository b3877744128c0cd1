"""The test matrix (docs/test-matrix.md): which guests, devices, save/restore modes, migration
modes and CPU vendors the test suite proves work together, made from a real run's results.

Owns three things: the vocabulary a test may use in ``@pytest.mark.covers(...)`` (each dimension,
its values, its default and the operations it means something for), the results file the pytest
plugin (tests/matrix_plugin.py) writes with ``--matrix-results FILE``, and the Markdown made from
that file. It never decides what is covered: a cell is filled only by a test that ran, with that
test's outcome; a combination no test that ran declares stays blank.

    .venv/bin/python -m tools.test_matrix --run        # run the marked tests (pytest -m covers), write docs/test-matrix.md
    .venv/bin/python -m tools.test_matrix RESULTS.json -o docs/test-matrix.md   # from a results file

The results file (JSON, written by the plugin, read here; ``version`` changes when its meaning does)::

    {"format": "vmmpy-test-matrix-results", "version": 1,
     "run": {"finished": "2026-01-01T00:00:00Z", "pytest_args": [...], "commit": "abc1234" | null,
             "platform": "...", "python": "3.11.2"},
     "tests": [{"test": "tests/test_x.py::test_y[live]", "outcome": "passed" | "failed" | "skipped" | "not run",
                "reason": "..." | null, "covers": [{"operation": "migrate-live", "guest": "abtest", ...}, ...]}, ...]}
"""

from __future__ import annotations

import argparse
import hashlib
import itertools
import json
import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

from vmmpy.devices.registry import PCI_EMULATIONS
from vmmpy.guest.programs import PROGRAMS

ROOT = Path(__file__).resolve().parent.parent
DOC = Path("docs") / "test-matrix.md"
RESULTS_FORMAT = "vmmpy-test-matrix-results"
RESULTS_VERSION = 1
OUTCOMES = ("passed", "failed", "skipped", "not run")

# ---- the vocabulary -------------------------------------------------------------------------------

Value = str | int | bool


@dataclass(frozen=True)
class Operation:
    name: str
    title: str
    proves: str  # what a cell in its table says


OPERATIONS: dict[str, Operation] = {o.name: o for o in (
    Operation("checkpoint", "Checkpoint", "checkpointed (which does not stop it), and the checkpoint, restored, ends exactly as an "
              "uninterrupted run"),
    Operation("suspend", "Suspend and restore", "suspended (saved, then stopped), restored, and ends exactly as an uninterrupted run"),
    Operation("state-move", "State moved into a fresh machine",
              "paused, every state section and all of memory (as page batches) moved into a new machine in the same "
              "process, as a migration carries them but without the network; ends exactly as an uninterrupted run"),
    Operation("migrate-warm", "Warm migration", "stopped, copied and committed to a destination, where it ends exactly as an "
              "unmigrated run (or, for the migration test guest, with exactly the source's memory and state)"),
    Operation("migrate-live", "Live migration", "copied in pre-copy rounds while it runs, then stopped and committed; ends "
              "exactly as an unmigrated run (or, for the migration test guest, with exactly the source's memory and state)"),
)}
ALL = frozenset(OPERATIONS)
SAVES = frozenset({"checkpoint", "suspend"})
MIGRATIONS = frozenset({"migrate-warm", "migrate-live"})


@dataclass(frozen=True)
class Dimension:
    name: str
    meaning: str
    values: dict[Value, str]  # value -> its label in the tables, in the order columns and rows take
    default: Value | None  # None: every mark names it
    operations: frozenset[str]  # the operations it means something for; a mark naming it elsewhere is refused
    kind: type = str
    shown: bool = False  # named in every column label, its default too (a column per value always exists)
    harness: frozenset = frozenset()  # values only the tests use (no user runs them): not listed under "Not covered"

    def label(self, value: Value) -> str:
        return self.values[value]


def _test_guests() -> dict[Value, str]:
    guests: dict[Value, str] = {name: name for name in PROGRAMS}
    guests["busy"] = "busy (a test program)"
    guests["writer"] = "writer (the migration test guest)"
    return guests


#: Where a pause, a save and a restore happen: the person's tool, the library, the machine, or the
#: migration engine alone (no vCPU: a host thread writes the guest's pages, tests/migration_guest.py).
VIA = {"cli": "vmmrun/vmmctl", "api": "vmmpy.Vm", "machine": "in-process machine", "engine": "migration engine"}

DIMENSIONS: dict[str, Dimension] = {d.name: d for d in (
    Dimension("operation", "what was done to the guest", {name: o.title for name, o in OPERATIONS.items()}, None, ALL),
    Dimension("guest", "the guest program whose end proves the result (shipped programs: vmmrun --list-guests)",
              _test_guests(), None, ALL, harness=frozenset({"busy", "writer"})),
    Dimension("device", "the PCI device the guest drives (hostbridge and lpc, which any guest may have, are not counted)",
              {"none": "no device", **{e: e for e in PCI_EMULATIONS if e not in ("hostbridge", "lpc")}}, "none", ALL),
    Dimension("via", "what ran it: " + ", ".join(f"{k} = {v}" for k, v in VIA.items()), dict(VIA), None, ALL,
              harness=frozenset({"machine", "engine"})),
    Dimension("vcpus", "vCPUs (-c)", {n: f"{n} vCPUs" if n > 1 else "1 vCPU" for n in range(1, 17)}, 1, ALL, kind=int),
    Dimension("vendor", "the vCPU vendor (--vendor)", {"intel": "intel", "amd": "amd"}, "intel", ALL, shown=True),
    Dimension("accel", "the vCPU backend (--accel): the simulated vCPU, or real x86-64 code under /dev/kvm",
              {"sim": "simulated vCPU", "kvm": "KVM"}, "sim", ALL),
    Dimension("restore", "how the checkpoint was read back (--restore-mode)", {"eager": "eager", "lazy": "lazy"}, "eager",
              SAVES, shown=True),
    Dimension("diff", "restored through a chain of diff checkpoints (--diff), and that chain merged", {False: "full", True: "diff chain"},
              False, SAVES, kind=bool),
    Dimension("live", "memory written while the guest ran (--live), as it was at the pause", {False: "paused", True: "live"}, False,
              frozenset({"checkpoint"}), kind=bool),
    Dimension("key", "sealed or authenticated with a shared key (--key-file)", {False: "no key", True: "key"}, False,
              SAVES | MIGRATIONS, kind=bool),
    Dimension("streams", "parallel page connections (--streams)", {n: f"{n} streams" if n > 1 else "1 stream" for n in range(1, 17)},
              1, MIGRATIONS, kind=int),
    Dimension("tls", "mutual TLS 1.3 (--tls-cert/--tls-key/--tls-ca)", {False: "plaintext", True: "TLS"}, False, MIGRATIONS, kind=bool),
    Dimension("compress", "page batch compression (--compress)", {"off": "uncompressed", "lz4": "lz4", "auto": "compress auto"}, "off",
              MIGRATIONS | {"state-move"}),
    Dimension("bandwidth", "the link's rate (--bandwidth)", {"unlimited": "unlimited", "capped": "bandwidth cap"}, "unlimited",
              MIGRATIONS),
    Dimension("verify", "what the commit checks (--verify)", {"incremental": "incremental", "full": "verify full"}, "incremental",
              MIGRATIONS),
    Dimension("network", "between what", {"loopback": "IPv4 loopback", "ipv6": "IPv6 loopback", "netns": "network namespaces"},
              "loopback", MIGRATIONS),
    Dimension("tracking", "how dirty pages are found (--dirty-tracking)", {"soft": "soft bitmap", "kernel": "kernel tracking",
                                                                       "kvm": "KVM dirty log", "kvm-ring": "KVM dirty ring"},
              "soft",
              MIGRATIONS),
    Dimension("postcopy", "how a live migration finished (--postcopy): the guest ran on the destination while the pages it lacked "
              "were fetched; 'recovered' = through a page link that failed and was recovered",
              {"none": "pre-copy", "round0": "post-copy at round 0", "after": "post-copy after rounds",
               "manual": "post-copy by the operator", "auto": "post-copy auto", "recovered": "post-copy recovered"},
              "none", frozenset({"migrate-live"})),
    Dimension("throttled", "auto-converge slowed the guest down during the rounds", {False: "unthrottled", True: "throttled"}, False,
              frozenset({"migrate-live"}), kind=bool),
    Dimension("highmem", "guest memory above 4 GiB in use", {False: "lowmem only", True: "highmem"}, False, ALL, kind=bool),
)}
ROW_DIMENSIONS = ("guest", "device", "via")
COLUMN_DIMENSIONS = tuple(name for name in DIMENSIONS if name != "operation" and name not in ROW_DIMENSIONS)


class CoversError(ValueError):
    """A ``covers`` mark (or a result's combination) outside the vocabulary; the message names the
    dimension, the value and what is allowed."""


def _allowed(dim: Dimension) -> str:
    if dim.kind is int:
        return f"a whole number from {min(dim.values)} to {max(dim.values)}"
    if dim.kind is bool:
        return "True or False"
    return ", ".join(repr(v) for v in dim.values)


def check_covers(values: Mapping[str, object]) -> dict[str, Value]:
    """The full combination a mark declares (defaults filled in, only dimensions that mean something
    for its operation), or CoversError naming what is wrong."""
    unknown = sorted(set(values) - set(DIMENSIONS))
    if unknown:
        raise CoversError(f"unknown dimension {unknown[0]!r}: known are {', '.join(DIMENSIONS)}")
    operation = values.get("operation")
    if operation not in OPERATIONS:
        raise CoversError(f"operation={operation!r}: must be one of {_allowed(DIMENSIONS['operation'])}")
    combination: dict[str, Value] = {}
    for name, dim in DIMENSIONS.items():
        if operation not in dim.operations:
            if name in values:
                raise CoversError(f"{name}={values[name]!r} means nothing for operation {operation!r} "
                                  f"(it applies to {', '.join(sorted(dim.operations))})")
            continue
        if name not in values:
            if dim.default is None:
                raise CoversError(f"{name} is missing: every mark names it ({_allowed(dim)})")
            combination[name] = dim.default
            continue
        value = values[name]
        if type(value) is not dim.kind or value not in dim.values:
            raise CoversError(f"{name}={value!r} is not in the vocabulary: {_allowed(dim)}")
        combination[name] = value
    return combination


# ---- the results file -----------------------------------------------------------------------------


@dataclass
class Record:
    test: str
    outcome: str
    reason: str | None
    covers: list[dict[str, Value]]


@dataclass
class Results:
    run: dict[str, object]
    tests: list[Record] = field(default_factory=list)


def write_results(path: str | os.PathLike, results: Results) -> None:
    data = {"format": RESULTS_FORMAT, "version": RESULTS_VERSION, "run": results.run,
            "tests": [{"test": t.test, "outcome": t.outcome, "reason": t.reason, "covers": t.covers} for t in results.tests]}
    tmp = Path(f"{path}.tmp")
    tmp.write_text(json.dumps(data, indent=1) + "\n")
    tmp.replace(path)


def read_results(path: str | os.PathLike) -> Results:
    """Read and check a results file; ValueError naming the file (and test) when it is not one."""
    try:
        data = json.loads(Path(path).read_text())
    except OSError as err:
        raise ValueError(f"results file '{path}': cannot be read: {err.strerror}") from None
    except json.JSONDecodeError as err:
        raise ValueError(f"results file '{path}': not JSON ({err})") from None
    if not isinstance(data, dict) or data.get("format") != RESULTS_FORMAT:
        raise ValueError(f"results file '{path}': not a test matrix results file (written by pytest --matrix-results)")
    if data.get("version") != RESULTS_VERSION:
        raise ValueError(f"results file '{path}': version {data.get('version')!r}; this tool reads version {RESULTS_VERSION}")
    results = Results(dict(data.get("run") or {}))
    for entry in data.get("tests", []):
        name = entry.get("test")
        if entry.get("outcome") not in OUTCOMES:
            raise ValueError(f"results file '{path}': test {name}: outcome {entry.get('outcome')!r} is not one of {', '.join(OUTCOMES)}")
        try:
            covers = [check_covers(c) for c in entry.get("covers", [])]
        except CoversError as err:
            raise ValueError(f"results file '{path}': test {name}: {err}") from None
        results.tests.append(Record(name, entry["outcome"], entry.get("reason"), covers))
    return results


def declarations_digest(results: Results) -> str:
    """A digest of which tests declare which combinations (not of their outcomes): the page carries
    it, so a test can tell the page was made from the suite's current marks."""
    pairs = sorted(json.dumps([t.test, sorted(json.dumps(c, sort_keys=True) for c in t.covers)]) for t in results.tests)
    return hashlib.sha256("\n".join(pairs).encode()).hexdigest()[:32]


# ---- the Markdown ---------------------------------------------------------------------------------

MARKS = {"passed": "✓", "failed": "✗", "skipped": "skipped"}
NOT_APPLICABLE = "–"


def merge(outcomes: Iterable[str]) -> str | None:
    """A cell's outcome: failed if any test failed, passed if any passed, skipped if all were; None
    (blank) when no test ran."""
    ran = [o for o in outcomes if o != "not run"]
    for outcome in ("failed", "passed", "skipped"):
        if outcome in ran:
            return outcome
    return None


@dataclass(frozen=True)
class Entry:
    """One combination one test declared, with that test's outcome."""

    combo: tuple[tuple[str, Value], ...]
    test: Record

    def __getitem__(self, name: str) -> Value:
        return dict(self.combo)[name]

    def get(self, name: str) -> Value | None:
        return dict(self.combo).get(name)


def _order(name: str, value: Value) -> int:
    return list(DIMENSIONS[name].values).index(value)


def row_key(entry: Entry) -> tuple[Value, ...]:
    return tuple(entry[name] for name in ROW_DIMENSIONS)


def row_label(key: tuple[Value, ...]) -> str:
    guest, device, via = key
    return f"{guest}" + (f" + {device}" if device != "none" else "") + f" ({VIA[via]})"


def column_key(entry: Entry) -> tuple[tuple[str, Value], ...]:
    return tuple((name, entry[name]) for name in COLUMN_DIMENSIONS if entry.get(name) is not None)


def column_label(key: tuple[tuple[str, Value], ...]) -> str:
    parts = [DIMENSIONS[n].label(v) for n, v in key if DIMENSIONS[n].shown or v != DIMENSIONS[n].default]
    return " · ".join(parts)


def fixed_columns(operation: str) -> list[tuple[tuple[str, Value], ...]]:
    """The columns every table of ``operation`` has, covered or not: each value of each shown dimension."""
    dims = [d for d in DIMENSIONS.values() if d.shown and operation in d.operations]
    defaults = [(n, d.default) for n, d in DIMENSIONS.items()
                if n in COLUMN_DIMENSIONS and not d.shown and operation in d.operations]
    columns = []
    for values in itertools.product(*(list(d.values) for d in dims)):
        chosen = dict(zip([d.name for d in dims], values))
        columns.append(tuple(sorted([*chosen.items(), *defaults], key=lambda kv: COLUMN_DIMENSIONS.index(kv[0]))))
    return columns


def _shown_match(entry: Entry, column: tuple[tuple[str, Value], ...]) -> bool:
    """The entry has the column's values of the shown dimensions (vendor, restore), whatever its other options."""
    return all(entry.get(n) == v for n, v in column if DIMENSIONS[n].shown)


def _sort_key(key: tuple[tuple[str, Value], ...]) -> tuple[int, ...]:
    return tuple(_order(n, v) for n, v in key)


def _table(header: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return lines


def _cell(outcome: str | None, ref: str = "") -> str:
    if outcome is None:
        return ""
    return MARKS[outcome] + (f" {ref}" if ref else "")


def entries_of(results: Results) -> list[Entry]:
    return [Entry(tuple(c.items()), t) for t in results.tests for c in t.covers]


# One row of the overview per value a reader looks for; bool dimensions only when true, streams as
# the values a run used besides one.
def overview_rows(entries: list[Entry]) -> list[tuple[str, Value, Callable[[Entry], bool]]]:
    rows = []
    for name, dim in DIMENSIONS.items():
        if name == "operation":
            continue
        values = list(dim.values)
        if dim.kind is bool:
            values = [True]
        elif dim.kind is int:
            values = sorted({dim.default, *(e.get(name) for e in entries if e.get(name) is not None)})
        for value in values:
            rows.append((name, value, lambda e, n=name, v=value: e.get(n) == v))
    return rows


def option_items() -> list[tuple[str, Callable[[Entry], bool]]]:
    """The migration options the 'together' table crosses: warm/live, vmmrun/vmmctl, a device, and
    every other value of a dimension migrations have (streams counted as one: two or more)."""
    items: list[tuple[str, Callable[[Entry], bool]]] = [
        ("warm", lambda e: e["operation"] == "migrate-warm"),
        ("live", lambda e: e["operation"] == "migrate-live"),
        ("vmmrun/vmmctl", lambda e: e["via"] == "cli"),
        ("a device", lambda e: e["device"] != "none"),
    ]
    for name in COLUMN_DIMENSIONS:
        dim = DIMENSIONS[name]
        if not dim.operations & MIGRATIONS:
            continue
        if dim.kind is int:
            items.append((f"≥ {dim.label(2)}", lambda e, n=name: (e.get(n) or 0) >= 2))
            continue
        for value in dim.values:
            if value != dim.default:
                items.append((dim.label(value), lambda e, n=name, v=value: e.get(n) == v))
    return items


def render(results: Results, command: str) -> str:
    """docs/test-matrix.md from a run's results."""
    entries = entries_of(results)
    run = results.run
    counts = {o: sum(t.outcome == o for t in results.tests) for o in OUTCOMES}
    out = ["# Test matrix", "", f"<!-- declarations {declarations_digest(results)} -->", ""]
    out += [
        "Which guests, devices, save/restore modes, migration modes and CPU vendors the test suite **proves** work together.",
        "Each test that proves a guest ends exactly as it should declares what it covers (`@pytest.mark.covers(...)`);",
        "this page is made from a real run of those tests: a cell is filled only by a test that ran, with its outcome.",
        "A blank cell is a combination no test that ran proves. The declarations are checked against the vocabulary",
        "at the end of this page; what each test checks is in its code (the test ids are listed under each table).",
        "",
        f"Generated by `{command}` on {run.get('finished', '?')}"
        + (f" from commit {run['commit']}" if run.get("commit") else "")
        + f", {run.get('platform', '?')}, Python {run.get('python', '?')}: pytest ran `pytest {' '.join(run.get('pytest_args', []))}`;",
        f"{len(results.tests)} tests declare coverage: {counts['passed']} passed, {counts['failed']} failed, "
        f"{counts['skipped']} skipped" + (f", {counts['not run']} did not run" if counts["not run"] else "") + ".",
        "",
        f"Legend: ✓ passed · ✗ failed · skipped (reason in the list) · blank: not covered · {NOT_APPLICABLE} does not apply · "
        "`#n` the tests behind a cell, listed below its table. A set of options (a column; for migrations a row) names the "
        "vendor, the restore mode where there is one, and whatever differs from the defaults (the vocabulary at the end).",
        "",
    ]
    out += _overview(entries)
    refs: list[str] = []
    for operation in OPERATIONS.values():
        out += _operation_table(operation, [e for e in entries if e["operation"] == operation.name], refs)
    out += _together(entries)
    out += _not_covered(results, entries)
    out += _vocabulary()
    out += ["## Regenerate", "",
            "```sh",
            ".venv/bin/python -m tools.test_matrix --run      # runs only the marked tests (pytest -m covers), then writes this page",
            "```",
            "",
            "It takes a few minutes; `.ci/run` does not run it. A new exactness test adds `@pytest.mark.covers(operation=..., "
            "guest=..., via=..., ...)` (one mark per combination it proves; `\"{param}\"` takes a parameter's id); a value "
            "outside the vocabulary stops any pytest run naming the test (tests/matrix_plugin.py).", ""]
    return "\n".join(out)


def _overview(entries: list[Entry]) -> list[str]:
    out = ["## At a glance", "", "Every value of the vocabulary, and whether a test proves it with each operation.", ""]
    rows = []
    for name, value, match in overview_rows(entries):
        cells = [f"{name}: **{DIMENSIONS[name].label(value)}**"]
        for op in OPERATIONS:
            if op not in DIMENSIONS[name].operations:
                cells.append(NOT_APPLICABLE)
                continue
            cells.append(_cell(merge(e.test.outcome for e in entries if e["operation"] == op and match(e))))
        rows.append(cells)
    return out + _table(["", *(o.title for o in OPERATIONS.values())], rows) + [""]


def _operation_table(operation: Operation, entries: list[Entry], refs: list[str]) -> list[str]:
    """One operation's table: a row per guest (with its device and what ran it) and a column per
    vendor, restore mode and set of options; migrations, which have many sets of options and few
    guests, the other way round."""
    out = [f"## {operation.title}", "", f"A ✓ says: the guest was {operation.proves}.", ""]
    options = fixed_columns(operation.name)
    options += sorted({column_key(e) for e in entries} - set(options), key=_sort_key)
    guests = sorted({row_key(e) for e in entries}, key=lambda k: tuple(_order(n, v) for n, v in zip(ROW_DIMENSIONS, k)))
    if not guests:
        return out + ["No test that ran proves this operation.", ""]
    across = operation.name in MIGRATIONS
    table, notes = [], []
    for first in options if across else guests:
        cells = [column_label(first) if across else row_label(first)]
        for second in guests if across else options:
            guest, option = (second, first) if across else (first, second)
            here = [e for e in entries if row_key(e) == guest and column_key(e) == option]
            outcome = merge(e.test.outcome for e in here)
            if outcome is None:
                cells.append("")
                continue
            refs.append("")
            ref = f"#{len(refs)}"
            cells.append(_cell(outcome, ref))
            tests = "; ".join(f"`{e.test.test}` {MARKS.get(e.test.outcome, e.test.outcome)}"
                              + (f" ({e.test.reason})" if e.test.reason and e.test.outcome != "passed" else "") for e in here)
            notes.append(f"- **{ref}** {row_label(guest)}, {column_label(option)}: {tests}")
        table.append(cells)
    header = ["options", *(row_label(g) for g in guests)] if across else ["guest", *(column_label(o) for o in options)]
    return out + _table(header, table) + ["", *notes, ""]


def _together(entries: list[Entry]) -> list[str]:
    migrations = [e for e in entries if e["operation"] in MIGRATIONS]
    items = option_items()
    out = ["## Migration options together", "",
           "Whether a migration that passed had both the row's and the column's option (the diagonal: the option at all).", ""]
    rows = []
    for label, match in items:
        rows.append([f"**{label}**", *(_cell(merge(e.test.outcome for e in migrations if match(e) and other(e)))
                                       for _, other in items)])
    return out + _table(["", *(label for label, _ in items)], rows) + [""]


def _join(words: list[str]) -> str:
    return ", ".join(words)


def _not_covered(results: Results, entries: list[Entry]) -> list[str]:
    out = ["## Not covered", "", "What this run does not prove, from the tables above.", ""]
    verbs = {"checkpoint": "checkpointed", "suspend": "suspended", "state-move": "moved into a fresh machine",
             "migrate-warm": "migrated warm", "migrate-live": "migrated live"}
    lines = []
    for name, value, match in overview_rows(entries):
        dim, label = DIMENSIONS[name], DIMENSIONS[name].label(value)
        if value in dim.harness:
            continue
        ops = [op for op in OPERATIONS if op in dim.operations]
        missing = [op for op in ops if merge(e.test.outcome for e in entries if e["operation"] == op and match(e)) != "passed"]
        if missing == ops and len(ops) == len(OPERATIONS):
            lines.append(f"- {name} **{label}**: proved by no test that passed.")
        elif missing:
            lines.append(f"- {name} **{label}**: never {_join([verbs[op] for op in missing])}.")
    out += ["### Values never proved with an operation", "", *lines, ""]
    lines = []
    for operation in OPERATIONS:
        here = [e for e in entries if e["operation"] == operation]
        for row in sorted({row_key(e) for e in here}, key=str):
            blank = [column_label(c) for c in fixed_columns(operation)
                     if merge(e.test.outcome for e in here if row_key(e) == row and _shown_match(e, c)) != "passed"]
            if blank:
                lines.append(f"- {verbs[operation]}: {row_label(row)}: never with {_join(blank)}.")
    out += ["### Guests never run with a vendor or restore mode", "", *(lines or ["None."]), ""]
    migrations = [e for e in entries if e["operation"] in MIGRATIONS]
    items = option_items()
    lines = []
    for i, (label, match) in enumerate(items):
        never = [other_label for other_label, other in items[i + 1:]
                 if merge(e.test.outcome for e in migrations if match(e) and other(e)) != "passed"]
        if never:
            lines.append(f"- **{label}** never with: {_join(never)}.")
    out += ["### Migration options never proved together", "", *lines, ""]
    lines = [f"- `{t.test}`: {t.outcome}" + (f" ({t.reason})" if t.reason else "")
             for t in results.tests if t.outcome != "passed"]
    out += ["### Declared but not proved on this run", "", *(lines or ["None: every test that declares coverage passed."]), ""]
    out += ["### What the matrix cannot show", "",
            "- Each test declares one device at most: no test here proves a guest driving two devices at once.",
            "- A declaration says what a test proves; the matrix checks its words against the vocabulary, not its code. "
            "Read the test (its id is listed) for what exactly it compares.", ""]
    return out


def _vocabulary() -> list[str]:
    rows = []
    for name, dim in DIMENSIONS.items():
        values = (f"{min(dim.values)} to {max(dim.values)}" if dim.kind is int
                  else _join([f"`{v}`" if dim.kind is str else f"`{v}` ({dim.label(v)})" for v in dim.values]))
        default = "required" if dim.default is None else f"`{dim.default}`"
        applies = "all" if dim.operations == ALL else _join(sorted(dim.operations))
        rows.append([f"`{name}`", dim.meaning, values, default, applies])
    return ["## Vocabulary", "", "What a `covers` mark may say (tools/test_matrix.py).", "",
            *_table(["dimension", "meaning", "values", "default", "operations"], rows), ""]


# ---- the command ----------------------------------------------------------------------------------


def run_marked_tests(results_path: Path, extra: list[str]) -> int:
    """Run the tests that declare coverage, recording their results; pytest's exit status."""
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "covers", "-p", "no:cacheprovider", "--matrix-results", str(results_path), *extra]
    return subprocess.run(cmd, cwd=ROOT).returncode


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m tools.test_matrix", description=__doc__.split("\n\n")[0])
    parser.add_argument("results", nargs="?", help="a results file from pytest --matrix-results FILE")
    parser.add_argument("--run", action="store_true", help="run the marked tests (pytest -m covers) first and use their results")
    parser.add_argument("-o", "--output", default=str(ROOT / DOC), help=f"where to write the Markdown (default {DOC})")
    parser.add_argument("--pytest-arg", action="append", default=[], metavar="ARG", help="one more argument for pytest with --run")
    args = parser.parse_args(argv)
    if args.run == bool(args.results):
        parser.error("give a results file, or --run to make one (not both)")
    status = 0
    with tempfile.TemporaryDirectory(prefix="vmmpy-matrix-") as tmp:
        if args.run:
            path = Path(tmp) / "results.json"
            status = run_marked_tests(path, args.pytest_arg)
            if status not in (0, 1):
                print(f"test_matrix: pytest exited {status} (interrupted, usage error or no tests): the matrix was not written",
                      file=sys.stderr)
                return 1
            command = ".venv/bin/python -m tools.test_matrix --run" + "".join(f" --pytest-arg={a}" for a in args.pytest_arg)
        else:
            path = Path(args.results)
            command = f"python -m tools.test_matrix {path.name}"
        try:
            results = read_results(path)
        except ValueError as err:
            print(f"test_matrix: {err}", file=sys.stderr)
            return 2
    Path(args.output).write_text(render(results, command))
    failed = sum(t.outcome == "failed" for t in results.tests)
    shown = Path(args.output).resolve()
    print(f"wrote {shown.relative_to(ROOT) if shown.is_relative_to(ROOT) else shown}: {len(results.tests)} tests, {failed} failed")
    return 1 if failed or status else 0


if __name__ == "__main__":
    sys.exit(main())
