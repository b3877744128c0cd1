"""Lazy restore checks each chunk of memory against the checkpoint's chunk hashes before the guest
can see a byte of it. A flipped byte, a byte written into a hole, a zeroed page, a memory file
from another checkpoint, a .meta whose chunk hash was changed (checksum recomputed), a memory file
truncated under the running guest: vmmrun stops the guest before it runs on the bad chunk, says
which file, which chunk, which guest-physical range and what was wrong, exits 4 and removes its
control socket. Device DMA and numpy views get verified bytes too."""

import json
import os
import re
import shutil
import signal
import struct

import numpy as np
import pytest

from vmmpy import LazyMemoryError
from vmmpy.devices.virtio_blk import VirtioBlock
from vmmpy.memory import GuestMemory
from vmmpy.snapshot import meta as ckmeta
from vmmpy.snapshot import read_checkpoint, restore_memory, write_checkpoint
from vmmpy.state import Section, SectionRegistry

from .procs import start_vmmrun, stop, vmmctl, wait_for_socket, wait_for_state
from .test_checkpoint_restore import ABTEST, DONE, damaged_copy, flip, run
from .test_devices import Driver, make_image

MiB = 1 << 20
CHUNK = 4 * MiB  # the checkpoints' chunk size (the default)
SAVED_AT = 5_000_000  # instructions vCPU 0 has retired in the saved guest


