"""One contract, two backends: the outbox behaves the same on SQLite and on PostgreSQL.

Every test runs twice through `store_location`: on a SQLite file in tmp_path and on a fresh
PostgreSQL database (tests/pg.py; skipped with the reason when no server is available). The
stores are opened with `relay.store.open_store` exactly as the relay opens them (serve=True,
the daemon) or as operator commands do (serve=False), and only the public `Store` API is used:
what a test shows here, both backends guarantee. Message and event ids are compared with the
ids the store returned, never with literals (PostgreSQL's sequences may skip numbers).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import sys
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager as AsyncContextManager
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay.console.service import ListFilters
from relay.errors import StorageUnavailable
from relay.models import (
    ClaimedMessage,
    Dead,
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
from relay.store import BatchStats, Store, open_store
from relay.store import migrations as sqlite_migrations
from relay.store.postgres import migrations as postgres_migrations
from tests.helpers import REPO, FakeClock, wait_until
from tests.store_helpers import (
    DEST,
    LEASE_S,
    OTHER,
    T0,
    claim_one,
    draft,
    keys,
    message,
    record,
    retry_at,
    seed,
)

Location = tuple[str, str]  # (backend, what open_store takes)


# ------------------------------------------------------------------ the two backends


@pytest.fixture(params=["sqlite", "postgres"])
def empty_location(request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    """("sqlite", a file in tmp_path) or ("postgres", the URL of a fresh database): nothing
    there yet, so the store creates and migrates it."""
    if request.param == "sqlite":
        return ("sqlite", str(tmp_path / "relay.db"))
    return ("postgres", str(request.getfixturevalue("pg_url")))


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: pytest.FixtureRequest) -> Location:
    """("sqlite", a file in tmp_path) or ("postgres", the URL of a database of its own), both
    migrated already and without rows: creating and migrating one is
    test_a_new_outbox_opens_at_the_latest_schema_and_reopens_unchanged's."""
    if request.param == "sqlite":
        return ("sqlite", str(request.getfixturevalue("migrated_db_path")))
    return ("postgres", str(request.getfixturevalue("migrated_pg_url")))


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def store(store_location: Location, clock: FakeClock) -> AsyncIterator[Store]:
    """The daemon's side: a serving store (group-commit writer)."""
    opened = await open_store(store_location[1], clock=clock, serve=True)
    try:
        yield opened
    finally:
        await opened.close()


@contextlib.asynccontextmanager
async def opened(location: Location, clock: FakeClock, *, serve: bool) -> AsyncIterator[Store]:
    store = await open_store(location[1], clock=clock, serve=serve)
    try:
        yield store
    finally:
        await store.close()


def operator_store(location: Location, clock: FakeClock) -> AsyncContextManager[Store]:
    """The operator's side: a store opened without serving, as `relay outbox ...` opens it.
    It reads through connections of its own: what it shows is committed."""
    return opened(location, clock, serve=False)


# ------------------------------------------------------------------ helpers


def latest_schema(location: Location) -> int:
    found = sqlite_migrations() if location[0] == "sqlite" else postgres_migrations()
    return max(version for version, _ in found)


# ------------------------------------------------------------------ schema


async def test_a_new_outbox_opens_at_the_latest_schema_and_reopens_unchanged(
    empty_location: Location, clock: FakeClock
) -> None:
    """An empty database is migrated to its backend's latest schema; reopening (serving or
    not) applies nothing again and keeps every row."""
    async with opened(empty_location, clock, serve=True) as store:
        assert await store.schema_version() == latest_schema(empty_location)
        [message_id] = await seed(store, "k1")

    for serve in (True, False):
        async with opened(empty_location, clock, serve=serve) as reopened:
            assert await reopened.schema_version() == latest_schema(empty_location)
            assert (await record(reopened, message_id)).idempotency_key == "k1"
            assert await reopened.event_count() == 1


# ------------------------------------------------------------------ enqueue


async def test_an_event_and_its_messages_commit_together(
    store: Store, store_location: Location, clock: FakeClock
) -> None:
    """enqueue returns once the event and all its messages are committed, as pending, and
    reports the destinations that got something to deliver."""
    committed: list[set[str]] = []
    store.on_commit = committed.append
    item = draft("wh_1", message("k1"), message("k1", destination=OTHER))

    result = await store.enqueue(item)

    assert result.outcome is IngestOutcome.ACCEPTED
    assert result.event_id is not None
    assert len(result.message_ids) == 2
    assert result.duplicate_keys == ()
    assert {DEST, OTHER} in committed
    assert set().union(*committed) == {DEST, OTHER}  # no other destination is woken
    async with operator_store(store_location, clock) as other:
        [event] = await other.list_events(EventFilter())
        assert (event.id, event.source, event.webhook_id, event.event_type) == (
            result.event_id,
            "polar",
            "wh_1",
            "order.paid",
        )
        assert (event.status, event.body, event.received_at) == (EventStatus.ROUTED, item.body, T0)
        rows = [await record(other, i) for i in result.message_ids]
    assert [
        (r.event_id, r.destination, r.idempotency_key, r.body, r.status, r.attempts) for r in rows
    ] == [
        (result.event_id, m.destination, m.idempotency_key, m.body, MessageStatus.PENDING, 0)
        for m in item.messages
    ]
    assert {(r.created_at, r.next_attempt_at, r.lease_until) for r in rows} == {(T0, T0, None)}


