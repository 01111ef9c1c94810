"""Bulk rows for the backlog and history measurements, cloned from rows the relay wrote.

Ingesting 100,000 or 1,000,000 webhooks over HTTP would take most of the benchmark's time, so
these measurements start from a database filled directly with sqlite3. To stay faithful to
the relay's schema and data, nothing here invents a row: the relay itself creates the schema
and stores one real webhook (a *template*), and every bulk row is a copy of that template's
event and message with a new order id and webhook id (random, like Polar's, so the unique
indexes grow the way they do in production) and its own timestamps. Any column the schema has
now or gains later is copied too (with the order id replaced wherever it appears).

- `pending`: messages waiting for delivery (a paused destination's backlog).
- `delivered`: a year of history: delivered messages spread over the last 300 days (inside
  the one-year row retention), their events' raw bodies cleared when older than 30 days, as
  the relay's retention would have done.
"""

from __future__ import annotations

import contextlib
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

DAY_S = 86_400.0
HISTORY_DAYS = 300.0
BODY_RETENTION_DAYS = 30.0


@dataclass(frozen=True, slots=True)
class Template:
    """The relay's own rows for one webhook: what every bulk row is cloned from."""

    order_id: str
    webhook_id: str
    event_id: int
    message_id: int


def find_template(db: Path, order_id: str, webhook_id: str) -> Template:
    with contextlib.closing(sqlite3.connect(db)) as conn:
        event = conn.execute(
            "SELECT id FROM inbound_events WHERE webhook_id = ?", (webhook_id,)
        ).fetchone()
        if event is None:
            raise RuntimeError("the template webhook was not stored")
        message = conn.execute(
            "SELECT id FROM outbound_messages WHERE event_id = ?", (int(event[0]),)
        ).fetchone()
        if message is None:
            raise RuntimeError("the template webhook has no outbound message")
    return Template(order_id, webhook_id, int(event[0]), int(message[0]))


def _scalar(conn: sqlite3.Connection, sql: str) -> int:
    row = conn.execute(sql).fetchone()
    return int(row[0])


def _columns(conn: sqlite3.Connection, table: str) -> list[tuple[str, str]]:
    return [(str(r[1]), str(r[2]).upper()) for r in conn.execute(f"PRAGMA table_info({table})")]


def _clone_expr(name: str, declared: str) -> str:
    """The template's value, with the template's order id and webhook id replaced."""
    column = f't."{name}"'
    if declared == "TEXT":
        return f"replace(replace({column}, :tmpl_oid, b.oid), :tmpl_wid, b.wid)"
    if declared == "BLOB":
        # replace() works on text; the relay reads these columns as bytes, so cast back.
        return (
            f"CASE WHEN {column} IS NULL THEN NULL ELSE CAST(replace(replace("
            f"CAST({column} AS TEXT), :tmpl_oid, b.oid), :tmpl_wid, b.wid) AS BLOB) END"
        )
    return column


def populate(db: Path, template: Template, count: int, *, delivered: bool) -> dict[str, Any]:
    """Insert `count` cloned events with one message each, in one transaction."""
    started = time.monotonic()
    now = time.time()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        # A bulk load: no relay runs on this file now, and the result is checked below.
        conn.execute("PRAGMA journal_mode = MEMORY")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("PRAGMA cache_size = -262144")  # 256 MiB, for the random index inserts
        conn.execute("BEGIN")
        event_base = _scalar(conn, "SELECT COALESCE(MAX(id), 0) FROM inbound_events")
        message_base = _scalar(conn, "SELECT COALESCE(MAX(id), 0) FROM outbound_messages")
        conn.execute(
            "CREATE TEMP TABLE b (i INTEGER PRIMARY KEY, oid TEXT NOT NULL, wid TEXT NOT NULL, "
            "at REAL NOT NULL)"
        )
        # Delivered: spread over HISTORY_DAYS. Pending: a backlog that built up over the last
        # `count` milliseconds (all of it due now). Either way ids grow with time, as the
        # relay writes them (the console's time filters rely on it).
        span_s = HISTORY_DAYS * DAY_S if delivered else count * 0.001
        step = -span_s / max(count, 1)
        origin = now - span_s
        conn.execute(
            "WITH RECURSIVE s(i) AS (SELECT 1 UNION ALL SELECT i + 1 FROM s WHERE i < :count) "
            "INSERT INTO b SELECT i, lower(hex(randomblob(16))), "
            "'msg_' || lower(hex(randomblob(16))), :origin - i * :step FROM s",
            {"count": count, "origin": origin, "step": step},
        )
        params = {
            "tmpl_oid": template.order_id,
            "tmpl_wid": template.webhook_id,
            "event_base": event_base,
            "message_base": message_base,
            "body_cutoff": now - BODY_RETENTION_DAYS * DAY_S,
        }

        event_overrides = {
            "id": ":event_base + b.i",
            "webhook_id": "b.wid",
            "received_at": "b.at",
            "request_id": "'bench-' || b.i",
        }
        if delivered:
            event_overrides["body"] = (
                f"CASE WHEN b.at < :body_cutoff THEN NULL ELSE {_clone_expr('body', 'BLOB')} END"
            )
        message_overrides = {
            "id": ":message_base + b.i",
            "event_id": ":event_base + b.i",
            "created_at": "b.at",
            "retry_from_at": "b.at",
            "next_attempt_at": "b.at",
            "updated_at": "b.at",
            "request_id": "'bench-' || b.i",
            "lease_until": "NULL",
            "lease_token": "NULL",
            "last_error": "NULL",
        }
        if delivered:
            message_overrides |= {
                "status": "'delivered'",
                "attempts": "1",
                "last_status": "200",
                "delivered_at": "b.at + 0.05",
                "updated_at": "b.at + 0.05",
            }
        else:
            message_overrides |= {"status": "'pending'", "attempts": "0", "delivered_at": "NULL"}
        for table, template_id, overrides in (
            ("inbound_events", template.event_id, event_overrides),
            ("outbound_messages", template.message_id, message_overrides),
        ):
            columns = _columns(conn, table)
            names = ", ".join(f'"{name}"' for name, _ in columns)
            values = ", ".join(
                overrides.get(name, _clone_expr(name, declared)) for name, declared in columns
            )
            conn.execute(
                f"INSERT INTO {table} ({names}) SELECT {values} "  # noqa: S608 - our own SQL
                f"FROM b, (SELECT * FROM {table} WHERE id = :template_id) t ORDER BY b.i",
                params | {"template_id": template_id},
            )
        conn.execute("DROP TABLE b")
        if delivered:  # the template is history too, not one message left to deliver
            conn.execute(
                "UPDATE outbound_messages SET status = 'delivered', attempts = 1, "
                "last_status = 200, delivered_at = updated_at WHERE id = ?",
                (template.message_id,),
            )
        conn.execute("COMMIT")
        conn.execute("PRAGMA journal_mode = WAL")  # what the relay uses; it sets it again
        counts = dict(
            conn.execute("SELECT status, COUNT(*) FROM outbound_messages GROUP BY status")
        )
    finally:
        conn.close()
    size = sum(p.stat().st_size for p in db.parent.glob(db.name + "*") if p.is_file())
    return {
        "rows": count,
        "kind": "delivered" if delivered else "pending",
        "seconds": round(time.monotonic() - started, 2),
        "messages_by_status": counts,
        "db_bytes": size,
    }
