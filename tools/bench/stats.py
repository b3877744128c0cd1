"""Medians with their spread, and the row every scenario reports."""

from __future__ import annotations

import statistics
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Figure:
    """Repeated measurements of one quantity: median, min, max."""

    values: list[float]
    unit: str
    how: str = ""  # how it was measured, where a reader needs it (the limits)

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def low(self) -> float:
        return min(self.values)

    @property
    def high(self) -> float:
        return max(self.values)

    def text(self) -> str:
        if not self.values:
            return "-"
        fmt = _fmt(self.median)
        if len(self.values) == 1:
            return f"{fmt} {self.unit}"
        return f"{fmt} [{_fmt(self.low)}-{_fmt(self.high)}] {self.unit}"

    def to_dict(self) -> dict[str, Any]:
        d = {"median": self.median, "min": self.low, "max": self.high, "unit": self.unit, "runs": list(self.values)}
        return {**d, "how": self.how} if self.how else d


def _fmt(x: float) -> str:
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    if abs(x) >= 10:
        return f"{x:.1f}"
    if abs(x) >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


@dataclass
class Row:
    """One line of the table. ``ratio`` is figure / limit (both in the same unit), or a ratio to
    another scenario where ``limit`` says so; ``met`` is True/False against ``target``, None when
    the scenario has no target or did not run. ``qemu`` is QEMU's figure for the same work in
    the same unit, measured in the same run (``tools/bench/qemu.py``), ``qemu_ratio`` how many
    times better vmmpy did (``qemu.speedup``), ``qemu_note`` why there is no figure or how it
    failed, ``qemu_detail`` QEMU's other figures and raw runs."""

    scenario: str
    what: str
    figure: Figure | None = None
    limit_name: str = ""
    limit: Figure | None = None
    ratio: float | None = None
    qemu: Figure | None = None
    qemu_ratio: float | None = None
    qemu_note: str = ""
    qemu_detail: dict[str, Any] = field(default_factory=dict)
    target: str = ""
    met: bool | None = None
    qemu_min: float | None = None
    qemu_also: dict[str, float] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    extra: dict[str, Any] = field(default_factory=dict)
    error: str | None = None

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["figure"] = self.figure.to_dict() if self.figure else None
        d["limit"] = self.limit.to_dict() if self.limit else None
        d["qemu"] = self.qemu.to_dict() if self.qemu else None
        return d
