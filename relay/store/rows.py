"""Result rows to the dataclasses of relay/models.py, for every backend (their rows are
indexed by column position, in the order relay/store/sql.py selects them)."""

from __future__ import annotations

from relay.models import ClaimedMessage, EventStatus, MessageRecord, MessageStatus, StoredEvent
from relay.store.connection import Row


def claimed(r: Row, lease_token: str) -> ClaimedMessage:
    """A row of `sql.claim`'s RETURNING."""
    return ClaimedMessage(
        int(r[0]),
        r[1],
        r[2],
        bytes(r[3]),
        int(r[4]),
        float(r[5]),
        float(r[6]),
        lease_token,
        r[7],
        r[8],
        r[9],
    )


def message(r: Row) -> MessageRecord:
    """A row of `sql.MESSAGE_COLUMNS`."""
    return MessageRecord(
        id=int(r[0]),
        event_id=int(r[1]),
        route=r[2],
        destination=r[3],
        idempotency_key=r[4],
        status=MessageStatus(r[5]),
        attempts=int(r[6]),
        created_at=float(r[7]),
        next_attempt_at=float(r[8]),
        lease_until=r[9],
        last_status=r[10],
        last_error=r[11],
        delivered_at=r[12],
        updated_at=float(r[13]),
        event_type=r[14],
        webhook_id=r[15],
        body=bytes(r[16]),
        discarded_at=r[17],
        discard_reason=r[18],
    )


def event(r: Row) -> StoredEvent:
    """A row of `sql.EVENT_COLUMNS`."""
    return StoredEvent(
        int(r[0]),
        r[1],
        r[2],
        r[3],
        float(r[4]),
        EventStatus(r[5]),
        r[6],
        None if r[7] is None else bytes(r[7]),
    )
