"""The relay's processes run on uvloop by default and on asyncio's own loop when
RELAY_EVENT_LOOP=asyncio says so, with the same behaviour; after start-up the garbage
collector is settled (relay/runtime.py)."""

from __future__ import annotations

import asyncio
import gc
import signal
import sqlite3
import uuid
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import pytest
import uvloop

from relay import runtime
from tests.helpers import REPO, FakeFaurya, RelayProcesses, order_paid, sign_headers


@pytest.fixture
def gc_state() -> Iterator[None]:
    """Puts the test process's collector back as it was: settle() changes it process-wide."""
    thresholds = gc.get_threshold()
    try:
        yield
    finally:
        gc.unfreeze()
        gc.set_threshold(*thresholds)


def test_uvloop_is_the_default_and_asyncio_can_be_chosen(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without RELAY_EVENT_LOOP the loop is uvloop's; `asyncio` (any case, spaces) picks the
    standard library's loop, and `runtime.run` reports which one ran."""
    monkeypatch.delenv("RELAY_EVENT_LOOP", raising=False)
    assert runtime.loop_factory() is uvloop.new_event_loop

    async def name() -> str:
        return runtime.loop_name()

    assert runtime.run(name()) == "uvloop"
    monkeypatch.setenv("RELAY_EVENT_LOOP", " AsyncIO ")
    assert runtime.loop_factory() is None
    assert runtime.run(name()) == "asyncio"


@pytest.mark.usefixtures("gc_state")
def test_settle_freezes_start_up_objects_and_raises_the_young_threshold(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """settle() moves what exists into the permanent generation and collects young objects
    every 10,000 allocations; RELAY_GC=default leaves the collector as Python sets it."""
    gc.unfreeze()
    gc.set_threshold(700, 10, 10)
    monkeypatch.setenv("RELAY_GC", "default")
    runtime.settle()
    assert (gc.get_threshold(), gc.get_freeze_count()) == ((700, 10, 10), 0)

    monkeypatch.delenv("RELAY_GC")
    runtime.settle()
    assert gc.get_threshold() == runtime.GC_THRESHOLDS
    assert gc.get_freeze_count() > 1000


@pytest.mark.e2e
@pytest.mark.parametrize("choice", ["", "asyncio"])
async def test_the_relay_serves_and_delivers_on_either_loop(
    choice: str, faurya: FakeFaurya, relay_processes: RelayProcesses, db_path: Path
) -> None:
    """`relay serve` says which loop it runs on (`relay_listening` event_loop), and on each
    the same signed webhooks are acknowledged, delivered once each and SIGTERM stops it."""
    relay = await relay_processes.new(
        REPO / "relay.toml", faurya.url, RELAY_EVENT_LOOP=choice
    ).start()
    orders = [str(uuid.uuid4()) for _ in range(5)]

    async with aiohttp.ClientSession() as http:

        async def send(order_id: str) -> int:
            body = order_paid(order_id)
            url = f"{relay.url}/webhooks/polar"
            async with http.post(url, data=body, headers=sign_headers(body)) as resp:
                return resp.status

        assert await asyncio.gather(*(send(o) for o in orders)) == [202] * 5
    await faurya.wait_for(5)
    assert await relay.signal(signal.SIGTERM, timeout_s=30) == 0

    assert relay.logged("relay_listening")[0]["event_loop"] == (choice or "uvloop")
    keys = sorted(call.headers["idempotency-key"] for call in faurya.received)
    assert keys == sorted(f"polar:order:{o}" for o in orders)
    with sqlite3.connect(db_path) as db:
        assert db.execute(
            "SELECT status, count(*) FROM outbound_messages GROUP BY 1"
        ).fetchall() == [("delivered", 5)]
