"""Destination faults and the operator's answers to them: a Faurya outage longer than Polar's
retry window, throttling, a poison message, pause and resume, retention, reprocess.

The relay runs in-process with a FakeClock. A commit wakes the workers' own loop, which sends a
new message at once; a retry becomes due only when the test moves the clock, and
`run_until_idle()` then runs it. Whatever the background loop holds is awaited, never slept on.
Webhooks are signed at the fake time, since the relay checks their timestamps on its clock.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import json
import uuid
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from prometheus_client.parser import text_string_to_metric_families

from relay.app import METRICS, STORE, WORKERS, prune_once
from relay.config import Config
from relay.models import (
    Clock,
    EventFilter,
    EventStatus,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    SystemClock,
)
from tests.helpers import (
    REPO,
    Client,
    FakeClock,
    FakeFaurya,
    LogList,
    StartRelay,
    admin_get,
    env,
    logged,
    order_paid,
    process_env,
    relay_command,
    sign_headers,
    wait_until,
)


class Board:
    """Scripts the fake Faurya: each call gets `status` (or `by_key[its idempotency key]`),
    after `latency_s` of service time. Records every answer, and the most calls it was
    serving at once."""

    def __init__(self) -> None:
        self.status = 200
        self.headers: dict[str, str] = {}
        self.by_key: dict[str, int] = {}
        self.latency_s = 0.0
        self.answers: list[tuple[str, int]] = []
        self.serving = 0
        self.most_serving = 0

    async def __call__(self, request: web.Request, n: int) -> web.StreamResponse:
        self.serving += 1
        self.most_serving = max(self.most_serving, self.serving)
        try:
            if self.latency_s:
                await asyncio.sleep(self.latency_s)  # service time, not synchronisation
            key = request.headers["idempotency-key"]
            status = self.by_key.get(key, self.status)
            self.answers.append((key, status))
            if status < 300:
                return web.json_response({"ok": True}, status=status)
            return web.json_response(
                {"error": f"refused with {status}: amount must be a positive integer"},
                status=status,
                headers=self.headers,
            )
        finally:
            self.serving -= 1

    def delivered(self) -> collections.Counter[str]:
        """How many 2xx answers each idempotency key got."""
        return collections.Counter(key for key, status in self.answers if status < 300)


@pytest.fixture
def board(faurya: FakeFaurya) -> Board:
    faurya.script = board_ = Board()
    return board_


def with_faurya(config: Config, **changes: Any) -> Config:
    """The config with fields of the faurya destination replaced."""
    dest = dataclasses.replace(config.destinations["faurya"], **changes)
    return dataclasses.replace(config, destinations={**config.destinations, "faurya": dest})


def with_retry(config: Config, **changes: Any) -> Config:
    retry = dataclasses.replace(config.destinations["faurya"].retry, **changes)
    return with_faurya(config, retry=retry)


def key_of(order_id: str) -> str:
    return f"polar:order:{order_id}"


async def send(relay: Client, clock: Clock, body: bytes) -> dict[str, Any]:
    """Play Polar: POST a webhook signed at the relay's time; it must be answered 202."""
    headers = sign_headers(body, timestamp=int(clock.now()))
    async with relay.post("/webhooks/polar", data=body, headers=headers) as resp:
        assert resp.status == 202, await resp.text()
        answer: dict[str, Any] = await resp.json()
    return answer


async def send_order(relay: Client, clock: FakeClock, order_id: str) -> MessageRecord:
    """A signed order.paid; its committed outbound message."""
    await send(relay, clock, order_paid(order_id))
    return await message_for(relay, key_of(order_id))


async def message_for(relay: Client, key: str) -> MessageRecord:
    [message] = [m for m in await relay.app[STORE].list_messages() if m.idempotency_key == key]
    return message


