"""Lazy restore loading ahead: a background fill, the working set recorded by one restore and
loaded first by the next, and the statistics that say how long the guest waited.

The proof is the guest's (abtest, instruction TSC, deterministic): restored lazily with no
prefetch, with the fill, and with a recorded working set, it ends with the same exit status,
memory, registers, instruction count and console as a run that never stopped. The working set
reorders loads, seen in the statistics (chunks prefetched before the fill), never in timing. A
bad chunk the fill finds stops a guest that is not even running; a damaged, stale or foreign
working-set file is ignored with a warning naming it, and the restore goes on.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import struct
import time
from pathlib import Path

import pytest

from vmmpy import Vm
from vmmpy.snapshot import CheckpointError
from vmmpy.snapshot.workingset import WS_SUFFIX, decode_working_set, encode_working_set

from .procs import start_vmmrun, stop, vmmctl, wait_for_socket, wait_for_state
from .test_checkpoint_restore import flip
from .test_vm_api import final_state as vm_api_final_state

GUEST = "abtest"
ARGS = {"sweeps": 600, "report": 100}
MEMORY = "64M"
CHUNKS = 16  # 64 MiB in 4 MiB chunks
PAUSE_AT = 12_000_000  # instructions: where the checkpoint is taken, about a third of the run


def final_state(vm: Vm) -> tuple:
    """Exit status, SHA-256 of lowmem and vCPU 0's instruction count (as test_vm_api), and
    vCPU 0's registers."""
    return (*vm_api_final_state(vm), tuple(sorted(vm.machine.vm.vcpus[0].registers().items())))


def wait_for(what: str, done, timeout: float = 60.0):
    deadline = time.monotonic() + timeout
    while not (value := done()):
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)
    return value


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """The reference end of an uninterrupted run, and a checkpoint of the same guest a third in
    (the console it printed before)."""
    directory = tmp_path_factory.mktemp("prefetch")
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start()
        expected = final_state(vm)
        console = vm.console
    assert expected[0] == 1 and "all counters 600" in console
    path = directory / "vm.ckp"
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start(pause_at=PAUSE_AT)
        vm.wait_paused(60)
        vm.checkpoint(path)
        first = vm.console
    assert "done" not in first
    return path, expected, console, first


def fresh_copy(saved, directory: Path) -> Path:
    """The saved checkpoint's three files in ``directory`` (no working set)."""
    path = directory / "vm.ckp"
    for suffix in ("", ".kern", ".meta"):
        shutil.copyfile(f"{saved[0]}{suffix}", f"{path}{suffix}")
    return path


def restore_and_finish(saved, path: Path, prefetch: str, **kwargs) -> dict:
    """Restore lazily, run to the end, check it is the reference end; the restore's statistics
    once the Vm is closed (a working set recorded is written by then)."""
    _, expected, console, first = saved
    with Vm.restore(path, mode="lazy", prefetch=prefetch, **kwargs) as vm:
        vm.start()
        assert final_state(vm) == expected
        assert first + vm.console == console
        loading = vm.machine.lazy_loading
    stats = loading.status()
    assert stats["resident"] and stats["failed"] == 0
    return stats


def test_lazy_restores_with_and_without_prefetch_end_as_an_uninterrupted_run(saved, tmp_path):
    path = fresh_copy(saved, tmp_path)
    ws = Path(f"{path}{WS_SUFFIX}")
    none = restore_and_finish(saved, path, "none")
    assert none["prefetched"] == none["filled"] == 0 and none["demand_loads"] == CHUNKS, "every chunk loaded on demand"
    assert none["working_set_written"] == str(ws) and ws.is_file(), "the restore recorded its working set"
    recorded = decode_working_set(ws.read_bytes(), chunk_size=4 << 20, chunks=CHUNKS,
                                  meta_sha256=hashlib.sha256(Path(f"{path}.meta").read_bytes()).hexdigest())
    assert 0 in recorded, "the guest's code (chunk 0) is in what it touched first"

    fill = restore_and_finish(saved, path, "fill", record_working_set=0)
    assert fill["prefetched"] == 0 and fill["demand_loads"] + fill["filled"] == CHUNKS
    assert "working_set" not in fill and "working_set_written" not in fill

    used = restore_and_finish(saved, path, "working-set")
    assert used["working_set"]["status"] == "used" and used["working_set"]["chunks"] == len(recorded)
    assert used["prefetched"] >= 1 and used["prefetched"] + used["demand_loads"] + used["filled"] == CHUNKS


