"""Post-copy migration (issue 17): the guest runs on the destination at the switch and fetches the
pages it still lacks from the source, while the rest follow in the background.

The proof is the guest's, as for every live migration (``test_vm_api``): abtest is deterministic,
so a run carried across a post-copy migration must end exactly as an uninterrupted run: the same
console (the pieces each side printed, joined), the same final memory and instruction count;
switching at round 0, after N rounds and when the operator says, and through a page link cut in
the middle of post-copy and recovered. The memory-level tests prove each access path of the
destination (device DMA reads and writes, numpy views) sees the source's bytes, never zeros.
"""

from __future__ import annotations

import gc
import socket
import threading
import time

import numpy as np
import pytest

from vmmpy import Vm
from vmmpy.memory import GuestMemory
from vmmpy.migration import MigrationHandle, MigrationParams
from vmmpy.migration.downtime import active_holds
from vmmpy.runtime.guest_handle import MachineHandle

from .migration_proxy import ManualProxy
from .test_vm_api import final_state
from .tls_pki import Pki

GUEST = "abtest"
# Long enough that the guest is still running when a migration started at "sweep 500" switches
# over, even on a loaded machine: with 1500 sweeps the manual switch (once round 1 is under way)
# lost the race there now and then, and the guest powered off before it could be paused.
ARGS = {"sweeps": 6000, "report": 500}
MEMORY = "32M"


@pytest.fixture(scope="module")
def uninterrupted():
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm:
        vm.start()
        state = final_state(vm)
        console = vm.console
    assert state[0] == 1 and "all counters 6000" in console
    return state, console


def _migrate(vm1: Vm, address: tuple[str, int], params: MigrationParams, progress=None, on_phase=None, tls=None) -> MigrationHandle:
    return MigrationHandle(MachineHandle(vm1.machine), *address, live=True, params=params, progress=progress, on_phase=on_phase,
                           tls=tls)


