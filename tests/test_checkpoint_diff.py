"""Diff checkpoints (issue #18): a checkpoint that holds only the pages written since the guest's
previous one, restored by following its chain of parents, merged into one full checkpoint and
checked without running; a failed diff keeps the pages it would have written, and every damaged
file of a chain is refused by name before any memory exists."""

import json
import os
import shutil

import pytest

from vmmpy.snapshot import CheckpointError, read_checkpoint
from vmmpy.snapshot import meta as meta_module
from vmmpy.snapshot.checkpoint import checkpoint_guest, restore_guest
from vmmpy.snapshot.files import merge_chain, verify_chain

from .test_checkpoint_handle import BASIC, FAKE_SECTIONS
from .test_checkpoint_restore import flip

PAGE = 4096


def take_chain(src, directory, length, *, key=None, between=300):
    """A full checkpoint, then ``length`` diffs with the writer running ``between`` pages in
    between; each entry is (path, the guest's (sweeps, position) and digest at that pause)."""
    chain = []
    for index in range(length + 1):
        if index:
            src.wait_for_progress(between)
        path = directory / (f"d{index}" if index else "full")
        result = checkpoint_guest(src, path, basic=BASIC, diff=bool(index), key=key)
        assert (result["parent"] is not None) == bool(index)
        chain.append((path, src.state_at_pause, src.digest_at_pause))
    return chain


def restore_exactly(guests, path, state, digest, *, key=None):
    dst = guests("16M", work_pages=2048, running=False)
    restore_guest(dst, read_checkpoint(path, FAKE_SECTIONS, key=key), mode="eager")
    assert (dst.sweeps, dst.position) == state
    assert dst.bad_pages(*state) == [], f"{path}: memory is the paused guest's, page for page"
    assert dst.memory.digest() == digest
    return dst


@pytest.mark.covers(operation="checkpoint", guest="writer", via="engine", diff=True)
def test_diff_chains_of_1_2_and_10_and_the_merged_chain_restore_exactly(tmp_path, guests):
    src = guests("16M", work_pages=2048, rate=4000)  # pages/s: a diff holds a part of a sweep
    src.wait_for_progress(100)
    chain = take_chain(src, tmp_path, 10, between=150)
    sizes = {p.name: json.loads(p.with_name(p.name + ".meta").read_text()) for p, _, _ in chain}
    # A diff holds only the pages written since its parent: a fraction of the 2048-page work area
    # (a sweep is 2048 pages; between diffs the writer does about 150 before the pause lands).
    for name, meta in sizes.items():
        if name != "full":
            assert meta["format_version"] == 3 and meta["parent"]["path"] == ("full" if name == "d1" else f"d{int(name[1:]) - 1}")
            assert 0 < sum(n for _, n in meta["parent"]["pages"]) < 2048
    for length in (1, 2, 10):
        path, state, digest = chain[length]
        checkpoint = read_checkpoint(path, FAKE_SECTIONS)
        assert len(checkpoint.chain) == length + 1
        verify_chain(checkpoint)
        restore_exactly(guests, path, state, digest)
    merged = tmp_path / "merged"
    merge_chain(read_checkpoint(chain[10][0], FAKE_SECTIONS), merged)
    assert "parent" not in json.loads((tmp_path / "merged.meta").read_text())
    dst = restore_exactly(guests, merged, chain[10][1], chain[10][2])
    dst.start_running()  # the restored guest runs on, and a diff of it names the checkpoint it came from
    dst.wait_for_progress(100)
    result = checkpoint_guest(dst, tmp_path / "after-merge", basic=BASIC, diff=True)
    assert result["parent"] == str(merged)
    restore_exactly(guests, tmp_path / "after-merge", dst.state_at_pause, dst.digest_at_pause)


