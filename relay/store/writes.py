"""The write statements of the hot path, as functions of a `Connection` inside a transaction
the caller owns: enqueue (events and messages), claim, ack, settle. Both backends and both
ways of running a transaction (the group-commit engine, an operator's direct write) use them.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Iterable, Sequence
from typing import Any, TypeVar

import orjson

from relay.models import (
    AttemptRecord,
    BodyFacts,
    ClaimedMessage,
    EnqueueResult,
    EventStatus,
    InboundDraft,
    IngestOutcome,
    OutboundDraft,
)
from relay.store import rows as r
from relay.store import sql
from relay.store.connection import Connection

T = TypeVar("T")
# What an attempt row keeps of the answer (the sender already cut and redacted it).
SNIPPET_CHARS = 512


def chunks(items: Sequence[T]) -> Iterable[Sequence[T]]:
    for start in range(0, len(items), sql.ROWS_PER_STATEMENT):
        yield items[start : start + sql.ROWS_PER_STATEMENT]


async def insert_drafts(
    db: Connection, drafts: Sequence[InboundDraft], now: float
) -> list[EnqueueResult]:
    """Insert events and their messages: two multi-row INSERT ... ON CONFLICT DO NOTHING
    RETURNING statements, so the database decides every duplicate and a batch costs a handful
    of statements whatever its size."""
    event_rows = [
        (
            d.source,
            d.webhook_id,
            d.event_type,
            d.received_at,
            _headers_json(d.headers),
            d.body,
            d.status.value,
            d.reason,
            d.request_id,
        )
        for d in drafts
    ]
    inserted: dict[tuple[str, str], int] = {}
    for chunk in chunks(event_rows):
        returned = await db.execute_fetchall(
            sql.insert_events(len(chunk)), [v for row in chunk for v in row]
        )
        inserted.update({(row[1], row[2]): int(row[0]) for row in returned})
    # Within one batch, the first of two equal webhook-ids wins (rows insert in order).
    event_ids = [inserted.pop((d.source, d.webhook_id), None) for d in drafts]
    new_messages = await insert_messages(
        db,
        [
            (event_id, m, d.request_id)
            for d, event_id in zip(drafts, event_ids, strict=True)
            if event_id is not None
            for m in d.messages
        ],
        now,
    )
    results, all_duplicate = [], []
    for d, event_id in zip(drafts, event_ids, strict=True):
        if event_id is None:
            results.append(EnqueueResult(IngestOutcome.DUPLICATE, None))
            continue
        ids, duplicate_keys = [], []
        for m in d.messages:
            message_id = new_messages.pop((m.destination, m.idempotency_key), None)
            if message_id is None:
                duplicate_keys.append(m.idempotency_key)
            else:
                ids.append(message_id)
        if d.status is EventStatus.ROUTED and not ids:
            all_duplicate.append(event_id)
            outcome = IngestOutcome.DUPLICATE
        elif d.status is EventStatus.IGNORED:
            outcome = IngestOutcome.IGNORED
        else:
            outcome = IngestOutcome.ACCEPTED
        results.append(EnqueueResult(outcome, event_id, tuple(ids), tuple(duplicate_keys)))
    if all_duplicate:
        await db.execute(sql.events_all_duplicate(len(all_duplicate)), all_duplicate)
    return results


async def insert_messages(
    db: Connection, messages: Sequence[tuple[int, OutboundDraft, str | None]], now: float
) -> dict[tuple[str, str], int]:
    """Insert (event id, message, request id) rows, due now; a key the destination already
    has is skipped (ON CONFLICT: the database decides). Returns (destination, key) -> new id;
    within one call, the first of two equal keys wins (rows insert in order)."""
    message_rows = [
        (
            event_id,
            m.route,
            m.destination,
            m.idempotency_key,
            m.body,
            "pending",
            now,
            now,
            now,
            now,
            request_id,
            m.verify_ref,
            *_facts(m.facts),
        )
        for event_id, m, request_id in messages
    ]
    new_messages: dict[tuple[str, str], int] = {}
    for chunk in chunks(message_rows):
        returned = await db.execute_fetchall(
            sql.insert_messages(len(chunk)), [v for row in chunk for v in row]
        )
        new_messages.update({(row[1], row[2]): int(row[0]) for row in returned})
    return new_messages


def _headers_json(headers: dict[str, str]) -> str:
    """An event's stored headers as compact JSON, keys sorted."""
    try:
        return orjson.dumps(headers, option=orjson.OPT_SORT_KEYS).decode()
    except TypeError:
        # A value with bytes that are not UTF-8 (aiohttp hands them over as surrogates, and
        # User-Agent is stored but not signed): orjson refuses it, the standard library
        # escapes it. Refusing would answer a verified webhook 503 on every retry.
        return json.dumps(headers, sort_keys=True, separators=(",", ":"))


