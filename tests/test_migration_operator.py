"""What an operator sees around a migration: --estimate, the progress printer, --report."""

import io
import json

import pytest

from vmmpy.cli import vmmctl as ctl
from vmmpy.cli.report import ReportError, history, render_html, write_report
from vmmpy.migration import MigrationStats, RoundStats
from vmmpy.migration.net import is_local_address, measure_local_throughput

from .procs import free_port, start_vmmrun, stop, vmmctl, wait_for_socket, wait_for_state
from .test_migration_processes import abtest_args


def sample_stats(live=True) -> dict:
    """A live migration record: round 0 with zero pages, two live rounds, the final round."""
    s = MigrationStats(role="source", live=live, policy="auto-converge" if live else None, peer="127.0.0.1:24983",
                       downtime_target_ms=20.0 if live else None, bandwidth_cap=100 * 2**20)
    rounds = [(0, False, 2000, 6000, 8.0e6, 80.0, 1900, 60.0), (1, False, 1900, 0, 7.8e6, 75.0, 900, 40.0),
              (2, False, 900, 0, 3.7e6, 36.0, 300, 12.0)]
    for n, final, data, zero, nbytes, ms, during, expected in (rounds if live else []):
        s.add_round(RoundStats(n, final, data + zero, data, zero, int(nbytes), ms, nbytes / (ms / 1000),
                               during / (ms / 1000), 0.2 if n == 2 else 0.0, during, expected))
    last = len(s.rounds)
    s.add_round(RoundStats(last, True, 300, 300, 0, 1_230_000, 12.0, 1.0e8, 0.0, 0.2))
    s.bytes_total = sum(r.bytes for r in s.rounds) + 20_000
    s.downtime_ms = 16.5
    s.downtime_breakdown = {"final_pages_ms": 12.0, "state_ms": 1.5, "digest_ms": 0.5, "commit_ms": 2.5}
    s.finish("completed")
    return s.to_dict()


# ---- report ------------------------------------------------------------------------------------
def test_html_report_draws_every_round_and_the_target(tmp_path):
    stats = sample_stats()
    out = write_report(stats, tmp_path / "mig.html")
    text = out.read_text()
    assert text.startswith("<!DOCTYPE html>") and text.count("<svg") == 4
    assert "Pages per round" in text and "Throughput and dirty rate" in text and "Expected downtime" in text
    assert "target 20 ms" in text and "measured 16.5 ms" in text
    assert "within target + 20 %" in text  # 16.5 ms against a 20 ms target
    for label in ("<td>0</td>", "<td>1</td>", "<td>2</td>", "<td>3 final</td>"):
        assert label in text
    assert "<script" not in text and "http" not in text.split("<svg", 1)[0].replace('xmlns="http', ""), "self-contained"


def test_history_takes_the_dirtied_pages_per_round():
    h = history(sample_stats())
    assert h.labels == ["0", "1", "2", "3 final"]
    assert h.dirtied == [1900, 900, 300, None]
    assert h.expected_ms == [60.0, 40.0, 12.0, None]


def test_a_log_axis_shows_whole_bars_when_the_guest_dirties_all_its_memory():
    """Round 0 sends 65,100 pages with data and 3 as zero ranges: the log axis the 3 calls for
    must still show the data bar from the bottom (autoscaled, it ran 6.51e4 to 6.55e4 and round 0
    looked like all zero pages)."""
    pytest.importorskip("matplotlib")
    from vmmpy.cli.report import png_figure

    stats = sample_stats()
    stats["rounds"][0].update(pages_sent=65_100, zero_pages=3)
    fig = png_figure(stats, history(stats))
    bottom, top = fig.axes[0].get_ylim()
    assert fig.axes[0].get_yscale() == "log" and bottom <= 3 and top >= 65_103

    import matplotlib.pyplot as plt
    plt.close(fig)


def test_a_migration_that_finished_no_round_says_so_rather_than_drawing_empty_panels(tmp_path):
    s = MigrationStats(role="source", live=True, policy="auto-converge", peer="127.0.0.1:24983", downtime_target_ms=20.0)
    s.bytes_total = 3 * 2**20
    s.finish("cancelled")
    stats = s.to_dict()
    note = "no round finished: the migration ended cancelled before round 0 did (3.0 MiB had been sent)"
    text = write_report(stats, tmp_path / "mig.html").read_text()
    assert note in text and "Pages per round" not in text
    pytest.importorskip("matplotlib")
    from vmmpy.cli.report import png_figure

    fig = png_figure(stats, history(stats))
    assert all(note in [t.get_text() for t in ax.texts] for ax in fig.axes[:3])

    import matplotlib.pyplot as plt
    plt.close(fig)


def test_png_report_is_a_png(tmp_path):
    pytest.importorskip("matplotlib")
    out = write_report(sample_stats(), tmp_path / "mig.png")
    data = out.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and len(data) > 20_000


def test_warm_report_says_there_were_no_live_rounds(tmp_path):
    text = render_html(sample_stats(live=False))
    assert "warm migration completed" in text and text.count("<svg") == 3


def test_report_refusals_name_the_problem(tmp_path):
    with pytest.raises(ReportError, match=r"must end in \.png or \.html"):
        write_report(sample_stats(), tmp_path / "mig.pdf")
    with pytest.raises(ReportError, match="no 'rounds' list"):
        write_report({"status": "completed"}, tmp_path / "mig.html")
    with pytest.raises(ReportError, match="round record 0 is malformed"):
        write_report({"rounds": [{"round": 0}]}, tmp_path / "mig.html")


