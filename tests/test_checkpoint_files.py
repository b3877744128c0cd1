"""Checkpoint files: round trips through eager and lazy restore, sparseness, dirty tracking on
restored memory, and a corrupt-input suite in which every damaged checkpoint is refused by name
before any guest memory exists."""

import json
import os
import socket

import numpy as np
import pytest

from vmmpy import GuestMemory, LazyMemoryError, _core
from vmmpy.memory import HIGHMEM_BASE, PAGE_SIZE
from vmmpy.snapshot import CheckpointError, read_checkpoint, restore_memory, verify_memory, write_checkpoint
from vmmpy.snapshot import files as ckfiles
from vmmpy.snapshot import meta as ckmeta
from vmmpy.state import Section, SectionRegistry

GIB = 1 << 30
SECTIONS = [
    Section("vm", 1, {"startup_cpus": 3, "tsc": 123456789}),
    Section("vlapic", 2, {"regs": b"\x00\x01\x02" * 100, "timer": {"icr": 5}}),
    Section("uart@lpc.com1", 1, {"lcr": 3, "fifo": b"hi"}),
]
REGISTRY = SectionRegistry({"vm": 1, "vlapic": 2, "uart": 1})
BASIC = {"ncpus": 2, "vmname": "vm0"}


def random_pages(mem: GuestMemory, seed: int = 7) -> dict[int, bytes]:
    """Scatter random pages (and runs of them) over lowmem and highmem, plus a zero page."""
    rng = np.random.default_rng(seed)
    written = {}
    low_pages, high_pages = mem.lowmem.size // PAGE_SIZE, mem.highmem.size // PAGE_SIZE
    gpas = [int(p) * PAGE_SIZE for p in rng.choice(low_pages - 3, 40, replace=False)]
    gpas += [HIGHMEM_BASE + int(p) * PAGE_SIZE for p in rng.choice(high_pages - 3, 40, replace=False)]
    for gpa in gpas:
        run = 3 if gpa % (5 * PAGE_SIZE) == 0 else 1  # some multi-page runs
        data = rng.integers(1, 256, PAGE_SIZE * run, dtype=np.uint8).tobytes()
        mem.write(gpa, data)
        written[gpa] = data
    zero_gpa = next(p * PAGE_SIZE for p in range(low_pages) if all(not (g <= p * PAGE_SIZE < g + len(d) + PAGE_SIZE) for g, d in written.items()))
    mem.write(zero_gpa, bytes(PAGE_SIZE))  # touched, all zero
    return written


@pytest.fixture(scope="module")
def guest():
    mem = GuestMemory("5G", dirty_tracking="soft")
    written = random_pages(mem)
    yield mem, written
    mem.close()


@pytest.fixture
def checkpoint(tmp_path, guest):
    mem, _ = guest
    path = tmp_path / "vm0.ckp"
    stats = write_checkpoint(path, mem, SECTIONS, BASIC)
    return str(path), stats


def names(directory) -> list[str]:
    return sorted(os.listdir(directory))


# -- round trips ------------------------------------------------------------------------------


def test_checkpoint_is_three_files_and_sparse_on_disk(checkpoint, guest, tmp_path):
    path, stats = checkpoint
    mem, written = guest
    assert names(tmp_path) == ["vm0.ckp", "vm0.ckp.kern", "vm0.ckp.meta"]
    st = os.stat(path)
    assert st.st_size == 5 * GIB
    data_bytes = sum(len(d) for d in written.values())
    assert stats["bytes_written"] == data_bytes
    assert st.st_blocks * 512 < 4 * data_bytes, "never-touched and zero pages are holes"
    assert stats["zero_pages"] == 1
    meta = json.loads(open(path + ".meta").read())
    assert meta["basic metadata"] == {"ncpus": 2, "vmname": "vm0", "memsize": 5 * GIB, "memflags": 0}
    assert [e["device"] for e in meta["kern_structs"]] == ["vm", "vlapic"]
    assert [e["device"] for e in meta["devices"]] == ["uart@lpc.com1"]
    assert meta["memory"]["lowmem"] == 3 * GIB and meta["memory"]["highmem"] == 2 * GIB
    kern = open(path + ".kern", "rb").read()
    for entry in meta["sections"]:  # offsets point at each record: u16 name length, then the name
        name_len = int.from_bytes(kern[entry["offset"] : entry["offset"] + 2], "little")
        assert kern[entry["offset"] + 2 : entry["offset"] + 2 + name_len].decode() == entry["name"]
    assert sum(e["size"] for e in meta["sections"]) + 16 == len(kern)


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_round_trip_is_bit_exact(checkpoint, guest, mode):
    path, _ = checkpoint
    mem, written = guest
    ckpt = read_checkpoint(path, REGISTRY)
    assert ckpt.sections == SECTIONS
    assert ckpt.basic["vmname"] == "vm0" and ckpt.basic["ncpus"] == 2
    restored = restore_memory(ckpt, mode)
    try:
        assert restored.lazy == (mode == "lazy")
        assert restored.digest() == mem.digest()
        for gpa, data in list(written.items())[:10]:
            assert restored.read(gpa, len(data)) == data
        assert restored.dirty_count() == 0, "restored pages are not guest writes"
    finally:
        restored.close()


