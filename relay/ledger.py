"""The revenue ledger: Polar's numbers against what the relay delivered to Faurya, per day and
currency, and the differences order by order. Pure: no I/O, no clock (`now` is given).

Polar's side is what reconciliation last read (the store's Polar snapshot), each object run
through the configured routes (relay/ledger_source.py does that), so its amounts are the ones
the relay sends and a route change shows up here too. The relay's side is the outbox's revenue
messages (bodies of the Faurya shape, relay/revenue.py) to the destinations those routes send
to. The two meet by (destination, idempotency key).

- A message that belongs to a Polar object counts on the day that object was created (in the
  ledger's time zone); any other message on the day the relay received it.
- A difference is signed Polar minus Faurya, in minor units (Polar's: relay/currency.py
  `polar_exponent`): an order Polar has as paid that Faurya never got is positive, a delivery
  Polar does not know is negative. A day's difference is the sum of its differences, so it
  covers only what both sides can see: messages received after the last reconcile run, or
  for objects created before its window, are counted in the relay's columns but are no
  difference.
"""

from __future__ import annotations

import json
from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, date, datetime, time
from enum import StrEnum
from typing import Any
from zoneinfo import ZoneInfo

from relay.currency import polar_exponent
from relay.models import (
    EventStatus,
    MessageRecord,
    MessageStatus,
    PolarKind,
    SnapshotCoverage,
)
from relay.revenue import RevenueFacts, facts

POLAR_SCOPES = "orders:read and refunds:read (and disputes:read for lost disputes)"
NO_TOKEN_NOTE = (
    "Polar's side needs polar_api.token (POLAR_ACCESS_TOKEN) with "
    f"{POLAR_SCOPES}: this ledger shows only the relay's own side"
)
NO_SNAPSHOT_NOTE = (
    "no reconciliation run has stored Polar's side yet: run `relay reconcile` (relay serve "
    "runs one a minute after start, then every reconcile.interval_s)"
)


class Kind(StrEnum):
    """What kind of difference."""

    MISSING = "missing"  # Polar has it as paid (or refunded): Faurya did not get it
    UNKNOWN_TO_POLAR = "unknown_to_polar"  # Faurya got it: Polar does not show it
    MISMATCH = "mismatch"  # both have it, with another amount, currency or event


class Why(StrEnum):
    NEVER_RECEIVED = "never_received"
    UNMAPPABLE = "unmappable"
    PENDING = "pending"
    DEAD = "dead"
    DISCARDED = "discarded"
    NOT_PAID = "not_paid"  # Polar has the object in another status
    NOT_FOUND = "not_found"  # Polar's listings for the window do not have it
    AMOUNT = "amount"
    CURRENCY = "currency"
    EVENT = "event"


@dataclass(frozen=True, slots=True)
class Expected:
    """A message the routes build from a Polar object: where it goes, its key, what it says."""

    destination: str
    idempotency_key: str
    facts: RevenueFacts | None


@dataclass(frozen=True, slots=True)
class PolarEntry:
    """One Polar object of the snapshot, mapped. `expected` is empty for what is not revenue
    (an unpaid order, a pending refund, an order of 0) and for an unmappable one."""

    kind: PolarKind
    polar_id: str
    created_at: float
    status: str
    mapping: EventStatus | None  # None: not revenue, not mapped
    expected: tuple[Expected, ...] = ()
    reason: str | None = None  # why the routes cannot map it
    polar_minor: int = 0  # Polar's own signed amount (for an unmappable object)
    currency: str = "other"
    unmappable_event_id: int | None = None  # a webhook for it that was stored unmappable


@dataclass(frozen=True, slots=True)
class Tally:
    """Revenue messages: how many purchases and refunds, and their amounts (minor units)."""

    purchases: int = 0
    purchase_minor: int = 0
    refunds: int = 0
    refund_minor: int = 0

    @property
    def net_minor(self) -> int:
        return self.purchase_minor - self.refund_minor

    def add(self, money: RevenueFacts) -> Tally:
        if money.event == "purchase":
            return replace(
                self,
                purchases=self.purchases + 1,
                purchase_minor=self.purchase_minor + money.amount_minor,
            )
        # A refund, or a "credit" (a negative purchase, counted positive): money going back.
        return replace(
            self, refunds=self.refunds + 1, refund_minor=self.refund_minor + money.amount_minor
        )


