"""The SQLite outbox: the only package that knows SQL.

`schema` (connections, pragmas, migrations, the serve lock), `writer` (the single writer and
the hot-path statements), `outbox` (`Store`, what the relay calls), `admin` (operator queries).
"""

from relay.models import Clock, is_postgres_url
from relay.store.outbox import Store
from relay.store.schema import PRAGMAS, migrations
from relay.store.writer import BatchStats

__all__ = ["PRAGMAS", "BatchStats", "Store", "migrations", "open_store"]


async def open_store(
    location: str,
    *,
    clock: Clock | None = None,
    busy_timeout_ms: int = 5000,
    max_batch: int = 256,
    serve: bool = False,
) -> Store:
    """A SQLite file path, or a postgresql:// URL (several relays can share that one)."""
    if is_postgres_url(location):
        from relay.store.postgres import PgStore

        return await PgStore.open(
            location,
            clock=clock,
            busy_timeout_ms=busy_timeout_ms,
            max_batch=max_batch,
            serve=serve,
        )
    return await Store.open(
        location, clock=clock, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch, serve=serve
    )