def test_a_diff_with_no_previous_checkpoint_is_refused_and_writes_nothing(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    with pytest.raises(CheckpointError, match=r"--diff needs a previous checkpoint of this guest"):
        checkpoint_guest(src, tmp_path / "d", basic=BASIC, diff=True)
    assert os.listdir(tmp_path) == []
    src.stop_writer()  # a diff of a guest that wrote nothing since: no pages, an empty memory file
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    checkpoint_guest(src, tmp_path / "empty", basic=BASIC, diff=True)
    assert os.path.getsize(tmp_path / "empty") == 0
    verify_chain(read_checkpoint(tmp_path / "empty", FAKE_SECTIONS))
    restore_exactly(guests, tmp_path / "empty", src.state_at_pause, src.digest_at_pause)
    assert src.calls[-1] == "resume"


def test_a_diff_whose_parent_changed_on_disk_since_is_refused(tmp_path, guests):
    src = guests("16M", work_pages=256)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)  # the same path written again: a new parent
    shutil.copy(tmp_path / "full.meta", tmp_path / "saved.meta")
    (tmp_path / "full.meta").write_text((tmp_path / "full.meta").read_text() + " ")
    with pytest.raises(CheckpointError, match=r"the previous checkpoint '.*full' .* was changed, removed or replaced"):
        checkpoint_guest(src, tmp_path / "d", basic=BASIC, diff=True)


