"""Migration reports: the per-round history of one migration drawn so a person sees why it took
as long as it did (``vmmctl --report FILE.png|FILE.html``).

Input is the statistics record (``MigrationStats.to_dict()``, what ``vmmctl --json`` prints).
Four views: pages per round (sent with data, sent as zero ranges, dirtied by the guest while the
round ran), throughput against dirty rate per round, the downtime expected after each round
against the target, and the measured downtime broken down beside the target and target + 20 %.

PNG needs matplotlib (``pip install 'vmmpy[report]'``), imported only when a PNG is asked for.
HTML needs nothing: one self-contained file with inline SVG drawn here and a table of rounds.
The SVG is our own rather than pygal's or matplotlib's: four small charts in ~150 lines keep the
HTML report free of any dependency, so it works wherever vmmctl runs.
"""

from __future__ import annotations

import html
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import VmmpyError

PAGE_SIZE = 4096
MiB = float(1 << 20)
FORMATS = (".png", ".html", ".htm")

COLORS = {
    "data": "#1f77b4", "zero": "#aec7e8", "dirtied": "#d62728", "throughput": "#1f77b4", "dirty": "#d62728",
    "expected": "#9467bd", "target": "#2ca02c", "limit": "#ff7f0e", "cap": "#7f7f7f",
    "final_pages_ms": "#1f77b4", "state_ms": "#ff7f0e", "digest_ms": "#9467bd", "commit_ms": "#8c564b",
}
BREAKDOWN = ("final_pages_ms", "state_ms", "digest_ms", "commit_ms")


class ReportError(VmmpyError):
    """The report could not be drawn or written; the message says why."""


@dataclass
class History:
    """The per-round series a report draws, taken from a statistics record."""

    labels: list[str] = field(default_factory=list)
    data_pages: list[int] = field(default_factory=list)
    zero_pages: list[int] = field(default_factory=list)
    dirtied: list[float | None] = field(default_factory=list)  # None for the final round (guest paused)
    throughput_mib: list[float] = field(default_factory=list)
    dirty_mib: list[float | None] = field(default_factory=list)
    duration_ms: list[float] = field(default_factory=list)
    expected_ms: list[float | None] = field(default_factory=list)
    throttle: list[float] = field(default_factory=list)


def history(stats: dict[str, Any]) -> History:
    if not isinstance(stats, dict):
        raise ReportError(f"a migration statistics record is a JSON object, got {type(stats).__name__}")
    rounds = stats.get("rounds")
    if not isinstance(rounds, list):
        raise ReportError("not a migration statistics record: no 'rounds' list (save one with `vmmctl ... --json`)")
    h = History()
    for i, rnd in enumerate(rounds):
        try:
            final = bool(rnd.get("final"))
            h.labels.append(f"{rnd['round']}{' final' if final else ''}")
            h.data_pages.append(int(rnd["pages_sent"]))
            h.zero_pages.append(int(rnd["zero_pages"]))
            h.duration_ms.append(float(rnd["duration_ms"]))
            h.throughput_mib.append(float(rnd["throughput"]) / MiB)
            h.throttle.append(float(rnd.get("throttle", 0.0)))
            if final or not stats.get("live"):
                h.dirtied.append(None)
                h.dirty_mib.append(None)
                h.expected_ms.append(None)
            else:
                # Older records lack pages_dirtied_during; dirty_rate x duration is the same count.
                during = rnd.get("pages_dirtied_during") or float(rnd["dirty_rate"]) * float(rnd["duration_ms"]) / 1000.0
                h.dirtied.append(float(during))
                h.dirty_mib.append(float(rnd["dirty_rate"]) * PAGE_SIZE / MiB)
                h.expected_ms.append(rnd.get("expected_downtime_ms"))
        except (KeyError, TypeError, ValueError, AttributeError) as err:
            raise ReportError(f"round record {i} is malformed: {type(err).__name__} {err}") from None
    return h


