"""The outbox: the `Store` the relay talks to. Writes go through the single writer
(relay/store/writer.py); reads use a second connection.

Invariants kept here:
- an inbound event and its messages commit in one transaction, or not at all;
- `webhook-id` is unique per source, the idempotency key unique per destination (the database
  enforces both; dedupe decisions come back per item);
- a commit is synced to disk (WAL + synchronous=FULL) before a write returns;
- a message is claimed under a lease, never deleted on claim; a lease token guards every ack.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Callable, Sequence
from typing import Any

from relay.errors import StorageError, StorageUnavailable
from relay.models import (
    ClaimedMessage,
    Clock,
    Dead,
    EnqueueResult,
    InboundDraft,
    RetryLater,
    SystemClock,
)
from relay.store import writer as w
from relay.store.admin import AdminQueries
from relay.store.schema import PRAGMAS, ServeLock, connect, create_private, migrate
from relay.store.snapshot import SnapshotQueries
from relay.store.writer import Db

# How often a serving relay on SQLite looks for commits of operator commands run in another
# process: they take effect within this, not at the workers' next poll.
OPERATIONS_POLL_S = 0.1


class Store(AdminQueries, SnapshotQueries):
    """The outbox on SQLite. Open with `Store.open` (or `open_store` for any backend)."""

    # This process alone serves the database (the serve lock): every inflight row found at
    # start-up belongs to a dead process.
    exclusive = True
    # What the driver raises when the database cannot answer. aiosqlite: sqlite3.Error, and
    # ValueError on a closed connection. PgStore adds asyncpg's errors.
    driver_errors: tuple[type[Exception], ...] = (sqlite3.Error, ValueError, OSError, TimeoutError)

    def __init__(
        self,
        path: str,
        reads: Db,
        writes: Db,
        clock: Clock,
        max_batch: int,
        lock: ServeLock | None,
        *,
        serve: bool | None = None,
    ) -> None:
        self.path = path
        self._reads = reads
        self._writes = writes
        self._clock = clock
        self._lock = lock
        serving = lock is not None if serve is None else serve
        self._writer = w.Writer(writes, clock, max_batch=max_batch, serve=serving)
        # Reads from workers, the metrics handler and lookups share one connection; a lock
        # keeps their statements from interleaving on its thread.
        self._reads_lock = asyncio.Lock()
        # Called when an operator changed the outbox (pause, resume, replay, retry), in this
        # process or another: the workers read the pause state again and claim at once.
        self.on_operation: Callable[[], None] | None = None
        self._watcher: asyncio.Task[None] | None = None
        # PostgreSQL: whether commits of other replicas wake this one (LISTEN), and a callback
        # when that changes. None on SQLite, where one relay serves the file.
        self.listening: bool | None = None
        self.on_listening: Callable[[bool], None] | None = None

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
        starts the group-commit writer; operator commands open without it and commit each
        write on its own."""
        lock = None
        try:
            create_private(path)
            if serve:
                lock = ServeLock(path)
                lock.acquire()
            reads = await connect(path, busy_timeout_ms)
        except (OSError, sqlite3.Error) as exc:
            if lock is not None:
                lock.release()
            raise StorageError(f"cannot open database {path}: {exc}") from None
        try:
            await migrate(reads)
            writes = await connect(path, busy_timeout_ms)
        except (OSError, sqlite3.Error) as exc:
            await reads.close()
            if lock is not None:
                lock.release()
            raise StorageError(f"cannot prepare database {path}: {exc}") from None
        store = cls(path, reads, writes, clock or SystemClock(), max_batch, lock)
        if serve:
            store._watcher = asyncio.create_task(store._watch_operations(), name="operations")
        return store

    async def _watch_operations(self) -> None:
        """Operator commands run in another process (`relay pause`, `relay outbox retry`) and
        commit on their own connection. `PRAGMA data_version` on the writer's connection
        changes only when ANOTHER connection commits (every write of this relay goes through
        that one connection), so a change means an operator wrote: wake the workers. One
        pragma per OPERATIONS_POLL_S on the writer's thread (about 20 us each) instead of a
        signal to find and send: it works wherever the database file is shared."""
        last = None
        while True:
            try:
                rows = await self._writes.execute_fetchall("PRAGMA data_version")
                version = rows[0][0]
                if last is not None and version != last and self.on_operation is not None:
                    self.on_operation()
                last = version
            except self.driver_errors:
                pass  # a failing database is reported by the writer and by /readyz
            await asyncio.sleep(OPERATIONS_POLL_S)

    async def _announce(self) -> None:
        """After an operator's change: wake the workers of this process (the other serving
        process, if any, sees the commit through its `_watch_operations`)."""
        if self.on_operation is not None:
            self.on_operation()

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        await self._writer.close()
        for db in (self._writes, self._reads):
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()
        if self._lock is not None:
            self._lock.release()

    # ------------------------------------------------------------ plumbing

    @property
    def on_commit(self) -> Callable[[set[str]], None] | None:
        """Called with the destinations that got new or newly due messages."""
        return self._writer.on_commit

    @on_commit.setter
    def on_commit(self, callback: Callable[[set[str]], None] | None) -> None:
        self._writer.on_commit = callback

    @property
    def on_batch(self) -> Callable[[w.BatchStats], None] | None:
        return self._writer.on_batch

    @on_batch.setter
    def on_batch(self, callback: Callable[[w.BatchStats], None] | None) -> None:
        self._writer.on_batch = callback

    @property
    def writer_running(self) -> bool:
        return self._writer.running

    @property
    def last_write_error(self) -> str | None:
        return self._writer.last_error

    def _notify(self, destinations: set[str]) -> None:
        if self._writer.on_commit is not None:
            self._writer.on_commit(destinations)

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        """Run a read. What the driver raises when the database cannot answer (a lock, a
        lost connection, a stopped server) becomes `StorageUnavailable`, the one error callers
        catch: a webhook whose lookup cannot be read answers 503, whatever the backend."""
        try:
            async with self._reads_lock:
                return list(await self._reads.execute_fetchall(sql, params))
        except self.driver_errors as exc:
            raise StorageUnavailable(f"database read failed: {_describe(exc)}") from None

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        """One write statement, committed (shared with whatever else is being written)."""

        async def work(db: Db) -> int:
            cursor = await db.execute(sql, params)
            count = int(cursor.rowcount)
            await cursor.close()
            return count

        return await self._writer.run(work)

    async def pragmas(self) -> dict[str, Any]:
        out = {}
        for name in PRAGMAS:
            rows = await self._fetch(f"PRAGMA {name}")
            out[name] = rows[0][0]
        return out

    async def schema_version(self) -> int:
        rows = await self._fetch("PRAGMA user_version")
        return int(rows[0][0])

    # ------------------------------------------------------------ ingest

    async def enqueue(self, draft: InboundDraft) -> EnqueueResult:
        """Commit one event with its messages, sharing the fsync with concurrent callers.
        Raises `StorageUnavailable` when it could not be committed."""
        return await self._writer.enqueue(draft)

    async def enqueue_now(self, drafts: Sequence[InboundDraft]) -> list[EnqueueResult]:
        """Several events in one transaction of their own (operator commands and tests)."""
        now = self._clock.now()
        results = await self._writer.run(lambda db: w.insert_drafts(db, drafts, now))
        if any(r.message_ids for r in results):
            await self._announce()  # `relay reconcile` from another process: send them now
        return results

    # ------------------------------------------------------------ delivery

    async def claim(self, destination: str, limit: int, lease_s: float) -> list[ClaimedMessage]:
        """Lease up to `limit` due messages (race-free between claimers)."""
        now = self._clock.now()
        return await self._writer.run(lambda db: w.claim(db, destination, limit, lease_s, now))

    async def mark_delivered(self, msg: ClaimedMessage, status: int) -> bool:
        return await self._writer.delivered(msg, status)

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
        now = self._clock.now()
        return await self._writer.run(lambda db: w.settle(db, msg, assignments, params, now))

    async def requeue_inflight(self, *, expired_only: bool = True) -> int:
        """Return leased messages to pending: all of them at start-up (their owner is dead:
        we hold the serve lock), or those whose lease ran out."""
        now = self._clock.now()
        condition = "AND lease_until < ?" if expired_only else ""
        params: tuple[Any, ...] = (now, now, now, now) if expired_only else (now, now, now)
        return await self._exec(
            "UPDATE outbound_messages SET status = 'pending', lease_until = NULL, "
            "lease_token = NULL, updated_at = ?, next_attempt_at = CASE WHEN "
            "next_attempt_at < ? THEN next_attempt_at ELSE ? END "
            f"WHERE status = 'inflight' {condition}",
            params,
        )

    async def next_due_at(self, destination: str) -> float | None:
        rows = await self._fetch(
            "SELECT MIN(next_attempt_at) FROM outbound_messages "
            "WHERE destination = ? AND status = 'pending'",
            (destination,),
        )
        value = rows[0][0]
        return None if value is None else float(value)

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

    # ------------------------------------------------------------ health

    async def probe(self) -> None:
        """Prove the database takes a synced write right now (a one-row upsert). On success
        the writer's last error is cleared: a relay whose storage fault has cleared turns
        ready again without waiting for a webhook. Raises `StorageUnavailable`."""
        try:
            await self._exec(
                "INSERT INTO relay_meta (key, value) VALUES ('probe', ?) "
                "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
                (repr(self._clock.now()),),
            )
        except StorageUnavailable as exc:
            raise StorageUnavailable(f"database not writable: {exc.message}") from None
        self._writer.last_error = None

    async def db_size_bytes(self) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path + suffix).st_size
        return total


def _describe(exc: BaseException) -> str:
    """`Type: message`, or the type alone (asyncpg's connection errors may have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
