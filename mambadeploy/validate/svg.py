"""Minimal inline-SVG charts for the HTML report (no plotting library needed): a line chart with an optional log y
axis, a box plot, a bar chart. Each returns one <svg> element as a string."""

from __future__ import annotations

import math
from html import escape

COLORS = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#17becf"]
W, H, LEFT, RIGHT, TOP, BOTTOM = 660, 330, 70, 150, 30, 70


def _frame(title: str, xlabel: str, ylabel: str) -> list[str]:
    return [
        (f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" viewBox="0 0 {W} {H}" '
        f'font-family="sans-serif" font-size="11">'),
        f'<text x="{LEFT}" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
        f'<rect x="{LEFT}" y="{TOP}" width="{W - LEFT - RIGHT}" height="{H - TOP - BOTTOM}" fill="none" stroke="#999"/>',
        f'<text x="{LEFT + (W - LEFT - RIGHT) / 2}" y="{H - 6}" text-anchor="middle">{escape(xlabel)}</text>',
        (f'<text x="14" y="{TOP + (H - TOP - BOTTOM) / 2}" text-anchor="middle" '
        f'transform="rotate(-90 14 {TOP + (H - TOP - BOTTOM) / 2})">{escape(ylabel)}</text>'),
    ]


def _legend(labels: list[str]) -> list[str]:
    out = []
    for i, label in enumerate(labels):
        y = TOP + 12 + 16 * i
        out.append(f'<rect x="{W - RIGHT + 10}" y="{y - 8}" width="10" height="10" fill="{COLORS[i % len(COLORS)]}"/>')
        out.append(f'<text x="{W - RIGHT + 26}" y="{y + 1}">{escape(label)}</text>')
    return out


def _category_label(cx: float, label: str) -> str:
    """A category name under the plot, turned so that many backends do not overlap."""
    y = H - BOTTOM + 14
    return (f'<text x="{cx:.1f}" y="{y}" text-anchor="end" transform="rotate(-25 {cx:.1f} {y})">'
            f'{escape(label)}</text>')


def _ticks(lo: float, hi: float, log: bool) -> list[float]:
    if log:
        return [10.0 ** e for e in range(math.floor(lo), math.ceil(hi) + 1)]
    step = _nice((hi - lo) / 5 or 1)
    start = math.floor(lo / step) * step
    return [start + i * step for i in range(int((hi - start) / step) + 2) if start + i * step <= hi + 1e-12]


def _nice(x: float) -> float:
    e = 10 ** math.floor(math.log10(x))
    return next(m * e for m in (1, 2, 5, 10) if m * e >= x)


def _fmt(v: float) -> str:
    return f"{v:.0e}" if (v and (abs(v) < 1e-2 or abs(v) >= 1e4)) else f"{v:g}"