def headline(stats: dict[str, Any]) -> str:
    kind = "live" if stats.get("live") else "warm"
    total = stats.get("total_time_ms") or 0.0
    text = (f"{kind} migration {stats.get('status', '?')} to {stats.get('peer') or '?'} in {total / 1000:.2f} s: "
            f"{len(stats.get('rounds') or [])} rounds, {stats.get('bytes_total', 0) / MiB:.1f} MiB on the wire")
    down, target = stats.get("downtime_ms"), stats.get("downtime_target_ms")
    if down is not None:
        text += f"; downtime {down:.1f} ms" + (f" (target {target:g} ms)" if target else "")
    if stats.get("policy"):
        text += f"; policy {stats['policy']}"
    if stats.get("throttle"):
        text += f", throttle reached {stats['throttle']:.0%}"
    return text


def explanation(stats: dict[str, Any], h: History) -> list[str]:
    """Plain sentences for why it took as long as it did."""
    lines = []
    if stats.get("error"):
        lines.append(f"Ended: {stats['error']}")
    live_rounds = [i for i, d in enumerate(h.dirtied) if d is not None]
    if live_rounds:
        last = live_rounds[-1]
        thr = h.throughput_mib[last]
        dirty = h.dirty_mib[last] or 0.0
        lines.append(f"Last live round: the link carried {thr:.1f} MiB/s while the guest dirtied {dirty:.1f} MiB/s "
                     f"({dirty / thr:.0%} of it)." if thr > 0 else "Last live round carried nothing measurable.")
    if h.duration_ms and stats.get("total_time_ms"):
        first = h.duration_ms[0]
        lines.append(f"Round 0 (every page) took {first:.0f} ms of {stats['total_time_ms']:.0f} ms in total; "
                     f"setup {stats.get('setup_time_ms', 0):.0f} ms.")
    down, target = stats.get("downtime_ms"), stats.get("downtime_target_ms")
    if down is not None and target:
        verdict = "within" if down <= target * 1.2 else "over"
        lines.append(f"Measured downtime {down:.1f} ms is {verdict} target + 20 % ({target * 1.2:g} ms).")
    lines += [f"Note: {n}" for n in stats.get("notes") or []]
    return lines


def write_report(stats: dict[str, Any], path: str | Path) -> Path:
    path = Path(path)
    suffix = path.suffix.lower()
    if suffix not in FORMATS:
        raise ReportError(f"--report {path}: the name must end in .png or .html (got {suffix or 'no suffix'!r})")
    h = history(stats)
    try:
        if suffix == ".png":
            _write_png(stats, h, path)
        else:
            path.write_text(render_html(stats, h), encoding="utf-8")
    except OSError as err:
        raise ReportError(f"--report {path}: {err.strerror or err}") from None
    return path


# -- PNG (matplotlib) ------------------------------------------------------------------------------
def _write_png(stats: dict[str, Any], h: History, path: Path) -> None:
    fig = png_figure(stats, h)
    import matplotlib.pyplot as plt

    fig.savefig(path, dpi=100)
    plt.close(fig)


def no_rounds(stats: dict[str, Any]) -> str:
    """What to draw in place of per-round panels when no round finished (a migration cancelled or
    failed during round 0, or refused in the handshake)."""
    sent = stats.get("bytes_total", 0) / MiB
    return (f"no round finished: the migration ended {stats.get('status', '?')} before round 0 did "
            f"({sent:.1f} MiB had been sent)")


