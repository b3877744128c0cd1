"""Save/restore orchestration: a guest to bhyve's three files, and back, through the guest handle.

This module sees a guest only through ``state.handle.GuestHandle`` (memory, pause/resume, save
and restore its sections): it imports no VM. The runtime composes it (``runtime.commands``): it
says what the basic metadata holds, builds the machine a checkpoint is restored into and opens
its consoles.

Checkpoint (bhyve's ``vm_checkpoint``): pause the guest (the vCPU rendezvous, devices quiesced),
take every state section, write the files atomically, then resume the guest — or, for a
suspend, stop it for good (vmmrun then exits 0, as bhyve does). A failure leaves the guest
running as it was and no files behind.

Restore (bhyve's ``-r``): the files were read and verified whole (``files.read_checkpoint``)
before the guest was built; the guest checks every section before anything is restored; then
memory is restored eagerly (verified against the chunk hashes before anything runs) or lazily
(each chunk verified against its hash when first needed; a bad one stops the guest), adopted by
the guest, and the sections are loaded.

After a lazy restore (``LazyLoading``, started as the guest starts): a background thread loads
the checkpoint's working set (``workingset``: the chunks a previous restore touched first), then
fills in every other chunk, unless ``prefetch`` says less; and the chunks the guest touches in
its first ``record_seconds`` are recorded and written as the next working set.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import _core
from ..memory import PAGE_SIZE, GuestMemoryError
from ..progress import metered
from ..state.handle import GuestHandle
from .errors import CheckpointError
from .files import META_SUFFIX, Checkpoint, DiffParent, LiveSource, restore_memory, write_checkpoint
from .workingset import MAX_CHUNKS, WorkingSet, read_working_set, write_working_set

log = logging.getLogger("vmmpy.snapshot")

RESTORE_MODES = ("eager", "lazy")
#: A live checkpoint holds at most this many bytes of pages the guest wrote before the writer
#: reached them (their old bytes, copied out); past it the writing vCPU or device waits for the
#: writer, so a guest rewriting all its memory runs at the disk's speed rather than doubling
#: its memory.
LIVE_COPY_LIMIT_BYTES = 64 << 20
#: What a lazy restore loads ahead: the working set then every other chunk, every chunk in order,
#: or nothing (each chunk when first needed).
RESTORE_PREFETCH = ("working-set", "fill", "none")
#: How long after a lazy restore's guest starts the chunks it touches are recorded, by default.
RECORD_SECONDS = 1.0


def checkpoint_guest(
    guest: GuestHandle,
    path: str | Path,
    *,
    basic: Mapping[str, Any],
    suspend: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    key: bytes | None = None,
    diff: bool = False,
    live: bool = False,
    live_copy_limit: int = LIVE_COPY_LIMIT_BYTES,
    cancel: threading.Event | None = None,
) -> dict[str, Any]:
    """Save ``guest`` to ``path`` (+ ``.kern``, ``.meta``) with ``basic`` as bhyve's basic
    metadata (``ncpus``, ``vmname`` and what the caller adds); keep it running unless
    ``suspend``. With ``key`` the checkpoint is keyed (HMAC-SHA256): only a restore with the
    same key takes it. ``progress`` gets a message when the guest is paused, one every
    ``vmmpy.progress.TICK_S`` seconds while its memory is written (phase "checkpoint" or
    "suspend": pages done of how many, rate, ETA), and one when all is written.

    With ``diff`` only the pages written since this guest's previous checkpoint (in this
    process) or its restore are written, over that checkpoint as parent (``files.DiffParent``);
    with none, or when that checkpoint's metadata is gone or changed, CheckpointError says so and
    nothing is written. The pages written since are harvested into the memory's checkpoint log
    while the guest is paused (``GuestMemory.checkpoint_log_pages``); only a checkpoint written
    whole restarts the log, so after a failed one the next diff still carries them.

    With ``live`` the guest is paused only to take its sections and arm copy-before-write on its
    memory (``_core.LiveCapture``, at most ``live_copy_limit`` bytes of copied-out pages), then
    runs on while the memory file is written: the file holds memory as it was at that pause.
    Setting ``cancel`` stops that write (CheckpointError, errno ECANCELED in its cause). A failure
    or cancel lifts the protection and leaves no files; the guest runs on throughout. Not with
    ``suspend`` or ``diff``."""
    path = str(path)
    if live:
        return _live_checkpoint(guest, path, basic=basic, suspend=suspend, progress=progress, key=key, diff=diff,
                                copy_limit=live_copy_limit, cancel=cancel or threading.Event())
    started = time.perf_counter()
    pause_seconds = guest.pause()
    if progress:
        progress({"phase": "paused", "seconds": round(pause_seconds, 6)})
    try:
        sections = list(guest.save_sections())
        pages = guest.memory.checkpoint_log_pages()
        parent = _diff_parent(guest.memory.checkpoint_log_base, pages, path) if diff else None
        with metered(progress, "suspend" if suspend else "checkpoint") as meter:
            stats = write_checkpoint(path, guest.memory, sections, basic, key=key, meter=meter, parent=parent)
        guest.memory.start_checkpoint_log((os.path.abspath(path), stats["meta_sha256"]))
    except BaseException:  # a cancelled checkpoint (KeyboardInterrupt) resumes the guest too
        guest.resume()
        raise
    downtime = time.perf_counter() - started
    if suspend:
        guest.stop_for_good(f"suspended to {path}")
    else:
        guest.resume()
    result = _result(path, guest.memory.memsize, stats, suspended=suspend, keyed=key is not None,
                     parent=None if parent is None else parent.path, paused_seconds=downtime)
    if progress:
        progress({"phase": "written", **result})
    return result


def _result(path: str, memsize: int, stats: dict[str, Any], *, suspended: bool, keyed: bool, parent: str | None,
            paused_seconds: float) -> dict[str, Any]:
    """What a checkpoint reports (vmmctl prints it, --json as is)."""
    seconds = stats["total_seconds"]
    return {
        "path": path,
        "suspended": suspended,
        "keyed": keyed,
        "parent": parent,
        "memory_bytes": memsize,
        "bytes_written": stats["bytes_written"],
        "kern_bytes": stats["kern_bytes"],
        "data_pages": stats["data_pages"],
        "zero_pages": stats["zero_pages"],
        "untouched_pages": stats["untouched_pages"],
        "write_seconds": round(seconds, 6),
        "throughput_bytes_per_s": round(stats["bytes_written"] / seconds) if seconds > 0 else 0,
        "guest_paused_seconds": round(paused_seconds, 6),
    }


def _live_checkpoint(guest: GuestHandle, path: str, *, basic: Mapping[str, Any], suspend: bool,
                     progress: Callable[[dict[str, Any]], None] | None, key: bytes | None, diff: bool,
                     copy_limit: int, cancel: threading.Event) -> dict[str, Any]:
    if suspend:
        raise CheckpointError(f"checkpoint '{path}': --live goes with --checkpoint only: a suspend ends the guest, so there is "
                              "nothing to keep running while memory is written")
    if diff:
        raise CheckpointError(f"checkpoint '{path}': --live and --diff together are not supported; take a live full "
                              "checkpoint, or a diff (its guest pauses only while the dirtied pages are written)")
    if copy_limit < PAGE_SIZE:
        raise CheckpointError(f"checkpoint '{path}': the live copy limit must be at least one page ({PAGE_SIZE} bytes), "
                              f"got {copy_limit}")
    memory = guest.memory
    if memory.lazy:
        memory.load_all()  # now, not inside the pause: a chunk loaded later would bypass the capture
    started = time.perf_counter()
    guest.pause()
    try:
        sections = list(guest.save_sections())
        harvests = memory.harvests
        try:
            capture = _core.LiveCapture(memory.core, copy_limit // PAGE_SIZE)
        except GuestMemoryError as err:  # e.g. a KVM guest, whose stores no copy-before-write sees
            raise CheckpointError(f"checkpoint '{path}': {err.strerror or err}") from None
    finally:
        guest.resume()
    pause_seconds = time.perf_counter() - started
    written = threading.Event()
    watcher = threading.Thread(target=_cancel_when_asked, args=(cancel, written, capture), name="live-checkpoint-cancel",
                               daemon=True)
    watcher.start()
    try:
        if progress:
            progress({"phase": "paused", "seconds": round(pause_seconds, 6)})
        with metered(progress, "checkpoint") as meter:
            stats = write_checkpoint(path, memory, sections, basic, key=key, meter=meter,
                                     live=LiveSource(capture, pause_seconds))
    finally:
        capture.finish()  # lifted by the write already; again here for a failure before it
        written.set()
        watcher.join()
    memory.start_checkpoint_log((os.path.abspath(path), stats["meta_sha256"]), since_harvest=harvests)
    result = _result(path, memory.memsize, stats, suspended=False, keyed=key is not None, parent=None,
                     paused_seconds=pause_seconds)
    result.update(live=True, copied_before_write_pages=stats["copied_pages"], peak_held_pages=stats["peak_held_pages"],
                  throttled_writes=stats["throttled_writes"], throttled_seconds=round(stats["throttled_seconds"], 6))
    if progress:
        progress({"phase": "written", **result})
    return result


def _cancel_when_asked(cancel: threading.Event, written: threading.Event, capture: _core.LiveCapture) -> None:
    """Stop ``capture``'s write (at its next 4 MiB) once ``cancel`` is set, until it is ``written``."""
    while not written.is_set():
        if cancel.wait(0.05):
            capture.cancel()
            return


