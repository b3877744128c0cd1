"""Free page reporting: a VM's kernel hands pages it has freed back to its hypervisor
(virtio-balloon's free page reporting), which drops them. The next process to allocate that memory
then pays the hypervisor's fault on every page it touches first. On the 2-vCPU VMs these figures
come from, that made a 1 GiB warm migration take 1.3-2.0 s instead of 0.3 s, QEMU's and vmmpy's
alike, whenever the memory it was given had been freed a few seconds earlier: the runs were
bimodal for reasons of the host, not of either program (docs/performance.md, session 30).

The bench reports how much memory went back to the hypervisor during its run, and with
``--hold-host-memory`` turns reporting off for the run (the kernel's ``page_reporting_order`` past
the largest page order) and back on at the end. Memory reported before that stays with the
hypervisor, so the hold then touches as much memory as the selected rows take at once, holds it
all, and frees it: the runs are given pages the hypervisor backs. Reading needs nothing; writing
needs root.

The memory is held until the last piece is touched. A piece freed before the next is touched
goes back to the head of the free lists, so the next piece is given the same pages again: until
session 33 the hold touched 6 GiB that way, and backed only the 256 MiB it reused (on this VM,
touching a GiB the hypervisor had taken costs 3.2 s; 40 pieces held at once paid it from the
sixteenth on, 40 freed one by one never did).
"""

from __future__ import annotations

import errno
import mmap
import sys
import time
from pathlib import Path

PARAMETERS = Path("/sys/module/page_reporting/parameters")
#: Memory the hold touches and frees when no rows say what they take (see
#: ``scenarios.touches``): more than a 1 GiB row's source, destination and image take at once.
BACK_BYTES = 6 << 30
#: Touched a piece at a time (one mapping each), all held until the last is touched.
BACK_PIECE = 256 << 20
#: Left to the rest of the machine while the hold holds the most it takes.
BACK_SPARE = 2 << 30

#: Past the largest order the buddy allocator has (10 on x86-64): no free block is that large, so
#: nothing is reported. Mainline Linux bounds the parameter at that largest order and refuses it
#: (the bench then stops, saying so); the Firecracker guest kernels measured here take it.
OFF_ORDER = 11


