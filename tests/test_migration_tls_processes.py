"""Mutual TLS between real vmmrun processes, driven by vmmctl's flags: the guest finishes exactly
as if never migrated, a source with an untrusted certificate or none is refused (its guest runs
on, the destination exits with nothing), bad TLS options are named, and the rule for listening
beyond loopback counts TLS as authentication."""

import json
import os
import time

import pytest

from vmmpy.cli.vmmrun import listen_policy_error
from vmmpy.migration import migrate

from .procs import free_port, start_vmmrun, stop, vmmctl, wait_for_listener, wait_for_socket, wait_for_state, write_key
from .test_migration_failures import assert_source_kept_guest
from .test_migration_processes import abtest_args, expected_console, finish
from .tls_pki import Pki

MiB = 1 << 20


@pytest.fixture
def pki(tmp_path):
    return Pki(tmp_path / "pki")


def tls_args(crt, key, ca):
    return ["--tls-cert", crt, "--tls-key", key, "--tls-ca", ca]


@pytest.mark.covers(operation="migrate-{live}", guest="abtest", via="cli", tls=True, key=True)
@pytest.mark.parametrize("live", [False, True], ids=["warm", "live"])
def test_vmmctl_migrates_over_tls_with_a_key_and_the_guest_finishes_exactly(tmp_path, pki, live):
    # Live: abtest rewrites 6 MiB (2M..8M) flat out for several seconds, so the rounds run while
    # it dirties memory; warm: a short run paused part way.
    sweeps, extra = (100_000, {"end": "8M"}) if live else (2000, {})
    port = free_port()
    key = tmp_path / "mig.key"
    write_key(key, os.urandom(32).hex().encode())
    dst_crt, dst_key = pki.files("dst", "127.0.0.1")
    src_crt, src_key = pki.files("src", "source.migration.test")
    src_console, dst_console = tmp_path / "src.log", tmp_path / "dst.log"
    dest = start_vmmrun(tmp_path, "-m", "32M", "-l", f"com1,{dst_console}", "-R", f"127.0.0.1:{port}", "--key-file", str(key),
                        *tls_args(dst_crt, dst_key, pki.ca_file), "tdst")
    source = start_vmmrun(tmp_path, *abtest_args(sweeps, **extra), "-l", f"com1,{src_console}", "--pause-at=3000000", "tsrc")
    try:
        wait_for_listener("127.0.0.1", port, dest)
        wait_for_socket(tmp_path, "tsrc", source)
        wait_for_state(tmp_path, "tsrc", "paused")
        if live:
            assert vmmctl(tmp_path, "--vm=tsrc", "--resume").returncode == 0
        action = "--migrate-live" if live else "--migrate"
        result = vmmctl(tmp_path, "--vm=tsrc", action, "127.0.0.1", str(port), "--downtime-ms", "50", "--key-file", str(key),
                        *tls_args(src_crt, src_key, pki.ca_file), "--json", timeout=180)
        assert result.returncode == 0, result.stderr
        stats = json.loads(result.stdout)
        assert stats["status"] == "completed" and stats["live"] is live
        assert source.wait(timeout=120) == 0, "the source vmmrun exits 0 once the guest lives on the destination"
        assert finish(dest) == 1
        pages = ((8 if live else 32) * MiB - 2 * MiB) // 4096
        assert src_console.read_text() + dst_console.read_text() == expected_console(sweeps, pages)
    finally:
        stop(source)
        stop(dest)


def test_vmmrun_refuses_a_source_certificate_from_another_ca_and_the_source_runs_on(tmp_path, pki):
    sweeps = 2000
    port = free_port()
    dst_crt, dst_key = pki.files("dst", "127.0.0.1")
    bad_crt, bad_key = pki.files("stranger", "source.migration.test", ca=pki.other_ca)
    console = tmp_path / "src.log"
    dest = start_vmmrun(tmp_path, "-m", "32M", "-R", f"127.0.0.1:{port}", *tls_args(dst_crt, dst_key, pki.ca_file), "tdst")
    source = start_vmmrun(tmp_path, *abtest_args(sweeps), "-l", f"com1,{console}", "--pause-at=1000000", "tsrc")
    try:
        wait_for_listener("127.0.0.1", port, dest)
        wait_for_socket(tmp_path, "tsrc", source)
        wait_for_state(tmp_path, "tsrc", "paused")
        result = vmmctl(tmp_path, "--vm=tsrc", "--migrate", "127.0.0.1", str(port), *tls_args(bad_crt, bad_key, pki.ca_file),
                        timeout=60)
        assert result.returncode == 1
        assert "the destination refused this host's TLS certificate" in result.stderr, result.stderr
        assert "the guest stays here, paused" in result.stderr
        # A certificate it does not trust proves nothing: the destination waits on for its source,
        # and names the stranger when it is told to stop.
        time.sleep(0.3)
        assert dest.poll() is None
        dest.terminate()
        assert finish(dest) == 4
        assert "the source's TLS certificate is not trusted" in dest.stderr.read()
        assert vmmctl(tmp_path, "--vm=tsrc", "--resume").returncode == 0
        assert source.wait(timeout=120) == 1
        pages = (32 * MiB - 2 * MiB) // 4096
        assert console.read_text() == expected_console(sweeps, pages), "the source guest ran on, unchanged"
    finally:
        stop(source)
        stop(dest)


