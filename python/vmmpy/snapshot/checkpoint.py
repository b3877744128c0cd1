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

import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from ..progress import metered
from ..state.handle import GuestHandle
from .files import Checkpoint, restore_memory, write_checkpoint

RESTORE_MODES = ("eager", "lazy")


def checkpoint_guest(
    guest: GuestHandle,
    path: str | Path,
    *,
    basic: Mapping[str, Any],
    suspend: bool = False,
    progress: Callable[[dict[str, Any]], None] | None = None,
    key: bytes | None = None,
) -> dict[str, Any]:
    """Save ``guest`` to ``path`` (+ ``.kern``, ``.meta``) with ``basic`` as bhyve's basic
    metadata (``ncpus``, ``vmname`` and what the caller adds); keep it running unless
    ``suspend``. With ``key`` the checkpoint is keyed (HMAC-SHA256): only a restore with the
    same key takes it. ``progress`` gets a message when the guest is paused, one every
    ``vmmpy.progress.TICK_S`` seconds while its memory is written (phase "checkpoint" or
    "suspend": pages done of how many, rate, ETA), and one when all is written."""
    path = str(path)
    started = time.perf_counter()
    pause_seconds = guest.pause()
    if progress:
        progress({"phase": "paused", "seconds": round(pause_seconds, 6)})
    try:
        sections = guest.save_sections()
        with metered(progress, "suspend" if suspend else "checkpoint") as meter:
            stats = write_checkpoint(path, guest.memory, sections, basic, key=key, meter=meter)
    except Exception:
        guest.resume()
        raise
    downtime = time.perf_counter() - started
    if suspend:
        guest.stop_for_good(f"suspended to {path}")
    else:
        guest.resume()
    seconds = stats["total_seconds"]
    result = {
        "path": path,
        "suspended": suspend,
        "keyed": key is not None,
        "memory_bytes": guest.memory.memsize,
        "bytes_written": stats["bytes_written"],
        "kern_bytes": stats["kern_bytes"],
        "data_pages": stats["data_pages"],
        "zero_pages": stats["zero_pages"],
        "untouched_pages": stats["untouched_pages"],
        "write_seconds": round(seconds, 6),
        "throughput_bytes_per_s": round(stats["bytes_written"] / seconds) if seconds > 0 else 0,
        "guest_paused_seconds": round(downtime, 6),
    }
    if progress:
        progress({"phase": "written", **result})
    return result


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


__all__ = ["RESTORE_MODES", "checkpoint_guest", "restore_guest"]
