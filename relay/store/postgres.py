"""The outbox on PostgreSQL (asyncpg), for several relays sharing one database.

The same `Store`, the same statements and the same guarantees as SQLite: this module adapts an
asyncpg connection to the calls the store makes (`execute`, `execute_fetchall` with "?"
placeholders, BEGIN/COMMIT), applies the PostgreSQL migrations under an advisory lock, and
wakes idle workers on every replica with LISTEN/NOTIFY. What differs by design:
- claims take rows FOR UPDATE SKIP LOCKED, so replicas share the work without waiting;
- no replica owns the database, so at start-up only EXPIRED leases go back to pending (a
  live replica's inflight messages are left to it); a crashed replica's leases expire after
  `lease_s` and are swept by every replica;
- durability is PostgreSQL's: a commit returns after its WAL is flushed (synchronous_commit on).
"""

from __future__ import annotations

import contextlib
import re
from collections.abc import Awaitable, Callable, Iterable, Sequence
from importlib import resources
from typing import Any

import asyncpg

from relay.errors import StorageError
from relay.models import Clock, SystemClock
from relay.store.outbox import Store
from relay.store.schema import split_sql

CHANNEL = "relay_outbox"
_MIGRATION_LOCK = 0x52454C4159  # "RELAY": one replica migrates at a time
_PLACEHOLDER = re.compile(r"\?")
_COUNT = re.compile(r"(\d+)$")


def _numbered(sql: str) -> str:
    """ "?" placeholders (the store's SQL) to asyncpg's $1, $2, ... (none sit in literals)."""
    counter = iter(range(1, 100_000))
    return _PLACEHOLDER.sub(lambda _: f"${next(counter)}", sql)


class _Cursor:
    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount

    async def close(self) -> None:
        return None


class PgDb:
    """An asyncpg connection with the aiosqlite calls the store uses. It reconnects after the
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

    async def execute(self, sql: str, parameters: Sequence[Any] = ()) -> _Cursor:
        starting = sql in ("BEGIN IMMEDIATE", "BEGIN")
        if starting:
            sql = "BEGIN"  # PostgreSQL locks rows, not the database
        if sql in ("COMMIT", "ROLLBACK") and self._conn.is_closed():
            self._in_transaction = False
            if sql == "ROLLBACK":
                return _Cursor(0)  # the server rolled it back when the connection died
            # A COMMIT on a new connection would "succeed" with nothing in it: the batch's
            # webhooks would get 202 for rows that died with the old connection.
            raise asyncpg.ConnectionDoesNotExistError(
                "the connection was lost before COMMIT: the transaction was rolled back"
            )
        conn = await self._live(starting)
        try:
            status = await conn.execute(_numbered(sql), *parameters)
        finally:
            if starting:
                self._in_transaction = True
            elif sql in ("COMMIT", "ROLLBACK"):
                self._in_transaction = False
        match = _COUNT.search(status or "")
        return _Cursor(int(match.group(1)) if match and " " in status else -1)

    async def execute_fetchall(self, sql: str, parameters: Sequence[Any] = ()) -> list[Any]:
        conn = await self._live(False)
        return list(await conn.fetch(_numbered(sql), *parameters))

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


class PgStore(Store):
    """`Store` on PostgreSQL. Open with `PgStore.open(url)`."""

    exclusive = False  # replicas share the database: never requeue a live replica's leases

    def __init__(
        self,
        url: str,
        reads: PgDb,
        writes: PgDb,
        listener: asyncpg.Connection | None,
        clock: Clock,
        max_batch: int,
        serve: bool,
    ) -> None:
        super().__init__(_safe(url), reads, writes, clock, max_batch, None, serve=serve)
        self._listener = listener
        self._writer.publish = self._publish

    @classmethod
    async def open(
        cls,
        url: str,
        *,
        clock: Clock | None = None,
        busy_timeout_ms: int = 5000,
        max_batch: int = 256,
        serve: bool = False,
    ) -> PgStore:
        timeout_s = max(1.0, busy_timeout_ms / 1000)
        connections: list[asyncpg.Connection] = []
        try:
            for _ in range(3 if serve else 2):
                connections.append(
                    await asyncpg.connect(url, timeout=timeout_s, command_timeout=60)
                )
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
        listener = connections[2] if serve else None
        store = cls(url, reads, writes, listener, clock or SystemClock(), max_batch, serve)
        if listener is not None:
            await listener.add_listener(CHANNEL, store._on_notify)
        return store

    def _on_notify(self, conn: Any, pid: int, channel: str, payload: str) -> None:
        # Another replica (or this one) committed messages for `payload`: wake its workers.
        self._notify({payload} if payload else set())

    async def _publish(self, db: Any, destinations: Iterable[str]) -> None:
        """Inside the committing transaction: NOTIFY is delivered at commit, to every replica."""
        for destination in sorted(destinations):
            await db.execute("SELECT pg_notify(?, ?)", (CHANNEL, destination))

    async def close(self) -> None:
        if self._listener is not None:
            with contextlib.suppress(Exception):
                await self._listener.remove_listener(CHANNEL, self._on_notify)
                await self._listener.close()
        await super().close()

    async def pragmas(self) -> dict[str, Any]:
        rows = await self._fetch("SHOW synchronous_commit")
        return {"synchronous_commit": rows[0][0]}

    async def schema_version(self) -> int:
        rows = await self._fetch("SELECT max(version) FROM relay_schema")
        return int(rows[0][0] or 0)

    async def db_size_bytes(self) -> int:
        rows = await self._fetch("SELECT pg_database_size(current_database())")
        return int(rows[0][0])


# Query parameters whose value is a secret: password, sslpassword (the client key's
# passphrase), and anything else named like one (a token, a secret, a key).
_SECRET_PARAM = re.compile(r"(?i)([?&][^=&#]*(?:pass|secret|token|key)[^=&#]*=)[^&#]*")


def _safe(url: str) -> str:
    """The URL without its secrets (user:password@, ?password=, ?sslpassword=, any parameter
    named like a secret), for messages and logs."""
    url = re.sub(r"(://[^:/@]*):[^@]*@", r"\1:***@", url)
    return _SECRET_PARAM.sub(r"\1***", url)
