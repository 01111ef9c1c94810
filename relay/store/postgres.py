"""The outbox on PostgreSQL (asyncpg), for several relays sharing one database.

The same `Outbox`, the same statements and the same guarantees as SQLite: this module adapts an
asyncpg connection to the `Connection` seam (relay/store/connection.py: `execute`,
`execute_fetchall` with "?" placeholders, BEGIN/COMMIT), applies the PostgreSQL migrations
under an advisory lock, and wakes idle workers on every replica with LISTEN/NOTIFY
(`PgBackend`). What differs by design:
- claims take rows FOR UPDATE SKIP LOCKED, so replicas share the work without waiting;
- no replica owns the database, so at start-up only EXPIRED leases go back to pending (a
  live replica's inflight messages are left to it); a crashed replica's leases expire after
  `lease_s` and are swept by every replica;
- durability is PostgreSQL's: a commit returns after its WAL is flushed (synchronous_commit on).
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import re
from collections.abc import Awaitable, Callable, Sequence
from importlib import resources
from typing import Any

import asyncpg

from relay.errors import StorageError
from relay.models import Clock, SystemClock
from relay.store import sql
from relay.store.base import Fetch, Wakeups
from relay.store.connection import Connection, Done
from relay.store.outbox import Outbox
from relay.store.schema import split_sql

CHANNEL = "relay_outbox"
# After the LISTEN connection dropped (a restart or failover): the waits before each try to
# listen again, the last one repeated. Meanwhile the workers poll (poll_interval_s).
LISTEN_RETRY_S = (0.1, 0.2, 0.5, 1.0, 2.0, 5.0)
# A dropped connection is usually reported at once (asyncpg's termination listener); this is
# how often it is also checked, for a drop nobody reported.
LISTEN_CHECK_S = 5.0
# The payload that says "an operator changed the outbox" (other payloads name a destination
# that got new messages; none can be this: destination names are plain words).
OPERATION = "!operation"
_MIGRATION_LOCK = 0x52454C4159  # "RELAY": one replica migrates at a time
_PLACEHOLDER = re.compile(r"\?")
_COUNT = re.compile(r"(\d+)$")


def numbered(sql: str) -> str:
    """ "?" placeholders (the store's SQL) to asyncpg's $1, $2, ... (none sit in literals)."""
    counter = iter(range(1, 100_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class PgDb:
    """A `Connection` over asyncpg (the calls aiosqlite offers). It reconnects after the
    server dropped it (a PostgreSQL restart or failover), but never inside a transaction: a
    statement after a lost BEGIN must fail, not run alone on a new connection."""

    dialect = "postgres"

    def __init__(
        self, conn: asyncpg.Connection, connect: Callable[[], Awaitable[asyncpg.Connection]]
    ) -> None:
        self._conn = conn
        self._connect = connect
        self._in_transaction = False

    async def _live(self, starting: bool) -> asyncpg.Connection:
        if self._conn.is_closed():
            if self._in_transaction and not starting:
                raise asyncpg.ConnectionDoesNotExistError(
                    "the connection was lost inside a transaction"
                )
            self._conn = await self._connect()
        return self._conn

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> Done:
        starting = sql in ("BEGIN IMMEDIATE", "BEGIN")
        if starting:
            sql = "BEGIN"  # PostgreSQL locks rows, not the database
        if sql in ("COMMIT", "ROLLBACK") and self._conn.is_closed():
            self._in_transaction = False
            if sql == "ROLLBACK":
                return Done(0)  # the server rolled it back when the connection died
            # A COMMIT on a new connection would "succeed" with nothing in it: the batch's
            # webhooks would get 202 for rows that died with the old connection.
            raise asyncpg.ConnectionDoesNotExistError(
                "the connection was lost before COMMIT: the transaction was rolled back"
            )
        conn = await self._live(starting)
        try:
            status = await conn.execute(numbered(sql), *parameters)
        finally:
            if starting:
                self._in_transaction = True
            elif sql in ("COMMIT", "ROLLBACK"):
                self._in_transaction = False
        match = _COUNT.search(status or "")
        return Done(int(match.group(1)) if match and " " in status else -1)

    async def execute_fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        conn = await self._live(False)
        return list(await conn.fetch(numbered(sql), *parameters))

    async def close(self) -> None:
        await self._conn.close()


def migrations() -> list[tuple[int, str]]:
    found = []
    for entry in resources.files("relay.migrations.postgres").iterdir():
        if entry.name.endswith(".sql") and entry.name[:4].isdigit():
            found.append((int(entry.name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


async def migrate(conn: asyncpg.Connection) -> int:
    """Apply what is missing, each file in one transaction, one replica at a time."""
    await conn.execute("SELECT pg_advisory_lock($1)", _MIGRATION_LOCK)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS relay_schema (version INTEGER NOT NULL)")
        current = await conn.fetchval("SELECT max(version) FROM relay_schema") or 0
        for version, sql in migrations():
            if version <= current:
                continue
            async with conn.transaction():
                for statement in split_sql(sql):
                    await conn.execute(statement)
                await conn.execute("INSERT INTO relay_schema (version) VALUES ($1)", version)
            current = version
        return int(current)
    finally:
        await conn.execute("SELECT pg_advisory_unlock($1)", _MIGRATION_LOCK)


async def open_postgres(
    url: str,
    *,
    clock: Clock | None = None,
    busy_timeout_ms: int = 5000,
    max_batch: int = 256,
    serve: bool = False,
) -> Outbox:
    """Connect (reads, writes, and LISTEN when serving), migrate, and return the shared
    `Outbox` on a `PgBackend`."""
    timeout_s = max(1.0, busy_timeout_ms / 1000)
    connections: list[asyncpg.Connection] = []
    try:
        for _ in range(3 if serve else 2):
            connections.append(await asyncpg.connect(url, timeout=timeout_s, command_timeout=60))
        await migrate(connections[0])
    # ValueError: a malformed URL (a bad port, sslmode): one line, not a traceback.
    except (OSError, asyncpg.PostgresError, TimeoutError, ValueError) as exc:
        for conn in connections:
            with contextlib.suppress(Exception):
                await conn.close()
        raise StorageError(f"cannot open database {_safe(url)}: {exc}") from None

    async def reconnect() -> asyncpg.Connection:
        return await asyncpg.connect(url, timeout=timeout_s, command_timeout=60)

    reads, writes = PgDb(connections[0], reconnect), PgDb(connections[1], reconnect)
    backend = PgBackend(_safe(url), reads, writes, reconnect)
    store = Outbox(backend, clock or SystemClock(), max_batch, serve)
    if serve:
        await backend.listen(connections[2])
        await backend.start(store)
    return store


class PgBackend:
    """A `Backend` on PostgreSQL: two `PgDb` connections, and a third that LISTENs."""

    exclusive = False  # replicas share the database: never requeue a live replica's leases
    dialect = sql.POSTGRES
    # A stopped server or a failover: asyncpg's errors, and OSError/TimeoutError on reconnect.
    driver_errors: tuple[type[Exception], ...] = (
        ValueError,
        OSError,
        TimeoutError,
        asyncpg.PostgresError,
        asyncpg.InterfaceError,
    )
    # NOTIFY every replica (this one too, if it serves) that an operator changed the outbox:
    # they act on it at once instead of at their next poll.
    announcement: tuple[str, tuple[Any, ...]] | None = (sql.PG_NOTIFY, (CHANNEL, OPERATION))
    runner = None  # asyncpg has no thread: its statements are awaited one by one

    def __init__(
        self,
        path: str,
        reads: PgDb,
        writes: PgDb,
        connect: Callable[[], Awaitable[asyncpg.Connection]],
    ) -> None:
        self.path = path
        self.reads: Connection = reads
        self.writes: Connection = writes
        self._connect = connect
        self._listener: asyncpg.Connection | None = None
        self._listener_lost = asyncio.Event()
        self._keeper: asyncio.Task[None] | None = None
        self._wakeups: Wakeups | None = None
        self.publish: Callable[[Connection, set[str]], Awaitable[None]] | None = self._publish

    def locked(self, exc: Exception) -> bool:
        return False  # PostgreSQL locks rows: a batch never waits on another process's lock

    async def _publish(self, db: Connection, destinations: set[str]) -> None:
        """Inside the committing transaction: NOTIFY is delivered at commit, to every replica."""
        for destination in sorted(destinations):
            await db.execute(sql.PG_NOTIFY, (CHANNEL, destination))

    async def listen(self, conn: asyncpg.Connection) -> None:
        await conn.add_listener(CHANNEL, self._on_notify)
        conn.add_termination_listener(self._on_listener_closed)
        self._listener = conn
        if self._wakeups is not None:
            self._wakeups.listening_changed(True)

    async def start(self, wakeups: Wakeups) -> None:
        self._wakeups = wakeups
        wakeups.listening_changed(self._listener is not None)
        self._keeper = asyncio.create_task(self._keep_listening(wakeups), name="pg-listen")

    def _on_listener_closed(self, conn: Any) -> None:
        if conn is self._listener:
            self._listener_lost.set()

    async def _keep_listening(self, wakeups: Wakeups) -> None:
        """Listen again after the LISTEN connection dropped (a PostgreSQL restart or a
        failover), with backoff. Until then no replica's commit wakes this one: its workers
        fall back to their poll, and `listening_changed(False)` says so (a log line, a gauge)."""
        while True:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(LISTEN_CHECK_S):
                    await self._listener_lost.wait()
            if not self._listener_lost.is_set() and not (
                self._listener is None or self._listener.is_closed()
            ):
                continue
            self._listener_lost.clear()
            wakeups.listening_changed(False)
            for attempt in itertools.count():
                await asyncio.sleep(LISTEN_RETRY_S[min(attempt, len(LISTEN_RETRY_S) - 1)])
                conn = None
                try:
                    conn = await self._connect()
                    await self.listen(conn)
                    break
                except self.driver_errors:
                    if conn is not None:
                        with contextlib.suppress(Exception):
                            await conn.close()
            # Whatever the other replicas and operators committed meanwhile was not announced
            # to this one: look now.
            wakeups.commits_seen(set())
            wakeups.operation_seen()

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        if self._wakeups is None:
            return
        if payload == OPERATION:
            # An operator command (any process): re-read the pause state, claim now.
            self._wakeups.operation_seen()
            return
        # Another replica (or this one) committed messages for `payload`: wake its workers.
        self._wakeups.commits_seen({payload} if payload else set())

    async def pragmas(self, fetch: Fetch) -> dict[str, Any]:
        found = await fetch(sql.PG_SYNCHRONOUS_COMMIT, ())
        return {"synchronous_commit": found[0][0]}

    async def schema_version(self, fetch: Fetch) -> int:
        found = await fetch(sql.PG_SCHEMA_VERSION, ())
        return int(found[0][0] or 0)

    async def db_size_bytes(self, fetch: Fetch) -> int:
        found = await fetch(sql.PG_DATABASE_SIZE, ())
        return int(found[0][0])

    async def close(self) -> None:
        if self._keeper is not None:
            self._keeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._keeper
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.remove_listener(CHANNEL, self._on_notify)
                await self._listener.close()
        for db in (self.writes, self.reads):
            with contextlib.suppress(*self.driver_errors):
                await db.close()


# Query parameters whose value is a secret: password, sslpassword (the client key's
# passphrase), and anything else named like one (a token, a secret, a key).
_SECRET_PARAM = re.compile(r"(?i)([?&][^=&#]*(?:pass|secret|token|key)[^=&#]*=)[^&#]*")


def _safe(url: str) -> str:
    """The URL without its secrets (user:password@, ?password=, ?sslpassword=, any parameter
    named like a secret), for messages and logs."""
    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return _SECRET_PARAM.sub(r"\1***", url)