async def drain(relay: Client) -> None:
    """Run every due attempt, then await the ones the background loop holds."""
    await relay.app[WORKERS].run_until_idle()
    store = relay.app[STORE]

    async def none_inflight() -> bool:
        return (await store.stats("faurya")).counts[MessageStatus.INFLIGHT] == 0

    await wait_until(none_inflight)


async def scraped(relay: Client, name: str, **labels: str) -> float:
    """One sample as GET /metrics shows it (backlog gauges are read at scrape time)."""
    text = (await admin_get(relay)).text
    for family in text_string_to_metric_families(text):
        for found in family.samples:
            if found.name == name and found.labels == labels:
                return float(found.value)
    raise AssertionError(f"no sample {name}{labels} in /metrics")


async def backlog(relay: Client) -> tuple[float, float]:
    """(pending messages, age of the oldest one in seconds), from /metrics."""
    pending = await scraped(relay, "relay_outbox_messages", destination="faurya", status="pending")
    age = await scraped(relay, "relay_outbox_oldest_pending_age_seconds", destination="faurya")
    return pending, age


def counted(relay: Client, name: str, **labels: str) -> float:
    return relay.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def deliveries(relay: Client, outcome: str) -> float:
    return counted(relay, "relay_deliveries_total", destination="faurya", outcome=outcome)


# ---------------------------------------------------------------- an outage

SPACING_S = 42  # 50 webhooks 42 s apart: 35 minutes, past Polar's last retry (~34 min)


async def test_an_outage_longer_than_polars_retry_window_loses_nothing(
    start: StartRelay, config: Config, board: Board, clock: FakeClock
) -> None:
    """With Faurya answering 503 for 35 minutes, every webhook is still answered 202 and the
    backlog grows; once Faurya is back the backlog drains to zero, each order delivered
    exactly once with its key, never more requests at once than the destination's
    concurrency."""
    concurrency = 5
    relay = await start(with_faurya(config, concurrency=concurrency))
    board.status = 503
    orders = [str(uuid.uuid4()) for _ in range(50)]

    for n, order in enumerate(orders):
        clock.advance(SPACING_S)
        await send_order(relay, clock, order)  # 202, or this fails
        await drain(relay)
        if n == 9:
            assert await backlog(relay) == (10, 9 * SPACING_S)

    assert await backlog(relay) == (50, 49 * SPACING_S)
    assert {key for key, _ in board.answers} == {key_of(o) for o in orders}
    assert {status for _, status in board.answers} == {503}
    assert deliveries(relay, "dead") == 0
    assert deliveries(relay, "retry") == len(board.answers)

    board.status = 200
    board.latency_s = 0.01
    clock.advance(601)  # past the 600 s cap on backoff: every message is due
    # The workers' own loop drains, as in production (run_until_idle racing it would be
    # two claimers, and the concurrency measured would be the test's).
    relay.app[WORKERS].notify({"faurya"})
    store = relay.app[STORE]

    async def drained() -> bool:
        return (await store.stats("faurya")).counts[MessageStatus.DELIVERED] == len(orders)

    await wait_until(drained)

    assert await backlog(relay) == (0, 0)
    assert board.delivered() == {key_of(o): 1 for o in orders}
    assert 1 < board.most_serving <= concurrency
    assert deliveries(relay, "delivered") == len(orders)
    records = await store.list_messages(limit=len(orders))
    assert {(r.status, r.last_status) for r in records} == {(MessageStatus.DELIVERED, 200)}


