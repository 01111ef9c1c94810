"""Operator commands act at once on every relay serving the outbox, not at its next poll.

`relay pause`, `relay resume`, `relay outbox retry` and `relay replay` run as real `relay`
processes against the database of relays served in this test process with a 30 s poll
interval: each change must take effect within a few seconds of the command's exit (in
practice well under one; the deadline is wide for a loaded machine, and still far below the
poll). On SQLite
the serving relay sees the other process's commit (PRAGMA data_version); on PostgreSQL every
replica gets a NOTIFY.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from pathlib import Path

from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay.app import STORE, WORKERS, create_app
from relay.config import Config
from relay.models import MessageStatus
from tests.helpers import (
    Client,
    FakeFaurya,
    order_paid,
    relay_command,
    run_command,
    sign_headers,
    wait_until,
)

POLL_S = 30.0  # the workers' own poll: far longer than any deadline below
DEADLINE_S = 5.0  # from the command's exit to the effect: far below POLL_S


async def operator(*args: str) -> None:
    done = await run_command(relay_command(), *args, timeout_s=30)
    assert done.code == 0, done.err


async def post_order(relay: Client, order_id: str) -> None:
    body = order_paid(order_id)
    async with relay.post("/webhooks/polar", data=body, headers=sign_headers(body)) as resp:
        assert resp.status == 202


def answering(faurya: FakeFaurya, first: int) -> None:
    """Faurya answers the first call with `first`, every later one with 200."""

    async def script(request: web.Request, n: int) -> web.StreamResponse:
        return web.json_response({}, status=first if n == 0 else 200)

    faurya.script = script


async def within(deadline_s: float, condition: Callable[[], bool]) -> None:
    async def holds() -> bool:
        return condition()

    await wait_until(holds, timeout_s=deadline_s)


async def dead_then_retried(
    relays: list[Client], faurya: FakeFaurya, db: str, dead_count: Callable[[], Awaitable[int]]
) -> None:
    """One order dead-lettered (422), then `relay outbox retry --all-dead` from another
    process: Faurya gets the retry within the deadline."""
    answering(faurya, 422)
    await post_order(relays[0], "3f9a1c2e-7b4d-4e8f-9a0b-1c2d3e4f5a6b")
    await faurya.wait_for(1)

    async def dead() -> bool:
        return await dead_count() == 1

    await wait_until(dead)
    await operator("outbox", "retry", "--all-dead", "--db", db)
    await faurya.wait_for(2, timeout_s=DEADLINE_S)


async def paused_then_resumed(relays: list[Client], faurya: FakeFaurya, db: str) -> None:
    """`relay pause` from another process: every relay's worker is paused within the
    deadline; `relay resume`: the order that waited is delivered within the deadline."""
    workers = [r.app[WORKERS].by_destination["faurya"] for r in relays]
    await operator("pause", "faurya", "--db", db)
    await within(DEADLINE_S, lambda: all(w.paused for w in workers))
    before = len(faurya.received)
    await post_order(relays[0], "9b8a7c6d-5e4f-4a3b-8c2d-1e0f9a8b7c6d")
    await operator("resume", "faurya", "--db", db)
    await faurya.wait_for(before + 1, timeout_s=DEADLINE_S)
    assert not any(w.paused for w in workers)


# ---------------------------------------------------------------- SQLite


async def test_sqlite_retry_from_another_process_is_sent_at_once(
    aiohttp_client: AiohttpClient, config: Config, faurya: FakeFaurya, db_path: Path
) -> None:
    """A relay on SQLite sends a message revived by `relay outbox retry` (another process)
    at once (within DEADLINE_S), though its workers poll every 30 s."""
    relay = await aiohttp_client(create_app(config, poll_interval_s=POLL_S))

    async def dead_count() -> int:
        return (await relay.app[STORE].stats("faurya")).counts[MessageStatus.DEAD]

    await dead_then_retried([relay], faurya, str(db_path), dead_count)


async def test_sqlite_pause_and_resume_from_another_process_act_at_once(
    aiohttp_client: AiohttpClient, config: Config, faurya: FakeFaurya, db_path: Path
) -> None:
    """`relay pause` and `relay resume` (another process) take effect on a relay on SQLite
    at once (within DEADLINE_S), though its workers poll every 30 s."""
    relay = await aiohttp_client(create_app(config, poll_interval_s=POLL_S))
    await paused_then_resumed([relay], faurya, str(db_path))


# ---------------------------------------------------------------- PostgreSQL


async def test_postgres_retry_and_pause_reach_every_replica_at_once(
    aiohttp_client: AiohttpClient, config: Config, faurya: FakeFaurya, pg_url: str
) -> None:
    """Two relays on one PostgreSQL outbox: a retry from another process is sent at once,
    and pause and resume reach both replicas at once (NOTIFY), within DEADLINE_S."""
    relays = [
        await aiohttp_client(create_app(config, db_path=pg_url, poll_interval_s=POLL_S))
        for _ in range(2)
    ]

    async def dead_count() -> int:
        return (await relays[1].app[STORE].stats("faurya")).counts[MessageStatus.DEAD]

    await dead_then_retried(relays, faurya, pg_url, dead_count)
    await paused_then_resumed(relays, faurya, pg_url)
