"""The main job: show what vmmpy does end to end on this machine.

Each stage prints what it did and the figures it measured. Stages are added as features land.
"""

from __future__ import annotations

import time

import numpy as np

import vmmpy
from vmmpy.units import format_size


def memory_stage() -> None:
    mem = vmmpy.GuestMemory("5G")
    print(f"guest memory: {mem!r}")
    if mem.dirty_tracking_fallback:
        print(f"  kernel dirty tracking unavailable ({mem.dirty_tracking_fallback}); using the soft bitmap")
    rng = np.random.default_rng(7)
    pages = rng.choice(mem.lowmem.pages, size=10_000, replace=False)
    t0 = time.perf_counter()
    for pfn in pages:
        mem.write(int(pfn) * vmmpy.PAGE_SIZE, b"dirty")
    t1 = time.perf_counter()
    harvested = mem.get_and_clear_dirty()
    t2 = time.perf_counter()
    assert np.array_equal(harvested, np.sort(pages)), "harvest must report exactly the written pages"
    print(f"  wrote {len(pages)} pages in {t1 - t0:.3f}s; harvest of {format_size(mem.memsize)} found "
          f"{harvested.size} dirty pages in {(t2 - t1) * 1e3:.2f} ms ({mem.dirty_tracking} backend)")
    print(f"  resident: {format_size(mem.resident_pages() * vmmpy.PAGE_SIZE)} of {format_size(mem.memsize)}")


def main() -> int:
    memory_stage()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
