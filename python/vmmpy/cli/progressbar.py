"""The progress bar both tools draw on a terminal during a long operation (a migration round, a
checkpoint's memory write, an eager restore's read, an estimate's measuring window).

It draws only when its stream is a terminal, redrawing one line in place; to a pipe or a log it
writes nothing at all (what those get is each tool's own, e.g. vmmctl's one line per round).
Our own rather than rich or tqdm: one redrawn line beside text the tools already format does not
pay for a dependency in every install.
"""

from __future__ import annotations

import sys
from typing import TextIO

from ..units import format_size

WIDTH = 24


def is_terminal(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):  # no isatty, or closed
        return False


def bar(fraction: float | None, width: int = WIDTH) -> str:
    """``[#####.....]  50%``; an unknown fraction draws an empty bar with ``  ?%``."""
    if fraction is None:
        return f"[{'.' * width}]   ?%"
    fraction = min(1.0, max(0.0, fraction))
    filled = int(fraction * width)
    return f"[{'#' * filled}{'.' * (width - filled)}] {fraction * 100:3.0f}%"


def eta_text(seconds: float | None) -> str:
    if seconds is None:
        return "ETA ?"
    return f"ETA {seconds:.1f} s" if seconds < 60 else f"ETA {int(seconds // 60)} min {int(seconds % 60):02d} s"


class ProgressBar:
    """One status line on a terminal: ``show(text)`` redraws it, ``close()`` ends it with a
    newline (only if something was drawn). Nothing is written when the stream is no terminal, nor
    after a write to it failed."""

    def __init__(self, stream: TextIO | None = None) -> None:
        self.stream = stream if stream is not None else sys.stderr
        self.tty = is_terminal(self.stream)
        self.drawn = False

    def show(self, text: str) -> None:
        if not self.tty:
            return
        self._write("\r\x1b[K" + text)
        self.drawn = self.tty

    def _write(self, text: str) -> None:
        try:
            self.stream.write(text)
            self.stream.flush()
        except OSError:  # the terminal went away: stop drawing, never fail the work shown
            self.tty = False

    def progress(self, label: str, done: float, total: float | None, *, rate: float | None = None,
                 eta_s: float | None = None, unit: str = "bytes") -> None:
        """``label [####....] 42% 12 MiB of 30 MiB, 5 MiB/s, ETA 3.6 s`` (``unit`` "bytes" or
        "s" for a measuring window)."""
        fraction = done / total if total else None
        if unit == "s":
            amounts = f"{done:.1f} of {total:g} s" if total else f"{done:.1f} s"
        else:
            amounts = f"{format_size(done)} of {format_size(total)}" if total else format_size(done)
        parts = [f"{label} {bar(fraction)} {amounts}"]
        if rate:
            parts.append(f"{format_size(rate)}/s")
        if (eta_s is not None or (rate and unit != "s")) and not (total and done >= total):
            parts.append(eta_text(eta_s))
        self.show(", ".join(parts))

    def phase(self, info: dict) -> None:
        """Draw a progress message of ``vmmpy.progress`` (``metered``'s pages or ``timed``'s
        seconds), labelled with its phase."""
        label = info.get("phase", "working")
        if "window_s" in info:
            self.progress(label, info.get("seconds", 0.0), info["window_s"], unit="s")
        elif "total_bytes" in info:
            self.progress(label, info.get("done_bytes", 0), info["total_bytes"], rate=info.get("rate") or None, eta_s=info.get("eta_s"))

    def close(self) -> None:
        if self.drawn and self.tty:
            self._write("\n")
        self.drawn = False
