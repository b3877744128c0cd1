"""The installed ``vmmrun`` and ``vmmctl`` commands (pyproject.toml's entry points): each loads its
tool with Ctrl-C ending it quietly, then runs it. ``python -m vmmpy.cli.vmmrun`` (or ``vmmctl``)
does the same from the tool's own module."""

import importlib
import signal
from typing import NoReturn


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
    """The ``vmmrun`` command."""
    _launch("vmmpy.cli.vmmrun")


def vmmctl() -> NoReturn:
    """The ``vmmctl`` command."""
    _launch("vmmpy.cli.vmmctl")
