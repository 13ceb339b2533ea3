"""Plots as inline SVG strings (no plotting library, no script): a line plot with interval bars and a grouped
horizontal bar chart. Every label is escaped; every element has explicit coordinates, so the report needs nothing
from the network."""

from __future__ import annotations

import math
from html import escape

PALETTE = ["#1f77b4", "#d62728", "#2ca02c", "#ff7f0e", "#9467bd", "#8c564b", "#e377c2", "#7f7f7f", "#bcbd22",
           "#17becf"]
Point = tuple[float, float, float | None, float | None]  # x, y, interval low, interval high


def _ticks(low: float, high: float, count: int = 5) -> list[float]:
    if not math.isfinite(low) or not math.isfinite(high):
        return []
    if high - low < 1e-12:
        low, high = low - 0.5, high + 0.5
    raw = (high - low) / count
    step = 10 ** math.floor(math.log10(raw))
    step *= next(m for m in (1, 2, 2.5, 5, 10) if step * m >= raw)
    first = math.ceil(low / step) * step
    return [first + i * step for i in range(int((high - first) / step + 1e-9) + 1)]


def _fmt(value: float) -> str:
    return f"{value:.3g}"


def _tick_labels(ticks: list[float]) -> list[str]:
    """Enough decimals to tell neighbouring ticks apart."""
    if len(ticks) < 2:
        return [_fmt(t) for t in ticks]
    decimals = max(0, -math.floor(math.log10(ticks[1] - ticks[0])) + 1)
    labels = [f"{t:.{decimals}f}" for t in ticks]
    trimmed = [label.rstrip("0").rstrip(".") if "." in label else label for label in labels]
    return trimmed if len(set(trimmed)) == len(trimmed) else labels


def _extent(values: list[float]) -> tuple[float, float]:
    finite = [v for v in values if v is not None and math.isfinite(v)]
    if not finite:
        return 0.0, 1.0
    low, high = min(finite), max(finite)
    pad = (high - low) * 0.08 or max(abs(high) * 0.1, 0.5)
    return low - pad, high + pad