async def test_throttling_with_retry_after_is_honoured_exactly_and_uses_no_attempts(
    start: StartRelay, config: Config, board: Board, clock: FakeClock, logs: LogList
) -> None:
    """A Faurya answering 429 Retry-After: 30 a hundred times makes each retry due exactly
    30 s later and uses none of the 5 attempts allowed: the message is never dead, and is
    delivered once Faurya takes it."""
    relay = await start(with_retry(config, max_attempts=5))
    board.status = 429
    board.headers = {"Retry-After": "30"}
    order = str(uuid.uuid4())
    message = await send_order(relay, clock, order)

    for _ in range(100):
        await drain(relay)
        record = await relay.app[STORE].get_message(message.id)
        assert record is not None
        assert record.status is MessageStatus.PENDING
        assert record.next_attempt_at == clock.now() + 30
        assert record.attempts == 0  # the claim counted one, the 429 gave it back
        assert record.last_status == 429
        clock.advance(30)

    assert len(board.answers) == 100
    assert deliveries(relay, "retry") == 100
    assert deliveries(relay, "dead") == 0
    assert counted(relay, "relay_delivery_retry_after_seconds_total", destination="faurya") == 3000
    scheduled = logged(logs, "delivery_retry_scheduled")
    assert len(scheduled) == 100
    assert {(e["counts_attempt"], e["retry_in_s"]) for e in scheduled} == {(False, 30)}
    assert logged(logs, "delivery_dead_lettered") == []

    board.status = 200
    await drain(relay)

    record = await relay.app[STORE].get_message(message.id)
    assert record is not None
    assert (record.status, record.attempts) == (MessageStatus.DELIVERED, 1)
    assert board.delivered() == {key_of(order): 1}


# ---------------------------------------------------------------- a poison message


async def test_a_poison_message_is_dead_lettered_alone_then_replayed(
    start: StartRelay, board: Board, clock: FakeClock, logs: LogList
) -> None:
    """A 422 for one order dead-letters that message alone, with the status and Faurya's
    answer recorded; the others are delivered; once fixed, replaying the dead delivers it."""
    relay = await start()
    store = relay.app[STORE]
    orders = [str(uuid.uuid4()) for _ in range(3)]
    poison = key_of(orders[1])
    board.by_key[poison] = 422
    messages = [await send_order(relay, clock, order) for order in orders]
    await drain(relay)

    dead = await store.get_message(messages[1].id)
    assert dead is not None
    assert (dead.status, dead.last_status, dead.attempts) == (MessageStatus.DEAD, 422, 1)
    assert dead.last_error is not None
    assert "HTTP 422" in dead.last_error
    assert "amount must be a positive integer" in dead.last_error  # Faurya's own words
    for other in (messages[0], messages[2]):
        record = await store.get_message(other.id)
        assert record is not None
        assert record.status is MessageStatus.DELIVERED
    assert deliveries(relay, "dead") == 1
    assert deliveries(relay, "delivered") == 2
    [entry] = logged(logs, "delivery_dead_lettered")
    assert (entry["idempotency_key"], entry["status"]) == (poison, 422)
    assert "amount must be a positive integer" in entry["response"]

    del board.by_key[poison]  # the cause is fixed at Faurya
    assert await store.replay(MessageFilter(statuses=(MessageStatus.DEAD,))) == 1
    await drain(relay)

    replayed = await store.get_message(messages[1].id)
    assert replayed is not None
    assert (replayed.status, replayed.last_status, replayed.attempts) == (
        MessageStatus.DELIVERED,
        200,
        1,
    )
    assert [status for key, status in board.answers if key == poison] == [422, 200]
    assert board.delivered() == {key_of(o): 1 for o in orders}
    assert deliveries(relay, "delivered") == 3


# ---------------------------------------------------------------- pause and resume


