"""Building blocks for the store tests (test_store.py, test_store_contract.py, and the
PostgreSQL and fault tests): events and messages to enqueue, seeding, and reading a message
back, all through the public `Store` API, at a fixed time T0."""

from __future__ import annotations

from relay.models import (
    ClaimedMessage,
    EventStatus,
    InboundDraft,
    IngestOutcome,
    MessageRecord,
    MessageStatus,
    OutboundDraft,
    RetryLater,
)
from relay.store import Store

T0 = 1_700_000_000.0
DEST = "faurya"
OTHER = "faurya-eu"
LEASE_S = 30.0


def message(key: str, *, destination: str = DEST, body: bytes | None = None) -> OutboundDraft:
    return OutboundDraft(
        route="order_paid",
        destination=destination,
        idempotency_key=key,
        body=body if body is not None else f'{{"orderId": "{key}"}}'.encode(),
    )


def draft(
    webhook_id: str,
    *messages: OutboundDraft,
    source: str = "polar",
    event_type: str = "order.paid",
    status: EventStatus = EventStatus.ROUTED,
    reason: str | None = None,
    received_at: float = T0,
) -> InboundDraft:
    return InboundDraft(
        source=source,
        webhook_id=webhook_id,
        event_type=event_type,
        received_at=received_at,
        headers={"webhook-id": webhook_id, "content-type": "application/json"},
        body=f'{{"type": "{event_type}", "id": "{webhook_id}"}}'.encode(),
        status=status,
        reason=reason,
        messages=messages,
    )


async def seed(store: Store, *keys: str, destination: str = DEST) -> list[int]:
    """One event with one message per key; the message ids in order."""
    ids: list[int] = []
    for key in keys:
        result = await store.enqueue(
            draft(f"wh_{destination}_{key}", message(key, destination=destination))
        )
        assert result.outcome is IngestOutcome.ACCEPTED
        ids.extend(result.message_ids)
    return ids


async def record(store: Store, message_id: int) -> MessageRecord:
    found = await store.get_message(message_id)
    assert found is not None
    return found


async def claim_one(store: Store, destination: str = DEST) -> ClaimedMessage:
    [claimed] = await store.claim(destination, 1, LEASE_S)
    return claimed


async def keys(store: Store, status: MessageStatus | None = None) -> list[str]:
    """Idempotency keys, oldest message first."""
    rows = await store.list_messages(status=status, limit=10_000)
    return [r.idempotency_key for r in reversed(rows)]


def retry_at(at: float, *, counts_attempt: bool = True, status: int | None = 500) -> RetryLater:
    return RetryLater(at=at, reason="server_error", status=status, counts_attempt=counts_attempt)
