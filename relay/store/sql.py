"""The outbox's SQL, by name: every statement the store runs on either backend.

Statements use "?" placeholders (the PostgreSQL connection numbers them). Where the dialects
differ, the difference is a field of `Dialect` (`SQLITE`, `POSTGRES`); a statement whose shape
depends on a count (multi-row INSERTs, IN lists) is a small function returning the text.
Values are always bound, never formatted in: the only text formatted into a statement is
placeholders, column names chosen here and fixed clauses.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Self

# SQLite's default limit is 32766 bound variables per statement; stay far below it.
ROWS_PER_STATEMENT = 500


@dataclass(frozen=True, slots=True)
class Dialect:
    """What the statements need to know about a backend."""

    name: str
    # A prefix for a `status = ...` term that must not pick the index (SQLite's unary plus,
    # which PostgreSQL's planner does not need and its text type does not take).
    by_key: str
    # How a claim names its chosen ids. PostgreSQL runs the subquery once (an InitPlan,
    # "= ANY(ARRAY(...))"): as "IN (...)" the planner may rescan it for each row, every rescan
    # skipping the rows this UPDATE already took, and one claim then leased more than `limit`.
    chosen_open: str
    # Several relays on one PostgreSQL claim concurrently: SKIP LOCKED lets each take rows the
    # others are not taking. SQLite has one writer at a time and needs it not.
    chosen_close: str
    # The minute of an attempt's `at` (the console's chart): SQLite's CAST truncates,
    # PostgreSQL's rounds, so PostgreSQL floors first.
    minute_of_at: str = "CAST(at / 60 AS INTEGER)"


SQLITE = Dialect("sqlite", by_key="+", chosen_open="IN (", chosen_close=")")
POSTGRES = Dialect(
    "postgres",
    by_key="",
    chosen_open="= ANY(ARRAY(",
    chosen_close=" FOR UPDATE SKIP LOCKED))",
    minute_of_at="CAST(FLOOR(at / 60) AS BIGINT)",
)

BEGIN = "BEGIN IMMEDIATE"
COMMIT = "COMMIT"
ROLLBACK = "ROLLBACK"


def marks(count: int) -> str:
    """`?,?,...` for an IN list of `count` values."""
    return ",".join("?" * count)


# ---------------------------------------------------------------- ingest (hot path)


def insert_events(rows: int) -> str:
    """Events, `rows` of 9 values each; a webhook-id already stored is skipped."""
    return (
        "INSERT INTO inbound_events (source, webhook_id, event_type, received_at, "
        "headers_json, body, status, reason, request_id) VALUES "
        + ",".join(["(?,?,?,?,?,?,?,?,?)"] * rows)
        + " ON CONFLICT (source, webhook_id) DO NOTHING RETURNING id, source, webhook_id"
    )


def insert_messages(rows: int) -> str:
    """Messages, `rows` of 19 values each; a key the destination already has is skipped.
    The last seven are the body's search columns (relay/models.py BodyFacts)."""
    return (
        "INSERT INTO outbound_messages (event_id, route, destination, idempotency_key, "
        "body, status, created_at, retry_from_at, next_attempt_at, updated_at, "
        "request_id, verify_ref, order_id, payment_ref, refund_id, event_kind, amount_minor, "
        "currency, attributed) VALUES "
        + ",".join(["(?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)"] * rows)
        + " ON CONFLICT (destination, idempotency_key) DO NOTHING "
        "RETURNING id, destination, idempotency_key"
    )


def insert_attempts(rows: int) -> str:
    """Delivery attempts, `rows` of 8 values each (written with their outcome)."""
    return (
        "INSERT INTO message_attempts (message_id, attempt, at, outcome, http_status, "
        "error_kind, duration_s, response_snippet) VALUES " + ",".join(["(?,?,?,?,?,?,?,?)"] * rows)
    )


NOTE_SUCCESS = (
    "INSERT INTO destination_activity (destination, last_success_at) VALUES (?, ?) "
    "ON CONFLICT (destination) DO UPDATE SET last_success_at = excluded.last_success_at"
)
NOTE_FAILURE = (
    "INSERT INTO destination_activity (destination, last_error, last_error_at) "
    "VALUES (?, ?, ?) ON CONFLICT (destination) DO UPDATE SET "
    "last_error = excluded.last_error, last_error_at = excluded.last_error_at"
)


