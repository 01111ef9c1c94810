"""Moving an installation from SQLite to PostgreSQL without losing a message.

`copy_sqlite_to_postgres` copies every event, message and pause state, ids included, the
console's history (attempts, audit, each destination's last success and error) and the
ledger's snapshot of Polar with its coverage, into an empty PostgreSQL outbox in one
transaction (all or nothing), turns inflight messages back into pending ones (their process is
gone), and moves the id sequences past the copied ids. It refuses while a relay serves the
SQLite file (its serve lock is held) and when the target already holds rows of any copied
table, so it can neither race a live relay nor merge two histories.
"""

from __future__ import annotations

import sqlite3
from dataclasses import dataclass

import asyncpg

from relay.errors import StorageError, StoreLocked
from relay.store import sql
from relay.store.postgres import migrate, numbered
from relay.store.schema import ServeLock

_TABLES = {
    "inbound_events": (
        "id",
        "source",
        "webhook_id",
        "event_type",
        "received_at",
        "headers_json",
        "body",
        "status",
        "reason",
        "request_id",
    ),
    "outbound_messages": (
        "id",
        "event_id",
        "route",
        "destination",
        "idempotency_key",
        "body",
        "status",
        "attempts",
        "created_at",
        "retry_from_at",
        "next_attempt_at",
        "lease_until",
        "lease_token",
        "last_status",
        "last_error",
        "delivered_at",
        "updated_at",
        "request_id",
        "verify_ref",
        "discarded_at",
        "discard_reason",
        "order_id",
        "payment_ref",
        "refund_id",
        "event_kind",
        "amount_minor",
        "currency",
        "attributed",
    ),
    "destination_state": ("destination", "paused", "updated_at"),
    # The console's history: attempts and the audit (jobs are per running relay: not copied).
    "message_attempts": (
        "id",
        "message_id",
        "attempt",
        "at",
        "outcome",
        "http_status",
        "error_kind",
        "duration_s",
        "response_snippet",
    ),
    "console_audit": ("id", "at", "actor", "action", "target", "detail", "count"),
    "destination_activity": ("destination", "last_success_at", "last_error", "last_error_at"),
    # The ledger's copy of Polar: without it the ledger would show no Polar side until the
    # next reconcile run.
    "polar_snapshot": ("kind", "polar_id", "created_at", "status", "data", "fetched_at"),
}
# relay_meta rows that describe copied data (the snapshot's coverage); the others (the
# readiness probe's) belong to the relay that wrote them.
_META_KEYS = ("polar_snapshot",)
_SEQUENCED = ("inbound_events", "outbound_messages", "message_attempts", "console_audit")
_BATCH_ROWS = 1000


@dataclass(frozen=True, slots=True)
class TransferResult:
    events: int
    messages: int
    pending: int  # messages still to deliver (pending, including former inflight)
    dead: int


async def copy_sqlite_to_postgres(sqlite_path: str, url: str) -> TransferResult:
    lock = ServeLock(sqlite_path)
    try:
        lock.acquire()
    except StoreLocked:
        raise StorageError(
            f"a relay is serving {sqlite_path}: stop it first (SIGTERM), then migrate"
        ) from None
    try:
        source = sqlite3.connect(f"file:{sqlite_path}?mode=ro", uri=True)
    except sqlite3.Error as exc:
        lock.release()
        raise StorageError(f"cannot open {sqlite_path}: {exc}") from None
    try:
        target = await asyncpg.connect(url)
    except (OSError, asyncpg.PostgresError, ValueError) as exc:  # ValueError: a malformed URL
        source.close()
        lock.release()
        raise StorageError(f"cannot reach PostgreSQL: {type(exc).__name__}") from None
    try:
        await migrate(target)
        # Any copied table, not only the events: a PostgreSQL relay may have stored a Polar
        # snapshot or an audit row before its first event, and the copy's ids and keys would
        # then collide with them.
        for table in _TABLES:
            if await target.fetchval(f"SELECT EXISTS (SELECT 1 FROM {table})"):
                raise StorageError(
                    "the PostgreSQL outbox is not empty: refusing to merge histories"
                )
        async with target.transaction():
            for table, columns in _TABLES.items():
                await _copy_table(source, target, table, columns)
            await _copy_meta(source, target)
            # The process that held these leases is gone: hand them back, attempt not counted.
            await target.execute(
                "UPDATE outbound_messages SET status = 'pending', lease_until = NULL, "
                "lease_token = NULL, attempts = GREATEST(attempts - 1, 0) "
                "WHERE status = 'inflight'"
            )
            for table in _SEQUENCED:
                await target.execute(
                    f"SELECT setval(pg_get_serial_sequence('{table}', 'id'), "
                    f"GREATEST((SELECT max(id) FROM {table}), 1))"
                )
        counts = await target.fetchrow(
            "SELECT (SELECT count(*) FROM inbound_events), count(*), "
            "count(*) FILTER (WHERE status = 'pending'), count(*) FILTER (WHERE status = 'dead') "
            "FROM outbound_messages"
        )
        return TransferResult(int(counts[0]), int(counts[1]), int(counts[2]), int(counts[3]))
    finally:
        await target.close()
        source.close()
        lock.release()


async def _copy_meta(source: sqlite3.Connection, target: asyncpg.Connection) -> None:
    if not _columns_of(source, "relay_meta"):
        return  # a file from before relay_meta
    for key in _META_KEYS:
        found = source.execute(sql.SELECT_META, (key,)).fetchone()
        if found is not None:
            await target.execute(numbered(sql.UPSERT_META), key, found[0])


async def _copy_table(
    source: sqlite3.Connection, target: asyncpg.Connection, table: str, columns: tuple[str, ...]
) -> None:
    # A file written by an older relay lacks the newer columns (it is opened read-only, so
    # not migrated): those stay NULL in PostgreSQL.
    present = _columns_of(source, table)
    columns = tuple(c for c in columns if c in present)
    if not columns:
        return  # a table an older relay did not have
    names = ", ".join(columns)
    cursor = source.execute(f"SELECT {names} FROM {table} ORDER BY 1")
    while rows := cursor.fetchmany(_BATCH_ROWS):
        await target.copy_records_to_table(table, records=rows, columns=list(columns))


def _columns_of(source: sqlite3.Connection, table: str) -> set[str]:
    """The columns `table` has in the SQLite file; none when an older relay had no such
    table."""
    return {str(r[1]) for r in source.execute(f"PRAGMA table_info({table})")}
