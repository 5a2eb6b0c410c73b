"""Small hand-written SVG charts for the offline HTML report (no JavaScript, no CDN).

Every chart carries ``data-plot`` (what it shows) and ``data-points`` (how many
data points it drew), so a test of the rendered page can tell an empty chart
from a real one.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from html import escape

from wanrender.bench.labels import fit_lines

PALETTE = ("#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf", "#7f7f7f", "#bcbd22")
FONT = 'font-family="system-ui, sans-serif" font-size="11"'
# Past the palette, series repeat its colours with another dash: still told apart.
DASHES = ("", "7 3", "2 2", "9 3 2 3")
# A legend line of 30 characters (~6.5 px each) beside the plot; three lines at most.
LEGEND_CHARS, LEGEND_LINES, LINE_PX = 30, 3, 12


@dataclass(frozen=True)
class Series:
    name: str
    points: tuple[tuple[float, float], ...]
    color: str
    markers: bool = True
    dash: str = ""  # stroke-dasharray


@dataclass(frozen=True)
class HLine:
    y: float
    label: str
    color: str = "#b00"


@dataclass(frozen=True)
class Band:
    x0: float
    x1: float
    label: str
    color: str = "#eef"


def style(i: int) -> tuple[str, str]:
    """The i-th series' colour and dash: distinct for len(PALETTE) * len(DASHES) series."""
    return PALETTE[i % len(PALETTE)], DASHES[i // len(PALETTE) % len(DASHES)]


def nice_ticks(lo: float, hi: float, n: int = 5, integer: bool = False) -> list[float]:
    """Round tick values covering [lo, hi] (1, 2, 5 x 10^k steps; whole steps for
    ``integer`` data such as frame counts, which have nothing between two ticks)."""
    if not math.isfinite(lo) or not math.isfinite(hi):
        return [0.0]
    if hi <= lo:
        hi = lo + (abs(lo) or 1.0)
    raw = (hi - lo) / max(1, n)
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if m * mag >= raw)
    if integer:
        step = max(step, 1.0)
    start = math.floor(lo / step) * step
    ticks = []
    v = start
    while v <= hi + step * 0.5 and len(ticks) < 50:
        ticks.append(round(v, 10))
        v += step
    return ticks


def fmt(v: float) -> str:
    if v == 0:
        return "0"
    a = abs(v)
    whole = float(v).is_integer()
    if a >= 1000 and whole:
        return f"{v:,.0f}"
    if a >= 10:  # 12.5 stays 12.5: rounding would give two ticks one label
        return f"{v:.0f}" if whole else f"{v:.1f}".rstrip("0").rstrip(".")
    if a >= 1:
        return f"{v:.1f}".rstrip("0").rstrip(".")
    return f"{v:.3g}"