@dataclass(frozen=True, slots=True)
class Difference:
    kind: Kind
    why: Why
    day: date
    currency: str
    amount_minor: int  # signed: Polar minus Faurya
    at: float  # when the Polar object was created (or the message received)
    detail: str
    fix: str
    polar_kind: PolarKind | None = None
    polar_id: str | None = None
    idempotency_key: str | None = None
    message_id: int | None = None  # the console links /messages/{id}
    event_id: int | None = None
    settled: bool = True  # older than the settling time (the gauge counts only these)


@dataclass(frozen=True, slots=True)
class DayRow:
    day: date
    currency: str
    polar: Tally | None  # None: Polar's side unknown for this day
    received: Tally
    delivered: Tally
    pending: Tally  # pending or inflight (retrying)
    dead: Tally
    discarded: Tally
    difference_minor: int


@dataclass(frozen=True, slots=True)
class Ledger:
    timezone: str
    since: float
    until: float
    rows: tuple[DayRow, ...]
    differences: tuple[Difference, ...]
    coverage: SnapshotCoverage | None
    note: str | None = None  # why Polar's side is missing or partial
    # Polar's side lacks fields the routes read now: its differences may be the route's change.
    stale: bool = False

    @property
    def polar_available(self) -> bool:
        return self.coverage is not None

    def settled_by_currency(self) -> dict[str, tuple[int, int]]:
        """currency -> (signed sum, count) of the settled differences: the gauge's values."""
        out: dict[str, tuple[int, int]] = {}
        for d in self.differences:
            if d.settled:
                total, count = out.get(d.currency, (0, 0))
                out[d.currency] = (total + d.amount_minor, count + 1)
        return out


@dataclass
class _Day:
    polar: Tally = field(default_factory=Tally)
    received: Tally = field(default_factory=Tally)
    by_status: dict[MessageStatus, Tally] = field(default_factory=dict)
    difference: int = 0


def day_of(at: float, tz: ZoneInfo) -> date:
    return datetime.fromtimestamp(at, tz).date()


def day_start(day: date, tz: ZoneInfo) -> float:
    return datetime.combine(day, time(0), tz).timestamp()


def _signed(money: RevenueFacts | None) -> int:
    if money is None:
        return 0
    return money.amount_minor if money.event == "purchase" else -money.amount_minor


def _describe(entry: PolarEntry) -> str:
    return f"{entry.kind.value} {entry.polar_id}"


