"""The outbox: the only package that knows SQL or imports a database driver.

- `base`: `Store`, the protocol everything else uses, and `Backend`, what a driver offers;
- `outbox` + `admin`: `Outbox`, the one `Store` implementation, on any backend;
- `sqlite` (+ `sqlite_thread`, `schema`) and `postgres`: one module per backend;
- `batching`: the group-commit engine; `writes`: the hot-path write statements;
- `sql`: every statement, by name; `rows`: result rows to relay/models.py dataclasses;
- `connection`: the typed connection seam; `transfer`: SQLite -> PostgreSQL.
"""

from relay.models import Clock, is_postgres_url
from relay.store.base import Store
from relay.store.batching import BatchStats
from relay.store.schema import PRAGMAS, migrations

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
        from relay.store.postgres import open_postgres

        return await open_postgres(
            location,
            clock=clock,
            busy_timeout_ms=busy_timeout_ms,
            max_batch=max_batch,
            serve=serve,
        )
    from relay.store.sqlite import open_sqlite

    return await open_sqlite(
        location, clock=clock, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch, serve=serve
    )