async def test_pause_holds_messages_and_resume_delivers_them(
    start: StartRelay, board: Board, clock: FakeClock, logs: LogList
) -> None:
    """While a destination is paused (relay pause) its messages wait as pending and nothing
    is sent; resuming delivers them."""
    relay = await start(poll_interval_s=0.05)  # the loop reads the pause state every 50 ms
    store = relay.app[STORE]
    worker = relay.app[WORKERS].by_destination["faurya"]

    await store.set_paused("faurya", True)

    async def paused() -> bool:
        return worker.paused

    await wait_until(paused)
    orders = [str(uuid.uuid4()) for _ in range(2)]
    messages = [await send_order(relay, clock, order) for order in orders]
    await drain(relay)

    assert board.answers == []
    for message in messages:
        record = await store.get_message(message.id)
        assert record is not None
        assert (record.status, record.attempts) == (MessageStatus.PENDING, 0)
    assert await scraped(relay, "relay_destination_paused", destination="faurya") == 1
    assert len(logged(logs, "destination_paused")) == 1

    await store.set_paused("faurya", False)

    async def delivered() -> bool:
        return (await store.stats("faurya")).counts[MessageStatus.DELIVERED] == 2

    await wait_until(delivered)
    assert board.delivered() == {key_of(o): 1 for o in orders}
    assert await scraped(relay, "relay_destination_paused", destination="faurya") == 0
    assert len(logged(logs, "destination_resumed")) == 1


async def test_paused_in_the_config_holds_messages_from_the_start(
    start: StartRelay, config: Config, board: Board, clock: FakeClock
) -> None:
    """`paused = true` in the config pauses the destination from start-up; `relay resume`
    (the store's override) lifts it."""
    relay = await start(with_faurya(config, paused=True))
    store = relay.app[STORE]
    order = str(uuid.uuid4())
    message = await send_order(relay, clock, order)
    await drain(relay)

    assert board.answers == []
    record = await store.get_message(message.id)
    assert record is not None
    assert record.status is MessageStatus.PENDING
    assert await scraped(relay, "relay_destination_paused", destination="faurya") == 1

    await store.set_paused("faurya", False)
    await drain(relay)

    assert board.delivered() == {key_of(order): 1}


# ---------------------------------------------------------------- retention


async def test_retention_clears_raw_bodies_then_delivered_rows_and_keeps_the_dead(
    start: StartRelay, config: Config, board: Board, clock: FakeClock, logs: LogList
) -> None:
    """Past retention.bodies_s the raw bodies of finished events are cleared (delivered
    messages keep theirs: replay and refund lookups need them); past rows_s delivered messages
    and their events are deleted. A dead message and its event are kept whole throughout."""
    relay = await start()
    store = relay.app[STORE]
    metrics = relay.app[METRICS]
    orders = [str(uuid.uuid4()) for _ in range(3)]
    board.by_key[key_of(orders[2])] = 422
    messages = [await send_order(relay, clock, order) for order in orders]
    await drain(relay)
    dead = messages[2]
    raw = {e.id: e.body for e in await store.list_events(EventFilter())}
    assert None not in raw.values()
    delivered_only = MessageFilter(statuses=(MessageStatus.DELIVERED,))

    clock.advance(config.retention.bodies_s + 1)
    await prune_once(store, config, clock.now(), metrics)

    bodies = {e.id: e.body for e in await store.list_events(EventFilter())}
    assert bodies == dict.fromkeys(raw) | {dead.event_id: raw[dead.event_id]}
    for message in messages:
        record = await store.get_message(message.id)
        assert record is not None
        assert record.body == message.body
    assert await store.replay(delivered_only, dry_run=True) == 2  # still replayable
    assert counted(relay, "relay_retention_pruned_total", kind="event_bodies_cleared") == 2
    assert counted(relay, "relay_retention_pruned_total", kind="messages_deleted") == 0
    [entry] = logged(logs, "retention_pruned")
    assert (entry["event_bodies_cleared"], entry["messages_deleted"]) == (2, 0)

    clock.advance(config.retention.rows_s - config.retention.bodies_s)
    await prune_once(store, config, clock.now(), metrics)

    assert [m.id for m in await store.list_messages()] == [dead.id]
    [event] = await store.list_events(EventFilter())
    assert (event.id, event.body) == (dead.event_id, raw[dead.event_id])
    kept = await store.get_message(dead.id)
    assert kept is not None
    assert (kept.status, kept.last_status, kept.body) == (MessageStatus.DEAD, 422, dead.body)
    assert await store.replay(delivered_only, dry_run=True) == 0
    assert counted(relay, "relay_retention_pruned_total", kind="messages_deleted") == 2
    assert counted(relay, "relay_retention_pruned_total", kind="events_deleted") == 2