def build(
    *,
    entries: Sequence[PolarEntry],
    messages: Sequence[MessageRecord],
    coverage: SnapshotCoverage | None,
    destinations: Iterable[str],
    tz: ZoneInfo,
    since: float,
    until: float,
    now: float,
    settle_s: float,
    currency: str | None = None,
    note: str | None = None,
    stale: bool = False,
) -> Ledger:
    """The ledger of [since, until). `messages`: the outbox's messages that may belong to it
    (every one created since `since` and any for the entries' keys); `destinations`: those
    the ledger counts (where the routes send revenue)."""
    wanted = set(destinations)
    only = currency.upper() if currency else None
    revenue = {
        (m.destination, m.idempotency_key): (m, money)
        for m in messages
        if m.destination in wanted and (money := facts(m.body)) is not None
    }
    # Every entry's messages, in the window or not: a message of an object created before
    # `since` is that object's, never "unknown to Polar".
    owner = {
        (x.destination, x.idempotency_key): e
        for e in entries
        for x in e.expected
        if x.destination in wanted
    }
    days: dict[tuple[date, str], _Day] = defaultdict(_Day)
    diffs: list[Difference] = []

    def settled(at: float) -> bool:
        return at < now - settle_s

    for entry in entries:
        if not since <= entry.created_at < until:
            continue
        day = day_of(entry.created_at, tz)
        for exp in entry.expected:
            if exp.destination not in wanted or exp.facts is None:
                continue
            code = exp.facts.currency
            days[(day, code)].polar = days[(day, code)].polar.add(exp.facts)
            found = revenue.get((exp.destination, exp.idempotency_key))
            if found is None:
                diffs.append(_never_sent(entry, exp, day, settled(entry.created_at)))
                continue
            message, money = found
            diffs += _compare(entry, exp, message, money, day, settled(entry.created_at))
        if entry.mapping is EventStatus.UNMAPPABLE:
            diffs.append(_unmappable(entry, day, settled(entry.created_at)))
    for key, (message, money) in revenue.items():
        belongs = owner.get(key)
        at = message.created_at if belongs is None else belongs.created_at
        if not since <= at < until:
            continue
        tallies = days[(day_of(at, tz), money.currency)]
        tallies.received = tallies.received.add(money)
        status = (
            MessageStatus.PENDING if message.status is MessageStatus.INFLIGHT else message.status
        )
        tallies.by_status[status] = tallies.by_status.get(status, Tally()).add(money)
        # Only inside what Polar's snapshot covers: a message received after the last run, or
        # for an object older than its window, is not known to be unknown.
        if (
            belongs is None
            and message.status is MessageStatus.DELIVERED
            and coverage is not None
            and coverage.since <= at < coverage.end
        ):
            diffs.append(_unknown(message, money, entries, day_of(at, tz), settled(at)))
    if only is not None:
        diffs = [d for d in diffs if d.currency == only]
    for d in diffs:
        days[(d.day, d.currency)].difference += d.amount_minor
    rows = []
    for (day, code), tallies in sorted(days.items()):
        if only is not None and code != only:
            continue
        start = day_start(day, tz)
        known = coverage is not None and start < coverage.end and coverage.since < start + 86400
        rows.append(
            DayRow(
                day=day,
                currency=code,
                polar=tallies.polar if known else None,
                received=tallies.received,
                delivered=tallies.by_status.get(MessageStatus.DELIVERED, Tally()),
                pending=tallies.by_status.get(MessageStatus.PENDING, Tally()),
                dead=tallies.by_status.get(MessageStatus.DEAD, Tally()),
                discarded=tallies.by_status.get(MessageStatus.DISCARDED, Tally()),
                difference_minor=tallies.difference,
            )
        )
    diffs.sort(key=lambda d: (d.day, d.currency, d.at))
    return Ledger(
        timezone=str(tz.key),
        since=since,
        until=until,
        rows=tuple(rows),
        differences=tuple(diffs),
        coverage=coverage,
        note=note,
        stale=stale,
    )


def _never_sent(entry: PolarEntry, exp: Expected, day: date, is_settled: bool) -> Difference:
    assert exp.facts is not None
    common: dict[str, Any] = {
        "kind": Kind.MISSING,
        "day": day,
        "currency": exp.facts.currency,
        "amount_minor": _signed(exp.facts),
        "at": entry.created_at,
        "polar_kind": entry.kind,
        "polar_id": entry.polar_id,
        "idempotency_key": exp.idempotency_key,
        "settled": is_settled,
    }
    if entry.unmappable_event_id is not None:
        return Difference(
            why=Why.UNMAPPABLE,
            detail=(
                f"{_describe(entry)} is {entry.status} at Polar; its webhook (event "
                f"{entry.unmappable_event_id}) was unmappable when it came, and the routes map "
                "it now"
            ),
            fix=f"relay reprocess {entry.unmappable_event_id}",
            event_id=entry.unmappable_event_id,
            **common,
        )
    return Difference(
        why=Why.NEVER_RECEIVED,
        detail=(
            f"{_describe(entry)} is {entry.status} at Polar; the relay never received it "
            f"({exp.idempotency_key} is not in the outbox): a webhook Polar gave up on, or one "
            "it never sent"
        ),
        fix="relay reconcile",
        **common,
    )


def _unmappable(entry: PolarEntry, day: date, is_settled: bool) -> Difference:
    fix = "fix the route in relay.toml, then " + (
        f"relay reprocess {entry.unmappable_event_id}"
        if entry.unmappable_event_id is not None
        else "relay reconcile"
    )
    return Difference(
        kind=Kind.MISSING,
        why=Why.UNMAPPABLE,
        day=day,
        currency=entry.currency,
        amount_minor=entry.polar_minor,
        at=entry.created_at,
        detail=(
            f"{_describe(entry)} is {entry.status} at Polar, and the routes cannot map it: "
            f"{entry.reason} (the amount is Polar's own)"
        ),
        fix=fix,
        polar_kind=entry.kind,
        polar_id=entry.polar_id,
        event_id=entry.unmappable_event_id,
        settled=is_settled,
    )