@pytest.mark.parametrize("how", ["unwritable", "fails-mid-write", "cancelled"])
def test_a_failed_diff_keeps_its_pages_so_the_next_diff_is_complete(tmp_path, guests, monkeypatch, how):
    from vmmpy.snapshot import files

    src = guests("16M", work_pages=2048, rate=4000)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    src.wait_for_progress(600)
    if how == "unwritable":
        target = tmp_path / "gone" / "d"
    else:
        target = tmp_path / "d-failed"
        real = files._write_diff_memory

        def failing(fd, memory, runs, chunk_size):
            real(fd, memory, runs[: len(runs) // 2], chunk_size)  # half the pages are on disk when it stops
            raise OSError(28, "No space left on device") if how == "fails-mid-write" else KeyboardInterrupt()

        monkeypatch.setattr(files, "_write_diff_memory", failing)
    with pytest.raises((CheckpointError, KeyboardInterrupt)):
        checkpoint_guest(src, target, basic=BASIC, diff=True)
    monkeypatch.undo()
    assert sorted(os.listdir(tmp_path)) == ["full", "full.kern", "full.meta"], "nothing of the failed diff is left"
    src.wait_for_progress(100)  # fewer than the pages before the failure: those come only from the log
    checkpoint_guest(src, tmp_path / "d", basic=BASIC, diff=True)
    pages = sum(n for _, n in json.loads((tmp_path / "d.meta").read_text())["parent"]["pages"])
    assert pages >= 600
    restore_exactly(guests, tmp_path / "d", src.state_at_pause, src.digest_at_pause)


def test_another_consumer_of_the_dirty_log_does_not_make_a_diff_incomplete(tmp_path, guests):
    """A migration (or its estimate) harvests and clears the same dirty bitmap: what it clears
    through get_and_clear_dirty reaches the checkpoint log exactly; a harvest inside the core
    (a migration round sending pages) makes the next diff carry every page."""
    src = guests("16M", work_pages=2048)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    src.wait_for_progress(300)
    src.memory.get_and_clear_dirty()  # as an estimate's sampling does
    src.wait_for_progress(300)
    checkpoint_guest(src, tmp_path / "d1", basic=BASIC, diff=True)
    restore_exactly(guests, tmp_path / "d1", src.state_at_pause, src.digest_at_pause)
    src.wait_for_progress(300)
    with open(os.devnull, "wb") as sink:
        src.memory.send_dirty_pages(sink)  # as a migration round does
    checkpoint_guest(src, tmp_path / "d2", basic=BASIC, diff=True)
    pages = sum(n for _, n in json.loads((tmp_path / "d2.meta").read_text())["parent"]["pages"])
    assert pages == 16 << 20 >> 12, "a harvest the log did not see: every page goes"
    restore_exactly(guests, tmp_path / "d2", src.state_at_pause, src.digest_at_pause)


@pytest.fixture
def chain3(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    src.wait_for_progress(100)
    (tmp_path / "c").mkdir()
    chain = take_chain(src, tmp_path / "c", 2)
    src.stop_writer()
    other = guests("16M", work_pages=1024)  # another guest: its checkpoint can never be byte-identical to the chain's
    other.wait_for_progress(200)
    checkpoint_guest(other, tmp_path / "other", basic=BASIC)
    return tmp_path, chain


def _first_data_page(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.lseek(fd, 0, os.SEEK_DATA)
    finally:
        os.close(fd)


@pytest.mark.parametrize("victim", ["full", "d1", "d2"])
@pytest.mark.parametrize("damage", ["flip-memory", "flip-last", "flip-kern", "flip-meta", "truncate-memory", "truncate-kern",
                                    "missing-meta", "swap-parent"])
def test_every_damaged_file_of_a_chain_is_refused_naming_it(chain3, guests, victim, damage):
    tmp_path, chain = chain3
    directory = tmp_path / "c"
    target = directory / victim
    if damage == "flip-memory":
        flip(target, _first_data_page(target) + 100)
    elif damage == "flip-last":  # the last byte of the memory file (a hole in the full one)
        flip(target, os.path.getsize(target) - 1)
    elif damage == "flip-kern":
        flip(f"{target}.kern", 40)
    elif damage == "flip-meta":
        text = (directory / f"{victim}.meta").read_text()
        (directory / f"{victim}.meta").write_text(text.replace('"vmname": "fake"', '"vmname": "fakf"'))
    elif damage == "truncate-memory":
        os.truncate(target, os.path.getsize(target) - PAGE)
    elif damage == "truncate-kern":
        os.truncate(f"{target}.kern", os.path.getsize(f"{target}.kern") - 1)
    elif damage == "missing-meta":
        os.unlink(f"{target}.meta")
    elif damage == "swap-parent":  # another (valid) checkpoint in the victim's place
        for suffix in ("", ".kern", ".meta"):
            shutil.copy(tmp_path / f"other{suffix}", f"{target}{suffix}")
    leaf = directory / "d2"
    named = str(target)
    if damage == "swap-parent" and victim == "d2":
        # the leaf itself swapped is a valid full checkpoint: it restores as what it is
        assert read_checkpoint(leaf, FAKE_SECTIONS).parent is None
        return
    dst = guests("16M", work_pages=2048, running=False)
    with pytest.raises(CheckpointError) as caught:
        restore_guest(dst, read_checkpoint(leaf, FAKE_SECTIONS), mode="eager")
    message = str(caught.value)
    assert f"'{named}" in message, message
    assert f"'{leaf}.meta'" in message or victim == "d2", ("an older file is refused as part of the leaf's chain", message)
    assert dst.calls == [] or dst.calls == ["check_sections"], "refused before any memory was adopted"
    with pytest.raises(CheckpointError, match=f"'{named}"):
        verify_chain(read_checkpoint(leaf, FAKE_SECTIONS))


def test_a_parent_of_another_layout_or_key_is_refused_by_name(tmp_path, guests):
    key = b"k" * 32
    src = guests("16M", work_pages=2048)
    checkpoint_guest(src, tmp_path / "full", basic=BASIC, key=key)
    checkpoint_guest(src, tmp_path / "d1", basic=BASIC, diff=True, key=key)
    assert json.loads((tmp_path / "d1.meta").read_text())["format_version"] == 4
    restore_exactly(guests, tmp_path / "d1", src.state_at_pause, src.digest_at_pause, key=key)
    with pytest.raises(CheckpointError, match=r"'.*d1\.meta': this checkpoint is keyed"):
        read_checkpoint(tmp_path / "d1", FAKE_SECTIONS)
    # the parent rewritten unkeyed (the same guest at the same point): no longer what d1 names
    checkpoint_guest(src, tmp_path / "full", basic=BASIC)
    with pytest.raises(CheckpointError, match=r"'.*d1\.meta': its parent '.*full' is refused: .*has no MAC"):
        read_checkpoint(tmp_path / "d1", FAKE_SECTIONS, key=key)


def test_a_diff_chain_restores_lazily_and_a_damaged_root_chunk_under_a_diff_is_refused(tmp_path, guests):
    src = guests("16M", work_pages=256)
    chain = take_chain(src, tmp_path, 2, between=50)
    path, state, digest = chain[2]
    dst = guests("16M", work_pages=256, running=False)
    restore_guest(dst, read_checkpoint(path, FAKE_SECTIONS), mode="lazy")
    assert dst.memory.lazy and not dst.memory.lazy_status().resident, "only the chunks the diffs write to are loaded"
    assert (dst.sweeps, dst.position) == state and dst.bad_pages(*state) == []
    assert dst.memory.digest() == digest
    # A flipped byte in the root's chunk under the diffs' pages (the work area from 1 MiB): the
    # restore loads that chunk to lay the diffs over it, and refuses it naming the root.
    with open(tmp_path / "full", "r+b") as f:
        f.seek(1 << 20)
        byte = f.read(1)
        f.seek(1 << 20)
        f.write(bytes([byte[0] ^ 1]))
    bad = guests("16M", work_pages=256, running=False)
    with pytest.raises(CheckpointError, match=r"d2\.meta': its chain's '.*full' is refused: checkpoint '.*full': memory chunk 0 .*"
                                              r"does not match its recorded hash"):
        restore_guest(bad, read_checkpoint(path, FAKE_SECTIONS), mode="lazy")


def test_a_reader_of_versions_1_and_2_refuses_a_diff_by_its_version(tmp_path, guests, monkeypatch):
    src = guests("16M", work_pages=256)
    take_chain(src, tmp_path, 1, between=50)
    monkeypatch.setattr(meta_module, "FORMAT_VERSIONS", (1, 2))  # what vmmpy before diffs reads
    with pytest.raises(CheckpointError, match=r"d1\.meta': format version 3 is not one this vmmpy reads \(1, 2\)"):
        read_checkpoint(tmp_path / "d1", FAKE_SECTIONS)
    read_checkpoint(tmp_path / "full", FAKE_SECTIONS)  # a full checkpoint is still version 1


def test_a_parent_of_another_memory_size_is_refused_by_name(tmp_path, guests):
    src = guests("16M", work_pages=2048)
    take_chain(src, tmp_path, 1, between=50)
    big = guests("32M", work_pages=2048)
    checkpoint_guest(big, tmp_path / "full", basic=BASIC)  # a 32 MiB guest's checkpoint where the parent was
    with pytest.raises(CheckpointError, match=r"'.*d1\.meta': its parent '.*full' is not the checkpoint it was written over"):
        read_checkpoint(tmp_path / "d1", FAKE_SECTIONS)


SWEEPS = 6000
ABTEST = ["--guest", "abtest", "--guest-arg", f"sweeps={SWEEPS}", "--guest-arg", "report=1000", "-m", "32M"]
DONE = f"abtest: done {SWEEPS} sweeps over {(32 - 2) * 256} pages, all counters {SWEEPS}\n"


@pytest.mark.covers(operation="suspend", guest="abtest", via="cli", diff=True)
def test_vmmctl_diff_chain_merge_and_check_and_vmmrun_restores_the_chain_exactly(tmp_path):
    """The abtest guest (every page's counter must reach the sweep count) suspended through a
    full checkpoint and two diffs, each taken after the guest ran on: restored from the chain,
    and from the chain merged, it ends as a run that never stopped."""
    import subprocess

    from .procs import start_vmmrun, stop, vmmctl, vmmrun_cmd, wait_for_socket, wait_for_state

    console = tmp_path / "console.log"
    proc = start_vmmrun(tmp_path, *ABTEST, "-l", f"com1,{console}", "--pause-at=2000000", "df0")
    try:
        wait_for_socket(tmp_path, "df0", proc)
        wait_for_state(tmp_path, "df0", "paused")
        refused = vmmctl(tmp_path, "--vm=df0", f"--checkpoint={tmp_path / 'early'}", "--diff")
        assert refused.returncode == 1 and "--diff needs a previous checkpoint of this guest" in refused.stderr
        assert vmmctl(tmp_path, "--vm=df0", f"--checkpoint={tmp_path / 'full'}").returncode == 0
        for name, action in (("d1", "--checkpoint"), ("d2", "--suspend")):
            assert vmmctl(tmp_path, "--vm=df0", "--resume").returncode == 0
            assert vmmctl(tmp_path, "--vm=df0", "--pause").returncode == 0  # it ran while vmmctl started
            saved = vmmctl(tmp_path, "--vm=df0", f"{action}={tmp_path / name}", "--diff")
            assert saved.returncode == 0, saved.stderr
            assert "(diff over " in saved.stdout
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    assert DONE not in console.read_text(), "suspended before the end"

    checked = vmmctl(tmp_path, "--check-checkpoint", str(tmp_path / "d2"))
    assert checked.returncode == 0, checked.stderr
    assert checked.stdout.splitlines()[-1] == f"{tmp_path / 'd2'}: chain of 3 verified"
    merged = vmmctl(tmp_path, "--merge-checkpoint", str(tmp_path / "d2"), "--output", str(tmp_path / "merged"))
    assert merged.returncode == 0, merged.stderr

    def restore(path, *extra):
        out = tmp_path / f"{path.name}.console"
        result = subprocess.run(vmmrun_cmd("-r", str(path), *extra, "-l", f"com1,{out}", "--run-dir", str(tmp_path), "dr0"),
                                capture_output=True, text=True, timeout=180)
        return result, out

    for path, extra in ((tmp_path / "d2", ()), (tmp_path / "d2", ("--restore-mode", "lazy")), (tmp_path / "merged", ())):
        result, out = restore(path, *extra)
        assert result.returncode == 1, result.stderr
        assert out.read_text().endswith(DONE), path

    os.truncate(tmp_path / "d1.kern", 10)
    damaged = vmmctl(tmp_path, "--check-checkpoint", str(tmp_path / "d2"))
    assert damaged.returncode == 1 and f"{tmp_path / 'd1.kern'}'" in damaged.stderr


@pytest.mark.covers(operation="checkpoint", guest="abtest", via="api", diff=True)
def test_abtest_restored_from_diff_chains_of_1_2_and_10_ends_as_an_uninterrupted_run(tmp_path):
    """Memory (SHA-256 of lowmem), instruction count, exit status and console of abtest restored
    from each chain equal those of a run that never stopped."""
    import time

    from vmmpy import Vm

    from .test_vm_api import final_state

    args, memory = {"sweeps": 1500, "report": 0}, "16M"
    with Vm("abtest", args=args, memory=memory) as vm:
        vm.start()
        expected = final_state(vm)
    paths = [tmp_path / "full", *(tmp_path / f"d{n}" for n in range(1, 11))]
    with Vm("abtest", args=args, memory=memory) as vm:
        vm.start(pause_at=2_000_000)
        vm.wait_paused(60)
        vm.checkpoint(paths[0])
        for path in paths[1:]:
            vm.resume()
            time.sleep(0.002)
            vm.pause()
            assert vm.checkpoint(path, diff=True)["parent"] == str(path.with_name("full" if path.name == "d1" else f"d{int(path.name[1:]) - 1}"))
        vm.resume()
        assert final_state(vm) == expected, "checkpoints do not change the run"
    for length, mode in ((1, "eager"), (2, "eager"), (10, "eager"), (2, "lazy"), (10, "lazy")):
        with Vm.restore(paths[length], mode=mode) as restored:
            restored.start()
            assert final_state(restored) == expected, f"restored ({mode}) from a chain of {length} diffs"
            assert restored.console.endswith("all counters 1500\n")