def _read_int(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def state(parameters: Path = PARAMETERS) -> dict | None:
    """``{"order": ..., "reported_kib": ...}`` (``reported_kib`` None where the kernel does not
    count: mainline Linux does not, the Firecracker guest kernels measured here do), or None where
    this kernel reports no free pages to a hypervisor."""
    order = _read_int(parameters / "page_reporting_order")
    if order is None:
        return None
    return {"order": order, "reported_kib": _read_int(parameters / "reported_kib")}


class Reporting:
    """The bench's view of free page reporting over one run: what it was at the start, whether
    the run held it off, and how much memory was reported during the run."""

    def __init__(self, parameters: Path = PARAMETERS, back_bytes: int = BACK_BYTES, available=None) -> None:
        self.parameters = parameters
        self.back_bytes = back_bytes
        self.available = available or available_now
        self.before = state(parameters)
        self.held = False
        self.backed: dict | None = None

    def hold(self) -> None:
        """Turn reporting off until :meth:`release`. Raises SystemExit with the reason where it
        cannot: no page reporting here, not root, or a kernel that refuses the order."""
        if self.before is None:
            raise SystemExit("--hold-host-memory: this kernel reports no free pages to a hypervisor "
                             f"({self.parameters} is missing); nothing to hold")
        try:
            (self.parameters / "page_reporting_order").write_text(f"{OFF_ORDER}\n")
        except OSError as err:
            raise SystemExit(f"--hold-host-memory: cannot set {self.parameters / 'page_reporting_order'} "
                             f"to {OFF_ORDER}: {err.strerror or err} (it needs root, and a kernel that takes an order "
                             "past the largest: mainline Linux refuses one)") from None
        self.held = True
        self.backed = back(self.back_bytes, available=self.available)

    def release(self) -> None:
        """Give the order back as it was; idempotent. A failure is printed, not raised: it must
        not stop the rest of the bench's cleanup."""
        if self.held and self.before is not None:
            self.held = False
            try:
                (self.parameters / "page_reporting_order").write_text(f"{self.before['order']}\n")
            except OSError as err:
                print(f"bench: could not give {self.parameters / 'page_reporting_order'} back its {self.before['order']}: "
                      f"{err.strerror or err}", file=sys.stderr, flush=True)

    def report(self) -> dict | None:
        """What the run's report records: None where there is no page reporting."""
        if self.before is None:
            return None
        now = state(self.parameters)
        reported = None
        if now is not None and now["reported_kib"] is not None and self.before["reported_kib"] is not None:
            reported = round((now["reported_kib"] - self.before["reported_kib"]) / 1024)
        return {"order": self.before["order"], "held": self.held, "reported_mib": reported, "backed": self.backed}


#: ``madvise(MADV_POPULATE_WRITE)`` (Linux 5.14), which Python 3.11's mmap does not name: it
#: populates a mapping as writes would and fails with ENOMEM where ``MAP_POPULATE`` would say
#: nothing.
MADV_POPULATE_WRITE = 23


def available_now(meminfo: Path = Path("/proc/meminfo"), cgroup: Path = Path("/sys/fs/cgroup")) -> int:
    """Bytes this process may still take: the kernel's ``MemAvailable``, or less where its cgroup
    has a memory limit closer (``memory.max`` less ``memory.current``)."""
    available = 0
    with open(meminfo) as f:
        for line in f:
            if line.startswith("MemAvailable:"):
                available = int(line.split()[1]) * 1024
                break
    try:
        limit = (cgroup / "memory.max").read_text().strip()
        if limit != "max":
            available = min(available, int(limit) - int((cgroup / "memory.current").read_text()))
    except (OSError, ValueError):
        pass
    return max(0, available)


def _touch(length: int) -> mmap.mmap:
    """A private anonymous mapping of ``length`` bytes, every page written in; OSError where the
    kernel cannot give them."""
    m = mmap.mmap(-1, length, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    try:
        m.madvise(MADV_POPULATE_WRITE)
    except OSError as err:
        if err.errno != errno.EINVAL:  # EINVAL: a kernel before 5.14; write a byte a page instead
            m.close()
            raise
        for at in range(0, length, mmap.PAGESIZE):
            m[at] = 1
    return m


def back(total: int = BACK_BYTES, piece: int = BACK_PIECE, available=available_now) -> dict:
    """Touch up to ``total`` bytes a piece at a time, holding every piece until the last is
    touched, then free them all: with reporting held, the pages the runs are given next are ones
    the hypervisor backs. Before each piece ``available()`` is asked again, and the hold stops
    where the piece would leave less than ``BACK_SPARE`` (other processes allocate meanwhile),
    or where the kernel refuses a piece. Returns the bytes asked for and touched and the seconds
    it took (about 3 s a GiB where the hypervisor had taken it, a tenth of that where it had
    not)."""
    total = max(0, total) // mmap.PAGESIZE * mmap.PAGESIZE
    started = time.monotonic()
    held: list[mmap.mmap] = []
    touched = 0
    stopped = None
    try:
        while touched < total:
            length = min(piece, total - touched)
            if available() - length < BACK_SPARE:
                stopped = "spare"
                break
            try:
                held.append(_touch(length))
            except OSError as err:
                stopped = f"refused: {err.strerror or err}"
                break
            touched += length
    finally:
        for m in held:
            m.close()
    return {"bytes": touched, "asked": total, "seconds": round(time.monotonic() - started, 2), "stopped": stopped}


def _why_short(stopped: str | None) -> str:
    """Why a hold touched less than it asked, from the ``stopped`` :func:`back` records."""
    if stopped == "spare":
        return f"it leaves {BACK_SPARE >> 30} GiB of what is available to the rest of the machine"
    if stopped:
        return f"the kernel {stopped.replace(':', ' a piece:', 1)}"
    return "why is not recorded"


def text(report: dict | None) -> str:
    """The table's line about it, or "" where there is no page reporting."""
    if not report:
        return ""
    if report["held"]:
        backed = report.get("backed") or {}
        why = _why_short(backed.get("stopped"))
        short = (f" of the {backed['asked'] >> 20} MiB asked ({why})"
                 if backed.get("asked", backed.get("bytes", 0)) > backed.get("bytes", 0) else "")
        how = (f"; {backed['bytes'] >> 20} MiB{short} touched and freed first, in {backed['seconds']:g} s"
               if backed.get("bytes") else f"; nothing touched first ({why})" if backed.get("asked") else "")
        leaked = (f"; yet {report['reported_mib']} MiB went back to the hypervisor during the run (the kernel did not "
                  "hold it)" if report["reported_mib"] else "")
        return f"HOST MEMORY: free page reporting held off for the run (--hold-host-memory){how}{leaked}"
    if report["reported_mib"] is None:
        return ("HOST MEMORY: this VM returns freed memory to its hypervisor (free page reporting); a run that "
                "touches such memory again pays the hypervisor's faults (--hold-host-memory holds it off)")
    if report["reported_mib"] == 0:
        return ""
    return (f"HOST MEMORY: {report['reported_mib']} MiB went back to the hypervisor during the run (free page "
            "reporting); a run that touched it again paid the hypervisor's faults (--hold-host-memory holds it off)")