def _diff_parent(base: object | None, pages: Any, path: str) -> DiffParent:
    """The parent of a diff checkpoint: the checkpoint the guest's log is relative to, which
    must still be on disk as it was written or read."""
    if base is None or pages is None:
        raise CheckpointError(
            f"checkpoint '{path}': --diff needs a previous checkpoint of this guest (written by this vmmrun, or the one it was "
            "restored from); write a full checkpoint first"
        )
    parent_path, meta_sha256 = base
    try:
        with open(parent_path + META_SUFFIX, "rb") as f:
            current = hashlib.sha256(f.read()).hexdigest()
    except OSError as err:
        current = f"unreadable ({err.strerror or err})"
    if current != meta_sha256:
        raise CheckpointError(
            f"checkpoint '{path}': the previous checkpoint '{parent_path}' (the parent a diff would name) was changed, "
            f"removed or replaced since: {parent_path}{META_SUFFIX} is {current}, not the SHA-256 {meta_sha256} it had; "
            "write a full checkpoint"
        )
    return DiffParent(parent_path, meta_sha256, pages)


class LazyLoading:
    """What happens after a lazy restore once the guest starts (:meth:`start`): the working set
    (``prefetch="working-set"``) and then every chunk (unless ``"none"``) load in a background
    thread, and for ``record_seconds`` (None: not at all) the chunks the guest touches are
    recorded, then written as ``checkpoint``.ws by a thread of ours. :meth:`finish` stops both
    (the memory's owner calls it when it closes the guest)."""

    def __init__(self, memory: Any, checkpoint: Checkpoint, *, prefetch: str, record_seconds: float | None,
                 started: float) -> None:
        self.memory = memory
        self.checkpoint = checkpoint
        self.prefetch = prefetch
        self.record_seconds = record_seconds
        self.restore_seconds = time.perf_counter() - started
        self.working_set: WorkingSet | None = None
        self.written: str | None = None  # the working-set file written, once it is
        self._recorder: threading.Thread | None = None
        self._started = False

    def start(self) -> None:
        """Start loading ahead and recording (once; the guest starts now)."""
        if self._started:
            return
        self._started = True
        c = self.checkpoint
        image = self.memory.lazy_status()  # a diff's chunks are its root's image chunks, not its file's
        prefetch: list[int] = []
        if self.prefetch == "working-set":
            self.working_set = read_working_set(c.path, chunk_size=image.chunk_size, chunks=image.chunks, meta_sha256=c.meta_sha256)
            prefetch = self.working_set.chunks
        self.memory.core.start_loading(prefetch=prefetch, fill=self.prefetch != "none", record_seconds=self.record_seconds,
                                       record_limit=MAX_CHUNKS)
        if self.record_seconds:
            self._recorder = threading.Thread(target=self._record, name="working-set-recorder", daemon=True)
            self._recorder.start()

    def _record(self) -> None:
        assert self.record_seconds is not None
        chunks = self.memory.core.wait_recorded(self.record_seconds + 60.0)
        if not chunks:
            return  # nothing touched (or not over in time): keep any working set there is
        c = self.checkpoint
        try:
            self.written = write_working_set(c.path, chunks, chunk_size=self.memory.lazy_status().chunk_size, meta_sha256=c.meta_sha256)
        except OSError as err:
            log.warning("working set of checkpoint '%s' not written: %s", c.path, err.strerror or err)

    def finish(self, timeout: float = 10.0) -> None:
        """Stop loading ahead and recording; wait (``timeout`` at most) for the working set to
        be written."""
        self.memory.core.stop_loading()
        if self._recorder is not None:
            self._recorder.join(timeout)

    def status(self) -> dict[str, Any]:
        """The restore's statistics: how, from where, and the memory's loading so far."""
        out: dict[str, Any] = {"mode": "lazy", "path": self.checkpoint.path, "restore_seconds": round(self.restore_seconds, 6),
                               "prefetch": self.prefetch}
        if self.working_set is not None:
            out["working_set"] = self.working_set.as_dict()
        if self.written is not None:
            out["working_set_written"] = self.written
        status = self.memory.lazy_status()
        if status is not None:
            out.update({k: round(v, 6) if isinstance(v, float) else v for k, v in status.as_dict().items() if k != "source"})
        return out


