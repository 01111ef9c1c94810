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

Each difference and its fix: relay/ledger_differences.py; the renderings (table, JSON, CSV):
relay/ledger_report.py.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import date, datetime, time, timedelta
from zoneinfo import ZoneInfo

from relay.ledger_differences import (
    Difference,
    Expected,
    Kind,
    PolarEntry,
    Why,
    compare,
    never_sent,
    unknown,
    unmappable,
)
from relay.models import EventStatus, MessageRecord, MessageStatus, SnapshotCoverage
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
    # Codes are upper case, but a body in no known currency is "other": match either way.
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
                diffs.append(never_sent(entry, exp, day, settled(entry.created_at)))
                continue
            message, money = found
            diffs += compare(entry, exp, message, money, day, settled(entry.created_at))
        if entry.mapping is EventStatus.UNMAPPABLE:
            diffs.append(unmappable(entry, day, settled(entry.created_at)))
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
            diffs.append(unknown(message, money, entries, day_of(at, tz), settled(at)))
    if only is not None:
        diffs = [d for d in diffs if d.currency.upper() == only]
    for d in diffs:
        days[(d.day, d.currency)].difference += d.amount_minor
    rows = []
    for (day, code), tallies in sorted(days.items()):
        if only is not None and code.upper() != only:
            continue
        # A day in the ledger's zone is 23 or 25 hours when its clocks change, not 86400 s.
        start, end = day_start(day, tz), day_start(day + timedelta(days=1), tz)
        known = coverage is not None and start < coverage.end and coverage.since < end
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


__all__ = [
    "NO_SNAPSHOT_NOTE",
    "NO_TOKEN_NOTE",
    "DayRow",
    "Difference",
    "Expected",
    "Kind",
    "Ledger",
    "PolarEntry",
    "Tally",
    "Why",
    "build",
    "day_of",
    "day_start",
]
