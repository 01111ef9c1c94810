"""The payment check's judgement: is a message's Polar order id well formed, and does the order
Polar's API returns say what the message is about to send?

Owns: the Polar id format, and the field-by-field comparison of a message body with the body
its route builds from Polar's own order. Pure: no I/O; relay/payment_check.py fetches the
order, and the worker records the verdict (relay/recorder.py).

Why it exists: `verify_order` guards against a leaked webhook secret. A forger who can sign
webhooks chooses every byte of `data`, so "Polar says order X is paid" is not enough: the
message must also carry X's real amount, currency and the rest of what its route reads from the
order. The body sent stays the stored one (the outbox sends identical bytes on every retry, and
the idempotency key covers exactly that body); a difference dead-letters the message instead,
since it means a forgery or a mapping bug, and an operator can retry it after looking.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from relay.errors import MappingError
from relay.mapping import Route
from relay.mapping.paths import MISSING, Path, format_path, lookup
from relay.mapping.values import ObjectRule, ValueRule

# Polar's ids are UUIDs, written canonically: lowercase hex with dashes. Anything else (a
# query string, "..", a fragment, percent-escapes, another case) is refused before a request.
_POLAR_ID = re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}")
_ORDER_ID_PATH: Path = ("data", "id")


def is_polar_id(value: str) -> bool:
    """Whether `value` is a Polar object id (a canonical lowercase UUID)."""
    return _POLAR_ID.fullmatch(value) is not None


def shown_id(value: str) -> str:
    """An id as it may appear in an error or a log line: it came from a webhook and may be a
    forger's, so it is quoted and cut short."""
    return repr(value[:80] + ("..." if len(value) > 80 else ""))


@dataclass(frozen=True, slots=True)
class Mismatch:
    """One body field whose value differs from the one built from Polar's order."""

    field: str  # the body field, dotted: "amount", "attribution.faSessionId"
    reads: str  # the order paths it is built from: "data.net_amount"
    sent: Any  # what the message would send
    polar: Any  # what Polar's order gives (or the reason it gives nothing)

    def describe(self) -> str:
        """Field, paths and, for numbers and flags (amounts), both values. Other values may
        be customer data: the operator sees them with `relay outbox show` and in Polar."""
        text = f"{self.field} ({self.reads})"
        if _plain(self.sent) and _plain(self.polar):
            text += f": the message sends {self.sent!r}, Polar's order gives {self.polar!r}"
        elif isinstance(self.polar, str) and self.polar.startswith("nothing ("):
            text += f": Polar's order gives {self.polar[:160]}"
        return text


def compared_fields(route: Route) -> list[str]:
    """The body fields a payment check compares for this route: those built only from the
    order (`data.*`) when the route verifies the order its event carries (`{data.id}`)."""
    if not _verifies_own_order(route):
        return []
    return [name for name, rule in _fields(route.body, "") if _order_paths(rule)]


def compare(route: Route, body: bytes, order: dict[str, Any]) -> list[Mismatch]:
    """Every field of the stored `body` that differs from the same field built by `route` from
    Polar's `order`. Compared: the fields read only from `data` (constants, lookups and the
    envelope are not the order's), and of those, the ones Polar's order has the top-level key
    of at least one path of (`metadata` for `data.metadata.faSessionId`: a key missing inside
    it is compared as null, else a forger could add an attribution id the order lacks). A
    route whose `verify_order` is not `{data.id}` (its `data` is not the order, say a refund)
    compares nothing: the check then confirms only that the order exists and is paid.
    """
    if not _verifies_own_order(route):
        return []
    try:
        sent_body = json.loads(body)
    except ValueError:
        sent_body = None
    event = {"data": order}
    found = []
    for name, rule in _fields(route.body, ""):
        paths = _order_paths(rule)
        if not paths or all(lookup(event, p[:2]) is MISSING for p in paths):
            continue  # a constant, not the order's, or Polar's order has no such field
        sent = _value_at(sent_body, name)
        try:
            expected = rule.evaluate(event, name)
        except MappingError as exc:
            found.append(Mismatch(name, _reads(paths), sent, f"nothing ({exc.message})"))
            continue
        if not _same(sent, expected):
            found.append(Mismatch(name, _reads(paths), sent, expected))
    return found


def _verifies_own_order(route: Route) -> bool:
    template = route.verify_order
    return template is not None and template.pieces == (_ORDER_ID_PATH,)


def _fields(rule: ObjectRule, prefix: str) -> Iterator[tuple[str, ValueRule]]:
    for name, child in rule.fields:
        if isinstance(child, ObjectRule):
            yield from _fields(child, f"{prefix}{name}.")
        else:
            yield f"{prefix}{name}", child


def _order_paths(rule: ValueRule) -> list[Path]:
    """The rule's paths when every one is in `data` (else none: not built from the order)."""
    paths = rule.reads()
    if not paths or any(p[:1] != ("data",) for p in paths):
        return []
    return paths


def _value_at(body: Any, dotted: str) -> Any:
    value = body
    for part in dotted.split("."):
        if not isinstance(value, dict) or part not in value:
            return None
        value = value[part]
    return value


def _same(a: Any, b: Any) -> bool:
    # As JSON compares: 1 and 1.0 are one number, but true is not 1.
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    return bool(a == b)


def _reads(paths: list[Path]) -> str:
    return " / ".join(format_path(p) for p in paths)


def _plain(value: Any) -> bool:
    return value is None or isinstance(value, int | float | bool)