async def test_a_repeated_webhook_id_is_a_duplicate_per_source(store: Store) -> None:
    """The same webhook-id from the same source is DUPLICATE and stores nothing; from another
    source it is a new event."""
    first = await store.enqueue(draft("wh_1", message("k1")))
    again = await store.enqueue(draft("wh_1", message("k2")))
    other_source = await store.enqueue(draft("wh_1", message("k3"), source="polar-sandbox"))

    assert first.outcome is IngestOutcome.ACCEPTED
    assert (again.outcome, again.event_id, again.message_ids) == (IngestOutcome.DUPLICATE, None, ())
    assert other_source.outcome is IngestOutcome.ACCEPTED
    assert len(other_source.message_ids) == 1
    assert await store.event_count() == 2
    assert await keys(store) == ["k1", "k3"]


async def test_a_key_already_enqueued_for_the_destination_marks_the_event_duplicate(
    store: Store,
) -> None:
    """Another event mapping to an existing key of the same destination is recorded as
    'duplicate', adds no message and never rewrites the first body."""
    first = await store.enqueue(draft("wh_1", message("order-1")))
    second = await store.enqueue(draft("wh_2", message("order-1", body=b'{"other": true}')))

    assert second.outcome is IngestOutcome.DUPLICATE
    assert second.event_id is not None
    assert (second.message_ids, second.duplicate_keys) == ((), ("order-1",))
    events = await store.list_events(EventFilter())
    assert [(e.id, e.status) for e in events] == [
        (first.event_id, EventStatus.ROUTED),
        (second.event_id, EventStatus.DUPLICATE),
    ]
    assert events[1].reason == "every message was already enqueued by an earlier event"
    [only] = await store.list_messages()
    assert (only.event_id, only.body) == (first.event_id, b'{"orderId": "order-1"}')


async def test_the_same_key_is_new_for_another_destination_and_partly_new_events_route(
    store: Store,
) -> None:
    """The idempotency key is unique per destination only; an event whose keys are partly
    known enqueues the new ones and stays 'routed'."""
    await store.enqueue(draft("wh_1", message("order-1")))
    elsewhere = await store.enqueue(draft("wh_2", message("order-1", destination=OTHER)))
    mixed = await store.enqueue(draft("wh_3", message("order-1"), message("order-2")))

    assert elsewhere.outcome is IngestOutcome.ACCEPTED
    assert len(elsewhere.message_ids) == 1
    assert mixed.outcome is IngestOutcome.ACCEPTED
    assert (len(mixed.message_ids), mixed.duplicate_keys) == (1, ("order-1",))
    assert [e.status for e in await store.list_events(EventFilter())] == [EventStatus.ROUTED] * 3
    rows = reversed(await store.list_messages())
    assert [(r.destination, r.idempotency_key) for r in rows] == [
        (DEST, "order-1"),
        (OTHER, "order-1"),
        (DEST, "order-2"),
    ]


async def test_an_ignored_event_is_stored_without_messages(store: Store) -> None:
    """An IGNORED draft keeps the event with its reason, enqueues nothing, wakes nobody."""
    committed: list[set[str]] = []
    store.on_commit = committed.append

    result = await store.enqueue(
        draft("wh_1", status=EventStatus.IGNORED, reason="no route selects checkout.created")
    )

    assert (result.outcome, result.message_ids) == (IngestOutcome.IGNORED, ())
    [event] = await store.list_events(EventFilter())
    assert (event.id, event.status, event.reason) == (
        result.event_id,
        EventStatus.IGNORED,
        "no route selects checkout.created",
    )
    assert await store.list_messages() == []
    assert committed == []


async def test_100_concurrent_enqueues_all_commit_sharing_transactions(store: Store) -> None:
    """100 concurrent enqueues all commit, each message once, in fewer commits than calls."""
    batches: list[BatchStats] = []
    store.on_batch = batches.append

    results = await asyncio.gather(
        *(store.enqueue(draft(f"wh_{n}", message(f"order-{n}"))) for n in range(100))
    )

    assert [r.outcome for r in results] == [IngestOutcome.ACCEPTED] * 100
    assert len({i for r in results for i in r.message_ids}) == 100
    assert sum(b.size for b in batches) == 100
    assert all(b.ok for b in batches)
    assert len(batches) < 100
    assert await store.event_count() == 100
    assert sorted(await keys(store, MessageStatus.PENDING)) == sorted(
        f"order-{n}" for n in range(100)
    )


async def test_concurrent_duplicates_are_decided_once(store: Store) -> None:
    """Each webhook-id sent twice at once, and two events for one key at once: exactly one of
    each pair wins, the other is a duplicate."""
    results = await asyncio.gather(
        *(store.enqueue(draft(f"wh_{n % 20}", message(f"order-{n % 20}"))) for n in range(40)),
        store.enqueue(draft("wh_a", message("shared"))),
        store.enqueue(draft("wh_b", message("shared"))),
    )

    outcomes = [r.outcome for r in results]
    assert outcomes.count(IngestOutcome.ACCEPTED) == 21
    assert outcomes.count(IngestOutcome.DUPLICATE) == 21
    assert sorted(await keys(store)) == sorted([f"order-{n}" for n in range(20)] + ["shared"])
    statuses = {e.webhook_id: e.status for e in await store.list_events(EventFilter())}
    assert len(statuses) == 22
    assert sorted([statuses["wh_a"], statuses["wh_b"]]) == [
        EventStatus.DUPLICATE,
        EventStatus.ROUTED,
    ]


