"""A fake guest for migration and checkpoint tests: real guest memory and a writer thread, behind the guest handle.

The writer is QEMU's migration-test guest made stronger: it sweeps a work area page by page, and
in sweep ``s`` (from 1) it rewrites every page whole: word 0 is the page's counter ``s``, every
other word a pattern of the counter, the page frame number and the word index. So memory after
``sweeps`` complete sweeps with the writer at ``position`` in the next one is known exactly:
pages below ``position`` hold ``sweeps + 1``, the rest ``sweeps`` (0 = never written = zeros).
A lost, stale, torn or misplaced page breaks that. The writer's (sweeps, position) travel as
state sections, so the destination's writer carries on the same sweep.
"""

from __future__ import annotations

import threading
import time

import numpy as np

from vmmpy import PAGE_SIZE, GuestMemory
from vmmpy.migration import spec_mismatches
from vmmpy.state import Section
from vmmpy.state.handle import LoadAtEnd

from .memory_image import MemoryImage

WORDS = PAGE_SIZE // 8
_MIX = np.uint64(0x9E3779B97F4A7C15)


def page_pattern(pfns: np.ndarray, counters: np.ndarray) -> np.ndarray:
    """The bytes of pages ``pfns`` holding ``counters`` (counter 0 = a zero page)."""
    pfns = pfns.astype(np.uint64)
    counters = counters.astype(np.uint64)
    words = (counters[:, None] * _MIX) ^ ((pfns[:, None] << np.uint64(16)) | np.arange(WORDS, dtype=np.uint64)[None, :])
    words[:, 0] = counters
    words[counters == 0] = 0
    return words.view(np.uint8).reshape(-1)


def _check_fake_sections(sections: list[Section], what: str) -> None:
    missing = {"cpu0", "fakeguest"} - {s.name for s in sections}
    if missing:
        raise ValueError(f"{what}: state lacks sections {sorted(missing)}")


