"""Reading the revenue ledger's inputs: the stored Polar snapshot, mapped through the configured
routes, and the outbox's messages; then `relay.ledger.build`. The I/O edge of the ledger.

Polar's objects are mapped exactly as reconciliation maps them (relay/reconcile.py): a paid
order as `order.paid`, a refund that succeeded, failed or was canceled as `refund.updated`, a
lost dispute as `dispute.lost`, with the routes' lookups read from the store. A refund that
succeeded and was later undone expects both the refund and its reversal when the refund was
sent (the two cancel out), and nothing when it never was. Nothing here asks Polar's API.
"""

from __future__ import annotations

import json
from dataclasses import replace
from typing import Any
from zoneinfo import ZoneInfo

from relay.config import Config
from relay.ledger import NO_SNAPSHOT_NOTE, NO_TOKEN_NOTE, Ledger, build
from relay.ledger_differences import Expected, PolarEntry
from relay.mapping import format_path
from relay.models import EventFilter, EventStatus, MessageFilter, PolarKind, PolarRecord
from relay.reconcile import (
    DISPUTE_EVENT,
    map_polar,
    polar_event,
    polar_event_type,
    snapshot_paths,
)
from relay.revenue import facts
from relay.store import Store

EVENT_TYPES = ("order.paid", "refund.updated", DISPUTE_EVENT)
# A webhook can be stamped a little before Polar's created_at (clocks differ): messages are
# read from this long before the window.
CLOCK_SLACK_S = 86400.0
DEFAULT_SETTLE_S = 3600.0
MAX_MESSAGES = 10_000_000


def ledger_destinations(config: Config) -> set[str]:
    """Where the routes send Polar's revenue: the destinations the ledger counts."""
    source = config.reconcile.source
    return {
        r.destination
        for r in config.routes
        if r.source == source and any(r.takes(t) for t in EVENT_TYPES)
    }


def settle_s(config: Config) -> float:
    """How old a difference must be to count for the gauge and the alert: one reconcile
    interval (a younger one may still be fixed by the next run, or be a webhook in flight)."""
    return config.reconcile.interval_s or DEFAULT_SETTLE_S


async def read_ledger(
    store: Store,
    config: Config,
    *,
    now: float,
    since: float | None = None,
    until: float | None = None,
    timezone: str | None = None,
    currency: str | None = None,
) -> Ledger:
    """The ledger of [since, until) (default: the snapshot's window, else the last
    `reconcile.lookback_s`, up to now), days cut in `timezone` (default `ledger.timezone`)."""
    tz = ZoneInfo(timezone or config.ledger.timezone)
    coverage = await store.snapshot_coverage()
    if since is None:
        since = coverage.since if coverage is not None else now - config.reconcile.lookback_s
    if until is None:
        until = now
    note = None
    stale = False
    if coverage is None:
        note = NO_TOKEN_NOTE if config.polar_api.token is None else NO_SNAPSHOT_NOTE
    else:
        if PolarKind.DISPUTE not in coverage.kinds:
            note = (
                "lost disputes were not read (the token lacks disputes:read): Polar's side "
                "leaves them out"
            )
        wanted = {format_path(p) for p in snapshot_paths(config)}
        if not wanted <= set(coverage.fields):
            stale = True
            note = (
                "the routes read fields of Polar's objects that the last reconciliation run did "
                "not keep (a route changed since): Polar's side is complete again after the "
                "next run (relay reconcile --dry-run does it now)"
            )
        if config.polar_api.token is None:
            note = (
                f"no polar_api.token now: Polar's side is as the last reconciliation read it; "
                f"{NO_TOKEN_NOTE}"
            )
    records = await store.polar_snapshot() if coverage is not None else []
    unmappable = await _unmappable_events(
        store, config, min(since, coverage.since if coverage else since)
    )
    entries = [await _entry(store, config, r, unmappable) for r in records]
    first = min([since] + [e.created_at for e in entries])
    messages = await store.list_messages(
        MessageFilter(since=first - CLOCK_SLACK_S), limit=MAX_MESSAGES
    )
    return build(
        entries=entries,
        messages=messages,
        coverage=coverage,
        destinations=ledger_destinations(config),
        tz=tz,
        since=since,
        until=until,
        now=now,
        settle_s=settle_s(config),
        currency=currency,
        note=note,
        stale=stale,
    )


async def _unmappable_events(store: Store, config: Config, since: float) -> dict[str, int]:
    """Polar object id -> the newest stored webhook for it that was unmappable."""
    found: dict[str, int] = {}
    events = await store.list_events(
        EventFilter(
            statuses=(EventStatus.UNMAPPABLE,),
            source=config.reconcile.source,
            since=since - CLOCK_SLACK_S,
        )
    )
    for event in events:
        try:
            data = json.loads(event.body or b"null")["data"]
            found[str(data["id"])] = event.id
        except (ValueError, TypeError, KeyError):
            continue
    return found


def _polar_amount(record: PolarRecord, data: dict[str, Any]) -> tuple[int, str]:
    """Polar's own signed amount of the object (net of tax) and its currency."""
    field = "net_amount" if record.kind is PolarKind.ORDER else "amount"
    amount = data.get(field)
    value = amount if isinstance(amount, int) and not isinstance(amount, bool) else 0
    code = data.get("currency")
    currency = code.upper() if isinstance(code, str) else "other"
    return (value if record.kind is PolarKind.ORDER else -value), currency


async def _entry(
    store: Store, config: Config, record: PolarRecord, unmappable: dict[str, int]
) -> PolarEntry:
    data = json.loads(record.data)
    amount, currency = _polar_amount(record, data)
    base = PolarEntry(
        kind=record.kind,
        polar_id=record.polar_id,
        created_at=record.created_at,
        status=record.status,
        mapping=None,
        polar_minor=amount,
        currency=currency,
        unmappable_event_id=unmappable.get(record.polar_id),
    )
    event_type = polar_event_type(record.kind, data)
    if event_type is None:
        return base
    mapped = await map_polar(store, config, polar_event(event_type, data, record.fetched_at))
    expected = list(mapped.messages)
    if record.kind is PolarKind.REFUND and record.status != "succeeded":
        # Undone: the refund itself is expected too when it was sent (its reversal cancels it).
        undone = {**data, "status": "succeeded"}
        was = await map_polar(store, config, polar_event(event_type, undone, record.fetched_at))
        keys = [(m.destination, m.idempotency_key) for m in was.messages]
        sent = await store.find_bodies(keys)
        expected += [m for m in was.messages if (m.destination, m.idempotency_key) in sent]
    return replace(
        base,
        mapping=mapped.status,
        expected=tuple(Expected(m.destination, m.idempotency_key, facts(m.body)) for m in expected),
        reason=mapped.reason,
    )
