"""What only the PostgreSQL backend does: several relays on one database.

Against a real server (tests/pg.py: a fresh database per test; skipped with the reason when
there is no server): migrations under an advisory lock, claims with FOR UPDATE SKIP LOCKED
across stores, LISTEN/NOTIFY wake-ups between stores, start-up that leaves live leases of other
replicas alone, `relay migrate` (schema, and --from-sqlite to move an installation), and URLs
whose password never reaches a message or a log. The behaviour both backends share is pinned
in tests/test_store_contract.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import signal
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest
import structlog
from pytest_aiohttp import AiohttpClient

from relay.app import METRICS, STORE, create_app
from relay.config import Config
from relay.models import (
    Dead,
    EventFilter,
    EventStatus,
    InboundDraft,
    IngestOutcome,
    MessageStatus,
    OutboundDraft,
    PolarKind,
    PolarRecord,
    RetryLater,
    SnapshotCoverage,
)
from relay.store import Store, open_store
from relay.store import migrations as sqlite_migrations
from relay.store.postgres import PgDb, _safe
from relay.store.postgres import migrations as postgres_migrations
from tests.helpers import (
    REPO,
    FakeClock,
    FakeFaurya,
    RelayProcess,
    Run,
    env,
    fixture_body,
    order_paid,
    process_env,
    relay_command,
    run_command,
    sign_headers,
    wait_until,
)
from tests.pg import (
    Cluster,
    create_database,
    drop_database,
    free_port,
    pg_rows,
    relay_on,
    start_cluster,
)

# An hour ago: recent enough that the retention of a relay started in a test keeps it all.
T0 = float(int(time.time()) - 3600)
DEST = "faurya"
LEASE_S = 30.0
PASSWORD = "s3cret-pw"
LATEST = max(version for version, _ in postgres_migrations())


# ------------------------------------------------------------------ helpers


def purchase(key: str) -> bytes:
    """A revenue call body as the shipped mapping makes it (the relay sends bytes as stored)."""
    return (
        f'{{"event":"purchase","amount":4410,"currency":"USD","orderId":"{key}",'
        f'"provider":"polar","providerPaymentId":"{key}"}}'
    ).encode()


def draft(webhook_id: str, *keys: str, status: EventStatus = EventStatus.ROUTED) -> InboundDraft:
    return InboundDraft(
        source="polar",
        webhook_id=webhook_id,
        event_type="order.paid",
        received_at=T0,
        headers={"webhook-id": webhook_id},
        body=f'{{"type": "order.paid", "id": "{webhook_id}"}}'.encode(),
        status=status,
        reason=None if status is EventStatus.ROUTED else "no route selects it",
        messages=tuple(
            OutboundDraft("polar-order-paid", DEST, f"polar:order:{k}", purchase(k)) for k in keys
        ),
    )


async def seed(store: Store, *keys: str) -> list[int]:
    ids: list[int] = []
    for key in keys:
        result = await store.enqueue(draft(f"wh_{key}", key))
        assert result.outcome is IngestOutcome.ACCEPTED
        ids.extend(result.message_ids)
    return ids


@contextlib.asynccontextmanager
async def opened(location: str, clock: FakeClock, *, serve: bool) -> AsyncIterator[Store]:
    store = await open_store(location, clock=clock, serve=serve)
    try:
        yield store
    finally:
        await store.close()


async def relay_cli(*args: str, cwd: Path) -> Run:
    """The installed `relay` command, to completion (no relay variable in its environment)."""
    return await run_command(relay_command(), *args, cwd=cwd, timeout_s=30)


async def table_exists(url: str, table: str) -> bool:
    [(found,)] = await pg_rows(url, "SELECT to_regclass($1) IS NOT NULL", f"public.{table}")
    return bool(found)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock(T0)


# ------------------------------------------------------------------ schema


async def test_three_concurrent_opens_apply_each_migration_once(
    pg_url: str, clock: FakeClock
) -> None:
    """Three stores opening an empty database at once (as three relays starting together)
    all come up at the latest schema, and each migration ran exactly once."""
    stores = await asyncio.gather(
        open_store(pg_url, clock=clock, serve=True),
        open_store(pg_url, clock=clock, serve=True),
        open_store(pg_url, clock=clock, serve=False),
    )
    try:
        assert [await s.schema_version() for s in stores] == [LATEST] * 3
        assert all(s.exclusive is False for s in stores)  # PostgreSQL's: shared
    finally:
        for store in stores:
            await store.close()

    applied = await pg_rows(pg_url, "SELECT version, count(*) FROM relay_schema GROUP BY 1")
    assert sorted(applied) == [(version, 1) for version, _ in postgres_migrations()]
    async with opened(pg_url, clock, serve=True) as again:  # reopening applies nothing
        assert await again.schema_version() == LATEST
    assert await pg_rows(pg_url, "SELECT count(*) FROM relay_schema") == [(len(applied),)]


async def test_the_postgresql_schema_has_the_sqlite_tables_columns_and_indexes(
    pg_url: str, tmp_path: Path, clock: FakeClock
) -> None:
    """Both backends' migrations end in the same tables, columns and named indexes, and the
    same uniqueness rules (webhook-id per source, key per destination)."""
    sqlite_path = tmp_path / "relay.db"
    async with opened(str(sqlite_path), clock, serve=False) as store:
        assert await store.schema_version() == max(v for v, _ in sqlite_migrations())
    async with opened(pg_url, clock, serve=False):
        pass

    with contextlib.closing(sqlite3.connect(sqlite_path)) as db:
        sqlite_columns = set(
            db.execute(
                "SELECT m.name, p.name FROM sqlite_master m JOIN pragma_table_info(m.name) p "
                "WHERE m.type = 'table'"
            )
        )
        sqlite_indexes = set(
            db.execute(
                "SELECT tbl_name, name FROM sqlite_master WHERE type = 'index' "
                "AND name NOT LIKE 'sqlite_autoindex_%'"
            )
        )
    pg_columns = set(
        await pg_rows(
            pg_url,
            "SELECT table_name, column_name FROM information_schema.columns "
            "WHERE table_schema = 'public' AND table_name != 'relay_schema'",
        )
    )
    pg_indexes = set(
        await pg_rows(
            pg_url,
            "SELECT tablename, indexname FROM pg_indexes WHERE schemaname = 'public' "
            "AND indexname NOT LIKE '%_pkey' AND indexname NOT LIKE '%_key'",
        )
    )
    assert pg_columns == sqlite_columns
    assert pg_indexes == sqlite_indexes
    unique = await pg_rows(
        pg_url,
        "SELECT conrelid::regclass::text, pg_get_constraintdef(oid) FROM pg_constraint "
        "WHERE contype = 'u' AND connamespace = 'public'::regnamespace ORDER BY 1",
    )
    assert unique == [
        ("inbound_events", "UNIQUE (source, webhook_id)"),
        ("outbound_messages", "UNIQUE (destination, idempotency_key)"),
    ]


async def test_durability_and_size_are_reported_from_the_server(
    pg_url: str, clock: FakeClock
) -> None:
    """pragmas() reports synchronous_commit (on: a commit returns once its WAL is flushed),
    and db_size_bytes() the database's size."""
    async with opened(pg_url, clock, serve=True) as store:
        assert await store.pragmas() == {"synchronous_commit": "on"}
        assert await store.db_size_bytes() > 0
        assert store.exclusive is False