def _compare(
    entry: PolarEntry,
    exp: Expected,
    message: MessageRecord,
    money: RevenueFacts,
    day: date,
    is_settled: bool,
) -> list[Difference]:
    assert exp.facts is not None
    common: dict[str, Any] = {
        "day": day,
        "at": entry.created_at,
        "polar_kind": entry.kind,
        "polar_id": entry.polar_id,
        "idempotency_key": exp.idempotency_key,
        "message_id": message.id,
        "settled": is_settled,
    }
    status = message.status
    if status is not MessageStatus.DELIVERED:
        if status in (MessageStatus.PENDING, MessageStatus.INFLIGHT):
            why, fix = (
                Why.PENDING,
                f"none needed: it is being retried (relay outbox retry {message.id} sends it now)",
            )
            detail = f"message {message.id} is {status.value} after {message.attempts} attempt(s)"
            if message.webhook_id.startswith("reconcile:"):
                detail += " (enqueued by reconciliation: its webhook never came)"
        elif status is MessageStatus.DEAD:
            why, fix = Why.DEAD, f"fix the cause, then relay outbox retry {message.id}"
            detail = f"message {message.id} is dead: {message.last_error or 'no answer recorded'}"
        else:
            why = Why.DISCARDED
            fix = (
                "none by the relay: an operator discarded it; record it in Faurya by hand "
                "if it should count"
            )
            detail = f"message {message.id} was discarded: {message.discard_reason or 'no reason'}"
        return [
            Difference(
                kind=Kind.MISSING,
                why=why,
                currency=exp.facts.currency,
                amount_minor=_signed(exp.facts),
                detail=f"{_describe(entry)} is {entry.status} at Polar; {detail}",
                fix=fix,
                **common,
            )
        ]
    if money == exp.facts or (
        (money.event, money.amount_minor, money.currency)
        == (exp.facts.event, exp.facts.amount_minor, exp.facts.currency)
    ):
        return []
    if money.currency != exp.facts.currency:
        why = Why.CURRENCY
    elif (money.event == "purchase") != (exp.facts.event == "purchase"):
        why = Why.EVENT
    else:
        why = Why.AMOUNT
    fix = (
        f"none by the relay (a replay resends the same body): see relay outbox show "
        f"{message.id}, then correct it in Faurya by hand, or put the route back if it changed"
    )
    sent = f"{money.event} {money.amount_minor} {money.currency}"
    want = f"{exp.facts.event} {exp.facts.amount_minor} {exp.facts.currency}"
    detail = (
        f"message {message.id} delivered {sent}; the routes make {want} of Polar's "
        f"{_describe(entry)}: the route changed after delivery, or the body is not what "
        "Polar's object says"
    )
    if why is Why.CURRENCY:
        # Two currencies do not subtract: Polar's amount is missing in one, Faurya's is extra
        # in the other.
        return [
            Difference(
                kind=Kind.MISMATCH,
                why=why,
                currency=exp.facts.currency,
                amount_minor=_signed(exp.facts),
                detail=detail,
                fix=fix,
                **common,
            ),
            Difference(
                kind=Kind.MISMATCH,
                why=why,
                currency=money.currency,
                amount_minor=-_signed(money),
                detail=detail,
                fix=fix,
                **common,
            ),
        ]
    return [
        Difference(
            kind=Kind.MISMATCH,
            why=why,
            currency=exp.facts.currency,
            amount_minor=_signed(exp.facts) - _signed(money),
            detail=detail,
            fix=fix,
            **common,
        )
    ]


