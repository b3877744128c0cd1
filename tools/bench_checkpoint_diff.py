#!/usr/bin/env python3
"""Diff checkpoint figures beside this machine's limit, measured in the same run.

A 4 GiB guest (256 MiB of random data spread over lowmem and highmem, the rest never touched)
is checkpointed whole; then a few MiB of it are rewritten, scattered in 64 KiB pieces, and a
diff checkpoint writes only those pages (memory file with O_DIRECT where allowed, chunk hashes
of the written file, .kern, .meta, fsync of everything). Beside it: an O_DIRECT write of the same
number of bytes to the same directory from an aligned buffer, in 8 MiB blocks, with fsync. The
best of three runs of each.

Usage: tools/bench_checkpoint_diff.py [--dir DIR] [--mib N ...] [--json]
"""

from __future__ import annotations

import argparse
import json
import mmap
import os
import shutil
import sys
import tempfile
import time

import numpy as np

from vmmpy.memory import HIGHMEM_BASE
from vmmpy.snapshot import write_checkpoint
from vmmpy.snapshot.files import DiffParent

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_checkpoint import BASIC, GIB, MIB, SECTIONS, random_guest


def odirect_write(directory: str, size: int) -> float:
    """Seconds to write ``size`` bytes (a page multiple) with O_DIRECT in 8 MiB blocks and fsync."""
    buf = mmap.mmap(-1, size)
    buf.write(os.urandom(size))
    path = os.path.join(directory, f".odirect-{os.getpid()}")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_DIRECT, 0o600)
    try:
        view = memoryview(buf)
        started = time.perf_counter()
        offset = 0
        while offset < size:
            offset += os.write(fd, view[offset : offset + 8 * MIB])
        os.fsync(fd)
        return time.perf_counter() - started
    finally:
        os.close(fd)
        os.unlink(path)
        view.release()
        buf.close()


def in_scratch_dir(base: str | None, prefix: str, measure) -> list[dict]:
    """``measure(directory)`` in a fresh directory under ``base`` (default: here), removed after."""
    directory = tempfile.mkdtemp(prefix=prefix, dir=base or os.getcwd())
    try:
        return measure(directory)
    finally:
        shutil.rmtree(directory, ignore_errors=True)


def run(directory: str, sizes: list[int]) -> list[dict]:
    mem = random_guest(4 * GIB, 256 * MIB, seed=7)
    rng = np.random.default_rng(8)
    rows = []
    try:
        base = os.path.join(directory, "full")
        stats = write_checkpoint(base, mem, SECTIONS, BASIC)
        mem.start_checkpoint_log((base, stats["meta_sha256"]))
        for mib in sizes:
            best_diff = best_limit = float("inf")
            for attempt in range(3):
                piece = 64 << 10
                for _ in range(mib * MIB // piece):  # scattered over all of memory
                    offset = int(rng.integers(0, mem.memsize // piece)) * piece
                    gpa = offset if offset < mem.lowmem.size else HIGHMEM_BASE + offset - mem.lowmem.size
                    mem.write(gpa, rng.integers(0, 256, piece, dtype=np.uint8))
                pages = mem.checkpoint_log_pages()
                path = os.path.join(directory, f"d{mib}-{attempt}")
                started = time.perf_counter()
                stats = write_checkpoint(path, mem, SECTIONS, BASIC, parent=DiffParent(base, mem.checkpoint_log_base[1], pages))
                best_diff = min(best_diff, time.perf_counter() - started)
                mem.start_checkpoint_log(mem.checkpoint_log_base)
                written = stats["bytes_written"]
                best_limit = min(best_limit, odirect_write(directory, written))
                for suffix in ("", ".kern", ".meta"):
                    os.unlink(path + suffix)
            rows.append({"dirtied_mib": mib, "bytes_written": written, "diff_s": best_diff, "odirect_write_s": best_limit,
                         "ratio": best_diff / best_limit})
    finally:
        mem.close()
    return rows


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--dir", default=None, help="a directory on the disk to measure (default: a temporary one here)")
    parser.add_argument("--mib", type=int, nargs="+", default=[4, 64], help="MiB rewritten between checkpoints (default 4 64)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args(argv)
    rows = in_scratch_dir(args.dir, "bench-diff-", lambda directory: run(directory, args.mib))
    if args.json:
        print(json.dumps(rows, indent=1))
        return 0
    for r in rows:
        print(f"diff checkpoint, 4 GiB guest, {r['dirtied_mib']} MiB rewritten: {r['diff_s'] * 1e3:8.1f} ms "
              f"(O_DIRECT write of the same {r['bytes_written'] / MIB:.0f} MiB {r['odirect_write_s'] * 1e3:.1f} ms, "
              f"ratio {r['ratio']:.2f})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
