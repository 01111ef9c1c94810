"""The delivery workers against the fake Faurya: what each answer does to a message.

The app runs with a FakeClock: the workers' own loop sends a new message at once (a commit wakes
them), but a retry only becomes due when the test moves the clock; `run_until_idle()` then runs
it. A message the background loop holds is awaited (`settled`), never slept on.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import socket
import sqlite3
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from email.utils import format_datetime
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from multidict import CIMultiDict

from relay.app import METRICS, STORE, WORKERS
from relay.config import Config
from relay.models import MessageRecord, MessageStatus
from relay.workers import RECEIVING_WINDOW_S
from tests.helpers import (
    SECRETS,
    SITE_ID,
    WRITE_KEY,
    Client,
    FakeClock,
    FakeFaurya,
    LogList,
    StartRelay,
    logged,
    order_paid,
    settled,
    shipped_config,
    sign_headers,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events


@pytest.fixture
def config(shipped_delivery_config: Config) -> Config:
    """The shipped relay.toml as it is: these tests pin what each answer does through the
    delivery child the shipped config starts."""
    return shipped_delivery_config


@pytest.fixture
def log_secrets() -> tuple[str, ...]:
    """No log event of a test here may hold one of these."""
    return SECRETS


@pytest.fixture
async def gate(faurya: FakeFaurya) -> AsyncIterator[asyncio.Event]:
    """An event a slow Faurya awaits; set at teardown, before the fake server closes, so no
    request handler is left hanging."""
    event = asyncio.Event()
    yield event
    event.set()


def with_faurya(config: Config, **changes: Any) -> Config:
    """The config with fields of the faurya destination replaced."""
    dest = dataclasses.replace(config.destinations["faurya"], **changes)
    return dataclasses.replace(config, destinations={**config.destinations, "faurya": dest})


async def post_order(relay: Client, order_id: str | None = None) -> MessageRecord:
    """POST a signed order.paid; its (just committed) outbound message."""
    order_id = order_id or str(uuid.uuid4())
    body = order_paid(order_id)
    resp = await relay.post("/webhooks/polar", data=body, headers=sign_headers(body))
    assert resp.status == 202, await resp.text()
    key = f"polar:order:{order_id}"
    [message] = [m for m in await relay.app[STORE].list_messages() if m.idempotency_key == key]
    return message


def metric(relay: Client, name: str, **labels: str) -> float:
    value = relay.app[METRICS].registry.get_sample_value(name, {"destination": "faurya", **labels})
    return value or 0.0


def deliveries(relay: Client, outcome: str) -> float:
    return metric(relay, "relay_deliveries_total", outcome=outcome)


def row_in_file(db_path: Path, message_id: int) -> sqlite3.Row:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        row: sqlite3.Row = db.execute(
            "SELECT * FROM outbound_messages WHERE id = ?", (message_id,)
        ).fetchone()
    return row


# ---------------------------------------------------------------- delivered


@pytest.mark.parametrize("status", [200, 201, 409])
async def test_2xx_and_409_mark_the_message_delivered(
    start: StartRelay, faurya: FakeFaurya, logs: LogList, status: int
) -> None:
    """Any 2xx, and 409 (already recorded), settle the message as delivered, sent with the
    relay's headers."""

    async def answer(request: web.Request, n: int) -> web.Response:
        return web.json_response({"ok": status < 300}, status=status)

    faurya.script = answer
    relay = await start()

    message = await post_order(relay, "c0ffee00-0000-4000-8000-000000000001")
    record = await settled(relay, message.id)

    assert record.status is MessageStatus.DELIVERED
    assert (record.last_status, record.attempts, record.last_error) == (status, 1, None)
    [call] = faurya.received
    headers = CIMultiDict(call.headers)
    assert headers["idempotency-key"] == "polar:order:c0ffee00-0000-4000-8000-000000000001"
    assert headers["user-agent"].startswith("faurya-relay/")
    assert headers["content-type"] == "application/json"
    assert headers["x-faurya-site-id"] == SITE_ID
    assert headers["x-faurya-write-key"] == WRITE_KEY
    assert call.body == message.body
    assert deliveries(relay, "delivered") == 1
    assert metric(relay, "relay_delivery_attempts_total", status_class=f"{status // 100}xx") == 1
    [entry] = logged(logs, "delivery_succeeded")
    assert (entry["message_id"], entry["status"], entry["attempt"]) == (message.id, status, 1)


