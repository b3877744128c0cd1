"""Guest memory for Python: the Rust core's segments, zero-copy numpy views, dirty harvests.

This module is the Python face of ``vmmpy._core.GuestMemory``: it parses sizes, turns harvests
into numpy arrays, and names segments. It owns no policy: what to save or send, and when, is
decided by ``snapshot`` and ``migration``.

Layout follows bhyve's ``vm_setup_memory``: a ``lowmem`` segment at GPA 0 of
``min(memsize, lowmem_limit)`` bytes and, for the rest, a ``highmem`` segment at 4 GiB. The
3-4 GiB hole is not backed: accesses there fail with ``GuestMemoryError`` (errno EFAULT).
"""

from __future__ import annotations

import errno
import os
import struct
from typing import TYPE_CHECKING, Any

from . import _core
from ._lazy import lazy_module
from .units import parse_size

if TYPE_CHECKING:
    import numpy as np
else:
    np = lazy_module("numpy")  # 100 ms to import; a restore that never uses it does not pay

PAGE_SIZE: int = _core.PAGE_SIZE
PAGE_SHIFT = 12
HIGHMEM_BASE: int = _core.HIGHMEM_BASE
LOWMEM_LIMIT_DEFAULT: int = _core.LOWMEM_LIMIT_DEFAULT
GuestMemoryError = _core.GuestMemoryError
#: Lazily restored memory that could not be loaded and checked (a GuestMemoryError): the message
#: names the checkpoint, the chunk and its guest-physical range, and what was wrong.
LazyMemoryError = _core.LazyMemoryError
Segment = _core.Segment

DIRTY_TRACKING_CHOICES = ("auto", "soft", "kernel", "kvm", "kvm-ring")
#: The trackings of a KVM guest's memory (its memory slots): KVM's dirty bitmap, or its dirty ring.
KVM_TRACKING = ("kvm", "kvm-ring")
#: What backs guest memory: private anonymous memory, or a memfd per segment mapped shared, whose
#: descriptors a local migration hands to another process (docs/memory.md, "Backing").
BACKINGS = ("anon", "memfd")


def _check_choices(dirty_tracking: str, backing: str = "anon") -> None:
    if dirty_tracking not in DIRTY_TRACKING_CHOICES:
        raise ValueError(f"dirty_tracking must be one of {', '.join(DIRTY_TRACKING_CHOICES)}; got {dirty_tracking!r}")
    if backing not in BACKINGS:
        raise ValueError(f"backing must be one of {', '.join(BACKINGS)}; got {backing!r}")


PageBatchError = _core.PageBatchError
#: The pages a round may carry over all its streams together (``GuestMemory.recv_share``).
PageBudget = _core.PageBudget
DigestTracker = _core.DigestTracker
#: Counters a long page call advances while it runs (``vmmpy.progress`` reads them).
ProgressMeter = _core.ProgressMeter


def _fileno(fd):
    """An fd for the page calls: ``fd`` itself, the fd of an object with ``fileno()``, or what an
    object's ``core_link`` names instead (a TLS connection's session in the core, which the page
    calls write to and read from in place of the raw socket)."""
    if isinstance(fd, (int, _core.TlsStream)):
        return fd
    link = getattr(fd, "core_link", None)
    return link if link is not None else fd.fileno()


class CheckpointLog:
    """Pages of the memory file (lowmem then highmem, as a checkpoint lays them out) written
    since the last checkpoint or restore; ``everything`` when a harvest was not seen."""

    def __init__(self, pages: int, lowmem_pages: int, base: object) -> None:
        self.base = base
        self._pages = pages
        self._bits: np.ndarray | None = None  # made at the first harvest: a restore needs no numpy
        self.lowmem_pages = lowmem_pages
        self.everything = False

    @property
    def bits(self) -> np.ndarray:
        if self._bits is None:
            self._bits = np.zeros(self._pages, dtype=bool)
        return self._bits

    def add(self, pfns: np.ndarray) -> None:
        highmem_pfn = HIGHMEM_BASE // PAGE_SIZE
        index = np.where(pfns >= highmem_pfn, pfns - highmem_pfn + self.lowmem_pages, pfns).astype(np.int64)
        self.bits[index[index < self._pages]] = True

    def pages(self) -> np.ndarray:
        if self.everything:
            self.bits[:] = True
            self.everything = False
        return np.flatnonzero(self.bits)