# ------------------------------------------------------------------ several stores, one database


async def test_two_serving_stores_never_claim_the_same_message(
    pg_url: str, clock: FakeClock
) -> None:
    """Two serving stores (two relays) claiming concurrently, many claims each, split every
    due message between them without overlap, and no claim exceeds its limit."""
    async with (
        opened(pg_url, clock, serve=True) as first,
        opened(pg_url, clock, serve=True) as second,
    ):
        ids = await seed(first, *(f"order-{n}" for n in range(200)))
        claims = await asyncio.gather(
            *(store.claim(DEST, 5, LEASE_S) for _ in range(30) for store in (first, second))
        )
        assert max(len(batch) for batch in claims) <= 5
        claimed = [m.id for batch in claims for m in batch]
        assert len(claimed) == len(set(claimed)) == 200
        assert sorted(claimed) == sorted(ids)
        from_first = {m.id for batch in claims[0::2] for m in batch}
        from_second = {m.id for batch in claims[1::2] for m in batch}
        assert from_first  # both took a share
        assert from_second
        assert (await second.stats(DEST)).counts[MessageStatus.INFLIGHT] == 200
        # Each settles its own claims; the other's token is worthless to it.
        mine = next(batch[0] for batch in claims[0::2] if batch)
        assert await first.mark_delivered(mine, 200)
        assert not await second.mark_delivered(mine, 200)


