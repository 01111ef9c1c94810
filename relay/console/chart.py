"""The overview's throughput chart: delivered and failed attempts per minute, as inline SVG.

Owns: turning per-minute counts into an SVG string, server-side, so the browser needs no chart
library and no JavaScript (the page must read with JavaScript off). Pure: no I/O, no clock;
every text that goes into the SVG is escaped here.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from html import escape
from typing import Protocol

WIDTH = 720
HEIGHT = 250
PAD_LEFT = 40
PAD_RIGHT = 8
PAD_TOP = 12
PAD_BOTTOM = 26


class MinuteCounts(Protocol):
    """One minute of the chart (relay.console.service.MinuteCount): attempts that
    delivered, and attempts that failed."""

    @property
    def delivered(self) -> int: ...

    @property
    def failed(self) -> int: ...


def nice_ceiling(value: int) -> int:
    """The smallest 1, 2 or 5 times a power of ten that is >= value (and >= 1): a y axis top
    a person reads at a glance."""
    if value <= 1:
        return 1
    power = int(10 ** math.floor(math.log10(value)))
    for step in (1, 2, 5, 10):
        if step * power >= value:
            return step * power
    return 10 * power  # pragma: no cover - the loop always returns


def throughput_svg(minutes: Sequence[MinuteCounts], *, title: str = "Attempts per minute") -> str:
    """Stacked bars, oldest minute on the left: delivered at the base, failed on top of it.
    The x axis is labelled in minutes before the last one ("-60m" .. "now")."""
    n = max(len(minutes), 1)
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = HEIGHT - PAD_TOP - PAD_BOTTOM
    top = nice_ceiling(max((m.delivered + m.failed for m in minutes), default=0))
    slot = plot_w / n
    bar_w = max(slot - 2.0, 1.0)
    delivered_total = sum(m.delivered for m in minutes)
    failed_total = sum(m.failed for m in minutes)
    desc = (
        f"{delivered_total} delivered and {failed_total} failed attempts "
        f"over the last {len(minutes)} minutes"
    )
    out = [
        f'<svg class="chart" viewBox="0 0 {WIDTH} {HEIGHT}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" '
        f'aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>",
    ]
    # Horizontal grid: 0, half and top, labelled on the left.
    for frac in (0.0, 0.5, 1.0):
        y = PAD_TOP + plot_h * (1 - frac)
        label = _count(top * frac)
        out.append(
            f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" '
            f'y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{PAD_LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{escape(label)}</text>'
        )
    for i, m in enumerate(minutes):
        x = PAD_LEFT + i * slot + (slot - bar_w) / 2
        base = PAD_TOP + plot_h
        h_ok = plot_h * m.delivered / top
        h_bad = plot_h * m.failed / top
        tip = f"{_minute_label(len(minutes) - 1 - i)}: {m.delivered} delivered, {m.failed} failed"
        out.append(f"<g><title>{escape(tip)}</title>")
        if m.delivered:
            out.append(
                f'<rect class="ok" x="{x:.1f}" y="{base - h_ok:.1f}" '
                f'width="{bar_w:.1f}" height="{h_ok:.1f}"/>'
            )
        if m.failed:
            out.append(
                f'<rect class="bad" x="{x:.1f}" y="{base - h_ok - h_bad:.1f}" '
                f'width="{bar_w:.1f}" height="{h_bad:.1f}"/>'
            )
        out.append("</g>")
    # X labels every quarter of the range, "now" at the right edge.
    for ago in _x_ticks(len(minutes)):
        i = len(minutes) - 1 - ago
        x = PAD_LEFT + i * slot + slot / 2
        anchor = "end" if ago == 0 else "middle"
        out.append(
            f'<text class="axis" x="{x:.1f}" y="{HEIGHT - 8}" '
            f'text-anchor="{anchor}">{escape(_minute_label(ago))}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _x_ticks(n: int) -> list[int]:
    """Minutes-ago to label: every quarter of the range, "now" included."""
    if n <= 0:
        return []
    step = max(n // 4, 1)
    return list(range(0, n, step))


def _minute_label(ago: int) -> str:
    return "now" if ago == 0 else f"-{ago}m"


def _count(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.1f}"