def events_all_duplicate(count: int) -> str:
    return (
        "UPDATE inbound_events SET status = 'duplicate', "
        "reason = 'every message was already enqueued by an earlier event' "
        f"WHERE id IN ({marks(count)})"
    )


UPDATE_EVENT_STATUS = "UPDATE inbound_events SET status = ?, reason = ? WHERE id = ?"

# ---------------------------------------------------------------- delivery (hot path)


def claim(dialect: Dialect) -> str:
    """Lease (lease_until, token, now, destination, now, limit) due messages in one statement.
    SQLite: "+status" keeps the planner off the status index for the outer UPDATE. With it,
    SQLite walked every pending row to find the few chosen ids: 11 ms per claim on a 100,000
    backlog instead of 0.2 ms by primary key."""
    return (
        "UPDATE outbound_messages SET status = 'inflight', lease_until = ?, lease_token = ?, "
        "attempts = attempts + 1, updated_at = ? "
        f"WHERE {dialect.by_key}status = 'pending' AND id {dialect.chosen_open}"
        "SELECT id FROM outbound_messages "
        "WHERE destination = ? AND status = 'pending' AND next_attempt_at <= ? "
        f"ORDER BY next_attempt_at, id LIMIT ?{dialect.chosen_close} "
        "RETURNING id, destination, idempotency_key, body, attempts, created_at, "
        "retry_from_at, request_id, verify_ref, route"
    )


def mark_delivered(dialect: Dialect, count: int) -> str:
    """(now, status, now, ids..., "id:token"...): found by primary key, then checked against
    the lease tokens."""
    return (
        "UPDATE outbound_messages SET status = 'delivered', delivered_at = ?, "
        "last_status = ?, last_error = NULL, lease_until = NULL, lease_token = NULL, "
        f"updated_at = ? WHERE id IN ({marks(count)}) AND {dialect.by_key}status = 'inflight' "
        f"AND (id || ':' || lease_token) IN ({marks(count)}) RETURNING id"
    )


def settle(assignments: str) -> str:
    """One state change of a claimed message, (*assignment values, now, id, token)."""
    return (
        f"UPDATE outbound_messages SET {assignments}, lease_until = NULL, "
        "lease_token = NULL, updated_at = ? WHERE id = ? AND status = 'inflight' "
        "AND lease_token = ?"
    )


# (next_attempt_at, last_status, last_error, refund)
SET_RETRY = (
    "status = 'pending', next_attempt_at = ?, last_status = ?, last_error = ?, "
    "attempts = attempts - ?"
)
SET_DEAD = "status = 'dead', last_status = ?, last_error = ?"  # (last_status, last_error)
SET_RELEASED = "status = 'pending', next_attempt_at = ?, attempts = attempts - 1"  # (now,)


def requeue_inflight(expired_only: bool) -> str:
    """(now, now, now[, now]): leased messages back to pending."""
    return (
        "UPDATE outbound_messages SET status = 'pending', lease_until = NULL, "
        "lease_token = NULL, updated_at = ?, next_attempt_at = CASE WHEN "
        "next_attempt_at < ? THEN next_attempt_at ELSE ? END "
        f"WHERE status = 'inflight' {'AND lease_until < ?' if expired_only else ''}"
    )