class FakeGuest:
    """Implements ``vmmpy.state.handle.GuestHandle``."""

    def __init__(self, memsize="64M", *, work_gpa: int = 1 << 20, work_pages: int = 2048, rate: float | None = None,
                 chunk_pages: int = 64, wired: bool = False, vendor: str = "intel", vcpus: int = 1,
                 devices: dict[str, int] | None = None, dirty_tracking: str = "soft", running: bool = True, page_size: int = PAGE_SIZE) -> None:
        self.memory = GuestMemory(memsize, wired=wired, dirty_tracking=dirty_tracking)
        self.work_gpa = work_gpa
        self.work_pages = work_pages
        self.rate = rate  # pages/s, None = as fast as it goes
        self.chunk_pages = chunk_pages
        self.vendor = vendor
        self.page_size = page_size  # what spec() claims: lets a test fake a host with other pages
        self.vcpus = vcpus
        self.devices = dict(devices if devices is not None else {"cpu0": 1, "fakeguest": 1})
        self.sweeps = 0
        self.position = 0
        self.throttle_fraction = 0.0
        self.throttle_history: list[float] = []
        self.calls: list[str] = []
        self.digest_at_pause: int | None = None
        self.state_at_pause: tuple[int, int] | None = None
        self.digest_at_resume: int | None = None
        self.digest_at_start: int | None = None
        self.state_at_start: tuple[int, int] | None = None
        self.memory_at_start: MemoryImage | None = None  # a copy of every resident page, for the byte check
        self.discarded = False
        self.stopped = False
        self.stop_reason = ""
        self._cond = threading.Condition()
        self._running = running
        self._parked = not running
        self._exit = False
        self._writer = threading.Thread(target=self._write_loop, name="fake-guest-writer", daemon=True)
        self._writer.start()

    # -- the writer ------------------------------------------------------------------------------
    def _write_loop(self) -> None:
        while True:
            with self._cond:
                while not self._running and not self._exit:
                    self._parked = True
                    self._cond.notify_all()
                    self._cond.wait()
                if self._exit:
                    self._parked = True
                    self._cond.notify_all()
                    return
                self._parked = False
            start = time.monotonic()
            n = min(self.chunk_pages, self.work_pages - self.position)
            first = self.work_gpa // PAGE_SIZE + self.position
            pfns = np.arange(first, first + n, dtype=np.uint64)
            self.memory.write(first * PAGE_SIZE, page_pattern(pfns, np.full(n, self.sweeps + 1, dtype=np.uint64)))
            self.position += n
            if self.position == self.work_pages:
                self.sweeps += 1
                self.position = 0
            busy = (n / self.rate) if self.rate else (time.monotonic() - start)
            f = self.throttle_fraction
            pause_until = start + busy / (1.0 - f)
            delay = pause_until - time.monotonic()
            if delay > 0:
                time.sleep(delay)

    def progress(self) -> int:
        """Pages written so far: grows while the guest runs."""
        return self.sweeps * self.work_pages + self.position

    def wait_for_progress(self, pages: int, timeout: float = 10.0) -> None:
        target = self.progress() + pages
        deadline = time.monotonic() + timeout
        while self.progress() < target:
            if time.monotonic() > deadline:
                raise AssertionError(f"guest writer made no progress to {target} pages in {timeout} s (at {self.progress()})")
            time.sleep(0.002)

    def _park(self) -> None:
        with self._cond:
            self._running = False
            if not self._cond.wait_for(lambda: self._parked, timeout=10):
                raise RuntimeError("fake guest writer did not stop within 10 s")

    def _unpark(self) -> None:
        with self._cond:
            self._running = True
            self._cond.notify_all()

    @property
    def running(self) -> bool:
        return self._running

    # -- the oracle ------------------------------------------------------------------------------
    def expected_counters(self, sweeps: int | None = None, position: int | None = None) -> np.ndarray:
        sweeps = self.sweeps if sweeps is None else sweeps
        position = self.position if position is None else position
        out = np.full(self.work_pages, sweeps, dtype=np.uint64)
        out[:position] = sweeps + 1
        return out

    def counters(self) -> np.ndarray:
        raw = np.frombuffer(self.memory.read(self.work_gpa, self.work_pages * PAGE_SIZE), dtype="<u8")
        return raw.reshape(self.work_pages, WORDS)[:, 0].copy()

    def bad_pages(self, sweeps: int | None = None, position: int | None = None) -> list[str]:
        """Pages whose bytes differ from what (sweeps, position) says, first ten, described."""
        expected = self.expected_counters(sweeps, position)
        first = self.work_gpa // PAGE_SIZE
        want = page_pattern(np.arange(first, first + self.work_pages, dtype=np.uint64), expected)
        have = np.frombuffer(self.memory.read(self.work_gpa, self.work_pages * PAGE_SIZE), dtype=np.uint8)
        diff = np.nonzero((want != have).reshape(self.work_pages, PAGE_SIZE).any(axis=1))[0]
        counters = self.counters()
        return [f"page {i} (gpa {(first + i) * PAGE_SIZE:#x}): counter {counters[i]}, expected {expected[i]}" for i in diff[:10]]

    # -- the guest handle--------------------------------------------------------------------------
    def spec(self) -> dict:
        lowmem = self.memory.lowmem.size
        highmem = self.memory.highmem.size if self.memory.highmem is not None else 0
        return {"page_size": self.page_size, "vendor": self.vendor, "vcpus": self.vcpus, "tsc": "instructions", "lowmem_size": lowmem,
                "highmem_size": highmem, "wired": self.memory.wired, "devices": dict(self.devices)}

    def check_spec(self, remote_spec: dict) -> None:
        problems = spec_mismatches(self.spec(), remote_spec)
        if problems:
            raise ValueError("; ".join(problems))

    def pause(self) -> float:
        self.calls.append("pause")
        started = time.monotonic()
        self._park()
        self.digest_at_pause = self.memory.digest()
        self.state_at_pause = (self.sweeps, self.position)
        return time.monotonic() - started

    def resume(self) -> None:
        self.calls.append("resume")
        self.digest_at_resume = self.memory.digest()
        self._unpark()

    def save_sections(self) -> list[Section]:
        return [
            Section("cpu0", 1, {"rip": self.work_gpa + self.position * PAGE_SIZE, "rax": self.sweeps, "vendor": self.vendor}),
            Section("fakeguest", 1, {"sweeps": self.sweeps, "position": self.position, "work_gpa": self.work_gpa,
                                      "work_pages": self.work_pages, "boot_nonce": b"\x5a" * 16}),
        ]

    def check_sections(self, sections: list[Section], *, what: str) -> None:
        self.calls.append("check_sections")
        _check_fake_sections(sections, what)

    def adopt_memory(self, memory: GuestMemory) -> None:
        """Take restored memory in place of this guest's own (the writer must be parked)."""
        self.calls.append("adopt_memory")
        with self._cond:
            assert self._parked, "adopt_memory while the writer runs"
            self.memory.close()
            self.memory = memory

    def section_loader(self, *, what: str) -> LoadAtEnd:
        return LoadAtEnd(self, what=what)

    def restore_sections(self, sections: list[Section], *, what: str) -> None:
        self.calls.append("restore_sections")
        _check_fake_sections(sections, what)
        guest = next(s for s in sections if s.name == "fakeguest").payload
        if (guest["work_gpa"], guest["work_pages"]) != (self.work_gpa, self.work_pages):
            raise ValueError(f"work area differs: source {guest['work_gpa']:#x}+{guest['work_pages']}, here {self.work_gpa:#x}+{self.work_pages}")
        self.sweeps, self.position = guest["sweeps"], guest["position"]

    def throttle(self, fraction: float) -> None:
        self.calls.append(f"throttle {fraction:.2f}")
        self.throttle_fraction = fraction
        self.throttle_history.append(fraction)

    def stop_for_good(self, reason: str) -> None:
        self.calls.append("stop_for_good")
        self.stopped = True
        self.stop_reason = reason

    def prepare_to_run(self) -> None:
        self.calls.append("prepare_to_run")

    def start_running(self) -> None:
        self.calls.append("start_running")
        self.digest_at_start = self.memory.digest()
        self.memory_at_start = MemoryImage.of(self.memory)
        self.state_at_start = (self.sweeps, self.position)
        self._unpark()

    def discard(self) -> None:
        self.calls.append("discard")
        self.discarded = True

    # -- test lifetime ---------------------------------------------------------------------------
    def stop_writer(self) -> None:
        self._park()

    def close(self) -> None:
        """Idempotent: a test may close its guests early, the fixture closes them all again."""
        with self._cond:
            if self._exit:
                return
            self._exit = True
            self._cond.notify_all()
        self._writer.join(timeout=10)
        self.memory.close()