@pytest.mark.parametrize("processes", [0, 1], ids=["in process", "delivery child"])
async def test_a_cookie_from_faurya_is_never_sent_back(
    start: StartRelay, faurya: FakeFaurya, config: Config, processes: int
) -> None:
    """The delivery client keeps no cookies: a Set-Cookie from the receiver does not ride
    along on later messages (which may carry other orders' data)."""

    async def answer(request: web.Request, n: int) -> web.Response:
        response = web.json_response({"ok": True})
        response.set_cookie("session", f"s{n}", path="/")
        return response

    faurya.script = answer
    server = dataclasses.replace(config.server, delivery_processes=processes)
    # By name: aiohttp's default jar ignores cookies from a bare IP address.
    by_name = config.destinations["faurya"].url.replace("127.0.0.1", "localhost")
    relay = await start(dataclasses.replace(with_faurya(config, url=by_name), server=server))
    for _ in range(2):
        message = await post_order(relay)
        assert (await settled(relay, message.id)).status is MessageStatus.DELIVERED
    _, second = faurya.received
    assert "cookie" not in CIMultiDict(second.headers)


# ---------------------------------------------------------------- retried


async def test_500_is_retried_with_the_same_bytes_and_key(
    start: StartRelay, faurya: FakeFaurya, clock: FakeClock, logs: LogList
) -> None:
    """A 500 schedules a retry after the backoff (within its jitter); the retry sends the
    identical body and idempotency key, and a 200 then delivers it."""

    async def answer(request: web.Request, n: int) -> web.Response:
        return web.Response(status=500 if n == 0 else 200, text="boom" if n == 0 else "ok")

    faurya.script = answer
    relay = await start()

    message = await post_order(relay)
    first = await settled(relay, message.id)

    assert first.status is MessageStatus.PENDING
    assert (first.last_status, first.attempts) == (500, 1)
    assert first.last_error == "HTTP 500: boom"
    # attempt 1: base_s (1 s) scaled by jitter 0.5 into [0.5, 1] s
    assert clock.now() + 0.5 <= first.next_attempt_at <= clock.now() + 1.0
    assert deliveries(relay, "retry") == 1
    assert metric(relay, "relay_delivery_attempts_total", status_class="5xx") == 1
    [entry] = logged(logs, "delivery_retry_scheduled")
    assert (entry["message_id"], entry["reason"], entry["counts_attempt"]) == (
        message.id,
        "HTTP 500",
        True,
    )

    clock.advance(1.0)
    second = await settled(relay, message.id)

    assert second.status is MessageStatus.DELIVERED
    assert (second.last_status, second.attempts) == (200, 2)
    one, two = faurya.received
    assert one.body == two.body == message.body
    assert one.headers["idempotency-key"] == two.headers["idempotency-key"]
    assert deliveries(relay, "delivered") == 1


@pytest.mark.parametrize(
    ("retry_after", "delay_s"),
    [
        pytest.param(lambda now: "120", 120.0, id="seconds"),
        pytest.param(
            lambda now: format_datetime(datetime.fromtimestamp(now + 300, UTC), usegmt=True),
            300.0,
            id="http-date",
        ),
    ],
)
async def test_429_retry_after_is_honoured_without_using_an_attempt(
    start: StartRelay,
    faurya: FakeFaurya,
    clock: FakeClock,
    logs: LogList,
    retry_after: Callable[[float], str],
    delay_s: float,
) -> None:
    """A 429 with Retry-After (seconds or an HTTP date) retries exactly then, and gives the
    attempt back: throttling is not failure."""

    async def answer(request: web.Request, n: int) -> web.Response:
        if n == 0:
            return web.Response(status=429, headers={"Retry-After": retry_after(clock.now())})
        return web.Response(status=200)

    faurya.script = answer
    relay = await start()

    message = await post_order(relay)
    throttled = await settled(relay, message.id)

    assert throttled.status is MessageStatus.PENDING
    assert throttled.next_attempt_at == clock.now() + delay_s
    # the claim counted the attempt (0 -> 1); the 429 gave it back
    assert (throttled.last_status, throttled.attempts) == (429, 0)
    assert metric(relay, "relay_delivery_retry_after_seconds_total") == delay_s
    assert deliveries(relay, "retry") == 1
    [entry] = logged(logs, "delivery_retry_scheduled")
    assert (entry["reason"], entry["counts_attempt"], entry["retry_in_s"]) == (
        "HTTP 429",
        False,
        delay_s,
    )

    clock.advance(delay_s - 1)
    assert (await settled(relay, message.id)).status is MessageStatus.PENDING
    clock.advance(1)
    delivered = await settled(relay, message.id)

    assert delivered.status is MessageStatus.DELIVERED
    assert delivered.attempts == 1
    assert len(faurya.received) == 2


