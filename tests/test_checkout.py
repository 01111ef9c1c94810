"""The checkout endpoint in the real app, creating checkouts at the fake Polar API: what a
browser may send, what reaches Polar, and what the browser gets back."""

from __future__ import annotations

import dataclasses
import re
import tomllib
from collections.abc import MutableMapping
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from relay.app import METRICS, create_app
from relay.config import CheckoutConfig, Config, parse
from relay.errors import ConfigError
from tests.helpers import REPO, Client, FakeFaurya, LogList, env, shipped_config
from tests.polar_fake import TOKEN, FakePolar, with_polar_api

pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events


PRODUCT = "5f0e6c1e-8a4b-4c7e-9a53-2f6d1b0c7e11"
SHOP = "http://shop.example"
SUCCESS_URL = "https://shop.example/thanks?checkout_id={CHECKOUT_ID}"
IDS = {
    "faVisitorId": "v_5f2c9e1ab7d34c0e",
    "faSessionId": "s_81d0c4a2e9f7",
    "faAttributionToken": "fat_eyJ2IjoxLCJzIjoiczgxZDBjNGEyZTlmNyJ9",
}
WRONG_TOKEN = "polar_oat_REVOKED_checkout_token_99"
GENERIC_ERROR = {"error": "could not create the checkout; try again"}


@pytest.fixture
def log_secrets() -> tuple[str, ...]:
    """No log event of a test here may hold one of these."""
    return (TOKEN, WRONG_TOKEN)


def with_checkout(config: Config, polar: FakePolar, **changes: Any) -> Config:
    """The config with the checkout on; its Polar budget is 6000 a minute unless a test sets
    it (the default 60 a minute paces each Polar request a second apart: a test retrying five
    times waited four seconds for nothing it checks)."""
    checkout = CheckoutConfig(
        enabled=True,
        plans=(("pro", PRODUCT),),
        allow_origins=(SHOP,),
        success_url=SUCCESS_URL,
        global_rate_limit_per_min=6000,
    )
    return dataclasses.replace(
        with_polar_api(config, polar), checkout=dataclasses.replace(checkout, **changes)
    )


@pytest.fixture
async def relay(aiohttp_client: AiohttpClient, config: Config, polar: FakePolar) -> Client:
    return await aiohttp_client(create_app(with_checkout(config, polar), poll_interval_s=0.05))


async def post(relay: Client, body: Any, origin: str | None = SHOP) -> tuple[int, Any, Any]:
    """POST /checkout as the shop's page would; (status, JSON answer, headers)."""
    headers = {} if origin is None else {"Origin": origin}
    if isinstance(body, bytes | str):
        resp = await relay.post("/checkout", data=body, headers=headers)
    else:
        resp = await relay.post("/checkout", json=body, headers=headers)
    return resp.status, await resp.json(), resp.headers


def checkouts(relay: Client, outcome: str) -> float:
    value = relay.app[METRICS].registry.get_sample_value(
        "relay_checkouts_total", {"outcome": outcome}
    )
    return value or 0.0


def events(logs: LogList, name: str) -> list[MutableMapping[str, Any]]:
    return [e for e in logs if e["event"] == name]


async def test_a_valid_request_creates_the_checkout_with_the_ids(
    relay: Client, polar: FakePolar, logs: LogList
) -> None:
    """A plan and the three Faurya ids: Polar gets the plan's product and metadata with a
    generated orderId and the ids; the browser gets Polar's url and that orderId."""
    status, answer, headers = await post(relay, {"plan": "pro", **IDS})

    assert status == 200
    [call] = polar.checkouts
    assert answer == {"url": call.answer["url"], "orderId": call.json["metadata"]["orderId"]}
    assert re.fullmatch(r"ord_[0-9a-f]{32}", answer["orderId"])
    assert call.json == {
        "products": [PRODUCT],
        "metadata": {"orderId": answer["orderId"], **IDS},
        "success_url": SUCCESS_URL,
    }
    assert call.headers["Authorization"] == f"Bearer {TOKEN}"
    assert headers["Access-Control-Allow-Origin"] == SHOP
    assert checkouts(relay, "created") == 1
    [created] = events(logs, "checkout_created")
    assert created["order_id"] == answer["orderId"]
    assert created["checkout_id"] == call.answer["id"]
    assert created["attributed"] is True


@pytest.mark.parametrize(
    "ids",
    [
        {},
        {"faVisitorId": None, "faSessionId": None, "faAttributionToken": None},
        {"faSessionId": ""},
    ],
)
async def test_missing_ids_are_left_out_of_polar_metadata(
    relay: Client, polar: FakePolar, logs: LogList, ids: dict[str, Any]
) -> None:
    """Absent, null or empty ids are left out of Polar's metadata (Polar refuses "" with 422,
    which would block the sale), the visitor still gets a checkout, and it is logged as
    unattributed."""
    status, answer, _ = await post(relay, {"plan": "pro", **ids})

    assert status == 200
    assert answer["url"]
    [call] = polar.checkouts
    assert call.json["metadata"] == {"orderId": answer["orderId"]}
    [created] = events(logs, "checkout_created")
    assert created["attributed"] is False