async def test_a_commit_on_one_store_wakes_the_workers_of_another(
    pg_url: str, clock: FakeClock
) -> None:
    """An enqueue committed by store A reaches store B's on_commit (LISTEN/NOTIFY) with the
    destination, without B polling; a non-serving store listens to nothing."""
    async with (
        opened(pg_url, clock, serve=True) as writer,
        opened(pg_url, clock, serve=True) as listener,
        opened(pg_url, clock, serve=False) as operator,
    ):
        woken: list[set[str]] = []
        unwoken: list[set[str]] = []
        arrived = asyncio.Event()

        def on_commit(destinations: set[str]) -> None:
            woken.append(destinations)
            arrived.set()

        listener.on_commit = on_commit
        operator.on_commit = unwoken.append

        await writer.enqueue(draft("wh_1", "order-1"))
        async with asyncio.timeout(15):
            await arrived.wait()
        assert woken == [{DEST}]

        arrived.clear()
        await writer.enqueue(draft("wh_2", status=EventStatus.IGNORED))
        await writer.enqueue(draft("wh_3", "order-3"))
        async with asyncio.timeout(15):
            await arrived.wait()
        # Notifications arrive in commit order: the ignored event's commit sent none.
        assert woken == [{DEST}, {DEST}]
        assert unwoken == []


async def test_a_serving_open_requeues_only_expired_leases_of_other_relays(
    pg_url: str, clock: FakeClock, config: Config, faurya: FakeFaurya, aiohttp_client: AiohttpClient
) -> None:
    """A relay starting on a shared database leaves another relay's live lease alone and takes
    back only leases that ran out (logged), then delivers those; the live owner still acks."""
    async with opened(pg_url, clock, serve=True) as other_relay:
        await seed(other_relay, "expired", "live")
        [expired] = await other_relay.claim(DEST, 1, 10)
        [live] = await other_relay.claim(DEST, 1, 1000)
        assert (live.idempotency_key, expired.idempotency_key) == (
            "polar:order:live",
            "polar:order:expired",
        )
        clock.advance(11)

        with structlog.testing.capture_logs() as logs:
            client = await aiohttp_client(
                create_app(config, clock=clock, db_path=pg_url, poll_interval_s=0.05)
            )
            [call] = await faurya.wait_for(1)

        store = client.app[STORE]
        assert store.exclusive is False
        assert [e["recovered"] for e in logs if e["event"] == "store_opened"] == [1]
        assert [e["count"] for e in logs if e["event"] == "leases_recovered_at_startup"] == [1]
        assert call.headers["idempotency-key"] == "polar:order:expired"
        assert call.body == purchase("expired")
        row = await store.get_message(live.id)
        assert row is not None
        assert (row.status, row.lease_until) == (MessageStatus.INFLIGHT, T0 + 1000)
        assert await other_relay.mark_delivered(live, 200)  # its owner's lease held
        assert len(faurya.received) == 1


async def test_a_lost_database_connection_is_reconnected_without_losing_a_webhook(
    pg_url: str, pg_server: str, config: Config, aiohttp_client: AiohttpClient
) -> None:
    """When the server drops the relay's connections (a PostgreSQL restart or failover), the
    relay reconnects by itself: a webhook caught in the drop is answered 503 (Polar retries
    it) with nothing stored, every later one is accepted, `/readyz` is ready again, and each
    accepted webhook is stored exactly once."""
    client = await aiohttp_client(create_app(config, db_path=pg_url, poll_interval_s=0.05))
    assert (await client.get("/readyz")).status == 200
    name = pg_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", name
        )
    finally:
        await admin.close()

    answers = []
    for n in range(5):
        body = order_paid(f"3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a{n:02d}")
        resp = await client.post("/webhooks/polar", data=body, headers=sign_headers(body))
        answers.append(resp.status)
    ready = await client.get("/readyz")

    assert set(answers) <= {202, 503}, answers
    assert answers[-1] == 202  # reconnected: no restart needed
    assert ready.status == 200
    accepted = answers.count(202)
    assert await pg_rows(pg_url, "SELECT count(*) FROM inbound_events") == [(accepted,)]
    assert await pg_rows(pg_url, "SELECT count(*) FROM outbound_messages") == [(accepted,)]


@pytest.fixture
async def own_cluster() -> AsyncIterator[Cluster]:
    """A PostgreSQL server of this test's own, which it may stop (the session's server is
    shared)."""
    try:
        cluster = await asyncio.to_thread(start_cluster)
    except RuntimeError as exc:
        pytest.skip(f"no local PostgreSQL to stop: {exc}")
    try:
        yield cluster
    finally:
        await asyncio.to_thread(cluster.stop)


