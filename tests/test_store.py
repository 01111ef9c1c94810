"""The contract of relay.store: the SQLite outbox, against real database files in tmp_path.

What both backends must do alike is in tests/test_store_contract.py (which runs on SQLite
too); this file keeps what is SQLite's own, and checks made on the file itself.

The store neither logs nor owns metrics: it reports through `on_batch` / `on_commit` and
`last_write_error`, and those hooks are what its failure paths assert here (the app-level
log events and metrics built on them are tested with the app).
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import shutil
import sqlite3
import tempfile
from collections import Counter
from collections.abc import AsyncIterator, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import aiosqlite
import pytest
from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import (
    RuleBasedStateMachine,
    initialize,
    invariant,
    precondition,
    rule,
    run_state_machine_as_test,
)

import relay.migrations
from relay.errors import StorageError, StorageUnavailable, StoreLocked
from relay.models import (
    ClaimedMessage,
    Dead,
    DestinationStats,
    InboundDraft,
    IngestOutcome,
    MessageRecord,
    MessageStatus,
)
from relay.store import BatchStats, Store
from relay.store.batching import Writer
from relay.store.schema import connect, migrate
from relay.store.sql import SQLITE
from relay.store.sqlite_thread import in_thread
from relay.store.writes import claim
from tests.helpers import FakeClock
from tests.store_helpers import (
    DEST,
    LEASE_S,
    OTHER,
    T0,
    claim_one,
    draft,
    message,
    record,
    retry_at,
    seed,
)

T = TypeVar("T")


# ------------------------------------------------------------------ helpers


def query(db_path: Path, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
    """Read the database through a connection of its own: what it shows is committed."""
    with contextlib.closing(sqlite3.connect(db_path)) as conn:
        return list(conn.execute(sql, params).fetchall())


def count(db_path: Path, table: str) -> int:
    return int(query(db_path, f"SELECT COUNT(*) FROM {table}")[0][0])  # noqa: S608 - constant


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


@pytest.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(str(db_path), clock=clock, serve=True)
    try:
        yield opened
    finally:
        await opened.close()


# ------------------------------------------------------------------ migrations and pragmas


MIGRATIONS = Path(relay.migrations.__file__).parent


def highest_migration() -> int:
    return max(int(p.name[:4]) for p in MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql"))


def schema_of(db_path: Path) -> set[tuple[Any, ...]]:
    """Every object with its columns (name, type, not null, default, pk) or indexed columns.
    Structure, not the SQL text: the store drops comment lines before running a script."""
    objects = query(db_path, "SELECT type, name, tbl_name FROM sqlite_master")
    columns = query(
        db_path,
        'SELECT m.name, p.cid, p.name, p.type, p."notnull", p.dflt_value, p.pk '
        "FROM sqlite_master m JOIN pragma_table_info(m.name) p WHERE m.type = 'table'",
    )
    indexed = query(
        db_path,
        "SELECT m.name, p.seqno, p.name FROM sqlite_master m "
        "JOIN pragma_index_info(m.name) p WHERE m.type = 'index'",
    )
    return (
        {("object", *o) for o in objects}
        | {("column", *c) for c in columns}
        | {("indexed", *i) for i in indexed}
    )


@pytest.fixture
def reference_schema(tmp_path: Path) -> set[tuple[Any, ...]]:
    """Every migration file run in order by plain sqlite3: what the store must end up with."""
    reference = tmp_path / "reference.db"
    with contextlib.closing(sqlite3.connect(reference)) as conn:
        for script in sorted(MIGRATIONS.glob("[0-9][0-9][0-9][0-9]_*.sql")):
            conn.executescript(script.read_text(encoding="utf-8"))
    return schema_of(reference)


# The objects this contract relies on, whatever later migrations add.
CORE_SCHEMA = {
    ("table", "inbound_events"),
    ("table", "outbound_messages"),
    ("index", "outbound_messages_due"),
    ("index", "outbound_messages_event"),
    # The UNIQUE constraints: webhook-id per source, idempotency key per destination.
    ("index", "sqlite_autoindex_inbound_events_1"),
    ("index", "sqlite_autoindex_outbound_messages_1"),
}


@pytest.fixture
def empty_file(db_path: Path) -> Path:
    db_path.touch()
    return db_path


GARBAGE = b"this is not an SQLite database, not even close." * 100


@pytest.fixture
def garbage_file(db_path: Path) -> Path:
    db_path.write_bytes(GARBAGE)
    return db_path


async def test_opening_an_empty_file_migrates_it_to_the_latest_schema(
    empty_file: Path, clock: FakeClock, reference_schema: set[tuple[Any, ...]]
) -> None:
    """An empty database file gets every migration: the latest version, tables and indexes."""
    db_path = empty_file
    store = await Store.open(str(db_path), clock=clock)
    try:
        assert await store.schema_version() == highest_migration()
    finally:
        await store.close()
    assert schema_of(db_path) == reference_schema
    assert {(o[1], o[2]) for o in reference_schema if o[0] == "object"} >= CORE_SCHEMA
    assert query(db_path, "PRAGMA user_version") == [(highest_migration(),)]


async def test_reopening_a_migrated_database_changes_nothing(
    db_path: Path, clock: FakeClock
) -> None:
    """A second open applies no migration again and keeps the rows already stored."""
    store = await Store.open(str(db_path), clock=clock, serve=True)
    try:
        [message_id] = await seed(store, "k1")
    finally:
        await store.close()
    schema_before = query(db_path, "SELECT type, name, sql FROM sqlite_master ORDER BY name")

    for serve in (True, False):
        store = await Store.open(str(db_path), clock=clock, serve=serve)
        try:
            assert await store.schema_version() == highest_migration()
            assert (await record(store, message_id)).idempotency_key == "k1"
        finally:
            await store.close()
    assert (
        query(db_path, "SELECT type, name, sql FROM sqlite_master ORDER BY name") == schema_before
    )
    assert count(db_path, "outbound_messages") == 1


async def test_pragmas_read_back_as_configured(store: Store) -> None:
    """The store runs in WAL mode with synchronous=FULL and foreign keys enforced."""
    assert await store.pragmas() == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}


async def test_a_file_that_is_not_a_database_is_a_storage_error(
    garbage_file: Path, clock: FakeClock
) -> None:
    """Opening garbage fails with StorageError and frees the serve lock again."""
    db_path = garbage_file
    with pytest.raises(StorageError, match="database") as first:
        await Store.open(str(db_path), clock=clock, serve=True)
    assert not isinstance(first.value, StoreLocked)
    # Had the failed open kept the flock, this second attempt would be StoreLocked.
    with pytest.raises(StorageError) as second:
        await Store.open(str(db_path), clock=clock, serve=True)
    assert not isinstance(second.value, StoreLocked)


# ------------------------------------------------------------------ enqueue


async def test_a_repeated_webhook_id_is_a_duplicate_and_stores_nothing(
    store: Store, db_path: Path
) -> None:
    """A second event with the same source and webhook-id is DUPLICATE and adds no row."""
    first = await store.enqueue(draft("wh_1", message("k1")))
    again = await store.enqueue(draft("wh_1", message("k2")))

    assert first.outcome is IngestOutcome.ACCEPTED
    assert again.outcome is IngestOutcome.DUPLICATE
    assert again.event_id is None
    assert again.message_ids == ()
    assert count(db_path, "inbound_events") == 1
    assert query(db_path, "SELECT idempotency_key FROM outbound_messages") == [("k1",)]


async def test_the_same_webhook_id_from_another_source_is_a_new_event(
    store: Store, db_path: Path
) -> None:
    """webhook-id is unique per source only."""
    await store.enqueue(draft("wh_1", message("k1")))
    other = await store.enqueue(draft("wh_1", message("k2"), source="polar-sandbox"))

    assert other.outcome is IngestOutcome.ACCEPTED
    assert len(other.message_ids) == 1
    assert count(db_path, "inbound_events") == 2
    assert count(db_path, "outbound_messages") == 2


async def test_an_event_with_some_new_keys_is_accepted_for_those(
    store: Store, db_path: Path
) -> None:
    """An event whose keys are partly known enqueues only the new ones and stays 'routed'."""
    await store.enqueue(draft("wh_1", message("order-1")))
    mixed = await store.enqueue(draft("wh_2", message("order-1"), message("order-2")))

    assert mixed.outcome is IngestOutcome.ACCEPTED
    assert len(mixed.message_ids) == 1
    assert mixed.duplicate_keys == ("order-1",)
    assert query(db_path, "SELECT status FROM inbound_events WHERE id = ?", (mixed.event_id,)) == [
        ("routed",)
    ]
    assert query(db_path, "SELECT idempotency_key FROM outbound_messages ORDER BY id") == [
        ("order-1",),
        ("order-2",),
    ]


async def test_the_same_key_for_another_destination_is_a_new_message(
    store: Store, db_path: Path
) -> None:
    """The idempotency key is unique per destination only."""
    await store.enqueue(draft("wh_1", message("order-1")))
    other = await store.enqueue(draft("wh_2", message("order-1", destination=OTHER)))

    assert other.outcome is IngestOutcome.ACCEPTED
    assert len(other.message_ids) == 1
    assert query(db_path, "SELECT destination FROM outbound_messages ORDER BY id") == [
        (DEST,),
        (OTHER,),
    ]


async def test_duplicates_inside_one_batch_are_decided_like_sequential_calls(
    store: Store, db_path: Path
) -> None:
    """In one group commit, the first of two equal webhook-ids or keys wins, the other is a dup."""
    batches: list[BatchStats] = []
    store.on_batch = batches.append

    results = await asyncio.gather(
        store.enqueue(draft("wh_1", message("order-1"))),
        store.enqueue(draft("wh_1", message("order-2"))),  # same webhook-id
        store.enqueue(draft("wh_2", message("order-3"))),
        store.enqueue(draft("wh_3", message("order-3"))),  # same key, another event
    )

    assert [b.size for b in batches] == [4]  # all four really shared one transaction
    assert [r.outcome for r in results] == [
        IngestOutcome.ACCEPTED,
        IngestOutcome.DUPLICATE,
        IngestOutcome.ACCEPTED,
        IngestOutcome.DUPLICATE,
    ]
    assert results[1].event_id is None
    assert results[3].duplicate_keys == ("order-3",)
    assert query(db_path, "SELECT webhook_id, status FROM inbound_events ORDER BY id") == [
        ("wh_1", "routed"),
        ("wh_2", "routed"),
        ("wh_3", "duplicate"),
    ]
    assert query(db_path, "SELECT idempotency_key FROM outbound_messages ORDER BY id") == [
        ("order-1",),
        ("order-3",),
    ]


async def test_a_batch_the_database_refuses_commits_nothing(
    db_path: Path, clock: FakeClock
) -> None:
    """With the write lock held elsewhere, enqueue raises StorageUnavailable and stores nothing;
    the error is reported, probe fails, and the next good batch clears the error."""
    store = await Store.open(str(db_path), clock=clock, serve=True, busy_timeout_ms=50)
    batches: list[BatchStats] = []
    store.on_batch = batches.append
    blocker = sqlite3.connect(db_path, isolation_level=None)
    try:
        blocker.execute("BEGIN EXCLUSIVE")
        failed = await asyncio.gather(
            store.enqueue(draft("wh_1", message("order-1"))),
            store.enqueue(draft("wh_2", message("order-2"))),
            return_exceptions=True,
        )
        assert all(isinstance(f, StorageUnavailable) for f in failed), failed
        assert "database is locked" in str(failed[0])
        assert store.last_write_error == "OperationalError: database is locked"
        # One failed commit, no retry of each webhook alone: behind a lock held elsewhere
        # each would wait out the busy timeout again, past Polar's 10 s timeout.
        assert [(b.size, b.ok) for b in batches] == [(2, False)]
        with pytest.raises(StorageUnavailable, match="not writable"):
            await store.probe()

        assert store.last_write_error is not None  # a failed probe clears nothing

        blocker.execute("ROLLBACK")
        assert count(db_path, "inbound_events") == 0
        assert count(db_path, "outbound_messages") == 0
        # Nothing of the failed batch exists, so the same webhook is new, not a duplicate;
        # the good batch clears the error.
        retried = await store.enqueue(draft("wh_1", message("order-1")))
        assert retried.outcome is IngestOutcome.ACCEPTED
        assert store.last_write_error is None
        assert [(b.size, b.ok) for b in batches] == [(2, False), (1, True)]
        await store.probe()
    finally:
        blocker.close()
        await store.close()
    assert query(db_path, "SELECT webhook_id FROM inbound_events") == [("wh_1",)]


def test_aiosqlite_still_runs_a_function_on_its_connection_thread() -> None:
    """The writer runs each transaction in one hand-off through aiosqlite's private
    Connection._execute (relay/store/sqlite_thread.py says why): an aiosqlite upgrade that drops it
    must fail here, not silently fall back to a slower path."""
    assert inspect.iscoroutinefunction(getattr(aiosqlite.Connection, "_execute", None))


async def test_a_write_that_awaits_anything_but_its_statements_fails_alone(
    db_path: Path, clock: FakeClock
) -> None:
    """A transaction runs to its end in one synchronous call on the database thread: a write
    job that would suspend on anything else fails, rolled back, with a clear error, and the
    writer goes on with the next job."""
    db = await connect(str(db_path), busy_timeout_ms=1000)
    await migrate(db)
    writer = Writer(
        db, clock, max_batch=8, serve=True, runner=lambda transaction: in_thread(db, transaction)
    )
    try:

        async def strays(conn: Any) -> None:
            await conn.execute("UPDATE outbound_messages SET status = 'dead'")
            await asyncio.sleep(0)

        with pytest.raises(StorageUnavailable, match="awaited something other than its"):
            await writer.run(strays)
        assert not (await db.execute_fetchall("SELECT 1 FROM outbound_messages"))
        assert await writer.run(lambda conn: claim(conn, SQLITE, DEST, 1, LEASE_S, T0)) == []
        assert writer.last_error is None
    finally:
        await writer.close()
        await db.close()


# ------------------------------------------------------------------ claims


# ------------------------------------------------------------------ settling a claim


# ------------------------------------------------------------------ leases and operator retry


async def test_retry_all_dead_revives_every_dead_message(store: Store, clock: FakeClock) -> None:
    """retry_messages(all_dead=True) revives the dead of every destination and nothing else."""
    await seed(store, "a", "b", "c")
    [other_id] = await seed(store, "a", destination=OTHER)
    a, b, c = await store.claim(DEST, 3, LEASE_S)
    [other] = await store.claim(OTHER, 1, LEASE_S)
    for msg in (a, b, other):
        assert await store.mark_dead(msg, Dead("client_error", 400), "HTTP 400")
    assert await store.mark_delivered(c, 200)
    clock.advance(60)

    assert await store.retry_messages(all_dead=True) == 3

    assert [r.id for r in await store.list_messages(status=MessageStatus.DEAD)] == []
    revived = await store.list_messages(status=MessageStatus.PENDING)
    assert sorted(r.id for r in revived) == sorted([a.id, b.id, other_id])
    assert {(r.attempts, r.next_attempt_at) for r in revived} == {(0, T0 + 60)}
    assert (await record(store, c.id)).status is MessageStatus.DELIVERED
    assert await store.retry_messages(all_dead=True) == 0


# ------------------------------------------------------------------ reading the outbox


async def test_list_messages_filters_by_status_and_destination(store: Store) -> None:
    """list_messages filters by status and destination, newest first, up to the limit."""
    a, b, c = await seed(store, "a", "b", "c")
    [x] = await seed(store, "x", destination=OTHER)
    assert await store.mark_delivered(await claim_one(store), 200)

    assert [r.id for r in await store.list_messages()] == [x, c, b, a]
    assert [r.id for r in await store.list_messages(destination=DEST)] == [c, b, a]
    assert [r.id for r in await store.list_messages(status=MessageStatus.PENDING)] == [x, c, b]
    assert [
        r.id for r in await store.list_messages(status=MessageStatus.PENDING, destination=OTHER)
    ] == [x]
    assert [r.id for r in await store.list_messages(status=MessageStatus.DELIVERED)] == [a]
    assert [r.id for r in await store.list_messages(limit=2)] == [x, c]


# ------------------------------------------------------------------ the serve lock


async def test_only_one_store_serves_a_database(
    store: Store, db_path: Path, clock: FakeClock
) -> None:
    """A second serving open fails with StoreLocked while the first is open, then succeeds."""
    with pytest.raises(StoreLocked, match="already serving"):
        await Store.open(str(db_path), clock=clock, serve=True)
    await store.enqueue(draft("wh_1", message("k1")))  # the first one is unharmed

    await store.close()
    second = await Store.open(str(db_path), clock=clock, serve=True)
    try:
        assert (await second.stats(DEST)).counts[MessageStatus.PENDING] == 1
    finally:
        await second.close()


async def test_operator_commands_open_alongside_a_serving_store(
    store: Store, db_path: Path, clock: FakeClock
) -> None:
    """A non-serving open works next to the server: it reads, retries, and commits its own
    writes directly (no group-commit task), sharing the file through SQLite's locking."""
    [message_id] = await seed(store, "k1")
    assert await store.mark_dead(await claim_one(store), Dead("client_error", 400), "HTTP 400")

    operator = await Store.open(str(db_path), clock=clock, serve=False)
    try:
        assert [r.id for r in await operator.list_messages(status=MessageStatus.DEAD)] == [
            message_id
        ]
        assert await operator.retry_messages([message_id]) == 1
        result = await operator.enqueue(draft("wh_2", message("k2")))
        assert result.outcome is IngestOutcome.ACCEPTED
    finally:
        await operator.close()
    assert (await record(store, message_id)).status is MessageStatus.PENDING
    assert count(db_path, "inbound_events") == 2