def _wait_for(what, predicate, timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def _assert_ends_as_uninterrupted(vm1: Vm, vm2: Vm, uninterrupted) -> None:
    """The guest, moved from ``vm1`` to ``vm2``, ends there as the uninterrupted run did: its
    final memory and instruction count, and the console each side printed, joined."""
    expected, expected_console = uninterrupted
    first = vm1.console
    got = final_state(vm2)
    assert got == expected, "the guest's final memory or instruction count differs from an uninterrupted run"
    assert first + vm2.console == expected_console


def _finished(handle: MigrationHandle, vm1: Vm, vm2: Vm, uninterrupted):
    """Both sides' statistics once the migration completed and the guest ended on ``vm2`` as the
    uninterrupted run did."""
    stats = handle.wait(120)
    assert stats.status == "completed", stats.error
    dstats = vm2.received(60)
    assert dstats.status == "completed", dstats.error
    assert vm1.wait(10) == 0
    _assert_ends_as_uninterrupted(vm1, vm2, uninterrupted)
    return stats, dstats


def _check_figures(stats, dstats) -> None:
    pc, dpc = stats.postcopy, dstats.postcopy
    assert pc is not None and dpc is not None, "the migration did not switch to post-copy"
    # Every page the destination lacked came exactly once: on request or in the background.
    assert dpc["requested_pages"] + dpc["pushed_pages"] == dpc["pages_needed"] == pc["pages_needed"]
    assert pc["requested_pages"] == dpc["requested_pages"] and pc["pushed_pages"] == dpc["pushed_pages"]
    # The source's record carries what the guest's faults cost there (POSTCOPY_DONE).
    assert (pc["remote_faults"], pc["fault_p99_us"], pc["fault_max_us"]) == (dpc["remote_faults"], dpc["fault_p99_us"], dpc["fault_max_us"])
    assert pc["blocked_ms"] == pytest.approx(dpc["blocked_ms"], abs=0.01)
    # The guest ran before all its pages were here, and waited for some of them.
    assert dpc["waits"] > 0 and dpc["blocked_ms"] > 0 and dpc["link_down"] is None
    # It waited on a page it asked for (a remote fault), or on one the background fill was
    # already bringing: when the rounds left only a few chunks (after=2, 3 streams) the fill can
    # take them all first, and then no fault is recorded and no latency either.
    if dpc["remote_faults"] > 0:
        assert dpc["requested_pages"] > 0 and 0 < dpc["fault_p50_us"] <= dpc["fault_p99_us"] <= dpc["fault_max_us"]
    else:
        assert dpc["requested_pages"] == 0 and dpc["fault_p50_us"] == dpc["fault_p99_us"] == dpc["fault_max_us"] == 0


def _covers(postcopy: str, **more):
    return pytest.mark.covers(operation="migrate-live", guest=GUEST, via="api", postcopy=postcopy, **more)


@pytest.mark.parametrize("mode, streams", [
    pytest.param("after=0", 1, id="after=0", marks=_covers("round0")),
    pytest.param("after=2", 1, id="after=2", marks=_covers("after")),
    pytest.param("manual", 1, id="manual", marks=_covers("manual")),
    pytest.param("after=2", 3, id="after=2-3streams", marks=_covers("after", streams=3))])
def test_a_guest_moved_in_postcopy_ends_as_an_uninterrupted_run(uninterrupted, mode, streams):
    switched = threading.Event()
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        handle = None

        def progress(stats) -> None:
            # manual: the operator asks once round 1 is under way
            rnd = stats.current_round
            if mode == "manual" and rnd is not None and rnd.round >= 1 and not rnd.final and not switched.is_set():
                switched.set()
                handle.start_postcopy()

        # A downtime target no round meets: pre-copy alone would not finish before the switch.
        params = MigrationParams(postcopy=mode, max_rounds=30, policy="switch-over", downtime_target_ms=0.001, streams=streams)
        handle = _migrate(vm1, vm2.address, params, progress)
        stats, dstats = _finished(handle, vm1, vm2, uninterrupted)
    _check_figures(stats, dstats)
    # Held off for the switch on both ends, given back once the guest ran there (not kept for
    # the pages served after it).
    assert active_holds() == 0 and gc.isenabled()
    rounds = {"after=0": 0, "after=2": 2}.get(mode)
    if rounds is not None:
        assert stats.postcopy["after_rounds"] == rounds == len(stats.rounds)
    else:
        assert switched.is_set() and stats.postcopy["after_rounds"] >= 2
        assert any("asked by the operator" in n for n in stats.notes), stats.notes
    if mode == "after=0":
        assert stats.postcopy["pages_needed"] == (32 << 20) // 4096, "before any round every page is lacking"
        # With every page lacking, the guest's sweep outruns the background fill: it asks.
        assert dstats.postcopy["remote_faults"] > 0, "the guest never fetched a page on demand"
    else:
        assert stats.postcopy["pages_needed"] < (32 << 20) // 4096, "pages the rounds carried are not fetched again"
    assert "every page is here: the source's copy is no longer needed" in dstats.notes
    assert stats.streams == streams, "the rounds went over the streams asked for"


@_covers("recovered")
def test_a_page_link_cut_at_the_destination_is_recovered_by_the_source_reconnecting_by_itself(uninterrupted):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        incoming = vm2._incoming
        cut = threading.Event()

        def progress(stats) -> None:
            if stats.status == "postcopy" and not cut.is_set():
                cut.set()
                socket.socket.shutdown(incoming._receiver.conn, socket.SHUT_RDWR)  # the destination's end dies

        stats = _migrate(vm1, vm2.address, MigrationParams(postcopy="after=0", io_timeout=5.0), progress).wait(120)
        dstats = vm2.received(60)
        assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
        _assert_ends_as_uninterrupted(vm1, vm2, uninterrupted)
    assert stats.postcopy["link_failures"] >= 1 and stats.postcopy["recoveries"] >= 1
    assert not any("waiting for `vmmctl --migrate-recover" in n for n in stats.notes), "it recovered by itself"


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


def _encrypted(notes: list[str], names: str) -> bool:
    return any(n.startswith("encrypted with TLSv1.3") and names in n for n in notes)


@_covers("round0", tls=True)
def test_postcopy_over_mutual_tls_ends_as_an_uninterrupted_run(uninterrupted, pki):
    """Every page the destination lacks (round 0: all of them) is requested and answered inside
    the migration's TLS session, as its frames before and after are."""
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY, tls=pki.destination()) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        handle = _migrate(vm1, vm2.address, MigrationParams(postcopy="after=0"), tls=pki.source())
        stats, dstats = _finished(handle, vm1, vm2, uninterrupted)
    _check_figures(stats, dstats)
    assert stats.postcopy["after_rounds"] == 0 and stats.postcopy["pages_needed"] == (32 << 20) // 4096
    assert dstats.postcopy["remote_faults"] > 0, "the guest never fetched a page on demand"
    assert _encrypted(stats.notes, "127.0.0.1") and _encrypted(dstats.notes, "source.migration.test"), (stats.notes, dstats.notes)