async def fill_facts(db: Connection, filled: Sequence[tuple[int, BodyFacts]]) -> None:
    """Write the search and revenue columns of existing messages (`relay backfill`)."""
    for message_id, facts in filled:
        cursor = await db.execute(sql.UPDATE_FACTS, (*_facts(facts), message_id))
        await cursor.close()


def _facts(facts: BodyFacts | None) -> tuple[Any, ...]:
    """A message's search columns (relay/models.py BodyFacts), in insert_messages' order."""
    if facts is None:
        return (None,) * 7
    attributed = None if facts.attributed is None else int(facts.attributed)
    return (
        facts.order_id,
        facts.payment_ref,
        facts.refund_id,
        facts.event_kind,
        facts.amount_minor,
        facts.currency,
        attributed,
    )


async def record_attempts(
    db: Connection, attempts: Sequence[tuple[ClaimedMessage, str, AttemptRecord]]
) -> None:
    """Store (message, outcome, attempt) rows: called inside the transaction that writes the
    outcomes, only for messages whose outcome was written (a lost lease records nothing)."""
    for chunk in chunks(attempts):
        params = [
            v
            for msg, outcome, a in chunk
            for v in (
                msg.id,
                msg.attempt,
                a.at,
                outcome,
                a.status,
                a.error_kind,
                a.duration_s,
                a.snippet[:SNIPPET_CHARS],
            )
        ]
        await db.execute(sql.insert_attempts(len(chunk)), params)


async def note_activity(db: Connection, destination: str, now: float, error: str | None) -> None:
    """Remember a destination's last success (error None) or last failure (the console)."""
    if error is None:
        await db.execute(sql.NOTE_SUCCESS, (destination, now))
    else:
        await db.execute(sql.NOTE_FAILURE, (destination, error[:500], now))


async def deliver_acks(
    db: Connection,
    dialect: sql.Dialect,
    acks: Sequence[tuple[ClaimedMessage, int, AttemptRecord | None]],
    now: float,
) -> set[int]:
    """`mark_delivered`, then the attempts of the acks that took effect and their
    destinations' last success, in the same transaction. Returns the ids that changed."""
    changed = await mark_delivered(db, dialect, [(m, status) for m, status, _ in acks], now)
    await record_attempts(
        db, [(m, "delivered", a) for m, _, a in acks if a is not None and m.id in changed]
    )
    for destination in sorted({m.destination for m, _, _ in acks if m.id in changed}):
        await note_activity(db, destination, now, None)
    return changed


async def claim(
    db: Connection,
    dialect: sql.Dialect,
    destination: str,
    limit: int,
    lease_s: float,
    now: float,
) -> list[ClaimedMessage]:
    """Lease up to `limit` due messages in one statement (race-free between claimers)."""
    token = secrets.token_hex(8)
    returned = await db.execute_fetchall(
        sql.claim(dialect), (now + lease_s, token, now, destination, now, limit)
    )
    claimed = [r.claimed(row, token) for row in returned]
    claimed.sort(key=lambda m: m.id)
    return claimed


async def mark_delivered(
    db: Connection,
    dialect: sql.Dialect,
    acks: Sequence[tuple[ClaimedMessage, int]],
    now: float,
) -> set[int]:
    """Acks grouped by answer status: one statement per status, whatever the count. Returns
    the ids that changed (an ack whose lease token no longer matches changes nothing)."""
    by_status: dict[int, list[ClaimedMessage]] = {}
    for msg, status in acks:
        by_status.setdefault(status, []).append(msg)
    changed: set[int] = set()
    for status, messages in by_status.items():
        for chunk in chunks(messages):
            returned = await db.execute_fetchall(
                sql.mark_delivered(dialect, len(chunk)),
                [
                    now,
                    status,
                    now,
                    *(m.id for m in chunk),
                    *(f"{m.id}:{m.lease_token}" for m in chunk),
                ],
            )
            changed.update(int(row[0]) for row in returned)
    return changed


async def settle(
    db: Connection, msg: ClaimedMessage, assignments: str, params: tuple[Any, ...], now: float
) -> bool:
    """One state change of a claimed message; the lease token makes a late ack from a lost
    lease a no-op instead of a corruption."""
    return await execute(db, sql.settle(assignments), (*params, now, msg.id, msg.lease_token)) == 1


async def execute(db: Connection, statement: str, params: Sequence[Any] = ()) -> int:
    """Run one statement; the number of rows it changed."""
    cursor = await db.execute(statement, params)
    count = int(cursor.rowcount)
    await cursor.close()
    return count