def _unknown(
    message: MessageRecord,
    money: RevenueFacts,
    entries: Sequence[PolarEntry],
    day: date,
    is_settled: bool,
) -> Difference:
    ids = _polar_ids(message.body)
    known = next((e for e in entries if e.polar_id in ids), None)
    if known is not None:
        why = Why.NOT_PAID
        detail = (
            f"Faurya got message {message.id} ({money.event} {money.amount_minor} "
            f"{money.currency}, {message.idempotency_key}); Polar has {_describe(known)} as "
            f"{known.status}, which is not revenue"
        )
    else:
        why = Why.NOT_FOUND
        detail = (
            f"Faurya got message {message.id} ({money.event} {money.amount_minor} "
            f"{money.currency}, {message.idempotency_key}); Polar's listings for the ledger's "
            "window have no such payment: a forged or test webhook"
        )
    return Difference(
        kind=Kind.UNKNOWN_TO_POLAR,
        why=why,
        day=day,
        currency=money.currency,
        amount_minor=-_signed(money),
        at=message.created_at,
        detail=detail,
        fix=(
            f"none by the relay: check relay outbox show {message.id} and Polar's dashboard; "
            "if it is forged, rotate the webhook secret (docs/security.md) and correct Faurya "
            "by hand; routes with verify_order stop such messages"
        ),
        idempotency_key=message.idempotency_key,
        message_id=message.id,
        event_id=message.event_id,
        settled=is_settled,
    )


def _polar_ids(body: bytes) -> set[str]:
    """The Polar ids a Faurya body names (providerPaymentId, refundId)."""
    try:
        payload = json.loads(body)
    except ValueError:
        return set()
    if not isinstance(payload, dict):
        return set()
    return {v for k in ("providerPaymentId", "refundId") if isinstance(v := payload.get(k), str)}


# ---------------------------------------------------------------- plain data out


def major(amount_minor: int, currency: str) -> str:
    """Minor units as a major-unit string by Polar's exponent ("44.10", "4410" for JPY)."""
    exp = polar_exponent(currency)
    if exp is None or exp == 0:
        return str(amount_minor)
    sign = "-" if amount_minor < 0 else ""
    whole, frac = divmod(abs(amount_minor), 10**exp)
    return f"{sign}{whole}.{frac:0{exp}d}"


def tally_json(tally: Tally) -> dict[str, int]:
    return {
        "purchases": tally.purchases,
        "purchase_minor": tally.purchase_minor,
        "refunds": tally.refunds,
        "refund_minor": tally.refund_minor,
        "net_minor": tally.net_minor,
    }


def difference_json(d: Difference) -> dict[str, Any]:
    return {
        "kind": d.kind.value,
        "why": d.why.value,
        "day": d.day.isoformat(),
        "currency": d.currency,
        "amount_minor": d.amount_minor,
        "at": datetime.fromtimestamp(d.at, UTC).isoformat(),
        "polar_kind": None if d.polar_kind is None else d.polar_kind.value,
        "polar_id": d.polar_id,
        "idempotency_key": d.idempotency_key,
        "message_id": d.message_id,
        "event_id": d.event_id,
        "settled": d.settled,
        "detail": d.detail,
        "fix": d.fix,
    }


def to_json(ledger: Ledger) -> dict[str, Any]:
    """The ledger as plain JSON data (the CLI's --format json, the console's API)."""
    tz = ZoneInfo(ledger.timezone)
    coverage = ledger.coverage
    return {
        "timezone": ledger.timezone,
        "since": datetime.fromtimestamp(ledger.since, tz).isoformat(),
        "until": datetime.fromtimestamp(ledger.until, tz).isoformat(),
        "polar": {
            "available": coverage is not None,
            "note": ledger.note,
            "covers_since": None
            if coverage is None
            else datetime.fromtimestamp(coverage.since, tz).isoformat(),
            "read_at": None
            if coverage is None
            else datetime.fromtimestamp(coverage.fetched_at, tz).isoformat(),
            "kinds": [] if coverage is None else [k.value for k in coverage.kinds],
        },
        "days": [
            {
                "day": row.day.isoformat(),
                "currency": row.currency,
                "exponent": polar_exponent(row.currency),
                "polar": None if row.polar is None else tally_json(row.polar),
                "received": tally_json(row.received),
                "delivered": tally_json(row.delivered),
                "pending": tally_json(row.pending),
                "dead": tally_json(row.dead),
                "discarded": tally_json(row.discarded),
                "difference_minor": row.difference_minor,
            }
            for row in ledger.rows
        ],
        "differences": [difference_json(d) for d in ledger.differences],
    }
