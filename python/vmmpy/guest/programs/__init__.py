"""The guest programs vmmpy ships, by name, and how to build one from ``--guest-arg`` values.

Each program is a module with NAME, DESCRIPTION, ARGUMENTS and ``build(args, memsize,
lowmem_size, highmem_size) -> Program``; this registry wraps them as :class:`GuestProgram`.
``load_program`` builds a registered program, or assembles a ``.s`` file as it is. Programs
follow the platform in ``vmmpy.guest.platform`` (docs/guests.md).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from .. import platform as P
from ..asm import Program, assemble
from . import abtest, ahcitest, blktest, console, hash, memtouch, native, nettest, nvmetest, rndtest, scsitest, vconsole
from ._common import Argument

__all__ = ["NATIVE_PROGRAMS", "PROGRAMS", "Argument", "GuestProgram", "load_native_program", "load_program", "memory_layout", "parse_guest_args"]


@dataclass(frozen=True)
class GuestProgram:
    name: str
    description: str
    arguments: tuple[Argument, ...]
    build: Callable[[dict[str, str], int, int, int], Program]

    def usage(self) -> str:
        """A few lines for ``--help``-style listings."""
        lines = [f"{self.name}: {self.description}"]
        lines += [f"    {a.name}={a.default}: {a.help}" for a in self.arguments]
        return "\n".join(lines)


PROGRAMS: dict[str, GuestProgram] = {
    module.NAME: GuestProgram(module.NAME, module.DESCRIPTION, module.ARGUMENTS, module.build)
    for module in (abtest, memtouch, hash, console, blktest, rndtest, vconsole, nettest, scsitest, nvmetest, ahcitest)
}


def memory_layout(memsize: int, lowmem_limit: int = 3 << 30) -> tuple[int, int]:
    """(lowmem_size, highmem_size) for a memory size, as ``GuestMemory`` lays it out."""
    lowmem = min(memsize, lowmem_limit)
    return lowmem, memsize - lowmem


def parse_guest_args(items: list[str] | tuple[str, ...]) -> dict[str, str]:
    """``["sweeps=100", "highmem=yes"]`` (as ``--guest-arg`` collects them) -> a dict."""
    args: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError(f"--guest-arg {item!r}: expected KEY=VALUE")
        if key in args:
            raise ValueError(f"--guest-arg {key} is given twice")
        args[key] = value
    return args


_IDENTIFIER = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")


def _assemble_file(path: str, args: Mapping[str, str], memsize: int, lowmem_size: int, highmem_size: int) -> Program:
    """A ``.s`` file, assembled as it is at the image base. Its arguments (integers) and the
    memory sizes are appended as ``.equ`` constants, so line numbers in errors stay the file's."""
    with open(path, encoding="utf-8") as f:
        source = f.read()
    constants = {"GUEST_MEMSIZE": memsize, "GUEST_LOWMEM_SIZE": lowmem_size, "GUEST_HIGHMEM_SIZE": highmem_size}
    for key, value in args.items():
        if not _IDENTIFIER.match(key):
            raise ValueError(f"{path}: argument name {key!r} is not an assembler identifier")
        try:
            constants[key] = int(value.replace("_", ""), 0)
        except ValueError:
            raise ValueError(f"{path}: argument {key}={value}: a .s program takes whole numbers only") from None
    source += "\n" + "".join(f".equ {k}, {v:#x}\n" for k, v in constants.items())
    try:
        image = assemble(source, origin=P.IMAGE_BASE)
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    if P.ENTRY_SYMBOL not in image.symbols:
        raise ValueError(f"{path}: no '{P.ENTRY_SYMBOL}' label; execution starts there")
    if image.end > P.IMAGE_LIMIT:
        raise ValueError(f"{path}: the image ends at {image.end:#x}, past the image window's end {P.IMAGE_LIMIT:#x}")
    return image


def load_into(machine: Any, name_or_path: str, args: Mapping[str, str] | None = None, *, memsize: int) -> None:
    """Assemble ``name_or_path`` for the memory layout ``machine`` has set up (the program's
    addresses depend on the lowmem and highmem sizes) and load it: the loader vmmrun and
    ``vmmpy.Vm`` hand the runtime's ``build_machine`` (any object with ``vm.memory`` and
    ``load_program`` will do)."""
    memory = machine.vm.memory
    highmem = memory.highmem.size if memory.highmem is not None else 0
    if getattr(machine.vm, "accel", "sim") == "kvm":
        program = load_native_program(name_or_path, args, memsize=memsize, lowmem_size=memory.lowmem.size, highmem_size=highmem)
    else:
        program = load_program(name_or_path, args, memsize=memsize, lowmem_size=memory.lowmem.size, highmem_size=highmem)
    machine.load_program(program)


#: The programs with an x86-64 build (``native.py``), for the KVM vCPU.
NATIVE_PROGRAMS: dict[str, GuestProgram] = native.native_programs(GuestProgram)


def load_native_program(name: str, args: Mapping[str, str] | None = None, *, memsize: int, lowmem_size: int | None = None,
                        highmem_size: int | None = None) -> Program:
    """The x86-64 build of program ``name``, for the KVM vCPU (``native.py``)."""
    if lowmem_size is None or highmem_size is None:
        lowmem_size, highmem_size = memory_layout(memsize)
    if name not in NATIVE_PROGRAMS:
        raise ValueError(f"guest program {name!r} has no x86-64 build for --accel kvm: choose one of {', '.join(NATIVE_PROGRAMS)}")
    return NATIVE_PROGRAMS[name].build(dict(args or {}), memsize, lowmem_size, highmem_size)


def load_program(
    name_or_path: str,
    args: Mapping[str, str] | None = None,
    *,
    memsize: int,
    lowmem_size: int | None = None,
    highmem_size: int | None = None,
) -> Program:
    """Build the program ``name_or_path`` names (a registered name, or a path to a ``.s`` file)
    for a VM of ``memsize`` bytes. Lowmem and highmem sizes default to the standard layout."""
    if lowmem_size is None or highmem_size is None:
        lowmem_size, highmem_size = memory_layout(memsize)
    args = dict(args or {})
    if name_or_path in PROGRAMS:
        return PROGRAMS[name_or_path].build(args, memsize, lowmem_size, highmem_size)
    if name_or_path.endswith(".s") or os.sep in name_or_path:
        if not os.path.isfile(name_or_path):
            raise ValueError(f"guest program file {name_or_path!r} does not exist")
        return _assemble_file(name_or_path, args, memsize, lowmem_size, highmem_size)
    raise ValueError(f"unknown guest program {name_or_path!r}: choose one of {', '.join(PROGRAMS)} or give a path to a .s file")