def png_figure(stats: dict[str, Any], h: History) -> Any:
    """The four panels as a matplotlib figure (the caller saves and closes it)."""
    try:
        import matplotlib
    except ImportError:
        raise ReportError("--report FILE.png needs matplotlib: pip install 'vmmpy[report]' "
                          "(or ask for FILE.html, which needs nothing)") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    x = list(range(len(h.labels)))
    fig, axes = plt.subplots(2, 2, figsize=(13, 8.5), constrained_layout=True)
    fig.suptitle(headline(stats), fontsize=11)
    (ax_pages, ax_rate), (ax_expect, ax_down) = axes

    width = 0.38
    ax_pages.bar([i - width / 2 for i in x], h.data_pages, width, label="sent with data", color=COLORS["data"])
    ax_pages.bar([i - width / 2 for i in x], h.zero_pages, width, bottom=h.data_pages, label="sent as zero ranges", color=COLORS["zero"])
    dirtied = [d if d is not None else 0 for d in h.dirtied]
    ax_pages.bar([i + width / 2 for i in x], dirtied, width, label="dirtied while the round ran", color=COLORS["dirtied"])
    ax_pages.set_title("Pages per round")
    ax_pages.set_ylabel("pages")
    if _wide_range([*h.data_pages, *h.zero_pages, *dirtied]):
        # A log axis autoscaled to the bars' tops would cut every bar that starts at 0 (a guest
        # that dirties all memory showed round 0 as nearly all zero pages): start it a decade
        # below the smallest count.
        ax_pages.set_yscale("log")
        ax_pages.set_ylim(bottom=_log_bottom([*h.data_pages, *h.zero_pages, *dirtied]))
    ax_pages.legend(fontsize=8)

    ax_rate.plot(x, h.throughput_mib, "o-", color=COLORS["throughput"], linewidth=4, markersize=7, alpha=0.6,
                 label="throughput (sent)")
    dx = [i for i, v in zip(x, h.dirty_mib) if v is not None]
    ax_rate.plot(dx, [v for v in h.dirty_mib if v is not None], "s--", color=COLORS["dirty"], markersize=3,
                 label="guest dirty rate (pages dirty after the round / its time)")
    if stats.get("bandwidth_cap"):
        ax_rate.axhline(stats["bandwidth_cap"] / MiB, color=COLORS["cap"], linestyle=":", label="bandwidth cap")
    ax_rate.set_title("Throughput and dirty rate per round")
    ax_rate.set_ylabel("MiB/s")
    ax_rate.set_ylim(bottom=0)
    ax_rate.legend(fontsize=8)

    target = stats.get("downtime_target_ms")
    ex = [i for i, v in zip(x, h.expected_ms) if v is not None]
    if ex:
        ax_expect.plot(ex, [v for v in h.expected_ms if v is not None], "o-", color=COLORS["expected"],
                       label="expected downtime after the round")
        if target:
            ax_expect.axhline(target, color=COLORS["target"], linestyle="--", label=f"target {target:g} ms")
        if _wide_range([v for v in h.expected_ms if v is not None] + ([target] if target else [])):
            ax_expect.set_yscale("log")
        ax_expect.legend(fontsize=8)
    else:
        ax_expect.text(0.5, 0.5, "warm migration: no live rounds,\nthe guest was paused for the whole copy",
                       ha="center", va="center", transform=ax_expect.transAxes)
    ax_expect.set_title("Switch-over outlook: expected downtime after each live round")
    ax_expect.set_ylabel("ms")

    parts = stats.get("downtime_breakdown") or {}
    left = 0.0
    for name in BREAKDOWN:
        value = float(parts.get(name, 0.0))
        ax_down.barh([0], [value], left=left, color=COLORS[name], label=f"{name[:-3].replace('_', ' ')} {value:.1f} ms")
        left += value
    if stats.get("downtime_ms") is not None:
        ax_down.barh([1], [stats["downtime_ms"]], color="#444444", label=f"measured {stats['downtime_ms']:.1f} ms")
    if target:
        ax_down.axvline(target, color=COLORS["target"], linestyle="--", label=f"target {target:g} ms")
        ax_down.axvline(target * 1.2, color=COLORS["limit"], linestyle=":", label="target + 20 %")
    ax_down.set_yticks([0, 1], ["breakdown", "downtime"])
    ax_down.set_ylim(-0.5, 2.9)
    ax_down.set_xlabel("ms (guest paused to COMMITTED sent)")
    ax_down.set_title("Downtime against the target")
    ax_down.legend(fontsize=8, loc="upper center", ncol=3)

    for ax in (ax_pages, ax_rate, ax_expect):
        ax.set_xticks(x, h.labels, rotation=45 if len(x) > 12 else 0, fontsize=8)
        ax.set_xlabel("round")
        ax.grid(axis="y", alpha=0.3)
        if not h.labels:
            ax.text(0.5, 0.5, no_rounds(stats), ha="center", va="center", wrap=True, transform=ax.transAxes)
    fig.supxlabel("\n".join(explanation(stats, h)), fontsize=9, ha="left", x=0.01)
    return fig


