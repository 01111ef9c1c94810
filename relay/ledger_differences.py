"""One Polar object against the outbox, or one message against Polar: what differs, why, and
the fix that applies (the text an operator reads). Pure; relay/ledger.py calls these.

Every difference is signed Polar minus Faurya, in minor units, and names the Polar object, the
idempotency key and, where there is one, the message (the console links `/messages/{id}`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import date
from enum import StrEnum
from typing import Any

from relay.models import EventStatus, MessageRecord, MessageStatus, PolarKind
from relay.revenue import RevenueFacts


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


def _signed(money: RevenueFacts | None) -> int:
    if money is None:
        return 0
    return money.amount_minor if money.event == "purchase" else -money.amount_minor


def _describe(entry: PolarEntry) -> str:
    return f"{entry.kind.value} {entry.polar_id}"


def never_sent(entry: PolarEntry, exp: Expected, day: date, is_settled: bool) -> Difference:
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


def unmappable(entry: PolarEntry, day: date, is_settled: bool) -> Difference:
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


def compare(
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
    if (money.event, money.amount_minor, money.currency) == (
        exp.facts.event,
        exp.facts.amount_minor,
        exp.facts.currency,
    ):
        return []
    if money.currency != exp.facts.currency:
        why = Why.CURRENCY
        # Two currencies do not subtract: Polar's amount is missing in one, Faurya's is extra
        # in the other.
        amounts = [(exp.facts.currency, _signed(exp.facts)), (money.currency, -_signed(money))]
    else:
        # A refund sent as a negative purchase (a "credit") moves the same money, but Faurya
        # books it as another event: that is the event's difference, not the amount's.
        why = Why.EVENT if money.event != exp.facts.event else Why.AMOUNT
        amounts = [(exp.facts.currency, _signed(exp.facts) - _signed(money))]
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
    return [
        Difference(
            kind=Kind.MISMATCH,
            why=why,
            currency=currency,
            amount_minor=amount,
            detail=detail,
            fix=fix,
            **common,
        )
        for currency, amount in amounts
    ]


def unknown(
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