async def test_enqueue_now_commits_several_events_at_once(
    store_location: Location, clock: FakeClock
) -> None:
    """An operator's enqueue_now commits several events (and decides their duplicates) in
    one transaction of its own, without a serving writer."""
    async with operator_store(store_location, clock) as store:
        results = await store.enqueue_now(
            [draft("wh_1", message("k1")), draft("wh_2", message("k2")), draft("wh_1")]
        )
        assert [r.outcome for r in results] == [
            IngestOutcome.ACCEPTED,
            IngestOutcome.ACCEPTED,
            IngestOutcome.DUPLICATE,
        ]
        assert await keys(store) == ["k1", "k2"]


async def test_a_failing_webhook_in_a_batch_fails_alone_and_leaves_nothing(store: Store) -> None:
    """When the database rejects one webhook's message row, the shared batch is rolled back
    and each webhook retried alone: the good one commits, the bad one fails leaving nothing,
    and the writer takes the next batch."""
    batches: list[BatchStats] = []
    store.on_batch = batches.append
    # A NULL body violates outbound_messages.body NOT NULL, after the event row was inserted.
    broken = OutboundDraft(route="order_paid", destination=DEST, idempotency_key="k", body=None)  # type: ignore[arg-type]

    good, bad = await asyncio.gather(
        store.enqueue(draft("wh_1", message("order-1"))),
        store.enqueue(draft("wh_2", broken)),
        return_exceptions=True,
    )

    assert isinstance(good, EnqueueResult)
    assert good.outcome is IngestOutcome.ACCEPTED
    assert isinstance(bad, StorageUnavailable)
    assert store.last_write_error is not None
    assert "null" in store.last_write_error.lower()
    assert [(b.size, b.ok) for b in batches] == [(2, False), (1, True), (1, False)]
    assert [e.webhook_id for e in await store.list_events(EventFilter())] == ["wh_1"]
    assert await keys(store) == ["order-1"]
    await store.probe()  # the database is writable: the probe proves it and clears the error
    assert store.last_write_error is None
    assert (await store.enqueue(draft("wh_3", message("order-3")))).outcome is (
        IngestOutcome.ACCEPTED
    )
    assert [(b.size, b.ok) for b in batches][3:] == [(1, True)]


# ------------------------------------------------------------------ claims


async def test_claim_leases_only_due_pending_messages(store: Store, clock: FakeClock) -> None:
    """claim leases due pending messages of its destination (attempt + 1, one token per
    claim); a message scheduled later is due at its exact instant."""
    first, second, third = await seed(store, "k1", "k2", "k3")
    await seed(store, "k1", destination=OTHER)
    later = await claim_one(store)
    assert later.id == first
    assert await store.mark_retry(later, retry_at(T0 + 60), "HTTP 500")

    claimed = await store.claim(DEST, 10, LEASE_S)

    assert [(m.id, m.idempotency_key, m.attempt) for m in claimed] == [
        (second, "k2", 1),
        (third, "k3", 1),
    ]
    assert len({m.lease_token for m in claimed}) == 1
    for m in claimed:
        row = await record(store, m.id)
        assert (row.status, row.attempts, row.lease_until) == (
            MessageStatus.INFLIGHT,
            1,
            T0 + LEASE_S,
        )
    assert await store.claim(DEST, 10, LEASE_S) == []  # leased ones are not due
    assert await store.next_due_at(DEST) == T0 + 60
    clock.advance(59.5)
    assert await store.claim(DEST, 10, LEASE_S) == []
    clock.advance(0.5)
    [again] = await store.claim(DEST, 10, LEASE_S)
    assert (again.id, again.attempt, again.body) == (first, 2, b'{"orderId": "k1"}')
    assert await store.next_due_at(DEST) is None


async def test_claim_respects_the_limit_and_takes_the_earliest_due_first(
    store: Store, clock: FakeClock
) -> None:
    """claim orders by next_attempt_at, then id, and never returns more than the limit."""
    clock.t = T0 + 100
    [late] = await seed(store, "late")
    clock.t = T0
    early_a, early_b = await seed(store, "early-a", "early-b")
    clock.t = T0 + 200

    assert [m.id for m in await store.claim(DEST, 2, LEASE_S)] == [early_a, early_b]
    assert [m.id for m in await store.claim(DEST, 2, LEASE_S)] == [late]
    assert await store.claim(DEST, 2, LEASE_S) == []


async def test_concurrent_claims_never_share_a_message(
    store: Store, store_location: Location, clock: FakeClock
) -> None:
    """Many concurrent claims, from the serving store and an operator's connection, split the
    due messages without overlap and take every one of them."""
    ids = await seed(store, *(f"k{n}" for n in range(40)))
    async with operator_store(store_location, clock) as other:
        claims = await asyncio.gather(
            *(store.claim(DEST, 3, LEASE_S) for _ in range(10)),
            *(other.claim(DEST, 3, LEASE_S) for _ in range(10)),
        )

    claimed = [m.id for batch in claims for m in batch]
    assert len(claimed) == len(set(claimed)) == 40
    assert sorted(claimed) == sorted(ids)
    taken = [batch for batch in claims if batch]
    assert len({batch[0].lease_token for batch in taken}) == len(taken)  # one token a claim
    assert (await store.stats(DEST)).counts[MessageStatus.INFLIGHT] == 40


