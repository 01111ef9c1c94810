"""Payment verification: a route with `verify_order` asks the fake Polar API whether the order
is paid before each delivery to the fake Faurya.

The app runs with a FakeClock: a new message is attempted at once (its commit wakes the
workers), a retry only once the test moves the clock and drains with `run_until_idle()`.
"""

from __future__ import annotations

import json
import tomllib
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay import order_check
from relay.app import METRICS, STORE, create_app
from relay.config import Config, parse
from relay.errors import ConfigError
from relay.models import MessageRecord, MessageStatus
from tests.helpers import (
    REPO,
    Client,
    FakeClock,
    FakeFaurya,
    LogList,
    env,
    fixture_body,
    logged,
    order_paid,
    settled,
    sign_headers,
)
from tests.polar_fake import TOKEN, FakePolar

pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events

WRONG_TOKEN = "polar_oat_REVOKED_verify_token_31"


@pytest.fixture
def log_secrets() -> tuple[str, ...]:
    """No log event of a test here may hold one of these."""
    return (TOKEN, WRONG_TOKEN)


def raw_config(faurya: FakeFaurya, db_path: Path, polar: FakePolar, token: str) -> dict[str, Any]:
    """The shipped relay.toml with verify_order on the order route, reading the fake Polar."""
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["storage"]["path"] = str(db_path)
    assert raw["routes"][0]["name"] == "polar-order-paid"
    raw["routes"][0]["verify_order"] = "{data.id}"
    raw["polar_api"] = {"url": polar.url, "token": token, "min_interval_s": 0}
    return raw


@pytest.fixture
def config(faurya: FakeFaurya, migrated_db_path: Path, polar: FakePolar) -> Config:
    raw = raw_config(faurya, migrated_db_path, polar, polar.token)
    return parse(raw, env(FAURYA_URL=faurya.url))


@pytest.fixture
async def relay(aiohttp_client: AiohttpClient, config: Config, clock: FakeClock) -> Client:
    return await aiohttp_client(create_app(config, clock=clock, poll_interval_s=30))


async def post_order(relay: Client, order_id: str, **data: Any) -> MessageRecord:
    """A signed order.paid for `order_id` (with `data` fields, and keys of `metadata`,
    overridden as a forger with the webhook secret would); its committed message."""
    body = order_paid(order_id)
    if data:
        event = json.loads(body)
        event["data"]["metadata"].update(data.pop("metadata", {}))
        event["data"].update(data)
        body = json.dumps(event).encode()
    resp = await relay.post("/webhooks/polar", data=body, headers=sign_headers(body))
    assert resp.status == 202, await resp.text()
    [message] = [
        m
        for m in await relay.app[STORE].list_messages()
        if m.idempotency_key == f"polar:order:{order_id}"
    ]
    return message


def metric(relay: Client, name: str, **labels: str) -> float:
    return relay.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def checks(relay: Client, outcome: str) -> float:
    return metric(relay, "relay_payment_checks_total", outcome=outcome)


async def settled_unsent(
    relay: Client, faurya: FakeFaurya, message_id: int, status: MessageStatus, error: str
) -> MessageRecord:
    """The message once the worker is done with it: in `status`, its last error starting with
    `error`, and nothing sent to Faurya."""
    record = await settled(relay, message_id)
    assert record.status is status
    assert record.last_error is not None
    assert record.last_error.startswith(error)
    assert faurya.received == []
    return record


async def test_a_paid_order_is_delivered_after_the_check(
    relay: Client, polar: FakePolar, faurya: FakeFaurya, logs: LogList
) -> None:
    """Polar says paid: the purchase goes to Faurya, after one GET of the order."""
    order = polar.add_order()

    message = await post_order(relay, order["id"])
    [sent] = await faurya.wait_for(1)
    record = await settled(relay, message.id)

    assert record.status is MessageStatus.DELIVERED
    [check] = polar.calls
    assert (check.method, check.path) == ("GET", f"/v1/orders/{order['id']}")
    assert check.headers["Authorization"] == f"Bearer {TOKEN}"
    assert sent.headers["idempotency-key"] == f"polar:order:{order['id']}"
    assert sent.json["providerPaymentId"] == order["id"]
    assert checks(relay, "paid") == 1
    assert checks(relay, "not_paid") == checks(relay, "error") == 0
    assert len(logged(logs, "delivery_succeeded")) == 1