async def test_a_stopped_postgresql_answers_503_with_the_storage_error_log_and_metric(
    own_cluster: Cluster, config: Config, aiohttp_client: AiohttpClient
) -> None:
    """PostgreSQL stopped mid-run: a webhook whose route reads the outbox (a refund's lookup)
    and one that only writes (an order) both answer 503, so Polar retries, with the
    `webhook_store_failed` log line and the `storage_error` count the SQLite path has; none is
    a 500 or an internal error."""
    url = await create_database(own_cluster.url)
    client = await aiohttp_client(create_app(config, db_path=url, poll_interval_s=0.05))
    assert (await client.get("/readyz")).status == 200
    await asyncio.to_thread(
        own_cluster.run,
        "pg_ctl",
        "-D",
        str(own_cluster.base / "data"),
        "-m",
        "immediate",
        "-w",
        "stop",
    )

    refund = fixture_body("refund.created.json")
    order = order_paid(str(uuid.uuid4()))
    with structlog.testing.capture_logs() as captured:
        answers = []
        for body in (refund, order):
            async with client.post(
                "/webhooks/polar", data=body, headers=sign_headers(body)
            ) as resp:
                answers.append((resp.status, resp.headers.get("Retry-After")))

    assert answers == [(503, "5"), (503, "5")]
    failed = [e for e in captured if e["event"] == "webhook_store_failed"]
    assert [e["event_type"] for e in failed] == ["refund.created", "order.paid"]
    assert not [e for e in captured if e["event"] == "request_failed"]
    registry = client.app[METRICS].registry
    for event_type in ("refund.created", "order.paid"):
        labels = {"source": "polar", "event_type": event_type, "outcome": "storage_error"}
        assert registry.get_sample_value("relay_webhooks_received_total", labels) == 1


async def test_listen_is_re_established_after_a_postgresql_restart(
    own_cluster: Cluster, config: Config, faurya: FakeFaurya, aiohttp_client: AiohttpClient
) -> None:
    """PostgreSQL restarts under a serving relay (as in a failover): the relay says it lost
    LISTEN (`notify_listen_lost`, relay_store_notify_fallback_polling 1: its workers poll),
    listens again by itself once the server is back (`notify_listen_restored`, gauge 0), and
    a message enqueued by another process then wakes its worker at once, though it polls
    only every 30 s."""
    url = await create_database(own_cluster.url)
    data = str(own_cluster.base / "data")
    with structlog.testing.capture_logs() as captured:
        client = await aiohttp_client(create_app(config, db_path=url, poll_interval_s=30))
        registry = client.app[METRICS].registry

        def fallback() -> float | None:
            return registry.get_sample_value("relay_store_notify_fallback_polling")

        def events() -> list[str]:
            return [e["event"] for e in captured if e["event"].startswith("notify_listen_")]

        async def lost() -> bool:
            return events() == ["notify_listen_lost"]

        async def restored() -> bool:
            return events() == ["notify_listen_lost", "notify_listen_restored"]

        assert fallback() == 0
        await asyncio.to_thread(own_cluster.run, "pg_ctl", "-D", data, "-m", "fast", "-w", "stop")
        await wait_until(lost)
        assert fallback() == 1
        [lost_line] = [e for e in captured if e["event"] == "notify_listen_lost"]
        assert lost_line["fallback_poll_s"] == 30

        port = own_cluster.url.rsplit(":", 1)[1].split("/")[0]
        options = f"-p {port} -k {own_cluster.base} -c listen_addresses=127.0.0.1 -c fsync=off"
        started = await asyncio.to_thread(
            own_cluster.run,
            "pg_ctl",
            "-D",
            data,
            "-l",
            str(own_cluster.base / "log"),
            "-w",
            "-o",
            options,
            "start",
        )
        assert started.returncode == 0, started.stderr
        await wait_until(restored)
        assert fallback() == 0

        async with opened(url, FakeClock(time.time()), serve=False) as other:
            await other.enqueue_now([draft("wh_after_restart", "after-restart")])
        [call] = await faurya.wait_for(1, timeout_s=10)  # the poll would take 30 s
        assert call.body == purchase("after-restart")


# ------------------------------------------------------------------ relay migrate


async def test_relay_migrate_prints_the_schema_version(pg_url: str, tmp_path: Path) -> None:
    """`relay migrate --db URL` creates the schema and prints its version; run again it
    changes nothing."""
    for _ in range(2):
        done = await relay_cli("migrate", "--db", pg_url, cwd=tmp_path)
        assert (done.code, done.err) == (0, "")
        assert done.out == f"schema at version {LATEST} ({pg_url})\n"
    assert await pg_rows(pg_url, "SELECT version FROM relay_schema ORDER BY 1") == [
        (version,) for version, _ in postgres_migrations()
    ]


