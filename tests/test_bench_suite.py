"""The benchmark suite's own code on tiny sizes: statistics, scenario selection, the random fill
that builds guest images, the limit measurements' bookkeeping and the host memory report. No timing
is asserted."""

import errno
import mmap
import os

import numpy as np
import pytest

from tools.bench import hostmem, limits, scenarios
from tools.bench.images import FILL_START, fill_random
from tools.bench.run import cpu_times, select, settle, settle_text
from tools.bench.scenarios import SCENARIOS
from tools.bench.stats import Figure, Row
from vmmpy import GuestMemory
from vmmpy.memory import HIGHMEM_BASE

MIB, GIB = 1 << 20, 1 << 30


def test_figure_reports_median_min_max():
    fig = Figure([3.0, 1.0, 2.0, 10.0], "GiB/s")
    assert (fig.median, fig.low, fig.high) == (2.5, 1.0, 10.0)
    assert fig.text() == "2.50 [1.00-10.0] GiB/s"
    assert Figure([42.0], "ms").text() == "42.0 ms"
    row = Row("x", "what", fig).to_dict()
    assert row["figure"]["runs"] == [3.0, 1.0, 2.0, 10.0] and row["limit"] is None


class FakeHost:
    """A clock, a sleep and /proc/stat samples for ``settle``: each second, ``shares`` says how
    busy the CPUs were (the last share repeats)."""

    def __init__(self, shares):
        self.shares, self.now, self.busy, self.total = list(shares), 0.0, 0, 0

    def sample(self):
        return self.busy, self.total

    def sleep(self, seconds):
        share = self.shares.pop(0) if len(self.shares) > 1 else self.shares[0]
        self.now += seconds
        self.busy += round(200 * share)
        self.total += 200  # two CPUs, 100 jiffies each a second

    def clock(self):
        return self.now


@pytest.mark.parametrize("shares, waited, settled, last", [
    ([0.02], 2.0, True, 0.02),                   # quiet at once: two quiet seconds
    ([0.6, 0.5, 0.05, 0.3, 0.04, 0.03], 6.0, True, 0.03),  # a busy second restarts the count
    ([0.9], 10.0, False, 0.9),                   # never quiet: gives up at the limit, and says so
])
def test_the_bench_waits_for_two_quiet_seconds_in_a_row_at_most_its_limit(shares, waited, settled, last):
    host = FakeHost(shares)
    got = settle(10.0, sample=host.sample, sleep=host.sleep, clock=host.clock)
    assert got == {"waited_s": waited, "busy_share": last, "settled": settled}
    text = settle_text({"settle": got})
    assert text == (f"; quiet after {waited:g} s" if settled else "; NOT QUIET: still 90% busy after waiting 10 s")


def test_the_bench_need_not_wait_and_reads_real_cpu_times():
    host = FakeHost([0.9])
    got = settle(0, sample=host.sample, sleep=host.sleep, clock=host.clock)
    assert got == {"waited_s": 0.0, "busy_share": None, "settled": True} and host.now == 0.0
    assert settle_text({"settle": got}) == "; not waited for quiet (--settle 0)"
    assert settle_text({}) == ""  # reports from before the wait
    busy, total = cpu_times()
    assert 0 < busy < total


def test_select_by_name_prefix_and_glob_and_quick():
    # A whole name picks that scenario alone, not every name it begins; a prefix or a glob picks many.
    assert select("warm-1g", False) == ["warm-1g"]
    assert select("warm-1g,warm-8g", False) == ["warm-1g", "warm-8g"]
    assert select("warm-1g-", False) == [n for n in SCENARIOS if n.startswith("warm-1g-")]
    assert len(select("warm-1g*", False)) > 1 and select("warm-1g*", False)[0] == "warm-1g"
    assert set(select("compress", False)) == {n for n in SCENARIOS if n.startswith("compress")}
    assert "warm-4g" not in select(None, True) and "warm-4g" in select(None, False)
    assert set(select("live-*", False)) == {n for n in SCENARIOS if n.startswith("live-")}
    with pytest.raises(SystemExit, match="no scenario matches"):
        select("nonesuch", False)