# ------------------------------------------------------------------ kill safety


async def test_enqueued_messages_survive_a_restart_undelivered(
    db_path: Path, clock: FakeClock
) -> None:
    """Messages enqueued and never delivered are still pending after close and reopen."""
    store = await Store.open(str(db_path), clock=clock, serve=True)
    try:
        ids = await seed(store, "k1", "k2")
    finally:
        await store.close()

    store = await Store.open(str(db_path), clock=clock, serve=True)
    try:
        assert await store.requeue_inflight(expired_only=False) == 0
        assert [m.id for m in await store.claim(DEST, 10, LEASE_S)] == ids
    finally:
        await store.close()


# ------------------------------------------------------------------ random histories


@dataclass
class Expected:
    """What the model says one message should look like."""

    destination: str
    key: str
    body: bytes
    status: MessageStatus
    attempts: int
    next_attempt_at: float
    lease_until: float | None = None
    lease_token: str | None = None


ENQUEUES = st.lists(
    st.tuples(st.integers(0, 12), st.sampled_from([DEST, OTHER]), st.integers(0, 6)),
    min_size=1,
    max_size=4,
)
SETTLE = st.sampled_from(["deliver", "retry", "throttle", "dead", "release"])


class OutboxHistory(RuleBasedStateMachine):
    """Random enqueue / claim / settle / expire / retry / crash sequences against a model.

    The store is async; each example runs it on an event loop of its own, driven step by step.
    """

    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.folder = tempfile.mkdtemp(prefix="relay-store-")
        self.path = str(Path(self.folder) / "relay.db")
        self.clock = FakeClock(T0)
        self.store = self.run(Store.open(self.path, clock=self.clock, serve=True))
        self.expected: dict[int, Expected] = {}
        self.webhook_ids: set[str] = set()
        self.keys: set[tuple[str, str]] = set()
        self.claims: list[ClaimedMessage] = []  # every claim ever made, stale ones included

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        return self.loop.run_until_complete(coro)

    def teardown(self) -> None:
        try:
            self.run(self.store.close())
        finally:
            self.loop.close()
            shutil.rmtree(self.folder, ignore_errors=True)

    def _expect_enqueue(self, webhook: int, destination: str, key: int) -> InboundDraft:
        webhook_id, idempotency_key = f"wh_{webhook}", f"order-{key}"
        body = f"{webhook_id}->{destination}/{idempotency_key}".encode()
        return draft(webhook_id, message(idempotency_key, destination=destination, body=body))

    def _check_result(self, item: InboundDraft, result: Any) -> None:
        [m] = item.messages
        if item.webhook_id in self.webhook_ids:
            assert (result.outcome, result.event_id) == (IngestOutcome.DUPLICATE, None)
        elif (m.destination, m.idempotency_key) in self.keys:
            assert result.outcome is IngestOutcome.DUPLICATE
            assert result.duplicate_keys == (m.idempotency_key,)
        else:
            assert result.outcome is IngestOutcome.ACCEPTED
            [message_id] = result.message_ids
            assert message_id not in self.expected
            self.expected[message_id] = Expected(
                m.destination,
                m.idempotency_key,
                m.body,
                MessageStatus.PENDING,
                0,
                self.clock.now(),
            )
            self.keys.add((m.destination, m.idempotency_key))
        self.webhook_ids.add(item.webhook_id)

    @initialize(items=ENQUEUES)
    def some_messages_to_start_with(self, items: list[tuple[int, str, int]]) -> None:
        self.enqueue(items)

    @rule(items=ENQUEUES)
    def enqueue(self, items: list[tuple[int, str, int]]) -> None:
        drafts = [self._expect_enqueue(*item) for item in items]

        async def together() -> list[Any]:
            return list(await asyncio.gather(*(self.store.enqueue(d) for d in drafts)))

        # One gather is one group commit: it must decide exactly like sequential calls.
        for item, result in zip(drafts, self.run(together()), strict=True):
            self._check_result(item, result)

    @rule(destination=st.sampled_from([DEST, OTHER]), limit=st.integers(1, 4))
    def claim(self, destination: str, limit: int) -> None:
        self._claim(destination, limit)

    @rule(
        destination=st.sampled_from([DEST, OTHER]),
        hows=st.lists(SETTLE, min_size=1, max_size=4),
        delay_s=st.integers(1, 120),
    )
    def worker_round(self, destination: str, hows: list[str], delay_s: int) -> None:
        # What a worker does: claim, then settle each message it got under its live lease.
        for msg, how in zip(self._claim(destination, len(hows)), hows, strict=False):
            assert self._settle(msg, how, delay_s)

    def _claim(self, destination: str, limit: int) -> list[ClaimedMessage]:
        now = self.clock.now()
        due = sorted(
            (e.next_attempt_at, i)
            for i, e in self.expected.items()
            if e.destination == destination
            and e.status is MessageStatus.PENDING
            and e.next_attempt_at <= now
        )[:limit]
        claimed = self.run(self.store.claim(destination, limit, LEASE_S))
        assert [m.id for m in claimed] == sorted(i for _, i in due)
        for m in claimed:
            e = self.expected[m.id]
            # Nothing delivered or dead is ever handed out again.
            assert e.status is MessageStatus.PENDING
            assert (m.body, m.idempotency_key) == (e.body, e.key)
            e.status, e.attempts = MessageStatus.INFLIGHT, e.attempts + 1
            e.lease_until, e.lease_token = now + LEASE_S, m.lease_token
            assert m.attempt == e.attempts
        self.claims.extend(claimed)
        return claimed

    def _is_live(self, msg: ClaimedMessage) -> bool:
        e = self.expected[msg.id]
        return e.status is MessageStatus.INFLIGHT and e.lease_token == msg.lease_token

    def _settle(self, msg: ClaimedMessage, how: str, delay_s: int) -> bool:
        """Settle `msg` as `how`; when the store accepts, apply the same change to the model."""
        e = self.expected[msg.id]
        now = self.clock.now()
        if how == "deliver":
            changed = self.run(self.store.mark_delivered(msg, 200))
            status, attempts, next_at = MessageStatus.DELIVERED, e.attempts, e.next_attempt_at
        elif how in ("retry", "throttle"):
            outcome = retry_at(now + delay_s, counts_attempt=how == "retry")
            changed = self.run(self.store.mark_retry(msg, outcome, "HTTP 500"))
            refund = 0 if how == "retry" else 1
            status, attempts, next_at = MessageStatus.PENDING, e.attempts - refund, now + delay_s
        elif how == "dead":
            changed = self.run(self.store.mark_dead(msg, Dead("client_error", 400), "HTTP 400"))
            status, attempts, next_at = MessageStatus.DEAD, e.attempts, e.next_attempt_at
        else:
            changed = self.run(self.store.release(msg))
            status, attempts, next_at = MessageStatus.PENDING, e.attempts - 1, now
        if changed:
            e.status, e.attempts, e.next_attempt_at = status, attempts, next_at
            e.lease_until = e.lease_token = None
        return changed

    @precondition(lambda self: any(self._is_live(m) for m in self.claims))
    @rule(pick=st.integers(0, 10_000), how=SETTLE, delay_s=st.integers(1, 120))
    def settle(self, pick: int, how: str, delay_s: int) -> None:
        live = [m for m in self.claims if self._is_live(m)]
        assert self._settle(live[pick % len(live)], how, delay_s)

    @precondition(lambda self: any(not self._is_live(m) for m in self.claims))
    @rule(pick=st.integers(0, 10_000), how=SETTLE)
    def settle_a_lost_lease(self, pick: int, how: str) -> None:
        # Settled already, requeued, or from before a restart: the ack must change nothing
        # (the invariants compare every row with the model afterwards).
        stale = [m for m in self.claims if not self._is_live(m)]
        assert not self._settle(stale[pick % len(stale)], how, 1)

    def _requeue(self, expired: list[Expected]) -> None:
        now = self.clock.now()
        for e in expired:
            e.status, e.lease_until, e.lease_token = MessageStatus.PENDING, None, None
            e.next_attempt_at = min(e.next_attempt_at, now)

    @rule(seconds=st.integers(1, 90))
    def leases_expire(self, seconds: int) -> None:
        self.clock.advance(seconds)
        now = self.clock.now()
        expired = [
            e
            for e in self.expected.values()
            if e.status is MessageStatus.INFLIGHT
            and e.lease_until is not None
            and e.lease_until < now
        ]
        assert self.run(self.store.requeue_inflight(expired_only=True)) == len(expired)
        self._requeue(expired)

    @rule(seconds=st.integers(1, 90))
    def time_passes(self, seconds: int) -> None:
        self.clock.advance(seconds)

    @rule(picks=st.lists(st.integers(0, 10_000), max_size=4), all_dead=st.booleans())
    def operator_retry(self, picks: list[int], all_dead: bool) -> None:
        now = self.clock.now()
        known = sorted(self.expected)
        # Existing ids of any status, plus one that does not exist.
        ids = [known[p % len(known)] for p in picks] if known else []
        ids.append(len(known) + 1_000)
        if all_dead:
            chosen = [e for e in self.expected.values() if e.status is MessageStatus.DEAD]
        else:
            revivable = (MessageStatus.DEAD, MessageStatus.PENDING)
            chosen = [
                self.expected[i]
                for i in set(ids)
                if i in self.expected and self.expected[i].status in revivable
            ]
        assert self.run(self.store.retry_messages(ids, all_dead=all_dead)) == len(chosen)
        for e in chosen:
            e.status, e.attempts, e.next_attempt_at = MessageStatus.PENDING, 0, now

    @precondition(
        lambda self: any(e.status is MessageStatus.INFLIGHT for e in self.expected.values())
    )
    @rule()
    def crash_and_restart(self) -> None:
        # The owner of the leases stops without settling them; the next one to serve takes
        # them back, as the app does at start-up. Every row is then compared with the model.
        self.run(self.store.close())
        self.store = self.run(Store.open(self.path, clock=self.clock, serve=True))
        inflight = [e for e in self.expected.values() if e.status is MessageStatus.INFLIGHT]
        assert self.run(self.store.requeue_inflight(expired_only=False)) == len(inflight)
        self._requeue(inflight)

    async def _read_back(self) -> tuple[list[MessageRecord], dict[str, DestinationStats]]:
        rows = await self.store.list_messages(limit=10_000)
        return rows, {d: await self.store.stats(d) for d in (DEST, OTHER)}

    @invariant()
    def the_database_agrees_with_the_model(self) -> None:
        rows, stats = self.run(self._read_back())
        # Every message enqueued is there once, in exactly one status: the model's.
        assert sorted(r.id for r in rows) == sorted(self.expected)
        for r in rows:
            e = self.expected[r.id]
            assert (r.destination, r.idempotency_key, r.body) == (e.destination, e.key, e.body)
            assert (r.status, r.attempts, r.next_attempt_at, r.lease_until) == (
                e.status,
                e.attempts,
                e.next_attempt_at,
                e.lease_until,
            )
        # Each idempotency key has at most one row per destination.
        keys = Counter((r.destination, r.idempotency_key) for r in rows)
        assert max(keys.values(), default=0) <= 1
        for destination, figures in stats.items():
            mine = [e.status for e in self.expected.values() if e.destination == destination]
            assert figures.counts == {s: mine.count(s) for s in MessageStatus}


def test_random_histories_keep_the_outbox_invariants() -> None:
    """Any mix of enqueue, claim, settle, expiry, operator retry and restart keeps the model."""
    run_state_machine_as_test(
        OutboxHistory,
        settings=settings(max_examples=40, stateful_step_count=30, deadline=None),
    )
