"""The outbox: the one `Store` implementation, shared by every backend. It runs the named
statements of relay/store/sql.py on a `Backend` (relay/store/sqlite.py, relay/store/postgres.py):
writes through the group-commit engine (relay/store/batching.py), reads on a second connection.

Invariants kept here:
- an inbound event and its messages commit in one transaction, or not at all;
- `webhook-id` is unique per source, the idempotency key unique per destination (the database
  enforces both; dedupe decisions come back per item);
- a write returns only after its commit is durable (the backend's sync setting);
- a message is claimed under a lease, never deleted on claim; a lease token guards every ack;
- what a driver raises when the database cannot answer becomes `StorageUnavailable`.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Sequence
from typing import Any

from relay.errors import StorageUnavailable
from relay.models import (
    AttemptRecord,
    ClaimedMessage,
    Clock,
    Dead,
    EnqueueResult,
    InboundDraft,
    RetryLater,
)
from relay.store import open_store, sql, writes
from relay.store.admin import AdminQueries
from relay.store.base import Backend, Store
from relay.store.batching import BatchStats, Writer
from relay.store.connection import Connection, Row
from relay.store.console import ConsoleQueries
from relay.store.snapshot import SnapshotQueries


class Outbox(AdminQueries, ConsoleQueries, SnapshotQueries):
    """A `Store` on a `Backend`. Open one with `open_store` (relay/store/__init__.py)."""

    @staticmethod
    async def open(
        location: str,
        *,
        clock: Clock | None = None,
        busy_timeout_ms: int = 5000,
        max_batch: int = 256,
        serve: bool = False,
    ) -> Store:
        """`open_store`: any backend, by its location."""
        return await open_store(
            location, clock=clock, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch, serve=serve
        )

    def __init__(self, backend: Backend, clock: Clock, max_batch: int, serve: bool) -> None:
        self._backend = backend
        self._clock = clock
        self._dialect = backend.dialect
        self._writer = Writer(
            backend.writes,
            clock,
            max_batch=max_batch,
            serve=serve,
            dialect=backend.dialect,
            runner=backend.runner,
            locked=backend.locked,
        )
        self._writer.publish = backend.publish
        # Reads from workers, the metrics handler and lookups share one connection; a lock
        # keeps their statements from interleaving on it.
        self._reads_lock = asyncio.Lock()
        self.on_operation: Callable[[], None] | None = None
        self.on_listening: Callable[[bool], None] | None = None
        self._listening: bool | None = None

    async def close(self) -> None:
        await self._writer.close()
        await self._backend.close()

    # ------------------------------------------------------------ identity and hooks

    @property
    def path(self) -> str:
        return self._backend.path

    @property
    def exclusive(self) -> bool:
        return self._backend.exclusive

    @property
    def listening(self) -> bool | None:
        return self._listening

    @property
    def on_commit(self) -> Callable[[set[str]], None] | None:
        return self._writer.on_commit

    @on_commit.setter
    def on_commit(self, callback: Callable[[set[str]], None] | None) -> None:
        self._writer.on_commit = callback

    @property
    def on_batch(self) -> Callable[[BatchStats], None] | None:
        return self._writer.on_batch

    @on_batch.setter
    def on_batch(self, callback: Callable[[BatchStats], None] | None) -> None:
        self._writer.on_batch = callback

    @property
    def writer_running(self) -> bool:
        return self._writer.running

    @property
    def last_write_error(self) -> str | None:
        return self._writer.last_error

    # Wakeups: what the backend reports from its watcher or LISTEN connection.

    def operation_seen(self) -> None:
        if self.on_operation is not None:
            self.on_operation()

    def commits_seen(self, destinations: set[str]) -> None:
        self._notify(destinations)

    def listening_changed(self, listening: bool) -> None:
        self._listening = listening
        if self.on_listening is not None:
            self.on_listening(listening)

    def _notify(self, destinations: set[str]) -> None:
        if self._writer.on_commit is not None:
            self._writer.on_commit(destinations)

    async def _announce(self) -> None:
        """After an operator's change: tell every relay serving this outbox (PostgreSQL:
        NOTIFY; SQLite: this process, the other serving one sees the commit in its watcher)."""
        if self._backend.announcement is None:
            self.operation_seen()
        else:
            await self._exec(*self._backend.announcement)

    # ------------------------------------------------------------ plumbing

    async def _fetch(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """Run a read. What the driver raises when the database cannot answer (a lock, a
        lost connection, a stopped server) becomes `StorageUnavailable`, the one error callers
        catch: a webhook whose lookup cannot be read answers 503, whatever the backend."""
        try:
            async with self._reads_lock:
                return list(await self._backend.reads.execute_fetchall(statement, params))
        except self._backend.driver_errors as exc:
            raise StorageUnavailable(f"database read failed: {describe(exc)}") from None

    async def _exec(self, statement: str, params: Sequence[Any] = ()) -> int:
        """One write statement, committed (shared with whatever else is being written)."""

        async def work(db: Connection) -> int:
            return await writes.execute(db, statement, params)

        return await self._writer.run(work)

    # ------------------------------------------------------------ health

    async def probe(self) -> None:
        try:
            await self._exec(sql.PROBE, (repr(self._clock.now()),))
        except StorageUnavailable as exc:
            raise StorageUnavailable(f"database not writable: {exc.message}") from None
        self._writer.last_error = None

    async def pragmas(self) -> dict[str, Any]:
        return await self._backend.pragmas(self._fetch)

    async def schema_version(self) -> int:
        return await self._backend.schema_version(self._fetch)

    async def db_size_bytes(self) -> int:
        return await self._backend.db_size_bytes(self._fetch)

    # ------------------------------------------------------------ ingest

    async def enqueue(self, draft: InboundDraft) -> EnqueueResult:
        return await self._writer.enqueue(draft)

    async def enqueue_now(self, drafts: Sequence[InboundDraft]) -> list[EnqueueResult]:
        now = self._clock.now()
        results = await self._writer.run(lambda db: writes.insert_drafts(db, drafts, now))
        if any(r.message_ids for r in results):
            await self._announce()  # `relay reconcile` from another process: send them now
        return results

    async def find_bodies(self, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        found = {}
        for destination, key in wanted:
            rows = await self._fetch(sql.FIND_BODY, (destination, key))
            if rows:
                found[(destination, key)] = bytes(rows[0][0])
        return found

    # ------------------------------------------------------------ delivery

    async def claim(self, destination: str, limit: int, lease_s: float) -> list[ClaimedMessage]:
        now, dialect = self._clock.now(), self._backend.dialect
        return await self._writer.run(
            lambda db: writes.claim(db, dialect, destination, limit, lease_s, now)
        )

    async def mark_delivered(
        self, msg: ClaimedMessage, status: int, attempt: AttemptRecord | None = None
    ) -> bool:
        return await self._writer.delivered(msg, status, attempt)

    async def mark_retry(
        self,
        msg: ClaimedMessage,
        outcome: RetryLater,
        error: str,
        attempt: AttemptRecord | None = None,
    ) -> bool:
        refund = 0 if outcome.counts_attempt else 1
        return await self._settle(
            msg,
            sql.SET_RETRY,
            (outcome.at, outcome.status, error, refund),
            None if attempt is None else ("retry", attempt, error),
        )

    async def mark_dead(
        self, msg: ClaimedMessage, outcome: Dead, error: str, attempt: AttemptRecord | None = None
    ) -> bool:
        return await self._settle(
            msg,
            sql.SET_DEAD,
            (outcome.status, error),
            None if attempt is None else ("dead", attempt, error),
        )

    async def release(self, msg: ClaimedMessage) -> bool:
        return await self._settle(msg, sql.SET_RELEASED, (self._clock.now(),))

    async def _settle(
        self,
        msg: ClaimedMessage,
        assignments: str,
        params: tuple[Any, ...],
        record: tuple[str, AttemptRecord, str] | None = None,
    ) -> bool:
        """One state change; `record`: (outcome, attempt, error) stored with it, in the same
        transaction, when the change took effect."""
        now = self._clock.now()

        async def work(db: Connection) -> bool:
            changed = await writes.settle(db, msg, assignments, params, now)
            if changed and record is not None:
                await writes.record_attempts(db, [(msg, record[0], record[1])])
                await writes.note_activity(db, msg.destination, now, record[2])
            return changed

        return await self._writer.run(work)

    async def requeue_inflight(self, *, expired_only: bool = True) -> int:
        now = self._clock.now()
        params: tuple[Any, ...] = (now, now, now, now) if expired_only else (now, now, now)
        return await self._exec(sql.requeue_inflight(expired_only), params)

    async def next_due_at(self, destination: str) -> float | None:
        rows = await self._fetch(sql.NEXT_DUE_AT, (destination,))
        value = rows[0][0]
        return None if value is None else float(value)


def describe(exc: BaseException) -> str:
    """`Type: message`, or the type alone (asyncpg's connection errors may have no text)."""
    text = str(exc)
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__
