"""What the query mixins of `Outbox` (relay/store/outbox.py) need from it: its clock, writer,
dialect and two statement runners. `AdminQueries`, `ConsoleQueries` and `SnapshotQueries`
inherit this declaration instead of each repeating it; `Outbox` provides the members."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from relay.models import Clock
from relay.store import sql
from relay.store.batching import Writer
from relay.store.connection import Row


class Queries:
    """The members a query mixin may use; `Outbox` defines them."""

    _clock: Clock
    _writer: Writer
    _dialect: sql.Dialect

    async def _fetch(self, statement: str, params: Sequence[Any] = ()) -> list[Row]:
        """Rows of one read statement."""
        raise NotImplementedError

    async def _exec(self, statement: str, params: Sequence[Any] = ()) -> int:
        """One write statement through the writer; the rows it changed."""
        raise NotImplementedError
