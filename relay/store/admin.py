"""Operator queries on the outbox: listing, stats, retry, replay, pause, retention,
reprocess. Mixed into `Store`; writes go through its single writer like every other write.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import TYPE_CHECKING, Any

from relay.models import (
    Clock,
    DestinationStats,
    EnqueueResult,
    EventFilter,
    EventStatus,
    IngestOutcome,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    OutboundDraft,
    PruneResult,
    StoredEvent,
)
from relay.store.writer import Db, Writer, insert_messages

if TYPE_CHECKING:
    from relay.console.service import AuditEntry, Cursor, Job, ListFilters, MessageItem

_MESSAGE_COLUMNS = (
    "m.id, m.event_id, m.route, m.destination, m.idempotency_key, m.status, m.attempts, "
    "m.created_at, m.next_attempt_at, m.lease_until, m.last_status, m.last_error, "
    "m.delivered_at, m.updated_at, e.event_type, e.webhook_id, m.body, m.discarded_at, "
    "m.discard_reason"
)


class AdminQueries:
    """Needs, from the class it is mixed into, the members declared here."""

    _clock: Clock
    _writer: Writer

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def _exec(self, sql: str, params: Sequence[Any] = ()) -> int:
        raise NotImplementedError

    def _notify(self, destinations: set[str]) -> None:
        raise NotImplementedError

    async def _announce(self) -> None:
        """Tell every relay serving this outbox that an operator changed it."""
        raise NotImplementedError

    async def stats(self, destination: str) -> DestinationStats:
        rows = await self._fetch(
            "SELECT status, COUNT(*) FROM outbound_messages WHERE destination = ? GROUP BY status",
            (destination,),
        )
        counts = dict.fromkeys(MessageStatus, 0)
        counts.update({MessageStatus(r[0]): int(r[1]) for r in rows})
        oldest = await self._fetch(
            "SELECT MIN(created_at) FROM outbound_messages WHERE destination = ? "
            "AND status IN ('pending', 'inflight')",
            (destination,),
        )
        value = next(iter(oldest))[0]
        return DestinationStats(counts, None if value is None else float(value))

    async def list_messages(
        self,
        selection: MessageFilter | None = None,
        *,
        status: MessageStatus | None = None,
        destination: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]:
        if selection is None:
            selection = MessageFilter(
                statuses=(status,) if status is not None else (), destination=destination
            )
        clause, params = _message_where(selection)
        rows = await self._fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM outbound_messages m "
            f"JOIN inbound_events e ON e.id = m.event_id WHERE {clause} "
            "ORDER BY m.id DESC LIMIT ?",
            (*params, limit),
        )
        return [_record(r) for r in rows]

    async def replay(self, selection: MessageFilter, *, dry_run: bool = False) -> int:
        """Make the selected messages due now with a fresh retry budget, whatever their status
        (a delivered one is sent again with the same key and bytes: the receiver dedupes).
        Inflight messages are skipped: they are being sent right now. Discarded ones too: an
        operator decided they are never sent."""
        clause, params = _message_where(selection)
        selected = (
            f"SELECT m.id FROM outbound_messages m JOIN inbound_events e ON e.id = m.event_id "
            f"WHERE {clause} AND m.status NOT IN ('inflight', 'discarded')"
        )
        if dry_run:
            rows = await self._fetch(f"SELECT COUNT(*) FROM ({selected}) AS chosen", params)
            return int(rows[0][0])
        now = self._clock.now()
        count = await self._exec(
            "UPDATE outbound_messages SET status = 'pending', attempts = 0, next_attempt_at = ?, "
            f"retry_from_at = ?, delivered_at = NULL, updated_at = ? WHERE id IN ({selected})",
            (now, now, now, *params),
        )
        if count:
            self._notify(set())
            await self._announce()
        return count

    async def discard(self, selection: MessageFilter, reason: str) -> list[int]:
        """Give up on the selected DEAD messages (`relay outbox discard`): they become
        `discarded`, with `reason` and the time, and are never sent. Other statuses are left
        alone. Returns the ids discarded."""
        clause, params = _message_where(selection)
        now = self._clock.now()
        rows = await self._writer.run(
            lambda db: db.execute_fetchall(
                "UPDATE outbound_messages SET status = 'discarded', discarded_at = ?, "
                "discard_reason = ?, updated_at = ? WHERE status = 'dead' AND id IN "
                "(SELECT m.id FROM outbound_messages m JOIN inbound_events e "
                f"ON e.id = m.event_id WHERE {clause}) RETURNING id",
                (now, reason, now, *params),
            )
        )
        return sorted(int(r[0]) for r in rows)

    async def get_message(self, message_id: int) -> MessageRecord | None:
        rows = await self._fetch(
            f"SELECT {_MESSAGE_COLUMNS} FROM outbound_messages m "
            "JOIN inbound_events e ON e.id = m.event_id WHERE m.id = ?",
            (message_id,),
        )
        return next((_record(r) for r in rows), None)

    async def retry_messages(self, ids: Iterable[int] = (), *, all_dead: bool = False) -> int:
        """Operator retry: dead (or pending) messages become due now with a fresh budget.
        Delivered and inflight ones are left alone: resending those is never a retry."""
        if all_dead:
            return await self.replay(MessageFilter(statuses=(MessageStatus.DEAD,)))
        ids = tuple(ids)
        if not ids:
            return 0
        return await self.replay(
            MessageFilter(ids=ids, statuses=(MessageStatus.DEAD, MessageStatus.PENDING))
        )

    # ------------------------------------------------------------ pause, retention, reprocess

    async def destinations(self) -> list[str]:
        rows = await self._fetch("SELECT DISTINCT destination FROM outbound_messages")
        return [r[0] for r in rows]

    async def paused_overrides(self) -> dict[str, bool]:
        """Pause states set by `relay pause|resume`; they override the config's `paused`."""
        rows = await self._fetch("SELECT destination, paused FROM destination_state")
        return {r[0]: bool(r[1]) for r in rows}

    async def set_paused(self, destination: str, paused: bool) -> None:
        await self._exec(
            "INSERT INTO destination_state (destination, paused, updated_at) VALUES (?, ?, ?) "
            "ON CONFLICT (destination) DO UPDATE SET paused = excluded.paused, "
            "updated_at = excluded.updated_at",
            (destination, int(paused), self._clock.now()),
        )
        if not paused:
            self._notify({destination})
        await self._announce()

    async def prune(
        self, *, bodies_before: float, rows_before: float, batch: int = 1000
    ) -> PruneResult:
        """Retention, in short transactions (`batch` rows each) so ingest never waits long.
        An inbound event loses its raw body (customer PII) after `bodies_before` once none of
        its messages is pending, inflight or dead. Delivered messages, bodies included (replay
        and refund lookups need them), are deleted after `rows_before`, then events left with
        no messages. Dead messages and their events stay until an operator handles them.
        Idempotency keys live as long as the delivered row: past `rows_before`, a resend of
        that business key is no longer caught."""
        totals = [0, 0, 0]
        statements = (
            (
                "UPDATE inbound_events SET body = NULL WHERE id IN (SELECT e.id FROM "
                "inbound_events e WHERE e.received_at < ? AND e.body IS NOT NULL AND NOT EXISTS "
                "(SELECT 1 FROM outbound_messages m WHERE m.event_id = e.id "
                "AND m.status != 'delivered') LIMIT ?)",
                bodies_before,
            ),
            (
                "DELETE FROM outbound_messages WHERE id IN (SELECT id FROM outbound_messages "
                "WHERE status = 'delivered' AND delivered_at < ? LIMIT ?)",
                rows_before,
            ),
            (
                "DELETE FROM inbound_events WHERE id IN (SELECT e.id FROM inbound_events e "
                "WHERE e.received_at < ? AND NOT EXISTS (SELECT 1 FROM outbound_messages m "
                "WHERE m.event_id = e.id) LIMIT ?)",
                rows_before,
            ),
        )
        for i, (sql, before) in enumerate(statements):
            while True:
                count = await self._exec(sql, (before, batch))
                totals[i] += count
                if count < batch:
                    break
        return PruneResult(*totals)

    async def list_events(
        self, selection: EventFilter, limit: int = 10_000, *, newest_first: bool = False
    ) -> list[StoredEvent]:
        where = (
            _Where()
            .one_of("id", selection.ids)
            .one_of("status", [s.value for s in selection.statuses])
            .equals("source", selection.source)
            .equals("event_type", selection.event_type)
            .between("received_at", selection.since, selection.until)
        )
        rows = await self._fetch(
            "SELECT id, source, webhook_id, event_type, received_at, status, reason, body "
            f"FROM inbound_events WHERE {where.sql} "
            f"ORDER BY id {'DESC' if newest_first else ''} LIMIT ?",
            (*where.params, limit),
        )
        return [
            StoredEvent(
                int(r[0]),
                r[1],
                r[2],
                r[3],
                float(r[4]),
                EventStatus(r[5]),
                r[6],
                None if r[7] is None else bytes(r[7]),
            )
            for r in rows
        ]

    async def remap_event(
        self,
        event_id: int,
        status: EventStatus,
        reason: str | None,
        messages: Sequence[OutboundDraft],
    ) -> EnqueueResult:
        """Store a new mapping of an already stored event (`relay reprocess`): its new
        messages are inserted unless their idempotency key exists (so nothing delivered is
        sent again), and the event's status and reason are updated, in one transaction."""
        now = self._clock.now()

        async def work(db: Db) -> EnqueueResult:
            inserted = await insert_messages(db, [(event_id, m, None) for m in messages], now)
            ids, duplicates = [], []
            for m in messages:
                message_id = inserted.pop((m.destination, m.idempotency_key), None)
                if message_id is None:
                    duplicates.append(m.idempotency_key)
                else:
                    ids.append(message_id)
            final_status, final_reason = status, reason
            if status is EventStatus.ROUTED and messages and not ids:
                final_status = EventStatus.DUPLICATE
                final_reason = "every message already existed"
            await db.execute(
                "UPDATE inbound_events SET status = ?, reason = ? WHERE id = ?",
                (final_status.value, final_reason, event_id),
            )
            outcome = IngestOutcome.ACCEPTED if ids else IngestOutcome.DUPLICATE
            return EnqueueResult(outcome, event_id, tuple(ids), tuple(duplicates))

        result = await self._writer.run(work)
        if result.message_ids:
            self._notify({m.destination for m in messages})
            await self._announce()
        return result

    # ------------------------------------------------------------ console

    async def console_messages(
        self, filters: ListFilters, cursor: Cursor | None, limit: int
    ) -> list[MessageItem]:
        return []

    async def console_count_dead(self, filters: ListFilters) -> int:
        return 0

    async def audit_entries(self, limit: int, before_id: int | None) -> list[AuditEntry]:
        return []

    async def console_jobs(self, limit: int) -> list[Job]:
        return []

    async def console_job(self, job_id: int) -> Job | None:
        return None

    async def event_count(self) -> int:
        rows = await self._fetch("SELECT COUNT(*) FROM inbound_events")
        return int(rows[0][0])