NEXT_DUE_AT = (
    "SELECT MIN(next_attempt_at) FROM outbound_messages "  # the next pending one's due time
    "WHERE destination = ? AND status = 'pending'"
)
# Messages stored before the search and revenue columns existed (PostgreSQL's migration adds
# them empty): `attributed` is set for every JSON-object body the relay has written since.
SELECT_FACTLESS = (
    "SELECT id, body FROM outbound_messages WHERE id > ? AND attributed IS NULL ORDER BY id LIMIT ?"
)
UPDATE_FACTS = (
    "UPDATE outbound_messages SET order_id = ?, payment_ref = ?, refund_id = ?, "
    "event_kind = ?, amount_minor = ?, currency = ?, attributed = ? WHERE id = ?"
)
FIND_BODY = "SELECT body FROM outbound_messages WHERE destination = ? AND idempotency_key = ?"
PROBE = (
    "INSERT INTO relay_meta (key, value) VALUES ('probe', ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)

# ---------------------------------------------------------------- operator queries

MESSAGE_COLUMNS = (
    "m.id, m.event_id, m.route, m.destination, m.idempotency_key, m.status, m.attempts, "
    "m.created_at, m.next_attempt_at, m.lease_until, m.last_status, m.last_error, "
    "m.delivered_at, m.updated_at, e.event_type, e.webhook_id, m.body, m.discarded_at, "
    "m.discard_reason"
)
EVENT_COLUMNS = "id, source, webhook_id, event_type, received_at, status, reason, body"
_MESSAGES = "FROM outbound_messages m JOIN inbound_events e ON e.id = m.event_id"

COUNT_BY_STATUS = (
    "SELECT status, COUNT(*) FROM outbound_messages WHERE destination = ? GROUP BY status"
)
OLDEST_UNDELIVERED = (
    "SELECT MIN(created_at) FROM outbound_messages WHERE destination = ? "
    "AND status IN ('pending', 'inflight')"
)
GET_MESSAGE = f"SELECT {MESSAGE_COLUMNS} {_MESSAGES} WHERE m.id = ?"


def _each_value(table: str, column: str) -> str:
    """Every distinct value of `column`, the leading column of an index of `table`, one index
    seek per value (a loose index scan: DISTINCT reads every entry of a million-row index)."""
    return (
        f"WITH RECURSIVE found (v) AS (SELECT MIN({column}) FROM {table} UNION ALL "
        f"SELECT (SELECT MIN({column}) FROM {table} WHERE {column} > found.v) "
        "FROM found WHERE found.v IS NOT NULL) SELECT v FROM found WHERE v IS NOT NULL"
    )


# The condition of the partial (status, kind, currency, amount, id) index: a query on
# statuses other than delivered repeats it, or SQLite will not use that index.
NOT_DELIVERED = "status != 'delivered'"

# The destinations with messages, and the sources with events, from the unique indexes: the
# search finds an idempotency key (webhook id) on them by naming each, a handful of seeks.
STORED_DESTINATIONS = _each_value("outbound_messages", "destination")
STORED_SOURCES = _each_value("inbound_events", "source")
PAUSED_OVERRIDES = "SELECT destination, paused FROM destination_state"
SET_PAUSED = (
    "INSERT INTO destination_state (destination, paused, updated_at) VALUES (?, ?, ?) "
    "ON CONFLICT (destination) DO UPDATE SET paused = excluded.paused, "
    "updated_at = excluded.updated_at"
)
EVENT_COUNT = "SELECT COUNT(*) FROM inbound_events"


def list_messages(where: str) -> str:
    """(*where params, limit), newest first."""
    return f"SELECT {MESSAGE_COLUMNS} {_MESSAGES} WHERE {where} ORDER BY m.id DESC LIMIT ?"


def list_events(where: str, newest_first: bool) -> str:
    """(*where params, limit)."""
    order = "DESC" if newest_first else ""
    return f"SELECT {EVENT_COLUMNS} FROM inbound_events WHERE {where} ORDER BY id {order} LIMIT ?"


def replayable(where: str) -> str:
    """The ids a replay selects: never inflight (being sent) nor discarded (given up)."""
    return f"SELECT m.id {_MESSAGES} WHERE {where} AND m.status NOT IN ('inflight', 'discarded')"


def count_of(select: str) -> str:
    return f"SELECT COUNT(*) FROM ({select}) AS chosen"


def replay(select: str) -> str:
    """(now, now, now, *select params)."""
    return (
        "UPDATE outbound_messages SET status = 'pending', attempts = 0, next_attempt_at = ?, "
        f"retry_from_at = ?, delivered_at = NULL, updated_at = ? WHERE id IN ({select})"
    )


def discard(where: str) -> str:
    """(now, reason, now, *where params): the selected DEAD messages only."""
    return (
        "UPDATE outbound_messages SET status = 'discarded', discarded_at = ?, "
        "discard_reason = ?, updated_at = ? WHERE status = 'dead' AND id IN "
        f"(SELECT m.id {_MESSAGES} WHERE {where}) RETURNING id"
    )


# Retention, each (before, batch): bodies, delivered messages, then events left empty.
PRUNE = (
    "UPDATE inbound_events SET body = NULL WHERE id IN (SELECT e.id FROM "
    "inbound_events e WHERE e.received_at < ? AND e.body IS NOT NULL AND NOT EXISTS "
    "(SELECT 1 FROM outbound_messages m WHERE m.event_id = e.id "
    "AND m.status != 'delivered') LIMIT ?)",
    # Delivered messages past retention: ids first, then their attempts and the messages
    # (relay/store/admin.py `_prune_messages`, one transaction per batch).
    "SELECT id FROM outbound_messages WHERE status = 'delivered' AND delivered_at < ? LIMIT ?",
    "DELETE FROM inbound_events WHERE id IN (SELECT e.id FROM inbound_events e "
    "WHERE e.received_at < ? AND NOT EXISTS (SELECT 1 FROM outbound_messages m "
    "WHERE m.event_id = e.id) LIMIT ?)",
)


def delete_attempts_of(count: int) -> str:
    return f"DELETE FROM message_attempts WHERE message_id IN ({marks(count)})"


def delete_messages(count: int) -> str:
    return f"DELETE FROM outbound_messages WHERE id IN ({marks(count)})"


class Where:
    """A WHERE clause built from optional filters: only "?" placeholders, values bound."""

    def __init__(self) -> None:
        self._parts: list[str] = ["1 = 1"]
        self.params: list[Any] = []

    @property
    def sql(self) -> str:
        return " AND ".join(self._parts)

    def raw(self, condition: str, *params: Any) -> Self:
        """A condition written by the caller (fixed text and "?" placeholders only)."""
        self._parts.append(condition)
        self.params += list(params)
        return self

    def one_of(self, column: str, values: Any) -> Self:
        if values:
            self._parts.append(f"{column} IN ({marks(len(values))})")
            self.params += list(values)
        return self

    def equals(self, column: str, value: Any) -> Self:
        if value is not None:
            self._parts.append(f"{column} = ?")
            self.params.append(value)
        return self

    def between(self, column: str, since: float | None, until: float | None) -> Self:
        """since <= column < until, each bound only when given."""
        if since is not None:
            self._parts.append(f"{column} >= ?")
            self.params.append(since)
        if until is not None:
            self._parts.append(f"{column} < ?")
            self.params.append(until)
        return self


# ---------------------------------------------------------------- the Polar snapshot (ledger)

UPSERT_POLAR_RECORD = (
    "INSERT INTO polar_snapshot (kind, polar_id, created_at, status, data, fetched_at) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, polar_id) DO UPDATE SET "
    "created_at = excluded.created_at, status = excluded.status, data = excluded.data, "
    "fetched_at = excluded.fetched_at"
)
SELECT_POLAR_RECORDS = (
    "SELECT kind, polar_id, created_at, status, data, fetched_at FROM polar_snapshot "
    "WHERE created_at >= ? AND created_at < ? ORDER BY created_at, kind, polar_id"
)


# Rows this run's listings (of `count` kinds) no longer show in its window.
def delete_polar_unlisted(count: int) -> str:
    return (
        f"DELETE FROM polar_snapshot WHERE kind IN ({marks(count)}) AND created_at >= ? "
        "AND created_at < ? AND fetched_at < ?"
    )


DELETE_POLAR_OUTSIDE = "DELETE FROM polar_snapshot WHERE created_at < ? OR created_at >= ?"
SELECT_META = "SELECT value FROM relay_meta WHERE key = ?"
UPSERT_META = (
    "INSERT INTO relay_meta (key, value) VALUES (?, ?) "
    "ON CONFLICT (key) DO UPDATE SET value = excluded.value"
)


# ---------------------------------------------------------------- backend-specific

SQLITE_DATA_VERSION = "PRAGMA data_version"
SQLITE_USER_VERSION = "PRAGMA user_version"
PG_NOTIFY = "SELECT pg_notify(?, ?)"
PG_SYNCHRONOUS_COMMIT = "SHOW synchronous_commit"
PG_SCHEMA_VERSION = "SELECT max(version) FROM relay_schema"
PG_DATABASE_SIZE = "SELECT pg_database_size(current_database())"


def sqlite_pragma(name: str) -> str:
    """Read one of the pragmas the store sets (relay/store/schema.py PRAGMAS)."""
    return f"PRAGMA {name}"