def describe_lazy_restore(status: dict[str, Any]) -> str:
    """One line of a lazy restore's statistics (``LazyLoading.status``), for people."""
    ms = 1e3
    parts = [f"lazy restore of '{status.get('path')}' ({status.get('prefetch')})",
             f"{status.get('loaded', 0)}/{status.get('chunks', 0)} chunks loaded: {status.get('demand_loads', 0)} on demand, "
             f"{status.get('prefetched', 0)} prefetched, {status.get('filled', 0)} filled"]
    ws = status.get("working_set")
    if ws:
        parts.append(f"working set {ws['status']}" + (f" ({ws['chunks']} chunks)" if ws["status"] == "used" else ""))
    parts.append(f"guest waited {status.get('wait_seconds', 0.0) * ms:.1f} ms in {status.get('waits', 0)} loads "
                 f"({status.get('first_second_wait_seconds', 0.0) * ms:.1f} ms in its first second, "
                 f"longest {status.get('max_wait_seconds', 0.0) * ms:.1f} ms)")
    resident = status.get("resident_seconds")
    parts.append(f"fully resident after {resident:.3f} s" if resident is not None else "not fully resident yet")
    if status.get("failed"):
        parts.append(f"{status['failed']} chunk(s) failed")
    return "; ".join(parts)


