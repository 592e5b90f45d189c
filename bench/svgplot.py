"""A log-log line chart as SVG text, in plain Python (no plotting library to install).

Used by bench_scale.py for the "cost as the workspace grows" figure in docs/benchmarks.md.
"""

from __future__ import annotations

import math
from html import escape

W, H = 800, 420
LEFT, RIGHT, TOP, BOTTOM = 70, 300, 40, 50


def _ticks(lo: float, hi: float) -> list[float]:
    """1-2-5 steps per decade between ``lo`` and ``hi``."""
    out = []
    for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 1):
        for m in (1, 2, 5):
            v = m * 10.0 ** e
            if lo <= v <= hi:
                out.append(v)
    return out


def _label(v: float) -> str:
    if v >= 1000:
        return f"{v / 1000:g}k"
    return f"{v:g}"


def loglog(title: str, xlabel: str, ylabel: str, xs: list[float],
           lines: list[tuple[str, list[float], str, bool]]) -> str:
    """``lines``: (name, ys, colour, dashed). Points with a non-positive y are left out."""
    ys = [y for _, series, _, _ in lines for y in series if y and y > 0]
    x0, x1 = min(xs) / 1.3, max(xs) * 1.3
    y0, y1 = min(ys) / 1.5, max(ys) * 1.5
    pw, ph = W - LEFT - RIGHT, H - TOP - BOTTOM

    def px(x: float) -> float:
        return LEFT + (math.log10(x) - math.log10(x0)) / (math.log10(x1) - math.log10(x0)) * pw

    def py(y: float) -> float:
        return TOP + ph - (math.log10(y) - math.log10(y0)) / (math.log10(y1) - math.log10(y0)) * ph

    s = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{W}" height="{H}" '
         f'font-family="sans-serif" font-size="12">',
         f'<rect width="{W}" height="{H}" fill="white"/>',
         f'<text x="{LEFT}" y="22" font-size="14" font-weight="bold">{escape(title)}</text>',
         f'<rect x="{LEFT}" y="{TOP}" width="{pw}" height="{ph}" fill="none" stroke="#444"/>']
    for v in _ticks(y0, y1):
        s.append(f'<line x1="{LEFT}" x2="{LEFT + pw}" y1="{py(v):.1f}" y2="{py(v):.1f}" '
                 f'stroke="#ddd"/>')
        s.append(f'<text x="{LEFT - 6}" y="{py(v) + 4:.1f}" text-anchor="end">{_label(v)}</text>')
    for v in sorted(set(xs)):
        s.append(f'<line y1="{TOP}" y2="{TOP + ph}" x1="{px(v):.1f}" x2="{px(v):.1f}" '
                 f'stroke="#ddd"/>')
        s.append(f'<text x="{px(v):.1f}" y="{TOP + ph + 16}" text-anchor="middle">'
                 f'{_label(v)}</text>')
    s.append(f'<text x="{LEFT + pw / 2}" y="{H - 12}" text-anchor="middle">{escape(xlabel)}'
             ' (log)</text>')
    s.append(f'<text x="16" y="{TOP + ph / 2}" transform="rotate(-90 16 {TOP + ph / 2})" '
             f'text-anchor="middle">{escape(ylabel)} (log)</text>')
    for i, (name, series, colour, dashed) in enumerate(lines):
        pts = [(px(x), py(y)) for x, y in zip(xs, series) if y and y > 0]
        dash = ' stroke-dasharray="6 4"' if dashed else ""
        s.append(f'<polyline fill="none" stroke="{colour}" stroke-width="2"{dash} points="'
                 + " ".join(f"{a:.1f},{b:.1f}" for a, b in pts) + '"/>')
        for a, b in pts:
            s.append(f'<circle cx="{a:.1f}" cy="{b:.1f}" r="3" fill="{colour}"/>')
        ly = TOP + 10 + i * 20
        s.append(f'<line x1="{W - RIGHT + 12}" x2="{W - RIGHT + 40}" y1="{ly}" y2="{ly}" '
                 f'stroke="{colour}" stroke-width="2"{dash}/>')
        s.append(f'<text x="{W - RIGHT + 46}" y="{ly + 4}" font-size="11">{escape(name)}</text>')
    s.append("</svg>")
    return "\n".join(s) + "\n"
