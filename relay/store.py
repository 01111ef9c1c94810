"""The SQLite outbox. The only module that knows SQL.

Owns: connections and pragmas, numbered migrations, the group-commit writer for ingest, and
every state change of a message (pending -> inflight -> delivered | pending | dead).

Invariants kept here:
- an inbound event and its messages commit in one transaction, or not at all;
- `webhook-id` is unique per source, the idempotency key unique per destination (the database
  enforces both; dedupe decisions come back per item);
- a commit is synced to disk (WAL + synchronous=FULL) before `enqueue` returns;
- a message is claimed under a lease, never deleted on claim; a lease token guards every ack.

Two connections: the writer (owned by the group-commit task alone, so a batch's BEGIN..COMMIT
never interleaves with anything else) and the ops connection (single-statement autocommit
writes: claims, acks, operator commands). SQLite serialises the two with its write lock.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import json
import os
import secrets
import sqlite3
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from typing import IO, Any

import aiosqlite

from relay.errors import StorageError, StorageUnavailable, StoreLocked
from relay.models import (
    ClaimedMessage,
    Clock,
    Dead,
    DestinationStats,
    EnqueueResult,
    EventFilter,
    EventStatus,
    InboundDraft,
    IngestOutcome,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    OutboundDraft,
    PruneResult,
    RetryLater,
    StoredEvent,
    SystemClock,
)

# SQLite's default limit is 32766 bound variables per statement; stay far below it.
_ROWS_PER_INSERT = 500


def migrations() -> list[tuple[int, str]]:
    """The numbered migration scripts, in order: (version, sql)."""
    found = []
    for entry in resources.files("relay.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


PRAGMAS = {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}  # 2 = FULL


async def _connect(path: str, busy_timeout_ms: int) -> aiosqlite.Connection:
    # isolation_level=None: we issue BEGIN/COMMIT ourselves; single statements autocommit.
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode = WAL")
        # FULL: the WAL is fsynced at every commit, so a 2xx survives power loss, not just
        # a process crash. Group commit keeps this affordable.
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def _migrate(db: aiosqlite.Connection) -> int:
    rows = await db.execute_fetchall("PRAGMA user_version")
    current = int(next(iter(rows))[0])
    for version, sql in migrations():
        if version <= current:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            # executescript would COMMIT first; run statement by statement inside our txn.
            for statement in _split_sql(sql):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {version}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        current = version
    return current


def _split_sql(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


class _ServeLock:
    """An flock on `<db>.lock`: one serving relay per database file. Because of it, every
    `inflight` row found at start-up belongs to a dead process and can go back to pending."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}.lock"
        self.file: IO[str] | None = None

    def acquire(self) -> None:
        handle = open(self.path, "a+")  # noqa: SIM115 - held for the life of the process
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreLocked(f"another relay is already serving {self.path[:-5]}") from None
        self.file = handle

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Reported to the metrics hook after every group commit."""

    size: int
    commit_s: float
    ok: bool


_MESSAGE_COLUMNS = (
    "m.id, m.event_id, m.route, m.destination, m.idempotency_key, m.status, m.attempts, "
    "m.created_at, m.next_attempt_at, m.lease_until, m.last_status, m.last_error, "
    "m.delivered_at, m.updated_at, e.event_type, e.webhook_id, m.body"
)


class Store:
    """The outbox. Open with `Store.open`; close with `close`."""

    def __init__(
        self,
        path: str,
        ops: aiosqlite.Connection,
        writer: aiosqlite.Connection | None,
        clock: Clock,
        max_batch: int,
        lock: _ServeLock | None,
    ) -> None:
        self.path = path
        self._ops = ops
        self._writer = writer
        self._clock = clock
        self._max_batch = max_batch
        self._lock = lock
        self._queue: asyncio.Queue[tuple[InboundDraft, asyncio.Future[EnqueueResult]]] = (
            asyncio.Queue()
        )
        self._writer_task: asyncio.Task[None] | None = None
        self.on_commit: Callable[[set[str]], None] | None = None
        self.on_batch: Callable[[BatchStats], None] | None = None
        self.last_write_error: str | None = None
        # The ops connection is shared by workers and operator calls; a statement issued while
        # another task holds a BEGIN on it would silently join (and share the fate of) that
        # transaction. Every use of it goes through this lock.
        self._ops_lock = asyncio.Lock()

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        async with self._ops_lock:
            return list(await self._ops.execute_fetchall(sql, params))

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        async with self._ops_lock:
            cursor = await self._ops.execute(sql, params)
            count = cursor.rowcount
            await cursor.close()
        return count

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        clock: Clock | None = None,
        busy_timeout_ms: int = 5000,
        max_batch: int = 256,
        serve: bool = False,
    ) -> Store:
        """Open (creating and migrating as needed). `serve=True` takes the one-server lock and
        starts the group-commit writer; operator commands open without it."""
        lock = None
        try:
            Path(path).parent.mkdir(parents=True, exist_ok=True)
            if serve:
                lock = _ServeLock(path)
                lock.acquire()
            ops = await _connect(path, busy_timeout_ms)
        except (OSError, sqlite3.Error) as exc:
            if lock is not None:
                lock.release()
            raise StorageError(f"cannot open database {path}: {exc}") from None
        writer = None
        try:
            await _migrate(ops)
            if serve:
                writer = await _connect(path, busy_timeout_ms)
        except (OSError, sqlite3.Error) as exc:
            await ops.close()
            if lock is not None:
                lock.release()
            raise StorageError(f"cannot prepare database {path}: {exc}") from None
        store = cls(path, ops, writer, clock or SystemClock(), max_batch, lock)
        if writer is not None:
            store._writer_task = asyncio.create_task(store._write_loop(), name="store-writer")
        return store

    @property
    def writer_running(self) -> bool:
        return self._writer_task is not None and not self._writer_task.done()

    async def close(self) -> None:
        if self._writer_task is not None:
            # Let queued enqueues finish: each belongs to a request still waiting for its 2xx.
            if not self._writer_task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout=10)
            self._writer_task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._writer_task
        for db in (self._writer, self._ops):
            if db is not None:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.close()
        if self._lock is not None:
            self._lock.release()

    async def pragmas(self) -> dict[str, Any]:
        out = {}
        for name in PRAGMAS:
            rows = await self._fetch(f"PRAGMA {name}")
            out[name] = next(iter(rows))[0]
        return out

    async def schema_version(self) -> int:
        rows = await self._fetch("PRAGMA user_version")
        return int(next(iter(rows))[0])

    # ------------------------------------------------------------ ingest: group commit

    async def enqueue(self, draft: InboundDraft) -> EnqueueResult:
        """Commit one event with its messages, sharing the fsync with concurrent callers.
        Raises `StorageUnavailable` when the batch could not be committed."""
        if self._writer_task is None or self._writer_task.done():
            raise StorageUnavailable("the store writer is not running")
        future: asyncio.Future[EnqueueResult] = asyncio.get_running_loop().create_future()
        self._queue.put_nowait((draft, future))
        return await future

    async def _write_loop(self) -> None:
        while True:
            batch = [await self._queue.get()]
            while len(batch) < self._max_batch and not self._queue.empty():
                batch.append(self._queue.get_nowait())
            started = time.perf_counter()
            try:
                results = await self._write_batch([draft for draft, _ in batch])
            except Exception as exc:
                # Any failure, expected (disk full, locked) or not, fails the whole batch with
                # 503s: a request must never hang on a future nobody will resolve.
                self.last_write_error = f"{type(exc).__name__}: {exc}"
                self._report(BatchStats(len(batch), time.perf_counter() - started, ok=False))
                for _, future in batch:
                    if not future.done():
                        future.set_exception(StorageUnavailable(self.last_write_error))
                    self._queue.task_done()
                continue
            self.last_write_error = None
            self._report(BatchStats(len(batch), time.perf_counter() - started, ok=True))
            for (_, future), result in zip(batch, results, strict=True):
                if not future.done():
                    future.set_result(result)
                self._queue.task_done()
            destinations = {m.destination for d, _ in batch for m in d.messages}
            if destinations and self.on_commit is not None:
                self.on_commit(destinations)

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is not None:
            self.on_batch(stats)

    async def _write_batch(self, drafts: Sequence[InboundDraft]) -> list[EnqueueResult]:
        db = self._writer
        assert db is not None
        await db.execute("BEGIN IMMEDIATE")
        try:
            results = await self._insert(db, drafts)
            await db.execute("COMMIT")
        except BaseException:
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.execute("ROLLBACK")
            raise
        return results

    async def enqueue_now(self, drafts: Sequence[InboundDraft]) -> list[EnqueueResult]:
        """One transaction on the ops connection, outside the group-commit queue (operator
        commands and tests)."""
        async with self._ops_lock:
            await self._ops.execute("BEGIN IMMEDIATE")
            try:
                results = await self._insert(self._ops, drafts)
                await self._ops.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await self._ops.execute("ROLLBACK")
                raise
        return results

    async def _insert(
        self, db: aiosqlite.Connection, drafts: Sequence[InboundDraft]
    ) -> list[EnqueueResult]:
        # Two multi-row INSERT ... ON CONFLICT DO NOTHING RETURNING statements per batch: the
        # database decides every duplicate, and a batch costs a handful of thread hops.
        now = self._clock.now()
        event_rows = [
            (
                d.source,
                d.webhook_id,
                d.event_type,
                d.received_at,
                json.dumps(d.headers, sort_keys=True),
                d.body,
                d.status.value,
                d.reason,
                d.request_id,
            )
            for d in drafts
        ]
        inserted: dict[tuple[str, str], int] = {}
        for chunk in _chunks(event_rows):
            rows = await db.execute_fetchall(
                "INSERT INTO inbound_events (source, webhook_id, event_type, received_at, "
                "headers_json, body, status, reason, request_id) VALUES "
                + ",".join(["(?,?,?,?,?,?,?,?,?)"] * len(chunk))
                + " ON CONFLICT (source, webhook_id) DO NOTHING RETURNING id, source, webhook_id",
                [v for row in chunk for v in row],
            )
            inserted.update({(r[1], r[2]): int(r[0]) for r in rows})
        event_ids: list[int | None] = []
        for d in drafts:  # within one batch, the first of two equal webhook-ids wins
            event_ids.append(inserted.pop((d.source, d.webhook_id), None))
        message_rows, owners = [], []
        for d, event_id in zip(drafts, event_ids, strict=True):
            if event_id is None:
                continue
            for m in d.messages:
                message_rows.append(
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
                        d.request_id,
                    )
                )
                owners.append((m.destination, m.idempotency_key))
        new_messages: dict[tuple[str, str], int] = {}
        for chunk in _chunks(message_rows):
            rows = await db.execute_fetchall(
                "INSERT INTO outbound_messages (event_id, route, destination, idempotency_key, "
                "body, status, created_at, retry_from_at, next_attempt_at, updated_at, "
                "request_id) VALUES "
                + ",".join(["(?,?,?,?,?,?,?,?,?,?,?)"] * len(chunk))
                + " ON CONFLICT (destination, idempotency_key) DO NOTHING "
                "RETURNING id, destination, idempotency_key",
                [v for row in chunk for v in row],
            )
            new_messages.update({(r[1], r[2]): int(r[0]) for r in rows})
        results, all_duplicate = [], []
        for d, event_id in zip(drafts, event_ids, strict=True):
            if event_id is None:
                results.append(EnqueueResult(IngestOutcome.DUPLICATE, None))
                continue
            ids, dup_keys = [], []
            for m in d.messages:
                message_id = new_messages.pop((m.destination, m.idempotency_key), None)
                if message_id is None:
                    dup_keys.append(m.idempotency_key)
                else:
                    ids.append(message_id)
            if d.status is EventStatus.ROUTED and not ids:
                all_duplicate.append(event_id)
                outcome = IngestOutcome.DUPLICATE
            elif d.status is EventStatus.IGNORED:
                outcome = IngestOutcome.IGNORED
            else:
                outcome = IngestOutcome.ACCEPTED
            results.append(EnqueueResult(outcome, event_id, tuple(ids), tuple(dup_keys)))
        if all_duplicate:
            await db.execute(
                "UPDATE inbound_events SET status = 'duplicate', "
                "reason = 'every message was already enqueued by an earlier event' "
                f"WHERE id IN ({','.join('?' * len(all_duplicate))})",
                all_duplicate,
            )
        return results

    # ------------------------------------------------------------ delivery

    async def claim(self, destination: str, limit: int, lease_s: float) -> list[ClaimedMessage]:
        """Lease up to `limit` due messages in one statement (race-free between claimers)."""
        now = self._clock.now()
        token = secrets.token_hex(8)
        rows = await self._fetch(
            "UPDATE outbound_messages SET status = 'inflight', lease_until = ?, lease_token = ?, "
            "attempts = attempts + 1, updated_at = ? "
            "WHERE id IN (SELECT id FROM outbound_messages WHERE destination = ? "
            "AND status = 'pending' AND next_attempt_at <= ? "
            "ORDER BY next_attempt_at, id LIMIT ?) "
            "RETURNING id, destination, idempotency_key, body, attempts, created_at, "
            "retry_from_at, request_id",
            (now + lease_s, token, now, destination, now, limit),
        )
        claimed = [
            ClaimedMessage(
                int(r[0]),
                r[1],
                r[2],
                bytes(r[3]),
                int(r[4]),
                float(r[5]),
                float(r[6]),
                token,
                r[7],
            )
            for r in rows
        ]
        claimed.sort(key=lambda m: m.id)
        return claimed

    async def mark_delivered(self, msg: ClaimedMessage, status: int) -> bool:
        now = self._clock.now()
        return await self._settle(
            msg,
            "status = 'delivered', delivered_at = ?, last_status = ?, last_error = NULL",
            (now, status),
        )

    async def mark_retry(self, msg: ClaimedMessage, outcome: RetryLater, error: str) -> bool:
        # A throttled attempt (429/503 with Retry-After) gives its attempt back.
        refund = 0 if outcome.counts_attempt else 1
        return await self._settle(
            msg,
            "status = 'pending', next_attempt_at = ?, last_status = ?, last_error = ?, "
            "attempts = attempts - ?",
            (outcome.at, outcome.status, error, refund),
        )

    async def mark_dead(self, msg: ClaimedMessage, outcome: Dead, error: str) -> bool:
        return await self._settle(
            msg, "status = 'dead', last_status = ?, last_error = ?", (outcome.status, error)
        )

    async def release(self, msg: ClaimedMessage) -> bool:
        """Give a claimed message back untried (shutdown): due now, attempt not counted."""
        return await self._settle(
            msg,
            "status = 'pending', next_attempt_at = ?, attempts = attempts - 1",
            (self._clock.now(),),
        )

    async def _settle(self, msg: ClaimedMessage, assignments: str, params: tuple[Any, ...]) -> bool:
        # The lease token makes a late ack from a lost lease a no-op instead of a corruption.
        changed = await self._exec(
            f"UPDATE outbound_messages SET {assignments}, lease_until = NULL, "
            "lease_token = NULL, updated_at = ? WHERE id = ? AND status = 'inflight' "
            "AND lease_token = ?",
            (*params, self._clock.now(), msg.id, msg.lease_token),
        )
        return changed == 1

    async def requeue_inflight(self, *, expired_only: bool = True) -> int:
        """Return leased messages to pending: all of them at start-up (their owner is dead:
        we hold the serve lock), or those whose lease ran out."""
        now = self._clock.now()
        condition = "AND lease_until < ?" if expired_only else ""
        params: tuple[Any, ...] = (now, now, now) if expired_only else (now, now)
        return await self._exec(
            "UPDATE outbound_messages SET status = 'pending', lease_until = NULL, "
            "lease_token = NULL, next_attempt_at = MIN(next_attempt_at, ?), updated_at = ? "
            f"WHERE status = 'inflight' {condition}",
            params,
        )

    async def next_due_at(self, destination: str) -> float | None:
        rows = await self._fetch(
            "SELECT MIN(next_attempt_at) FROM outbound_messages "
            "WHERE destination = ? AND status = 'pending'",
            (destination,),
        )
        value = next(iter(rows))[0]
        return None if value is None else float(value)

    # ------------------------------------------------------------ operators and metrics

    async def stats(self, destination: str) -> DestinationStats:
        rows = await self._fetch(
            "SELECT status, COUNT(*) FROM outbound_messages WHERE destination = ? GROUP BY status",
            (destination,),
        )
        counts = dict.fromkeys(MessageStatus, 0)
        counts.update({MessageStatus(r[0]): int(r[1]) for r in rows})
        oldest = await self._fetch(
            "SELECT MIN(created_at) FROM outbound_messages WHERE destination = ? "
            "AND status IN ('pending', 'inflight')",
            (destination,),
        )
        value = next(iter(oldest))[0]
        return DestinationStats(counts, None if value is None else float(value))

    async def list_messages(
        self,
        selection: MessageFilter | None = None,
        *,
        status: MessageStatus | None = None,
        destination: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]:
        if selection is None:
            selection = MessageFilter(
                statuses=(status,) if status is not None else (), destination=destination
            )
        clause, params = _message_where(selection)
        rows = await self._fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM outbound_messages m "
            f"JOIN inbound_events e ON e.id = m.event_id WHERE {clause} "
            "ORDER BY m.id DESC LIMIT ?",
            (*params, limit),
        )
        return [_record(r) for r in rows]

    async def replay(self, selection: MessageFilter, *, dry_run: bool = False) -> int:
        """Make the selected messages due now with a fresh retry budget, whatever their status
        (a delivered one is sent again with the same key and bytes: the receiver dedupes).
        Inflight messages are skipped: they are being sent right now."""
        clause, params = _message_where(selection)
        selected = (
            f"SELECT m.id FROM outbound_messages m JOIN inbound_events e ON e.id = m.event_id "
            f"WHERE {clause} AND m.status != 'inflight'"
        )
        if dry_run:
            rows = await self._fetch(f"SELECT COUNT(*) FROM ({selected})", params)
            return int(rows[0][0])
        now = self._clock.now()
        count = await self._exec(
            "UPDATE outbound_messages SET status = 'pending', attempts = 0, next_attempt_at = ?, "
            f"retry_from_at = ?, delivered_at = NULL, updated_at = ? WHERE id IN ({selected})",
            (now, now, now, *params),
        )
        if count and self.on_commit is not None:
            self.on_commit(set())
        return count

    async def get_message(self, message_id: int) -> MessageRecord | None:
        rows = await self._fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM outbound_messages m "
            "JOIN inbound_events e ON e.id = m.event_id WHERE m.id = ?",
            (message_id,),
        )
        return next((_record(r) for r in rows), None)

    async def retry_messages(self, ids: Iterable[int] = (), *, all_dead: bool = False) -> int:
        """Operator retry: dead (or pending) messages become due now with a fresh budget.
        Delivered and inflight ones are left alone: resending those is never a retry."""
        now = self._clock.now()
        ids = list(ids)
        if all_dead:
            selector, params = "status = 'dead'", []
        else:
            if not ids:
                return 0
            selector = f"status IN ('dead', 'pending') AND id IN ({','.join('?' * len(ids))})"
            params = ids
        count = await self._exec(
            "UPDATE outbound_messages SET status = 'pending', attempts = 0, next_attempt_at = ?, "
            f"retry_from_at = ?, updated_at = ? WHERE {selector}",
            (now, now, now, *params),
        )
        if count and self.on_commit is not None:
            self.on_commit(set())
        return count

    # ------------------------------------------------------------ pause, retention, reprocess

    async def find_bodies(self, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """The stored bodies of messages by (destination, idempotency key), for lookups."""
        found = {}
        for destination, key in wanted:
            rows = await self._fetch(
                "SELECT body FROM outbound_messages WHERE destination = ? AND idempotency_key = ?",
                (destination, key),
            )
            if rows:
                found[(destination, key)] = bytes(rows[0][0])
        return found

    async def destinations(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT destination FROM outbound_messages")
        return [r[0] for r in rows]

    async def paused_overrides(self) -> dict[str, bool]:
        """Pause states set by `relay pause|resume`; they override the config's `paused`."""
        rows = await self._fetch("SELECT destination, paused FROM destination_state")
        return {r[0]: bool(r[1]) for r in rows}

    async def set_paused(self, destination: str, paused: bool) -> None:
        await self._exec(
            "INSERT INTO destination_state (destination, paused, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (destination) DO UPDATE SET paused = excluded.paused, "
            "updated_at = excluded.updated_at",
            (destination, int(paused), self._clock.now()),
        )
        if not paused and self.on_commit is not None:
            self.on_commit({destination})

    async def prune(
        self, *, bodies_before: float, rows_before: float, batch: int = 1000
    ) -> PruneResult:
        """Retention, in short transactions (`batch` rows each) so ingest never waits long.
        An inbound event loses its raw body (customer PII) after `bodies_before` once none of
        its messages is pending, inflight or dead. Delivered messages, bodies included (replay
        and refund lookups need them), are deleted after `rows_before`, then events left with
        no messages. Dead messages and their events stay until an operator handles them.
        Idempotency keys live as long as the delivered row: past `rows_before`, a resend of
        that business key is no longer caught."""
        totals = [0, 0, 0]
        statements = (
            (
                "UPDATE inbound_events SET body = NULL WHERE id IN (SELECT e.id FROM "
                "inbound_events e WHERE e.received_at < ? AND e.body IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM outbound_messages m WHERE m.event_id = e.id "
                "AND m.status != 'delivered') LIMIT ?)",
                bodies_before,
            ),
            (
                "DELETE FROM outbound_messages WHERE id IN (SELECT id FROM outbound_messages "
                "WHERE status = 'delivered' AND delivered_at < ? LIMIT ?)",
                rows_before,
            ),
            (
                "DELETE FROM inbound_events WHERE id IN (SELECT e.id FROM inbound_events e "
                "WHERE e.received_at < ? AND NOT EXISTS (SELECT 1 FROM outbound_messages m "
                "WHERE m.event_id = e.id) LIMIT ?)",
                rows_before,
            ),
        )
        for i, (sql, before) in enumerate(statements):
            while True:
                count = await self._exec(sql, (before, batch))
                totals[i] += count
                if count < batch:
                    break
        return PruneResult(*totals)

    async def list_events(self, selection: EventFilter, limit: int = 10_000) -> list[StoredEvent]:
        where: list[str] = ["1 = 1"]
        params: list[Any] = []
        if selection.ids:
            where.append(f"id IN ({','.join('?' * len(selection.ids))})")
            params += list(selection.ids)
        if selection.statuses:
            where.append(f"status IN ({','.join('?' * len(selection.statuses))})")
            params += [s.value for s in selection.statuses]
        for column, value in (("source", selection.source), ("event_type", selection.event_type)):
            if value is not None:
                where.append(f"{column} = ?")
                params.append(value)
        if selection.since is not None:
            where.append("received_at >= ?")
            params.append(selection.since)
        if selection.until is not None:
            where.append("received_at < ?")
            params.append(selection.until)
        rows = await self._fetch(
            "SELECT id, source, webhook_id, event_type, received_at, status, reason, body "
            f"FROM inbound_events WHERE {' AND '.join(where)} ORDER BY id LIMIT ?",
            (*params, limit),
        )
        return [
            StoredEvent(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                float(r[4]),
                EventStatus(r[5]),
                r[6],
                None if r[7] is None else bytes(r[7]),
            )
            for r in rows
        ]

    async def remap_event(
        self,
        event_id: int,
        status: EventStatus,
        reason: str | None,
        messages: Sequence[OutboundDraft],
    ) -> EnqueueResult:
        """Store a new mapping of an already stored event (`relay reprocess`): its new
        messages are inserted unless their idempotency key exists (so nothing delivered is
        sent again), and the event's status and reason are updated, in one transaction."""
        now = self._clock.now()
        async with self._ops_lock:
            db = self._ops
            await db.execute("BEGIN IMMEDIATE")
            try:
                ids, duplicates = [], []
                for m in messages:
                    rows = list(
                        await db.execute_fetchall(
                            "INSERT INTO outbound_messages (event_id, route, destination, "
                            "idempotency_key, body, status, created_at, retry_from_at, "
                            "next_attempt_at, updated_at) VALUES (?,?,?,?,?,'pending',?,?,?,?) "
                            "ON CONFLICT (destination, idempotency_key) DO NOTHING RETURNING id",
                            (
                                event_id,
                                m.route,
                                m.destination,
                                m.idempotency_key,
                                m.body,
                                now,
                                now,
                                now,
                                now,
                            ),
                        )
                    )
                    if rows:
                        ids.append(int(rows[0][0]))
                    else:
                        duplicates.append(m.idempotency_key)
                if status is EventStatus.ROUTED and messages and not ids:
                    status, reason = EventStatus.DUPLICATE, "every message already existed"
                await db.execute(
                    "UPDATE inbound_events SET status = ?, reason = ? WHERE id = ?",
                    (status.value, reason, event_id),
                )
                await db.execute("COMMIT")
            except BaseException:
                with contextlib.suppress(sqlite3.Error, ValueError):
                    await db.execute("ROLLBACK")
                raise
        if ids and self.on_commit is not None:
            self.on_commit({m.destination for m in messages})
        outcome = IngestOutcome.ACCEPTED if ids else IngestOutcome.DUPLICATE
        return EnqueueResult(outcome, event_id, tuple(ids), tuple(duplicates))

    async def probe(self) -> None:
        """Prove the database takes a synced write right now (a one-row upsert), and clear
        the writer's last error when it does: a relay whose storage fault has cleared must
        turn ready again without waiting for a webhook. Raises `StorageUnavailable`."""
        try:
            await self._exec(
                "INSERT INTO relay_meta (key, value) VALUES ('probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(self._clock.now()),),
            )
        except (sqlite3.Error, ValueError) as exc:
            raise StorageUnavailable(f"database not writable: {exc}") from None
        self.last_write_error = None

    async def event_count(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) FROM inbound_events")
        return int(next(iter(rows))[0])

    async def db_size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path + suffix).st_size
        return total


def _message_where(f: MessageFilter) -> tuple[str, list[Any]]:
    where: list[str] = ["1 = 1"]
    params: list[Any] = []
    if f.ids:
        where.append(f"m.id IN ({','.join('?' * len(f.ids))})")
        params += list(f.ids)
    if f.statuses:
        where.append(f"m.status IN ({','.join('?' * len(f.statuses))})")
        params += [s.value for s in f.statuses]
    if f.destination is not None:
        where.append("m.destination = ?")
        params.append(f.destination)
    if f.event_type is not None:
        where.append("e.event_type = ?")
        params.append(f.event_type)
    if f.since is not None:
        where.append("m.created_at >= ?")
        params.append(f.since)
    if f.until is not None:
        where.append("m.created_at < ?")
        params.append(f.until)
    return " AND ".join(where), params


def _chunks(rows: list[Any]) -> Iterable[list[Any]]:
    for start in range(0, len(rows), _ROWS_PER_INSERT):
        yield rows[start : start + _ROWS_PER_INSERT]


def _record(r: Any) -> MessageRecord:
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
    )