def test_vmmrun_refuses_a_source_without_a_certificate_and_keeps_nothing(tmp_path, pki, guests):
    # vmmctl cannot leave out --tls-cert, so the stranger is a source in this process: it trusts
    # the destination's CA but shows no certificate of its own.
    port = free_port()
    dst_crt, dst_key = pki.files("dst", "127.0.0.1")
    dest = start_vmmrun(tmp_path, "-m", "32M", "-R", f"127.0.0.1:{port}", *tls_args(dst_crt, dst_key, pki.ca_file), "tdst")
    try:
        wait_for_listener("127.0.0.1", port, dest)
        src = guests("32M", work_pages=256)
        stats = migrate(src, "127.0.0.1", port, live=False, tls=pki.source_without_certificate())
        assert stats.status == "failed" and "certificate required" in stats.error, stats.error
        assert stats.page_bytes == 0 and "pause" not in src.calls
        # It proved nothing, so the destination waits on for its source; told to stop, it names it.
        time.sleep(0.3)
        assert dest.poll() is None
        dest.terminate()
        assert finish(dest) == 4, "the destination received no guest"
        err = dest.stderr.read()
        assert "did not return a certificate" in err, err
        assert_source_kept_guest(src)
    finally:
        stop(dest)


def test_bad_tls_options_are_named(tmp_path, pki):
    crt, key = pki.files("dst", "127.0.0.1")
    other_crt, other_key = pki.files("other", "127.0.0.1")
    half = start_vmmrun(tmp_path, "-m", "32M", "-R", f"127.0.0.1:{free_port()}", "--tls-cert", crt, "half")
    assert finish(half, 60) == 4
    assert "missing --tls-key, --tls-ca" in half.stderr.read()
    mismatched = start_vmmrun(tmp_path, "-m", "32M", "-R", f"127.0.0.1:{free_port()}", *tls_args(crt, other_key, pki.ca_file), "mm")
    assert finish(mismatched, 60) == 4
    assert f"--tls-key {other_key} is not the private key of the certificate in --tls-cert {crt}" in mismatched.stderr.read()
    # vmmctl checks its files before it asks vmmrun for anything (no VM is needed to see it).
    missing = vmmctl(tmp_path, "--vm=nothere", "--migrate", "127.0.0.1", "1", *tls_args(crt, key, str(tmp_path / "no-ca.pem")))
    assert missing.returncode == 2 and "--tls-ca" in missing.stderr and "No such file" in missing.stderr, missing.stderr
    hostname_alone = vmmctl(tmp_path, "--vm=nothere", "--migrate", "127.0.0.1", "1", "--tls-hostname", "dst")
    assert hostname_alone.returncode == 2 and "goes with --tls-cert" in hostname_alone.stderr


def test_listening_beyond_loopback_needs_a_key_or_mutual_tls(pki):
    tls = pki.destination()
    assert "lets anyone send a guest" in listen_policy_error("10.0.0.2", key=None, tls=None, insecure=False)
    assert listen_policy_error("10.0.0.2", key=b"k" * 32, tls=None, insecure=False) is None
    assert listen_policy_error("10.0.0.2", key=None, tls=tls, insecure=False) is None, "the CA vouches for the source"
    assert listen_policy_error("10.0.0.2", key=None, tls=None, insecure=True) is None
    assert listen_policy_error("127.0.0.1", key=None, tls=None, insecure=False) is None
    assert listen_policy_error("::1", key=None, tls=None, insecure=False) is None
    for loopback in ("localhost", "127.3.2.1", "::ffff:127.0.0.1", "::1%lo"):
        assert listen_policy_error(loopback, key=None, tls=None, insecure=False) is None, loopback
    for other in ("::ffff:10.0.0.2", "::", "0.0.0.0", "2001:db8::1", "vm-host.example"):
        assert "lets anyone send a guest" in listen_policy_error(other, key=None, tls=None, insecure=False), other
