"""Reconciliation against the fake Polar API: what Polar knows and the relay does not is
enqueued exactly once, through the same routes and keys as webhooks.

The relay side is real: a `Store` on a file in tmp_path (or the whole app), the shipped config
pointed at the fake, and `relay reconcile` as a subprocess for the command-line behaviour.
"""

from __future__ import annotations

import dataclasses
import json
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay.app import METRICS, POLAR_API, STORE, WORKERS, create_app
from relay.config import Config
from relay.models import EventFilter, MessageRecord, MessageStatus
from relay.polar_api import PolarApi
from relay.reconcile import Reconciler, Summary
from relay.store import Store
from tests import conftest
from tests.helpers import (
    LEGACY_SECRET,
    REPO,
    SITE_ID,
    WRITE_KEY,
    Client,
    FakeClock,
    FakeFaurya,
    LogList,  # noqa: F401 - re-exported: defined here before
    order_paid,
    process_env,
    relay_command,
    run_command,
    shipped_config,
    sign_headers,
    wait_until,
)
from tests.polar_fake import FakePolar, with_polar_api


@pytest.fixture
def config(faurya: FakeFaurya, migrated_db_path: Path, polar: FakePolar) -> Config:
    """The shipped config on a migrated database, delivering to the fake Faurya (in-process:
    see conftest's `config`), reading the fake Polar API."""
    shipped = shipped_config(faurya.url, migrated_db_path)
    return with_polar_api(conftest.in_process_delivery(shipped), polar)


@pytest.fixture
async def store(db_path: Path, clock: FakeClock) -> AsyncIterator[Store]:
    """The outbox as `relay reconcile` opens it: without serving."""
    store = await Store.open(str(db_path), clock=clock)
    yield store
    await store.close()


@pytest.fixture
async def api(polar: FakePolar) -> AsyncIterator[PolarApi]:
    async with aiohttp.ClientSession() as session:
        yield PolarApi(session, polar.url, polar.token, min_interval_s=0.0, max_tries=3)


async def reconcile(
    store: Store,
    config: Config,
    api: PolarApi,
    clock: FakeClock,
    since: float | None = None,
    *,
    dry_run: bool = False,
) -> Summary:
    return await Reconciler(store, config, api, clock, dry_run=dry_run).run(since, None)


async def by_key(store: Store) -> dict[str, MessageRecord]:
    return {m.idempotency_key: m for m in await store.list_messages(limit=10_000)}


async def store_events(store: Store) -> list[dict[str, Any]]:
    return [
        {"webhook_id": e.webhook_id, "body": json.loads(e.body or b"null")}
        for e in await store.list_events(EventFilter())
    ]


def purchase(order: dict[str, Any], **attribution: str | None) -> dict[str, Any]:
    """The Faurya purchase the shipped route makes of a purchase-fixture order."""
    return {
        "event": "purchase",
        "amount": 4410,
        "currency": "USD",
        "orderId": "ord_7Hq2kP9xL3",
        "provider": "polar",
        "providerPaymentId": order["id"],
        "attribution": {
            "faVisitorId": "v_5f2c9e1ab7d34c0e",
            "faSessionId": "s_81d0c4a2e9f7",
            "faAttributionToken": "fat_eyJ2IjoxLCJzIjoiczgxZDBjNGEyZTlmNyJ9",
            **attribution,
        },
    }


# ---------------------------------------------------------------- the reconciler on a store


