#!/usr/bin/env python3
"""What a checkpoint key costs: keyed against unkeyed save and restore, beside SHA-256's speed.

A keyed checkpoint records SHA-256 of every memory chunk (hashing the guest's data pages while
it is paused), and every restore of it reads the file once more to check them (docs/checkpoint-format.md,
"Checksums and the key"). This measures, in one run: a 1 GiB guest full of random bytes and a
4 GiB guest with 256 MiB of data (the rest never touched, so the file is mostly holes) saved
unkeyed and keyed to a disk directory, then restored eagerly and lazily from the page cache; and
the limit, SHA-256 of 256 MiB in memory on this machine (one thread).

Usage: tools/bench_checkpoint_key.py [--dir DISK_DIR] [--json]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
import tempfile
import time

from bench_checkpoint import BASIC, GIB, MIB, REGISTRY, SECTIONS, gbps, random_guest, timed

from vmmpy.snapshot import read_checkpoint, restore_memory, write_checkpoint

KEY = b"bench-checkpoint-key-0123456789ab"


def sha256_gbps(size: int = 256 * MIB) -> float:
    data = os.urandom(size)
    best = float("inf")
    for _ in range(3):
        started = time.perf_counter()
        hashlib.sha256(data).digest()
        best = min(best, time.perf_counter() - started)
    return gbps(size, best)


def warm(path: str) -> None:
    """Read the file once, so both restores start from the page cache."""
    with open(path, "rb", buffering=0) as f:
        while f.read(8 * MIB):
            pass


def run(disk_dir: str) -> dict:
    results: dict = {"disk_dir": disk_dir, "sha256_gbps": sha256_gbps(), "guests": {}}
    work = tempfile.mkdtemp(prefix="bench-ckp-key-", dir=disk_dir)
    try:
        for name, memsize, data in (("1g-full", GIB, GIB), ("4g-sparse", 4 * GIB, 256 * MIB)):
            mem = random_guest(memsize, data, seed=7)
            row: dict = {"data_bytes": data}
            for keyed in (False, True):
                tag = "keyed" if keyed else "unkeyed"
                path = os.path.join(work, f"{name}-{tag}.ckp")
                key = KEY if keyed else None
                stats, row[f"save_{tag}_s"] = timed(lambda: write_checkpoint(path, mem, SECTIONS, BASIC, key=key))
                row[f"save_{tag}_sha256_s"] = stats["sha256_seconds"]
                ckpt = read_checkpoint(path, REGISTRY, key=key)
                warm(path)
                for mode in ("eager", "lazy"):
                    restored, row[f"restore_{mode}_{tag}_s"] = timed(lambda: restore_memory(ckpt, mode))
                    restored.close()
            mem.close()
            results["guests"][name] = row
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return results


def print_table(r: dict) -> None:
    print(f"disk: {r['disk_dir']}   limit: SHA-256 of 256 MiB in memory, one thread: {r['sha256_gbps']:.2f} GB/s")
    print(f"{'guest':12} {'step':26} {'unkeyed':>10} {'keyed':>10} {'of which SHA-256':>18}")
    for name, row in r["guests"].items():
        print(f"{name:12} {'save (guest paused)':26} {row['save_unkeyed_s'] * 1e3:>7.0f} ms {row['save_keyed_s'] * 1e3:>7.0f} ms "
              f"{row['save_keyed_sha256_s'] * 1e3:>15.0f} ms")
        for mode in ("eager", "lazy"):
            print(f"{'':12} {f'restore {mode} (page cache)':26} {row[f'restore_{mode}_unkeyed_s'] * 1e3:>7.1f} ms "
                  f"{row[f'restore_{mode}_keyed_s'] * 1e3:>7.1f} ms")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--dir", default="/var/tmp", help="a directory on the disk to measure (not tmpfs)")
    parser.add_argument("--json", action="store_true", help="print the figures as JSON")
    args = parser.parse_args(argv)
    results = run(args.dir)
    print(json.dumps(results, indent=1)) if args.json else print_table(results)
    return 0


if __name__ == "__main__":
    sys.exit(main())
