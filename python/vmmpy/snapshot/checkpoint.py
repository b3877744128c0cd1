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
"""

from __future__ import annotations

import hashlib
import os
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from .. import _core
from ..memory import PAGE_SIZE
from ..progress import metered
from ..state.handle import GuestHandle
from .errors import CheckpointError
from .files import META_SUFFIX, Checkpoint, DiffParent, LiveSource, restore_memory, write_checkpoint

RESTORE_MODES = ("eager", "lazy")
#: A live checkpoint holds at most this many bytes of pages the guest wrote before the writer
#: reached them (their old bytes, copied out); past it the writing vCPU or device waits for the
#: writer, so a guest rewriting all its memory runs at the disk's speed rather than doubling
#: its memory.
LIVE_COPY_LIMIT_BYTES = 64 << 20


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
        sections = guest.save_sections()
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
        sections = guest.save_sections()
        harvests = memory.harvests
        capture = _core.LiveCapture(memory.core, copy_limit // PAGE_SIZE)
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


def restore_guest(guest: GuestHandle, checkpoint: Checkpoint, *, mode: str = "eager", dirty_tracking: str = "auto",
                  progress: Callable[[dict[str, Any]], None] | None = None, backing: str = "anon") -> None:
    """Restore a checkpoint read by ``read_checkpoint`` into ``guest``, which has no memory yet:
    its sections are checked first, then its memory is restored (``mode`` eager or lazy, tracked
    by ``dirty_tracking``, backed by ``backing``) and the sections loaded. The guest does not run until
    ``guest.start_running()`` (or its owner starts it). Raises CheckpointError or SectionError
    naming the file if anything does not fit. ``progress`` as for ``files.restore_memory``."""
    if mode not in RESTORE_MODES:
        raise ValueError(f"restore mode {mode!r}: choose {' or '.join(RESTORE_MODES)}")
    what = f"checkpoint '{checkpoint.kern_path}'"
    guest.check_sections(checkpoint.sections, what=what)
    guest.adopt_memory(restore_memory(checkpoint, mode, dirty_tracking=dirty_tracking, progress=progress, backing=backing))
    guest.restore_sections(checkpoint.sections, what=what)
    # A diff checkpoint of the restored guest names this one as its parent.
    guest.memory.start_checkpoint_log((os.path.abspath(checkpoint.path), checkpoint.meta_sha256))


__all__ = ["LIVE_COPY_LIMIT_BYTES", "RESTORE_MODES", "checkpoint_guest", "restore_guest"]