@pytest.mark.parametrize(
    ("status", "state"), [(None, "unknown to Polar"), ("pending", "pending"), ("void", "void")]
)
async def test_an_order_polar_does_not_confirm_is_dead_and_not_sent(
    relay: Client,
    polar: FakePolar,
    faurya: FakeFaurya,
    logs: LogList,
    status: str | None,
    state: str,
) -> None:
    """An order Polar does not know (404) or has not been paid for is dead-lettered with
    "payment_not_verified", and Faurya hears nothing."""
    order_id = str(uuid.uuid4())
    if status is not None:
        polar.add_order(order_id=order_id, status=status)

    message = await post_order(relay, order_id)
    reason = f"payment_not_verified: Polar order {order_id} is {state}"
    await settled_unsent(relay, faurya, message.id, MessageStatus.DEAD, reason)
    assert len(polar.requests_to(f"/v1/orders/{order_id}")) == 1
    assert checks(relay, "not_paid") == 1
    assert checks(relay, "paid") == 0
    assert metric(relay, "relay_deliveries_total", destination="faurya", outcome="dead") == 1
    [dead] = logged(logs, "delivery_dead_lettered")
    assert dead["reason"] == reason
    assert dead["idempotency_key"] == f"polar:order:{order_id}"


async def test_polar_failing_retries_then_delivers_once_it_recovers(
    relay: Client, polar: FakePolar, faurya: FakeFaurya, clock: FakeClock, logs: LogList
) -> None:
    """Polar answering 503 cannot confirm the payment: the message waits for a retry and
    nothing is sent; once Polar is back and the retry is due, the purchase is delivered."""
    order = polar.add_order()
    polar.outage(503, retry_after="0")

    message = await post_order(relay, order["id"])
    record = await settled_unsent(
        relay,
        faurya,
        message.id,
        MessageStatus.PENDING,
        f"payment_check: Polar answered 503 on /v1/orders/{order['id']}",
    )
    assert record.next_attempt_at > clock.now()
    assert checks(relay, "error") == 1
    assert metric(relay, "relay_deliveries_total", destination="faurya", outcome="retry") == 1
    [scheduled] = logged(logs, "delivery_retry_scheduled")
    assert scheduled["message_id"] == message.id

    polar.recover()
    clock.advance(record.next_attempt_at - clock.now() + 1)
    record = await settled(relay, message.id)

    assert record.status is MessageStatus.DELIVERED
    [sent] = await faurya.wait_for(1)
    assert sent.headers["idempotency-key"] == f"polar:order:{order['id']}"
    assert checks(relay, "paid") == 1


async def test_polar_refusing_the_token_retries_without_sending(
    aiohttp_client: AiohttpClient,
    faurya: FakeFaurya,
    db_path: Path,
    polar: FakePolar,
    clock: FakeClock,
) -> None:
    """A refused token cannot confirm anything: retried later (fixing the token fixes it),
    never sent unverified, and the token is not in the message's error."""
    order = polar.add_order()
    raw = raw_config(faurya, db_path, polar, WRONG_TOKEN)
    app = create_app(parse(raw, env(FAURYA_URL=faurya.url)), clock=clock, poll_interval_s=30)
    relay = await aiohttp_client(app)

    message = await post_order(relay, order["id"])
    record = await settled_unsent(
        relay, faurya, message.id, MessageStatus.PENDING, "payment_check:"
    )
    error = record.last_error or ""  # not None: settled_unsent checked it
    assert "401" in error
    assert WRONG_TOKEN not in error
    assert checks(relay, "error") == 1


