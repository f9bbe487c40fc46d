"""SVG charts drawn by our own code (no third-party JavaScript or CSS): pure functions from a
series to markup."""

from __future__ import annotations

import time
from collections.abc import Sequence
from html import escape

Series = Sequence[int | None]


def _scale(values: Series) -> tuple[float, float]:
    present = [v for v in values if v is not None]
    if not present:
        return 0.0, 1.0
    low, high = min(0, *present), max(present)
    return float(low), float(high if high > low else low + 1)


def fill_covered(values: Series, first_second: int, covered_from: int, covered_through: int,
                 gaps: Sequence[tuple[int, int]] = (), *, counter: bool) -> list[int | None]:
    """What a curve draws for a scope covered over [covered_from, covered_through] except
    `gaps` (seconds lost): outside that a second is None (nothing is known: not shipped yet,
    partial, or lost); inside it a counter's second without a value is 0 (the agent read it
    and nothing was counted), a gauge's stays None (it was not set)."""
    out: list[int | None] = []
    for offset, value in enumerate(values):
        second = first_second + offset
        covered = covered_from <= second <= covered_through and not any(
            first <= second <= last for first, last in gaps)
        if not covered:
            out.append(None)
        elif value is None and counter:
            out.append(0)
        else:
            out.append(value)
    return out


def _runs(values: Series, width: float, height: float, low: float, high: float,
          left: float = 0.0, top: float = 0.0) -> list[list[tuple[float, float]]]:
    """The points of each run of present values (a missing second breaks the line)."""
    count = len(values)
    step = width / max(count - 1, 1)
    runs: list[list[tuple[float, float]]] = []
    current: list[tuple[float, float]] = []
    for index, value in enumerate(values):
        if value is None:
            if current:
                runs.append(current)
                current = []
            continue
        current.append((left + index * step, top + height - (value - low) / (high - low) * height))
    if current:
        runs.append(current)
    return runs


def _lines(runs: list[list[tuple[float, float]]], color: str, stroke_width: float,
           radius: float) -> str:
    """A polyline per run; a run of one point (a lone second) is a dot, or it would not show."""
    parts = []
    for run in runs:
        if len(run) == 1:
            x, y = run[0]
            parts.append(f'<circle class="point" cx="{x:.1f}" cy="{y:.1f}" r="{radius}" '
                         f'fill="{color}"/>')
        else:
            points = " ".join(f"{x:.1f},{y:.1f}" for x, y in run)
            parts.append(f'<polyline class="line" fill="none" stroke="{color}" '
                         f'stroke-width="{stroke_width}" points="{points}"/>')
    return "".join(parts)


def sparkline(values: Series, *, width: int = 160, height: int = 28, unit: str = "",
              span_s: int | None = None) -> str:
    """A small chart of a series. With `span_s` (what it covers, ending now) it has axes: the
    lowest and highest value with `unit` on the left, the time span below."""
    low, high = _scale(values)
    if span_s is None:
        lines = _lines(_runs(values, width - 2, height - 2, low, high, 1, 1), "#2a6fdb", 1.2,
                       1.5)
        return (f'<svg class="sparkline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
                f'height="{height}" viewBox="0 0 {width} {height}">{lines}</svg>')
    width, height, left, bottom = 300, 58, 58, 14
    plot_w, plot_h = width - left - 4, height - bottom - 6
    lines = _lines(_runs(values, plot_w, plot_h, low, high, left, 4), "#2a6fdb", 1.2, 1.5)
    label = escape(unit)
    ago = f"-{span_s // 60} min" if span_s >= 60 else f"-{span_s} s"
    return (f'<svg class="sparkline" xmlns="http://www.w3.org/2000/svg" width="{width}" '
            f'height="{height}" viewBox="0 0 {width} {height}" role="img" '
            f'aria-label="last {ago[1:]}, in {label}">'
            f'<line x1="{left}" x2="{left}" y1="4" y2="{4 + plot_h}" stroke="#999"/>'
            f'<line x1="{left}" x2="{width - 4}" y1="{4 + plot_h}" y2="{4 + plot_h}" '
            f'stroke="#999"/>'
            f'<text class="ymax" x="{left - 4}" y="11" font-size="10" text-anchor="end">'
            f'{_label(high)}</text>'
            f'<text class="ymin" x="{left - 4}" y="{4 + plot_h}" font-size="10" '
            f'text-anchor="end">{_label(low)}</text>'
            f'<text class="unit" x="{left - 4}" y="{height - 2}" font-size="9" '
            f'text-anchor="end" fill="#666">{label}</text>'
            f'<text class="xstart" x="{left}" y="{height - 2}" font-size="9" fill="#666">'
            f'{ago}</text>'
            f'<text class="xend" x="{width - 4}" y="{height - 2}" font-size="9" '
            f'text-anchor="end" fill="#666">now</text>{lines}</svg>')