def test_a_refusal_of_short_slices_is_in_both_ends_notes_after_a_postcopy_switch(uninterrupted, monkeypatch):
    """The switch is downtime too: where the kernel refuses short slices, both ends say so, and
    the guest still ends as if never moved."""
    from vmmpy.migration import downtime

    monkeypatch.setattr(downtime, "_slices_refused", "Operation not permitted")
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        handle = _migrate(vm1, vm2.address, MigrationParams(postcopy="after=0"))
        stats, dstats = _finished(handle, vm1, vm2, uninterrupted)
    for notes in (stats.notes, dstats.notes):
        assert sum("the kernel refused a shorter one (Operation not permitted)" in n for n in notes) == 1, notes


@_covers("recovered", tls=True)
def test_a_page_link_cut_over_tls_is_recovered_with_a_new_handshake_and_exact_memory(uninterrupted, pki):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY, tls=pki.destination()) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        incoming = vm2._incoming
        cut: list = []

        def progress(stats) -> None:
            if stats.status == "postcopy" and not cut:
                cut.append(incoming._receiver.conn)
                socket.socket.shutdown(cut[0], socket.SHUT_RDWR)  # the destination's end of the TLS connection dies

        params = MigrationParams(postcopy="after=0", io_timeout=5.0)
        stats = _migrate(vm1, vm2.address, params, progress, tls=pki.source()).wait(120)
        dstats = vm2.received(60)
        assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
        _assert_ends_as_uninterrupted(vm1, vm2, uninterrupted)
        assert incoming._receiver.conn is not cut[0], "the page exchange moved to the RECOVER connection"
    assert stats.postcopy["link_failures"] >= 1 and stats.postcopy["recoveries"] >= 1
    recovered = [n for n in stats.notes if n.startswith("post-copy page link recovered to")]
    assert recovered and all("(encrypted with TLSv1.3" in n and "127.0.0.1" in n for n in recovered), stats.notes


@_covers("recovered")
@pytest.mark.parametrize("fault", ["cut", "stall"])
def test_a_link_cut_in_postcopy_pauses_both_sides_and_a_recover_resumes_with_exact_memory(uninterrupted, fault):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY, params={"io_timeout": 1.0}) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        proxy = ManualProxy(vm2.address)
        cut = threading.Event()

        def progress(stats) -> None:
            if stats.status == "postcopy" and not cut.is_set():
                cut.set()
                # early in post-copy, most pages still on the source: the path closes, or goes silent
                proxy.cut() if fault == "cut" else proxy.stall()

        params = MigrationParams(postcopy="after=1", recover_timeout=0.3, io_timeout=1.0)
        handle = _migrate(vm1, proxy.address, params, progress)
        _wait_for("the source to wait for the operator",
                  lambda: handle.done() or any("waiting for `vmmctl --migrate-recover" in n for n in handle.stats.notes))
        assert not handle.done(), handle.stats.error
        assert handle.stats.status == "postcopy-paused"
        assert vm1.machine.paused and vm1.machine.exit_status is None, "the source keeps its paused guest and its memory"
        incoming = vm2._incoming
        _wait_for("the destination to see the link fail", lambda: incoming.record.status == "postcopy-paused")
        assert "the page link" in (incoming.record.postcopy["link_down"] or "")
        assert vm2.machine.exit_status is None, "the destination's guest waits for its pages; nothing is discarded"
        with pytest.raises(ValueError, match="this migration switches to post-copy by itself"):
            handle.start_postcopy()
        handle.recover(*vm2.address)  # the operator: straight to the destination, not through the dead path
        stats = handle.wait(120)
        assert stats.status == "completed", stats.error
        dstats = vm2.received(60)
        assert dstats.status == "completed", dstats.error
        _assert_ends_as_uninterrupted(vm1, vm2, uninterrupted)
    assert stats.postcopy["link_failures"] >= 1 and stats.postcopy["recoveries"] == 1
    assert dstats.postcopy["link_failures"] >= 1
    with pytest.raises(ValueError, match="nothing to recover: the migration is completed"):
        handle.recover()