def test_the_working_set_is_loaded_before_the_rest(saved, tmp_path):
    """A guest held at its first instruction touches nothing, so the loader alone loads: the
    working set's chunks as prefetched, then the others as filled."""
    path = fresh_copy(saved, tmp_path)
    working_set = [9, 3, 14, 0]
    meta_sha256 = hashlib.sha256(Path(f"{path}.meta").read_bytes()).hexdigest()
    Path(f"{path}{WS_SUFFIX}").write_bytes(encode_working_set(working_set, chunk_size=4 << 20, meta_sha256=meta_sha256))
    for prefetch, prefetched in (("working-set", 4), ("fill", 0), ("none", 0)):
        with Vm.restore(path, mode="lazy", prefetch=prefetch, record_working_set=0) as vm:
            vm.start(pause_at=PAUSE_AT)  # vCPU 0 has retired PAUSE_AT already: it pauses at once
            vm.wait_paused(60)
            if prefetch == "none":
                time.sleep(0.2)
                stats = vm.restore_status()
                assert stats["loaded"] == 0 and not stats["resident"], "nothing loads ahead"
                continue
            stats = wait_for("fully resident", lambda: (s := vm.restore_status())["resident"] and s)
            assert (stats["prefetched"], stats["filled"], stats["demand_loads"], stats["waits"]) == (prefetched, CHUNKS - prefetched, 0, 0)
            assert stats["resident_seconds"] > 0
            assert vm.machine.vm.vcpus[0].instructions_retired == PAUSE_AT


def test_a_bad_chunk_the_fill_finds_stops_a_guest_that_never_reached_it(saved, tmp_path):
    path = fresh_copy(saved, tmp_path)
    flip(path, 15 * (4 << 20) + 5 * 4096)  # the last chunk: a page of counters
    with Vm.restore(path, mode="lazy", prefetch="fill") as vm:
        vm.start(pause_at=PAUSE_AT)
        assert vm.wait(60) == 4, "the guest is stopped"
        assert vm.exit_reason == (f"guest stopped: checkpoint '{path}': memory chunk 15 (file bytes 0x3c00000..0x4000000, "
                                  "guest-physical 0x3c00000..0x4000000) does not match its recorded hash; the guest may not use it")
        assert vm.machine.vm.vcpus[0].instructions_retired == PAUSE_AT, "it never ran an instruction"
        stats = vm.restore_status()
    assert stats["failed"] == 1 and not stats["resident"]


