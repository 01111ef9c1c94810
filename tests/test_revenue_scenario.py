"""Revenue truth against Polar as it really behaves: every shipped config, one scenario.

Purchases, a visitor without Faurya ids checking out through the relay, a subscription with a
trial and two renewals, a downgrade with a negative proration whose credit a later renewal uses,
a refund undone by webhook and one undone while the endpoint was disabled, a renewal whose
webhooks never came, a lost dispute, an ISK order. Webhooks are signed and posted to the real
app; reconciliation reads the fake Polar API; the fake Faurya records each purchase once by
`orderId` and each refund once by `refundId`. At the end Faurya's net revenue per currency must
equal Polar's (paid orders minus succeeded refunds and lost disputes) to the minor unit, with no
payment dropped by the `orderId` rule and nothing dead in the outbox.
"""

from __future__ import annotations

import dataclasses
import time
import tomllib
from pathlib import Path
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from pytest_aiohttp import AiohttpClient

from relay import currency
from relay.app import METRICS, POLAR_API, STORE, create_app
from relay.config import CheckoutConfig, Config, parse
from relay.models import MessageStatus
from relay.reconcile import Reconciler
from tests.helpers import REPO, Client, FakeClock, drained, env, sign_headers
from tests.polar_fake import FakePolar, with_polar_api
from tests.polar_world import FauryaBook, PolarWorld

PRODUCT = "5f0e6c1e-8a4b-4c7e-9a53-2f6d1b0c7e11"
SHOP = "http://shop.example"
IDS = {
    "faVisitorId": "v_5f2c9e1ab7d34c0e",
    "faSessionId": "s_8d1a7c3e92f0b6d4",
    "faAttributionToken": "fat_Qm9vdEF0dHJpYnV0aW9u",
}

# Every shipped config, with the amount it reports: net (before tax) or total (tax included).
SHIPPED = [
    ("relay.toml", "net"),
    ("config/relay.minimal.toml", "net"),
    ("config/relay.total-amount.toml", "total"),
]


def load_shipped(name: str, book: FauryaBook, polar: FakePolar, db_path: Path) -> Config:
    """A shipped config as a user runs it, pointed at the fakes, with the checkout endpoint."""
    raw = tomllib.loads((REPO / name).read_text())
    raw.setdefault("storage", {})["path"] = str(db_path)
    config = with_polar_api(parse(raw, env(FAURYA_URL=book.url)), polar)
    checkout = CheckoutConfig(enabled=True, plans=(("pro", PRODUCT),), allow_origins=(SHOP,))
    return dataclasses.replace(config, checkout=checkout)


async def deliver(relay: Client, world: PolarWorld) -> int:
    """Post every webhook Polar sent (not the lost ones), signed; each must be acknowledged.
    The first one is delivered twice, as Polar's retries do. Returns how many were posted."""
    posted = 0
    for i, hook in enumerate(world.webhooks):
        if hook.lost:
            continue
        body = hook.body()
        headers = sign_headers(body)
        for _ in range(2 if i == 0 else 1):
            resp = await relay.post("/webhooks/polar", data=body, headers=headers)
            assert resp.status == 202, await resp.text()
            posted += 1
    return posted


@pytest.fixture
async def scenario_relay(
    request: pytest.FixtureRequest,
    aiohttp_client: AiohttpClient,
    book: FauryaBook,
    polar: FakePolar,
    tmp_path: Path,
) -> tuple[Client, Config, str]:
    name, rule = request.param
    config = load_shipped(name, book, polar, tmp_path / "relay.db")
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    return relay, config, rule


