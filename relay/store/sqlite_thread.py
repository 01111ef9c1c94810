"""One thread hand-off per SQLite transaction: the aiosqlite trick, kept in one place.

aiosqlite runs each statement on its connection's own thread, and each result comes back
through the event loop: a group commit (BEGIN, two INSERTs, an ack UPDATE, COMMIT...) took
about six of those turns, and under load a turn is long. Running the whole transaction in ONE
hand-off took the ack p99 at 1000 webhooks/s from 45 to 23 ms (docs/performance.md, "One
thread hand-off per transaction").

How: the transaction is written once, as a coroutine against `Connection`
(relay/store/connection.py). Here it runs over `Immediate`, a `Connection` on the plain sqlite3
connection whose calls never suspend, so the coroutine runs to its end inside one synchronous
call (`drive`), submitted through aiosqlite's private `Connection._execute`: the one way to run
a function on that thread. tests/test_store.py fails if an aiosqlite upgrade removes it.
"""

from __future__ import annotations

import sqlite3
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, TypeVar

import aiosqlite

from relay.store.connection import Connection, Done

T = TypeVar("T")


class Immediate:
    """A `Connection` over a plain sqlite3 connection: each call runs at once and never
    suspends."""

    def __init__(self, conn: sqlite3.Connection) -> None:
        self._conn = conn

    async def execute(self, sql: str, parameters: Sequence[Any] = (), /) -> Done:
        cursor = self._conn.execute(sql, parameters)
        rowcount = cursor.rowcount
        cursor.close()
        return Done(rowcount)

    async def execute_fetchall(self, sql: str, parameters: Sequence[Any] = (), /) -> list[Any]:
        return self._conn.execute(sql, parameters).fetchall()

    async def close(self) -> None:
        raise RuntimeError("a transaction does not close its connection")


def drive(coro: Coroutine[Any, Any, T]) -> T:
    """Run a coroutine that never suspends (its only awaits are `Immediate` calls)."""
    try:
        coro.send(None)
    except StopIteration as done:
        result: T = done.value
        return result
    coro.close()
    raise RuntimeError("a store transaction awaited something other than its statements")


async def in_thread(
    db: aiosqlite.Connection, transaction: Callable[[Connection], Coroutine[Any, Any, T]]
) -> T:
    """Run `transaction` on `db`'s thread, start to end, in one hand-off."""
    raw = db._conn  # the sqlite3 connection, used only on its own thread (below)
    # aiosqlite leaves its private `_execute` untyped.
    result: T = await db._execute(lambda: drive(transaction(Immediate(raw))))  # type: ignore[no-untyped-call]
    return result
