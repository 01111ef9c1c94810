"""The operator console's reads and writes on the outbox (relay/console/service.py calls
them): the filtered, keyset-paged message list and its search, one message's attempts, event
and related messages, the overview's figures, the audit, and the bulk-job rows. The third part
of `Outbox` (relay/store/outbox.py), beside `AdminQueries`; writes go through its single writer.

Every list is newest first by id, on an index: the search reads the few matching ids from each
search column's index before their rows, several statuses are merged per status, and a time
filter becomes an id range (ids grow with created_at, the insert time). At a million messages
each answer stays in milliseconds (bench/console.py, docs/performance.md).
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from relay.models import MessageStatus
from relay.store import sql
from relay.store.connection import Connection, Row
from relay.store.queries import Queries

if TYPE_CHECKING:
    from relay.console.service import (
        Attempt,
        AuditEntry,
        Cursor,
        Inbound,
        Job,
        ListFilters,
        MessageItem,
    )

# A search matching more messages than this shows the newest this many.
SEARCH_LIMIT = 1000
RELATED_LIMIT = 20  # related messages shown with one message
MAX_ROW_ID = 2**63 - 1
# Message ids grow with created_at (it is the insert time); a time filter is turned into an id
# range from the created_at index, widened by this much clock disagreement between writers.
CLOCK_SLACK_S = 300.0


# The dead purchases' sum, from the partial (status, kind, currency, amount, id) index alone.
AT_RISK_DEAD = (
    "SELECT currency, SUM(amount_minor), COUNT(*) FROM outbound_messages "
    f"WHERE status = 'dead' AND {sql.NOT_DELIVERED} AND event_kind = 'purchase' "
    "AND amount_minor IS NOT NULL GROUP BY currency"
)


class ConsoleQueries(Queries):
    """The console's queries; `Outbox` provides what `Queries` declares."""

    async def console_messages(
        self, filters: ListFilters, cursor: Cursor | None, limit: int
    ) -> list[MessageItem]:
        """The console's message list: newest first (or largest amount first), keyset-paged."""
        from relay.console.service import Sort

        found: list[int] | None = None
        if filters.q:
            # The few ids the search matches first, then their rows by primary key: given
            # the search as a subquery beside "ORDER BY id DESC", SQLite walks the table.
            found = await self._search_ids(filters.q)
            if not found:
                return []
        where = _console_where(filters, found)
        await self._time_hints(where, filters)
        if filters.sort is Sort.AMOUNT:
            amount = "COALESCE(m.amount_minor, 0)"
            if cursor is not None:
                where.raw(
                    f"({amount} < ? OR ({amount} = ? AND m.id < ?))",
                    cursor.after_amount or 0,
                    cursor.after_amount or 0,
                    cursor.after_id,
                )
            order = f"{amount} DESC, m.id DESC"
        elif len(filters.statuses) > 1:
            return await self._console_by_statuses(filters, cursor, limit)
        else:
            if cursor is not None:
                where.raw("m.id < ?", cursor.after_id)
            order = "m.id DESC"
        # The page's ids from the messages alone (their indexes cover the order), then the
        # rows with their events: joining every candidate before the sort cost 30-90 ms for
        # 5,000 dead messages sorted by amount.
        chosen = f"SELECT m.id FROM {_source(filters)} WHERE {where.sql} ORDER BY {order} LIMIT ?"
        rows = await self._fetch(
            f"SELECT {_ITEM_COLUMNS} FROM outbound_messages m "
            f"JOIN inbound_events e ON e.id = m.event_id WHERE m.id IN "
            f"(SELECT id FROM ({chosen}) AS page) ORDER BY {order}",
            (*where.params, limit),
        )
        return [_item(r) for r in rows]

    async def _console_by_statuses(
        self, filters: ListFilters, cursor: Cursor | None, limit: int
    ) -> list[MessageItem]:
        """Several statuses, newest first: the newest `limit` of each status (each read in
        order from the (status, id) index), merged. As one "status IN (...)" the database
        sorts every matching row to keep `limit` of them."""

        branches, params = [], []
        found = await self._search_ids(filters.q) if filters.q else None
        for n, status in enumerate(filters.statuses):
            where = _console_where(dataclasses.replace(filters, statuses=(status,)), found)
            await self._time_hints(where, filters)
            if cursor is not None:
                where.raw("m.id < ?", cursor.after_id)
            branches.append(
                f"SELECT id FROM (SELECT m.id FROM {_source(filters)} "
                f"WHERE {where.sql} ORDER BY m.id DESC LIMIT ?) AS s{n}"
            )
            params += [*where.params, limit]
        rows = await self._fetch(
            f"SELECT {_ITEM_COLUMNS} FROM outbound_messages m "
            "JOIN inbound_events e ON e.id = m.event_id WHERE m.id IN ("
            + " UNION ALL ".join(branches)
            + ") ORDER BY m.id DESC LIMIT ?",
            (*params, limit),
        )
        return [_item(r) for r in rows]

    async def _time_hints(self, where: sql.Where, filters: ListFilters) -> None:
        """Bound the ids of a time-filtered list, so the newest-first walk starts at `until`
        and stops at `since` instead of walking the whole table. Exact as long as no writer's
        clock was CLOCK_SLACK_S behind another's (the created_at bounds stay in the query)."""
        if filters.since is not None:
            rows = await self._fetch(
                "SELECT id FROM outbound_messages WHERE created_at >= ? "
                "ORDER BY created_at, id LIMIT 1",
                (filters.since - CLOCK_SLACK_S,),
            )
            where.raw("m.id >= ?", int(rows[0][0]) if rows else MAX_ROW_ID)
        if filters.until is not None:
            rows = await self._fetch(
                "SELECT id FROM outbound_messages WHERE created_at < ? "
                "ORDER BY created_at DESC, id DESC LIMIT 1",
                (filters.until + CLOCK_SLACK_S,),
            )
            where.raw("m.id <= ?", int(rows[0][0]) if rows else 0)

    async def _search_ids(self, q: str, limit: int = SEARCH_LIMIT) -> list[int]:
        """The newest `limit` ids the search matches."""
        search, params = _search_sql(q, limit)
        rows = await self._fetch(search, params)
        return sorted({int(r[0]) for r in rows}, reverse=True)[:limit]

    async def console_message(self, message_id: int) -> MessageItem | None:
        rows = await self._fetch(
            f"SELECT {_ITEM_COLUMNS} FROM outbound_messages m "
            "JOIN inbound_events e ON e.id = m.event_id WHERE m.id = ?",
            (message_id,),
        )
        return next((_item(r) for r in rows), None)

    async def console_message_body(self, message_id: int) -> tuple[int, bytes] | None:
        """(event id, body as sent) of a message."""
        rows = await self._fetch(
            "SELECT event_id, body FROM outbound_messages WHERE id = ?", (message_id,)
        )
        return next(((int(r[0]), bytes(r[1])) for r in rows), None)

    async def console_related(self, item: MessageItem, event_id: int) -> list[MessageItem]:
        """Messages of the same event, order or Polar payment (a refund and its purchase)."""
        where = sql.Where().raw("m.id != ?", item.id)
        either = ["event_id = ?"]
        params: list[Any] = [event_id]
        for column, value in (("order_id", item.order_id), ("payment_ref", item.payment_ref)):
            if value:
                either.append(f"{column} = ?")
                params.append(value)
        # The newest few ids from each index, then their rows (see console_messages): an
        # orderId shared by many messages costs RELATED_LIMIT of them, not all.
        branches = [
            f"SELECT id FROM (SELECT id FROM outbound_messages WHERE {term} "
            f"ORDER BY id DESC LIMIT {RELATED_LIMIT + 1}) AS r{n}"
            for n, term in enumerate(either)
        ]
        found = await self._fetch(" UNION ALL ".join(branches), params)
        ids = sorted({int(r[0]) for r in found} - {item.id}, reverse=True)
        where.one_of("m.id", ids[:RELATED_LIMIT] or [0])
        rows = await self._fetch(
            f"SELECT {_ITEM_COLUMNS} FROM outbound_messages m "
            f"JOIN inbound_events e ON e.id = m.event_id WHERE {where.sql} "
            f"ORDER BY m.id DESC LIMIT {RELATED_LIMIT}",
            where.params,
        )
        return [_item(r) for r in rows]

    async def console_event(self, event_id: int) -> Inbound | None:
        from relay.console.service import Inbound

        rows = await self._fetch(
            "SELECT id, source, webhook_id, event_type, received_at, status, reason, "
            "headers_json, body, request_id FROM inbound_events WHERE id = ?",
            (event_id,),
        )
        if not rows:
            return None
        r = rows[0]
        try:
            headers = json.loads(r[7])
        except ValueError:
            headers = {}
        pairs = tuple(
            sorted(
                (str(k), str(v)) for k, v in (headers.items() if isinstance(headers, dict) else ())
            )
        )
        body = None if r[8] is None else bytes(r[8]).decode("utf-8", errors="replace")
        return Inbound(int(r[0]), r[1], r[2], r[3], float(r[4]), r[5], r[6], pairs, body, r[9])

    async def console_attempts(self, message_id: int) -> list[Attempt]:
        from relay.console.service import Attempt

        rows = await self._fetch(
            "SELECT attempt, at, http_status, error_kind, duration_s, response_snippet, outcome "
            "FROM message_attempts WHERE message_id = ? ORDER BY id",
            (message_id,),
        )
        return [Attempt(int(r[0]), float(r[1]), r[2], r[3], float(r[4]), r[5], r[6]) for r in rows]

    async def console_count_dead(self, filters: ListFilters) -> int:
        """How many DEAD messages the filter matches (a bulk replay's confirmation)."""
        where = _console_where(_dead_only(filters))
        rows = await self._fetch(
            f"SELECT COUNT(*) FROM {_source(filters)} WHERE {where.sql}",
            where.params,
        )
        return int(rows[0][0])

    async def console_max_id(self) -> int:
        rows = await self._fetch("SELECT COALESCE(MAX(id), 0) FROM outbound_messages")
        return int(rows[0][0])

    async def console_dead_batch(
        self, filters: ListFilters, after_id: int, upper_id: int, limit: int
    ) -> list[int]:
        """Ids of the next DEAD messages the filter matches, by id (keyset, ascending)."""
        where = _console_where(_dead_only(filters)).raw(
            "m.id > ? AND m.id <= ?", after_id, upper_id
        )
        rows = await self._fetch(
            f"SELECT m.id FROM {_source(filters)} WHERE {where.sql} ORDER BY m.id LIMIT ?",
            (*where.params, limit),
        )
        return [int(r[0]) for r in rows]

    async def console_status_counts(
        self, destinations: Sequence[str]
    ) -> list[tuple[str, str, int, int, float | None]]:
        """(destination, status, count, retrying, oldest created_at) of every status but
        delivered, for these destinations: each count read from the (destination, status)
        index alone; retrying and the oldest only for the backlog (the delivered count is
        `console_delivered_count`, a longer read)."""
        out: list[tuple[str, str, int, int, float | None]] = []
        for destination in destinations:
            for status in ("dead", "discarded"):
                rows = await self._fetch(
                    "SELECT COUNT(*) FROM outbound_messages WHERE destination = ? AND status = ?",
                    (destination, status),
                )
                if int(rows[0][0]):
                    out.append((destination, status, int(rows[0][0]), 0, None))
            rows = await self._fetch(
                "SELECT status, COUNT(*), SUM(CASE WHEN attempts > 0 THEN 1 ELSE 0 END), "
                "MIN(created_at) FROM outbound_messages WHERE destination = ? "
                "AND status IN ('pending', 'inflight') GROUP BY status",
                (destination,),
            )
            out += [
                (destination, r[0], int(r[1]), int(r[2] or 0), None if r[3] is None else r[3])
                for r in rows
            ]
        return out

    async def console_waiting_destinations(self) -> list[str]:
        """Destinations with messages not delivered (a destination gone from the config may
        still have some): read from the (status, id) index, few rows."""
        rows = await self._fetch(
            "SELECT DISTINCT destination FROM outbound_messages "
            "WHERE status IN ('pending', 'inflight', 'dead')"
        )
        return sorted(r[0] for r in rows)

    async def console_delivered_count(self, destination: str) -> int:
        """Delivered messages of one destination (counted along the (destination, status)
        index: every delivered row is visited, so callers cache it)."""
        rows = await self._fetch(
            "SELECT COUNT(*) FROM outbound_messages WHERE destination = ? AND status = 'delivered'",
            (destination,),
        )
        return int(rows[0][0])

    async def console_activity(self) -> dict[str, tuple[float | None, str | None, float | None]]:
        """destination -> (last success at, last error, last error at)."""
        rows = await self._fetch(
            "SELECT destination, last_success_at, last_error, last_error_at "
            "FROM destination_activity"
        )
        return {r[0]: (r[1], r[2], r[3]) for r in rows}

    async def console_minutes(self, since: float) -> list[tuple[int, str, int]]:
        """(minute number since the epoch, outcome, attempts) since `since`."""
        minute = self._dialect.minute_of_at
        rows = await self._fetch(
            f"SELECT {minute} AS minute, outcome, COUNT(*) "
            "FROM message_attempts WHERE at >= ? GROUP BY 1, 2",
            (since,),
        )
        return [(int(r[0]), r[1], int(r[2])) for r in rows]

    async def console_revenue(self, since: float) -> list[tuple[str, str, int, int, int]]:
        """(event kind, currency, sum of amounts, count, unattributed count) of purchases and
        refunds delivered since `since`."""
        rows = await self._fetch(
            "SELECT event_kind, currency, SUM(amount_minor), COUNT(*), "
            "SUM(CASE WHEN attributed = 0 THEN 1 ELSE 0 END) FROM outbound_messages "
            "WHERE status = 'delivered' AND delivered_at >= ? "
            "AND event_kind IN ('purchase', 'refund') AND amount_minor IS NOT NULL "
            "GROUP BY event_kind, currency",
            (since,),
        )
        return [(r[0], r[1] or "other", int(r[2] or 0), int(r[3]), int(r[4] or 0)) for r in rows]

    async def console_at_risk(self, pending_before: float) -> list[tuple[str, str, int, int]]:
        """("dead" | "pending", currency, amount, count) of purchases not delivered: dead, or
        pending (inflight) since before `pending_before`, summed from the (status, kind,
        currency, amount, id) index of the messages not delivered alone."""
        dead = await self._fetch(AT_RISK_DEAD)
        waiting = await self._fetch(
            "SELECT currency, SUM(amount_minor), COUNT(*) FROM outbound_messages "
            f"WHERE status IN ('pending', 'inflight') AND {sql.NOT_DELIVERED} "
            "AND created_at < ? AND event_kind = 'purchase' AND amount_minor IS NOT NULL "
            "GROUP BY currency",
            (pending_before,),
        )
        return [
            (kind, r[0] or "other", int(r[1] or 0), int(r[2]))
            for kind, rows in (("dead", dead), ("pending", waiting))
            for r in rows
        ]

    # --- audit

    async def add_audit(
        self, actor: str, action: str, target: str, detail: str | None, count: int
    ) -> int:
        now = self._clock.now()
        rows = await self._writer.run(
            lambda db: _rows(
                db,
                "INSERT INTO console_audit (at, actor, action, target, detail, count) "
                "VALUES (?, ?, ?, ?, ?, ?) RETURNING id",
                (
                    now,
                    actor,
                    action,
                    target[:2000],
                    None if detail is None else detail[:2000],
                    count,
                ),
            )
        )
        return int(rows[0][0])

    async def audit_entries(self, limit: int, before_id: int | None) -> list[AuditEntry]:
        from relay.console.service import AuditEntry

        where = sql.Where()
        if before_id is not None:
            where.raw("id < ?", before_id)
        rows = await self._fetch(
            "SELECT id, at, actor, action, target, detail, count FROM console_audit "
            f"WHERE {where.sql} ORDER BY id DESC LIMIT ?",
            (*where.params, limit),
        )
        return [AuditEntry(int(r[0]), float(r[1]), r[2], r[3], r[4], r[5], int(r[6])) for r in rows]

    # --- bulk jobs

    async def create_job(
        self, kind: str, filter_query: str, actor: str, total: int, upper_id: int, owner: str
    ) -> int:
        now = self._clock.now()
        rows = await self._writer.run(
            lambda db: _rows(
                db,
                "INSERT INTO console_jobs (kind, filter_query, actor, status, total, done, "
                "last_id, upper_id, owner, heartbeat_at, created_at, updated_at) "
                "VALUES (?, ?, ?, 'running', ?, 0, 0, ?, ?, ?, ?, ?) RETURNING id",
                (kind, filter_query, actor, total, upper_id, owner, now, now, now),
            )
        )
        return int(rows[0][0])

    async def job_progress(self, job_id: int, done_more: int, last_id: int, owner: str) -> str:
        """Record a batch done (and a heartbeat); returns the job's status as stored, so a
        cancel from any relay's console stops the runner at its next batch."""
        now = self._clock.now()

        async def work(db: Connection) -> str:
            await db.execute(
                "UPDATE console_jobs SET done = done + ?, last_id = ?, heartbeat_at = ?, "
                "updated_at = ? WHERE id = ? AND owner = ?",
                (done_more, last_id, now, now, job_id, owner),
            )
            rows = await _rows(db, "SELECT status, owner FROM console_jobs WHERE id = ?", (job_id,))
            if not rows:
                return "cancelled"
            return str(rows[0][0]) if rows[0][1] == owner else "cancelled"

        return await self._writer.run(work)

    async def set_job_status(
        self,
        job_id: int,
        status: str,
        *,
        from_statuses: Sequence[str],
        owner: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a job to `status` if it is in one of `from_statuses` (and take it over when
        `owner` is given). False when it was not."""
        now = self._clock.now()
        marks = ",".join("?" * len(from_statuses))
        owner_sql = ", owner = ?, heartbeat_at = ?" if owner is not None else ""
        owner_params: tuple[Any, ...] = (owner, now) if owner is not None else ()
        count = await self._exec(
            f"UPDATE console_jobs SET status = ?, error = ?, updated_at = ?{owner_sql} "
            f"WHERE id = ? AND status IN ({marks})",
            (status, error, now, *owner_params, job_id, *from_statuses),
        )
        return count == 1

    async def console_jobs(self, limit: int) -> list[Job]:
        rows = await self._fetch(
            f"SELECT {_JOB_COLUMNS} FROM console_jobs ORDER BY id DESC LIMIT ?", (limit,)
        )
        return [_job(r, self._clock.now()) for r in rows]

    async def console_job(self, job_id: int) -> Job | None:
        rows = await self._fetch(f"SELECT {_JOB_COLUMNS} FROM console_jobs WHERE id = ?", (job_id,))
        return next((_job(r, self._clock.now()) for r in rows), None)

    async def job_position(self, job_id: int) -> tuple[int, int] | None:
        """(last id done, upper id) of a job: where a restart continues."""
        rows = await self._fetch(
            "SELECT last_id, upper_id FROM console_jobs WHERE id = ?", (job_id,)
        )
        return next(((int(r[0] or 0), int(r[1])) for r in rows), None)


# --- console helpers

# A job whose runner has not written for this long is shown as interrupted (its relay
# stopped); the runner writes after every batch, far more often.
JOB_STALE_S = 60.0

_ITEM_COLUMNS = (
    "m.id, m.status, m.destination, m.route, e.event_type, e.webhook_id, m.idempotency_key, "
    "m.order_id, m.payment_ref, m.refund_id, m.event_kind, m.amount_minor, m.currency, "
    "m.attempts, m.last_status, m.last_error, m.created_at, m.next_attempt_at, "
    "m.delivered_at, m.discarded_at, m.discard_reason"
)
_JOB_COLUMNS = (
    "id, kind, filter_query, actor, status, total, done, created_at, updated_at, owner, "
    "error, heartbeat_at"
)


def _item(r: Any) -> MessageItem:
    from relay.console.service import MessageItem

    status = MessageStatus(r[1])
    waiting = status in (MessageStatus.PENDING, MessageStatus.INFLIGHT)
    return MessageItem(
        id=int(r[0]),
        status=status,
        destination=r[2],
        route=r[3],
        event_type=r[4],
        webhook_id=r[5],
        idempotency_key=r[6],
        order_id=r[7],
        payment_ref=r[8],
        refund_id=r[9],
        event_kind=r[10],
        amount_minor=None if r[11] is None else int(r[11]),
        currency=r[12],
        attempts=int(r[13]),
        last_status=r[14],
        last_error=r[15],
        created_at=float(r[16]),
        next_attempt_at=float(r[17]) if waiting else None,
        delivered_at=r[18],
        discarded_at=r[19],
        discard_reason=r[20],
    )


def _job(r: Any, now: float) -> Job:
    from relay.console.service import Job, JobStatus

    status = JobStatus(r[4])
    if status is JobStatus.RUNNING and float(r[11]) < now - JOB_STALE_S:
        status = JobStatus.INTERRUPTED
    return Job(
        id=int(r[0]),
        kind=r[1],
        filter_query=r[2],
        actor=r[3],
        status=status,
        total=int(r[5]),
        done=int(r[6]),
        created_at=float(r[7]),
        updated_at=float(r[8]),
        owner=r[9],
        error=r[10],
    )


def _dead_only(filters: ListFilters) -> ListFilters:

    return dataclasses.replace(filters, statuses=(MessageStatus.DEAD,))


_STATUS_CLASS_SQL = {
    "2xx": "m.last_status BETWEEN 200 AND 299",
    "3xx": "m.last_status BETWEEN 300 AND 399",
    "4xx": "m.last_status BETWEEN 400 AND 499",
    "5xx": "m.last_status BETWEEN 500 AND 599",
    "error": "m.last_status IS NULL AND m.last_error IS NOT NULL",
    "none": "m.last_status IS NULL AND m.last_error IS NULL",
}


def _search_sql(q: str, limit: int | None = None) -> tuple[str, list[Any]]:
    """The ids whose search columns hold `q`, each column found by its own index; with
    `limit`, at most that many (the newest) from each column, so an id shared by a million
    rows costs a thousand."""
    terms = [
        "SELECT id FROM outbound_messages WHERE order_id = ?",
        "SELECT id FROM outbound_messages WHERE payment_ref = ?",
        "SELECT id FROM outbound_messages WHERE refund_id = ?",
        # Keys and webhook ids are unique per destination and per source: found on those
        # unique indexes, each destination (source) stored named (a second index on the bare
        # column would cost every insert a write: docs/performance.md).
        "SELECT id FROM outbound_messages WHERE idempotency_key = ? "
        f"AND destination IN ({sql.STORED_DESTINATIONS})",
        "SELECT id FROM outbound_messages WHERE event_id IN "
        "(SELECT id FROM inbound_events WHERE webhook_id = ? "
        f"AND source IN ({sql.STORED_SOURCES}))",
    ]
    params: list[Any] = [q] * len(terms)
    if q.isascii() and q.isdigit() and len(q) < 19:  # not "²", which int() refuses
        terms.append("SELECT id FROM outbound_messages WHERE id = ?")
        params.append(int(q))
    if limit is None:
        return " UNION ".join(terms), params
    limited = [
        f"SELECT id FROM ({term} ORDER BY id DESC LIMIT {int(limit)}) AS q{n}"
        for n, term in enumerate(terms)
    ]
    return " UNION ALL ".join(limited), params


def _source(f: ListFilters) -> str:
    """The FROM of a filtered selection: the events are joined only when a filter reads them
    (the event type); every other filter is on the message's own columns."""
    if f.event_type is not None:
        return "outbound_messages m JOIN inbound_events e ON e.id = m.event_id"
    return "outbound_messages m"


def _console_where(f: ListFilters, found: Sequence[int] | None = None) -> sql.Where:
    """`found`: the ids the search matched, when the caller looked them up first."""
    where = (
        sql.Where()
        .one_of("m.status", [s.value for s in f.statuses])
        .equals("m.destination", f.destination)
        .equals("m.route", f.route)
        .equals("e.event_type", f.event_type)
        .between("m.created_at", f.since, f.until)
    )
    if f.statuses and MessageStatus.DELIVERED not in f.statuses:
        where.raw(f"m.{sql.NOT_DELIVERED}")  # the amount index holds these (sql.py)
    if f.status_class is not None:
        where.raw(_STATUS_CLASS_SQL[f.status_class.value])
    if found is not None:
        where.one_of("m.id", found or [0])
    elif f.q:
        search, params = _search_sql(f.q)
        where.raw(f"m.id IN ({search})", *params)
    return where


async def _rows(db: Connection, statement: str, params: Sequence[Any]) -> list[Row]:
    """A statement's rows as a list (the writer's work functions take a connection)."""
    return list(await db.execute_fetchall(statement, params))