@dataclass
class SqliteOutbox:
    """A SQLite outbox with a message in every state, as a stopped relay leaves it."""

    path: Path
    pending: set[str]  # keys still to deliver once moved (inflight ones included)


ALL_KINDS = tuple(PolarKind)
SNAPSHOT = [
    PolarRecord(PolarKind.ORDER, "o1", T0 - 60, "paid", b'{"id": "o1"}', T0),
    PolarRecord(PolarKind.REFUND, "r1", T0 - 30, "succeeded", b'{"id": "r1"}', T0),
]


async def build_sqlite_outbox(path: Path) -> SqliteOutbox:
    clock = FakeClock(T0)
    async with opened(str(path), clock, serve=True) as store:
        for key in ("retrying", "inflight", "delivered", "dead", "new"):
            await store.enqueue(draft(f"wh_{key}", key))
        await store.enqueue(draft("wh_ignored", status=EventStatus.IGNORED))
        retrying, inflight, delivered, dead = await store.claim(DEST, 4, LEASE_S)
        clock.advance(5)
        assert await store.mark_retry(
            retrying, RetryLater(T0 + 60, "server_error", 500), "HTTP 500: oops"
        )
        assert await store.mark_delivered(delivered, 200)
        assert await store.mark_dead(dead, Dead("client_error", 422), "HTTP 422")
        await store.set_paused("faurya-eu", True)
        await store.save_polar_records(SNAPSHOT)
        await store.finish_polar_snapshot(SnapshotCoverage(T0 - 86_400, None, T0, ALL_KINDS))
        assert inflight.idempotency_key == "polar:order:inflight"
    # Closed with the inflight claim unsettled: its relay was killed.
    return SqliteOutbox(path, {f"polar:order:{k}" for k in ("new", "retrying", "inflight")})


async def test_migrate_from_sqlite_copies_everything_and_a_postgres_relay_delivers_the_rest(
    pg_url: str,
    tmp_path: Path,
    config: Config,
    faurya: FakeFaurya,
    aiohttp_client: AiohttpClient,
) -> None:
    """`relay migrate --from-sqlite` copies every event and message with its id, key and body
    bytes (inflight back to pending, attempt not counted), the pause states, each
    destination's last success and error and the ledger's Polar snapshot with its coverage;
    then a relay on PostgreSQL delivers exactly the messages still pending, and new ids
    follow the old."""
    outbox = await build_sqlite_outbox(tmp_path / "old.db")
    clock = FakeClock(T0)
    async with opened(str(outbox.path), clock, serve=False) as sqlite_store:
        events = await sqlite_store.list_events(EventFilter())
        messages = await sqlite_store.list_messages(limit=100)
        paused = await sqlite_store.paused_overrides()
        activity = await sqlite_store.console_activity()
        coverage = await sqlite_store.snapshot_coverage()

    done = await relay_cli(
        "migrate", "--from-sqlite", str(outbox.path), "--db", pg_url, cwd=tmp_path
    )

    assert (done.code, done.err) == (0, "")
    assert done.out == (
        "copied 6 events and 5 messages (3 still to deliver, 1 dead) into PostgreSQL; "
        "now start the relays with storage.url\n"
    )
    expected = [
        dataclasses.replace(m, status=MessageStatus.PENDING, lease_until=None, attempts=0)
        if m.status is MessageStatus.INFLIGHT
        else m
        for m in messages
    ]
    async with opened(pg_url, clock, serve=False) as pg_store:
        # Dataclass equality: every field, ids, keys and body bytes included.
        assert await pg_store.list_events(EventFilter()) == events
        assert await pg_store.list_messages(limit=100) == expected
        assert await pg_store.paused_overrides() == paused == {"faurya-eu": True}
        assert await pg_store.console_activity() == activity
        assert set(activity) == {DEST}
        assert await pg_store.polar_snapshot() == SNAPSHOT
        assert await pg_store.snapshot_coverage() == coverage
        assert coverage is not None
        assert {
            m.idempotency_key for m in await pg_store.list_messages(status=MessageStatus.PENDING)
        } == outbox.pending
        # The sequences moved past the copied ids: a new event never collides with an old one.
        fresh = await pg_store.enqueue_now([draft("wh_after", "after")])
    assert fresh[0].event_id is not None
    assert fresh[0].event_id > max(e.id for e in events)
    assert min(fresh[0].message_ids) > max(m.id for m in messages)

    client = await aiohttp_client(create_app(config, db_path=pg_url, poll_interval_s=0.05))
    delivered = await faurya.wait_for(len(outbox.pending) + 1)
    store = client.app[STORE]

    async def settled() -> bool:
        counts = (await store.stats(DEST)).counts
        return counts[MessageStatus.PENDING] + counts[MessageStatus.INFLIGHT] == 0

    async with asyncio.timeout(10):
        while not await settled():  # noqa: ASYNC110 - a deadline-bound poll of the database
            await asyncio.sleep(0.02)
    sent = {c.headers["idempotency-key"]: c.body for c in faurya.received}
    assert len(faurya.received) == len(delivered) == 4
    assert sent == {
        **{m.idempotency_key: m.body for m in messages if m.idempotency_key in outbox.pending},
        "polar:order:after": purchase("after"),
    }
    counts = (await store.stats(DEST)).counts
    assert (counts[MessageStatus.DELIVERED], counts[MessageStatus.DEAD]) == (5, 1)


