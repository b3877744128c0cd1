"""The LPC bridge's legacy devices: COM1/COM2 UARTs and ACPI power management.

``-l com1,stdio`` or ``-l com1,FILE`` gives COM1 a console backend, as bhyve's ``-l``. UART
interrupt lines go to the VM's ISA IRQs (COM1 IRQ 4, COM2 IRQ 3).
"""

from __future__ import annotations

from collections.abc import Callable

from .uart import COM1_BASE, COM1_IRQ, COM2_BASE, COM2_IRQ, ConsoleBackend, FileConsole, StdioConsole, Uart

COM_PORTS = {"com1": (COM1_BASE, COM1_IRQ), "com2": (COM2_BASE, COM2_IRQ)}


def console_backend(spec: str, on_input: Callable[[bytes], None] | None = None) -> ConsoleBackend:
    """``stdio`` or a file path (opened for appending)."""
    if spec == "stdio":
        return StdioConsole(on_input)
    try:
        return FileConsole(spec)
    except OSError as err:
        raise ValueError(f"-l: cannot open console file {spec!r}: {err.strerror}") from None


def make_uarts(
    lpc_config: dict[str, str],
    raise_irq: Callable[[int, bool], None],
    backends: dict[str, ConsoleBackend] | None = None,
) -> list[Uart]:
    """One UART per configured COM port (both always exist, like a PC's; unconfigured ones
    discard output)."""
    uarts = []
    for name, (base, irq) in COM_PORTS.items():
        backend = (backends or {}).get(name)
        uart = Uart(f"lpc.{name}", base, None, irq=lambda level, irq=irq: raise_irq(irq, level))
        if backend is None and name in lpc_config:
            backend = console_backend(lpc_config[name], on_input=uart.receive)
        uart.backend = backend
        uarts.append(uart)
    return uarts