def test_eager_restore_reads_only_data_and_leaves_holes_untouched(checkpoint, guest):
    path, _ = checkpoint
    _, written = guest
    restored = restore_memory(read_checkpoint(path, REGISTRY), "eager")
    try:
        assert restored.resident_pages() <= sum(len(d) for d in written.values()) // PAGE_SIZE + 64
    finally:
        restored.close()


def _cached(path) -> int:
    """Pages of the file at ``path`` in the page cache; skips where this kernel cannot count them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        cached = _core.cached_pages(fd)
    finally:
        os.close(fd)
    if cached is None:
        pytest.skip("this kernel (or filesystem) cannot count cached pages (cachestat(2), Linux 6.5): restores keep the cache")
    return cached


def _evict(path, pages: int) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)
    if _cached(path) * 2 >= pages:
        pytest.skip("this filesystem keeps its pages cached whatever it is told (tmpfs?)")


@pytest.fixture(scope="module")
def dense(tmp_path_factory):
    """A 48 MiB guest with data in every page (so the memory file has no holes, and every page
    of it counts), saved unkeyed and keyed, on the disk directory the tests use."""
    mem = GuestMemory("48M", dirty_tracking="soft")
    mem.write(0, np.random.default_rng(3).integers(0, 255, 48 << 20, dtype=np.uint8).tobytes())
    directory = tmp_path_factory.mktemp("dense")
    paths = {}
    for keyed in (False, True):
        paths[keyed] = str(directory / f"dense{'-keyed' if keyed else ''}.ckp")
        write_checkpoint(paths[keyed], mem, SECTIONS, BASIC, key=KEY if keyed else None)
    yield mem, paths, (48 << 20) // PAGE_SIZE
    mem.close()


@pytest.mark.parametrize("keyed", [False, True], ids=["unkeyed", "keyed"])
@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_restore_from_the_disk_leaves_no_copy_of_memory_in_the_page_cache(dense, mode, keyed):
    """What a restore reads from the disk is dropped from the page cache once it is in guest
    memory (a second copy of the guest the kernel would have to reclaim), keyed too, whose
    SHA-256 pass reads the file before the restore; page_cache="keep" leaves it cached, and a
    file found cached stays cached. The guest's bytes are the same every time."""
    mem, paths, pages = dense
    path, key = paths[keyed], KEY if keyed else None

    def restore(**kwargs) -> int:
        restored = restore_memory(read_checkpoint(path, REGISTRY, key=key), mode, **kwargs)
        try:
            assert restored.digest() == mem.digest()  # reads every page (a lazy restore loads every chunk)
        finally:
            restored.close()
        return _cached(path)

    _evict(path, pages)
    cached = restore()
    assert cached <= pages // 16, f"{cached} of the file's {pages} pages still cached after the {mode} restore"
    _evict(path, pages)
    cached = restore(page_cache="keep")
    # A kept file may still lose a few 2 MiB folios to the kernel's own page-out meanwhile (an
    # eighth is three of them); a dropped one keeps at most a sixteenth.
    assert cached >= pages * 7 // 8, f"only {cached} of {pages} pages cached after a {mode} restore told to keep them"
    cached = restore()  # found cached: stays cached
    assert cached >= pages * 7 // 8, f"only {cached} of {pages} pages cached after a {mode} restore of a cached file"