async def test_migrate_refuses_while_a_relay_serves_the_sqlite_file(
    pg_url: str, tmp_path: Path, faurya: FakeFaurya
) -> None:
    """While `relay serve` runs on the SQLite file, migrate refuses and touches nothing in
    PostgreSQL; after a SIGTERM it copies."""
    outbox = await build_sqlite_outbox(tmp_path / "relay.db")
    relay = RelayProcess(
        REPO / "relay.toml", outbox.path, process_env(**env(FAURYA_URL=faurya.url))
    )
    try:
        await relay.start()
        refused = await relay_cli(
            "migrate", "--from-sqlite", str(outbox.path), "--db", pg_url, cwd=tmp_path
        )
        assert (refused.code, refused.out) == (1, "")
        assert refused.err == (
            f"relay: error: a relay is serving {outbox.path}: stop it first (SIGTERM), "
            "then migrate\n"
        )
        assert not await table_exists(pg_url, "inbound_events")
        assert await relay.signal(signal.SIGTERM) == 0
    finally:
        await relay.close()

    done = await relay_cli(
        "migrate", "--from-sqlite", str(outbox.path), "--db", pg_url, cwd=tmp_path
    )
    assert done.code == 0, done.err
    # The relay delivered what was due before it stopped; the copy holds every event.
    assert await pg_rows(pg_url, "SELECT count(*) FROM inbound_events") == [(6,)]


async def test_migrate_refuses_a_postgresql_outbox_that_is_not_empty(
    pg_url: str, tmp_path: Path
) -> None:
    """A second copy into the same database is refused: histories are never merged, and the
    rows already there stay as they are."""
    outbox = await build_sqlite_outbox(tmp_path / "relay.db")
    argv = ("migrate", "--from-sqlite", str(outbox.path), "--db", pg_url)
    assert (await relay_cli(*argv, cwd=tmp_path)).code == 0
    before = await pg_rows(pg_url, "SELECT id, status, attempts FROM outbound_messages ORDER BY id")

    again = await relay_cli(*argv, cwd=tmp_path)

    assert (again.code, again.out) == (1, "")
    assert again.err == (
        "relay: error: the PostgreSQL outbox is not empty: refusing to merge histories\n"
    )
    assert await pg_rows(
        pg_url, "SELECT id, status, attempts FROM outbound_messages ORDER BY id"
    ) == (before)
    assert await pg_rows(pg_url, "SELECT count(*) FROM inbound_events") == [(6,)]


async def test_migrate_refuses_a_postgresql_outbox_with_only_a_polar_snapshot(
    pg_url: str, tmp_path: Path
) -> None:
    """A PostgreSQL outbox without events but with rows of a copied table (a PostgreSQL
    relay's reconcile stored Polar's snapshot and enqueued nothing) is not empty either: the
    copy is refused in one line, not ended by the driver's duplicate-key traceback, and the
    snapshot stays."""
    outbox = await build_sqlite_outbox(tmp_path / "relay.db")
    async with opened(pg_url, FakeClock(T0), serve=False) as store:
        await store.save_polar_records(SNAPSHOT)
        await store.finish_polar_snapshot(SnapshotCoverage(T0 - 86_400, None, T0, ALL_KINDS))

    refused = await relay_cli(
        "migrate", "--from-sqlite", str(outbox.path), "--db", pg_url, cwd=tmp_path
    )

    assert (refused.code, refused.out) == (1, "")
    assert refused.err == (
        "relay: error: the PostgreSQL outbox is not empty: refusing to merge histories\n"
    )
    assert await pg_rows(pg_url, "SELECT count(*) FROM inbound_events") == [(0,)]
    assert await pg_rows(pg_url, "SELECT count(*) FROM polar_snapshot") == [(len(SNAPSHOT),)]