def _log_bottom(values: list[float]) -> float:
    """The power of ten at or below the smallest positive value: a log axis's honest floor."""
    positive = [v for v in values if v and v > 0]
    return 10.0 ** math.floor(math.log10(min(positive))) if positive else 1.0


def _wide_range(values: list[float]) -> bool:
    positive = [v for v in values if v and v > 0]
    return bool(positive) and max(positive) / min(positive) > 50


# -- HTML (inline SVG, no dependencies) ------------------------------------------------------------
W, H = 560, 260
MARGIN_L, MARGIN_R, MARGIN_T, MARGIN_B = 62, 14, 28, 42


def _nice_ticks(top: float, count: int = 5) -> list[float]:
    if top <= 0:
        return [0.0, 1.0]
    raw = top / count
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    return [i * step for i in range(int(math.ceil(top / step)) + 1)]


def _fmt(v: float) -> str:
    if v == 0:
        return "0"
    if abs(v) >= 1e6 or abs(v) < 1e-2:
        return f"{v:.0e}"
    return f"{v:g}" if v == int(v) else f"{v:.3g}"


class _Axes:
    """Maps values to pixels on a linear or log scale."""

    def __init__(self, values: list[float], log: bool) -> None:
        positive = [v for v in values if v is not None and v > 0]
        self.log = log and bool(positive)
        if self.log:
            self.lo = 10 ** math.floor(math.log10(min(positive)))
            self.hi = 10 ** math.ceil(math.log10(max(positive)))
            if self.hi <= self.lo:
                self.hi = self.lo * 10
            self.ticks = [10 ** e for e in range(int(round(math.log10(self.lo))), int(round(math.log10(self.hi))) + 1)]
        else:
            self.ticks = _nice_ticks(max(positive, default=1.0))
            self.lo, self.hi = 0.0, self.ticks[-1]

    def y(self, v: float) -> float:
        plot_h = H - MARGIN_T - MARGIN_B
        if self.log:
            v = max(v, self.lo)
            frac = (math.log10(v) - math.log10(self.lo)) / (math.log10(self.hi) - math.log10(self.lo))
        else:
            frac = v / self.hi if self.hi else 0.0
        return H - MARGIN_B - frac * plot_h


