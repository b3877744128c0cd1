"""Compressed page batches in real migrations over loopback TCP: the guest arrives exactly, the
statistics count what compression did, and compression is used only when both ends agreed
(protocol version 4): an older or unwilling destination gets plain batches, and a source that
sends compressed batches without agreement is refused."""

import json

import pytest

from vmmpy.migration import MigrationParams
from vmmpy.migration import destination as destination_module
from vmmpy.migration import source as source_module
from vmmpy.units import MiB

from .migration_helpers import KEY, migrate_pair
from .test_migration_engine import assert_arrived_exact


@pytest.mark.covers(operation="migrate-warm", guest="writer", via="engine", compress="lz4", key=True)
def test_warm_migration_with_lz4_arrives_exactly_and_counts_what_it_saved(guests):
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(3000)
    stats, dstats = migrate_pair(src, dst, live=False, key=KEY, dst_key=KEY, params=MigrationParams(compress="lz4"))
    assert stats.status == "completed", stats.error
    assert dstats.status == "completed", dstats.error
    assert stats.protocol_version >= 4 and stats.compression == dstats.compression == "lz4"
    assert stats.compressed_batches >= 4, "the writer's 8 MiB of patterned pages shrink to about half"
    assert stats.compressed_batches == dstats.compressed_batches
    assert stats.compression_saved_bytes == dstats.compression_saved_bytes > 2 * MiB
    assert stats.bytes_total < 2048 * 4096 * 3 // 4, "the wire carried the compressed size"
    assert stats.rounds[0].compressed_batches == stats.compressed_batches
    dst.wait_for_progress(500)
    assert_arrived_exact(src, dst)
    d = stats.to_dict()
    assert {"compress", "compression", "compressed_batches", "compression_saved_bytes", "compress_attempts"} <= d.keys()
    assert "batches compressed (lz4)" in stats.summary()
    json.dumps(d)


@pytest.mark.covers(operation="migrate-live", guest="writer", via="engine", compress="lz4", bandwidth="capped")
def test_live_migration_with_lz4_keeps_guest_counters_exact(guests):
    src = guests("64M", work_pages=2048, rate=6000)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(2048)
    params = MigrationParams(downtime_target_ms=10, bandwidth_cap=32 * MiB, max_rounds=20, policy="switch-over", compress="lz4")
    stats, dstats = migrate_pair(src, dst, live=True, params=params)
    assert stats.status == "completed", stats.error
    assert dstats.status == "completed", dstats.error
    assert len(stats.rounds) >= 3, [(r.round, r.pages) for r in stats.rounds]
    assert all(r.compressed_batches > 0 for r in stats.rounds if r.pages_sent >= 256), "every round with 1 MiB of data compressed some"
    assert [r.compressed_batches for r in dstats.rounds] == [r.compressed_batches for r in stats.rounds]
    assert_arrived_exact(src, dst)


@pytest.mark.covers(operation="migrate-warm", guest="writer", via="engine", compress="auto", bandwidth="capped")
def test_auto_compresses_on_a_slow_link(guests):
    # At 32 MiB/s a 1 MiB batch that halves saves about 16 ms of link time; LZ4 takes about
    # 2 ms to find that out, so auto compresses (a margin of several times, not a timing race).
    src = guests("64M", work_pages=2048)
    dst = guests("64M", work_pages=2048, running=False)
    src.wait_for_progress(3000)
    stats, dstats = migrate_pair(src, dst, live=False, params=MigrationParams(compress="auto", bandwidth_cap=32 * MiB))
    assert stats.status == "completed", stats.error
    assert stats.compress == "auto" and stats.compression == "lz4"
    assert stats.compressed_batches > 0 and stats.compress_attempts >= stats.compressed_batches
    assert_arrived_exact(src, dst)
    # With a cap the frames after COMMITTED leave the paced relay: RELEASED still reaches the
    # destination, which stops answering for the guest (it once hit the relay's shut socket).
    assert not stats.notes, stats.notes
    assert not any("RELEASED" in n for n in dstats.notes), dstats.notes


def test_a_destination_that_declines_gets_plain_batches(guests):
    src = guests("16M", work_pages=1024)
    dst = guests("16M", work_pages=1024, running=False)
    src.wait_for_progress(1500)
    stats, dstats = migrate_pair(src, dst, live=False, params=MigrationParams(compress="lz4"),
                                 dst_params=MigrationParams(accept_compression=False))
    assert stats.status == "completed", stats.error
    assert stats.compression is None and stats.compressed_batches == 0 and stats.compress_attempts == 0
    assert any("destination cannot take compression (it declined the offer)" in n for n in stats.notes), stats.notes
    assert_arrived_exact(src, dst)


def test_an_older_destination_speaking_version_3_gets_plain_batches(guests, monkeypatch):
    monkeypatch.setattr(destination_module._Receiver, "versions", (3,))
    src = guests("16M", work_pages=1024)
    dst = guests("16M", work_pages=1024, running=False)
    src.wait_for_progress(1500)
    stats, dstats = migrate_pair(src, dst, live=False, params=MigrationParams(compress="lz4"))
    assert stats.status == "completed", stats.error
    assert stats.protocol_version == dstats.protocol_version == 3
    assert stats.compression is None and stats.compressed_batches == 0
    assert any("it speaks protocol version 3" in n for n in stats.notes), stats.notes
    assert_arrived_exact(src, dst)


def test_compressed_batches_the_destination_did_not_agree_to_are_refused(guests, monkeypatch):
    original = source_module._Source._send_spec

    def send_spec_then_compress_anyway(self):
        original(self)
        self.compress = "lz4"  # a broken source that ignores the answer

    monkeypatch.setattr(source_module._Source, "_send_spec", send_spec_then_compress_anyway)
    src = guests("16M", work_pages=1024)
    dst = guests("16M", work_pages=1024, running=False)
    src.wait_for_progress(1500)
    stats, dstats = migrate_pair(src, dst, live=False, params=MigrationParams(compress="lz4"),
                                 dst_params=MigrationParams(accept_compression=False))
    assert dstats.status == "failed" and "compressed page batch, but no compression was agreed" in dstats.error, dstats.error
    assert dst.discarded and "start_running" not in dst.calls
    assert stats.status == "failed" and src.calls[-1] == "resume", "the source keeps its guest"
    assert src.digest_at_resume == src.digest_at_pause


def test_compress_must_be_a_known_mode():
    with pytest.raises(ValueError, match="compress must be one of off, lz4, auto; got 'zstd'"):
        MigrationParams(compress="zstd")


def test_vmmctl_passes_compress_through():
    from vmmpy.cli.vmmctl import _migration_params, build_parser

    args = build_parser().parse_args(["--vm=a", "--migrate", "h", "1", "--compress", "lz4"])
    assert _migration_params(args)["compress"] == "lz4"
    assert "compress" not in _migration_params(build_parser().parse_args(["--vm=a", "--migrate", "h", "1"]))
    with pytest.raises(SystemExit):
        build_parser().parse_args(["--vm=a", "--migrate", "h", "1", "--compress", "zstd"])