async def test_a_listed_product_id_is_accepted(relay: Client, polar: FakePolar) -> None:
    """productId instead of plan works for a product that one of the plans names."""
    status, _, _ = await post(relay, {"productId": PRODUCT, **IDS})

    assert status == 200
    assert [c.json["products"] for c in polar.checkouts] == [[PRODUCT]]


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        ({"plan": "pro", "metadata": {"x": "y"}}, "unknown field 'metadata'"),
        ({"plan": "pro", "customer_email": "a@b.example"}, "unknown field 'customer_email'"),
        ({"plan": "enterprise"}, "unknown plan (plans: pro)"),
        ({"plan": 1}, "unknown plan"),
        ({"productId": "0e1d2c3b-4a59-4687-9a0b-1c2d3e4f5a6b"}, "not one of the configured"),
        ({"productId": [PRODUCT]}, "not one of the configured"),
        ({"productId": {"id": PRODUCT}}, "not one of the configured"),
        ({"plan": ["pro"]}, "unknown plan"),
        ({"plan": "pro", "productId": PRODUCT}, "give exactly one of plan, productId"),
        ({}, "give exactly one of plan, productId"),
        ({"plan": "pro", "faVisitorId": "v<script>"}, "faVisitorId must be a string"),
        ({"plan": "pro", "faSessionId": "s 1"}, "faSessionId must be a string"),
        ({"plan": "pro", "faSessionId": "s\n1"}, "faSessionId must be a string"),
        ({"plan": "pro", "faAttributionToken": "t" * 501}, "at most 500"),
        ({"plan": "pro", "faVisitorId": 12}, "faVisitorId must be a string"),
        (["pro"], "body must be a JSON object"),
        ("plan=pro", "body must be JSON"),
        (b"\xff\xfe", "body must be JSON"),
    ],
)
async def test_a_bad_request_is_refused_and_nothing_reaches_polar(
    relay: Client, polar: FakePolar, logs: LogList, body: Any, reason: str
) -> None:
    """Unknown fields, unknown plans or products, both or neither of plan and productId, ids
    with bad characters or too long, non-JSON: 400 with the reason, no call to Polar."""
    status, answer, headers = await post(relay, body)

    assert status == 400
    assert reason in answer["error"]
    assert headers["Access-Control-Allow-Origin"] == SHOP  # the page can read why
    assert polar.calls == []
    assert checkouts(relay, "invalid") == 1
    assert checkouts(relay, "created") == 0
    [rejected] = events(logs, "checkout_rejected")
    assert reason in rejected["reason"]


async def test_a_500_character_id_is_accepted(relay: Client, polar: FakePolar) -> None:
    """The length bound is Polar's metadata limit, inclusive: 500 characters pass."""
    status, _, _ = await post(relay, {"plan": "pro", "faAttributionToken": "t" * 500})

    assert status == 200
    assert polar.checkouts[0].json["metadata"]["faAttributionToken"] == "t" * 500


async def test_a_body_too_large_is_refused(relay: Client, polar: FakePolar) -> None:
    """A body over 4 KiB is refused with 413 before it is parsed."""
    status, answer, _ = await post(relay, {"plan": "pro", "faVisitorId": "v" * 5000})

    assert status == 413
    assert answer == {"error": "body too large"}
    assert polar.calls == []
    assert checkouts(relay, "invalid") == 1


@pytest.mark.parametrize("origin", ["http://evil.example", "https://shop.example", "null"])
async def test_an_origin_not_allowed_is_forbidden(
    relay: Client, polar: FakePolar, logs: LogList, origin: str
) -> None:
    """A page from another origin (another scheme counts) gets 403 without CORS headers, and
    nothing reaches Polar."""
    status, answer, headers = await post(relay, {"plan": "pro", **IDS}, origin=origin)

    assert status == 403
    assert answer == {"error": "origin not allowed"}
    assert "Access-Control-Allow-Origin" not in headers
    assert polar.calls == []
    assert checkouts(relay, "forbidden") == 1
    [rejected] = events(logs, "checkout_rejected")
    assert rejected["reason"] == "origin not allowed"


async def test_a_request_without_origin_is_served_without_cors(
    relay: Client, polar: FakePolar
) -> None:
    """A server-side caller (no Origin header) may create a checkout; no CORS is granted."""
    status, _, headers = await post(relay, {"plan": "pro"}, origin=None)

    assert status == 200
    assert "Access-Control-Allow-Origin" not in headers
    assert len(polar.checkouts) == 1