def restore_guest(guest: GuestHandle, checkpoint: Checkpoint, *, mode: str = "eager", dirty_tracking: str = "auto",
                  progress: Callable[[dict[str, Any]], None] | None = None, backing: str = "anon",
                  prefetch: str = "working-set", record_seconds: float | None = RECORD_SECONDS,
                  page_cache: str = "auto") -> LazyLoading | None:
    """Restore a checkpoint read by ``read_checkpoint`` into ``guest``, which has no memory yet:
    its sections are checked first, then its memory is restored (``mode`` eager or lazy, tracked
    by ``dirty_tracking``, backed by ``backing``) and the sections loaded. The guest does not run until
    ``guest.start_running()`` (or its owner starts it). Raises CheckpointError or SectionError
    naming the file if anything does not fit. ``progress`` as for ``files.restore_memory``.
    ``page_cache`` as for ``files.restore_memory``.
    For a lazy restore, returns the ``LazyLoading`` (``prefetch``, ``record_seconds``) its
    owner starts with the guest and finishes when it closes it; None for an eager one."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"restore mode {mode!r}: choose {' or '.join(RESTORE_MODES)}")
    if prefetch not in RESTORE_PREFETCH:
        raise ValueError(f"restore prefetch {prefetch!r}: choose {', '.join(RESTORE_PREFETCH)}")
    if record_seconds is not None and not record_seconds >= 0:
        raise ValueError(f"working-set recording time {record_seconds} must be 0 (off) or more seconds")
    what = f"checkpoint '{checkpoint.kern_path}'"
    guest.check_sections(checkpoint.sections, what=what)
    started = time.perf_counter()
    memory = restore_memory(checkpoint, mode, dirty_tracking=dirty_tracking, progress=progress, backing=backing,
                            page_cache=page_cache)
    guest.adopt_memory(memory)
    guest.restore_sections(checkpoint.sections, what=what)
    # A diff checkpoint of the restored guest names this one as its parent.
    guest.memory.start_checkpoint_log((os.path.abspath(checkpoint.path), checkpoint.meta_sha256))
    if not memory.lazy:
        return None
    return LazyLoading(memory, checkpoint, prefetch=prefetch, record_seconds=record_seconds or None, started=started)


__all__ = ["LIVE_COPY_LIMIT_BYTES", "RECORD_SECONDS", "RESTORE_MODES", "RESTORE_PREFETCH", "LazyLoading", "checkpoint_guest",
           "describe_lazy_restore", "restore_guest"]