def suspend_abtest(directory, name, at):
    proc = start_vmmrun(directory, *ABTEST, "-l", f"com1,{directory / name}.log", f"--pause-at={at}", name)
    try:
        wait_for_socket(directory, name, proc)
        wait_for_state(directory, name, "paused")
        assert vmmctl(directory, f"--vm={name}", f"--suspend={directory / name}.ckp").returncode == 0
        assert proc.wait(timeout=60) == 0
    finally:
        stop(proc)
    return directory / f"{name}.ckp"


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Two checkpoints of the same 32 MiB abtest guest, saved at different points."""
    directory = tmp_path_factory.mktemp("lazy")
    return suspend_abtest(directory, "first", SAVED_AT), suspend_abtest(directory, "second", SAVED_AT + 1_000_000)


def chunk_text(index):
    start, end = index * CHUNK, (index + 1) * CHUNK
    return f"memory chunk {index} (file bytes {start:#x}..{end:#x}, guest-physical {start:#x}..{end:#x})"


def first_hole(path):
    fd = os.open(path, os.O_RDONLY)
    try:
        hole = os.lseek(fd, 0, os.SEEK_HOLE)
    finally:
        os.close(fd)
    assert hole < os.path.getsize(path), "the saved memory file is sparse"
    return hole


def change_chunk_hash(path, index):
    """Change chunk `index`'s hash in the .meta, and recompute the .meta's checksum to match."""
    meta_path = f"{path}.meta"
    meta = json.loads(open(meta_path).read())
    hashes = meta["memory"]["chunk_hashes"]
    hashes[index] = f"{int(hashes[index], 16) ^ 1:032x}"
    meta["meta_checksum"] = ckmeta.meta_checksum(meta)
    open(meta_path, "w").write(json.dumps(meta, indent=1))


DAMAGES = {
    # A counter page the guest sweeps: it runs until its sweep reaches chunk 5, then stops.
    "flipped-data-byte": (lambda p, good, other: flip(p, 5 * CHUNK + 3 * 4096), 5, "does not match its recorded hash"),
    # A page the saved file holds as a hole (zero) that now has a byte.
    "byte-in-a-hole": (lambda p, good, other: flip(p, first_hole(good) + 100), 0, "does not match its recorded hash"),
    # A data page that now reads as zero.
    "zeroed-data-page": (lambda p, good, other: write_at(p, 6 * CHUNK + 8 * 4096, bytes(4096)), 6, "does not match its recorded hash"),
    # The memory file of another checkpoint of the same guest and size: every chunk that differs
    # is bad, and the background fill's two loaders may meet any of them first.
    "memory-file-of-another-checkpoint": (lambda p, good, other: shutil.copyfile(other, p), None, "does not match its recorded hash"),
    # The .meta vouches for a different chunk 3, and its checksum was recomputed to match.
    "changed-chunk-hash-in-meta": (lambda p, good, other: change_chunk_hash(p, 3), 3, "does not match its recorded hash"),
}


def differing_chunks(a, b):
    """The chunks whose bytes differ between two memory files of the same size."""
    with open(a, "rb") as fa, open(b, "rb") as fb:
        chunks = []
        index = 0
        while block := fa.read(CHUNK):
            if block != fb.read(CHUNK):
                chunks.append(index)
            index += 1
    assert chunks, "the two checkpoints differ"
    return chunks


def write_at(path, offset, data):
    with open(path, "r+b") as f:
        f.seek(offset)
        f.write(data)


#: How each case restores: eager; lazy with chunks loaded only on demand; lazy with the
#: background fill (the default), which may find the bad chunk before the guest needs it.
RESTORES = {"eager": ["--restore-mode", "eager"], "lazy": ["--restore-mode", "lazy", "--restore-prefetch", "none"],
            "lazy-fill": ["--restore-mode", "lazy", "--restore-prefetch", "fill"]}


@pytest.mark.parametrize("mode", sorted(RESTORES))
@pytest.mark.parametrize("damage", sorted(DAMAGES))
def test_damaged_memory_stops_or_refuses_the_guest_before_it_runs_on_it(checkpoints, tmp_path, damage, mode):
    good, other = checkpoints
    change, chunk, what = DAMAGES[damage]
    bad = damaged_copy(good, tmp_path, lambda p: change(p, good, other))
    console = tmp_path / "console.log"
    result = run("-r", str(bad), *RESTORES[mode], "-l", f"com1,{console}", "--run-dir", str(tmp_path), "bad0")
    assert result.returncode == 4, result.stderr
    bad_chunks = [chunk] if chunk is not None else differing_chunks(good, other)
    if mode != "lazy-fill":
        bad_chunks = bad_chunks[:1]  # in order: the first bad chunk is the one named
    assert any(f"checkpoint '{bad}': {chunk_text(c)} {what}" in result.stderr for c in bad_chunks), \
        (bad_chunks, result.stderr)
    assert "Traceback" not in result.stderr
    assert not (tmp_path / "bad0.ctl").exists(), "the control socket is removed"
    text = console.read_text() if console.exists() else ""
    assert "MISMATCH" not in text and DONE not in text, "the guest never ran on the bad chunk"
    if mode == "lazy" and chunk:
        assert "vcpu 0 stopped at rip" in result.stderr, "it ran on good chunks until it needed the bad one"


def test_a_memory_file_truncated_under_a_lazily_restored_guest_stops_it_cleanly(checkpoints, tmp_path):
    good, _ = checkpoints
    copy = damaged_copy(good, tmp_path, lambda p: None)
    console = tmp_path / "console.log"
    # 100 instructions load the code's chunk and the one the sweep is in; then it pauses.
    proc = start_vmmrun(tmp_path, "-r", str(copy), *RESTORES["lazy"], "-l", f"com1,{console}",
                        f"--pause-at={SAVED_AT + 100}", "tr0")
    try:
        wait_for_socket(tmp_path, "tr0", proc)
        wait_for_state(tmp_path, "tr0", "paused")
        os.truncate(copy, 4096)
        assert vmmctl(tmp_path, "--vm=tr0", "--resume").returncode == 0
        status = proc.wait(timeout=120)
        stderr = proc.stderr.read()
    finally:
        stop(proc)
    assert status != -signal.SIGBUS and status == 4, stderr
    assert f"checkpoint '{copy}': memory chunk " in stderr
    assert "cannot be read: the file was truncated to 4096 bytes" in stderr
    assert "Traceback" not in stderr
    assert not (tmp_path / "tr0.ctl").exists(), "no stale control socket"
    assert DONE not in console.read_text()


def test_a_bad_chunk_found_by_a_checkpoint_stops_the_guest_too(checkpoints, tmp_path):
    """Not only the vCPU: any thread that finds a bad chunk (here a checkpoint of the restored
    guest, which must read all of memory) fails with the error, and the guest is stopped."""
    good, _ = checkpoints
    bad = damaged_copy(good, tmp_path, lambda p: flip(p, 5 * CHUNK + 3 * 4096))
    proc = start_vmmrun(tmp_path, "-r", str(bad), *RESTORES["lazy"], "-l", f"com1,{tmp_path / 'console.log'}",
                        f"--pause-at={SAVED_AT}", "ck0")
    try:
        wait_for_socket(tmp_path, "ck0", proc)
        wait_for_state(tmp_path, "ck0", "paused")
        saved = vmmctl(tmp_path, "--vm=ck0", f"--checkpoint={tmp_path / 'again.ckp'}")
        assert saved.returncode != 0
        assert chunk_text(5) in saved.stderr
        status = proc.wait(timeout=60)
        stderr = proc.stderr.read()
    finally:
        stop(proc)
    assert status == 4 and f"guest stopped: checkpoint '{bad}': {chunk_text(5)}" in stderr, stderr
    assert not (tmp_path / "again.ckp.meta").exists(), "nothing unverified was saved"
    assert not (tmp_path / "ck0.ctl").exists()


# ---- device DMA and numpy views -------------------------------------------------------------------


def blk_write_request(driver, data_gpa, data):
    """A virtio-blk write of `data` (at `data_gpa`) to sector 0, described but not yet published."""
    driver.memory.write(0x300000, struct.pack("<IIQ", 1, 0, 0))  # VIRTIO_BLK_T_OUT, sector 0
    driver.memory.write(data_gpa, data)
    driver.desc(0, 0x300000, 16, 1, 1)
    driver.desc(1, data_gpa, len(data), 1, 2)
    driver.desc(2, 0x300100, 1, 2)


@pytest.mark.parametrize("damaged", [False, True])
def test_device_dma_from_a_chunk_not_yet_loaded_gets_verified_bytes(tmp_path, damaged):
    img = make_image(tmp_path / "disk.img")
    driver = Driver(VirtioBlock, img)
    data = bytes(range(256)) * 16
    data_gpa = 0x500000  # chunk 1: nothing but the device will touch it after the restore
    blk_write_request(driver, data_gpa, data)
    path = tmp_path / "dma.ckp"
    write_checkpoint(path, driver.memory, [Section("vm", 1, {})], {"ncpus": 1, "vmname": "dma"})
    if damaged:
        write_at(path, data_gpa + 7, b"\xee")
    lazy = restore_memory(read_checkpoint(path, SectionRegistry({"vm": 1})), "lazy")
    driver.memory.close()
    driver.memory = lazy  # the device now sees the lazily restored memory
    assert lazy.lazy_status().loaded == 0
    if damaged:
        with pytest.raises(LazyMemoryError, match=r"dma\.ckp': memory chunk 1 .* does not match its recorded hash"):
            driver.publish(0)
        assert open(img, "rb").read(len(data)) == bytes(len(data)), "nothing unverified reached the disk"
        assert driver.device.error is None, "the host's failure is not made a guest-visible device error"
    else:
        driver.publish(0)
        assert driver.used_idx() == 1 and lazy.read(0x300100, 1) == b"\0"
        assert open(img, "rb").read(len(data)) == data
        assert lazy.lazy_status().loaded == 2, "the ring's chunk and the buffer's"
    driver.device.close()
    lazy.close()


def test_a_numpy_view_of_a_lazily_restored_segment_shows_verified_bytes(tmp_path):
    mem = GuestMemory("16M", dirty_tracking="soft")
    rng = np.random.default_rng(3)
    for gpa in (0, 5 * MiB + 4096, 13 * MiB):
        mem.write(gpa, rng.integers(0, 256, 3 * 4096, dtype=np.uint8).tobytes())
    path = tmp_path / "view.ckp"
    write_checkpoint(path, mem, [Section("vm", 1, {})], {"ncpus": 1, "vmname": "view"})
    ckpt = read_checkpoint(path, SectionRegistry({"vm": 1}))
    lazy = restore_memory(ckpt, "lazy")
    assert lazy.lazy_status().loaded == 0
    view = np.frombuffer(lazy.lowmem, np.uint8)
    assert lazy.lazy_status().complete, "a view sees every byte, so every chunk was checked first"
    assert np.array_equal(view, mem.view("lowmem"))
    del view
    lazy.close()
    write_at(path, 9 * MiB + 1, b"\x01")  # chunk 2, a hole in the file
    lazy = restore_memory(read_checkpoint(path, SectionRegistry({"vm": 1})), "lazy")
    with pytest.raises(LazyMemoryError, match=re.escape(f"view.ckp': {chunk_text(2)} does not match its recorded hash")):
        np.frombuffer(lazy.lowmem, np.uint8)
    assert lazy.lowmem.exports == 0, "no view was handed out"
    assert lazy.read(0, 16) == mem.read(0, 16), "the good chunks still load"
    lazy.close()
    mem.close()
