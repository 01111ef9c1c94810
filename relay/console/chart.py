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
    out = _open("chart", HEIGHT, title, desc)
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


def _open(css_class: str, height: int, title: str, desc: str) -> list[str]:
    """An accessible SVG's opening tag, title and description (both escaped): every chart's."""
    return [
        f'<svg class="{css_class}" viewBox="0 0 {WIDTH} {height}" role="img" '
        f'xmlns="http://www.w3.org/2000/svg" aria-label="{escape(title)}">',
        f"<title>{escape(title)}</title><desc>{escape(desc)}</desc>",
    ]


def _count(value: float) -> str:
    return str(int(value)) if value == int(value) else f"{value:.1f}"


# ---------------------------------------------------------------- the ledger's chart

LEDGER_HEIGHT = 180
MAX_BAR_W = 24.0


class LedgerDay(Protocol):
    """One day of one currency in the ledger chart: Polar's net and what Faurya got (minor
    units); `polar` None when Polar's side is unknown for the day."""

    @property
    def label(self) -> str: ...

    @property
    def polar(self) -> int | None: ...

    @property
    def faurya(self) -> int: ...


def ledger_svg(days: Sequence[LedgerDay], *, currency: str, unit: int, title: str) -> str:
    """Paired bars per day, oldest on the left: Polar's net revenue, then the net Faurya got
    (delivered). `unit` is 10**exponent, so the axis reads in major units; a negative net
    (more refunded than sold) goes below the zero line."""
    n = max(len(days), 1)
    height = LEDGER_HEIGHT
    plot_w = WIDTH - PAD_LEFT - PAD_RIGHT
    plot_h = height - PAD_TOP - PAD_BOTTOM
    values = [v for d in days for v in (d.polar, d.faurya) if v is not None]
    hi = nice_ceiling(math.ceil(max([0, *values]) / unit)) * unit
    lo = -nice_ceiling(math.ceil(-min([0, *values]) / unit)) * unit if min([0, *values]) else 0
    span = hi - lo

    def y_of(value: float) -> float:
        return PAD_TOP + plot_h * (hi - value) / span

    polar_total = sum(d.polar for d in days if d.polar is not None)
    faurya_total = sum(d.faurya for d in days)
    desc = (
        f"{len(days)} days in {currency}: Polar {_major(polar_total, unit)}, "
        f"Faurya {_major(faurya_total, unit)}"
    )
    out = _open("chart ledger-chart", height, title, desc)
    for value in sorted({lo, 0, hi}):
        y = y_of(value)
        out.append(
            f'<line class="grid" x1="{PAD_LEFT}" x2="{WIDTH - PAD_RIGHT}" '
            f'y1="{y:.1f}" y2="{y:.1f}"/>'
            f'<text class="axis" x="{PAD_LEFT - 6}" y="{y + 4:.1f}" '
            f'text-anchor="end">{escape(_major(value, unit, short=True))}</text>'
        )
    slot = plot_w / n
    # A few days must not make slabs across the card: bars stay narrow, centred in their day.
    bar_w = min(max((slot - 4.0) / 2, 1.0), MAX_BAR_W)
    zero = y_of(0)
    for i, d in enumerate(days):
        x = PAD_LEFT + i * slot + (slot - 2 * bar_w) / 2
        polar = "unknown" if d.polar is None else _major(d.polar, unit)
        tip = f"{d.label} {currency}: Polar {polar}, Faurya {_major(d.faurya, unit)}"
        out.append(f"<g><title>{escape(tip)}</title>")
        bars: tuple[tuple[float, int | None, str], ...] = (
            (0.0, d.polar, "polar"),
            (bar_w, d.faurya, "faurya"),
        )
        for offset, amount, cls in bars:
            if not amount:
                continue
            top = min(y_of(amount), zero)
            out.append(
                f'<rect class="{cls}" x="{x + offset:.1f}" y="{top:.1f}" '
                f'width="{bar_w:.1f}" height="{abs(y_of(amount) - zero):.1f}"/>'
            )
        out.append("</g>")
    step = max(len(days) // 6, 1)
    for i in range(0, len(days), step):
        x = PAD_LEFT + i * slot + slot / 2
        out.append(
            f'<text class="axis" x="{x:.1f}" y="{height - 8}" '
            f'text-anchor="middle">{escape(days[i].label)}</text>'
        )
    out.append("</svg>")
    return "".join(out)


def _major(minor: float, unit: int, *, short: bool = False) -> str:
    value = minor / unit
    if short or unit == 1:
        return f"{value:,.0f}" if value == int(value) else f"{value:,.1f}"
    return f"{value:,.2f}"