def svg_chart(title: str, labels: list[str], ylabel: str, *, bars=(), stacked=(), lines=(), hlines=(), log=False) -> str:
    """A chart of per-round series: ``bars`` side by side, ``stacked`` piled in the first bar slot,
    ``lines`` as polylines (None = no point), ``hlines`` as dashed reference lines.
    Each series is (name, color, values); an hline is (name, color, value)."""
    n = max(len(labels), 1)
    values = [v for _, _, vs in (*bars, *lines) for v in vs if v is not None]
    values += [sum(v or 0 for v in col) for col in zip(*(vs for _, _, vs in stacked))] if stacked else []
    values += [v for _, _, v in hlines]
    ax = _Axes(values, log)
    plot_w = W - MARGIN_L - MARGIN_R
    slot = plot_w / n
    groups = (1 if stacked else 0) + len(bars)
    bar_w = slot * 0.8 / max(groups, 1)
    cx = lambda i: MARGIN_L + slot * (i + 0.5)  # noqa: E731 - the x of round i's centre
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
           f'font-family="sans-serif" font-size="11">',
           f'<text x="{W / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">{html.escape(title)}</text>']
    for t in ax.ticks:
        y = ax.y(t)
        out.append(f'<line x1="{MARGIN_L}" x2="{W - MARGIN_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="#ddd"/>')
        out.append(f'<text x="{MARGIN_L - 4}" y="{y + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    out.append(f'<text transform="translate(14,{(H - MARGIN_B + MARGIN_T) / 2}) rotate(-90)" text-anchor="middle">{html.escape(ylabel)}</text>')
    base = ax.y(ax.lo if ax.log else 0.0)

    def rect(x0: float, v0: float, v1: float, color: str, tip: str) -> str:
        y0, y1 = ax.y(v0) if v0 > 0 or not ax.log else base, ax.y(v1)
        return (f'<rect x="{x0:.1f}" y="{min(y0, y1):.1f}" width="{bar_w:.1f}" height="{abs(y0 - y1):.1f}" fill="{color}">'
                f'<title>{html.escape(tip)}</title></rect>')

    left0 = lambda i: cx(i) - groups * bar_w / 2  # noqa: E731
    for i in range(len(labels)):
        g = 0
        if stacked:
            bottom = 0.0
            for name, color, vs in stacked:
                v = vs[i] or 0
                if v > 0:
                    out.append(rect(left0(i), bottom, bottom + v, color, f"round {labels[i]}: {name} {_fmt(v)}"))
                bottom += v
            g = 1
        for k, (name, color, vs) in enumerate(bars):
            v = vs[i]
            if v:
                out.append(rect(left0(i) + (g + k) * bar_w, 0.0, v, color, f"round {labels[i]}: {name} {_fmt(v)}"))
    for _name, color, vs in lines:
        pts = [(cx(i), ax.y(v)) for i, v in enumerate(vs) if v is not None and (v > 0 or not ax.log)]
        if pts:
            out.append(f'<polyline fill="none" stroke="{color}" stroke-width="2" points="{" ".join(f"{x:.1f},{y:.1f}" for x, y in pts)}"/>')
            out += [f'<circle cx="{x:.1f}" cy="{y:.1f}" r="3" fill="{color}"/>' for x, y in pts]
    for _name, color, v in hlines:
        y = ax.y(v)
        out.append(f'<line x1="{MARGIN_L}" x2="{W - MARGIN_R}" y1="{y:.1f}" y2="{y:.1f}" stroke="{color}" stroke-dasharray="6,4" stroke-width="1.5"/>')
    out.append(f'<line x1="{MARGIN_L}" x2="{W - MARGIN_R}" y1="{H - MARGIN_B}" y2="{H - MARGIN_B}" stroke="#333"/>')
    every = max(1, math.ceil(len(labels) / 16))
    for i, label in enumerate(labels):
        if i % every == 0:
            out.append(f'<text x="{cx(i):.1f}" y="{H - MARGIN_B + 14}" text-anchor="middle">{html.escape(label)}</text>')
    out.append(f'<text x="{MARGIN_L + plot_w / 2}" y="{H - 8}" text-anchor="middle">round{" (log scale)" if ax.log else ""}</text>')
    out.append("</svg>")
    legend = [(name, color) for name, color, _ in (*stacked, *bars, *lines, *hlines)]
    return "\n".join(out) + _legend(legend)


def _legend(items: list[tuple[str, str]]) -> str:
    return '<div class="legend">' + "".join(
        f'<span><i style="background:{c}"></i>{html.escape(n)}</span>' for n, c in items) + "</div>"


def svg_downtime(stats: dict[str, Any]) -> str:
    parts = stats.get("downtime_breakdown") or {}
    down = stats.get("downtime_ms")
    target = stats.get("downtime_target_ms")
    segments = [(name, float(parts.get(name, 0.0))) for name in BREAKDOWN]
    top = max([sum(v for _, v in segments), down or 0.0, (target or 0.0) * 1.2, 1e-3])
    w, h, left, right = W, 120, 90, 20
    scale = (w - left - right) / (top * 1.05)
    out = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{w}" height="{h}" font-family="sans-serif" font-size="11">',
           f'<text x="{w / 2}" y="16" text-anchor="middle" font-size="13" font-weight="bold">Downtime against the target (ms)</text>',
           f'<text x="{left - 6}" y="44" text-anchor="end">breakdown</text>',
           f'<text x="{left - 6}" y="74" text-anchor="end">measured</text>']
    x = left
    for name, v in segments:
        out.append(f'<rect x="{x:.1f}" y="32" width="{v * scale:.1f}" height="18" fill="{COLORS[name]}"><title>{name} {v:.2f} ms</title></rect>')
        x += v * scale
    if down is not None:
        out.append(f'<rect x="{left}" y="62" width="{down * scale:.1f}" height="18" fill="#444"><title>measured {down:.2f} ms</title></rect>')
    for value, color, name in ((target, COLORS["target"], "target"), ((target or 0) * 1.2, COLORS["limit"], "+20 %")):
        if target:
            xv = left + value * scale
            out.append(f'<line x1="{xv:.1f}" x2="{xv:.1f}" y1="26" y2="86" stroke="{color}" stroke-dasharray="5,3" stroke-width="2"/>')
            out.append(f'<text x="{xv:.1f}" y="100" text-anchor="middle" fill="{color}">{name} {value:g}</text>')
    out.append("</svg>")
    legend = [(f"{n[:-3].replace('_', ' ')} {v:.1f} ms", COLORS[n]) for n, v in segments]
    if down is not None:
        legend.append((f"measured {down:.1f} ms", "#444"))
    return "\n".join(out) + _legend(legend)


