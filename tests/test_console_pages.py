"""The console's HTML pages on the admin listener, through real HTTP against an in-process relay
(a real SQLite store in tmp_path, a fake Faurya on loopback): every page renders for a signed-in
caller, redirects to the login form without one, refuses a read-only caller's actions, and the
fix forms change the store and land on the audit page. Plus the pure parts: the SVG chart and
the value formatting.
"""

from __future__ import annotations

import re
import xml.etree.ElementTree as ET
from dataclasses import dataclass

import pytest

from relay.console.chart import nice_ceiling, throughput_svg
from relay.console.formatting import (
    describe_condition,
    duration,
    minor_to_text,
    target_links,
)
from relay.mapping.conditions import compile_condition

SVG = "{http://www.w3.org/2000/svg}"


@dataclass(frozen=True)
class Minute:
    minute_at: float
    delivered: int
    failed: int


# ---------------------------------------------------------------- the chart


def _svg(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314 - our own chart, made by the test


def test_chart_is_valid_svg_with_one_stacked_bar_per_busy_minute() -> None:
    """60 minutes give well-formed SVG: a delivered bar for each minute with deliveries, a
    failed bar stacked on top where some failed, labels -45m..now, and totals in <desc>."""
    minutes = [Minute(60.0 * i, i % 7, 2 if i == 59 else 0) for i in range(60)]
    root = _svg(throughput_svg(minutes))
    ok = root.findall(f".//{SVG}rect[@class='ok']")
    bad = root.findall(f".//{SVG}rect[@class='bad']")
    assert len(ok) == sum(1 for m in minutes if m.delivered)
    assert len(bad) == 1
    last_ok = ok[-1]
    # Stacked: the failed bar ends where the delivered bar of the same minute starts.
    assert float(bad[0].get("y", "0")) + float(bad[0].get("height", "0")) == pytest.approx(
        float(last_ok.get("y", "0")), abs=0.11
    )
    labels = [t.text for t in root.findall(f".//{SVG}text")]
    assert {"-45m", "-30m", "-15m", "now"} <= set(labels)
    desc = root.find(f"{SVG}desc")
    assert desc is not None
    delivered = sum(m.delivered for m in minutes)
    assert desc.text == f"{delivered} delivered and 2 failed attempts over the last 60 minutes"


def test_chart_of_a_quiet_hour_has_no_bars_and_a_scale_of_one() -> None:
    """No traffic: no bars, no division by zero, a y axis from 0 to 1."""
    root = _svg(throughput_svg([Minute(60.0 * i, 0, 0) for i in range(60)]))
    assert root.findall(f".//{SVG}rect") == []
    assert "1" in [t.text for t in root.findall(f".//{SVG}text")]


def test_chart_escapes_its_title() -> None:
    """A title is text, never markup, inside the SVG."""
    svg = throughput_svg([Minute(0.0, 1, 0)], title="<script>alert(1)</script>")
    assert "<script>" not in svg
    _svg(svg)


@pytest.mark.parametrize(
    ("value", "top"), [(0, 1), (1, 1), (3, 5), (7, 10), (10, 10), (11, 20), (240, 500)]
)
def test_y_axis_top_is_a_round_number(value: int, top: int) -> None:
    """The y axis ends on 1, 2 or 5 times a power of ten, at or above the tallest bar."""
    assert nice_ceiling(value) == top


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (4410, "USD", "44.10 USD"),
        (-1000, "EUR", "-10.00 EUR"),
        (123456789, "USD", "1,234,567.89 USD"),
        (500, "JPY", "500 JPY"),
        (1234, "KWD", "1.234 KWD"),
        (None, "USD", "\u2013"),
    ],
)
def test_money_is_shown_in_major_units_to_the_cent(
    amount: int | None, currency: str, text: str
) -> None:
    """Minor units become the currency's major units exactly (no float), by its exponent."""
    assert minor_to_text(amount, currency) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59, "59 s"), (61, "1 min"), (3600, "1 h"), (3720, "1 h 2 min"),
     (90000, "1 d 1 h"), (30 * 86400, "30 d")],
)  # fmt: skip
def test_durations_read_in_the_two_largest_units(seconds: float, text: str) -> None:
    """Ages and retention periods read as a person says them."""
    assert duration(seconds) == text


def test_audit_targets_link_messages_filters_and_jobs() -> None:
    """Message ids link to their pages, a filter to the list it selects, a job to its page;
    anything else is plain text."""
    assert target_links("12,13") == [
        {"text": "#12", "href": "/messages/12"},
        {"text": "#13", "href": "/messages/13"},
    ]
    assert target_links("status=dead&destination=faurya") == [
        {
            "text": "status=dead&destination=faurya",
            "href": "/messages?status=dead&destination=faurya",
        }
    ]
    assert target_links("job:7") == [{"text": "job:7", "href": "/jobs/7"}]
    assert target_links("faurya") == [{"text": "faurya", "href": None}]


def test_route_conditions_read_as_expressions() -> None:
    """A route's `when` is shown the way it reads in relay.toml's intent."""
    cond = compile_condition(
        {
            "all": [
                {"path": "data.billing_reason", "eq": "purchase"},
                {"path": "data.paid", "exists": True},
            ]
        },
        "routes[0].when",
    )
    text = describe_condition(cond)
    assert re.fullmatch(r'\(data\.billing_reason == "purchase" and data\.paid exists\)', text), text