def line_chart(series: dict[str, list[tuple[float, float]]], title: str, xlabel: str, ylabel: str,
               log_y: bool = True, floor: float = 1e-12) -> str:
    pts = [(x, y) for s in series.values() for x, y in s]
    if not pts:
        return ""
    tr = (lambda y: math.log10(max(y, floor))) if log_y else (lambda y: y)
    xs, ys = [p[0] for p in pts], [tr(p[1]) for p in pts]
    x0, x1 = min(xs), max(max(xs), min(xs) + 1)
    y0, y1 = min(ys), max(ys)
    if y1 - y0 < 1e-9:
        y0, y1 = y0 - 1, y1 + 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    sx = lambda x: LEFT + (x - x0) / (x1 - x0) * pw
    sy = lambda y: TOP + ph - (y - y0) / (y1 - y0) * ph
    out = _frame(title, xlabel, ylabel)
    for t in _ticks(y0, y1, log_y):
        v = math.log10(t) if log_y else t
        if y0 - 1e-9 <= v <= y1 + 1e-9:
            out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(v):.1f}" y2="{sy(v):.1f}" stroke="#eee"/>')
            out.append(f'<text x="{LEFT - 4}" y="{sy(v) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    for t in _ticks(x0, x1, False):
        out.append(f'<text x="{sx(t):.1f}" y="{TOP + ph + 14}" text-anchor="middle">{_fmt(t)}</text>')
    for i, (label, s) in enumerate(series.items()):
        path = " ".join(f"{sx(x):.1f},{sy(tr(y)):.1f}" for x, y in s)
        out.append(f'<polyline fill="none" stroke-width="1.6" stroke="{COLORS[i % len(COLORS)]}" points="{path}"/>')
    out += _legend(list(series))
    return "\n".join(out + ["</svg>"])


def box_plot(groups: dict[str, list[float]], title: str, ylabel: str) -> str:
    """One box per group: whiskers at the 1st/99th percentile, box at the quartiles, a line at the median. A log axis
    when the groups span more than 20x (a CPU backend beside GPU ones)."""
    groups = {k: sorted(v) for k, v in groups.items() if v}
    if not groups:
        return ""
    q = lambda v, p: v[min(len(v) - 1, max(0, round(p * (len(v) - 1))))]
    lo = min(q(v, 0.01) for v in groups.values())
    hi = max(q(v, 0.99) for v in groups.values())
    log = lo > 0 and hi / lo > 20
    if log:
        tr = math.log10
        lo, hi = math.log10(lo) - 0.1, math.log10(hi) + 0.1
    else:
        tr = lambda y: y
        lo, hi = max(lo * 0.9, 0), hi * 1.1 if hi > 0 else 1
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    sy = lambda y: TOP + ph - (tr(y) - lo) / (hi - lo) * ph
    out = _frame(title + (" (log scale)" if log else ""), "", ylabel)
    for t in _ticks(lo, hi, log):
        if tr(t) < lo - 1e-9 or tr(t) > hi + 1e-9:
            continue
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    slot = pw / len(groups)
    for i, (label, v) in enumerate(groups.items()):
        cx, c = LEFT + slot * (i + 0.5), COLORS[i % len(COLORS)]
        p1, p25, p50, p75, p99 = (q(v, p) for p in (0.01, 0.25, 0.5, 0.75, 0.99))
        bw = min(40, slot * 0.5)
        out.append(f'<line x1="{cx:.1f}" x2="{cx:.1f}" y1="{sy(p1):.1f}" y2="{sy(p99):.1f}" stroke="{c}"/>')
        out.append(f'<rect x="{cx - bw / 2:.1f}" y="{sy(p75):.1f}" width="{bw:.1f}" '
                   f'height="{max(sy(p25) - sy(p75), 1):.1f}" fill="{c}" fill-opacity="0.3" stroke="{c}"/>')
        out.append(f'<line x1="{cx - bw / 2:.1f}" x2="{cx + bw / 2:.1f}" y1="{sy(p50):.1f}" y2="{sy(p50):.1f}" '
                   f'stroke="{c}" stroke-width="2"/>')
        out.append(_category_label(cx, label))
    return "\n".join(out + ["</svg>"])


def bar_chart(values: dict[str, float | None], title: str, ylabel: str, top: float | None = None) -> str:
    """One bar per label; None draws 'n/a' instead of a bar."""
    if not values:
        return ""
    known = [v for v in values.values() if v is not None]
    hi = top if top is not None else (max(known) * 1.15 if known and max(known) > 0 else 1)
    hi = max([hi] + known)
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM
    sy = lambda y: TOP + ph - y / hi * ph
    out = _frame(title, "", ylabel)
    for t in _ticks(0, hi, False):
        out.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{sy(t):.1f}" y2="{sy(t):.1f}" stroke="#eee"/>')
        out.append(f'<text x="{LEFT - 4}" y="{sy(t) + 4:.1f}" text-anchor="end">{_fmt(t)}</text>')
    slot = pw / len(values)
    for i, (label, v) in enumerate(values.items()):
        cx, c = LEFT + slot * (i + 0.5), COLORS[i % len(COLORS)]
        bw = min(50, slot * 0.6)
        if v is None:
            out.append(f'<text x="{cx:.1f}" y="{TOP + ph - 6}" text-anchor="middle" fill="#999">n/a</text>')
        else:
            out.append(f'<rect x="{cx - bw / 2:.1f}" y="{sy(v):.1f}" width="{bw:.1f}" height="{TOP + ph - sy(v):.1f}" '
                       f'fill="{c}"/>')
            out.append(f'<text x="{cx:.1f}" y="{sy(v) - 4:.1f}" text-anchor="middle">{v:.1f}</text>')
        out.append(_category_label(cx, label))
    return "\n".join(out + ["</svg>"])