# ------------------------------------------------------------------ settling a claim


async def test_mark_delivered_records_the_answer_once(store: Store, clock: FakeClock) -> None:
    """A delivered message keeps its time and HTTP status, loses its lease, is never claimed
    again, and a second ack of the same claim changes nothing."""
    await seed(store, "k1")
    msg = await claim_one(store)
    clock.advance(2)

    assert await store.mark_delivered(msg, 201)

    row = await record(store, msg.id)
    assert (row.status, row.delivered_at, row.last_status, row.last_error) == (
        MessageStatus.DELIVERED,
        T0 + 2,
        201,
        None,
    )
    assert (row.lease_until, row.attempts, row.updated_at) == (None, 1, T0 + 2)
    assert not await store.mark_delivered(msg, 200)
    assert await record(store, msg.id) == row
    clock.advance(3600)
    assert await store.claim(DEST, 10, LEASE_S) == []


async def test_mark_retry_schedules_the_next_attempt(store: Store) -> None:
    """A retry goes back to pending at its time with the last answer; the attempt counts."""
    await seed(store, "k1")
    msg = await claim_one(store)

    assert await store.mark_retry(msg, retry_at(T0 + 30, status=502), "HTTP 502: bad gateway")

    row = await record(store, msg.id)
    assert (row.status, row.next_attempt_at, row.attempts, row.lease_until) == (
        MessageStatus.PENDING,
        T0 + 30,
        1,
        None,
    )
    assert (row.last_status, row.last_error) == (502, "HTTP 502: bad gateway")


async def test_a_throttled_retry_gives_the_attempt_back(store: Store) -> None:
    """mark_retry with counts_attempt=False (429/503 with Retry-After) refunds the attempt;
    a retry without an HTTP status (a timeout) records none."""
    await seed(store, "k1", "k2")
    throttled, timed_out = await store.claim(DEST, 2, LEASE_S)

    assert await store.mark_retry(
        throttled, retry_at(T0 + 120, counts_attempt=False, status=429), "HTTP 429"
    )
    assert await store.mark_retry(timed_out, retry_at(T0 + 5, status=None), "timeout")

    row = await record(store, throttled.id)
    assert (row.status, row.attempts, row.next_attempt_at, row.last_status) == (
        MessageStatus.PENDING,
        0,
        T0 + 120,
        429,
    )
    row = await record(store, timed_out.id)
    assert (row.attempts, row.last_status, row.last_error) == (1, None, "timeout")


async def test_mark_dead_stops_delivery_for_good(store: Store, clock: FakeClock) -> None:
    """A dead-lettered message records why and is never claimed again."""
    await seed(store, "k1")
    msg = await claim_one(store)

    assert await store.mark_dead(msg, Dead("client_error", 422), "client_error; HTTP 422")

    row = await record(store, msg.id)
    assert (row.status, row.last_status, row.last_error, row.lease_until) == (
        MessageStatus.DEAD,
        422,
        "client_error; HTTP 422",
        None,
    )
    clock.advance(86_400)
    assert await store.claim(DEST, 10, LEASE_S) == []


async def test_an_ack_with_a_stale_lease_token_changes_nothing(
    store: Store, clock: FakeClock
) -> None:
    """Once a lease expired and the message was claimed again, every ack with the old token is
    a no-op; the live lease still settles it, exactly once."""
    await seed(store, "k1")
    stale = await claim_one(store)
    clock.advance(LEASE_S + 1)
    assert await store.requeue_inflight(expired_only=True) == 1
    current = await claim_one(store)
    assert (current.id, current.attempt) == (stale.id, 2)
    assert current.lease_token != stale.lease_token
    before = await record(store, stale.id)

    assert not await store.mark_delivered(stale, 200)
    assert not await store.mark_retry(stale, retry_at(T0 + 999), "late")
    assert not await store.mark_dead(stale, Dead("client_error", 400), "late")
    assert not await store.release(stale)

    assert await record(store, stale.id) == before
    assert before.status is MessageStatus.INFLIGHT
    assert await store.mark_delivered(current, 200)
    assert not await store.mark_delivered(current, 200)


async def test_release_hands_the_message_back_untried(store: Store, clock: FakeClock) -> None:
    """release makes a claimed message pending and due now, with its attempt given back."""
    await seed(store, "k1")
    msg = await claim_one(store)
    clock.advance(5)

    assert await store.release(msg)

    row = await record(store, msg.id)
    assert (row.status, row.next_attempt_at, row.attempts, row.lease_until) == (
        MessageStatus.PENDING,
        T0 + 5,
        0,
        None,
    )
    assert (await claim_one(store)).attempt == 1


# ------------------------------------------------------------------ leases


async def test_requeue_expired_only_touches_leases_that_ran_out(
    store: Store, clock: FakeClock
) -> None:
    """requeue_inflight(expired_only=True) frees leases past their end only (due at once);
    expired_only=False frees every lease."""
    short_id, long_id = await seed(store, "short", "long")
    [short] = await store.claim(DEST, 1, 10)
    [long] = await store.claim(DEST, 1, 100)
    assert (short.id, long.id) == (short_id, long_id)

    clock.advance(10)
    assert await store.requeue_inflight(expired_only=True) == 0  # lease_until == now: held
    clock.advance(1)
    assert await store.requeue_inflight(expired_only=True) == 1

    row = await record(store, short_id)
    assert (row.status, row.lease_until, row.next_attempt_at) == (MessageStatus.PENDING, None, T0)
    assert (await record(store, long_id)).status is MessageStatus.INFLIGHT
    assert (await claim_one(store)).id == short_id

    assert await store.requeue_inflight(expired_only=False) == 2
    assert (await store.stats(DEST)).counts[MessageStatus.PENDING] == 2