async def test_routes_without_verify_order_are_not_checked(
    relay: Client, polar: FakePolar, faurya: FakeFaurya
) -> None:
    """The refund route has no verify_order: its message goes out without asking Polar."""
    body = fixture_body("refund.created.json")
    resp = await relay.post("/webhooks/polar", data=body, headers=sign_headers(body))
    assert resp.status == 202

    [sent] = await faurya.wait_for(1)

    assert sent.json["event"] == "refund"
    assert polar.calls == []
    assert checks(relay, "paid") == checks(relay, "not_paid") == checks(relay, "error") == 0


def test_verify_order_needs_a_token(faurya: FakeFaurya, db_path: Path, polar: FakePolar) -> None:
    """A route with verify_order and no polar_api.token is a config error naming the key."""
    raw = raw_config(faurya, db_path, polar, "")

    with pytest.raises(ConfigError) as caught:
        parse(raw, env(FAURYA_URL=faurya.url))

    assert caught.value.problems == [
        "polar_api.token: routes with verify_order need a Polar access token"
    ]


# -------------------------------------------- forgeries: ids that lead elsewhere in a URL


@pytest.mark.parametrize(
    "forged", ["{id}?x=1", "anything/../{id}", "{id}#frag", "{id}/", "{ID}", "%2e%2e/{id}"]
)
async def test_an_id_that_is_not_a_polar_id_is_dead_without_asking_polar(
    relay: Client, polar: FakePolar, faurya: FakeFaurya, logs: LogList, forged: str
) -> None:
    """A forged order.paid whose data.id only leads to a paid order once pasted into a URL
    (a query, "..", a fragment, another case) is dead-lettered before any request to Polar,
    and Faurya hears nothing."""
    paid = polar.add_order()
    order_id = forged.format(id=paid["id"], ID=paid["id"].upper())

    message = await post_order(relay, order_id, net_amount=99999999)
    await settled_unsent(
        relay,
        faurya,
        message.id,
        MessageStatus.DEAD,
        f"payment_not_verified: {order_id!r} is not a Polar order id",
    )
    assert polar.calls == []
    assert checks(relay, "bad_id") == 1
    assert checks(relay, "paid") == 0
    [dead] = logged(logs, "delivery_dead_lettered")
    assert dead["message_id"] == message.id


@pytest.mark.parametrize(
    ("field", "data", "shown"),
    [
        (
            "amount",
            {"net_amount": 99999999},
            "amount (data.net_amount): the message sends 99999999, Polar's order gives 4410",
        ),
        ("currency", {"currency": "eur"}, "currency (data.currency)"),
        (
            "attribution.faSessionId",
            {"metadata": {"faSessionId": "s_forged"}},
            "attribution.faSessionId (data.metadata.faSessionId)",
        ),
    ],
)
async def test_a_paid_order_with_a_forged_field_is_dead_naming_the_field(
    relay: Client,
    polar: FakePolar,
    faurya: FakeFaurya,
    logs: LogList,
    field: str,
    data: dict[str, Any],
    shown: str,
) -> None:
    """A forged order.paid with a real, paid order's id but another amount (or currency, or
    attribution) is dead-lettered with a reason naming the field that differs from Polar's
    order, counted by field and logged; Faurya hears nothing."""
    order = polar.add_order()

    message = await post_order(relay, order["id"], **data)
    record = await settled_unsent(
        relay,
        faurya,
        message.id,
        MessageStatus.DEAD,
        f"payment_not_verified: Polar order {order['id']} differs from the message in {shown}",
    )
    assert checks(relay, "mismatch") == 1
    assert checks(relay, "paid") == 0
    mismatches = "relay_payment_check_mismatches_total"
    assert metric(relay, mismatches, route="polar-order-paid", field=field) == 1
    [logged_mismatch] = logged(logs, "payment_check_mismatch")
    assert logged_mismatch["fields"] == [field]
    assert logged_mismatch["order_id"] == order["id"]
    # Customer data stays out of the reason: only numbers are quoted.
    assert "s_forged" not in (record.last_error or "")  # not None: settled_unsent checked it