def xy_chart(series: list[Series], *, plot: str, title: str, x_label: str, y_label: str,
             hlines: tuple[HLine, ...] = (), bands: tuple[Band, ...] = (), width: int = 640, height: int = 300,
             y_zero: bool = True, legend: bool = True) -> str:  # fmt: skip
    """A line/scatter chart; an empty one says so instead of drawing axes around nothing."""
    pts = [p for s in series for p in s.points if p[1] is not None and math.isfinite(p[1])]
    n_points = len(pts)
    # The legend takes what its longest line needs (~6.5 px a character) and the height
    # all its entries need: a series without its entry cannot be told from the others.
    shown = fit_lines([s.name for s in series], LEGEND_CHARS, LEGEND_LINES)
    with_legend = bool(pts) and legend and len(series) > 1
    legend_w = 34 + int(6.5 * max(len(ln) for lines in shown for ln in lines)) if with_legend else 0
    if with_legend:
        height = max(height, 24 + 10 + sum(len(lines) * LINE_PX + 4 for lines in shown) + 10)
    head = (f'<svg class="plot" data-plot="{escape(plot)}" data-points="{n_points}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">')  # fmt: skip
    out = [head, f"<title>{escape(title)}</title>", f'<rect width="{width}" height="{height}" fill="#fff"/>']
    if not pts:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" {FONT} fill="#888">no data</text></svg>'
        )
        return "".join(out)
    left, right, top, bottom = 62, 14 + legend_w, 24, 40
    xs = [p[0] for p in pts] + [b.x0 for b in bands] + [b.x1 for b in bands]
    ys = [p[1] for p in pts] + [h.y for h in hlines]
    x_lo, x_hi = min(xs), max(xs)
    if x_hi == x_lo:
        x_lo, x_hi = x_lo - 1, x_hi + 1
    y_lo, y_hi = (min(0.0, min(ys)) if y_zero else min(ys)), max(ys)
    yt = nice_ticks(y_lo, y_hi)
    xt = nice_ticks(x_lo, x_hi, 6, integer=all(float(x).is_integer() for x in xs))
    y_lo, y_hi = min(yt[0], y_lo), max(yt[-1], y_hi)
    if y_hi == y_lo:
        y_hi = y_lo + 1
    pw, ph = width - left - right, height - top - bottom

    def X(x: float) -> float:
        return round(left + (x - x_lo) / (x_hi - x_lo) * pw, 2)

    def Y(y: float) -> float:
        return round(top + ph - (y - y_lo) / (y_hi - y_lo) * ph, 2)

    out.append(f'<text x="{left}" y="15" {FONT} font-weight="bold">{escape(title)}</text>')
    for b in bands:
        x0, x1 = X(max(b.x0, x_lo)), X(min(b.x1, x_hi))
        out.append(f'<rect class="band" x="{x0}" y="{top}" width="{max(0.5, x1 - x0)}" height="{ph}" fill="{b.color}">'
                   f'<title>{escape(b.label)}</title></rect>')  # fmt: skip
        if x1 - x0 > 6 * len(b.label):  # a narrow band keeps its label as a tooltip only
            out.append(f'<text x="{x0 + 2}" y="{top + 10}" {FONT} fill="#667" font-size="9">{escape(b.label)}</text>')
    for t in yt:
        if y_lo <= t <= y_hi:
            out.append(f'<line x1="{left}" x2="{left + pw}" y1="{Y(t)}" y2="{Y(t)}" stroke="#e5e5e5"/>'
                       f'<text x="{left - 5}" y="{Y(t) + 4}" text-anchor="end" {FONT}>{fmt(t)}</text>')  # fmt: skip
    for t in xt:
        if x_lo <= t <= x_hi:
            out.append(f'<line x1="{X(t)}" x2="{X(t)}" y1="{top + ph}" y2="{top + ph + 4}" stroke="#333"/>'
                       f'<text x="{X(t)}" y="{top + ph + 16}" text-anchor="middle" {FONT}>{fmt(t)}</text>')  # fmt: skip
    out.append(f'<rect x="{left}" y="{top}" width="{pw}" height="{ph}" fill="none" stroke="#333"/>')
    out.append(f'<text x="{left + pw / 2}" y="{height - 6}" text-anchor="middle" {FONT}>{escape(x_label)}</text>')
    out.append(
        f'<text transform="translate(13,{top + ph / 2}) rotate(-90)" text-anchor="middle" {FONT}>{escape(y_label)}</text>'
    )
    for h in hlines:
        out.append(f'<line class="limit" x1="{left}" x2="{left + pw}" y1="{Y(h.y)}" y2="{Y(h.y)}" stroke="{h.color}" '
                   f'stroke-dasharray="6 4" stroke-width="1.5"/><text x="{left + pw - 4}" y="{Y(h.y) - 4}" '
                   f'text-anchor="end" {FONT} fill="{h.color}">{escape(h.label)}</text>')  # fmt: skip
    for s in series:
        p = [(x, y) for x, y in sorted(s.points) if y is not None and math.isfinite(y)]
        if not p:
            continue
        d = " ".join(f"{'M' if i == 0 else 'L'}{X(x)},{Y(y)}" for i, (x, y) in enumerate(p))
        out.append(
            f'<path class="series" data-series="{escape(s.name)}" d="{d}" fill="none" stroke="{s.color}" '
            f'stroke-width="1.8"{_dash(s)}><title>{escape(s.name)}</title></path>'
        )
        if s.markers:
            for x, y in p:
                out.append(f'<circle cx="{X(x)}" cy="{Y(y)}" r="3.2" fill="{s.color}"><title>{escape(s.name)}: '
                           f'{fmt(x)}, {fmt(y)}</title></circle>')  # fmt: skip
    if with_legend:
        lx, y = left + pw + 10, top + 8
        for s, lines in zip(series, shown):
            out.append(f'<g class="legend"><title>{escape(s.name)}</title><line x1="{lx}" x2="{lx + 18}" y1="{y - 2}" '
                       f'y2="{y - 2}" stroke="{s.color}" stroke-width="2.5"{_dash(s)}/>'
                       f"<text y=\"{y + 2}\" {FONT}>{_tspans(lines, lx + 22)}</text></g>")  # fmt: skip
            y += len(lines) * LINE_PX + 4
    out.append("</svg>")
    return "".join(out)


