"""Guest-side tooling: the assembler for the simulated ISA (docs/isa.md), the platform a guest
program runs on (``platform``), the guest programs vmmpy ships (``programs``) and a bare runner
for tests and tools (``runner``). Nothing here touches a running VM; it produces bytes to load
(the runner drives a lone ``_core.Vcpu``, never a VM)."""

from .asm import AsmError, Program, assemble

__all__ = ["AsmError", "Program", "assemble"]