@_covers("recovered")
def test_a_corrupted_page_reply_is_refused_the_guest_waits_and_the_link_is_recovered_exactly(uninterrupted):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        proxy = ManualProxy(vm2.address)

        def progress(stats) -> None:
            if stats.status == "postcopy":
                proxy.corrupt()  # the guest runs there: from here the source sends only page replies

        params = MigrationParams(postcopy="after=0", recover_timeout=0.3, io_timeout=5.0)
        handle = _migrate(vm1, proxy.address, params, progress)
        incoming = vm2._incoming
        _wait_for("the destination to refuse a reply",
                  lambda: incoming.record is not None and (incoming.record.postcopy or {}).get("link_failures", 0) > 0)
        assert vm2.machine.exit_status is None, "the destination's guest waits; nothing is discarded"
        _wait_for("the source to wait for the operator",
                  lambda: handle.done() or any("waiting for `vmmctl --migrate-recover" in n for n in handle.stats.notes))
        notes = " ".join(incoming.record.notes)
        assert "refused" in notes or "does not match" in notes or "page reply" in notes, notes
        handle.recover(*vm2.address)
        stats = handle.wait(120)
        dstats = vm2.received(60)
        assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
        _assert_ends_as_uninterrupted(vm1, vm2, uninterrupted)


@_covers("auto")
def test_auto_switches_to_postcopy_where_precopy_does_not_converge_instead_of_throttling(uninterrupted):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start()
        _wait_for("the guest's first sweeps", lambda: "sweep 500" in vm1.console or vm1.state != "running")
        # A target no round can meet: auto-converge would throttle (or max_rounds end it); auto switches.
        params = MigrationParams(postcopy="auto", downtime_target_ms=0.001, max_rounds=4)
        stats = _migrate(vm1, vm2.address, params).wait(120)
        dstats = vm2.received(60)
        assert stats.status == dstats.status == "completed", (stats.error, dstats.error)
        _assert_ends_as_uninterrupted(vm1, vm2, uninterrupted)
    assert stats.postcopy is not None and stats.throttle == 0.0, "post-copy, not the throttle, finished it"
    assert any("switching to post-copy" in n for n in stats.notes), stats.notes


def test_a_failure_before_the_switch_leaves_the_guest_running_on_the_source(uninterrupted):
    with Vm(GUEST, args=ARGS, memory=MEMORY) as vm1, Vm.receive(memory=MEMORY) as vm2:
        vm1.start()
        proxy = ManualProxy(vm2.address)

        def on_phase(phase: str) -> None:
            if phase in ("round 1", "pause"):
                proxy.cut()  # after round 0, whether round 1 is the final one or not: before any switch

        # "manual", never asked: the switch cannot come first however fast the rounds go (with
        # after=3 the rounds could reach it before the cut was felt, which is a different case).
        params = MigrationParams(postcopy="manual", io_timeout=5.0)
        stats = _migrate(vm1, proxy.address, params, on_phase=on_phase).wait(120)
        assert stats.status == "failed" and stats.owner == "source" and stats.postcopy is None
        # The source keeps its guest, as a pre-copy failure does: it runs on (or has run) to its own end.
        _, console = uninterrupted
        assert vm1.wait(120) == 1, vm1.machine.exit_reason
        assert vm1.console == console


# -- every access path of the destination sees the source's bytes ------------------------------------


def _pair(pages_lacking):
    """A source and a destination memory of 4 MiB that differ on ``pages_lacking``; the destination
    made to fetch exactly those from the source over a socket pair, served in a thread."""
    src = GuestMemory(4 << 20)
    dst = GuestMemory(4 << 20)
    rng = np.random.default_rng(7)
    for page in range(1024):
        data = rng.integers(1, 255, 4096, dtype=np.uint8).tobytes()
        src.write(page * 4096, data)
        dst.write(page * 4096, data if page not in pages_lacking else bytes(4096))
    runs = b"".join(int(p).to_bytes(8, "little") + (1).to_bytes(8, "little") for p in sorted(pages_lacking))
    server = src.postcopy_server(runs, 64 * 1024)
    link = dst.postcopy_link(runs, 64 * 1024, "test source")
    a, b = socket.socketpair()
    served = threading.Thread(target=server.serve, args=(b.fileno(),), daemon=True)
    served.start()
    link.attach(a.fileno())
    return src, dst, link, (a, b, served)


def _finish(link, conn) -> None:
    a, b, served = conn
    link.finish()
    served.join(10)
    a.close()
    b.close()


