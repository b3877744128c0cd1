"""Guest-side tooling: the assembler for the simulated ISA (docs/isa.md) and, later, the guest
programs vmmpy ships. Nothing here touches a running VM; it only produces bytes to load."""

from .asm import AsmError, Program, assemble

__all__ = ["AsmError", "Program", "assemble"]