async def test_orders_the_relay_never_saw_are_enqueued(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """Paid orders Polar has and the outbox lacks become order.paid events with the route's
    keys and bodies, each under a reconcile:<type>:<id> webhook id."""
    bought = polar.add_order()
    subscribed = polar.add_order("order.paid.subscription_create.json")

    summary = await reconcile(store, config, api, clock)

    assert (summary.seen, summary.already_recorded, summary.enqueued) == (2, 0, 2)
    assert summary.unmappable == summary.ignored == 0
    messages = await by_key(store)
    assert set(messages) == {f"polar:order:{bought['id']}", f"polar:order:{subscribed['id']}"}
    one = messages[f"polar:order:{bought['id']}"]
    assert json.loads(one.body) == purchase(bought)
    assert (one.webhook_id, one.event_type) == (
        f"reconcile:order.paid:{bought['id']}",
        "order.paid",
    )
    assert (one.status, one.destination, one.route) == (
        MessageStatus.PENDING,
        "faurya",
        "polar-order-paid",
    )
    other = json.loads(messages[f"polar:order:{subscribed['id']}"].body)
    assert (other["amount"], other["currency"], other["orderId"]) == (1900, "EUR", "ord_Sub77aa01")
    assert other["attribution"]["faAttributionToken"] is None  # "" in Polar's metadata
    [event] = [e for e in await store_events(store) if e["webhook_id"] == one.webhook_id]
    assert event["body"]["type"] == "order.paid"
    assert event["body"]["data"] == bought


async def test_reconciling_twice_enqueues_nothing_the_second_time(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """A second run finds every order already recorded and leaves the outbox as it was."""
    polar.add_order()
    polar.add_order()
    polar.add_refund(polar.orders[0])
    first = await reconcile(store, config, api, clock)
    before = await by_key(store)

    second = await reconcile(store, config, api, clock)

    assert (first.seen, first.enqueued) == (3, 3)
    assert (second.seen, second.already_recorded, second.enqueued) == (3, 3, 0)
    assert await by_key(store) == before
    assert await store.event_count() == 3


async def test_unpaid_orders_are_skipped(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """Pending, void and draft orders are not revenue: not seen, not enqueued."""
    paid = polar.add_order()
    for status in ("pending", "void", "draft"):
        polar.add_order(status=status)

    summary = await reconcile(store, config, api, clock)

    assert (summary.seen, summary.enqueued) == (1, 1)
    assert set(await by_key(store)) == {f"polar:order:{paid['id']}"}
    assert await store.event_count() == 1


async def test_since_stops_paging_at_the_cut_off(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """Newest first: the run stops at the first order older than --since, so of three pages
    only the first is fetched; without a cut-off all three are."""
    polar.add_orders(201, start=datetime.now(UTC), step=timedelta(minutes=1))
    since = time.time() - 150  # the three newest orders (0, 1 and 2 minutes old)

    summary = await reconcile(store, config, api, clock, since)

    assert (summary.seen, summary.enqueued) == (3, 3)
    assert [c.query["page"] for c in polar.requests_to("/v1/orders/")] == ["1"]
    assert set(await by_key(store)) == {f"polar:order:{o['id']}" for o in polar.orders[:3]}

    everything = await reconcile(store, config, api, clock, None, dry_run=True)

    assert [c.query["page"] for c in polar.requests_to("/v1/orders/")] == ["1", "1", "2", "3"]
    assert (everything.seen, everything.already_recorded, everything.enqueued) == (201, 3, 198)
    assert len(await by_key(store)) == 3  # a dry run enqueues nothing


async def test_until_leaves_out_newer_orders(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """Orders created at or after --until are outside the window: not seen, not enqueued."""
    now = datetime.now(UTC)
    new = polar.add_order(created_at=now)
    old = polar.add_order(created_at=now - timedelta(hours=2))

    summary = await Reconciler(store, config, api, clock).run(None, time.time() - 3600)

    assert (summary.seen, summary.enqueued) == (1, 1)
    assert set(await by_key(store)) == {f"polar:order:{old['id']}"}
    assert f"polar:order:{new['id']}" not in await by_key(store)


async def test_succeeded_refunds_are_reconciled_with_the_purchase_lookup(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """A succeeded refund becomes a Faurya refund carrying the recorded purchase's orderId and
    attribution; one whose purchase the relay never saw falls back to Polar's order id; a
    pending refund is not reconciled (refunds are listed whatever their status, so that one
    undone later is seen too)."""
    order = polar.add_order()
    refund = polar.add_refund(order, amount=2000)
    polar.add_refund(order, amount=500, status="pending")
    stranger = polar.add_refund("0e1d2c3b-4a59-4687-9a0b-1c2d3e4f5a6b", amount=700)

    summary = await reconcile(store, config, api, clock)

    assert (summary.seen, summary.enqueued) == (3, 3)  # the order and two succeeded refunds
    [call] = polar.requests_to("/v1/refunds/")
    assert "succeeded" not in call.query
    messages = await by_key(store)
    assert set(messages) == {
        f"polar:order:{order['id']}",
        f"polar:refund:{refund['id']}",
        f"polar:refund:{stranger['id']}",
    }
    recorded = messages[f"polar:refund:{refund['id']}"]
    assert recorded.webhook_id == f"reconcile:refund.updated:{refund['id']}"
    assert json.loads(recorded.body) == {
        "event": "refund",
        "amount": 2000,
        "currency": "USD",
        "orderId": "ord_7Hq2kP9xL3",
        "provider": "polar",
        "providerPaymentId": order["id"],
        "refundId": refund["id"],
        "attribution": purchase(order)["attribution"],
    }
    unknown = json.loads(messages[f"polar:refund:{stranger['id']}"].body)
    assert unknown["orderId"] == stranger["order_id"]
    assert unknown["attribution"] == {
        "faVisitorId": None,
        "faSessionId": None,
        "faAttributionToken": None,
    }


# ---------------------------------------------------------------- with the running relay


@pytest.fixture
async def relay(aiohttp_client: AiohttpClient, config: Config, clock: FakeClock) -> Client:
    return await aiohttp_client(create_app(config, clock=clock, poll_interval_s=0.05))


async def post_webhook(relay: Client, order_id: str) -> tuple[int, dict[str, Any], str]:
    body = order_paid(order_id)
    headers = sign_headers(body)
    resp = await relay.post("/webhooks/polar", data=body, headers=headers)
    return resp.status, await resp.json(), headers["webhook-id"]


async def test_an_order_that_came_by_webhook_is_already_recorded(
    relay: Client, config: Config, clock: FakeClock, polar: FakePolar, faurya: FakeFaurya
) -> None:
    """An order the relay got by webhook is counted as already recorded, not enqueued again."""
    order = polar.add_order()
    status, _, webhook_id = await post_webhook(relay, order["id"])
    assert status == 202
    store = relay.app[STORE]

    summary = await Reconciler(store, config, relay.app[POLAR_API], clock).run(None, None)

    assert (summary.seen, summary.already_recorded, summary.enqueued) == (1, 1, 0)
    [message] = await store.list_messages()
    assert (message.idempotency_key, message.webhook_id) == (
        f"polar:order:{order['id']}",
        webhook_id,
    )
    assert await store.event_count() == 1  # no reconcile event either
    await faurya.wait_for(1)
    await relay.app[WORKERS].run_until_idle()
    assert len(faurya.received) == 1


async def test_a_webhook_after_reconciliation_is_a_duplicate(
    relay: Client, config: Config, clock: FakeClock, polar: FakePolar, faurya: FakeFaurya
) -> None:
    """The order reconciliation enqueued reaches Faurya once; Polar's late webhook for it is
    answered duplicate and sends nothing more."""
    order = polar.add_order()
    store = relay.app[STORE]
    summary = await Reconciler(store, config, relay.app[POLAR_API], clock).run(None, None)
    assert summary.enqueued == 1
    [sent] = await faurya.wait_for(1)
    assert sent.headers["idempotency-key"] == f"polar:order:{order['id']}"
    assert sent.headers["x-faurya-write-key"] == WRITE_KEY
    assert sent.headers["x-faurya-site-id"] == SITE_ID
    assert sent.json == purchase(order)

    with structlog.testing.capture_logs() as logs:
        status, answer, _ = await post_webhook(relay, order["id"])
    await relay.app[WORKERS].run_until_idle()

    assert (status, answer["status"], answer["messages"]) == (202, "duplicate", 0)
    assert [e["event"] for e in logs if e["event"].startswith("webhook_")] == ["webhook_duplicate"]
    value = relay.app[METRICS].registry.get_sample_value(
        "relay_webhooks_received_total",
        {"source": "polar", "event_type": "order.paid", "outcome": "duplicate"},
    )
    assert value == 1
    [message] = await store.list_messages()

    async def delivered() -> bool:
        record = await store.get_message(message.id)
        return record is not None and record.status is MessageStatus.DELIVERED

    await wait_until(delivered)
    assert message.webhook_id == f"reconcile:order.paid:{order['id']}"
    assert len(faurya.received) == 1


def reconcile_metric(relay: Client, name: str, **labels: str) -> float:
    return relay.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def reconciling_app(config: Config, clock: FakeClock) -> web.Application:
    """The relay app reconciling on its own every 0.2 s (reconcile.interval_s)."""
    config = dataclasses.replace(
        config, reconcile=dataclasses.replace(config.reconcile, interval_s=0.2)
    )
    return create_app(config, clock=clock, poll_interval_s=0.05)


async def test_the_relay_reconciles_periodically(
    aiohttp_client: AiohttpClient,
    config: Config,
    clock: FakeClock,
    polar: FakePolar,
    faurya: FakeFaurya,
) -> None:
    """With reconcile.interval_s set, relay serve reconciles on its own: missed orders are
    enqueued, delivered, counted in relay_reconcile_enqueued_total and logged."""
    orders = [polar.add_order(), polar.add_order()]
    with structlog.testing.capture_logs() as logs:
        relay = await aiohttp_client(reconciling_app(config, clock))

        async def ran() -> bool:
            return reconcile_metric(relay, "relay_reconcile_runs_total", outcome="ok") >= 1

        await wait_until(ran)
        received = await faurya.wait_for(2)

    assert reconcile_metric(relay, "relay_reconcile_enqueued_total") == 2
    assert reconcile_metric(relay, "relay_reconcile_runs_total", outcome="failed") == 0
    assert {r.headers["idempotency-key"] for r in received} == {
        f"polar:order:{o['id']}" for o in orders
    }
    finished = [e for e in logs if e["event"] == "reconcile_finished"]
    assert finished[0]["enqueued"] == 2
    assert finished[0]["seen"] == 2


async def test_a_failed_periodic_run_is_counted_and_changes_nothing(
    aiohttp_client: AiohttpClient, config: Config, clock: FakeClock, polar: FakePolar
) -> None:
    """A Polar outage fails the periodic run: relay_reconcile_runs_total{outcome="failed"},
    a reconcile_failed log line, nothing enqueued, and the relay keeps serving."""
    polar.add_order()
    polar.outage(503, retry_after="0")
    with structlog.testing.capture_logs() as logs:
        relay = await aiohttp_client(reconciling_app(config, clock))

        async def failed() -> bool:
            return reconcile_metric(relay, "relay_reconcile_runs_total", outcome="failed") >= 1

        await wait_until(failed)

    [failure, *_] = [e for e in logs if e["event"] == "reconcile_failed"]
    assert "503" in failure["error"]
    assert reconcile_metric(relay, "relay_reconcile_enqueued_total") == 0
    assert await relay.app[STORE].list_messages() == []
    assert (await relay.get("/healthz")).status == 200


# ---------------------------------------------------------------- `relay reconcile`


def cli_env(polar: FakePolar, faurya: FakeFaurya, **extra: str) -> dict[str, str]:
    """The environment an operator sets for the shipped relay.toml, Polar's API included."""
    environ = process_env(
        POLAR_WEBHOOK_SECRET=LEGACY_SECRET,
        FAURYA_URL=faurya.url,
        FAURYA_SITE_ID=SITE_ID,
        FAURYA_WRITE_KEY=WRITE_KEY,
        POLAR_API_URL=polar.url,
        POLAR_ACCESS_TOKEN=polar.token,
    )
    environ.update(extra)
    return environ


async def relay_reconcile(environ: dict[str, str], *args: str) -> tuple[int, str, str]:
    """`relay reconcile` to completion, awaited (the fake Polar answers on this loop)."""
    config = str(REPO / "relay.toml")
    done = await run_command(
        relay_command(), "reconcile", "--config", config, *args, environ=environ, timeout_s=30
    )
    return done.code, done.out, done.err


async def messages_in(db: Path) -> dict[str, MessageRecord]:
    store = await Store.open(str(db))
    try:
        return await by_key(store)
    finally:
        await store.close()


@pytest.mark.e2e
async def test_relay_reconcile_prints_the_summary_and_dry_run_changes_nothing(
    tmp_path: Path, polar: FakePolar, faurya: FakeFaurya
) -> None:
    """`relay reconcile` enqueues what Polar has and prints seen / already recorded /
    enqueued; run again it finds everything recorded; --dry-run lists what it would enqueue
    and leaves the database alone."""
    db = tmp_path / "cli.db"
    environ = cli_env(polar, faurya, RELAY_DB=str(db))
    first = polar.add_order()
    polar.add_refund(first)

    code, out, err = await relay_reconcile(environ, "--since", "7d")

    assert (code, err) == (0, "")
    lines = out.splitlines()
    assert lines[-1] == (
        "seen 2, already recorded 0, enqueued 2, unmappable 0, ignored 0 (3 pages)"
    )
    assert f"order.paid {first['id']}: enqueued polar:order:{first['id']}" in lines
    assert set(await messages_in(db)) == {
        f"polar:order:{first['id']}",
        f"polar:refund:{polar.refunds[0]['id']}",
    }

    code, out, _ = await relay_reconcile(environ)

    assert code == 0
    assert out.splitlines()[-1].startswith("seen 2, already recorded 2, enqueued 0,")

    later = polar.add_order()
    before = await messages_in(db)
    code, out, err = await relay_reconcile(environ, "--dry-run")

    assert (code, err) == (0, "")
    assert out.splitlines() == [
        f"order.paid {later['id']}: would enqueue polar:order:{later['id']}",
        "dry run: seen 3, already recorded 2, enqueued 1, unmappable 0, ignored 0 (3 pages)",
    ]
    assert await messages_in(db) == before
    assert polar.calls[-1].headers["Authorization"] == f"Bearer {polar.token}"


@pytest.mark.e2e
async def test_relay_reconcile_without_a_token_is_a_config_error(
    tmp_path: Path, polar: FakePolar, faurya: FakeFaurya
) -> None:
    """Without POLAR_ACCESS_TOKEN `relay reconcile` exits 2 with one line, asks Polar nothing
    and creates no database."""
    db = tmp_path / "never.db"
    environ = cli_env(polar, faurya, RELAY_DB=str(db))
    del environ["POLAR_ACCESS_TOKEN"]

    code, out, err = await relay_reconcile(environ)

    assert code == 2
    assert out == ""
    assert err == (
        "relay: config error: environment variable POLAR_ACCESS_TOKEN is not set or empty "
        "(needed by polar_api.token for relay reconcile)\n"
    )
    assert polar.calls == []
    assert not db.exists()


@pytest.mark.e2e
async def test_relay_reconcile_with_a_refused_token_fails_without_printing_it(
    tmp_path: Path, polar: FakePolar, faurya: FakeFaurya
) -> None:
    """A token Polar refuses: exit 1, one line naming POLAR_ACCESS_TOKEN, never its value,
    nothing enqueued."""
    db = tmp_path / "refused.db"
    wrong = "polar_oat_REVOKED_token_value_77"
    polar.add_order()
    environ = cli_env(polar, faurya, RELAY_DB=str(db), POLAR_ACCESS_TOKEN=wrong)

    code, out, err = await relay_reconcile(environ)

    assert code == 1
    assert err.count("\n") == 1
    assert err.startswith("relay: error: Polar refused the access token (401)")
    assert "POLAR_ACCESS_TOKEN" in err
    assert wrong not in out + err
    assert await messages_in(db) == {}
    assert db.exists()


@pytest.mark.e2e
async def test_relay_reconcile_beside_a_serving_relay(
    aiohttp_client: AiohttpClient,
    config: Config,
    db_path: Path,
    polar: FakePolar,
    faurya: FakeFaurya,
) -> None:
    """`relay reconcile` works on the database a relay is serving; that relay delivers what
    the command enqueued, once."""
    # The real clock on both sides: what the command enqueues is due by the serving relay's.
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    order = polar.add_order()

    code, out, err = await relay_reconcile(cli_env(polar, faurya, RELAY_DB=str(db_path)))

    assert (code, err) == (0, "")
    assert out.splitlines()[-1].startswith("seen 1, already recorded 0, enqueued 1,")
    [sent] = await faurya.wait_for(1)  # the relay's workers poll: no commit of theirs woke them
    assert sent.headers["idempotency-key"] == f"polar:order:{order['id']}"
    await relay.app[WORKERS].run_until_idle()
    assert len(faurya.received) == 1


async def test_lost_disputes_are_reconciled_as_refunds_joined_to_the_purchase(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """A lost dispute (no webhook, no refund) becomes a Faurya refund of its net amount under
    `polar:dispute:{id}`, with the purchase's orderId and attribution; a dispute still open or
    won is not revenue lost and is not reconciled."""
    order = polar.add_order()
    lost = polar.add_dispute(order, amount=4410, tax_amount=1103)
    polar.add_dispute(order, status="won")
    polar.add_dispute(order, status="needs_response")

    summary = await reconcile(store, config, api, clock)

    assert (summary.seen, summary.enqueued, summary.skipped) == (2, 2, [])
    [call] = polar.requests_to("/v1/disputes/")
    assert call.query["status"] == "lost"
    messages = await by_key(store)
    body = json.loads(messages[f"polar:dispute:{lost['id']}"].body)
    assert body == {
        "event": "refund",
        "amount": 4410,
        "currency": "USD",
        "orderId": "ord_7Hq2kP9xL3",
        "provider": "polar",
        "providerPaymentId": order["id"],
        "refundId": lost["id"],
        "attribution": purchase(order)["attribution"],
    }


async def test_a_token_without_disputes_read_still_reconciles_orders(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """A token without disputes:read (Polar answers 403 on the listing) still reconciles orders
    and refunds; the summary says what was skipped and why."""
    polar.scopes = frozenset({"orders:read", "refunds:read"})
    order = polar.add_order()
    polar.add_dispute(order)

    summary = await reconcile(store, config, api, clock)

    assert (summary.seen, summary.enqueued) == (1, 1)
    assert summary.skipped == ["lost disputes (the token lacks the disputes:read scope: 403)"]
    assert "skipped: lost disputes" in summary.line()
    assert set(await by_key(store)) == {f"polar:order:{order['id']}"}


async def test_a_refund_undone_after_it_was_recorded_is_reversed(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """A refund reconciled as succeeded and later failed is reversed by the next run (a new
    event, not taken for the one already recorded); a refund that failed without ever being
    recorded sends nothing."""
    order = polar.add_order()
    refund = polar.add_refund(order, amount=2000)
    never = polar.add_refund(order, amount=300, status="failed")
    await reconcile(store, config, api, clock)
    refund["status"] = "failed"

    summary = await reconcile(store, config, api, clock)

    assert summary.enqueued == 1
    messages = await by_key(store)
    reversal = json.loads(messages[f"polar:refund-reversed:{refund['id']}"].body)
    assert (reversal["event"], reversal["amount"]) == ("purchase", 2000)
    assert reversal["orderId"] == f"ord_7Hq2kP9xL3:refund-reversed:{refund['id']}"
    assert reversal["reversedRefundId"] == refund["id"]
    assert f"polar:refund-reversed:{never['id']}" not in messages


async def test_an_order_unmappable_in_one_run_is_enqueued_by_a_later_one(
    store: Store, config: Config, api: PolarApi, clock: FakeClock, polar: FakePolar
) -> None:
    """A paid order the routes cannot map is stored as unmappable; once it maps (the route or
    the data fixed), the next run enqueues it instead of taking its own earlier unmappable
    event for a recording of the payment."""
    order = polar.add_order()
    order["currency"] = "xyz"  # not ISO 4217: the route's iso4217 transform refuses it
    first = await reconcile(store, config, api, clock)
    assert (first.unmappable, first.enqueued) == (1, 0)
    assert await by_key(store) == {}

    order["currency"] = "usd"
    second = await reconcile(store, config, api, clock)
    third = await reconcile(store, config, api, clock)

    assert (second.already_recorded, second.enqueued) == (0, 1)
    assert (third.already_recorded, third.enqueued) == (1, 0)
    [message] = (await by_key(store)).values()
    assert message.idempotency_key == f"polar:order:{order['id']}"
    assert json.loads(message.body)["amount"] == 4410