def render_html(stats: dict[str, Any], h: History | None = None) -> str:
    h = h or history(stats)
    target = stats.get("downtime_target_ms")
    charts = [] if not h.labels else [
        svg_chart("Pages per round", h.labels, "pages",
                  stacked=[("sent with data", COLORS["data"], h.data_pages), ("sent as zero ranges", COLORS["zero"], h.zero_pages)],
                  bars=[("dirtied while the round ran", COLORS["dirtied"], h.dirtied)],
                  log=_wide_range([*h.data_pages, *h.zero_pages, *(d or 0 for d in h.dirtied)])),
        svg_chart("Throughput and dirty rate per round", h.labels, "MiB/s",
                  lines=[("throughput (sent)", COLORS["throughput"], h.throughput_mib), ("guest dirty rate", COLORS["dirty"], h.dirty_mib)],
                  hlines=[("bandwidth cap", COLORS["cap"], stats["bandwidth_cap"] / MiB)] if stats.get("bandwidth_cap") else []),
    ]
    expected = [v for v in h.expected_ms if v is not None]
    if expected:
        charts.append(svg_chart("Expected downtime after each live round", h.labels, "ms",
                                lines=[("expected downtime", COLORS["expected"], h.expected_ms)],
                                hlines=[(f"target {target:g} ms", COLORS["target"], target)] if target else [],
                                log=_wide_range(expected + ([target] if target else []))))
    charts.append(svg_downtime(stats))
    rows = "".join(
        f"<tr><td>{html.escape(lab)}</td><td>{d}</td><td>{z}</td><td>{'' if dd is None else f'{dd:.0f}'}</td>"
        f"<td>{ms:.1f}</td><td>{t:.1f}</td><td>{'' if dm is None else f'{dm:.1f}'}</td>"
        f"<td>{'' if e is None else f'{e:.1f}'}</td><td>{th:.0%}</td></tr>"
        for lab, d, z, dd, ms, t, dm, e, th in zip(h.labels, h.data_pages, h.zero_pages, h.dirtied, h.duration_ms,
                                                   h.throughput_mib, h.dirty_mib, h.expected_ms, h.throttle))
    why = "".join(f"<li>{html.escape(line)}</li>" for line in explanation(stats, h))
    return f"""<!DOCTYPE html>
<html><head><meta charset="utf-8"><title>vmmpy migration report</title>
<style>
body {{ font-family: sans-serif; margin: 1.5em; color: #222; }}
h1 {{ font-size: 1.1em; }}
.charts {{ display: flex; flex-wrap: wrap; gap: 1.5em; }}
.legend span {{ margin-right: 1em; font-size: 12px; }}
.legend i {{ display: inline-block; width: 10px; height: 10px; margin-right: 4px; }}
table {{ border-collapse: collapse; font-size: 12px; margin-top: 1em; }}
td, th {{ border: 1px solid #ccc; padding: 2px 6px; text-align: right; }}
</style></head><body>
<h1>{html.escape(headline(stats))}</h1>
<ul>{why}</ul>
{f"<p><b>{html.escape(no_rounds(stats))}</b></p>" if not h.labels else ""}
<div class="charts">
{"".join(f"<div>{c}</div>" for c in charts)}
</div>
<table><tr><th>round</th><th>data pages</th><th>zero pages</th><th>dirtied meanwhile</th><th>ms</th><th>MiB/s sent</th>
<th>MiB/s dirtied</th><th>expected downtime ms</th><th>throttle</th></tr>
{rows}</table>
</body></html>
"""
