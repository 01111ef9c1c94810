"""End to end: the installed `relay serve`, as a subprocess, between a fake Polar and a fake Faurya.

The relay runs the shipped relay.toml, configured by environment variables, on a loopback port the
OS picks. The fake Faurya is a real aiohttp server in this process; the test plays Polar with real
signatures. SIGTERM and SIGKILL are real signals; the database is inspected with sqlite3.
"""

from __future__ import annotations

import asyncio
import contextlib
import re
import signal
import sqlite3
import tomllib
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web

from tests.helpers import (
    REPO,
    FakeFaurya,
    RelayProcess,
    RelayProcesses,
    metric,
    order_paid,
    sign_headers,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONFIG = REPO / "relay.toml"
SHIPPED = tomllib.loads(CONFIG.read_text())
GRACE_S = float(SHIPPED["server"]["shutdown_grace_s"])  # SIGTERM: the relay exits within this
CONCURRENCY = int(SHIPPED["destinations"]["faurya"]["concurrency"])  # requests at once


class Switchboard:
    """Scripts the fake Faurya: every call gets `status`, or, while `holding`, waits for
    `released` first. Records the status each call (by index) was answered with; a call still
    held has no entry."""

    def __init__(self) -> None:
        self.status = 200
        self.holding = False
        self.released = asyncio.Event()
        self.held: set[int] = set()
        self.answered: dict[int, int] = {}

    async def __call__(self, request: web.Request, n: int) -> web.StreamResponse:
        if self.holding:
            self.held.add(n)
            await self.released.wait()
        self.answered[n] = self.status
        return web.json_response({"ok": self.status < 300}, status=self.status)


MakeRelay = Callable[..., RelayProcess]


@pytest.fixture
def switchboard(faurya: FakeFaurya) -> Iterator[Switchboard]:
    board = Switchboard()
    faurya.script = board
    yield board
    # Held requests must end before the fake Faurya's server shuts down.
    board.released.set()


@pytest.fixture
def make_relay(faurya: FakeFaurya, relay_processes: RelayProcesses) -> MakeRelay:
    """Builds relay processes on the test database (`relay_processes` kills and reaps them)."""

    def make(config: Path = CONFIG) -> RelayProcess:
        return relay_processes.new(config, faurya.url)

    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


async def send_orders(
    http: aiohttp.ClientSession, relay: RelayProcess, order_ids: list[str]
) -> list[int]:
    """Play Polar: one signed order.paid per order id, all at once; the answer statuses."""

    async def send(order_id: str) -> int:
        body = order_paid(order_id)
        url = f"{relay.url}/webhooks/polar"
        async with http.post(url, data=body, headers=sign_headers(body)) as resp:
            return resp.status

    return list(await asyncio.gather(*(send(o) for o in order_ids)))


def new_orders(count: int) -> list[str]:
    return [str(uuid.uuid4()) for _ in range(count)]


def calls_by_order(faurya: FakeFaurya) -> dict[str, list[int]]:
    """Indexes of the calls Faurya received, grouped by the Polar order id they carry."""
    out: dict[str, list[int]] = {}
    for n, call in enumerate(faurya.received):
        out.setdefault(call.json["providerPaymentId"], []).append(n)
    return out


def successes(faurya: FakeFaurya, board: Switchboard) -> dict[str, int]:
    """Per order, how many of its calls Faurya answered with a 2xx."""
    return {
        order: sum(1 for n in calls if 200 <= board.answered.get(n, 0) < 300)
        for order, calls in calls_by_order(faurya).items()
    }


async def each_delivered(
    faurya: FakeFaurya, board: Switchboard, orders: list[str], timeout_s: float = 15.0
) -> None:
    """Await until Faurya answered at least one call of every order with a 2xx."""

    async def done() -> bool:
        counts = successes(faurya, board)
        return all(counts.get(order, 0) >= 1 for order in orders)

    await wait_until(done, timeout_s)


def message_counts(db_path: Path) -> dict[str, int]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT status, COUNT(*) FROM outbound_messages GROUP BY status")
        return {str(status): int(count) for status, count in rows}


async def test_orders_are_delivered_once_each_and_sigterm_stops_cleanly(
    make_relay: MakeRelay, faurya: FakeFaurya, http: aiohttp.ClientSession, db_path: Path
) -> None:
    """Twenty signed order.paid webhooks become twenty Faurya calls with twenty distinct
    idempotency keys, and SIGTERM stops the relay with exit 0 and `relay_stopped`."""
    relay = await make_relay().start()
    orders = new_orders(20)

    assert await send_orders(http, relay, orders) == [202] * 20
    await faurya.wait_for(20)
    assert await relay.signal(signal.SIGTERM, timeout_s=GRACE_S) == 0

    keys = [call.headers["idempotency-key"] for call in faurya.received]
    assert sorted(keys) == sorted(f"polar:order:{o}" for o in orders)  # exactly 20, distinct
    assert len(relay.logged("webhook_accepted")) == 20
    assert len(relay.logged("delivery_succeeded")) == 20
    assert relay.logged("relay_stopped")
    assert message_counts(db_path) == {"delivered": 20}


async def test_sigkill_with_undelivered_messages_loses_none(
    make_relay: MakeRelay,
    faurya: FakeFaurya,
    switchboard: Switchboard,
    http: aiohttp.ClientSession,
    db_path: Path,
) -> None:
    """Messages Faurya kept refusing when the relay was SIGKILLed all reach Faurya after a
    restart: one 2xx per order, and every attempt of an order carries the same idempotency
    key and identical body bytes."""
    switchboard.status = 503  # no Retry-After: plain backoff, from about 1 s
    relay = await make_relay().start()
    orders = new_orders(30)
    assert await send_orders(http, relay, orders) == [202] * 30
    await faurya.wait_for(30)
    await relay.wait_log("delivery_retry_scheduled")

    assert await relay.signal(signal.SIGKILL) == -signal.SIGKILL
    counts = message_counts(db_path)
    assert sum(counts.values()) == 30
    assert "delivered" not in counts
    assert "dead" not in counts

    switchboard.status = 200
    restarted = await make_relay().start()

    await each_delivered(faurya, switchboard, orders)
    assert await restarted.signal(signal.SIGTERM, timeout_s=GRACE_S) == 0

    assert successes(faurya, switchboard) == dict.fromkeys(orders, 1)
    for order, calls in calls_by_order(faurya).items():
        received = [faurya.received[n] for n in calls]
        assert {r.headers["idempotency-key"] for r in received} == {f"polar:order:{order}"}
        assert len({r.body for r in received}) == 1, f"body bytes changed for {order}"
    assert any(len(calls) > 1 for calls in calls_by_order(faurya).values())  # 503s were retried
    assert message_counts(db_path) == {"delivered": 30}


async def test_sigkill_mid_delivery_resends_only_what_was_in_flight(
    make_relay: MakeRelay,
    faurya: FakeFaurya,
    switchboard: Switchboard,
    http: aiohttp.ClientSession,
    db_path: Path,
) -> None:
    """Messages in flight when the relay is SIGKILLed return to pending at restart; then every
    order gets exactly one 2xx, and only the in-flight ones were sent twice."""
    switchboard.holding = True
    relay = await make_relay().start()
    orders = new_orders(CONCURRENCY + 4)  # more than the relay sends at once
    assert await send_orders(http, relay, orders) == [202] * len(orders)
    await faurya.wait_for(CONCURRENCY)  # every delivery slot is now stuck in a request
    in_flight = {faurya.received[n].json["providerPaymentId"] for n in switchboard.held}
    assert len(in_flight) == CONCURRENCY

    assert await relay.signal(signal.SIGKILL) == -signal.SIGKILL
    assert message_counts(db_path) == {"inflight": CONCURRENCY, "pending": 4}

    switchboard.holding = False  # the requests of the dead relay stay held until teardown
    restarted = await make_relay().start()
    assert restarted.logged("leases_recovered_at_startup")[0]["count"] == CONCURRENCY

    await each_delivered(faurya, switchboard, orders)
    assert await restarted.signal(signal.SIGTERM, timeout_s=GRACE_S) == 0

    assert successes(faurya, switchboard) == dict.fromkeys(orders, 1)
    sent_twice = {o for o, calls in calls_by_order(faurya).items() if len(calls) > 1}
    assert sent_twice == in_flight
    assert all(len(calls) <= 2 for calls in calls_by_order(faurya).values())
    assert message_counts(db_path) == {"delivered": len(orders)}


async def test_sigterm_waits_for_a_slow_delivery(
    make_relay: MakeRelay,
    faurya: FakeFaurya,
    switchboard: Switchboard,
    http: aiohttp.ClientSession,
    db_path: Path,
) -> None:
    """SIGTERM while Faurya is slow to answer: the relay waits for the answer, records the
    delivery and exits 0 within the grace period, leaving nothing inflight."""
    switchboard.holding = True
    relay = await make_relay().start()
    assert await send_orders(http, relay, new_orders(1)) == [202]
    await faurya.wait_for(1)

    relay.proc.send_signal(signal.SIGTERM)
    await relay.wait_log("relay_stopping")
    switchboard.released.set()  # Faurya answers 200, during the shutdown
    assert await relay.wait(GRACE_S) == 0

    assert relay.logged("delivery_succeeded")
    assert relay.logged("relay_stopped")
    assert message_counts(db_path) == {"delivered": 1}


async def test_sigterm_past_the_grace_period_hands_the_message_back(
    make_relay: MakeRelay,
    faurya: FakeFaurya,
    switchboard: Switchboard,
    http: aiohttp.ClientSession,
    db_path: Path,
    tmp_path: Path,
) -> None:
    """SIGTERM while Faurya never answers: after the grace period the attempt is cancelled, the
    message is pending again with the attempt not counted, and the relay exits 0."""
    config = tmp_path / "relay.toml"
    shortened, found = re.subn(
        r"(?m)^shutdown_grace_s = \S+", "shutdown_grace_s = 1", CONFIG.read_text()
    )
    assert found == 1
    config.write_text(shortened)
    switchboard.holding = True
    relay = await make_relay(config).start()
    assert await send_orders(http, relay, new_orders(1)) == [202]
    await faurya.wait_for(1)

    assert await relay.signal(signal.SIGTERM, timeout_s=1 + 5) == 0

    assert relay.logged("delivery_cancelled_at_shutdown")[0]["count"] == 1
    assert relay.logged("delivery_released")
    assert relay.logged("relay_stopped")
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT status, attempts, lease_token FROM outbound_messages").fetchall()
    assert rows == [("pending", 0, None)]


async def test_second_relay_on_the_same_database_refuses_to_start(
    make_relay: MakeRelay, http: aiohttp.ClientSession
) -> None:
    """A second `relay serve` on a database another relay serves exits 1 with one line saying
    so, and the first relay keeps serving."""
    first = await make_relay().start()

    second = make_relay()
    await second.launch()
    assert await second.wait(10) == 1

    [line] = second.lines
    assert line.startswith("relay: error: ")
    assert "another relay" in line
    async with http.get(f"{first.url}/healthz") as resp:
        assert resp.status == 200
    assert await first.signal(signal.SIGTERM, timeout_s=GRACE_S) == 0


async def test_health_readiness_and_metrics_over_http(
    make_relay: MakeRelay, faurya: FakeFaurya, http: aiohttp.ClientSession
) -> None:
    """The running relay answers /healthz and /readyz with 200 and serves Prometheus metrics
    that count an accepted webhook and its delivery."""
    relay = await make_relay().start()

    async with http.get(f"{relay.url}/healthz") as resp:
        assert resp.status == 200
        assert await resp.json() == {"status": "ok"}
    async with http.get(f"{relay.url}/readyz") as resp:
        assert resp.status == 200
        ready = await resp.json()
    assert ready["ready"] is True
    assert ready["checks"]["workers"] == "ok"
    assert ready["checks"]["store"] == "ok"

    assert await send_orders(http, relay, new_orders(1)) == [202]
    await faurya.wait_for(1)

    async def scrape() -> str:
        async with http.get(f"{relay.admin_url}/metrics") as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            return await resp.text()

    delivered = {"destination": "faurya", "outcome": "delivered"}

    async def delivery_counted() -> bool:
        return metric(await scrape(), "relay_deliveries_total", delivered) == 1

    await wait_until(delivery_counted)
    text = await scrape()
    assert metric(text, "relay_ready") == 1
    accepted = {"source": "polar", "event_type": "order.paid", "outcome": "accepted"}
    assert metric(text, "relay_webhooks_received_total", accepted) == 1
    outbox = {"destination": "faurya"}
    assert metric(text, "relay_outbox_messages", {**outbox, "status": "delivered"}) == 1
    assert metric(text, "relay_outbox_messages", {**outbox, "status": "pending"}) == 0
