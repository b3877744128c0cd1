"""What the kernel says about this process's own mappings: /proc/self/smaps, and whether the
host offers transparent huge pages at all."""

from __future__ import annotations


def smaps_kib(address: int, field: str) -> int:
    """``field`` (AnonHugePages, Locked, ...) of the mapping holding ``address``, in KiB, from
    /proc/self/smaps."""
    inside = False
    with open("/proc/self/smaps") as smaps:
        for line in smaps:
            head = line.split()[0]
            if "-" in head and not head.endswith(":"):
                start, end = (int(x, 16) for x in head.split("-"))
                inside = start <= address < end
            elif inside and head == f"{field}:":
                return int(line.split()[1])
    raise AssertionError(f"no mapping holds {address:#x}")


def thp_offered() -> bool:
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            return "[never]" not in f.read()
    except OSError:
        return False
