"""The connection seam: what the store's statements and its group-commit engine need from a
database connection, whichever the driver.

An aiosqlite connection offers it as is; `relay/store/postgres.py` adapts asyncpg to it, and
`relay/store/sqlite_thread.py` offers it over a plain sqlite3 connection on aiosqlite's thread.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any, Protocol

# One result row: indexable by column position (sqlite3.Row, a tuple, an asyncpg.Record).
Row = Sequence[Any]


class Cursor(Protocol):
    """What `Connection.execute` returns: the rows the statement changed."""

    @property
    def rowcount(self) -> int: ...

    async def close(self) -> None: ...


class Connection(Protocol):
    """Statements with "?" placeholders, run in order on one connection."""

    async def execute(self, sql: str, parameters: Sequence[Any] = ..., /) -> Cursor: ...

    async def execute_fetchall(
        self, sql: str, parameters: Sequence[Any] = ..., /
    ) -> Iterable[Row]: ...

    async def close(self) -> None: ...


class Done:
    """A finished statement's cursor, for adapters whose driver has none to close: the
    rowcount, and an awaitable close() that does nothing."""

    __slots__ = ("rowcount",)

    def __init__(self, rowcount: int) -> None:
        self.rowcount = rowcount

    async def close(self) -> None:
        return None
