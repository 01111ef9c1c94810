"""Value types shared by the store, the mapping and the workers. No I/O here.

Times are unix epoch seconds as floats (`*_at`), durations carry their unit (`*_s`).
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Protocol


class Clock(Protocol):
    """Wall-clock time in epoch seconds; tests pass a fake one."""

    def now(self) -> float: ...


class SystemClock:
    """The real clock."""

    def now(self) -> float:
        return time.time()


def is_postgres_url(location: str) -> bool:
    """A storage location naming PostgreSQL; anything else is a SQLite file path."""
    return location.startswith(("postgresql://", "postgres://"))


class MessageStatus(StrEnum):
    """The states of an outbound message (see README, "Design")."""

    PENDING = "pending"
    INFLIGHT = "inflight"
    DELIVERED = "delivered"
    DEAD = "dead"
    DISCARDED = "discarded"  # a dead message an operator gave up on: kept, never sent


class EventStatus(StrEnum):
    """What happened to an inbound event at ingest."""

    ROUTED = "routed"  # at least one new outbound message was enqueued
    IGNORED = "ignored"  # no route selects it
    UNMAPPABLE = "unmappable"  # a route selected it but a required field was missing or bad
    DUPLICATE = "duplicate"  # every message it maps to was already enqueued by another event


class ErrorKind(StrEnum):
    """Why a delivery attempt got no HTTP answer to judge. One set, used as the
    `relay_delivery_attempts_total` status_class (beside 2xx..5xx), the `error_kind` of the
    log lines and the first word of the error the store keeps ("timeout: ...")."""

    TIMEOUT = "timeout"  # no answer within timeout_s, from the destination or a stuck child
    CONNECT = "connect"  # no connection: refused, DNS, TLS handshake
    CONNECTION = "connection"  # the connection broke during the request or the answer
    CHILD_GONE = "child_gone"  # the delivery process exited (or could not start)
    CHILD_ERROR = "child_error"  # the delivery process failed the attempt (a bug in it)
    PAYMENT_CHECK = "payment_check"  # Polar could not confirm the order (verify_order)
    PAYMENT_NOT_VERIFIED = "payment_not_verified"  # Polar says the order is unknown or unpaid

    def text(self, detail: str = "") -> str:
        """The error as stored and logged: the kind, then the detail."""
        return f"{self.value}: {detail}" if detail else self.value


class IngestOutcome(StrEnum):
    """The answer to one webhook, as seen by Polar."""

    ACCEPTED = "accepted"
    DUPLICATE = "duplicate"
    IGNORED = "ignored"


@dataclass(frozen=True, slots=True)
class OutboundDraft:
    """A message built by the mapping at ingest; its body bytes are final."""

    route: str
    destination: str
    idempotency_key: str
    body: bytes
    verify_ref: str | None = None  # a Polar order id to confirm as paid before sending
    # Fields of the body the console searches and sums; derived from `body`, so not compared.
    facts: BodyFacts | None = field(default=None, compare=False)


@dataclass(frozen=True, slots=True)
class BodyFacts:
    """Fields of a message body, extracted once by the mapping (which holds the body as a dict)
    into indexed columns: the console searches and sums them without parsing JSON per row."""

    order_id: str | None = None  # body "orderId"
    payment_ref: str | None = None  # body "providerPaymentId" (Polar's order id)
    refund_id: str | None = None  # body "refundId"
    event_kind: str | None = None  # body "event": purchase, refund, ...
    amount_minor: int | None = None  # body "amount", when an integer
    currency: str | None = None  # body "currency", upper case
    attributed: bool | None = None  # a faSessionId or faAttributionToken in "attribution"

    @classmethod
    def of(cls, body: object) -> BodyFacts | None:
        """The facts of a body dict (None for any other shape)."""
        if not isinstance(body, dict):
            return None

        def text(name: str) -> str | None:
            value = body.get(name)
            if isinstance(value, (str, int)) and not isinstance(value, bool):
                return str(value)[:200]
            return None

        amount = body.get("amount")
        if isinstance(amount, bool) or not isinstance(amount, int):
            amount = None
        currency = body.get("currency")
        attribution = body.get("attribution")
        return cls(
            order_id=text("orderId"),
            payment_ref=text("providerPaymentId"),
            refund_id=text("refundId"),
            event_kind=text("event"),
            amount_minor=amount,
            currency=currency.upper()[:16] if isinstance(currency, str) else None,
            attributed=isinstance(attribution, dict)
            and bool(attribution.get("faSessionId") or attribution.get("faAttributionToken")),
        )


@dataclass(frozen=True, slots=True)
class AttemptRecord:
    """One delivery attempt, stored with its outcome (mark_delivered / mark_retry / mark_dead)
    in the same transaction. `snippet` is already cut and redacted by the sender."""

    at: float
    status: int | None  # the HTTP status, when there was an answer
    error_kind: str | None  # an ErrorKind value, when there was none
    duration_s: float
    snippet: str = ""


@dataclass(frozen=True, slots=True)
class InboundDraft:
    """A verified webhook, mapped, ready to be committed with its messages."""

    source: str
    webhook_id: str
    event_type: str
    received_at: float
    headers: dict[str, str]
    body: bytes
    status: EventStatus
    reason: str | None = None
    messages: tuple[OutboundDraft, ...] = ()
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class EnqueueResult:
    """What the store did with one `InboundDraft`."""

    outcome: IngestOutcome
    event_id: int | None
    message_ids: tuple[int, ...] = ()
    duplicate_keys: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class ClaimedMessage:
    """A message leased to this process for one delivery attempt."""

    id: int
    destination: str
    idempotency_key: str
    body: bytes
    attempt: int  # 1 for the first attempt
    created_at: float
    retry_from_at: float
    lease_token: str
    request_id: str | None = None
    verify_ref: str | None = None
    route: str | None = None  # the route that built it (the payment check compares by it)


@dataclass(frozen=True, slots=True)
class MessageRecord:
    """A message as the operator sees it (`relay outbox list|show`)."""

    id: int
    event_id: int
    route: str
    destination: str
    idempotency_key: str
    status: MessageStatus
    attempts: int
    created_at: float
    next_attempt_at: float
    lease_until: float | None
    last_status: int | None
    last_error: str | None
    delivered_at: float | None
    updated_at: float
    event_type: str
    webhook_id: str
    body: bytes = field(repr=False, default=b"")
    discarded_at: float | None = None
    discard_reason: str | None = None


@dataclass(frozen=True, slots=True)
class DestinationStats:
    """Backlog figures for one destination."""

    counts: dict[MessageStatus, int]
    oldest_pending_created_at: float | None


# --- delivery outcomes: what one attempt decided; the worker maps each to one store call ---


@dataclass(frozen=True, slots=True)
class Delivered:
    status: int


@dataclass(frozen=True, slots=True)
class RetryLater:
    at: float
    reason: str
    status: int | None
    counts_attempt: bool = True  # a 429/503 with Retry-After is throttling, not failure
    retry_after_s: float | None = None


@dataclass(frozen=True, slots=True)
class Dead:
    reason: str
    status: int | None


Outcome = Delivered | RetryLater | Dead


# --- operator views ---


@dataclass(frozen=True, slots=True)
class MessageFilter:
    """Selects outbound messages for `relay outbox list` and `relay replay`."""

    ids: tuple[int, ...] = ()
    statuses: tuple[MessageStatus, ...] = ()
    destination: str | None = None
    event_type: str | None = None
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until


@dataclass(frozen=True, slots=True)
class EventFilter:
    """Selects inbound events for `relay reprocess`."""

    ids: tuple[int, ...] = ()
    statuses: tuple[EventStatus, ...] = ()
    source: str | None = None
    event_type: str | None = None
    since: float | None = None
    until: float | None = None


@dataclass(frozen=True, slots=True)
class StoredEvent:
    """An inbound event as stored (body None once retention pruned it)."""

    id: int
    source: str
    webhook_id: str
    event_type: str
    received_at: float
    status: EventStatus
    reason: str | None
    body: bytes | None = field(repr=False, default=None)


@dataclass(frozen=True, slots=True)
class PruneResult:
    event_bodies_cleared: int = 0
    messages_deleted: int = 0
    events_deleted: int = 0


# --- Polar's side of the revenue ledger (what reconciliation read) ---


class PolarKind(StrEnum):
    """The Polar objects the ledger keeps: each listing reconciliation reads."""

    ORDER = "order"
    REFUND = "refund"
    DISPUTE = "dispute"


@dataclass(frozen=True, slots=True)
class PolarRecord:
    """One Polar order, refund or lost dispute as a reconciliation run read it: the fields of
    the object the routes read (and the ledger's own) as JSON, for the routes to map again."""

    kind: PolarKind
    polar_id: str
    created_at: float
    status: str
    data: bytes = field(repr=False)
    fetched_at: float = 0.0


@dataclass(frozen=True, slots=True)
class SnapshotCoverage:
    """What the stored Polar snapshot covers: objects created in [since, until) (until None:
    up to `fetched_at`), of these kinds, as of `fetched_at` (the last run's end)."""

    since: float
    until: float | None
    fetched_at: float
    kinds: tuple[PolarKind, ...]
    # The object fields kept (dotted paths): what the routes read then, and the ledger's own.
    fields: tuple[str, ...] = ()

    @property
    def end(self) -> float:
        return self.fetched_at if self.until is None else min(self.until, self.fetched_at)