# ---------------------------------------------------------------- reprocess

NET_ONLY = 'amount = { path = "data.net_amount", type = "int", required = true }'
WITH_FALLBACK = (
    'amount = { first = ["data.net_amount", "data.amount"], type = "int", required = true }'
)


def without_net_amount(order_id: str, amount: int) -> bytes:
    """An order.paid whose net_amount is missing: unmappable by the shipped rules."""
    event = json.loads(order_paid(order_id))
    del event["data"]["net_amount"]
    event["data"]["amount"] = amount
    return json.dumps(event).encode()


async def reprocess(config: Path, db_path: Path, faurya_url: str, *args: str) -> str:
    """`relay reprocess` as an operator runs it, next to the serving relay; its stdout."""
    proc = await asyncio.create_subprocess_exec(
        relay_command(),
        "reprocess",
        "--config",
        str(config),
        "--db",
        str(db_path),
        *args,
        env=process_env(**env(FAURYA_URL=faurya_url)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), timeout=30)
    assert proc.returncode == 0, err.decode()
    return out.decode()


@pytest.mark.e2e
async def test_reprocess_enqueues_what_a_fixed_mapping_gives_and_never_resends_a_key(
    start: StartRelay,
    board: Board,
    faurya: FakeFaurya,
    db_path: Path,
    tmp_path: Path,
    logs: LogList,
) -> None:
    """`relay reprocess` with a mapping fixed to fall back on data.amount enqueues the one
    unmappable order that was never sent; an unmappable event of an order already delivered
    adds nothing, and running it again adds nothing either."""
    relay = await start(real_clock=True)
    store = relay.app[STORE]
    sent, missing = str(uuid.uuid4()), str(uuid.uuid4())
    await send(relay, SystemClock(), order_paid(sent))
    await drain(relay)
    answer = await send(relay, SystemClock(), without_net_amount(missing, 999))
    assert (answer["status"], answer["messages"]) == ("accepted", 0)
    # Polar also sent the delivered order again as a new event, without net_amount.
    await send(relay, SystemClock(), without_net_amount(sent, 4410))
    assert len(logged(logs, "webhook_unmappable")) == 2
    unmappable_count = counted(
        relay,
        "relay_webhooks_received_total",
        source="polar",
        event_type="order.paid",
        outcome="unmappable",
    )
    assert unmappable_count == 2
    unmappable = await store.list_events(EventFilter(statuses=(EventStatus.UNMAPPABLE,)))
    assert len(unmappable) == 2
    shipped = (REPO / "relay.toml").read_text()
    assert NET_ONLY in shipped
    fixed = tmp_path / "relay.toml"
    fixed.write_text(shipped.replace(NET_ONLY, WITH_FALLBACK))

    first = await reprocess(fixed, db_path, faurya.url)
    await drain(relay)

    assert "events: 2, new messages: 1, already sent: 1, still unmappable: 0" in first
    assert board.delivered() == {key_of(sent): 1, key_of(missing): 1}
    [call] = [c for c in faurya.received if c.headers["idempotency-key"] == key_of(missing)]
    assert call.json["amount"] == 999
    statuses = {e.id: e.status for e in await store.list_events(EventFilter())}
    # by id: the missing order's event, then the resend of the delivered one
    assert [statuses[e.id] for e in unmappable] == [EventStatus.ROUTED, EventStatus.DUPLICATE]

    again = await reprocess(fixed, db_path, faurya.url)
    everything = await reprocess(fixed, db_path, faurya.url, "--status", "routed")
    await drain(relay)

    assert "events: 0, new messages: 0" in again
    assert "events: 2, new messages: 0, already sent: 2" in everything
    assert board.delivered() == {key_of(sent): 1, key_of(missing): 1}
    assert len(board.answers) == 2
