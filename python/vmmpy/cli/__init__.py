"""The command-line tools: ``vmmrun`` (like bhyve) and ``vmmctl`` (like bhyvectl): they parse
options, talk to the control socket and print; what the commands do lives in ``runtime``."""

import importlib
import os
import signal
from typing import NoReturn


def tool_environment() -> None:
    """Called by vmmrun and vmmctl before anything they do loads numpy (their imports do not),
    never by the library. The tools never multiply matrices, but numpy's BLAS (OpenBLAS) starts a
    thread per CPU when numpy loads: about 0.1 s of CPU at every start, which a busy host pays in
    wall time (`vmmrun --help`, 9 runs each: 385 -> 285 ms of CPU). A value the user set is kept."""
    os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")


def interrupts_end_quietly() -> bool:
    """While a tool loads (its imports take about 0.15 s), Ctrl-C ends it as the signal's default
    does: at once and without the traceback Python prints from inside an import. Nothing has
    started yet, so nothing is left. Only where Python's own handler is in place (not where
    SIGINT is ignored, as in a job a shell started in the background); returns whether it was
    changed, for :func:`interrupts_raise_again`."""
    if signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        return False
    signal.signal(signal.SIGINT, signal.SIG_DFL)
    return True


def interrupts_raise_again(changed: bool) -> None:
    """Once the tool has loaded: Ctrl-C raises KeyboardInterrupt again, which the tool turns into
    its one-line message (or, once a guest runs, powering it off)."""
    if changed and signal.getsignal(signal.SIGINT) == signal.SIG_DFL:
        signal.signal(signal.SIGINT, signal.default_int_handler)


def _launch(module: str) -> NoReturn:
    changed = interrupts_end_quietly()
    main = importlib.import_module(module).main
    interrupts_raise_again(changed)
    raise SystemExit(main())


def vmmrun() -> NoReturn:
    """The ``vmmrun`` command (``python -m vmmpy.cli.vmmrun`` does the same)."""
    _launch("vmmpy.cli.vmmrun")


def vmmctl() -> NoReturn:
    """The ``vmmctl`` command (``python -m vmmpy.cli.vmmctl`` does the same)."""
    _launch("vmmpy.cli.vmmctl")
