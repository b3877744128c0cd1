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


def host_offers_huge_pages() -> bool:
    """Whether this host gives transparent huge pages to memory that asks for them (``always`` or
    ``madvise``, the rule the memory core follows): then wiring, a destination's population and
    its receiver put whole 2 MiB regions on them (docs/memory.md)."""
    try:
        with open("/sys/kernel/mm/transparent_hugepage/enabled") as f:
            enabled = f.read()
    except OSError:
        return False
    return "[always]" in enabled or "[madvise]" in enabled