async def test_an_answer_about_another_order_is_dead(
    aiohttp_client: AiohttpClient,
    aiohttp_server: AiohttpServer,
    faurya: FakeFaurya,
    db_path: Path,
    polar: FakePolar,
    clock: FakeClock,
    logs: LogList,
) -> None:
    """An API that answers GET /v1/orders/{id} with a paid order of another id (a proxy or
    cache that ignores the path) cannot vouch for the message: dead-lettered, field "id"."""
    other = polar.add_order()

    async def any_order(request: web.Request) -> web.Response:
        return web.json_response(other)

    wrong = web.Application()
    wrong.router.add_get("/v1/orders/{id}", any_order)
    server = await aiohttp_server(wrong)
    raw = raw_config(faurya, db_path, polar, polar.token)
    raw["polar_api"]["url"] = str(server.make_url(""))
    relay = await aiohttp_client(
        create_app(parse(raw, env(FAURYA_URL=faurya.url)), clock=clock, poll_interval_s=30)
    )
    asked = str(uuid.uuid4())

    message = await post_order(relay, asked)
    await settled_unsent(
        relay,
        faurya,
        message.id,
        MessageStatus.DEAD,
        f"payment_not_verified: Polar answered for order {asked} with another order",
    )
    assert checks(relay, "mismatch") == 1
    assert (
        metric(relay, "relay_payment_check_mismatches_total", route="polar-order-paid", field="id")
        == 1
    )
    assert logged(logs, "payment_check_mismatch")[0]["fields"] == ["id"]


def test_the_check_compares_the_fields_built_from_the_order_only(
    faurya: FakeFaurya, db_path: Path, polar: FakePolar
) -> None:
    """With verify_order = "{data.id}" every body field read only from data.* is compared
    (constants are not); a route whose verify_order names another object's id (a refund's
    order) compares nothing, since its data is not that order."""
    raw = raw_config(faurya, db_path, polar, polar.token)
    refund_index = next(
        i for i, r in enumerate(raw["routes"]) if r["name"].startswith("polar-refund")
    )
    raw["routes"][refund_index]["verify_order"] = "{data.order_id}"
    routes = parse(raw, env(FAURYA_URL=faurya.url)).routes
    order_route, refund_route = routes[0], routes[refund_index]

    assert order_check.compared_fields(order_route) == [
        "amount",
        "currency",
        "orderId",
        "providerPaymentId",
        "attribution.faVisitorId",
        "attribution.faSessionId",
        "attribution.faAttributionToken",
    ]
    assert order_check.compared_fields(refund_route) == []
    assert order_check.compare(refund_route, b'{"amount": 1}', {"amount": 2}) == []


def test_a_field_the_order_leaves_out_is_compared_when_its_parent_is_there(
    faurya: FakeFaurya, db_path: Path, polar: FakePolar
) -> None:
    """A forger's attribution id that Polar's order has no key for (its metadata holds none)
    is a difference: only a field whose top-level data key Polar's order lacks is skipped."""
    raw = raw_config(faurya, db_path, polar, polar.token)
    order_route = parse(raw, env(FAURYA_URL=faurya.url)).routes[0]
    order = polar.add_order()
    order["metadata"] = {}
    forged = {**order, "metadata": {"faSessionId": "s_forged"}}
    body = json.dumps(order_route.body.evaluate({"data": forged}, "body")).encode()

    mismatches = order_check.compare(order_route, body, order)

    assert [m.field for m in mismatches] == ["attribution.faSessionId"]
    assert mismatches[0].polar is None
    # A field Polar's order has no top-level key for at all is still not compared.
    del order["metadata"]
    assert order_check.compare(order_route, body, order) == []
