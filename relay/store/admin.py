"""Operator queries on the outbox: listing, stats, retry, replay, discard, pause, retention,
reprocess. The half of `Outbox` (relay/store/outbox.py) that operator commands and the console
use; writes go through its single writer like every other write.
"""

from __future__ import annotations

import functools
import json
from collections.abc import Iterable, Sequence

from relay.models import (
    BodyFacts,
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
from relay.store import rows, sql
from relay.store.connection import Connection
from relay.store.queries import Queries
from relay.store.writes import fill_facts, insert_messages


class AdminQueries(Queries):
    """Needs, from the class it is mixed into, the members declared here and in `Queries`."""

    def _notify(self, destinations: set[str]) -> None:
        raise NotImplementedError

    async def _announce(self) -> None:
        """Tell every relay serving this outbox that an operator changed it."""
        raise NotImplementedError

    async def stats(self, destination: str) -> DestinationStats:
        found = await self._fetch(sql.COUNT_BY_STATUS, (destination,))
        counts = dict.fromkeys(MessageStatus, 0)
        counts.update({MessageStatus(r[0]): int(r[1]) for r in found})
        oldest = await self._fetch(sql.OLDEST_UNDELIVERED, (destination,))
        value = oldest[0][0]
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
        where = _message_where(selection)
        found = await self._fetch(sql.list_messages(where.sql), (*where.params, limit))
        return [rows.message(r) for r in found]

    async def replay(self, selection: MessageFilter, *, dry_run: bool = False) -> int:
        """Make the selected messages due now with a fresh retry budget, whatever their status
        (a delivered one is sent again with the same key and bytes: the receiver dedupes).
        Inflight messages are skipped: they are being sent right now. Discarded ones too: an
        operator decided they are never sent."""
        where = _message_where(selection)
        selected = sql.replayable(where.sql)
        if dry_run:
            found = await self._fetch(sql.count_of(selected), where.params)
            return int(found[0][0])
        now = self._clock.now()
        count = await self._exec(sql.replay(selected), (now, now, now, *where.params))
        if count:
            self._notify(set())
            await self._announce()
        return count

    async def discard(self, selection: MessageFilter, reason: str) -> list[int]:
        """Give up on the selected DEAD messages (`relay outbox discard`): they become
        `discarded`, with `reason` and the time, and are never sent. Other statuses are left
        alone. Returns the ids discarded."""
        where = _message_where(selection)
        now = self._clock.now()
        found = await self._writer.run(
            lambda db: db.execute_fetchall(
                sql.discard(where.sql), (now, reason, now, *where.params)
            )
        )
        return sorted(int(r[0]) for r in found)

    async def get_message(self, message_id: int) -> MessageRecord | None:
        found = await self._fetch(sql.GET_MESSAGE, (message_id,))
        return next((rows.message(r) for r in found), None)

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
        return [r[0] for r in await self._fetch(sql.STORED_DESTINATIONS)]

    async def paused_overrides(self) -> dict[str, bool]:
        """Pause states set by `relay pause|resume`; they override the config's `paused`."""
        return {r[0]: bool(r[1]) for r in await self._fetch(sql.PAUSED_OVERRIDES)}

    async def set_paused(self, destination: str, paused: bool) -> None:
        await self._exec(sql.SET_PAUSED, (destination, int(paused), self._clock.now()))
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
        befores = (bodies_before, rows_before, rows_before)
        for i, (statement, before) in enumerate(zip(sql.PRUNE, befores, strict=True)):
            while True:
                if i == 1:
                    count = await self._prune_messages(statement, before, batch)
                else:
                    count = await self._exec(statement, (before, batch))
                totals[i] += count
                if count < batch:
                    break
        return PruneResult(*totals)

    async def backfill_facts(self, batch: int = 1000) -> int:
        """Fill the search and revenue columns (relay/models.py BodyFacts) of messages stored
        before those columns existed, `batch` rows per transaction so that ingest never waits
        long; returns how many messages were filled. A body that is not a JSON object keeps
        them empty, as at ingest."""
        filled_total, after = 0, 0
        while True:
            rows = await self._fetch(sql.SELECT_FACTLESS, (after, batch))
            if not rows:
                return filled_total
            after = int(rows[-1][0])
            filled = []
            for row in rows:
                try:
                    facts = BodyFacts.of(json.loads(bytes(row[1])))
                except (ValueError, RecursionError):
                    facts = None
                if facts is not None:
                    filled.append((int(row[0]), facts))
            if filled:
                await self._writer.run(functools.partial(fill_facts, filled=filled))
            filled_total += len(filled)

    async def _prune_messages(self, select_ids: str, before: float, batch: int) -> int:
        """One batch of delivered messages past retention, with their recorded attempts, in
        one transaction."""

        async def work(db: Connection) -> int:
            ids = [int(r[0]) for r in await db.execute_fetchall(select_ids, (before, batch))]
            if ids:
                await db.execute(sql.delete_attempts_of(len(ids)), ids)
                await db.execute(sql.delete_messages(len(ids)), ids)
            return len(ids)

        return await self._writer.run(work)

    async def list_events(
        self, selection: EventFilter, limit: int = 10_000, *, newest_first: bool = False
    ) -> list[StoredEvent]:
        where = (
            sql.Where()
            .one_of("id", selection.ids)
            .one_of("status", [s.value for s in selection.statuses])
            .equals("source", selection.source)
            .equals("event_type", selection.event_type)
            .between("received_at", selection.since, selection.until)
        )
        found = await self._fetch(sql.list_events(where.sql, newest_first), (*where.params, limit))
        return [rows.event(r) for r in found]

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

        async def work(db: Connection) -> EnqueueResult:
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
            await db.execute(sql.UPDATE_EVENT_STATUS, (final_status.value, final_reason, event_id))
            outcome = IngestOutcome.ACCEPTED if ids else IngestOutcome.DUPLICATE
            return EnqueueResult(outcome, event_id, tuple(ids), tuple(duplicates))

        result = await self._writer.run(work)
        if result.message_ids:
            self._notify({m.destination for m in messages})
            await self._announce()
        return result

    async def event_count(self) -> int:
        found = await self._fetch(sql.EVENT_COUNT)
        return int(found[0][0])


def _message_where(f: MessageFilter) -> sql.Where:
    return (
        sql.Where()
        .one_of("m.id", f.ids)
        .one_of("m.status", [s.value for s in f.statuses])
        .equals("m.destination", f.destination)
        .equals("e.event_type", f.event_type)
        .between("m.created_at", f.since, f.until)
    )
