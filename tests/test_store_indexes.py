"""The insert path's indexes (migration 0008, docs/performance.md): the indexes that repeated
a unique one are gone and the search finds keys and webhook ids on the unique ones, under every
destination and source; the refund, revenue and amount indexes hold only the rows their queries
read; and a store written before the migration answers the console's search and sums the same
after it.
"""

from __future__ import annotations

import contextlib
import sqlite3
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest

from relay.console.service import ListFilters, Sort
from relay.models import (
    AttemptRecord,
    BodyFacts,
    Dead,
    IngestOutcome,
    MessageStatus,
    OutboundDraft,
)
from relay.store import Store, migrations, sql
from relay.store.console import AT_RISK_DEAD, _console_where, _search_sql
from tests.helpers import FakeClock
from tests.store_helpers import LEASE_S, T0, draft


@pytest.fixture
async def store(tmp_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    opened = await Store.open(str(tmp_path / "relay.db"), clock=clock, serve=True)
    try:
        yield opened
    finally:
        await opened.close()


def purchase(key: str, destination: str = "faurya", **facts: Any) -> OutboundDraft:
    values: dict[str, Any] = {"event_kind": "purchase", "currency": "USD", "attributed": True}
    values.update(facts)
    return OutboundDraft(
        route="order_paid",
        destination=destination,
        idempotency_key=key,
        body=b'{"event": "purchase"}',
        facts=BodyFacts(**values),
    )


async def enqueue(
    store: Store, webhook_id: str, *messages: OutboundDraft, source: str = "polar"
) -> list[int]:
    result = await store.enqueue(draft(webhook_id, *messages, source=source))
    assert result.outcome is IngestOutcome.ACCEPTED
    return list(result.message_ids)


async def deliver(store: Store, destination: str, *, dead: bool = False) -> None:
    """Claim every due message of `destination` and settle it."""
    attempt = AttemptRecord(at=T0, status=200, error_kind=None, duration_s=0.01)
    for claimed in await store.claim(destination, 100, LEASE_S):
        if dead:
            assert await store.mark_dead(claimed, Dead("client_error", 422), "HTTP 422", attempt)
        else:
            assert await store.mark_delivered(claimed, 200, attempt)


async def found(store: Store, q: str) -> list[int]:
    return [m.id for m in await store.console_messages(ListFilters(q=q), None, 50)]


async def test_search_finds_keys_and_webhook_ids_under_every_destination_and_source(
    store: Store,
) -> None:
    """A key is found whichever destination has it, a webhook id whichever source sent it,
    now that both are looked up on the unique (destination, key) and (source, webhook id)
    indexes; an unknown one finds nothing."""
    [first] = await enqueue(store, "wh_a", purchase("k_a", "faurya"))
    [second] = await enqueue(store, "wh_b", purchase("k_b", "backup"), source="shop")
    [third] = await enqueue(store, "wh_c", purchase("k_a", "backup"), source="shop")

    assert await found(store, "k_a") == [third, first]
    assert await found(store, "k_b") == [second]
    assert await found(store, "wh_a") == [first]
    assert await found(store, "wh_b") == [second]
    assert await found(store, "k_missing") == []

    # The dead-letter count and batches run the search inline (no ids looked up first).
    await deliver(store, "backup", dead=True)
    dead_k_a = ListFilters(statuses=(MessageStatus.DEAD,), q="k_a")
    assert await store.console_count_dead(dead_k_a) == 1
    assert await store.console_dead_batch(dead_k_a, 0, 10**9, 10) == [third]


async def test_revenue_at_risk_and_refund_search_read_their_partial_indexes(
    store: Store, clock: FakeClock
) -> None:
    """Delivered purchases are summed, dead ones counted at risk, a refund found by its id,
    and the dead-letter list sorted by amount, each from the indexes that hold just those
    rows (delivered; not delivered; refunds)."""
    await enqueue(store, "wh_1", purchase("k1", order_id="o1", amount_minor=500))
    await enqueue(store, "wh_2", purchase("k2", order_id="o2", amount_minor=700))
    await deliver(store, "faurya")
    await enqueue(store, "wh_3", purchase("k3", order_id="o3", amount_minor=300))
    await enqueue(store, "wh_4", purchase("k4", order_id="o4", amount_minor=900))
    await deliver(store, "faurya", dead=True)
    [refund] = await enqueue(
        store, "wh_5", purchase("k5", event_kind="refund", refund_id="re_1", amount_minor=200)
    )

    assert await store.console_revenue(clock.now() - 60) == [("purchase", "USD", 1200, 2, 0)]
    assert await store.console_at_risk(clock.now() + 60) == [("dead", "USD", 1200, 2)]
    assert await found(store, "re_1") == [refund]
    by_amount = ListFilters(statuses=(MessageStatus.DEAD,), sort=Sort.AMOUNT)
    assert [m.amount_minor for m in await store.console_messages(by_amount, None, 10)] == [
        900,
        300,
    ]


def test_the_console_queries_read_indexes_not_the_whole_table(tmp_path: Path) -> None:
    """Searching a key or webhook id, and the dead letters by amount, are index searches
    (SQLite's plan has no full scan of a table): what keeps them fast at a million rows."""
    path = tmp_path / "plan.db"
    with contextlib.closing(sqlite3.connect(path)) as db:
        for version, script in migrations():
            db.executescript(script)
            db.execute(f"PRAGMA user_version = {version}")
        statements = [_search_sql("k", 1000), _search_sql("k")]
        where = _console_where(ListFilters(statuses=(MessageStatus.DEAD,), sort=Sort.AMOUNT))
        statements.append(
            (
                f"SELECT m.id FROM outbound_messages m WHERE {where.sql} ORDER BY m.amount_minor",  # noqa: S608 - fixed text
                where.params,
            )
        )
        for statement, params in statements:
            plan = [str(r[3]) for r in db.execute(f"EXPLAIN QUERY PLAN {statement}", params)]
            assert not [step for step in plan if step.startswith("SCAN outbound_messages")], plan
            assert not [step for step in plan if step.startswith("SCAN inbound_events")], plan
            assert not [step for step in plan if step.startswith("SCAN m")], plan
        search_plan = " ".join(
            str(r[3])
            for r in db.execute(f"EXPLAIN QUERY PLAN {statements[0][0]}", statements[0][1])
        )
        assert "sqlite_autoindex_outbound_messages_1 (destination=? AND idempotency_key=?)" in (
            search_plan
        )
        assert "sqlite_autoindex_inbound_events_1 (source=? AND webhook_id=?)" in search_plan
        assert "outbound_messages_status_amount" in " ".join(
            str(r[3])
            for r in db.execute(f"EXPLAIN QUERY PLAN {statements[2][0]}", statements[2][1])
        )
        # Retention's "delivered before" and the dead purchases' sum read the partial indexes
        # that replaced (status, delivered_at) and (status, amount_minor, id).
        retention = " ".join(
            str(r[3]) for r in db.execute(f"EXPLAIN QUERY PLAN {sql.PRUNE[1]}", (T0, 1000))
        )
        assert "outbound_messages_revenue (status=? AND delivered_at<?)" in retention
        at_risk = " ".join(str(r[3]) for r in db.execute(f"EXPLAIN QUERY PLAN {AT_RISK_DEAD}"))
        assert "COVERING INDEX outbound_messages_status_amount" in at_risk


def store_at(path: Path, version: int) -> sqlite3.Connection:
    db = sqlite3.connect(path)
    for number, script in migrations():
        if number > version:
            break
        db.executescript(script)
        db.execute(f"PRAGMA user_version = {number}")
    return db


def index_sql(path: Path) -> dict[str, str | None]:
    with contextlib.closing(sqlite3.connect(path)) as db:
        return dict(db.execute("SELECT name, sql FROM sqlite_master WHERE type = 'index'"))


async def test_migration_8_drops_the_repeated_indexes_and_keeps_the_answers(
    tmp_path: Path, clock: FakeClock
) -> None:
    """A store written at schema 7 loses the two indexes that repeated a unique one and the
    one the revenue index covers, gets the partial ones, and still finds and sums what an
    older relay stored."""
    path = tmp_path / "old.db"
    db = store_at(path, 7)
    db.execute(
        "INSERT INTO inbound_events (id, source, webhook_id, event_type, received_at, "
        "headers_json, body, status) VALUES (1, 'polar', 'wh_old', 'order.paid', 0, '{}', "
        "NULL, 'routed')"
    )
    for n, (status, delivered_at, refund) in enumerate(
        [("delivered", clock.now(), None), ("dead", None, None), ("pending", None, "re_old")]
    ):
        db.execute(
            "INSERT INTO outbound_messages (event_id, route, destination, idempotency_key, "
            "body, status, created_at, retry_from_at, next_attempt_at, updated_at, "
            "delivered_at, refund_id, event_kind, currency, amount_minor, attributed) "
            "VALUES (1, 'r', 'faurya', ?, x'7b7d', ?, 0, 0, 0, 0, ?, ?, 'purchase', 'EUR', "
            "100, 1)",
            (f"k_old_{n}", status, delivered_at, refund),
        )
    db.commit()
    db.close()
    before = index_sql(path)
    assert {"outbound_messages_idempotency", "inbound_events_webhook"} <= before.keys()

    store = await Store.open(str(path), clock=clock)
    try:
        assert await found(store, "k_old_1") == [2]
        assert await found(store, "wh_old") == [3, 2, 1]
        assert await found(store, "re_old") == [3]
        assert await store.console_revenue(clock.now() - 60) == [("purchase", "EUR", 100, 1, 0)]
        assert await store.console_at_risk(clock.now() + 60) == [
            ("dead", "EUR", 100, 1),
            ("pending", "EUR", 100, 1),
        ]
    finally:
        await store.close()

    after = index_sql(path)
    for gone in (
        "outbound_messages_idempotency",
        "inbound_events_webhook",
        "outbound_messages_delivered",
    ):
        assert gone not in after
    assert "WHERE refund_id IS NOT NULL" in str(after["outbound_messages_refund"])
    assert "WHERE delivered_at IS NOT NULL" in str(after["outbound_messages_revenue"])
    assert "WHERE status != 'delivered'" in str(after["outbound_messages_status_amount"])
