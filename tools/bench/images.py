"""Guest images for the scenarios: a checkpoint (bhyve's three files) of a machine that has a
shipped guest program loaded and part of its memory filled with random bytes, written by this
process before anything is timed. ``vmmrun -r IMAGE`` then starts a real guest whose memory is
already random, so what the scenarios time is the migration or checkpoint, not the filling."""

from __future__ import annotations

import gc
import os

import numpy as np

from vmmpy.memory import HIGHMEM_BASE
from vmmpy.runtime.commands import basic_metadata
from vmmpy.runtime.config import VmConfig
from vmmpy.runtime.process import Machine
from vmmpy.snapshot.files import write_checkpoint
from vmmpy.state.kernel import save_sections

MIB, GIB = 1 << 20, 1 << 30
FILL_START = 2 * MIB  # below it: the guest image and its stack (docs/guests.md)
LPC = {"com1": os.devnull}


def fill_random(memory, nbytes: int, seed: int, start: int = FILL_START, piece: int = 64 * MIB) -> int:
    """Write ``nbytes`` of random bytes from guest-physical ``start`` upwards (lowmem, then
    highmem at 4 GiB), stopping at the end of memory; returns the bytes written."""
    rng = np.random.default_rng(seed)
    lowmem_end = memory.lowmem.size
    highmem_size = memory.highmem.size if memory.highmem is not None else 0
    offset, written = start, 0  # offset in "flat" memory: lowmem then highmem
    while written < nbytes and offset < lowmem_end + highmem_size:
        n = min(piece, nbytes - written, (lowmem_end if offset < lowmem_end else lowmem_end + highmem_size) - offset)
        gpa = offset if offset < lowmem_end else HIGHMEM_BASE + offset - lowmem_end
        memory.write(gpa, rng.integers(0, 1 << 64, n // 8, dtype=np.uint64, endpoint=False).view(np.uint8))
        offset += n
        written += n
    return written


_WORDS = ("the guest memory page migration dirty round vmmpy bhyve kernel return struct int 0x7f3a error: INFO value = "
          "{ } for if else while size offset buffer socket").split()


def text_chunk(seed: int, size: int = MIB) -> np.ndarray:
    """``size`` bytes of text-like content (log or source lines from a small vocabulary, with
    numbers), as a page cache of text files holds: LZ4 takes it to about half."""
    rng = np.random.default_rng(seed)
    parts: list[str] = []
    length = 0
    while length < size:
        words = rng.choice(_WORDS, 64)
        numbers = rng.integers(0, 100000, 8)
        line = " ".join(words[:24]) + f" {numbers[0]}\n    " + " ".join(words[24:]) + f" {numbers[1]} {numbers[2]}\n"
        parts.append(line)
        length += len(line)
    return np.frombuffer("".join(parts).encode()[:size], dtype=np.uint8)


def fill_text(memory, nbytes: int, seed: int, start: int = FILL_START) -> int:
    """As :func:`fill_random`, with text-like pages (a fresh 1 MiB of text every 64 MiB: LZ4
    looks 64 KiB back at most, so repeating it costs nothing in realism)."""
    lowmem_end = memory.lowmem.size
    highmem_size = memory.highmem.size if memory.highmem is not None else 0
    offset, written = start, 0
    chunk = text_chunk(seed)
    while written < nbytes and offset < lowmem_end + highmem_size:
        if written % (64 * MIB) == 0:
            chunk = text_chunk(seed + written // (64 * MIB))
        n = min(len(chunk), nbytes - written, (lowmem_end if offset < lowmem_end else lowmem_end + highmem_size) - offset)
        gpa = offset if offset < lowmem_end else HIGHMEM_BASE + offset - lowmem_end
        memory.write(gpa, chunk[:n])
        offset += n
        written += n
    return written


def build_image(path: str, *, memsize: int, guest: str, guest_args: dict[str, str] | None = None, random_bytes: int,
                tsc: str = "instructions", seed: int = 1, wired: bool = False, fill: str = "random") -> dict:
    """Write checkpoint ``path`` (+ .kern, .meta) of a fresh machine running ``guest`` from its
    start, with ``random_bytes`` of memory from 2 MiB up filled with random bytes (``fill="random"``)
    or text-like pages (``fill="text"``). Returns what was written."""
    config = VmConfig(name="bench-image", memsize=memsize, wired=wired, guest=guest, guest_args=dict(guest_args or {}), tsc=tsc,
                      lpc=dict(LPC), dirty_tracking="soft")
    config.validate()
    machine = Machine(config)
    memory = None
    try:
        machine.setup_memory()
        from vmmpy.guest.programs import load_program

        memory = machine.vm.memory
        highmem = memory.highmem.size if memory.highmem is not None else 0
        machine.load_program(load_program(guest, config.guest_args, memsize=memsize, lowmem_size=memory.lowmem.size,
                                          highmem_size=highmem))
        filled = (fill_text if fill == "text" else fill_random)(memory, random_bytes, seed)
        stats = write_checkpoint(path, memory, save_sections(machine), basic_metadata(config))
    finally:
        machine.close()
        # The machine's objects refer to each other, so its guest memory is only unmapped when
        # the cycle collector runs: do it now, or a 4 GiB image stays in this process while the
        # guests that use it run (two 4 GiB images at once got the bench OOM-killed).
        del machine, memory
        gc.collect()
    return {"path": path, "memsize": memsize, "random_bytes": filled, "bytes_written": stats["bytes_written"]}


def remove_image(path: str) -> None:
    for suffix in ("", ".kern", ".meta"):
        try:
            os.unlink(path + suffix)
        except FileNotFoundError:
            pass