def test_vmmctl_draws_a_report_from_saved_json(tmp_path, capsys):
    saved = tmp_path / "stats.json"
    saved.write_text(json.dumps(sample_stats()))
    assert ctl.main(["--report", str(tmp_path / "r.html"), "--from-json", str(saved)]) == 0
    assert (tmp_path / "r.html").read_text().count("<svg") == 4
    assert ctl.main(["--report", str(tmp_path / "r.html"), "--from-json", str(tmp_path / "missing.json")]) == 1
    assert "missing.json: No such file" in capsys.readouterr().err
    saved.write_text("{not json")
    assert ctl.main(["--report", str(tmp_path / "r.html"), "--from-json", str(saved)]) == 1
    assert "not JSON" in capsys.readouterr().err
    assert ctl.main(["--from-json", str(saved)]) == 1
    assert "give --report" in capsys.readouterr().err


# ---- progress ----------------------------------------------------------------------------------
class FakeTerminal(io.StringIO):
    def isatty(self):
        return True


def _progress(stats, upto):
    partial = dict(stats, rounds=stats["rounds"][:upto], status="active")
    return {"migration": partial}


def test_progress_prints_one_line_per_round_on_a_log():
    stats = sample_stats()
    log = io.StringIO()
    printer = ctl._ProgressPrinter(log)
    for upto in (1, 2, 2, 4):  # a repeated report prints nothing new; the last brings two rounds
        printer(_progress(stats, upto))
    printer.done()
    lines = log.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["round 0", "round 1", "round 2", "round 3 (final, guest paused)"]
    assert "dirtied 1900 pages meanwhile" in lines[0] and "expected downtime 60.0 ms (target 20 ms)" in lines[0]
    assert "throttle 20%" in lines[2]


def test_progress_redraws_one_line_on_a_terminal():
    stats = sample_stats()
    term = FakeTerminal()
    printer = ctl._ProgressPrinter(term)
    for upto in (1, 2, 3):
        printer(_progress(stats, upto))
    text = term.getvalue()
    assert text.count("\r\x1b[K") == 3 and "\n" not in text, "redrawn in place"
    assert "round 2" in text.rsplit("\r", 1)[1] and "/20 ms [" in text
    printer.done()
    assert term.getvalue().endswith("\n")


# ---- estimate ----------------------------------------------------------------------------------
def test_local_addresses_and_the_probe():
    assert is_local_address("127.0.0.1") and is_local_address("localhost")
    assert not is_local_address("192.0.2.1"), "TEST-NET-1 is nobody's address here"
    assert measure_local_throughput("127.0.0.1", 0.05) > 0
    with pytest.raises(ValueError, match=r"\(0, 5\] seconds"):
        measure_local_throughput("127.0.0.1", 10)


@pytest.fixture
def busy_guest(tmp_path):
    console = tmp_path / "est.log"
    proc = start_vmmrun(tmp_path, *abtest_args(0), "-l", f"com1,{console}", "est0")
    try:
        wait_for_socket(tmp_path, "est0", proc)
        yield tmp_path
    finally:
        stop(proc)


def test_estimate_measures_a_local_link_and_does_not_migrate(busy_guest):
    port = free_port()  # nothing listens: an estimate never contacts the destination
    result = vmmctl(busy_guest, "--vm=est0", "--migrate-live", "127.0.0.1", str(port), "--estimate",
                    "--estimate-window", "0.3", "--json")
    assert result.returncode == 0, result.stderr
    est = json.loads(result.stdout)
    assert est["live"] is True and est["bandwidth_source"].startswith("measured")
    assert est["bandwidth"] == est["measured_bandwidth"] > 0
    assert est["dirty_rate"] > 0 and est["resident_pages"] > 7000, "abtest rewrites its 30 MiB every sweep"
    assert isinstance(est["converges"], bool) and est["verdict"]
    status = json.loads(vmmctl(busy_guest, "--vm=est0", "--status", "--json").stdout)
    assert status["state"] == "running", "the guest was not paused or migrated"
    assert vmmctl(busy_guest, "--vm=est0", "--migrate-status").returncode == 1, "no migration ran"


def test_estimate_of_a_remote_host_needs_a_bandwidth(busy_guest):
    result = vmmctl(busy_guest, "--vm=est0", "--migrate-live", "192.0.2.1", "24983", "--estimate")
    assert result.returncode == 1
    assert "192.0.2.1 is not an address of this host" in result.stderr and "give --bandwidth" in result.stderr
    result = vmmctl(busy_guest, "--vm=est0", "--migrate-live", "192.0.2.1", "24983", "--estimate", "--bandwidth", "1M",
                    "--downtime-ms", "1", "--estimate-window", "0.3")
    assert result.returncode == 0, result.stderr
    assert "does not converge to 1 ms" in result.stdout and "1 MiB/s (--bandwidth)" in result.stdout
    warm = vmmctl(busy_guest, "--vm=est0", "--migrate", "192.0.2.1", "24983", "--estimate", "--bandwidth", "1G", "--json")
    est = json.loads(warm.stdout)
    assert est["live"] is False and est["bandwidth"] == 2**30 and est["expected_downtime_ms"] > 0


def test_estimate_of_a_paused_guest_says_so(tmp_path):
    proc = start_vmmrun(tmp_path, *abtest_args(0), "--pause-at=1000", "est1")
    try:
        wait_for_socket(tmp_path, "est1", proc)
        wait_for_state(tmp_path, "est1", "paused")
        result = vmmctl(tmp_path, "--vm=est1", "--migrate-live", "127.0.0.1", "9", "--estimate", "--estimate-window", "0.2")
        assert result.returncode == 0, result.stderr
        assert "the guest is paused now" in result.stdout
    finally:
        stop(proc)


def test_estimate_and_report_are_refused_with_other_actions(tmp_path):
    with pytest.raises(SystemExit):
        ctl.main([f"--run-dir={tmp_path}", "--vm=x", "--status", "--estimate"])