def play(world: PolarWorld, checkout_metadata: dict[str, Any]) -> None:
    """The scenario, as Polar would do it."""
    # A one-time purchase, fully attributed, then partly refunded, and that refund undone by
    # a webhook (canceled).
    shirt = world.purchase({"orderId": "ord_shirt", **IDS}, net=4410, tax=1103, currency="usd")
    refund = world.refund(shirt, amount=2000, tax=500)
    world.undo_refund(shirt, refund, status="canceled", lost=False)
    # A refund undone while the endpoint was disabled: only reconciliation can see it.
    refund = world.refund(shirt, amount=1000, tax=250)
    world.undo_refund(shirt, refund, status="failed", lost=True)
    # A refund that stays.
    world.refund(shirt, amount=410, tax=103)

    # A visitor without Faurya ids, through the relay's checkout endpoint; the dispute is lost.
    mug = world.purchase(checkout_metadata, net=2900, tax=0, currency="usd")
    world.lose_dispute(mug)

    # A subscription with a trial: an order of 0, then the first real charge, then a renewal.
    metadata = {"orderId": "ord_team", **IDS}
    team, _trial = world.subscribe(metadata, net=1900, tax=380, currency="eur", trial=True)
    world.renew(team, net=1900, tax=380, currency="eur")
    renewal = world.renew(team, net=1900, tax=380, currency="eur")
    world.refund(renewal, amount=900, tax=180)
    # A downgrade: a negative proration order, whose credit the next renewal uses up (its
    # net_amount is still the full price).
    world.renew(team, net=-600, tax=-120, currency="eur", billing_reason="subscription_update")
    world.renew(team, net=1300, tax=260, currency="eur", applied_balance=720)
    # A renewal paid while the endpoint was disabled (Polar sends nothing).
    world.renew(team, net=1300, tax=260, currency="eur", lost=True)
    # A metered cycle.
    world.renew(team, net=250, tax=50, currency="eur", billing_reason="subscription_meter_cycle")

    # A plain subscription without a trial, and an ISK order (Polar: two decimals for ISK).
    plan, _first = world.subscribe({"orderId": "ord_plan", **IDS}, net=990, currency="usd")
    world.renew(plan, net=990, currency="usd")
    world.purchase({"orderId": "ord_isk", **IDS}, net=990000, tax=0, currency="isk")


@pytest.mark.parametrize("scenario_relay", SHIPPED, indirect=True, ids=[n for n, _ in SHIPPED])
async def test_faurya_revenue_equals_polar_ledger(
    scenario_relay: tuple[Client, Config, str], book: FauryaBook, polar: FakePolar
) -> None:
    """Each shipped config ends the scenario with Faurya's net revenue per currency equal to
    Polar's ledger to the minor unit, no payment dropped by Faurya's orderId rule, nothing
    dead, and reconciling again changes nothing."""
    relay, config, rule = scenario_relay
    world = PolarWorld(polar)
    resp = await relay.post("/checkout", json={"plan": "pro"}, headers={"Origin": SHOP})
    assert resp.status == 200, await resp.text()  # Polar took the metadata: the sale goes on
    [checkout] = polar.checkouts
    play(world, checkout.answer["metadata"])

    await deliver(relay, world)
    await drained(relay)
    store = relay.app[STORE]
    reconciler = Reconciler(store, config, relay.app[POLAR_API], FakeClock(time.time()))
    first = await reconciler.run(time.time() - config.reconcile.lookback_s, None)
    await drained(relay)

    assert first.skipped == []
    assert book.dropped == []
    dead = await store.list_messages(status=MessageStatus.DEAD)
    assert dead == []
    assert book.ledger() == world.ledger(rule)
    # The lost renewal, the undone refund and the dispute came only by reconciliation.
    assert first.enqueued == 3

    again = await reconciler.run(time.time() - config.reconcile.lookback_s, None)
    assert again.enqueued == 0


async def test_the_isk_order_is_counted_in_polars_units(
    aiohttp_client: AiohttpClient, book: FauryaBook, polar: FakePolar, tmp_path: Path
) -> None:
    """An ISK order of 990000 (Polar: 9,900.00 ISK, two decimals, unlike ISO 4217's none)
    reaches Faurya as 990000 and counts in the revenue metric as 990000 minor units, which the
    relay reads as 9900 ISK."""
    config = load_shipped("relay.toml", book, polar, tmp_path / "relay.db")
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    world = PolarWorld(polar)
    world.purchase({"orderId": "ord_isk", **IDS}, net=990000, currency="isk")
    await deliver(relay, world)
    await drained(relay)

    assert book.ledger() == {"ISK": 990000}
    registry: CollectorRegistry = relay.app[METRICS].registry
    delivered = registry.get_sample_value(
        "relay_revenue_delivered_minor_units_total",
        {"destination": "faurya", "event": "purchase", "currency": "ISK"},
    )
    assert delivered == 990000
    assert currency.minor_to_major(990000, "ISK") == 9900
    assert currency.minor_to_major(5000, "MGA") == 5000  # Polar: MGA has no decimals