class _Where:
    """A WHERE clause built from optional filters: only "?" placeholders, values bound."""

    def __init__(self) -> None:
        self._parts: list[str] = ["1 = 1"]
        self.params: list[Any] = []

    @property
    def sql(self) -> str:
        return " AND ".join(self._parts)

    def one_of(self, column: str, values: Sequence[Any]) -> _Where:
        if values:
            self._parts.append(f"{column} IN ({','.join('?' * len(values))})")
            self.params += list(values)
        return self

    def equals(self, column: str, value: Any) -> _Where:
        if value is not None:
            self._parts.append(f"{column} = ?")
            self.params.append(value)
        return self

    def between(self, column: str, since: float | None, until: float | None) -> _Where:
        """since <= column < until, each bound only when given."""
        if since is not None:
            self._parts.append(f"{column} >= ?")
            self.params.append(since)
        if until is not None:
            self._parts.append(f"{column} < ?")
            self.params.append(until)
        return self


def _message_where(f: MessageFilter) -> tuple[str, list[Any]]:
    where = (
        _Where()
        .one_of("m.id", f.ids)
        .one_of("m.status", [s.value for s in f.statuses])
        .equals("m.destination", f.destination)
        .equals("e.event_type", f.event_type)
        .between("m.created_at", f.since, f.until)
    )
    return where.sql, where.params


def _record(r: Any) -> MessageRecord:
    return MessageRecord(
        id=int(r[0]),
        event_id=int(r[1]),
        route=r[2],
        destination=r[3],
        idempotency_key=r[4],
        status=MessageStatus(r[5]),
        attempts=int(r[6]),
        created_at=float(r[7]),
        next_attempt_at=float(r[8]),
        lease_until=r[9],
        last_status=r[10],
        last_error=r[11],
        delivered_at=r[12],
        updated_at=float(r[13]),
        event_type=r[14],
        webhook_id=r[15],
        body=bytes(r[16]),
        discarded_at=r[17],
        discard_reason=r[18],
    )
