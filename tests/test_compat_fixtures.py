"""Compatibility, proved on bytes made by earlier vmmpy: every fixture set under
``tests/fixtures/compat/`` restores here and its guest finishes exactly.

Each set was written by ``tools/make_compat_fixtures.py`` with the format of its day. Fixture sets
are NEVER regenerated for an existing version: a set stands for checkpoints and migration streams
users already have. A change to a section (a new version) or a format adds a new set beside the old
ones; every set must keep restoring, so a reader that stops reading an old version fails here.
"""

from __future__ import annotations

import json
import lzma
import subprocess
from pathlib import Path

import pytest

from .procs import vmmrun_cmd

FIXTURES = Path(__file__).parent / "fixtures" / "compat"
CHECKPOINT_SETS = sorted(p for p in FIXTURES.iterdir() if (p / "args.json").exists()) if FIXTURES.exists() else []


def unpack_checkpoint(fixture: Path, into: Path) -> tuple[Path, dict]:
    args = json.loads((fixture / "args.json").read_text())
    for packed in fixture.glob("*.xz"):
        (into / packed.name[:-3]).write_bytes(lzma.decompress(packed.read_bytes()))
    return into / f"{args['name']}.ckp", args


def abtest_console(sweeps: int, report: int, pages: int) -> str:
    """What abtest prints over a whole run (python/vmmpy/guest/programs/abtest.py)."""
    lines = "".join(f"abtest: sweep {n}\n" for n in range(report, sweeps + 1, report))
    return lines + f"abtest: done {sweeps} sweeps over {pages} pages, all counters {sweeps}\n"


def guest_arg(args: dict, key: str) -> int:
    guest = args["guest"]
    return int(next(a.split("=", 1)[1] for a in guest if a.startswith(f"{key}=")))


def test_there_is_a_checkpoint_fixture_set():
    assert CHECKPOINT_SETS, f"no fixture set under {FIXTURES}: tools/make_compat_fixtures.py makes one"


@pytest.mark.parametrize("mode", ["eager", "lazy"])
@pytest.mark.parametrize("fixture", CHECKPOINT_SETS, ids=lambda p: p.name)
def test_an_old_checkpoint_restores_and_its_guest_finishes_exactly(fixture, mode, tmp_path):
    ckp, args = unpack_checkpoint(fixture, tmp_path)
    before = (fixture / "console-before.txt").read_text()
    memsize = int(args["guest"][args["guest"].index("-m") + 1].rstrip("M")) << 20
    expected = abtest_console(guest_arg(args, "sweeps"), guest_arg(args, "report"), (memsize - (2 << 20)) // 4096)
    assert before and expected.startswith(before) and before != expected, "the set was made partway through the run"
    console = tmp_path / "console.log"
    console.write_text(before)
    resumed = subprocess.run(
        vmmrun_cmd("-r", str(ckp), "--restore-mode", mode, "-l", f"com1,{console}", "--run-dir", str(tmp_path), args["name"]),
        capture_output=True, text=True, timeout=300,
    )
    assert resumed.returncode == 1, resumed.stderr
    assert console.read_text() == expected


MIGRATION_SETS = [p for p in CHECKPOINT_SETS if (p / "migration-state.bin.xz").exists()]


def test_there_is_a_migration_fixture_set():
    assert MIGRATION_SETS, f"no recorded migration stream under {FIXTURES}: tools/make_compat_fixtures.py makes one"


@pytest.mark.parametrize("reader", ["this", "bumped"])
@pytest.mark.parametrize("fixture", MIGRATION_SETS, ids=lambda p: p.name)
def test_an_old_migration_stream_is_received_and_its_guest_finishes_exactly(fixture, reader, tmp_path, monkeypatch):
    """Round 0's page batches and the STATE payload, as an older source sent them, go through the
    destination's receive path (``recv_pages`` per batch, hashed into a digest tracker that must
    match the source's digest, as the commit checks; the state decoded and checked as "migration
    stream") into a fresh machine, which finishes the run. The handshake and framing around them
    are not recorded: their nonces and HMAC make a recording unreplayable (the tool's doc).

    ``bumped``: the receiver's PM device is one version newer (a field added with a default, as
    tests/test_persist_versions.py declares it) and still takes the old section."""
    if reader == "bumped":
        from vmmpy.devices.pm import PowerManagement

        from .test_persist_versions import PmStateV2

        monkeypatch.setattr(PowerManagement, "STATE", PmStateV2)
    from vmmpy.devices.uart import CaptureConsole
    from vmmpy.runtime.config import VmConfig
    from vmmpy.runtime.process import Machine
    from vmmpy.state import decode_sections
    from vmmpy.state.kernel import restore_sections

    from .inproc import run_to_end

    args = json.loads((fixture / "args.json").read_text())
    pages = tmp_path / "pages.bin"
    pages.write_bytes(lzma.decompress((fixture / "migration-pages.bin.xz").read_bytes()))
    state = lzma.decompress((fixture / "migration-state.bin.xz").read_bytes())
    guest = args["guest"]
    memsize = int(guest[guest.index("-m") + 1].rstrip("M")) << 20
    console = CaptureConsole()
    target = Machine(VmConfig(name="compat-dst", memsize=memsize), consoles={"com1": console})
    target.setup_memory()
    tracker = target.vm.memory.digest_tracker()
    received = {"batches": 0, "data_pages": 0, "zero_pages": 0}
    with open(pages, "rb") as f:
        for _ in range(args["migration_batches"]):
            got = target.vm.memory.recv_pages(f.fileno(), tracker=tracker)
            received["batches"] += 1
            received["data_pages"] += got["data_pages"]
            received["zero_pages"] += got["zero_pages"]
        assert f.read() == b"", "every recorded byte was a batch"
    assert received["data_pages"] + received["zero_pages"] == memsize // 4096, "round 0 carried every page"
    assert f"{tracker.digest():032x}" == args["memory_digest"], "the commit's digest check passes"
    restore_sections(target, decode_sections(state, what="migration stream"), what="migration stream")
    target.start(serve_control=False)
    assert run_to_end(target, timeout=300) is not None
    before = (fixture / "console-before.txt").read_text()
    expected = abtest_console(guest_arg(args, "sweeps"), guest_arg(args, "report"), (memsize - (2 << 20)) // 4096)
    assert before + bytes(console.output).decode() == expected