def test_page_cache_must_be_auto_or_keep(dense):
    _, paths, _ = dense
    with pytest.raises(ValueError, match="page_cache must be 'auto' or 'keep', not 'drop'"):
        restore_memory(read_checkpoint(paths[False], REGISTRY), page_cache="drop")


def test_lazy_restore_reads_nothing_until_touched_then_one_chunk(checkpoint, guest):
    path, _ = checkpoint
    mem, written = guest
    restored = restore_memory(read_checkpoint(path, REGISTRY), "lazy")
    try:
        assert restored.mapped_pages() == 0
        assert restored.lazy_status().loaded == 0
        gpa, data = next(iter(written.items()))
        restored.write(gpa + 1, b"\x5a")
        chunk = restored.lazy_status().chunk_size
        in_chunk = sum(len(d) for g, d in written.items() if g // chunk == gpa // chunk) // PAGE_SIZE
        assert restored.lazy_status().loaded == 1, "touching a page loads (and checks) its chunk only"
        assert restored.mapped_pages() == in_chunk, "the chunk's data pages, not its holes"
        assert restored.read(gpa, 3) == data[:1] + b"\x5a" + data[2:3]
        with open(path, "rb") as f:  # writes are private copies: the checkpoint is unchanged
            f.seek(gpa if gpa < HIGHMEM_BASE else gpa - HIGHMEM_BASE + 3 * GIB)
            assert f.read(3) == data[:3]
    finally:
        restored.close()


@pytest.mark.parametrize("tracking", ["soft", "kernel"])
def test_dirty_tracking_on_lazily_restored_memory(checkpoint, guest, tracking):
    from tests.conftest import KERNEL_UNAVAILABLE

    if tracking == "kernel" and KERNEL_UNAVAILABLE:
        pytest.skip(KERNEL_UNAVAILABLE)
    path, _ = checkpoint
    _, written = guest
    restored = restore_memory(read_checkpoint(path, REGISTRY), "lazy", dirty_tracking=tracking)
    try:
        assert restored.dirty_tracking == tracking
        gpa = next(iter(written))
        restored.read(gpa, 16)  # loading a page from the file is not a write
        assert restored.dirty_count() == 0
        restored.write(HIGHMEM_BASE + 5 * PAGE_SIZE + 10, b"x")
        restored.write(gpa, b"y")
        assert list(restored.get_and_clear_dirty()) == sorted([gpa >> 12, (HIGHMEM_BASE >> 12) + 5])
        assert restored.dirty_count() == 0
    finally:
        restored.close()


def test_auto_tracking_on_lazy_memory_is_soft_and_says_why(checkpoint):
    path, _ = checkpoint
    restored = restore_memory(read_checkpoint(path, REGISTRY), "lazy", dirty_tracking="auto")
    try:
        assert restored.dirty_tracking == "soft"
        assert "restore time would grow with guest size" in restored.dirty_tracking_fallback
    finally:
        restored.close()


def test_page_batch_zero_ranges_into_lazy_memory_read_as_zero(checkpoint, guest):
    path, _ = checkpoint
    mem, written = guest
    restored = restore_memory(read_checkpoint(path, REGISTRY), "lazy")
    sender = GuestMemory("5G", dirty_tracking="soft")
    try:
        data_gpas = sorted(written)[:5]  # pages the file holds data for: now zero at the sender
        sender.write(HIGHMEM_BASE, b"\x01" * PAGE_SIZE)  # and one data page
        a, b = socket.socketpair()
        with a, b:
            sender.send_pages(a, [g >> 12 for g in data_gpas] + [HIGHMEM_BASE >> 12])  # a batch per segment
            got = [restored.recv_pages(b) for _ in range(2)]
        assert sum(g["zero_pages"] for g in got) == len(data_gpas) and sum(g["data_pages"] for g in got) == 1
        assert restored.read(HIGHMEM_BASE, 4) == b"\x01" * 4
        for gpa in data_gpas:
            assert restored.read(gpa, PAGE_SIZE) == bytes(PAGE_SIZE), f"page {gpa:#x} must read as zero, not the file's bytes"
        neighbour = next(g for g in sorted(written) if g not in data_gpas and g - PAGE_SIZE not in data_gpas)
        assert restored.read(neighbour, 8) == written[neighbour][:8]
    finally:
        sender.close()
        restored.close()


def test_a_bad_byte_is_caught_by_verify_eager_and_lazy_restore_alike(checkpoint, guest):
    path, _ = checkpoint
    _, written = guest
    ckpt = read_checkpoint(path, REGISTRY)
    verify_memory(ckpt)
    with open(path, "r+b") as f:
        f.seek(3 * GIB + 1234)  # highmem's first chunk
        f.write(b"\xff")
    ckpt = read_checkpoint(path, REGISTRY)  # sizes still fine: the damage is inside the image
    where = r"memory chunk 768 \(file bytes 0xc0000000\.\.0xc0400000, guest-physical 0x100000000\.\.0x100400000\)"
    with pytest.raises(CheckpointError, match=where):
        verify_memory(ckpt)
    with pytest.raises(CheckpointError, match=r"vm0\.ckp': memory chunk 768 .* does not match its recorded hash"):
        restore_memory(ckpt, "eager")
    restored = restore_memory(ckpt, "lazy")  # starts: nothing is read yet
    try:
        elsewhere = next(g for g in written if g < 3 * GIB)
        assert restored.read(elsewhere, 16) == written[elsewhere][:16], "good chunks load"
        for _attempt in range(2):  # and the bad one never does
            with pytest.raises(LazyMemoryError, match=r"checkpoint '.*vm0\.ckp': " + where + " does not match its recorded hash"):
                restored.read(HIGHMEM_BASE + 4096, 1)
        with pytest.raises(LazyMemoryError, match=where):
            restored.write(HIGHMEM_BASE, b"x")
        assert "memory chunk 768" in restored.lazy_failure
        assert restored.lazy_status().failed == 1
    finally:
        restored.close()


def test_overwriting_a_checkpoint_replaces_all_three_files(checkpoint, guest, tmp_path):
    path, _ = checkpoint
    mem, _ = guest
    small = GuestMemory("64M", dirty_tracking="soft")
    small.write(4096, b"new")
    write_checkpoint(path, small, SECTIONS[:1], {"ncpus": 1, "vmname": "other"})
    ckpt = read_checkpoint(path, REGISTRY)
    assert ckpt.memsize == 64 << 20 and ckpt.basic["vmname"] == "other" and len(ckpt.sections) == 1
    assert names(tmp_path) == ["vm0.ckp", "vm0.ckp.kern", "vm0.ckp.meta"]
    restored = restore_memory(ckpt)
    assert restored.digest() == small.digest()
    restored.close()
    small.close()


# -- crash safety -----------------------------------------------------------------------------


@pytest.mark.parametrize("failing", ["memory", "kern", "meta", "rename"])
def test_a_write_that_fails_midway_leaves_nothing_behind(tmp_path, guest, monkeypatch, failing):
    mem, _ = guest
    path = tmp_path / "vm0.ckp"
    if failing == "memory":
        monkeypatch.setattr(ckfiles._core, "write_memory_file", _raise(OSError(28, "No space left on device")))
    elif failing == "rename":
        real_rename = os.rename
        calls = []

        def rename(src, dst):
            calls.append(dst)
            if len(calls) == 2:
                raise OSError(5, "Input/output error")
            real_rename(src, dst)

        monkeypatch.setattr(ckfiles.os, "rename", rename)
    else:
        real = ckfiles._write_file

        def write_file(name, data):
            if f".{failing}.tmp-" in name:
                with open(name, "wb") as f:
                    f.write(data[: len(data) // 2])
                raise OSError(28, "No space left on device")
            real(name, data)

        monkeypatch.setattr(ckfiles, "_write_file", write_file)
    with pytest.raises(CheckpointError, match="writing failed, nothing was left behind"):
        write_checkpoint(path, mem, SECTIONS, BASIC)
    left = names(tmp_path)
    assert "vm0.ckp.meta" not in left, left
    assert not [n for n in left if ".tmp-" in n], left
    if failing != "rename":
        assert left == []
    with pytest.raises(CheckpointError):
        read_checkpoint(path, REGISTRY)


def _raise(err):
    def f(*args, **kwargs):
        raise err

    return f


# -- the corrupt-input suite: refused by name, nothing created ---------------------------------


def refused(path, pattern, monkeypatch, registry=REGISTRY):
    """read_checkpoint (and so any restore) refuses, with a message matching `pattern`, and no
    GuestMemory is created on the way."""
    created = []
    real_init = GuestMemory.__init__

    def init(self, *a, **k):
        created.append(a)
        real_init(self, *a, **k)

    monkeypatch.setattr(GuestMemory, "__init__", init)
    with pytest.raises(CheckpointError, match=pattern):
        restore_memory(read_checkpoint(path, registry), "eager")
    assert created == []


def rewrite_meta(path, change):
    meta = json.loads(open(path + ".meta").read())
    change(meta)
    meta["meta_checksum"] = ckmeta.meta_checksum(meta)
    with open(path + ".meta", "w") as f:
        json.dump(meta, f)


def flip(name, offset):
    with open(name, "r+b") as f:
        f.seek(offset)
        byte = f.read(1)
        f.seek(offset)
        f.write(bytes([byte[0] ^ 0x01]))


@pytest.mark.parametrize("suffix", ["", ".kern", ".meta"])
def test_a_missing_file_is_named(checkpoint, monkeypatch, suffix):
    path, _ = checkpoint
    os.unlink(path + suffix)
    refused(path, rf"checkpoint '.*vm0\.ckp{suffix}': missing", monkeypatch)


@pytest.mark.parametrize("suffix,keep", [(".meta", 100), (".meta", 0), (".kern", 50), (".kern", 0)])
def test_truncated_state_files_are_refused(checkpoint, monkeypatch, suffix, keep):
    path, _ = checkpoint
    os.truncate(path + suffix, keep)
    pattern = r"vm0\.ckp\.meta': not valid JSON" if suffix == ".meta" else rf"vm0\.ckp\.kern': file is {keep} bytes, metadata says \d+"
    refused(path, pattern, monkeypatch)


def test_a_truncated_memory_file_is_refused_with_both_sizes(checkpoint, monkeypatch):
    path, _ = checkpoint
    os.truncate(path, 1 << 20)
    refused(path, rf"checkpoint '.*vm0\.ckp': memory file is 1048576 bytes, metadata says {5 * GIB}", monkeypatch)


def test_a_flipped_byte_in_the_meta_is_refused(checkpoint, monkeypatch):
    path, _ = checkpoint
    text = open(path + ".meta").read()
    flip(path + ".meta", text.index('"ncpus": 2') + len('"ncpus": '))  # 2 -> 3: still valid JSON
    refused(path, r"vm0\.ckp\.meta': metadata checksum mismatch", monkeypatch)


def test_a_flipped_byte_in_each_section_is_refused(checkpoint, monkeypatch):
    path, _ = checkpoint
    meta = json.loads(open(path + ".meta").read())
    original = open(path + ".kern", "rb").read()
    for entry in meta["sections"]:
        # Damage the section's payload and fix the file checksum, so the section check must catch it.
        data = bytearray(original)
        data[entry["offset"] + entry["size"] - 2] ^= 0x01
        open(path + ".kern", "wb").write(data)
        rewrite_meta(path, lambda m: m["kern"].update(checksum=ckfiles._hex64(ckfiles._core.xxh3_64(bytes(data)))))
        refused(path, rf"vm0\.ckp\.kern': section '{entry['name']}' checksum mismatch", monkeypatch)
    # Without the fix-up, the file checksum catches it first.
    open(path + ".kern", "wb").write(original)
    rewrite_meta(path, lambda m: m["kern"].update(checksum=ckfiles._hex64(ckfiles._core.xxh3_64(original))))
    flip(path + ".kern", 40)
    refused(path, r"vm0\.ckp\.kern': checksum \w+ does not match the metadata's", monkeypatch)


def test_a_flipped_byte_in_the_memory_file_is_named_by_chunk(checkpoint, guest, monkeypatch):
    path, _ = checkpoint
    _, written = guest
    gpa = sorted(written)[3]
    flip(path, gpa + 100)
    chunk = gpa // (4 << 20)
    created_and_closed = []
    real_close = GuestMemory.close
    monkeypatch.setattr(GuestMemory, "close", lambda self: (created_and_closed.append(self), real_close(self)))
    with pytest.raises(CheckpointError, match=rf"memory chunk {chunk} \(file bytes {chunk * (4 << 20):#x}\.\..*guest-physical"):
        restore_memory(read_checkpoint(path, REGISTRY), "eager")
    assert len(created_and_closed) == 1, "the half-restored memory was released, not returned"


def test_wrong_sizes_in_the_meta_are_refused(checkpoint, monkeypatch):
    path, _ = checkpoint
    rewrite_meta(path, lambda m: m["basic metadata"].update(memsize=512 << 20))
    refused(path, r"vm0\.ckp\.meta': memory layout lowmem \d+ \+ highmem \d+ does not fit memsize 536870912", monkeypatch)
    rewrite_meta(path, lambda m: (m["basic metadata"].update(memsize=5 * GIB), m["memory"].update(chunk_hashes=m["memory"]["chunk_hashes"][:-1])))
    refused(path, r"vm0\.ckp\.meta': 1279 chunk hashes, expected 1280", monkeypatch)


def test_a_kern_file_from_another_checkpoint_is_refused(checkpoint, guest, tmp_path, monkeypatch):
    path, _ = checkpoint
    mem, _ = guest
    other = tmp_path / "other" / "vm1.ckp"
    other.parent.mkdir()
    write_checkpoint(other, mem, SECTIONS[:2], {"ncpus": 2, "vmname": "vm1"})
    os.replace(str(other) + ".kern", path + ".kern")
    refused(path, r"vm0\.ckp\.kern': file is \d+ bytes, metadata says \d+", monkeypatch)
    # Same size, different content: the checksum catches it.
    write_checkpoint(other, mem, [Section("vm", 1, {"startup_cpus": 4, "tsc": 123456789})] + SECTIONS[1:], {"ncpus": 2, "vmname": "vm1"})
    write_checkpoint(path, mem, SECTIONS, BASIC)
    os.replace(str(other) + ".kern", path + ".kern")
    refused(path, r"vm0\.ckp\.kern': checksum \w+ does not match the metadata's .*from another checkpoint", monkeypatch)


def test_a_newer_section_version_is_refused_by_name(checkpoint, monkeypatch):
    path, _ = checkpoint
    refused(path, r"vm0\.ckp\.kern': section 'vlapic' version 2 is newer than this vmmpy reads \(versions 1 to 1\)", monkeypatch, SectionRegistry({"vm": 1, "vlapic": 1, "uart": 1}))


def test_an_unknown_section_is_refused_by_name(checkpoint, monkeypatch):
    path, _ = checkpoint
    refused(path, r"vm0\.ckp\.kern': section 'uart@lpc\.com1' is unknown to this vmmpy", monkeypatch, SectionRegistry({"vm": 1, "vlapic": 2}))


@pytest.mark.parametrize(
    "change,pattern",
    [
        (lambda m: m.update(format="bhyve"), r"format is 'bhyve', expected 'vmmpy-checkpoint'"),
        (lambda m: m.update(format_version=5), r"format version 5 is not one this vmmpy reads \(1, 2, 3, 4\)"),
        (lambda m: m.update(byte_order="big"), r"byte order 'big' is not one this vmmpy reads"),
        (lambda m: m["memory"].update(page_size=16384), r"page size 16384 is not this vmmpy's 4096"),
        (lambda m: m["devices"][0].update(file_offset=3), r"'devices' does not match the sections of '.*vm0\.ckp\.kern': entry 0 is .*'file_offset': 3}, the file has"),
    ],
)
def test_unknown_formats_and_inconsistent_metadata_are_refused(checkpoint, monkeypatch, change, pattern):
    path, _ = checkpoint
    rewrite_meta(path, change)
    refused(path, r"vm0\.ckp\.meta': " + pattern, monkeypatch)


def test_a_memory_file_replaced_after_reading_is_refused_at_restore(checkpoint, guest, tmp_path):
    path, _ = checkpoint
    mem, _ = guest
    ckpt = read_checkpoint(path, REGISTRY)
    write_checkpoint(path, mem, SECTIONS, BASIC)
    for mode in ("eager", "lazy"):
        with pytest.raises(CheckpointError, match="the memory file changed after the checkpoint was read"):
            restore_memory(ckpt, mode)


def test_wired_checkpoints_restore_eagerly_and_refuse_lazy(tmp_path):
    try:
        mem = GuestMemory("16M", wired=True, dirty_tracking="soft")
    except OSError as err:
        pytest.skip(f"cannot wire memory here: {err}")
    mem.write(8192, b"wired")
    write_checkpoint(tmp_path / "w.ckp", mem, SECTIONS, BASIC)
    ckpt = read_checkpoint(tmp_path / "w.ckp", REGISTRY)
    assert ckpt.wired and ckpt.basic["memflags"] == 2
    with pytest.raises(CheckpointError, match="a wired guest cannot be restored lazily"):
        restore_memory(ckpt, "lazy")
    restored = restore_memory(ckpt, "eager")
    assert restored.wired and restored.digest() == mem.digest()
    restored.close()
    mem.close()


# -- keyed checkpoints -------------------------------------------------------------------------

KEY = b"a checkpoint key of 32 bytes...."
V1_KEYS = {"format", "format_version", "byte_order", "writer", "basic metadata", "kern_structs", "devices", "sections",
           "kern", "memory", "meta_checksum"}


def test_an_unkeyed_checkpoint_is_still_format_version_1(checkpoint):
    """Unkeyed checkpoints keep the format every vmmpy wrote, so older readers still read them."""
    path, _ = checkpoint
    meta = json.loads(open(path + ".meta").read())
    assert meta["format_version"] == 1 and set(meta) == V1_KEYS
    assert set(meta["kern"]) == {"size", "checksum"} and "chunk_sha256" not in meta["memory"]


@pytest.mark.parametrize("mode", ["eager", "lazy"])
def test_a_keyed_checkpoint_round_trips_with_its_key(tmp_path, guest, mode):
    mem, _ = guest
    path = tmp_path / "k.ckp"
    stats = write_checkpoint(path, mem, SECTIONS, BASIC, key=KEY)
    assert stats["sha256_seconds"] > 0
    meta = json.loads(open(f"{path}.meta").read())
    assert meta["format_version"] == 2 and set(meta) == V1_KEYS | {"meta_mac"}
    assert len(meta["memory"]["chunk_sha256"]) == 5 * GIB // (4 << 20)
    ckpt = read_checkpoint(path, REGISTRY, key=KEY)
    assert ckpt.keyed and ckpt.sections == SECTIONS
    restored = restore_memory(ckpt, mode)
    try:
        assert restored.digest() == mem.digest()
    finally:
        restored.close()


def test_the_mac_is_hmac_sha256_of_the_canonical_metadata_as_documented(tmp_path, guest):
    """An independent check of docs/checkpoint-format.md: the label, then the canonical JSON of
    every field but meta_checksum and meta_mac."""
    import hashlib
    import hmac

    mem, _ = guest
    path = tmp_path / "k.ckp"
    write_checkpoint(path, mem, SECTIONS[:1], BASIC, key=KEY)
    meta = json.loads(open(f"{path}.meta").read())
    body = {k: v for k, v in meta.items() if k not in ("meta_checksum", "meta_mac")}
    canonical = json.dumps(body, sort_keys=True, separators=(",", ":")).encode()
    assert meta["meta_mac"] == hmac.new(KEY, b"vmmpy checkpoint metadata\x00" + canonical, hashlib.sha256).hexdigest()
    assert meta["kern"]["sha256"] == hashlib.sha256(open(f"{path}.kern", "rb").read()).hexdigest()
    with open(path, "rb") as f:
        assert meta["memory"]["chunk_sha256"][0] == hashlib.sha256(f.read(4 << 20)).hexdigest()


def test_a_short_key_writes_nothing(tmp_path, guest):
    mem, _ = guest
    with pytest.raises(CheckpointError, match="a checkpoint key needs at least 16 bytes, this has 5"):
        write_checkpoint(tmp_path / "k.ckp", mem, SECTIONS, BASIC, key=b"short")
    assert names(tmp_path) == []