async def test_migrate_from_sqlite_needs_a_postgresql_target(tmp_path: Path) -> None:
    """--from-sqlite with a SQLite --db is a usage error (exit 2) that names the fix."""
    outbox = await build_sqlite_outbox(tmp_path / "relay.db")

    done = await relay_cli(
        "migrate", "--from-sqlite", str(outbox.path), "--db", str(tmp_path / "b.db"), cwd=tmp_path
    )

    assert (done.code, done.out) == (2, "")
    assert done.err == (
        "relay: config error: --from-sqlite copies INTO PostgreSQL: give --db "
        "postgresql://... or set storage.url\n"
    )
    assert not (tmp_path / "b.db").exists()


# ------------------------------------------------------------------ the password in the URL


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://relay:s3cret-pw@db.internal:5432/relay",
            "postgresql://relay:***@db.internal:5432/relay",
        ),
        ("postgres://relay:s3cr%40t:pw@db/relay", "postgres://relay:***@db/relay"),
        (
            "postgresql://relay:s3cret-pw@h1:5432,h2:5432/relay?sslmode=require",
            "postgresql://relay:***@h1:5432,h2:5432/relay?sslmode=require",
        ),
        (
            "postgresql://relay@db/relay?sslmode=require&password=s3cret-pw",
            "postgresql://relay@db/relay?sslmode=require&password=***",
        ),
        ("postgresql://:s3cret-pw@db/relay", "postgresql://:***@db/relay"),
        ("postgresql://relay@db/relay", "postgresql://relay@db/relay"),
        ("postgresql:///relay?host=/run/postgresql", "postgresql:///relay?host=/run/postgresql"),
    ],
)
def test_the_shown_url_never_holds_the_password(url: str, shown: str) -> None:
    """_safe, through which every message and log line shows the URL, masks the password in
    each place a PostgreSQL URL can carry one, and changes nothing else."""
    assert _safe(url) == shown


@pytest.fixture
async def password_url(pg_server: str) -> AsyncIterator[str]:
    """A database owned by a role of its own, as a URL with that role's password."""
    role = f"relay_{uuid.uuid4().hex[:12]}"
    url = await create_database(pg_server)
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute(f"CREATE ROLE {role} LOGIN PASSWORD '{PASSWORD}'")
        await admin.execute(f'ALTER DATABASE "{url.rsplit("/", 1)[1]}" OWNER TO {role}')
    finally:
        await admin.close()
    try:
        yield url.replace("://postgres@", f"://{role}:{PASSWORD}@")
    finally:
        await drop_database(pg_server, url)
        admin = await asyncpg.connect(pg_server)
        try:
            await admin.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await admin.close()


async def test_operator_commands_never_print_the_password(
    password_url: str, tmp_path: Path
) -> None:
    """`relay migrate` and `relay outbox list` with a URL holding a password print it masked,
    also in errors (an unknown database, nothing listening, a malformed URL)."""
    masked = _safe(password_url)
    assert PASSWORD not in masked

    migrated = await relay_cli("migrate", "--db", password_url, cwd=tmp_path)
    listed = await relay_cli("outbox", "list", "--db", password_url, cwd=tmp_path)
    assert (migrated.code, migrated.out) == (0, f"schema at version {LATEST} ({masked})\n")
    assert (listed.code, listed.out.splitlines()[-1]) == (0, "(0 shown)")
    assert PASSWORD not in migrated.out + migrated.err + listed.out + listed.err
    outbox = await build_sqlite_outbox(tmp_path / "relay.db")

    unknown = password_url.rsplit("/", 1)[0] + "/no_such_database"
    port = free_port()
    closed = password_url.split("@")[0] + f"@127.0.0.1:{port}/relay"
    malformed = password_url.split("@")[0] + "@127.0.0.1:notaport/relay"
    failures = [
        await relay_cli("outbox", "list", "--db", url, cwd=tmp_path)
        for url in (unknown, closed, malformed)
    ] + [
        await relay_cli("migrate", "--from-sqlite", str(outbox.path), "--db", closed, cwd=tmp_path)
    ]
    for failed in failures:
        assert failed.code == 1
        assert failed.err.startswith("relay: error: ")
        assert "Traceback" not in failed.err
        assert PASSWORD not in failed.out + failed.err
    assert f"cannot open database {_safe(unknown)}: " in failures[0].err
    assert 'database "no_such_database" does not exist' in failures[0].err
    assert f"cannot open database {_safe(closed)}: " in failures[1].err
    assert f"cannot open database {_safe(malformed)}: " in failures[2].err
    assert failures[3].err == "relay: error: cannot reach PostgreSQL: ConnectionRefusedError\n"