@pytest.mark.parametrize("damage", ["flipped-byte", "truncated", "stale", "foreign", "not-a-working-set"])
def test_a_damaged_stale_or_foreign_working_set_is_ignored_with_a_warning(saved, tmp_path, caplog, damage):
    path = fresh_copy(saved, tmp_path)
    ws = Path(f"{path}{WS_SUFFIX}")
    meta_sha256 = hashlib.sha256(Path(f"{path}.meta").read_bytes()).hexdigest()
    good = encode_working_set([2, 0, 1], chunk_size=4 << 20, meta_sha256=meta_sha256)
    reasons = {
        "flipped-byte": (good[:60] + bytes([good[60] ^ 1]) + good[61:], "its SHA-256 does not match its contents"),
        "truncated": (good[:40], "is 40 bytes, shorter than the 88 of an empty working set"),
        "stale": (encode_working_set([2, 0], chunk_size=4 << 20, meta_sha256="ab" * 32), "recorded for another checkpoint"),
        "foreign": (None, "recorded for another checkpoint"),
        "not-a-working-set": (Path(f"{path}.meta").read_bytes()[:200], "its SHA-256 does not match"),
    }
    data, reason = reasons[damage]
    if data is None:  # the working set of another checkpoint (the same guest, saved later)
        with Vm.restore(path, mode="lazy", prefetch="none") as vm:
            vm.start(pause_at=PAUSE_AT + 1000)
            vm.wait_paused(60)
            vm.checkpoint(tmp_path / "other.ckp")
        other = hashlib.sha256((tmp_path / "other.ckp.meta").read_bytes()).hexdigest()
        data = encode_working_set([1], chunk_size=4 << 20, meta_sha256=other)
    ws.write_bytes(data)
    with caplog.at_level(logging.WARNING, logger="vmmpy.snapshot"):
        stats = restore_and_finish(saved, path, "working-set", record_working_set=0)
    assert stats["working_set"]["status"] == "ignored" and stats["prefetched"] == 0
    assert f"working set '{ws}' ignored: " in stats["working_set"]["reason"] and reason in stats["working_set"]["reason"]
    assert any(f"working set '{ws}' ignored" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize("field, change, message", [
    ("magic", lambda b: b"XMMPYWS\0" + b[8:], "magic b'XMMPYWS\\x00' is not b'VMMPYWS\\x00'"),
    ("version", lambda b: b[:8] + struct.pack("<I", 2) + b[12:], "version 2 is not the 1 this vmmpy reads"),
    ("chunk_size", lambda b: b[:16] + struct.pack("<Q", 2 << 20) + b[24:], "chunk_size 2097152 is not the checkpoint's 4194304"),
    ("count", lambda b: b[:12] + struct.pack("<I", 5) + b[16:], "count 5 does not match its size"),
    ("chunk past the end", lambda b: b[:56] + struct.pack("<I", 16) + b[60:], "chunk 16 is past the checkpoint's 16 chunks"),
    ("repeated chunk", lambda b: b[:60] + struct.pack("<I", 2) + b[64:], "a chunk is listed twice"),
])
def test_each_field_of_a_working_set_is_checked(field, change, message):
    meta_sha256 = "cd" * 32
    body = encode_working_set([2, 7, 5], chunk_size=4 << 20, meta_sha256=meta_sha256)[:-32]
    changed = change(body)
    data = changed + hashlib.sha256(changed).digest()  # a consistent file whose field is wrong
    assert decode_working_set(body + hashlib.sha256(body).digest(), chunk_size=4 << 20, chunks=16, meta_sha256=meta_sha256) == [2, 7, 5]
    with pytest.raises(CheckpointError) as caught:
        decode_working_set(data, chunk_size=4 << 20, chunks=16, meta_sha256=meta_sha256)
    assert message in str(caught.value), field


def test_vmmctl_status_and_vmmrun_show_the_restore_statistics(saved, tmp_path):
    path = fresh_copy(saved, tmp_path)
    proc = start_vmmrun(tmp_path, "-v", "-r", str(path), "--restore-mode", "lazy", "--restore-prefetch", "fill",
                        "-l", f"com1,{tmp_path / 'console.log'}", f"--pause-at={PAUSE_AT}", "st0")
    try:
        wait_for_socket(tmp_path, "st0", proc)
        wait_for_state(tmp_path, "st0", "paused")
        status = wait_for("fully resident", lambda: (s := json.loads(vmmctl(tmp_path, "--vm=st0", "--status", "--json").stdout))
                          ["restore"]["resident"] and s)
        restore = status["restore"]
        assert (restore["mode"], restore["prefetch"], restore["path"]) == ("lazy", "fill", str(path))
        assert (restore["filled"], restore["demand_loads"], restore["chunks"]) == (CHUNKS, 0, CHUNKS)
        text = vmmctl(tmp_path, "--vm=st0", "--status").stdout
        assert f"restore: lazy restore of '{path}' (fill); 16/16 chunks loaded: 0 on demand, 0 prefetched, 16 filled; " \
               "guest waited 0.0 ms in 0 loads" in text
        assert "fully resident after " in text
        assert vmmctl(tmp_path, "--vm=st0", "--resume").returncode == 0
        assert proc.wait(timeout=120) == 1
        stderr = proc.stderr.read()
    finally:
        stop(proc)
    assert f"vmmrun: st0: lazy restore of '{path}' (fill); 16/16 chunks loaded" in stderr, stderr