# ------------------------------------------------------------------ operator commands


@dataclass(frozen=True)
class OperatorScene:
    """Message ids of an outbox an operator acts on: two dead (HTTP 400), one delivered, one
    inflight (its claim kept), and one pending when asked for."""

    dead: int
    other_dead: int
    delivered: int
    inflight: ClaimedMessage
    pending: int | None


async def operator_scene(store: Store, *, pending: bool = False) -> OperatorScene:
    settled = ["dead", "other-dead", "delivered", "inflight"]
    seeded = [*settled, "pending"] if pending else settled
    ids = dict(zip(seeded, await seed(store, *seeded), strict=True))
    claimed = {m.idempotency_key: m for m in await store.claim(DEST, len(settled), LEASE_S)}
    assert sorted(claimed) == sorted(settled)
    for key in ("dead", "other-dead"):
        assert await store.mark_dead(claimed[key], Dead("client_error", 400), "HTTP 400")
    assert await store.mark_delivered(claimed["delivered"], 200)
    return OperatorScene(
        ids["dead"], ids["other-dead"], ids["delivered"], claimed["inflight"], ids.get("pending")
    )


async def test_retry_messages_revives_dead_ones_with_a_fresh_budget(
    store: Store, store_location: Location, clock: FakeClock
) -> None:
    """Operator retry (from a non-serving store) makes dead messages pending with attempts 0
    and due now, leaves delivered and inflight ones alone; all_dead revives every dead one."""
    scene = await operator_scene(store)
    dead_id, other_dead_id, delivered_id, inflight = (
        scene.dead,
        scene.other_dead,
        scene.delivered,
        scene.inflight,
    )
    inflight_id = inflight.id
    clock.advance(600)
    untouched = [await record(store, i) for i in (delivered_id, inflight_id, other_dead_id)]

    async with operator_store(store_location, clock) as operator:
        assert await operator.retry_messages([dead_id, delivered_id, inflight_id, 999_999]) == 1
        assert await operator.retry_messages([]) == 0

    row = await record(store, dead_id)
    assert (row.status, row.attempts, row.next_attempt_at) == (MessageStatus.PENDING, 0, T0 + 600)
    assert [await record(store, i) for i in (delivered_id, inflight_id, other_dead_id)] == untouched
    [revived] = await store.claim(DEST, 10, LEASE_S)
    assert (revived.id, revived.attempt, revived.retry_from_at) == (dead_id, 1, T0 + 600)
    assert inflight.id == inflight_id

    signalled: list[set[str]] = []
    store.on_commit = signalled.append
    assert await store.retry_messages(all_dead=True) == 1
    assert signalled == [set()]  # the serving store's own workers are woken to look again
    assert (await record(store, other_dead_id)).status is MessageStatus.PENDING
    assert await store.list_messages(status=MessageStatus.DEAD) == []


async def test_replay_resends_delivered_and_dead_but_never_inflight(
    store: Store, clock: FakeClock
) -> None:
    """replay makes the selected delivered and dead messages due now with a fresh budget, the
    same key and bytes; inflight ones are skipped; a dry run only counts."""
    delivered_id, dead_id, inflight_id = await seed(store, "delivered", "dead", "inflight")
    delivered, dead, inflight = await store.claim(DEST, 3, LEASE_S)
    assert await store.mark_delivered(delivered, 200)
    assert await store.mark_dead(dead, Dead("client_error", 400), "HTTP 400")
    clock.advance(60)
    everything = MessageFilter(destination=DEST)
    before = await store.list_messages(everything)

    assert await store.replay(everything, dry_run=True) == 2
    assert await store.list_messages(everything) == before
    assert await store.replay(everything) == 2

    for message_id in (delivered_id, dead_id):
        row = await record(store, message_id)
        assert (row.status, row.attempts, row.next_attempt_at, row.delivered_at) == (
            MessageStatus.PENDING,
            0,
            T0 + 60,
            None,
        )
    assert (await record(store, inflight_id)).status is MessageStatus.INFLIGHT
    again = await store.claim(DEST, 10, LEASE_S)
    assert [(m.id, m.idempotency_key, m.body) for m in again] == [
        (delivered_id, "delivered", b'{"orderId": "delivered"}'),
        (dead_id, "dead", b'{"orderId": "dead"}'),
    ]
    assert inflight.id == inflight_id