async def test_a_serving_relay_never_logs_the_password(
    password_url: str, tmp_path: Path, faurya: FakeFaurya
) -> None:
    """`relay serve --db URL` logs the store it opened with the password masked, and so does
    its one-line error when the database cannot be reached."""
    environ = process_env(**env(FAURYA_URL=faurya.url))
    relay = relay_on(password_url, REPO / "relay.toml", environ)
    try:
        await relay.start()
        opened_log = await relay.wait_log("store_opened")
        assert opened_log["path"] == _safe(password_url)
        assert await relay.signal(signal.SIGTERM) == 0
    finally:
        await relay.close()
    assert relay.lines
    assert not [line for line in relay.lines if PASSWORD in line]

    closed = password_url.split("@")[0] + f"@127.0.0.1:{free_port()}/relay"
    failing = relay_on(closed, REPO / "relay.toml", environ)
    try:
        await failing.launch()
        assert await failing.wait(30) == 1
    finally:
        await failing.close()
    assert failing.lines[-1].startswith(f"relay: error: cannot open database {_safe(closed)}: ")
    assert not [line for line in failing.lines if PASSWORD in line]


async def test_a_commit_after_the_connection_died_fails_and_commits_nothing(
    pg_url: str, pg_server: str
) -> None:
    """A COMMIT whose transaction died with its connection must fail (so the webhook gets a
    503 and Polar retries), never reconnect and 'commit' an empty transaction as a success."""
    store = await open_store(pg_url)
    await store.close()  # creates the schema
    conn = await asyncpg.connect(pg_url)
    db = PgDb(conn, lambda: asyncpg.connect(pg_url))
    await db.execute("BEGIN IMMEDIATE")
    await db.execute("INSERT INTO relay_meta (key, value) VALUES (?, ?)", ("lost", "x"))
    admin = await asyncpg.connect(pg_server)
    try:
        await admin.execute("SELECT pg_terminate_backend($1)", conn.get_server_pid())
    finally:
        await admin.close()
    async with asyncio.timeout(15):  # a condition with a deadline: asyncpg sees the EOF
        while not conn.is_closed():  # noqa: ASYNC110
            await asyncio.sleep(0.01)

    with pytest.raises((asyncpg.PostgresError, asyncpg.InterfaceError)):
        await db.execute("COMMIT")

    assert await pg_rows(pg_url, "SELECT count(*) FROM relay_meta WHERE key = 'lost'") == [(0,)]
    await db.close()


async def test_backfill_fills_the_console_columns_of_messages_from_before_them(
    pg_url: str, tmp_path: Path
) -> None:
    """`relay backfill` gives messages stored before PostgreSQL's console migration (their
    search and revenue columns empty) the columns the mapping would have written, in
    batches; a body that is not a JSON object keeps them empty, and a second run finds
    nothing left to fill."""
    attributed = (
        b'{"event":"purchase","amount":990,"currency":"eur","orderId":"o-2",'
        b'"providerPaymentId":"p-2","attribution":{"faSessionId":"s-1"}}'
    )
    async with opened(pg_url, FakeClock(T0), serve=False) as store:
        # Messages without facts, as the relay wrote them before the console's columns.
        bodies = {"k1": purchase("o-1"), "k2": attributed, "k3": b"not json"}
        await store.enqueue_now(
            [
                dataclasses.replace(
                    draft(f"wh_{key}"),
                    messages=(OutboundDraft("polar-order-paid", DEST, key, body),),
                )
                for key, body in bodies.items()
            ]
        )
    columns = (
        "SELECT idempotency_key, order_id, payment_ref, event_kind, amount_minor, currency, "
        "attributed FROM outbound_messages ORDER BY id"
    )
    assert [row[1:] for row in await pg_rows(pg_url, columns)] == [(None,) * 6] * 3

    done = await relay_cli("backfill", "--db", pg_url, cwd=tmp_path)

    assert (done.code, done.err) == (0, "")
    assert done.out == "filled the search and revenue columns of 2 messages\n"
    assert await pg_rows(pg_url, columns) == [
        ("k1", "o-1", "o-1", "purchase", 4410, "USD", 0),
        ("k2", "o-2", "p-2", "purchase", 990, "EUR", 1),
        ("k3", None, None, None, None, None, None),
    ]
    again = await relay_cli("backfill", "--db", pg_url, cwd=tmp_path)
    assert (again.code, again.out) == (0, "no message left to fill\n")