def line_plot(series: dict[str, list[Point]], title: str, xlabel: str, ylabel: str, width: int = 460,
              height: int = 280) -> str:
    """One line per series, a marker and an interval bar per point."""
    left, right, top, bottom = 56, 130, 28, 40
    xs = [p[0] for points in series.values() for p in points]
    ys = [v for points in series.values() for p in points for v in (p[1], p[2], p[3])]
    x0, x1 = _extent(xs)
    y0, y1 = _extent(ys)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    def sy(y: float) -> float:
        return height - bottom - (y - y0) / (y1 - y0) * (height - top - bottom)

    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{width / 2 - right / 2:.1f}" y="16" text-anchor="middle" class="pt">{escape(title)}</text>']
    xticks, yticks = _ticks(x0, x1), _ticks(y0, y1)
    parts += _axes(left, width - right, top, height - bottom,
                   list(zip([sx(t) for t in xticks], _tick_labels(xticks), strict=True)),
                   list(zip([sy(t) for t in yticks], _tick_labels(yticks), strict=True)), xlabel, ylabel)
    for index, (name, points) in enumerate(sorted(series.items())):
        color = PALETTE[index % len(PALETTE)]
        points = sorted(points)
        if len(points) > 1:
            path = " ".join(f"{'M' if i == 0 else 'L'}{sx(p[0]):.1f},{sy(p[1]):.1f}" for i, p in enumerate(points))
            parts.append(f'<path d="{path}" fill="none" stroke="{color}" stroke-width="1.5"/>')
        for x, y, low, high in points:
            if low is not None and high is not None:
                parts.append(f'<line x1="{sx(x):.1f}" x2="{sx(x):.1f}" y1="{sy(low):.1f}" y2="{sy(high):.1f}" '
                             f'stroke="{color}"/>')
            parts.append(f'<circle cx="{sx(x):.1f}" cy="{sy(y):.1f}" r="3" fill="{color}"><title>'
                         f'{escape(name)}: {_fmt(x)} -> {_fmt(y)}</title></circle>')
        ly = top + 12 + index * 16
        parts.append(f'<rect x="{width - right + 10}" y="{ly - 8}" width="10" height="10" fill="{color}"/>'
                     f'<text x="{width - right + 24}" y="{ly + 1}" class="pl">{escape(name[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def bar_plot(groups: dict[str, list[tuple[str, float, float | None, float | None]]], title: str, xlabel: str,
             width: int = 460) -> str:
    """Horizontal bars: for each group (category) one bar per (label, value, low, high), with interval whiskers."""
    labels = sorted({label for bars in groups.values() for label, *_ in bars})
    colors = {label: PALETTE[i % len(PALETTE)] for i, label in enumerate(labels)}
    bar, gap, left, right, top, bottom = 10, 10, 110, 130, 28, 40
    rows = sum(len(bars) for bars in groups.values())
    height = top + bottom + rows * bar + len(groups) * gap
    values = [v for bars in groups.values() for _, y, lo, hi in bars for v in (y, lo, hi)] + [0.0]
    x0, x1 = _extent(values)

    def sx(x: float) -> float:
        return left + (x - x0) / (x1 - x0) * (width - left - right)

    parts = [f'<svg class="plot" xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<text x="{width / 2 - right / 2:.1f}" y="16" text-anchor="middle" class="pt">{escape(title)}</text>']
    xticks = _ticks(x0, x1)
    parts += _axes(left, width - right, top, height - bottom,
                   list(zip([sx(t) for t in xticks], _tick_labels(xticks), strict=True)), [], xlabel, "")
    y = top
    for group, bars in sorted(groups.items()):
        parts.append(f'<text x="{left - 6}" y="{y + len(bars) * bar / 2 + 4:.1f}" text-anchor="end" class="pl">'
                     f'{escape(group[:16])}</text>')
        for label, value, low, high in sorted(bars):
            start, end = sorted((sx(0.0 if x0 <= 0 <= x1 else x0), sx(value)))
            parts.append(f'<rect x="{start:.1f}" y="{y + 1}" width="{max(end - start, 1):.1f}" height="{bar - 2}" '
                         f'fill="{colors[label]}"><title>{escape(group)} / {escape(label)}: {_fmt(value)}</title>'
                         "</rect>")
            if low is not None and high is not None:
                parts.append(f'<line x1="{sx(low):.1f}" x2="{sx(high):.1f}" y1="{y + bar / 2}" y2="{y + bar / 2}" '
                             'stroke="#222"/>')
            y += bar
        y += gap
    for index, label in enumerate(labels):
        ly = top + 12 + index * 16
        parts.append(f'<rect x="{width - right + 10}" y="{ly - 8}" width="10" height="10" fill="{colors[label]}"/>'
                     f'<text x="{width - right + 24}" y="{ly + 1}" class="pl">{escape(label[:18])}</text>')
    parts.append("</svg>")
    return "".join(parts)


def _axes(x0: float, x1: float, y0: float, y1: float, xticks: list[tuple[float, str]],
          yticks: list[tuple[float, str]], xlabel: str, ylabel: str) -> list[str]:
    parts = [f'<line x1="{x0}" x2="{x1}" y1="{y1}" y2="{y1}" stroke="#444"/>',
             f'<line x1="{x0}" x2="{x0}" y1="{y0}" y2="{y1}" stroke="#444"/>']
    for x, text in xticks:
        parts.append(f'<line x1="{x:.1f}" x2="{x:.1f}" y1="{y1}" y2="{y1 + 4}" stroke="#444"/>'
                     f'<text x="{x:.1f}" y="{y1 + 15}" text-anchor="middle" class="pl">{escape(text)}</text>')
    for y, text in yticks:
        parts.append(f'<line x1="{x0 - 4}" x2="{x0}" y1="{y:.1f}" y2="{y:.1f}" stroke="#444"/>'
                     f'<line x1="{x0}" x2="{x1}" y1="{y:.1f}" y2="{y:.1f}" stroke="#eee"/>'
                     f'<text x="{x0 - 6}" y="{y + 4:.1f}" text-anchor="end" class="pl">{escape(text)}</text>')
    parts.append(f'<text x="{(x0 + x1) / 2:.1f}" y="{y1 + 32}" text-anchor="middle" class="pl">{escape(xlabel)}</text>')
    if ylabel:
        parts.append(f'<text x="14" y="{(y0 + y1) / 2:.1f}" text-anchor="middle" class="pl" '
                     f'transform="rotate(-90 14 {(y0 + y1) / 2:.1f})">{escape(ylabel)}</text>')
    return parts
