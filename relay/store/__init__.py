"""The SQLite outbox: the only package that knows SQL.

`schema` (connections, pragmas, migrations, the serve lock), `writer` (the single writer and
the hot-path statements), `outbox` (`Store`, what the relay calls), `admin` (operator queries).
"""

from relay.store.outbox import Store
from relay.store.schema import PRAGMAS, migrations
from relay.store.writer import BatchStats

__all__ = ["PRAGMAS", "BatchStats", "Store", "migrations"]
