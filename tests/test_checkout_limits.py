"""The checkout endpoint under abuse: its body read is bounded in time and size
like a webhook's, its Polar budget is its own and bounded (a flood gets 503, payment checks
and reconciliation do not wait behind it), and its per-client limit counts every
X-Forwarded-For line and whole IPv6 /64s."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
from aiohttp import ClientResponse
from multidict import CIMultiDict
from pytest_aiohttp import AiohttpClient

from relay.access import parse_networks
from relay.app import METRICS, POLAR_API, create_app
from relay.checkout import RateLimiter, client_key
from relay.config import CheckoutConfig, Config
from tests.helpers import Client, LogList, raw_connection, status_line_after
from tests.polar_fake import FakePolar, with_polar_api

pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events


PRODUCT = "5f0e6c1e-8a4b-4c7e-9a53-2f6d1b0c7e11"
SHOP = "http://shop.example"


def with_checkout(config: Config, polar: FakePolar, **changes: Any) -> Config:
    """Checkout on, behind a trusted proxy at 127.0.0.1 (so tests name clients by
    X-Forwarded-For), with `changes` to [checkout]; the Polar budget is 6000 a minute unless
    a test sets it (at the default 60 every Polar request waits a second for its slot)."""
    checkout = CheckoutConfig(
        enabled=True,
        plans=(("pro", PRODUCT),),
        allow_origins=(SHOP,),
        global_rate_limit_per_min=6000,
    )
    return dataclasses.replace(
        with_polar_api(config, polar),
        checkout=dataclasses.replace(checkout, **changes),
        server=dataclasses.replace(
            config.server, trusted_proxies=parse_networks(["127.0.0.1/32"]), body_timeout_s=1.0
        ),
    )


async def start(aiohttp_client: AiohttpClient, config: Config) -> Client:
    return await aiohttp_client(create_app(config, poll_interval_s=0.05))


def checkouts(relay: Client, outcome: str) -> float:
    value = relay.app[METRICS].registry.get_sample_value(
        "relay_checkouts_total", {"outcome": outcome}
    )
    return value or 0.0


async def post_from(relay: Client, *forwarded_for: str) -> ClientResponse:
    headers = CIMultiDict({"Origin": SHOP})
    for line in forwarded_for:
        headers.add("X-Forwarded-For", line)
    return await relay.post("/checkout", json={"plan": "pro"}, headers=headers)


def head(port: int, length: int) -> bytes:
    return (
        f"POST /checkout HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\nOrigin: {SHOP}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


# ---------------------------------------------------------------- the body read (item 6)


async def test_a_body_that_never_comes_gets_408_after_body_timeout(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """`Content-Length: 60` and no body: 408 after server.body_timeout_s (1 s), as for a
    webhook, instead of a connection held open; nothing reaches Polar."""
    relay = await start(aiohttp_client, with_checkout(config, polar))
    port = relay.server.port
    assert port is not None

    status_line, waited = await status_line_after(port, head(port, 60), timeout_s=9)

    assert status_line.startswith(b"HTTP/1.1 408 "), status_line
    # After body_timeout_s (1 s), well before the default 10 s; the bound is wide because a
    # loaded machine may run the timer late.
    assert 0.5 < waited < 8
    assert polar.checkouts == []
    assert checkouts(relay, "invalid") == 1


async def test_a_body_in_two_segments_is_read_whole(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """A valid JSON body that arrives in two TCP segments is read whole and creates the
    checkout (a single read took only the first segment: 400 "body must be JSON")."""
    relay = await start(aiohttp_client, with_checkout(config, polar))
    port = relay.server.port
    assert port is not None
    body = json.dumps({"plan": "pro", "faSessionId": "s_81d0c4a2e9f7"}).encode()

    async with raw_connection(port) as (reader, writer):
        writer.write(head(port, len(body)) + body[:10])
        await writer.drain()
        # The gap between the segments is the condition under test, not a synchronisation.
        await asyncio.sleep(0.2)
        writer.write(body[10:])
        await writer.drain()
        async with asyncio.timeout(15):
            status_line = await reader.readline()

    assert status_line.startswith(b"HTTP/1.1 200 "), status_line
    assert len(polar.checkouts) == 1


async def test_a_chunked_body_past_the_limit_is_413(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """A body without Content-Length (chunked) is cut off past 4096 bytes with 413."""
    relay = await start(aiohttp_client, with_checkout(config, polar))

    async def chunks() -> AsyncIterator[bytes]:
        yield b'{"plan": "pro", "faSessionId": "'
        yield b"x" * 5000
        yield b'"}'

    resp = await relay.post("/checkout", data=chunks(), headers={"Origin": SHOP})

    assert resp.status == 413
    assert polar.checkouts == []


# ---------------------------------------------------------------- budget and limits (item 4)


async def test_a_checkout_flood_gets_503_and_payment_checks_do_not_wait(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar, logs: LogList
) -> None:
    """50 checkouts at once from 50 addresses (each within its per-client limit) fill the
    checkout's own Polar budget (600/min, a queue of 2 s): the rest get 503 with Retry-After
    and are counted as busy; meanwhile a payment check on the other budget answers at once."""
    relay = await start(aiohttp_client, with_checkout(config, polar, global_rate_limit_per_min=600))
    order = polar.add_order()

    flood = [asyncio.create_task(post_from(relay, f"203.0.113.{i}")) for i in range(1, 51)]
    # Let the flood take its slots before the check asks.
    await wait_for_calls(polar, 1)
    payments_api = relay.app[POLAR_API]
    started = time.monotonic()
    checked = await payments_api.get_order(order["id"])
    check_s = time.monotonic() - started
    answers = await asyncio.gather(*flood)

    assert checked is not None
    assert checked["id"] == order["id"]
    # It never waited for a slot (on the checkout's budget it would have queued behind the
    # flood: about 2 s), and so came back well inside that queue even on a loaded machine.
    assert payments_api.waited_s == 0.0
    assert check_s < 1.5
    statuses = sorted(r.status for r in answers)
    created, busy = statuses.count(200), statuses.count(503)
    assert created + busy == 50
    assert 10 <= created <= 25  # about 2 s of queue at 0.1 s a request
    assert busy >= 25
    for resp in answers:
        if resp.status == 503:
            assert int(resp.headers["Retry-After"]) >= 1
            assert await resp.json() == {"error": "too many checkouts; try again"}
    assert checkouts(relay, "busy") == busy
    assert len([e for e in logs if e["event"] == "checkout_busy"]) == busy


async def wait_for_calls(polar: FakePolar, count: int) -> None:
    async with asyncio.timeout(30):
        while len(polar.calls) < count:  # noqa: ASYNC110 - a deadline-bound poll of a list
            await asyncio.sleep(0.005)


async def test_the_per_client_limit_counts_a_whole_ipv6_64(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """With one checkout a minute per client, a second address in the same IPv6 /64 is
    limited (429) like the first; an address in another /64 is not."""
    relay = await start(aiohttp_client, with_checkout(config, polar, rate_limit_per_min=1))

    first = await post_from(relay, "2001:db8::1")
    same_64 = await post_from(relay, "2001:db8::ffff:1")
    other_64 = await post_from(relay, "2001:db8:0:1::1")

    assert (first.status, same_64.status, other_64.status) == (200, 429, 200)
    assert checkouts(relay, "rate_limited") == 1


async def test_the_per_client_limit_reads_every_forwarded_for_line(
    aiohttp_client: AiohttpClient, config: Config, polar: FakePolar
) -> None:
    """A client that writes a fresh first X-Forwarded-For line on each request, behind a
    proxy that appends the real address on its own line, is still one client: 429."""
    relay = await start(aiohttp_client, with_checkout(config, polar, rate_limit_per_min=1))

    first = await post_from(relay, "10.0.0.1", "198.51.100.7")
    second = await post_from(relay, "10.0.0.2", "198.51.100.7")

    assert (first.status, second.status) == (200, 429)


def test_client_key_is_the_address_or_its_64() -> None:
    """IPv4 addresses count alone; IPv6 addresses by their /64."""
    assert client_key("203.0.113.9") == "203.0.113.9"
    assert client_key("2001:db8::1") == client_key("2001:db8::ffff:1") == "2001:db8::/64"
    assert client_key(None) == "?"
    limiter = RateLimiter(per_min=1)
    assert limiter.take(client_key("2001:db8::1"), 0.0) == 0
    assert limiter.take(client_key("2001:db8::2"), 0.0) > 0