def _label(value: float) -> str:
    if abs(value) >= 1e6:
        return f"{value / 1e6:.1f}M"
    if abs(value) >= 1e3:
        return f"{value / 1e3:.1f}k"
    return f"{value:g}"


CURVE_POINTS_MAX = 3600      # past this, a curve draws the maximum of each k seconds


def downsample(values: Series, max_points: int = CURVE_POINTS_MAX) -> tuple[list[int | None], int]:
    """(values, seconds per point): every second up to `max_points`, else the maximum of
    each run of k seconds (so a one-second spike still shows; the JSON API keeps every
    second)."""
    if len(values) <= max_points:
        return list(values), 1
    step = -(-len(values) // max_points)
    out: list[int | None] = []
    for start in range(0, len(values), step):
        present = [v for v in values[start:start + step] if v is not None]
        out.append(max(present) if present else None)
    return out, step


def curve(values: Series, first_second: int, *, title: str, width: int = 900,
          height: int = 260, firing: bool = False,
          gaps: Sequence[tuple[int, int]] = ()) -> str:
    """A per-second curve with axes: y from min(0, values) to the maximum, x in local time;
    `gaps` (seconds lost) are shaded."""
    seconds = len(values)
    values, step = downsample(values)
    if step > 1:
        title = f"{title}, max of each {step} s"
    left, right, top, bottom = 56, 12, 24, 28
    plot_w, plot_h = width - left - right, height - top - bottom
    low, high = _scale(values)
    parts = [f'<svg class="curve{" firing" if firing else ""}" '
             f'xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" '
             f'viewBox="0 0 {width} {height}" role="img" aria-label="{escape(title)}">',
             f'<rect x="0" y="0" width="{width}" height="{height}" fill="#fff"/>',
             f'<text x="{left}" y="16" font-size="13" font-family="sans-serif">'
             f'{escape(title)}</text>']
    for fraction in (0.0, 0.5, 1.0):
        y = top + plot_h - fraction * plot_h
        parts.append(f'<line x1="{left}" x2="{left + plot_w}" y1="{y:.1f}" y2="{y:.1f}" '
                     'stroke="#ddd"/>')
        parts.append(f'<text x="{left - 6}" y="{y + 4:.1f}" font-size="11" text-anchor="end" '
                     f'font-family="sans-serif">{_label(low + fraction * (high - low))}</text>')
    for fraction in (0.0, 0.5, 1.0):
        second = first_second + int(fraction * max(seconds - 1, 0))
        x = left + fraction * plot_w
        stamp = time.strftime("%H:%M:%S", time.localtime(second))
        anchor = {0.0: "start", 0.5: "middle", 1.0: "end"}[fraction]
        parts.append(f'<text x="{x:.1f}" y="{height - 8}" font-size="11" '
                     f'text-anchor="{anchor}" font-family="sans-serif">{stamp}</text>')
    per_second = plot_w / max(seconds - 1, 1)
    last_second = first_second + seconds - 1
    for gap_first, gap_last in gaps:
        start, end = max(gap_first, first_second), min(gap_last, last_second)
        if start > end:
            continue
        x = left + (start - first_second) * per_second
        parts.append(f'<rect class="gap" x="{x:.1f}" y="{top}" '
                     f'width="{max((end - start) * per_second, 2.0):.1f}" height="{plot_h}" '
                     f'fill="#eee"><title>seconds {gap_first}..{gap_last} lost</title></rect>')
    color = "#c62828" if firing else "#2a6fdb"
    parts.append(_lines(_runs(values, plot_w, plot_h, low, high, left, top), color, 1.5, 2.5))
    if not any(v is not None for v in values):
        parts.append(f'<text x="{left + plot_w / 2}" y="{top + plot_h / 2}" font-size="13" '
                     'text-anchor="middle" fill="#888" font-family="sans-serif">no data</text>')
    parts.append("</svg>")
    return "".join(parts)


__all__ = ["curve", "downsample", "fill_covered", "sparkline"]