def test_device_dma_reads_and_writes_into_pages_not_fetched_see_the_source_s_bytes():
    lacking = {3, 17, 200, 201, 777}
    src, dst, link, conn = _pair(lacking)
    assert dst.read(200 * 4096 + 100, 64) == src.read(200 * 4096 + 100, 64)  # a DMA read: fetched first
    dst.write(777 * 4096 + 10, b"DMA!")  # a DMA write into part of a page not here: the rest is the source's
    expected = bytearray(src.read(777 * 4096, 4096))
    expected[10:14] = b"DMA!"
    assert dst.read(777 * 4096, 4096) == bytes(expected)
    assert link.stats().demand_pages >= 3
    dst.load_all()
    _finish(link, conn)
    view = dst.view("lowmem")
    assert bytes(view[3 * 4096:4 * 4096]) == src.read(3 * 4096, 4096)
    del view


def test_a_numpy_view_of_memory_still_arriving_sees_every_page():
    lacking = set(range(0, 1024, 3))
    src, dst, link, conn = _pair(lacking)
    view = dst.view("lowmem")  # fetches whatever it must first
    want = src.view("lowmem")
    assert np.array_equal(view, want)
    assert link.stats().demand_pages + link.stats().background_pages == len(lacking)
    del view, want
    _finish(link, conn)


def test_memory_viewed_at_the_switch_is_refused_by_name():
    dst = GuestMemory(1 << 20)
    view = dst.view("lowmem")
    with pytest.raises(Exception, match="segment 'lowmem' has 1 exported view"):
        dst.postcopy_link((0).to_bytes(8, "little") + (1).to_bytes(8, "little"), 64 * 1024, "test source")
    del view


# -- the command line ---------------------------------------------------------------------------------


@pytest.mark.covers(operation="migrate-live", guest=GUEST, via="cli", postcopy="after")
def test_vmmctl_postcopy_moves_a_guest_between_processes_exactly_and_warns_first(tmp_path):
    import json

    from .procs import vmmctl
    from .test_migration_processes import MiB, expected_console, finish
    from .test_migration_processes import migrate_pair as migrate_processes

    sweeps = 2000
    result, _source, dest, src_status, src_console, dst_console = migrate_processes(
        tmp_path, live=True, sweeps=sweeps, pause_at=4_000_001, guest_extra={"end": "8M"}, resume_first=False,
        ctl_extra=["--postcopy", "after=1"])
    assert result.returncode == 0, result.stderr
    assert "if this host dies then, the guest is lost" in result.stderr
    stats = json.loads(result.stdout)
    assert stats["status"] == "completed" and stats["postcopy"]["after_rounds"] == 1 and stats["round_count"] == 1
    assert src_status == 0
    assert finish(dest) == 1
    pages = (8 * MiB - 2 * MiB) // 4096
    assert src_console.read_text() + dst_console.read_text() == expected_console(sweeps, pages)

    bad = vmmctl(tmp_path, "--vm=src0", "--migrate-live", "127.0.0.1", "1", "--postcopy", "after=x")
    assert bad.returncode == 2 and "postcopy must be one of auto, manual, after=N" in bad.stderr and "'after=x'" in bad.stderr
    warm = vmmctl(tmp_path, "--vm=src0", "--migrate", "127.0.0.1", "1", "--postcopy", "auto")
    assert warm.returncode == 2 and "--postcopy finishes a live migration: use it with --migrate-live" in warm.stderr
    assert "--postcopy auto|after=N|manual" in vmmctl(tmp_path, "--help").stdout


def test_the_migration_line_carries_postcopy_s_figures(capsys):
    from vmmpy.cli.vmmctl import _print_migration

    record = {"status": "postcopy-paused", "live": True, "postcopy": {
        "after_rounds": 2, "pages_needed": 900, "requested_pages": 300, "pushed_pages": 100, "remote_faults": 40,
        "fault_p50_us": 61, "fault_p99_us": 150, "fault_max_us": 700, "blocked_ms": 12.5, "link_failures": 1}}
    _print_migration(record)
    out = capsys.readouterr().out
    assert "migration postcopy-paused (live)" in out
    assert ("post-copy after 2 rounds: 900 pages lacking at the switch, 300 fetched on request, 100 in the background; "
            "remote faults 40: p50 61 us, p99 150 us, max 700 us; vCPU blocked 12.5 ms; link failed 1x, recovered 0x") in out
