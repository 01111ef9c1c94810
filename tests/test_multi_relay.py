"""Three relays on one PostgreSQL database, one SIGKILLed under load: nothing is lost.

Three real `relay serve` processes share one database (tests/pg.py gives it fresh), each on its
own port, in front of one fake Faurya that answers every call with a 200 after a short delay
(so deliveries are in flight when the kill comes). The test plays Polar: signed order.paid
webhooks spread round robin over the three relays, and a webhook that meets a dead relay is
retried, same webhook-id and body, at the next one. One relay is SIGKILLed mid-run; Polar keeps
sending to the other two. Each relay sends its own x-faurya-site-id (FAURYA_SITE_ID set per
process), so Faurya can tell which relay made each call.

What must hold: every webhook answered 2xx is delivered; a key reaches Faurya twice only if the
killed relay had it in flight (its lease expires after lease_s and another relay sends it
again), and then with the same key and identical bytes; never two calls for one key at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import sqlite3
import subprocess
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from relay.config import load
from tests.helpers import (
    REPO,
    FakeFaurya,
    RelayProcess,
    env,
    order_paid,
    process_env,
    relay_command,
    sign_headers,
    wait_until,
)
from tests.pg import pg_rows, relay_configured, relay_on

pytestmark = pytest.mark.e2e

TIMEOUT_S = 1  # destinations.faurya.timeout_s
LEASE_S = 6  # destinations.faurya.lease_s: the shortest the config allows (timeout_s + 5)
ANSWER_S = 0.3  # how long the fake Faurya takes to answer: deliveries stay in flight
SENDERS = 4
PACE_S = 0.05  # Polar's pace per sender
SITE = "site-relay-{}"


def multi_config(tmp_path: Path, *, storage_url: str | None = None) -> Path:
    """The shipped relay.toml with a 1 s request timeout, 6 s leases, quick retries and a 3 s
    grace period (and `[storage] url` when given), written to tmp_path and validated as
    `relay check` does."""
    text = (REPO / "relay.toml").read_text()
    settings = (("timeout_s", TIMEOUT_S), ("shutdown_grace_s", 3), ("base_s", 0.05), ("cap_s", 0.5))
    for key, value in settings:
        text, count = re.subn(rf"(?m)^({key} = )\S+", rf"\g<1>{value:g}", text)
        assert count == 1, f"relay.toml has {count} lines setting {key}"
    text = re.sub(r"(?m)^(timeout_s = .*)$", rf"\g<1>\nlease_s = {LEASE_S}", text)
    if storage_url is not None:
        text, count = re.subn(r"(?m)^\[storage\]$", f'[storage]\nurl = "{storage_url}"', text)
        assert count == 1
    path = tmp_path / ("relay-postgres.toml" if storage_url else "relay-multi.toml")
    path.write_text(text)
    config = load(path, env())
    faurya = config.destinations["faurya"]
    assert (faurya.timeout_s, faurya.lease_s, faurya.retry.base_s) == (TIMEOUT_S, LEASE_S, 0.05)
    assert config.storage.location == (storage_url or "relay.db")
    return path


# ---------------------------------------------------------------- Faurya


@dataclass
class Calls:
    """What the fake Faurya has open right now: keys per relay (site id), and per key."""

    by_site: dict[str, set[str]] = field(default_factory=dict)
    per_key: Counter[str] = field(default_factory=Counter)
    max_per_key: Counter[str] = field(default_factory=Counter)

    async def answer(self, request: web.Request, n: int) -> web.StreamResponse:
        key = request.headers["idempotency-key"]
        site = request.headers["x-faurya-site-id"]
        self.by_site.setdefault(site, set()).add(key)
        self.per_key[key] += 1
        self.max_per_key[key] = max(self.max_per_key[key], self.per_key[key])
        try:
            await asyncio.sleep(ANSWER_S)  # Faurya's answer time, not a synchronisation
            return web.json_response({"ok": True})
        finally:
            # Also when the server cancels the handler because the relay went away.
            self.by_site[site].discard(key)
            self.per_key[key] -= 1


# ---------------------------------------------------------------- Polar


@dataclass
class Polar:
    """Signed order.paid webhooks, each to the next relay in turn; one that fails (a closed
    port, a non-2xx) is retried with the same webhook-id and body at the next relay."""

    http: aiohttp.ClientSession
    relays: list[RelayProcess]
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[str, str] = field(default_factory=dict)  # webhook-id -> order id
    acked: dict[str, str] = field(default_factory=dict)  # answered 2xx
    retries: int = 0
    tries: int = 50  # per webhook; Polar itself keeps trying for about 30 minutes
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self) -> None:
        self.tasks = [asyncio.create_task(self._sender(n)) for n in range(SENDERS)]

    async def finish(self) -> None:
        self.stop.set()
        await asyncio.gather(*self.tasks)

    @property
    def acked_keys(self) -> set[str]:
        return {f"polar:order:{order}" for order in self.acked.values()}

    async def _sender(self, turn: int) -> None:
        while not self.stop.is_set():
            order_id, webhook_id = str(uuid.uuid4()), f"msg_{uuid.uuid4().hex}"
            self.sent[webhook_id] = order_id
            body = order_paid(order_id)
            for _ in range(self.tries):
                turn += 1
                if await self._post(self.relays[turn % len(self.relays)], body, webhook_id):
                    self.acked[webhook_id] = order_id
                    break
                self.retries += 1
                await asyncio.sleep(0.05)  # Polar's retry pause, not a synchronisation
            await asyncio.sleep(PACE_S)  # Polar's pace: the load's shape

    async def _post(self, relay: RelayProcess, body: bytes, webhook_id: str) -> bool:
        try:
            headers = sign_headers(body, msg_id=webhook_id)
            async with self.http.post(
                f"{relay.url}/webhooks/polar", data=body, headers=headers
            ) as resp:
                await resp.read()
                return 200 <= resp.status < 300
        except (aiohttp.ClientError, TimeoutError):
            return False


# ---------------------------------------------------------------- the test


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def keys_by_status(url: str) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for status, key in await pg_rows(url, "SELECT status, idempotency_key FROM outbound_messages"):
        out.setdefault(str(status), set()).add(str(key))
    return out


async def send_more_then_drain(
    polar: Polar, pg_url: str, more: int, send_s: float = 60, *, deliver_s: float = 60
) -> set[str]:
    """Let Polar get `more` webhooks acknowledged, stop it, and await every acknowledged key
    delivered (or `deliver_s`: the caller's assertions then say what is missing). Returns the
    acknowledged keys. The deadlines only bound a failing run (a loaded CI machine is slow)."""
    acked_before = len(polar.acked)

    async def kept_sending() -> bool:
        return len(polar.acked) >= acked_before + more

    await wait_until(kept_sending, timeout_s=send_s)
    await polar.finish()
    acked: set[str] = polar.acked_keys

    async def all_delivered() -> bool:
        by_status = await keys_by_status(pg_url)
        return set(by_status) == {"delivered"} and acked <= by_status["delivered"]

    with contextlib.suppress(TimeoutError):
        await wait_until(all_delivered, timeout_s=deliver_s)
    return acked


async def test_three_relays_lose_nothing_when_one_is_killed(
    pg_url: str, tmp_path: Path, aiohttp_server: AiohttpServer, http: aiohttp.ClientSession
) -> None:
    """With three relays on one database and one SIGKILLed while delivering, every webhook
    answered 2xx reaches Faurya; the only second calls are for keys the killed relay had in
    flight, sent again by another relay once the lease expired, with identical bytes."""
    calls = Calls()
    faurya = FakeFaurya(script=calls.answer)
    server = await aiohttp_server(faurya.app())
    faurya.url = str(server.make_url("")).rstrip("/")
    config = multi_config(tmp_path)
    relays = [
        relay_on(
            pg_url, config, process_env(**env(FAURYA_URL=faurya.url, FAURYA_SITE_ID=SITE.format(n)))
        )
        for n in range(3)
    ]
    try:
        await asyncio.gather(*(relay.start() for relay in relays))
        victim, survivors = relays[0], relays[1:]
        victim_site = SITE.format(0)
        polar = Polar(http, list(relays))
        polar.start()

        async def victim_busy() -> bool:
            """The victim has finished deliveries, and has some open right now."""
            made = sum(c.headers["x-faurya-site-id"] == victim_site for c in faurya.received)
            open_now = len(calls.by_site.get(victim_site, ()))
            return open_now >= 2 and made - open_now >= 5

        await wait_until(victim_busy)
        # Nothing runs between the snapshot and the signal: the fake Faurya shares this loop.
        open_at_kill = set(calls.by_site[victim_site])
        killed_at = time.monotonic()
        assert await victim.signal(signal.SIGKILL) == -signal.SIGKILL
        inflight_in_db = (await keys_by_status(pg_url)).get("inflight", set())
        sites_so_far: dict[str, set[str]] = {}
        for c in faurya.received:
            sites_so_far.setdefault(c.headers["idempotency-key"], set()).add(
                c.headers["x-faurya-site-id"]
            )
        # The victim's in-flight keys: its open requests, and its claims answered by Faurya
        # but not yet recorded when it died.
        caught = open_at_kill | {k for k in inflight_in_db if sites_so_far.get(k) == {victim_site}}

        acked = await send_more_then_drain(polar, pg_url, 40)
        delivered_in_s = time.monotonic() - killed_at
        for relay in survivors:
            assert await relay.signal(signal.SIGTERM) == 0
    finally:
        for relay in relays:
            await relay.close()

    per_key = Counter(c.headers["idempotency-key"] for c in faurya.received)
    duplicates = {key: n - 1 for key, n in per_key.items() if n > 1}
    sites = Counter(c.headers["x-faurya-site-id"] for c in faurya.received)
    requeued = sum(e["count"] for r in survivors for e in r.logged("leases_expired_requeued"))
    print(
        f"\nthree relays: sent={len(polar.sent)} acked={len(polar.acked)} "
        f"polar_retries={polar.retries} faurya_calls={len(faurya.received)} "
        f"by_relay={dict(sites)} open_at_kill={len(open_at_kill)} caught={len(caught)} "
        f"duplicates={sum(duplicates.values())} requeued_by_survivors={requeued} "
        f"delivered_in_s={delivered_in_s:.1f}"
    )

    assert acked - set(per_key) == set()  # nothing acked was lost
    assert await keys_by_status(pg_url) == {"delivered": set(per_key)}
    stored = {r[0] for r in await pg_rows(pg_url, "SELECT webhook_id FROM inbound_events")}
    assert set(polar.acked) <= stored <= set(polar.sent)
    # Second calls only for what the killed relay had in flight; each of its open requests
    # was sent again by a survivor after the lease ran out.
    assert set(duplicates) <= caught
    assert open_at_kill <= set(duplicates)
    assert set(duplicates.values()) == {1}
    assert requeued >= len(open_at_kill)
    for key in duplicates:
        last = [c for c in faurya.received if c.headers["idempotency-key"] == key][-1]
        assert last.headers["x-faurya-site-id"] != victim_site
    bodies: dict[str, set[bytes]] = {}
    for c in faurya.received:
        bodies.setdefault(c.headers["idempotency-key"], set()).add(c.body)
    for key, variants in bodies.items():
        assert len(variants) == 1, f"{key}: {len(variants)} different bodies"
        assert key == f"polar:order:{json.loads(next(iter(variants)))['providerPaymentId']}"
    assert set(calls.max_per_key.values()) == {1}  # never two calls for one key at once
    assert set(sites) == {SITE.format(n) for n in range(3)}  # all three delivered
    assert polar.retries > 0  # webhooks that met the dead relay went to another
    assert all(r.logged("webhook_accepted") for r in relays)  # all three took webhooks


# ---------------------------------------------------------------- moving from SQLite


async def test_moving_a_running_sqlite_relay_to_postgresql_loses_nothing(
    pg_url: str, tmp_path: Path, aiohttp_server: AiohttpServer, http: aiohttp.ClientSession
) -> None:
    """The procedure of docs/postgres.md under load: stop the SQLite relay with SIGTERM while
    Polar keeps sending (it retries what meets the closed port), `relay migrate --from-sqlite`,
    start two relays with `[storage] url`: every webhook answered 2xx gets exactly one 2xx from
    Faurya, the messages pending at the stop included."""
    statuses: list[tuple[str, int]] = []  # (key, status) of every answer Faurya gave
    flaky = True

    async def answer(request: web.Request, n: int) -> web.StreamResponse:
        # Before the move every other call fails: the SQLite outbox has a backlog to move.
        status = 503 if flaky and n % 2 else 200
        statuses.append((request.headers["idempotency-key"], status))
        return web.json_response({"ok": status == 200}, status=status)

    faurya = FakeFaurya(script=answer)
    server = await aiohttp_server(faurya.app())
    faurya.url = str(server.make_url("")).rstrip("/")
    environ = process_env(**env(FAURYA_URL=faurya.url))
    sqlite_path = tmp_path / "relay.db"
    sqlite_relay = RelayProcess(multi_config(tmp_path), sqlite_path, environ)
    pg_config = multi_config(tmp_path, storage_url=pg_url)
    pg_relays = [relay_configured(pg_config, environ) for _ in range(2)]
    try:
        await sqlite_relay.start()
        # Each webhook is retried through the whole move (stop, migrate, two starts), however
        # long a loaded machine takes: 2400 tries are two minutes of 0.05 s pauses at least.
        polar = Polar(http, [sqlite_relay], tries=2400)
        polar.start()

        async def backlog() -> bool:
            return len(polar.acked) >= 30 and len(statuses) >= 20

        await wait_until(backlog)
        # 1. Stop the relay: it finishes or hands back what it is sending, and exits.
        assert await sqlite_relay.signal(signal.SIGTERM) == 0
        with contextlib.closing(sqlite3.connect(sqlite_path)) as db:
            at_stop = dict(
                db.execute("SELECT status, count(*) FROM outbound_messages GROUP BY status")
            )
        assert set(at_stop) <= {"delivered", "pending"}
        assert at_stop.get("pending", 0) > 0  # something to move
        # 2. Copy the outbox.
        moved = await relay_migrate("--from-sqlite", str(sqlite_path), "--db", pg_url, cwd=tmp_path)
        assert moved.returncode == 0, moved
        # 3. Start the relays on PostgreSQL; Polar's retries reach them.
        flaky = False
        await asyncio.gather(*(relay.start() for relay in pg_relays))
        polar.relays[:] = pg_relays
        acked = await send_more_then_drain(polar, pg_url, 30)
        for relay in pg_relays:
            assert await relay.signal(signal.SIGTERM) == 0
    finally:
        for relay in (sqlite_relay, *pg_relays):
            await relay.close()

    ok = Counter(key for key, status in statuses if status == 200)
    by_postgres = sum(len(r.logged("delivery_succeeded")) for r in pg_relays)
    print(
        f"\nmove to PostgreSQL: sent={len(polar.sent)} acked={len(polar.acked)} "
        f"polar_retries={polar.retries} at_stop={at_stop} faurya_calls={len(statuses)} "
        f"delivered_by_postgres_relays={by_postgres}"
    )
    assert moved.stdout.startswith(b"copied ")
    assert polar.retries > 0  # webhooks met the closed port during the move, and came back
    assert set(polar.acked) == set(polar.sent)
    assert dict(ok) == dict.fromkeys(acked, 1)  # each acked order: exactly one 2xx
    assert await keys_by_status(pg_url) == {"delivered": acked}
    for relay in pg_relays:
        assert relay.logged("store_opened")[0]["recovered"] == 0
        assert relay.logged("store_opened")[0]["path"] == pg_url
    bodies: dict[str, set[bytes]] = {}
    for c in faurya.received:
        bodies.setdefault(c.headers["idempotency-key"], set()).add(c.body)
    assert {key: len(variants) for key, variants in bodies.items()} == dict.fromkeys(acked, 1)


async def relay_migrate(*args: str, cwd: Path) -> subprocess.CompletedProcess[bytes]:
    proc = await asyncio.create_subprocess_exec(
        relay_command(),
        "migrate",
        *args,
        cwd=cwd,
        env=process_env(),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    async with asyncio.timeout(30):
        out, err = await proc.communicate()
    assert proc.returncode is not None
    return subprocess.CompletedProcess(["relay", "migrate", *args], proc.returncode, out, err)