def test_fill_random_spans_lowmem_then_highmem_and_stops_at_the_end():
    mem = GuestMemory(6 * MIB, lowmem_limit=4 * MIB, dirty_tracking="soft")
    try:
        written = fill_random(mem, 100 * MIB, seed=3, piece=MIB)
        assert written == 4 * MIB  # 2 MiB of lowmem after FILL_START, then all 2 MiB of highmem
        low = np.frombuffer(mem.read(0, 4 * MIB), np.uint8)
        high = np.frombuffer(mem.read(HIGHMEM_BASE, 2 * MIB), np.uint8)
        assert not low[:FILL_START].any(), "the image and stack window is left alone"
        for part in (low[FILL_START:], high):
            pages = part.reshape(-1, 4096)
            assert pages.any(axis=1).all(), "every filled page is non-zero"
        assert len(np.unique(low[FILL_START:].view(np.uint64))) > 0.99 * (2 * MIB // 8)
    finally:
        mem.close()


def test_fill_random_writes_exactly_what_it_is_asked():
    mem = GuestMemory(8 * MIB, dirty_tracking="soft")
    try:
        assert fill_random(mem, MIB, seed=1, piece=256 * 1024) == MIB
        data = np.frombuffer(mem.read(FILL_START, 2 * MIB), np.uint8)
        assert data[:MIB].reshape(-1, 4096).any(axis=1).all() and not data[MIB:].any()
    finally:
        mem.close()


def test_limits_measure_the_sizes_they_are_given(tmp_path):
    tcp = limits.loopback_tcp(8 * MIB, 2, chunk=MIB)
    assert len(tcp.values) == 2 and all(v > 0 for v in tcp.values) and tcp.unit == "GiB/s"
    assert len(limits.memcpy(MIB, 2).values) == 2
    try:
        disk = limits.odirect_write(str(tmp_path), 8 * MIB, 1)
    except OSError as err:  # a filesystem without O_DIRECT (tmpfs) refuses it: nothing to measure here
        pytest.skip(f"O_DIRECT not supported under {tmp_path}: {err}")
    assert len(disk.values) == 1 and not os.listdir(tmp_path), "the probe file is removed"


def test_the_tls_scenario_makes_certificates_vmmrun_and_vmmctl_accept(tmp_path):
    from tools.bench.scenarios import _throwaway_pki, records_cipher, tls_encrypt_one_core
    from vmmpy.cli.vmmrun import build_parser, read_tls
    from vmmpy.migration.tls import TlsConfig

    dest_args, source = _throwaway_pki(tmp_path)
    assert read_tls(build_parser().parse_args(["-R", "127.0.0.1:1", *dest_args, "vm0"])) is not None
    TlsConfig.from_dict(source)
    assert {"warm-1g-tls", "warm-tls-1g-streams2"} <= set(SCENARIOS)
    assert tls_encrypt_one_core(size=4 * MIB) > 0
    note = ("encrypted with TLSv1.3 (TLS13_AES_128_GCM_SHA256); records by ring (5.87 GiB/s a core here, aws-lc-rs 3.86); "
            "the destination's certificate: valid for 127.0.0.1")
    assert records_cipher(["sent 3 rounds", note]) == "ring (5.87 GiB/s a core here, aws-lc-rs 3.86)"
    assert records_cipher(["encrypted with TLSv1.3 (TLS13_AES_128_GCM_SHA256)"]) is None


def test_the_tls_row_reads_the_sealing_rate_and_gives_what_a_serial_sender_reaches():
    from tools.bench.scenarios import sealing_rate, serial_sealing_share

    assert sealing_rate("ring (5.87 GiB/s a core here, aws-lc-rs 3.86)") == 5.87
    assert sealing_rate("aws-lc-rs (10.56 GiB/s a core here, ring 7.16)") == 10.56
    assert sealing_rate("aws-lc-rs") is None and sealing_rate(None) is None  # not chosen by timing: no figure
    # 4 GiB/s plaintext and sealing at 12 a core: a GiB takes 0.25 + 0.0833 s, 0.75 x.
    assert serial_sealing_share(4.0, 12.0) == pytest.approx(0.75)
    assert serial_sealing_share(1.0, 12.0) > serial_sealing_share(4.0, 12.0) > serial_sealing_share(4.0, 6.0)


def test_the_parallel_loopback_limit_carries_every_byte_over_each_stream():
    fig = limits.loopback_tcp_streams(8 * MIB, 2, 4, chunk=MIB)
    assert len(fig.values) == 2 and all(v > 0 for v in fig.values) and fig.unit == "GiB/s"
    assert {"warm-1g-streams2", "warm-1g-streams4"} <= set(SCENARIOS)


def _page_reporting(tmp_path, order=9, reported_kib=1000):
    params = tmp_path / "parameters"
    params.mkdir(parents=True)
    (params / "page_reporting_order").write_text(f"{order}\n")
    if reported_kib is not None:
        (params / "reported_kib").write_text(f"{reported_kib}\n")
    return params


def test_the_report_says_how_much_memory_went_back_to_the_hypervisor(tmp_path):
    params = _page_reporting(tmp_path)
    reporting = hostmem.Reporting(params)
    (params / "reported_kib").write_text(f"{1000 + 640 * 1024}\n")  # the kernel reported 640 MiB meanwhile
    report = reporting.report()
    assert report == {"order": 9, "held": False, "reported_mib": 640, "backed": None}
    assert "640 MiB went back to the hypervisor" in hostmem.text(report) and "--hold-host-memory" in hostmem.text(report)
    # Nothing reported: no line; a kernel that does not count: the line says what reporting does.
    assert hostmem.text({**report, "reported_mib": 0}) == ""
    assert "returns freed memory" in hostmem.text(hostmem.Reporting(_page_reporting(tmp_path / "b", reported_kib=None)).report())
    # No page reporting at all (bare metal, or a kernel without it): nothing recorded, no line.
    missing = hostmem.Reporting(tmp_path / "none")
    assert missing.report() is None and hostmem.text(None) == ""


def test_holding_host_memory_turns_reporting_off_for_the_run_and_gives_the_order_back(tmp_path):
    params = _page_reporting(tmp_path, order=9)
    reporting = hostmem.Reporting(params, back_bytes=3 * MIB, available=lambda: hostmem.BACK_SPARE + 64 * MIB)
    reporting.hold()
    assert (params / "page_reporting_order").read_text().strip() == str(hostmem.OFF_ORDER)
    # Memory reported before the hold is touched once and freed, so the runs get backed pages.
    assert reporting.report()["held"] and reporting.report()["backed"]["bytes"] == 3 * MIB
    assert "held off for the run" in hostmem.text(reporting.report()) and "3 MiB touched" in hostmem.text(reporting.report())
    reporting.release()
    assert (params / "page_reporting_order").read_text().strip() == "9"
    reporting.release()  # twice changes nothing
    assert (params / "page_reporting_order").read_text().strip() == "9"


def test_holding_host_memory_where_it_cannot_says_why_and_changes_nothing(tmp_path):
    with pytest.raises(SystemExit, match="reports no free pages to a hypervisor"):
        hostmem.Reporting(tmp_path / "none").hold()
    params = _page_reporting(tmp_path)
    reporting = hostmem.Reporting(params)
    (params / "page_reporting_order").unlink()
    (params / "page_reporting_order").mkdir()  # a write that fails, whoever runs the test
    with pytest.raises(SystemExit, match="cannot set .*page_reporting_order to 11"):
        reporting.hold()
    assert not reporting.held and reporting.backed is None
    reporting.release()


def test_backing_touches_what_it_is_asked_in_pieces_and_leaves_the_spare():
    spare = hostmem.BACK_SPARE
    assert hostmem.back(5 * MIB, piece=2 * MIB, available=lambda: spare + 64 * MIB)["bytes"] == 5 * MIB
    assert hostmem.back(5 * MIB, piece=2 * MIB, available=lambda: spare - 1) == {"bytes": 0, "asked": 5 * MIB, "seconds": 0.0,
                                                                                 "stopped": "spare"}


def test_backing_asks_what_is_available_before_each_piece_and_says_when_it_stopped_short(tmp_path):
    """Other processes allocate while the hold touches: it stops where the next piece would leave
    less than the spare, and the report says it held less than it asked."""
    asked = []

    def available():  # the hold's own pieces use it up, 2 MiB each, from spare + 5 MiB
        asked.append(hostmem.BACK_SPARE + 5 * MIB - 2 * MIB * len(asked))
        return asked[-1]

    backed = hostmem.back(8 * MIB, piece=2 * MIB, available=available)
    # Asked before each piece: spare+5, spare+3 (both leave the spare), spare+1 (would not).
    assert backed["bytes"] == 4 * MIB and backed["asked"] == 8 * MIB and len(asked) == 3
    line = hostmem.text({"order": 9, "held": True, "reported_mib": 0, "backed": backed})
    assert "4 MiB of the 8 MiB asked (it leaves 2 GiB of what is available" in line
    nothing = {"bytes": 0, "asked": 8 * MIB, "seconds": 0, "stopped": "refused: Cannot allocate memory"}
    line = hostmem.text({"order": 9, "held": True, "reported_mib": 0, "backed": nothing})
    assert "nothing touched first (the kernel refused a piece: Cannot allocate memory)" in line
    # A report saved before the hold recorded what it asked: said as it was, nothing more.
    old = hostmem.text({"order": 9, "held": True, "reported_mib": 0, "backed": {"bytes": 6 << 30, "seconds": 1.5}})
    assert old.endswith("6144 MiB touched and freed first, in 1.5 s") and "asked" not in old


def test_what_is_available_is_memavailable_or_the_cgroup_limit_closer(tmp_path):
    meminfo = tmp_path / "meminfo"
    meminfo.write_text("MemTotal:       24683520 kB\nMemFree:   1000 kB\nMemAvailable:    2048 kB\n")
    cgroup = tmp_path / "cg"
    cgroup.mkdir()
    assert hostmem.available_now(meminfo, cgroup) == 2 * MIB  # no cgroup files: MemAvailable
    (cgroup / "memory.max").write_text("max\n")
    assert hostmem.available_now(meminfo, cgroup) == 2 * MIB
    (cgroup / "memory.max").write_text(f"{3 * MIB}\n")
    (cgroup / "memory.current").write_text(f"{2 * MIB}\n")
    assert hostmem.available_now(meminfo, cgroup) == MIB
    # This machine's: what /proc/meminfo says is available, give or take what moved meanwhile.
    with open("/proc/meminfo") as f:
        meminfo_kib = next(int(line.split()[1]) for line in f if line.startswith("MemAvailable:"))
    assert 0 < hostmem.available_now() <= (meminfo_kib << 10) + (256 << 20)


def test_backing_holds_every_piece_until_the_last_is_touched(monkeypatch):
    """A piece freed before the next is touched hands the next the same pages: the hold would
    back one piece however much it touched."""
    live, most, sizes = [0], [0], []

    class Mapping:
        def __init__(self, fd, length, flags):
            assert fd == -1 and flags == mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS
            self.populated = False
            sizes.append(length)
            live[0] += 1
            most[0] = max(most[0], live[0])

        def madvise(self, option):
            assert option == hostmem.MADV_POPULATE_WRITE
            self.populated = True

        def close(self):
            assert self.populated
            live[0] -= 1

    monkeypatch.setattr(hostmem.mmap, "mmap", Mapping)
    assert hostmem.back(7 * MIB, piece=2 * MIB, available=lambda: hostmem.BACK_SPARE + 64 * MIB)["bytes"] == 7 * MIB
    assert sizes == [2 * MIB, 2 * MIB, 2 * MIB, MIB] and most[0] == 4 and live[0] == 0


def test_backing_writes_a_byte_a_page_where_the_kernel_cannot_populate(monkeypatch):
    """Before Linux 5.14 MADV_POPULATE_WRITE is EINVAL: every page is written instead."""
    written = []

    class Mapping:
        def __init__(self, fd, length, flags):
            self.length = length

        def madvise(self, option):
            raise OSError(errno.EINVAL, "Invalid argument")

        def __setitem__(self, at, value):
            assert 0 <= at < self.length and value
            written.append(at)

        def close(self):
            pass

    monkeypatch.setattr(hostmem.mmap, "mmap", Mapping)
    backed = hostmem.back(2 * MIB, piece=MIB, available=lambda: hostmem.BACK_SPARE + 64 * MIB)
    assert backed["bytes"] == 2 * MIB and backed["stopped"] is None
    assert written == list(range(0, MIB, mmap.PAGESIZE)) * 2


def test_backing_stops_where_the_kernel_refuses_a_piece_and_frees_what_it_held(monkeypatch):
    live = [0]

    class Mapping:
        def __init__(self, fd, length, flags):
            live[0] += 1

        def madvise(self, option):
            if live[0] == 3:
                raise OSError(errno.ENOMEM, "Cannot allocate memory")

        def close(self):
            live[0] -= 1

    monkeypatch.setattr(hostmem.mmap, "mmap", Mapping)
    backed = hostmem.back(8 * MIB, piece=2 * MIB, available=lambda: hostmem.BACK_SPARE + 64 * MIB)
    assert backed["bytes"] == 4 * MIB and backed["stopped"] == "refused: Cannot allocate memory"
    assert live[0] == 0


def test_the_hold_backs_the_most_the_selected_rows_touch_at_once():
    assert scenarios.touches(["warm-1g", "restore"]) == hostmem.BACK_BYTES
    assert scenarios.touches(["warm-1g", "warm-4g"]) == 18 * GIB
    assert scenarios.touches(["warm-4g-wired", "warm-8g", "live-idle"]) == 22 * GIB
    assert set(scenarios.TOUCHES_GIB) <= set(scenarios.SCENARIOS)


def test_a_hold_the_kernel_did_not_keep_is_said_and_a_failed_give_back_does_not_stop_the_cleanup(tmp_path, capsys):
    held = {"order": 9, "held": True, "reported_mib": 5, "backed": None}
    assert "yet 5 MiB went back to the hypervisor" in hostmem.text(held)
    params = _page_reporting(tmp_path)
    reporting = hostmem.Reporting(params, back_bytes=0)
    reporting.hold()
    (params / "page_reporting_order").unlink()
    (params / "page_reporting_order").mkdir()
    reporting.release()  # printed, not raised
    assert "could not give" in capsys.readouterr().err and not reporting.held