async def test_discard_gives_up_on_dead_messages_only_keeps_them_and_never_sends_them(
    store: Store, store_location: Location, clock: FakeClock
) -> None:
    """An operator (non-serving store) discards dead messages: they become `discarded` with
    the reason and the time, stay listed and counted (no longer as dead), and neither replay,
    retry nor a claim ever sends them; pending, delivered and inflight ones are left alone."""
    scene = await operator_scene(store, pending=True)
    dead_id, other_dead_id, delivered_id, inflight_id = (
        scene.dead,
        scene.other_dead,
        scene.delivered,
        scene.inflight.id,
    )
    assert scene.pending is not None
    pending_id = scene.pending
    clock.advance(60)
    untouched = [await record(store, i) for i in (other_dead_id, delivered_id, inflight_id)]

    async with operator_store(store_location, clock) as operator:
        chosen = MessageFilter(ids=(dead_id, delivered_id, inflight_id, pending_id))
        assert await operator.discard(chosen, "test order, refunded by hand") == [dead_id]

    row = await record(store, dead_id)
    assert (row.status, row.discard_reason, row.discarded_at, row.last_error) == (
        MessageStatus.DISCARDED,
        "test order, refunded by hand",
        T0 + 60,
        "HTTP 400",
    )
    assert [await record(store, i) for i in (other_dead_id, delivered_id, inflight_id)] == untouched
    assert (await record(store, pending_id)).status is MessageStatus.PENDING
    assert [r.id for r in await store.list_messages(status=MessageStatus.DISCARDED)] == [dead_id]
    counts = (await store.stats(DEST)).counts
    assert (counts[MessageStatus.DEAD], counts[MessageStatus.DISCARDED]) == (1, 1)

    assert await store.replay(MessageFilter(ids=(dead_id,))) == 0
    assert await store.retry_messages(all_dead=True) == 1  # the other dead one only
    clock.advance(86_400)
    assert sorted(m.id for m in await store.claim(DEST, 10, LEASE_S)) == [
        other_dead_id,
        pending_id,
    ]
    assert (await record(store, dead_id)).status is MessageStatus.DISCARDED


async def test_a_pause_set_by_an_operator_is_seen_by_the_serving_store(
    store: Store, store_location: Location, clock: FakeClock
) -> None:
    """set_paused from an operator's store is read back by the serving store, per
    destination, and a resume overrides it again."""
    assert await store.paused_overrides() == {}
    async with operator_store(store_location, clock) as operator:
        await operator.set_paused(DEST, True)
        await operator.set_paused(OTHER, False)
    assert await store.paused_overrides() == {DEST: True, OTHER: False}

    await store.set_paused(DEST, False)
    assert await store.paused_overrides() == {DEST: False, OTHER: False}


async def test_prune_keeps_what_is_still_needed(store: Store, clock: FakeClock) -> None:
    """prune clears old bodies of settled events, deletes old delivered messages and then
    their events, and keeps dead and pending messages and their events whole."""
    delivered_id, dead_id, pending_id = await seed(store, "delivered", "dead", "pending")
    delivered, dead = await store.claim(DEST, 2, LEASE_S)
    assert await store.mark_delivered(delivered, 200)
    assert await store.mark_dead(dead, Dead("client_error", 400), "HTTP 400")
    ignored = await store.enqueue(draft("wh_ignored", status=EventStatus.IGNORED, reason="x"))
    clock.advance(1000)

    kept = await store.prune(bodies_before=T0 - 1, rows_before=T0 - 1)
    assert kept == PruneResult(0, 0, 0)
    bodies_only = await store.prune(bodies_before=T0 + 1, rows_before=T0 - 1)
    assert bodies_only == PruneResult(event_bodies_cleared=2)  # delivered's and ignored's
    pruned = await store.prune(bodies_before=T0 + 1, rows_before=T0 + 1, batch=1)
    assert pruned == PruneResult(messages_deleted=1, events_deleted=2)

    assert await store.get_message(delivered_id) is None
    assert [(await record(store, i)).status for i in (dead_id, pending_id)] == [
        MessageStatus.DEAD,
        MessageStatus.PENDING,
    ]
    events = await store.list_events(EventFilter())
    assert [(e.webhook_id, e.body is not None) for e in events] == [
        (f"wh_{DEST}_dead", True),
        (f"wh_{DEST}_pending", True),
    ]
    assert ignored.event_id not in {e.id for e in events}


# ------------------------------------------------------------------ reading the outbox


async def test_stats_counts_by_status_and_dates_the_oldest_backlog(
    store: Store, clock: FakeClock
) -> None:
    """stats counts each status and gives the oldest created_at not yet delivered or dead."""
    assert (await store.stats(DEST)).counts == dict.fromkeys(MessageStatus, 0)
    assert (await store.stats(DEST)).oldest_pending_created_at is None

    await seed(store, "delivered", "dead")
    clock.advance(10)
    await seed(store, "inflight")
    clock.advance(10)
    await seed(store, "pending-1", "pending-2")
    await seed(store, "elsewhere", destination=OTHER)
    delivered, dead, inflight = await store.claim(DEST, 3, LEASE_S)
    assert await store.mark_delivered(delivered, 200)
    assert await store.mark_dead(dead, Dead("client_error", 400), "HTTP 400")

    stats = await store.stats(DEST)

    assert stats.counts == {
        MessageStatus.PENDING: 2,
        MessageStatus.INFLIGHT: 1,
        MessageStatus.DELIVERED: 1,
        MessageStatus.DEAD: 1,
        MessageStatus.DISCARDED: 0,
    }
    assert stats.oldest_pending_created_at == T0 + 10
    assert await store.release(inflight)
    assert (await store.stats(OTHER)).oldest_pending_created_at == T0 + 20
    assert sorted(await store.destinations()) == [DEST, OTHER]