class GuestMemory:
    """A guest's physical memory.

    ``GuestMemory("512M")`` maps 512 MiB of unwired memory at GPA 0; ``wired=True`` populates
    and mlocks it up front as bhyve's ``-S`` does (on the main thread, a signal handler that
    raises stops it within 64 MiB, and its exception comes out: Ctrl-C's ``KeyboardInterrupt``
    says how far wiring got). ``dirty_tracking`` picks the backend:
    ``"soft"`` (an atomic bitmap set by every write made through vmmpy), ``"kernel"``
    (userfaultfd write-protect + PAGEMAP_SCAN, which sees writes through any pointer),
    ``"auto"`` (kernel where it works, else soft; :attr:`dirty_tracking` says which) or ``"kvm"``
    (the memory becomes a KVM VM's memory slots, tracked by KVM's dirty log: docs/kvm.md), or
    ``"kvm-ring"`` (the same, with KVM's per-vCPU dirty ring in place of its bitmap).
    ``backing`` is ``"anon"`` (private anonymous memory) or ``"memfd"`` (a memfd per segment,
    mapped shared: :meth:`from_fds` maps the same pages in another process).
    """

    def __init__(
        self,
        memsize: int | str,
        *,
        wired: bool = False,
        lowmem_limit: int | str = LOWMEM_LIMIT_DEFAULT,
        dirty_tracking: str = "auto",
        backing: str = "anon",
    ) -> None:
        _check_choices(dirty_tracking, backing)
        self.core = _core.GuestMemory(
            parse_size(memsize, what="memory size"),
            wired=wired,
            lowmem_limit=parse_size(lowmem_limit, what="lowmem limit"),
            dirty_tracking=dirty_tracking,
            backing=backing,
        )
        self.wired = wired
        self._checkpoint_log: CheckpointLog | None = None
        self._harvests = 0  # dirty-bitmap harvests through this object (see start_checkpoint_log)

    @classmethod
    def restore_lazy(
        cls,
        path,
        memsize: int | str,
        chunk_hashes: list[int],
        chunk_size: int,
        lowmem_limit: int | str = LOWMEM_LIMIT_DEFAULT,
        *,
        wired: bool = False,
        dirty_tracking: str = "auto",
        backing: str = "anon",
        page_cache: str = "auto",
    ) -> GuestMemory:
        """Memory restored lazily from a checkpoint memory file at ``path``, checked chunk by chunk.

        Lowmem comes from file offset 0, highmem from the bytes right after lowmem, in chunks of
        ``chunk_size`` bytes. Nothing is read now, so this costs the same for any guest size. The
        first time anything needs a byte of a chunk (the vCPU, device DMA through :meth:`read` /
        :meth:`write`, a bulk operation, a numpy view), the whole chunk is read from the file and
        its xxh3-128 compared with ``chunk_hashes[i]``; until then it cannot be seen at all. A
        chunk that does not match, or cannot be read (the file was truncated), raises
        :class:`LazyMemoryError` on every access to it. The file is never mapped or written; it
        must be exactly ``memsize`` bytes. ``wired=True`` is refused: wiring would read and copy
        every page up front (restore wired guests eagerly). With ``dirty_tracking="auto"`` the
        soft backend is used; :attr:`dirty_tracking_fallback` says why. ``vmmpy.snapshot`` reads
        the hashes from a verified ``.meta`` and calls this. ``page_cache``: "auto" drops each
        loaded chunk from the page cache when the file was cold now (chunks of a multiple of
        2 MiB), "release" does whatever it finds, "keep" never (docs/checkpoint-format.md).
        """
        _check_choices(dirty_tracking, backing)
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        try:
            core = _core.GuestMemory.from_file(
                fd,
                parse_size(memsize, what="memory size"),
                chunk_hashes=list(chunk_hashes),
                chunk_size=chunk_size,
                name=f"checkpoint '{os.fspath(path)}'",
                wired=wired,
                lowmem_limit=parse_size(lowmem_limit, what="lowmem limit"),
                dirty_tracking=dirty_tracking,
                backing=backing,
                page_cache=page_cache,
            )
        finally:
            os.close(fd)  # the memory keeps its own duplicate
        return cls.wrap(core)

    @classmethod
    def from_fds(cls, fds: list[int], memsize: int, *, wired: bool = False, lowmem_limit: int = LOWMEM_LIMIT_DEFAULT,
                 dirty_tracking: str = "soft") -> GuestMemory:
        """Memory mapping the memfds ``fds`` (one per segment, lowmem first) that another
        process's memfd-backed memory handed over (``Segment.memfd``): the very same pages,
        shared; nothing is read, copied or written. Each descriptor's size is checked against
        its segment (GuestMemoryError naming the segment and both sizes). The caller keeps its
        descriptors (duplicates are made). Nothing is dirty: :meth:`mark_dirty_runs` carries over
        what the other process had."""
        _check_choices(dirty_tracking)
        return cls.wrap(_core.GuestMemory.from_fds(list(fds), memsize, wired=wired, lowmem_limit=lowmem_limit,
                                                   dirty_tracking=dirty_tracking))

    @classmethod
    def wrap(cls, core: _core.GuestMemory) -> GuestMemory:
        """Wrap an existing core object (for code that receives one from the Rust side)."""
        self = cls.__new__(cls)
        self.core = core
        self.wired = all(seg.wired for seg in core.segments)
        self._checkpoint_log = None
        self._harvests = 0
        return self

    # -- layout ---------------------------------------------------------------------------
    @property
    def memsize(self) -> int:
        return self.core.memsize

    @property
    def lowmem_limit(self) -> int:
        """Where lowmem ends at most; memory beyond it is highmem at 4 GiB."""
        return self.core.lowmem_limit

    @property
    def segments(self) -> list[Segment]:
        return self.core.segments

    def segment(self, name: str) -> Segment:
        for seg in self.core.segments:
            if seg.name == name:
                return seg
        names = ", ".join(s.name for s in self.core.segments)
        raise KeyError(f"no segment named {name!r}; this guest has {names}")

    @property
    def lowmem(self) -> Segment:
        return self.core.segments[0]

    @property
    def highmem(self) -> Segment | None:
        segs = self.core.segments
        return segs[1] if len(segs) > 1 else None

    def view(self, name: str = "lowmem") -> np.ndarray:
        """A read-only numpy uint8 array aliasing a segment, with no copy. On lazily restored
        memory the segment is loaded and checked whole first (LazyMemoryError if it cannot be)."""
        return np.frombuffer(self.segment(name), dtype=np.uint8)

    # -- access -----------------------------------------------------------------------------
    def read(self, gpa: int, size: int) -> bytes:
        return self.core.read(gpa, size)

    def write(self, gpa: int, data) -> None:
        """Write ``data`` (any bytes-like object) at ``gpa`` and mark the pages dirty."""
        self.core.write(gpa, data)

    def write_untracked(self, gpa: int, data) -> None:
        """Write without marking dirty: for restore and migration receive only."""
        self.core.write_untracked(gpa, data)

    @property
    def backing(self) -> str:
        """``"anon"`` or ``"memfd"``."""
        return self.core.backing

    def memfds(self) -> list[int]:
        """The segments' memfd descriptors, lowmem first (the segments' own: valid while the
        memory is open). ValueError for anonymous memory, which has none to hand over."""
        if self.backing != "memfd":
            raise ValueError("guest memory is anonymous: it has no memfd to hand over (use memfd backing)")
        if any(seg.live_armed for seg in self.core.segments):
            # Whoever maps a memfd writes the pages behind copy-before-write's back.
            raise OSError(errno.EBUSY, "a live checkpoint is writing this guest's memory: its memfds are handed over only "
                                       "after it ends")
        return [seg.memfd for seg in self.core.segments]

    # -- dirty tracking ---------------------------------------------------------------------
    def peek_dirty_runs(self) -> bytes:
        """The dirty pages as runs, without clearing them: little-endian u64 pairs (first page
        frame number, page count), ascending."""
        return self.core.peek_dirty_runs()

    def mark_dirty_runs(self, runs: bytes) -> None:
        """Mark dirty the runs ``peek_dirty_runs`` gave (in another process, for the same
        memory); a run outside the segments is refused before any is marked."""
        self.core.mark_dirty_runs(runs)

    @property
    def dirty_tracking(self) -> str:
        """The backend in use: ``"soft"`` or ``"kernel"``."""
        return self.core.dirty_tracking

    @property
    def dirty_tracking_fallback(self) -> str | None:
        """Why ``"auto"`` settled for the soft backend, or None."""
        return self.core.dirty_tracking_fallback

    def get_and_clear_dirty(self) -> np.ndarray:
        """Dirty page frame numbers (gpa >> 12), sorted, as uint64; their bits are cleared.

        A page written while the harvest runs is reported in this harvest or the next.
        """
        pfns = np.frombuffer(self.core.get_and_clear_dirty(), dtype="<u8")
        self._harvests += 1
        log = self._checkpoint_log
        if log is not None:
            log.add(pfns)
        return pfns

    def get_and_clear_dirty_ranges(self) -> list[_core.DirtyRange]:
        """Dirty memory as merged ranges (``gpa``, ``length``), ascending; bits are cleared."""
        self._checkpoint_log_loses_sight()
        return self.core.get_and_clear_dirty_ranges()

    # -- post-copy migration ------------------------------------------------------------------
    def postcopy_runs(self, *, all_pages: bool) -> bytes:
        """The pages a post-copy destination lacks at the switch, as runs (``peek_dirty_runs``'
        format): every page (nothing was sent before the switch), or the dirty pages, harvested
        and cleared (those the rounds did not carry as they are now)."""
        if all_pages:
            pairs = [(seg.gpa >> PAGE_SHIFT, seg.pages) for seg in self.core.segments]
        else:
            pairs = [(r.gpa >> PAGE_SHIFT, r.length >> PAGE_SHIFT) for r in self.get_and_clear_dirty_ranges()]
        return b"".join(struct.pack("<QQ", pfn, count) for pfn, count in pairs)

    def postcopy_server(self, runs: bytes, chunk_size: int) -> _core.PostcopyServer:
        """A post-copy source's page server over this (paused) memory for the pages ``runs`` names."""
        return _core.PostcopyServer(self.core, runs, chunk_size)

    def postcopy_link(self, runs: bytes, chunk_size: int, name: str) -> _core.PostcopyLink:
        """Make this (paused) memory a post-copy destination's: from now on the chunks holding the
        pages ``runs`` names load through the returned link, every other byte is used as it is.
        ValueError for runs outside memory or a bad chunk size; OSError if the memory is viewed."""
        return _core.PostcopyLink(self.core, runs, chunk_size, name)

    def start_loading(self, **plan) -> None:
        """Memory loaded on demand: start loading ahead (``_core.GuestMemory.start_loading``)."""
        self.core.start_loading(**plan)

    # -- the checkpoint log: pages written since the last checkpoint ------------------------
    # The dirty bitmap has one reader that clears it at a time (a migration round, an estimate,
    # a checkpoint). Diff checkpoints need "written since the last checkpoint" across them, so
    # they keep their own log: every harvest through this object ORs what it cleared into it
    # (exactly: get_and_clear_dirty returns the pages); a harvest done inside the core that
    # returns no pages (send_dirty_pages, send_pages_multi's dirty round, the ranges) marks the
    # whole log instead, so the next diff carries every page: larger, never incomplete.
    def start_checkpoint_log(self, base: object, *, since_harvest: int | None = None) -> None:
        """Begin (or restart) the log empty, now, relative to ``base`` (the caller's name for
        what it is relative to: the checkpoint just written or restored): the bitmap is cleared,
        so the caller holds the guest still, as at a checkpoint or right after a restore.

        A live checkpoint's guest ran on while it was written: with ``since_harvest`` (the
        :attr:`harvests` count at its pause) the bitmap is kept, so the log holds every page
        written since the pause (and any dirty before it: larger, never incomplete); if a harvest
        cleared bits since, the log is marked whole."""
        if since_harvest is None:
            self._checkpoint_log = None
            self.core.get_and_clear_dirty()
        log = CheckpointLog(self.memsize // PAGE_SIZE, self.lowmem.size // PAGE_SIZE, base)
        log.everything = since_harvest is not None and since_harvest != self._harvests
        self._checkpoint_log = log

    @property
    def harvests(self) -> int:
        """How many times the dirty bitmap was harvested through this object (a clock for
        :meth:`start_checkpoint_log`)."""
        return self._harvests

    @property
    def checkpoint_log_base(self) -> object | None:
        """What the log is relative to (:meth:`start_checkpoint_log`), or None: no log yet."""
        log = self._checkpoint_log
        return None if log is None else log.base

    def checkpoint_log_pages(self) -> np.ndarray | None:
        """The memory-file page indices written since the log started, harvesting the bitmap
        into the log first; the log keeps them until it is restarted after a checkpoint is
        safely written (so a failed write loses nothing). None when there is no log (no
        checkpoint or restore yet)."""
        log = self._checkpoint_log
        if log is None:
            return None
        self.get_and_clear_dirty()
        return log.pages()

    def _checkpoint_log_loses_sight(self) -> None:
        self._harvests += 1
        log = self._checkpoint_log
        if log is not None:
            log.everything = True

    def dirty_count(self) -> int:
        """Dirty pages right now, without clearing."""
        return self.core.dirty_count()

    # -- bulk page work (Rust, GIL released) ------------------------------------------------
    def send_dirty_pages(self, fd, *, detect_zero: bool = True, tracker: DigestTracker | None = None, compress: str = "off",
                         link_rate: float | None = None, meter: ProgressMeter | None = None) -> dict[str, int]:
        """Harvest and clear the dirty pages and send them to ``fd`` as page batches.

        ``fd`` is a blocking file descriptor or an object with ``fileno()`` (a socket with a
        Python timeout is non-blocking and is refused; bound the wait with SO_SNDTIMEO instead,
        counted from the last byte the peer took). Zero pages travel as ranges without data when
        ``detect_zero``. Returns totals: batches, ranges, data_pages, zero_pages, data_bytes,
        wire_bytes, compressed_batches, saved_bytes, compress_attempts, link_rate. One batch per
        segment that has dirty pages (more past 65,536 ranges or 16 MiB of data) without
        compression. With a ``tracker`` (:meth:`digest_tracker`) every page sent is hashed into it
        on the way.

        ``compress``: ``"off"``; ``"lz4"`` tries every 1 MiB batch and sends it as an LZ4 block
        when that is at most 3/4 of its size; ``"auto"`` does so only while it pays on a link
        of ``link_rate`` bytes/s (or the rate it measures), backing off after batches that do
        not (docs/migration-protocol.md). Only a receiver that agreed to it reads compressed
        batches: the migration protocol negotiates it.

        A ``meter`` (``vmmpy.progress.ProgressMeter``) learns the pages harvested, then advances as
        they go, readable from another thread while this runs.
        """
        self._checkpoint_log_loses_sight()
        return _core.send_dirty_pages(self.core, _fileno(fd), detect_zero=detect_zero, tracker=tracker, compress=compress,
                                      link_rate=link_rate, meter=meter)

    def send_all_pages(self, fd, *, detect_zero: bool = True, tracker: DigestTracker | None = None, compress: str = "off",
                       link_rate: float | None = None, meter: ProgressMeter | None = None) -> dict[str, int]:
        """Send every page; never-touched pages go as zero ranges without being read. The other
        arguments as for :meth:`send_dirty_pages`."""
        return _core.send_all_pages(self.core, _fileno(fd), detect_zero=detect_zero, tracker=tracker, compress=compress,
                                    link_rate=link_rate, meter=meter)

    def send_pages(self, fd, pfns, *, detect_zero: bool = True, compress: str = "off",
                   link_rate: float | None = None) -> dict[str, int]:
        """Send the pages with these frame numbers (any iterable or numpy array of ints)."""
        data = np.unique(np.asarray(pfns, dtype="<u8")).tobytes()
        return _core.send_page_list(self.core, _fileno(fd), data, detect_zero=detect_zero, compress=compress, link_rate=link_rate)

    def send_pages_multi(self, fds, *, all_pages: bool, detect_zero: bool = True, chunk_pages: int | None = None,
                         tracker: DigestTracker | None = None, meter: ProgressMeter | None = None, compress: str = "off",
                         link_rate: float | None = None, at_once: int | None = None) -> dict:
        """One round over several fds at once (parallel streams): every page (``all_pages``, as
        ``send_all_pages``) or the dirty pages harvested and cleared once (as
        ``send_dirty_pages``, hashed into ``tracker`` on the way when given), cut into batches of at most
        ``chunk_pages`` data pages (default 16 MiB's worth) that each fd takes as it becomes free;
        every fd's share ends with an empty batch. Returns the totals (end markers not counted)
        and ``streams``, the same per fd. A ``meter`` as for :meth:`send_dirty_pages`, advanced by
        every stream. ``compress`` and ``link_rate`` as for :meth:`send_dirty_pages`: each stream
        compresses with a compressor of its own. ``at_once``: how many fds may have a batch going
        at a time (default all); the streams take turns, in the order they asked, and those past
        the first ``at_once`` stand down for the round, sending only the end of their share, once
        64 MiB went quickly or every batch is taken (unless the batches go slowly first, when every
        stream may go: ``wire::streams``)."""
        kwargs = {} if chunk_pages is None else {"chunk_pages": chunk_pages}
        if not all_pages:
            self._checkpoint_log_loses_sight()
        return _core.send_pages_multi(self.core, [_fileno(fd) for fd in fds], all_pages=all_pages,
                                      detect_zero=detect_zero, tracker=tracker, meter=meter, compress=compress,
                                      link_rate=link_rate, at_once=at_once, **kwargs)

    def recv_pages(self, fd, *, tracker: DigestTracker | None = None) -> dict[str, int]:
        """Receive one page batch into memory, checked whole before any byte is written.

        Received pages are not marked dirty. A bad batch raises ``PageBatchError`` naming what
        was wrong. A compressed batch (``compressed_batches`` = 1 in the result) is checked and
        decompressed whole into a bounded scratch buffer before any page is written. With a
        ``tracker`` the pages written are hashed into it as they arrive.
        """
        return _core.recv_pages(self.core, _fileno(fd), tracker=tracker)

    def recv_share(self, fd, *, budget, compressed: bool, tracker: DigestTracker | None = None,
                   meter: ProgressMeter | None = None, streams: int = 1) -> dict[str, int]:
        """Receive one stream's share of a round: page batches into memory until the empty batch
        that ends it, GIL released throughout. Every batch's pages are charged to ``budget``
        (``_core.PageBudget``, shared by a round's streams); a compressed batch is refused unless
        ``compressed``. Returns the totals of the non-empty batches (``wire_bytes`` counts the
        end marker too); ``PageBatchError`` names the first failure. A ``meter`` advances as the
        pages arrive (a round's streams may share one). ``streams`` says how many streams the round
        has. Its only stream installs a big batch into fresh memory on a second thread while this
        one reads the next MiB. Each of several streams installs on its own thread (they keep the
        CPUs busy already, and a thread more per stream only costs), in windows sized for how many
        streams share the CPUs."""
        if isinstance(streams, bool) or not isinstance(streams, int) or not 1 <= streams <= _core.MAX_STREAMS:
            raise ValueError(f"streams is {streams!r}; a round has 1 to {_core.MAX_STREAMS}")
        return _core.recv_share(self.core, _fileno(fd), budget=budget, compressed=compressed, tracker=tracker, meter=meter,
                                streams=streams)

    def digest(self) -> int:
        """An xxh3-128 digest of all guest memory (take it with the guest stopped)."""
        return _core.memory_digest(self.core)

    def commit_digest(self) -> int:
        """The digest a migration commits on, computed from scratch: a different function of
        memory from :meth:`digest`, built from per-page hashes so a :meth:`digest_tracker` can
        keep it current (rust/digest/tracker.rs defines it)."""
        return _core.commit_digest(self.core)

    def digest_tracker(self) -> DigestTracker:
        """A tracker of :meth:`commit_digest`: every page starts stale; pages are hashed into it as
        they move (``send_*_pages``/``recv_pages`` do it when given the tracker) or marked stale
        when they change (``tracker.mark(gpa, pages)``), and ``tracker.digest()`` rehashes only the
        stale ones. It equals ``commit_digest()`` as long as every page changed since it was
        made has been hashed or marked since."""
        return _core.DigestTracker(self.core)

    def hash_pages(self, gpa: int, count: int) -> np.ndarray:
        """xxh3-64 of each of ``count`` pages from page-aligned ``gpa``, as uint64."""
        return np.frombuffer(_core.hash_pages(self.core, gpa, count), dtype="<u8")

    def chunk_hashes(self, segment: str, chunk_size: int) -> list[int]:
        """xxh3-128 of each ``chunk_size`` chunk of a segment (the last may be short)."""
        index = [s.name for s in self.core.segments].index(self.segment(segment).name)
        return _core.chunk_hashes(self.core, index, chunk_size)

    def resident_pages(self) -> int:
        """Pages that have been touched at all, over every segment (never-touched pages cost nothing)."""
        return sum(seg.resident_pages() for seg in self.core.segments)

    def installed_pages(self) -> int:
        """Pages received into fresh memory without the kernel zeroing them first (userfaultfd's
        UFFDIO_COPY, on unwired anonymous memory; docs/memory.md), over every segment."""
        return sum(seg.installed_pages() for seg in self.core.segments)

    def start_prefault(self) -> int:
        """Populate this memory on a thread while a migration destination waits for its source
        (``_core.GuestMemory.start_prefault``): returns the bytes it will populate, 0 for none."""
        return self.core.start_prefault()

    def stop_prefault(self) -> dict[str, Any] | None:
        """Stop the population :meth:`start_prefault` began and say what it did (None if none ran)."""
        return self.core.stop_prefault()

    def wiring(self) -> dict[str, Any] | None:
        """What wiring this memory did (``wired=True``, ``vmmrun -S``; docs/memory.md): the keys of
        :meth:`stop_prefault`'s answer, over every segment. None for unwired memory."""
        return self.core.wiring()

    def huge_pages(self) -> int:
        """Pages received into whole 2 MiB regions advised for transparent huge pages, read
        straight into place (unwired anonymous memory where the host offers huge pages;
        docs/memory.md), over every segment."""
        return sum(seg.huge_pages() for seg in self.core.segments)

    def mapped_pages(self) -> int:
        """Pages this process has mapped, over every segment (/proc/self/pagemap): what has been
        touched or, for lazily restored memory, loaded."""
        return sum(seg.mapped_pages() for seg in self.core.segments)

    # -- lazy restore -----------------------------------------------------------------------
    @property
    def lazy(self) -> bool:
        """Whether the memory was restored lazily (:meth:`restore_lazy`)."""
        return self.core.lazy

    def lazy_status(self) -> _core.LazyStatus | None:
        """For lazily restored memory: its ``source``, ``chunk_size``, ``chunks``, ``loaded``,
        ``failed`` and ``complete`` (every chunk loaded and checked); None otherwise."""
        return self.core.lazy_status()

    @property
    def lazy_failure(self) -> str | None:
        """The error of the first chunk of lazily restored memory that could not be loaded."""
        return self.core.lazy_failure

    def load_all(self) -> None:
        """Load and check every chunk of lazily restored memory not loaded yet (nothing for other
        memory); :class:`LazyMemoryError` for the first that cannot be. After it the memory no
        longer needs its checkpoint file."""
        self.core.load_all()

    def notify_lazy_failure(self, fd: int) -> None:
        """Have one byte written to ``fd`` when a chunk of lazily restored memory first fails
        (at once if one has), from whichever thread found it."""
        self.core.notify_lazy_failure(fd)

    # -- lifetime ---------------------------------------------------------------------------
    def close(self) -> None:
        """Release the memory; BufferError while views over it exist."""
        self.core.close()

    def __enter__(self) -> GuestMemory:
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def __repr__(self) -> str:
        return repr(self.core)
