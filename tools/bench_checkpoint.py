#!/usr/bin/env python3
"""Checkpoint file figures beside this machine's limits, measured in the same run.

Save: a 1 GiB guest full of random bytes written as a checkpoint (the memory file's sparse
write with O_DIRECT where allowed, chunk hashes, .kern, .meta, fsync of everything) to a disk
directory and to tmpfs; the
limits are a 1 GiB O_DIRECT write to the same disk (aligned mmap buffer) and, for tmpfs, a
single-thread memcpy.

Restore: eager (read the data extents, verify every chunk hash) and lazy (read nothing until a
chunk is used, then read and verify that chunk) for 1, 4 and 16 GiB guests. The 1 GiB guest is
all random data; the 4 and 16 GiB guests are mostly never touched (sparse) with 256 MiB of
random data spread over lowmem and highmem, so the run stays within a couple of minutes and a
few GiB of disk. Eager restore of 1 GiB is shown from the page cache (the preadv floor just read
the file) and cold (the file's pages evicted with posix_fadvise(DONTNEED)), beside the memcpy
and O_DIRECT read limits and the time to preadv the file into a fresh anonymous mapping
(first-touch page faults, which dominate in a VM); lazy restore beside the claim that it does
not depend on guest size, with the time to load and verify every chunk afterwards.

Usage: tools/bench_checkpoint.py [--dir DISK_DIR] [--tmpfs DIR] [--json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import statistics
import sys
import tempfile
import time

import numpy as np

from vmmpy import GuestMemory
from vmmpy.memory import HIGHMEM_BASE
from vmmpy.snapshot import read_checkpoint, restore_memory, verify_memory, write_checkpoint
from vmmpy.state import Section, SectionRegistry

MIB, GIB = 1 << 20, 1 << 30
SECTIONS = [Section("vm", 1, {"tsc": 1}), Section("uart@lpc.com1", 1, {"lcr": 3})]
REGISTRY = SectionRegistry({"vm": 1, "uart": 1})
BASIC = {"ncpus": 1, "vmname": "bench"}


def gbps(nbytes: int, seconds: float) -> float:
    return nbytes / seconds / 1e9 if seconds > 0 else float("inf")


def odirect_bandwidth(directory: str, total: int = GIB, block: int = 8 * MIB) -> dict[str, float]:
    """Write then read `total` bytes with O_DIRECT from an aligned (mmap) buffer."""
    buf = mmap.mmap(-1, block)
    buf.write(os.urandom(block))
    path = os.path.join(directory, f".odirect-{os.getpid()}")
    out = {}
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        started = time.perf_counter()
        for _ in range(total // block):
            os.write(fd, buf)
        os.fsync(fd)
        out["odirect_write_gbps"] = gbps(total, time.perf_counter() - started)
    finally:
        os.close(fd)
    fd = os.open(path, os.O_RDONLY | os.O_DIRECT)
    try:
        started = time.perf_counter()
        for _ in range(total // block):
            os.readv(fd, [buf])
        out["odirect_read_gbps"] = gbps(total, time.perf_counter() - started)
    finally:
        os.close(fd)
        os.unlink(path)
    return out


def memcpy_bandwidth(size: int = 256 * MIB) -> float:
    src = np.random.default_rng(1).integers(0, 255, size, dtype=np.uint8)
    dst = np.empty_like(src)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        np.copyto(dst, src)
        best = min(best, time.perf_counter() - started)
    return gbps(size, best)


def random_guest(memsize: int, data_bytes: int, seed: int) -> GuestMemory:
    """A guest with `data_bytes` of random data in 4 MiB pieces spread evenly over its memory."""
    mem = GuestMemory(memsize, dirty_tracking="soft")
    rng = np.random.default_rng(seed)
    piece = 4 * MIB
    pieces = data_bytes // piece
    stride = memsize // pieces
    for i in range(pieces):
        offset = i * stride
        gpa = offset if offset < mem.lowmem.size else HIGHMEM_BASE + offset - mem.lowmem.size
        mem.write(gpa, rng.integers(0, 256, piece, dtype=np.uint8))
    return mem


def fresh_preadv(path: str) -> float:
    """The floor for an eager restore here: read the file into a fresh anonymous mapping (every
    page faulted in for the first time, as fresh guest memory is)."""
    size = os.stat(path).st_size
    buf = mmap.mmap(-1, size)
    fd = os.open(path, os.O_RDONLY)
    try:
        started = time.perf_counter()
        os.preadv(fd, [buf], 0)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        buf.close()


def evict(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def timed(f):
    started = time.perf_counter()
    result = f()
    return result, time.perf_counter() - started


def run(disk_dir: str, tmpfs_dir: str) -> dict:
    results: dict = {"disk_dir": disk_dir, "tmpfs_dir": tmpfs_dir}
    results.update(odirect_bandwidth(disk_dir))
    results["memcpy_gbps"] = memcpy_bandwidth()

    work_disk = tempfile.mkdtemp(prefix="bench-ckp-", dir=disk_dir)
    work_tmpfs = tempfile.mkdtemp(prefix="bench-ckp-", dir=tmpfs_dir)
    try:
        mem = random_guest(GIB, GIB, seed=1)
        for where, directory in (("disk", work_disk), ("tmpfs", work_tmpfs)):
            path = os.path.join(directory, "g1.ckp")
            stats, seconds = timed(lambda: write_checkpoint(path, mem, SECTIONS, BASIC))
            results[f"save_1g_{where}_gbps"] = gbps(stats["bytes_written"], seconds)
            results[f"save_1g_{where}_memfile_write_s"] = stats["seconds"]
            results[f"save_1g_{where}_fsync_s"] = stats["memory_fsync_seconds"]
            results[f"save_1g_{where}_s"] = seconds
        digest = mem.digest()
        mem.close()

        restore = {}
        guests = {1: os.path.join(work_disk, "g1.ckp")}
        for gib, seed in ((4, 2), (16, 3)):
            big = random_guest(gib * GIB, 256 * MIB, seed)
            guests[gib] = os.path.join(work_disk, f"g{gib}.ckp")
            write_checkpoint(guests[gib], big, SECTIONS, BASIC)
            big.close()
        for gib, path in guests.items():
            ckpt, read_s = timed(lambda: read_checkpoint(path, REGISTRY))
            row = {"read_checkpoint_s": read_s, "data_bytes": os.stat(path).st_blocks * 512}
            if gib == 1:
                row["fresh_preadv_s"] = fresh_preadv(path)
            eager, row["eager_warm_s"] = timed(lambda: restore_memory(ckpt, "eager"))
            if gib == 1:
                row["eager_digest_ok"] = eager.digest() == digest
            eager.close()
            if gib == 1:
                evict(path)
                eager, row["eager_cold_s"] = timed(lambda: restore_memory(ckpt, "eager"))
                eager.close()
            lazy_times, first_chunk, load_all = [], [], []
            for _ in range(5):
                # keep: the runs after the first load from the page cache, as they did before
                # restores dropped a file they read from the disk (docs/checkpoint-format.md)
                lazy, seconds = timed(lambda: restore_memory(ckpt, "lazy", page_cache="keep"))
                lazy_times.append(seconds)
                row["lazy_mapped_pages_after_restore"] = lazy.mapped_pages()
                first_chunk.append(timed(lambda: lazy.read(0, 8))[1])  # loads and verifies chunk 0
                load_all.append(timed(lazy.load_all)[1])
                lazy.close()
                lazy = None  # unmap now, not inside the next restore's timing
            row["lazy_s"], row["lazy_first_chunk_s"], row["lazy_load_all_s"] = map(statistics.median, (lazy_times, first_chunk, load_all))
            _, row["verify_memory_s"] = timed(lambda: verify_memory(ckpt))
            restore[f"{gib}g"] = row
        results["restore"] = restore
    finally:
        shutil.rmtree(work_disk, ignore_errors=True)
        shutil.rmtree(work_tmpfs, ignore_errors=True)
    return results


def print_table(r: dict) -> None:
    print(f"disk: {r['disk_dir']}   tmpfs: {r['tmpfs_dir']}")
    print(f"{'figure':48} {'measured':>14} {'limit (same run)':>28}")
    odw, odr, mc = r["odirect_write_gbps"], r["odirect_read_gbps"], r["memcpy_gbps"]
    print(f"{'save 1 GiB random -> disk (incl. fsync)':48} {r['save_1g_disk_gbps']:>9.2f} GB/s {f'O_DIRECT write {odw:.2f} GB/s':>28}")
    print(f"{'  of which memory file write / fsync':48} {r['save_1g_disk_memfile_write_s']:>6.2f}s/{r['save_1g_disk_fsync_s']:.2f}s")
    print(f"{'save 1 GiB random -> tmpfs':48} {r['save_1g_tmpfs_gbps']:>9.2f} GB/s {f'memcpy {mc:.2f} GB/s':>28}")
    for name, row in r["restore"].items():
        data = row["data_bytes"]
        limit_warm = data / (mc * 1e9)
        source = "page cache" if "fresh_preadv_s" in row else "disk, written O_DIRECT"
        print(f"{f'eager restore {name} ({data / GIB:.2f} GiB data, {source})':48} {row['eager_warm_s'] * 1e3:>11.1f} ms {f'memcpy of the data {limit_warm * 1e3:.1f} ms':>28}")
        if "fresh_preadv_s" in row:
            floor = f"preadv into fresh mmap {row['fresh_preadv_s'] * 1e3:.0f} ms"
            print(f"{'':48} {'':>14} {floor:>28}")
        if "eager_cold_s" in row:
            limit_cold = data / (odr * 1e9)
            print(f"{f'eager restore {name} (cold, from disk)':48} {row['eager_cold_s'] * 1e3:>11.1f} ms {f'O_DIRECT read {limit_cold * 1e3:.1f} ms':>28}")
        print(f"{f'lazy restore {name} (median of 5)':48} {row['lazy_s'] * 1e3:>11.2f} ms {'independent of size':>28}")
        print(f"{'  then first read: load + verify chunk 0':48} {row['lazy_first_chunk_s'] * 1e3:>11.2f} ms")
        print(f"{'  then load + verify every other chunk':48} {row['lazy_load_all_s'] * 1e3:>11.1f} ms")
        print(f"{f'  verify_memory {name} (reads the data)':48} {row['verify_memory_s'] * 1e3:>11.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure (not tmpfs)")
    parser.add_argument("--tmpfs", default="/dev/shm", help="a tmpfs directory")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.dir, args.tmpfs)
    if args.json:
        json.dump(results, sys.stdout, indent=1)
        print()
    else:
        print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