async def test_list_messages_filters_and_orders_newest_first(
    store: Store, clock: FakeClock
) -> None:
    """list_messages filters by ids, status, destination, event type and creation time,
    newest first, up to the limit."""
    a, b = await seed(store, "a", "b")
    clock.advance(10)
    c = await store.enqueue(draft("wh_c", message("c"), event_type="refund.created"))
    [c_id] = c.message_ids
    [x] = await seed(store, "x", destination=OTHER)
    assert await store.mark_delivered(await claim_one(store), 200)

    def ids(rows: list[MessageRecord]) -> list[int]:
        return [r.id for r in rows]

    assert ids(await store.list_messages()) == [x, c_id, b, a]
    assert ids(await store.list_messages(destination=DEST)) == [c_id, b, a]
    assert ids(await store.list_messages(status=MessageStatus.PENDING)) == [x, c_id, b]
    assert ids(await store.list_messages(status=MessageStatus.DELIVERED)) == [a]
    assert ids(await store.list_messages(limit=2)) == [x, c_id]
    assert ids(await store.list_messages(MessageFilter(ids=(a, x)))) == [x, a]
    assert ids(await store.list_messages(MessageFilter(event_type="refund.created"))) == [c_id]
    assert ids(await store.list_messages(MessageFilter(since=T0 + 10))) == [x, c_id]
    assert ids(await store.list_messages(MessageFilter(until=T0 + 10))) == [b, a]
    both = MessageFilter(
        statuses=(MessageStatus.PENDING, MessageStatus.DELIVERED), destination=DEST
    )
    assert ids(await store.list_messages(both)) == [c_id, b, a]


async def test_get_message_returns_the_stored_body_bytes(store: Store) -> None:
    """get_message returns the exact body bytes with the event's type and webhook-id; an
    unknown id is None."""
    body = b'{"amount": 4410, "currency": "USD", "note": "caf\xc3\xa9", "nul": "\\u0000"}'
    result = await store.enqueue(draft("wh_1", message("order-1", body=body)))
    [message_id] = result.message_ids

    row = await record(store, message_id)

    assert (row.body, row.event_type, row.webhook_id, row.event_id) == (
        body,
        "order.paid",
        "wh_1",
        result.event_id,
    )
    assert (row.route, row.destination, row.idempotency_key) == ("order_paid", DEST, "order-1")
    assert await store.get_message(message_id + 1000) is None


async def test_list_events_filters_by_id_status_source_type_and_time(store: Store) -> None:
    """list_events selects stored events by id, status, source, event type and received time,
    oldest first, with their raw bodies."""
    routed = await store.enqueue(draft("wh_1", message("k1")))
    ignored = await store.enqueue(
        draft("wh_2", event_type="checkout.created", status=EventStatus.IGNORED, reason="none")
    )
    sandbox = await store.enqueue(
        draft("wh_3", message("k3"), source="polar-sandbox", received_at=T0 + 60)
    )

    def ids(events: list[StoredEvent]) -> list[int]:
        return [e.id for e in events]

    assert ids(await store.list_events(EventFilter())) == [
        routed.event_id,
        ignored.event_id,
        sandbox.event_id,
    ]
    assert ids(await store.list_events(EventFilter(statuses=(EventStatus.IGNORED,)))) == [
        ignored.event_id
    ]
    assert ids(await store.list_events(EventFilter(source="polar-sandbox"))) == [sandbox.event_id]
    assert ids(await store.list_events(EventFilter(event_type="checkout.created"))) == [
        ignored.event_id
    ]
    assert ids(await store.list_events(EventFilter(since=T0 + 1))) == [sandbox.event_id]
    assert ids(await store.list_events(EventFilter(until=T0 + 1))) == [
        routed.event_id,
        ignored.event_id,
    ]
    assert routed.event_id is not None
    [one] = await store.list_events(EventFilter(ids=(routed.event_id,)))
    assert (one.webhook_id, one.body) == ("wh_1", b'{"type": "order.paid", "id": "wh_1"}')
    assert ids(await store.list_events(EventFilter(), limit=1)) == [routed.event_id]


async def test_remap_event_adds_only_new_keys_and_updates_the_event(store: Store) -> None:
    """remap_event inserts the new mapping's messages unless their key exists, and records
    the event's new status; a mapping whose every key exists makes it 'duplicate'."""
    first = await store.enqueue(draft("wh_1", message("k1")))
    unmappable = await store.enqueue(
        draft("wh_2", status=EventStatus.UNMAPPABLE, reason="data.amount missing")
    )
    assert unmappable.event_id is not None
    committed: list[set[str]] = []
    store.on_commit = committed.append

    remapped = await store.remap_event(
        unmappable.event_id, EventStatus.ROUTED, None, [message("k1"), message("k2")]
    )

    assert remapped.outcome is IngestOutcome.ACCEPTED
    assert remapped.duplicate_keys == ("k1",)
    assert [(await record(store, i)).idempotency_key for i in remapped.message_ids] == ["k2"]
    assert {DEST} in committed
    [event] = await store.list_events(EventFilter(ids=(unmappable.event_id,)))
    assert (event.status, event.reason) == (EventStatus.ROUTED, None)

    assert first.event_id is not None
    again = await store.remap_event(first.event_id, EventStatus.ROUTED, None, [message("k1")])
    assert (again.outcome, again.message_ids) == (IngestOutcome.DUPLICATE, ())
    [event] = await store.list_events(EventFilter(ids=(first.event_id,)))
    assert (event.status, event.reason) == (EventStatus.DUPLICATE, "every message already existed")
    assert await keys(store) == ["k1", "k2"]