def _dash(s: Series) -> str:
    return f' stroke-dasharray="{s.dash}"' if s.dash else ""


def _tspans(lines: list[str], x: float) -> str:
    """Lines of one <text>, each below the last."""
    return "".join(f'<tspan x="{x}" dy="{0 if i == 0 else LINE_PX}">{escape(ln)}</tspan>' for i, ln in enumerate(lines))


def stacked_bars(rows: list[tuple[str, dict[str, float]]], stages: list[str], *, plot: str, title: str,
                 width: int = 760) -> str:  # fmt: skip
    """Horizontal stacked bars, one per case, one colour per stage (seconds)."""
    n_points = sum(1 for _, v in rows for s in stages if v.get(s))
    bar_h, gap, top = 16, 6, 40
    # Labels of up to three lines of 40 characters beside the bars (~6.5 px a character);
    # a row is as tall as its label.
    shown = fit_lines([label for label, _ in rows], 40, 3)
    left = 16 + int(6.5 * max((len(ln) for lines in shown for ln in lines), default=10))
    row_h = [max(bar_h, len(lines) * LINE_PX + 2) for lines in shown]
    height = top + sum(h + gap for h in row_h) + 36
    head = (f'<svg class="plot" data-plot="{escape(plot)}" data-points="{n_points}" xmlns="http://www.w3.org/2000/svg" '
            f'width="{width}" height="{height}" viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">')  # fmt: skip
    out = [head, f"<title>{escape(title)}</title>", f'<rect width="{width}" height="{height}" fill="#fff"/>',
           f'<text x="8" y="15" {FONT} font-weight="bold">{escape(title)}</text>']  # fmt: skip
    if not n_points:
        out.append(
            f'<text x="{width / 2}" y="{height / 2}" text-anchor="middle" {FONT} fill="#888">no data</text></svg>'
        )
        return "".join(out)
    colors = {s: PALETTE[i % len(PALETTE)] for i, s in enumerate(stages)}
    x = 8
    for s in stages:
        out.append(
            f'<rect x="{x}" y="22" width="10" height="10" fill="{colors[s]}"/><text x="{x + 13}" y="31" {FONT}>{escape(s)}</text>'
        )
        x += 20 + 7 * len(s)
    total_max = max(sum(v.get(s) or 0 for s in stages) for _, v in rows) or 1.0
    pw = width - left - 70
    y = top
    for (label, vals), lines, h in zip(rows, shown, row_h):
        first = y + h / 2 + 4 - (len(lines) - 1) * LINE_PX / 2  # the lines centred on the row
        out.append(f'<text class="bar-label" y="{first:.1f}" text-anchor="end" {FONT}>'
                   f"<title>{escape(label)}</title>{_tspans(lines, left - 6)}</text>")  # fmt: skip
        y_bar = y + (h - bar_h) / 2
        x = float(left)
        for s in stages:
            v = vals.get(s) or 0.0
            w = v / total_max * pw
            if w > 0:
                out.append(f'<rect class="bar" x="{x:.2f}" y="{y_bar:.1f}" width="{max(w, 0.5):.2f}" height="{bar_h}" '
                           f'fill="{colors[s]}"><title>{escape(label)} — {escape(s)}: {v:.3f} s</title></rect>')  # fmt: skip
            x += w
        total = sum(vals.get(s) or 0 for s in stages)
        out.append(f'<text x="{x + 4:.2f}" y="{y_bar + bar_h - 4:.1f}" {FONT}>{total:.2f} s</text>')
        y += h + gap
    out.append("</svg>")
    return "".join(out)
