"""How the console's pages show values: times, ages, durations, sizes, money, audit targets,
route conditions. Pure functions, registered as jinja2 filters by relay/console/pages.py; they
return plain text (the templates escape it).
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from typing import Any
from urllib.parse import quote

import jinja2

from relay.currency import exponent, polar_major_text
from relay.mapping.conditions import Condition

NONE = "\u2013"  # an en dash: "no value", lighter than "None" or "n/a"

_OPS = {"eq": "==", "ne": "!=", "lt": "<", "le": "<=", "gt": ">", "ge": ">="}


def describe_condition(cond: Condition) -> str:
    """A route's `when`, as a person reads it: `data.billing_reason == "purchase"`."""
    path = ".".join(str(p) for p in cond.path)
    op = cond.op
    if op in _OPS:
        return f"{path} {_OPS[op]} {json.dumps(cond.value)}"
    if op in ("in", "not_in"):
        return f"{path} {op.replace('_', ' ')} {json.dumps(cond.value)}"
    if op == "exists":
        return f"{path} exists" if cond.value in (None, True) else f"{path} missing"
    if op in ("all", "any"):
        joiner = " and " if op == "all" else " or "
        return "(" + joiner.join(describe_condition(c) for c in cond.children) + ")"
    if op == "not":
        return "not " + " ".join(describe_condition(c) for c in cond.children)
    return op  # pragma: no cover - every op of relay/mapping/conditions.py is above


def _ts(ts: float | None) -> str:
    if ts is None:
        return NONE
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(ts))


def _iso(ts: float | None) -> str:
    if ts is None:
        return ""
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def duration(seconds: float | None) -> str:
    """An age or a period in the largest two units that matter: `4 min`, `2 h 5 min`, `30 d`."""
    if seconds is None:
        return NONE
    s = max(int(seconds), 0)
    if s < 60:
        return f"{s} s"
    if s < 3600:
        return f"{s // 60} min"
    if s < 86400:
        h, m = divmod(s // 60, 60)
        return f"{h} h {m} min" if m else f"{h} h"
    d, h = divmod(s // 3600, 24)
    return f"{d} d {h} h" if h and d < 7 else f"{d} d"


@jinja2.pass_context
def _ago(ctx: Any, ts: float | None) -> str:
    if ts is None:
        return NONE
    delta = float(ctx["now"]) - ts
    if delta < 5:
        return "just now"
    return f"{duration(delta)} ago"


@jinja2.pass_context
def _until(ctx: Any, ts: float | None) -> str:
    if ts is None:
        return NONE
    delta = ts - float(ctx["now"])
    return "due now" if delta <= 0 else f"in {duration(delta)}"


def _ms(seconds: float | None) -> str:
    if seconds is None:
        return NONE
    return f"{seconds * 1000:.0f} ms" if seconds < 10 else f"{seconds:.1f} s"


def _size(n: int | None) -> str:
    if n is None:
        return NONE
    value = float(n)
    for unit in ("B", "KB", "MB", "GB"):
        if value < 1024 or unit == "GB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    return f"{value:.1f} TB"  # pragma: no cover - the loop returns at GB


def _pct(share: float | None) -> str:
    return NONE if share is None else f"{share * 100:.0f}%"


def minor_to_text(amount: int | None, currency: str | None) -> str:
    """`1299, "EUR"` -> `12.99 EUR`; a currency we do not know keeps minor units."""
    if amount is None or not currency:
        return NONE
    digits = exponent(currency)
    if not digits:
        return f"{amount:,} {currency}"
    sign = "-" if amount < 0 else ""
    whole, frac = divmod(abs(amount), 10**digits)
    return f"{sign}{whole:,}.{frac:0{digits}d} {currency}"


def polar_money(amount: int | None, currency: str | None, *, signed: bool = False) -> str:
    """A Polar amount (minor units by Polar's exponent, relay/currency.py) in major units:
    `4410, "JPY"` -> `4,410 JPY`, `-1299, "EUR"` -> `-12.99 EUR`; `signed` adds a `+`."""
    if amount is None or not currency:
        return NONE
    plus = "+" if signed and amount > 0 else ""
    return f"{plus}{polar_major_text(amount, currency, grouping=True)} {currency}"


def target_links(target: str) -> list[dict[str, str | None]]:
    """An audit target as links: message ids to their pages, a filter to the list it selects,
    anything else (a destination, a job) as text."""
    parts = [p.strip() for p in target.split(",") if p.strip()]
    if parts and all(p.isdigit() for p in parts):
        return [{"text": f"#{p}", "href": f"/messages/{p}"} for p in parts]
    if "=" in target:
        return [{"text": target, "href": f"/messages?{target}"}]
    if target.startswith("job:") and target[4:].isdigit():
        return [{"text": target, "href": f"/jobs/{target[4:]}"}]
    return [{"text": target, "href": None}]


def _urlencode(value: Any) -> str:
    return quote(str(value), safe="")


def pretty_json(text: str) -> str:
    """A stored JSON body indented for reading; anything else as it is."""
    try:
        return json.dumps(json.loads(text), indent=2, ensure_ascii=False)
    except ValueError:
        return text


FILTERS: dict[str, Callable[..., Any]] = {
    "pretty_json": pretty_json,
    "ts": _ts,
    "iso": _iso,
    "ago": _ago,
    "until": _until,
    "dur": duration,
    "ms": _ms,
    "size": _size,
    "pct": _pct,
    "minor": minor_to_text,
    "polar_money": polar_money,
    "target_links": target_links,
    "urlencode": _urlencode,
}