async def test_timeout_schedules_a_retry(
    start: StartRelay, config: Config, faurya: FakeFaurya, gate: asyncio.Event, logs: LogList
) -> None:
    """A Faurya that does not answer within timeout_s is a timeout: retried later."""

    async def hang(request: web.Request, n: int) -> web.Response:
        await gate.wait()
        return web.Response(status=200)

    faurya.script = hang
    relay = await start(with_faurya(config, timeout_s=0.2))  # lease_s stays 60 >= 0.2 + 5

    message = await post_order(relay)
    record = await settled(relay, message.id)

    assert record.status is MessageStatus.PENDING
    assert (record.last_status, record.last_error, record.attempts) == (None, "timeout", 1)
    assert metric(relay, "relay_delivery_attempts_total", status_class="timeout") == 1
    assert deliveries(relay, "retry") == 1
    [entry] = logged(logs, "delivery_retry_scheduled")
    assert (entry["message_id"], entry["reason"], entry["status"]) == (message.id, "timeout", None)
    assert entry["error_kind"] == "timeout"


async def test_while_webhooks_arrive_the_pool_holds_back_to_concurrency_while_receiving(
    start: StartRelay, config: Config, faurya: FakeFaurya, gate: asyncio.Event
) -> None:
    """While webhooks arrive, at most `concurrency_while_receiving` attempts run at once; once
    none has arrived for the receiving window, the whole pool works the backlog."""

    async def hang(request: web.Request, n: int) -> web.Response:
        await gate.wait()
        return web.Response(status=200)

    faurya.script = hang
    relay = await start(
        with_faurya(config, concurrency=6, concurrency_while_receiving=2),
        real_clock=True,
        poll_interval_s=0.05,
    )
    worker = relay.app[WORKERS].by_destination["faurya"]
    assert worker.receiving_window_s == RECEIVING_WINDOW_S
    worker.receiving_window_s = 60.0  # longer than this test: "webhooks keep arriving"
    for _ in range(6):
        await post_order(relay)

    await faurya.wait_for(2)
    assert worker.limit == 2
    stats = await relay.app[STORE].stats("faurya")
    assert len(faurya.received) == 2  # the other four wait in the outbox
    assert (stats.counts[MessageStatus.PENDING], stats.counts[MessageStatus.INFLIGHT]) == (4, 2)

    worker.receiving_window_s = 0.0  # nothing has arrived for the window: the whole pool
    await faurya.wait_for(6)
    assert worker.limit == 6


