"""The outbox on SQLite (aiosqlite): one relay serves the file, operator commands share it.

`open_sqlite` creates, migrates and opens the file (relay/store/schema.py) and returns the
shared `Outbox` on a `SqliteBackend`. What this backend adds beyond the statements:
- the one-server lock file: this process alone serves the database (`exclusive`);
- every transaction of the group commit runs in one hand-off to aiosqlite's thread
  (relay/store/sqlite_thread.py);
- commits of operator commands in another process are seen through `PRAGMA data_version`;
- durability: WAL + synchronous=FULL, the WAL fsynced at every commit.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sqlite3
from collections.abc import Awaitable, Callable
from typing import Any

import aiosqlite

from relay.errors import StorageError
from relay.models import Clock, SystemClock
from relay.store import sql
from relay.store.base import Fetch, Wakeups
from relay.store.batching import Transaction
from relay.store.connection import Connection, Row
from relay.store.outbox import Outbox
from relay.store.schema import PRAGMAS, ServeLock, connect, create_private, migrate
from relay.store.sqlite_thread import in_thread

# How often a serving relay on SQLite looks for commits of operator commands run in another
# process: they take effect within this, not at the workers' next poll.
OPERATIONS_POLL_S = 0.1


async def open_sqlite(
    path: str,
    *,
    clock: Clock | None = None,
    busy_timeout_ms: int = 5000,
    max_batch: int = 256,
    serve: bool = False,
) -> Outbox:
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
    backend = SqliteBackend(path, reads, writes, lock)
    store = Outbox(backend, clock or SystemClock(), max_batch, serve)
    if serve:
        await backend.start(store)
    return store


class SqliteBackend:
    """A `Backend` on a SQLite file: two aiosqlite connections (reads, the writer's)."""

    exclusive = True
    dialect = sql.SQLITE
    # What the driver raises when the database cannot answer: sqlite3.Error, and ValueError
    # on a closed aiosqlite connection.
    driver_errors: tuple[type[Exception], ...] = (sqlite3.Error, ValueError, OSError, TimeoutError)
    # An operator's change is seen by the serving process through its watcher.
    announcement: tuple[str, tuple[Any, ...]] | None = None
    # One process serves the file: its own on_commit tells its workers, nobody else to tell.
    publish: Callable[[Connection, set[str]], Awaitable[None]] | None = None

    def __init__(
        self,
        path: str,
        reads: aiosqlite.Connection,
        writes: aiosqlite.Connection,
        lock: ServeLock | None,
    ) -> None:
        self.path = path
        self._writes = writes  # for its thread (the runner) and the watcher
        self.reads: Connection = reads
        self.writes: Connection = writes
        self._lock = lock
        self._watcher: asyncio.Task[None] | None = None

    async def runner(self, transaction: Transaction) -> None:
        """The whole transaction in one hand-off to the writer connection's thread."""
        await in_thread(self._writes, transaction)

    def locked(self, exc: Exception) -> bool:
        """SQLITE_BUSY / SQLITE_LOCKED: another connection holds the write lock."""
        return isinstance(exc, sqlite3.OperationalError) and (
            "locked" in str(exc) or "busy" in str(exc)
        )

    async def start(self, wakeups: Wakeups) -> None:
        self._watcher = asyncio.create_task(self._watch_operations(wakeups), name="operations")

    async def _watch_operations(self, wakeups: Wakeups) -> None:
        """Operator commands run in another process (`relay pause`, `relay outbox retry`) and
        commit on their own connection. `PRAGMA data_version` on the writer's connection
        changes only when ANOTHER connection commits (every write of this relay goes through
        that one connection), so a change means an operator wrote: wake the workers. One
        pragma per OPERATIONS_POLL_S on the writer's thread (about 20 us each) instead of a
        signal to find and send: it works wherever the database file is shared."""
        last = None
        while True:
            try:
                found = list(await self._writes.execute_fetchall(sql.SQLITE_DATA_VERSION))
                version = found[0][0]
                if last is not None and version != last:
                    wakeups.operation_seen()
                last = version
            except self.driver_errors:
                pass  # a failing database is reported by the writer and by /readyz
            await asyncio.sleep(OPERATIONS_POLL_S)

    async def pragmas(self, fetch: Fetch) -> dict[str, Any]:
        out = {}
        for name in PRAGMAS:
            found: list[Row] = await fetch(sql.sqlite_pragma(name), ())
            out[name] = found[0][0]
        return out

    async def schema_version(self, fetch: Fetch) -> int:
        found = await fetch(sql.SQLITE_USER_VERSION, ())
        return int(found[0][0])

    async def db_size_bytes(self, fetch: Fetch) -> int:
        total = 0
        for suffix in ("", "-wal"):
            with contextlib.suppress(OSError):
                total += os.stat(self.path + suffix).st_size
        return total

    async def close(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
        for db in (self.writes, self.reads):
            with contextlib.suppress(sqlite3.Error, ValueError):
                await db.close()
        if self._lock is not None:
            self._lock.release()