async def test_find_bodies_returns_stored_bodies_by_destination_and_key(store: Store) -> None:
    """find_bodies maps (destination, key) to the stored body bytes; unknown pairs are absent."""
    await store.enqueue(draft("wh_1", message("order-1", body=b'{"orderId": "A-1"}')))
    await store.enqueue(draft("wh_2", message("order-1", destination=OTHER, body=b"{}")))

    found = await store.find_bodies(
        [(DEST, "order-1"), (OTHER, "order-1"), (DEST, "order-2"), ("nowhere", "order-1")]
    )

    assert found == {(DEST, "order-1"): b'{"orderId": "A-1"}', (OTHER, "order-1"): b"{}"}


# ------------------------------------------------------------------ kill safety


async def test_a_claim_never_settled_comes_back_after_a_restart(
    store_location: Location, clock: FakeClock
) -> None:
    """A store closed without settling its claim leaves the message inflight; reopened, the
    start-up policy (all leases when the store is exclusive, else the expired ones) makes it
    pending again, byte for byte, and the dead owner's token is void."""
    store = await open_store(store_location[1], clock=clock, serve=True)
    try:
        await store.enqueue(draft("wh_1", message("order-1", body=b'{"amount": 4410}')))
        [kept_id] = await seed(store, "never-claimed")
        lost = await claim_one(store)
    finally:
        await store.close()  # no ack, no release: the owner is gone

    store = await open_store(store_location[1], clock=clock, serve=True)
    try:
        assert (await record(store, lost.id)).status is MessageStatus.INFLIGHT
        assert (await record(store, kept_id)).status is MessageStatus.PENDING
        # SQLite: this process holds the serve lock, so the lease's owner is dead. PostgreSQL:
        # another replica may own it, so it waits for its lease to run out.
        requeued = await store.requeue_inflight(expired_only=not store.exclusive)
        assert requeued == (1 if store.exclusive else 0)
        clock.advance(LEASE_S + 1)
        assert await store.requeue_inflight(expired_only=not store.exclusive) == 1 - requeued
        again = await claim_one(store)
        assert (again.id, again.idempotency_key, again.body, again.attempt) == (
            lost.id,
            "order-1",
            b'{"amount": 4410}',
            2,  # the lost attempt may have reached Faurya: it counts
        )
        assert not await store.mark_delivered(lost, 200)
        assert await store.mark_delivered(again, 200)
    finally:
        await store.close()


_KILLED_WRITER = """
import asyncio, os, signal, sys
from relay.models import EventStatus, InboundDraft, OutboundDraft
from relay.store import open_store

async def main() -> None:
    store = await open_store(sys.argv[1], serve=True)
    for n in (1, 2):
        message = OutboundDraft("order_paid", "faurya", f"order-{n}", b'{"n": %d}' % n)
        draft = InboundDraft("polar", f"wh_{n}", "order.paid", 0.0, {}, b"{}",
                             EventStatus.ROUTED, None, (message,))
        await store.enqueue(draft)
    await store.claim("faurya", 1, 0.5)
    print("committed", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

asyncio.run(main())
"""


async def test_a_killed_process_loses_nothing_it_committed(store_location: Location) -> None:
    """After a SIGKILL mid-flight, every committed message is there, and its lease comes back
    (at once on SQLite, whose serve lock died with the process; after it ran out otherwise)."""
    killed = await asyncio.create_subprocess_exec(
        sys.executable,
        "-c",
        _KILLED_WRITER,
        store_location[1],
        cwd=REPO,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await killed.communicate()
    assert killed.returncode == -signal.SIGKILL, err.decode()
    assert out == b"committed\n"

    store = await open_store(store_location[1], serve=True)  # the real clock: leases of 0.5 s
    try:

        async def lease_back() -> bool:
            await store.requeue_inflight(expired_only=not store.exclusive)
            return (await store.stats(DEST)).counts[MessageStatus.INFLIGHT] == 0

        await wait_until(lease_back)
        rows = reversed(await store.list_messages())
        assert [(r.idempotency_key, r.body, r.status, r.attempts) for r in rows] == [
            ("order-1", b'{"n": 1}', MessageStatus.PENDING, 1),
            ("order-2", b'{"n": 2}', MessageStatus.PENDING, 0),
        ]
    finally:
        await store.close()


async def test_backfill_fills_search_columns_in_batches_and_search_then_finds_them(
    store: Store,
) -> None:
    """Messages stored without their search columns (as before the console) are not found by
    the console's search; `backfill_facts` fills them `batch` rows per transaction, returns
    how many, and the search then finds each by its orderId."""
    ids: list[int] = []
    for n in (1, 2, 3):  # message() with a body of our own has no facts
        body = f'{{"orderId": "order-{n}"}}'.encode()
        result = await store.enqueue(draft(f"wh_{n}", message(f"k{n}", body=body)))
        ids.extend(result.message_ids)
    assert await store.console_messages(ListFilters(q="order-2"), None, 10) == []

    assert await store.backfill_facts(batch=2) == 3

    [found] = await store.console_messages(ListFilters(q="order-2"), None, 10)
    assert found.id == ids[1]
    assert await store.backfill_facts(batch=2) == 0