def closed_port() -> int:
    """A loopback port nothing listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_connection_refused_schedules_a_retry(
    start: StartRelay, db_path: Path, logs: LogList
) -> None:
    """A Faurya that refuses the connection is a transient failure: retried later."""
    relay = await start(shipped_config(f"http://127.0.0.1:{closed_port()}", db_path))

    message = await post_order(relay)
    record = await settled(relay, message.id)

    assert record.status is MessageStatus.PENDING
    assert record.last_status is None
    assert record.last_error is not None
    assert record.last_error.startswith("connect: ClientConnectorError")
    assert metric(relay, "relay_delivery_attempts_total", status_class="connect") == 1
    assert deliveries(relay, "retry") == 1
    [entry] = logged(logs, "delivery_retry_scheduled")
    assert entry["reason"] == record.last_error
    assert entry["error_kind"] == "connect"


# ---------------------------------------------------------------- dead-lettered


@pytest.mark.parametrize("status", [400, 422])
async def test_permanent_4xx_dead_letters_at_once_without_blocking_others(
    start: StartRelay, config: Config, faurya: FakeFaurya, logs: LogList, status: int
) -> None:
    """A 400/422 dead-letters the message on its first attempt, keeping the status and the
    answer; the messages behind it are still delivered."""
    poison = "dead0000-0000-4000-8000-000000000001"

    async def answer(request: web.Request, n: int) -> web.Response:
        if (await request.json())["providerPaymentId"] == poison:
            return web.json_response({"error": "amount: must be positive"}, status=status)
        return web.json_response({"ok": True})

    faurya.script = answer
    # One slot: the poison message is claimed first and everything else waits behind it.
    relay = await start(with_faurya(config, concurrency=1))

    bad = await post_order(relay, poison)
    good = [await post_order(relay), await post_order(relay)]
    dead = await settled(relay, bad.id)
    others = [await settled(relay, m.id) for m in good]

    assert dead.status is MessageStatus.DEAD
    assert (dead.last_status, dead.attempts) == (status, 1)
    assert dead.last_error is not None
    assert f"HTTP {status}" in dead.last_error
    assert '{"error": "amount: must be positive"}' in dead.last_error
    assert [m.status for m in others] == [MessageStatus.DELIVERED] * 2
    assert len(faurya.received) == 3
    assert deliveries(relay, "dead") == 1
    assert deliveries(relay, "delivered") == 2
    [entry] = logged(logs, "delivery_dead_lettered")
    assert (entry["message_id"], entry["status"]) == (bad.id, status)
    assert "amount: must be positive" in entry["response"]


@pytest.mark.parametrize(
    ("status", "outcome"), [(400, MessageStatus.DEAD), (500, MessageStatus.PENDING)]
)
async def test_write_key_echoed_by_faurya_is_masked(
    start: StartRelay, faurya: FakeFaurya, logs: LogList, status: int, outcome: MessageStatus
) -> None:
    """An answer that echoes our write key is stored and logged with the key masked."""

    async def echo(request: web.Request, n: int) -> web.Response:
        return web.Response(status=status, text=f"bad key {request.headers['x-faurya-write-key']}!")

    faurya.script = echo
    relay = await start()

    message = await post_order(relay)
    record = await settled(relay, message.id)

    assert record.status is outcome
    assert record.last_error is not None
    assert "bad key ***!" in record.last_error
    assert WRITE_KEY not in record.last_error
    assert [e for e in logs if WRITE_KEY in repr(e)] == []
    if outcome is MessageStatus.DEAD:
        assert logged(logs, "delivery_dead_lettered")[0]["response"] == "bad key ***!"
    assert deliveries(relay, "dead" if status == 400 else "retry") == 1


async def test_exhausted_attempts_dead_letter_the_message(
    start: StartRelay, config: Config, faurya: FakeFaurya, clock: FakeClock, logs: LogList
) -> None:
    """After max_attempts transient failures the message is dead-lettered."""

    async def down(request: web.Request, n: int) -> web.Response:
        return web.Response(status=503, text="down")

    faurya.script = down
    policy = dataclasses.replace(config.destinations["faurya"].retry, max_attempts=2)
    relay = await start(with_faurya(config, retry=policy))

    message = await post_order(relay)
    first = await settled(relay, message.id)
    clock.advance(1.0)
    last = await settled(relay, message.id)

    assert first.status is MessageStatus.PENDING
    assert last.status is MessageStatus.DEAD
    assert (last.attempts, last.last_status) == (2, 503)
    assert last.last_error is not None
    assert "gave up after 2 attempts (max_attempts)" in last.last_error
    assert len(faurya.received) == 2
    assert deliveries(relay, "retry") == 1
    assert deliveries(relay, "dead") == 1
    [entry] = logged(logs, "delivery_dead_lettered")
    assert (entry["message_id"], entry["attempt"]) == (message.id, 2)
    assert entry["reason"].startswith("gave up after 2 attempts")


async def test_operator_retry_resends_a_dead_message(
    start: StartRelay, faurya: FakeFaurya, logs: LogList
) -> None:
    """`retry_messages(all_dead=True)` gives a dead message a fresh budget and the workers
    send it again at once, with the same bytes and key."""

    async def answer(request: web.Request, n: int) -> web.Response:
        return web.Response(status=422 if n == 0 else 200, text="unknown site" if n == 0 else "")

    faurya.script = answer
    relay = await start()
    message = await post_order(relay)
    assert (await settled(relay, message.id)).status is MessageStatus.DEAD

    assert await relay.app[STORE].retry_messages(all_dead=True) == 1
    # The retry wakes the workers: well before their 30 s poll.
    await faurya.wait_for(2, timeout_s=10)
    record = await settled(relay, message.id)

    assert record.status is MessageStatus.DELIVERED
    assert (record.attempts, record.last_status, record.last_error) == (1, 200, None)
    one, two = faurya.received
    assert one.body == two.body
    assert one.headers["idempotency-key"] == two.headers["idempotency-key"]
    assert deliveries(relay, "dead") == 1
    assert deliveries(relay, "delivered") == 1
    assert len(logged(logs, "delivery_succeeded")) == 1


# ---------------------------------------------------------------- timing and shutdown


def worker_asleep(relay: Client) -> Callable[[], Awaitable[bool]]:
    """A condition: the faurya worker loop waits for a wake-up, rather than looking at the
    outbox."""

    async def asleep() -> bool:
        return relay.app[WORKERS].by_destination["faurya"].sleeping

    return asleep


async def test_new_message_is_sent_without_waiting_for_a_poll(
    start: StartRelay, faurya: FakeFaurya
) -> None:
    """A commit wakes the idle workers: the call goes out long before the 30 s poll."""
    relay = await start(real_clock=True, poll_interval_s=30)
    # Post only once the worker sleeps: a commit landing during its first look at the outbox
    # would be found without any wake-up, and the test could not fail.
    await wait_until(worker_asleep(relay), timeout_s=10)

    message = await post_order(relay)
    [call] = await faurya.wait_for(1, timeout_s=10)  # the poll would take 30 s

    assert call.body == message.body


async def test_stop_releases_an_attempt_that_outlives_the_grace_period(
    start: StartRelay,
    config: Config,
    faurya: FakeFaurya,
    gate: asyncio.Event,
    db_path: Path,
    logs: LogList,
) -> None:
    """An attempt still waiting for Faurya when the grace period ends is cancelled and its
    message returned to pending with the attempt not counted, never left inflight."""

    async def slow(request: web.Request, n: int) -> web.Response:
        await gate.wait()
        return web.Response(status=200)

    faurya.script = slow
    relay = await start(
        dataclasses.replace(config, server=dataclasses.replace(config.server, shutdown_grace_s=0.1))
    )
    message = await post_order(relay)
    await faurya.wait_for(1)

    await relay.close()

    row = row_in_file(db_path, message.id)
    assert (row["status"], row["attempts"], row["lease_until"]) == ("pending", 0, None)
    assert [e["message_id"] for e in logged(logs, "delivery_released")] == [message.id]
    assert logged(logs, "delivery_cancelled_at_shutdown")[0]["count"] == 1


async def test_stop_lets_an_attempt_finish_within_the_grace_period(
    start: StartRelay, faurya: FakeFaurya, gate: asyncio.Event, db_path: Path, logs: LogList
) -> None:
    """An attempt that gets its answer during the grace period is recorded as delivered
    before the store closes."""

    async def slow(request: web.Request, n: int) -> web.Response:
        await gate.wait()
        return web.Response(status=200)

    faurya.script = slow
    relay = await start()
    message = await post_order(relay)
    await faurya.wait_for(1)
    workers = relay.app[WORKERS]

    async def stopping() -> bool:
        return not workers.running

    closing = asyncio.create_task(relay.close())
    await wait_until(stopping)
    gate.set()
    await asyncio.wait_for(closing, timeout=30)

    row = row_in_file(db_path, message.id)
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 1, 200)
    assert [e["message_id"] for e in logged(logs, "delivery_succeeded")] == [message.id]
    assert logged(logs, "delivery_released") == []