async def test_preflight_from_an_allowed_origin(relay: Client, polar: FakePolar) -> None:
    """The browser's OPTIONS preflight from the shop gets 204 granting POST with a JSON body."""
    resp = await relay.options(
        "/checkout",
        headers={
            "Origin": SHOP,
            "Access-Control-Request-Method": "POST",
            "Access-Control-Request-Headers": "content-type",
        },
    )

    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == SHOP
    assert resp.headers["Access-Control-Allow-Methods"] == "POST"
    assert resp.headers["Access-Control-Allow-Headers"] == "content-type"
    assert resp.headers["Vary"] == "Origin"
    assert polar.calls == []


@pytest.mark.parametrize("origin", ["http://evil.example", None])
async def test_preflight_from_another_origin_is_forbidden(
    relay: Client, origin: str | None
) -> None:
    """A preflight from an unlisted origin (or none) grants nothing."""
    headers = {"Access-Control-Request-Method": "POST"}
    if origin is not None:
        headers["Origin"] = origin
    resp = await relay.options("/checkout", headers=headers)

    assert resp.status == 403
    assert "Access-Control-Allow-Origin" not in resp.headers


async def test_rate_limit_answers_429_with_retry_after(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """Past rate_limit_per_min requests from one address, 429 with Retry-After; Polar only
    saw the allowed ones."""
    app = create_app(with_checkout(config, polar, rate_limit_per_min=3), poll_interval_s=0.05)
    relay = await aiohttp_client(app)
    for _ in range(3):
        assert (await post(relay, {"plan": "pro"}))[0] == 200

    status, answer, headers = await post(relay, {"plan": "pro"})

    assert status == 429
    assert answer == {"error": "too many requests"}
    assert 1 <= int(headers["Retry-After"]) <= 20  # one token back every 20 s at 3 a minute
    assert headers["Access-Control-Allow-Origin"] == SHOP
    assert len(polar.checkouts) == 3
    assert checkouts(relay, "rate_limited") == 1
    assert checkouts(relay, "created") == 3


async def test_polar_down_is_a_generic_502(relay: Client, polar: FakePolar, logs: LogList) -> None:
    """Polar answering 503 to every try: 502 with a generic message; the failure is logged
    with Polar's status and counted."""
    polar.outage(503, retry_after="0")

    status, answer, headers = await post(relay, {"plan": "pro", **IDS})

    assert status == 502
    assert answer == GENERIC_ERROR
    assert headers["Access-Control-Allow-Origin"] == SHOP
    assert len(polar.requests_to("/v1/checkouts/", "POST")) == 5  # the client's max_tries
    assert polar.checkouts == []
    assert checkouts(relay, "failed") == 1
    [failed] = events(logs, "checkout_failed")
    assert failed["status"] == 503
    assert failed["log_level"] == "error"


async def test_a_refused_token_is_a_generic_502_without_the_token(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar, logs: LogList
) -> None:
    """A token Polar refuses (401): 502 with the generic message, once (not retried); the token
    is in neither the answer nor the logs (the autouse fixture checks every log line)."""
    bad = dataclasses.replace(
        with_checkout(config, polar),
        polar_api=with_polar_api(config, polar, token=WRONG_TOKEN).polar_api,
    )
    relay = await aiohttp_client(create_app(bad, poll_interval_s=0.05))

    resp = await relay.post("/checkout", json={"plan": "pro"}, headers={"Origin": SHOP})
    text = await resp.text()

    assert resp.status == 502
    assert await resp.json() == GENERIC_ERROR
    assert WRONG_TOKEN not in text
    assert len(polar.calls) == 1
    assert polar.calls[0].headers["Authorization"] == f"Bearer {WRONG_TOKEN}"
    assert checkouts(relay, "failed") == 1
    [failed] = events(logs, "checkout_failed")
    assert failed["status"] == 401


async def test_the_endpoint_is_absent_unless_enabled(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """Without [checkout] enabled = true there is no /checkout route at all."""
    plain = await aiohttp_client(create_app(with_polar_api(config, polar), poll_interval_s=0.05))

    resp = await plain.post("/checkout", json={"plan": "pro"}, headers={"Origin": SHOP})

    assert resp.status in (404, 405)
    assert polar.calls == []


async def test_a_custom_path(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """checkout.path moves the endpoint."""
    app = create_app(with_checkout(config, polar, path="/api/buy"), poll_interval_s=0.05)
    relay = await aiohttp_client(app)

    resp = await relay.post("/api/buy", json={"plan": "pro"}, headers={"Origin": SHOP})

    assert resp.status == 200
    assert len(polar.checkouts) == 1


# ---------------------------------------------------------------- configuration


def raw_config(faurya: FakeFaurya, db_path: Path, **tables: Any) -> dict[str, Any]:
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["storage"]["path"] = str(db_path)
    raw.update(tables)
    return raw


EXAMPLE = """
[checkout]
enabled = true
path = "/checkout"
allow_origins = ["https://shop.example", "https://www.shop.example"]
success_url = "https://shop.example/thanks?checkout_id={CHECKOUT_ID}"
return_url = "https://shop.example/pricing"
rate_limit_per_min = 10

[checkout.plans]
pro = "5f0e6c1e-8a4b-4c7e-9a53-2f6d1b0c7e11"
team = "8a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d"
"""


def test_the_documented_checkout_table_parses(faurya: FakeFaurya, db_path: Path) -> None:
    """The [checkout] example of docs/polar-api.md, with a token, is a valid config."""
    assert EXAMPLE.strip() in (REPO / "docs" / "polar-api.md").read_text()
    raw = raw_config(faurya, db_path, **tomllib.loads(EXAMPLE))

    config = parse(raw, env(FAURYA_URL=faurya.url, POLAR_ACCESS_TOKEN=TOKEN))

    assert config.checkout == CheckoutConfig(
        enabled=True,
        path="/checkout",
        plans=(("pro", PRODUCT), ("team", "8a1b2c3d-4e5f-4a6b-9c7d-8e9f0a1b2c3d")),
        allow_origins=("https://shop.example", "https://www.shop.example"),
        success_url="https://shop.example/thanks?checkout_id={CHECKOUT_ID}",
        return_url="https://shop.example/pricing",
        rate_limit_per_min=10,
    )
    assert config.polar_api.token is not None
    assert config.polar_api.token.value == TOKEN


@pytest.mark.parametrize(
    ("checkout", "token", "problem"),
    [
        (
            {"enabled": True},
            TOKEN,
            "checkout.plans: the checkout endpoint needs at least one plan",
        ),
        (
            {"enabled": True, "plans": {"pro": PRODUCT}},
            "",
            "polar_api.token: the checkout endpoint needs a Polar access token",
        ),
        (
            {"enabled": True, "plans": {"pro": ""}},
            TOKEN,
            "checkout.plans.pro: must be a Polar product id (a string)",
        ),
        (
            {"enabled": True, "plans": {"pro": PRODUCT}, "allow_origins": ["https://a.example/"]},
            TOKEN,
            None,
        ),
        (
            {"plans": {"pro": PRODUCT}, "allow_origins": ["https://a.example/shop"]},
            TOKEN,
            "checkout.allow_origins[0]: must be an origin like https://shop.example",
        ),
        (
            {"plans": {"pro": PRODUCT}, "allow_origins": ["https://a.example?x=1"]},
            TOKEN,
            "checkout.allow_origins[0]: must be an origin like https://shop.example",
        ),
        (
            {"plans": {"pro": PRODUCT}, "allow_origins": ["a.example"]},
            TOKEN,
            "checkout.allow_origins[0]: must be an origin like https://shop.example",
        ),
        (
            {"plans": {"pro": PRODUCT}, "success_url": "shop.example/thanks"},
            TOKEN,
            "checkout.success_url: must be an http:// or https:// URL with a host",
        ),
        (
            {"plans": {"pro": PRODUCT}, "rate_limit_per_min": 0},
            TOKEN,
            "checkout.rate_limit_per_min: must be between 1 and 100000",
        ),
        (
            {"plans": {"pro": PRODUCT}, "cors": True},
            TOKEN,
            "checkout.cors: unknown key",
        ),
    ],
)
def test_checkout_config_problems_name_the_key(
    faurya: FakeFaurya,
    db_path: Path,
    checkout: dict[str, Any],
    token: str,
    problem: str | None,
) -> None:
    """Enabled without plans or without a token, and bad values: a config error naming the
    full key path (a trailing slash on an origin is forgiven)."""
    raw = raw_config(faurya, db_path, checkout=checkout)
    environ = env(FAURYA_URL=faurya.url, POLAR_ACCESS_TOKEN=token)

    if problem is None:
        assert parse(raw, environ).checkout.allow_origins == ("https://a.example",)
        return
    with pytest.raises(ConfigError) as caught:
        parse(raw, environ)

    assert [p for p in caught.value.problems if p.startswith(problem)] != []
    assert all(TOKEN not in p for p in caught.value.problems)


def test_shipped_config_has_checkout_off(faurya: FakeFaurya, db_path: Path) -> None:
    """The shipped relay.toml parses with the endpoint off and no token needed."""
    config = shipped_config(faurya.url, db_path)

    assert config.checkout.enabled is False
    assert config.polar_api.token is None
