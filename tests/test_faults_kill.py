"""Delivery guarantees under faults: the real `relay serve`, killed and stopped under load.

Each test runs the installed `relay` command as a subprocess on the shipped relay.toml, with
its retry timings shortened in a copy written to tmp_path. The test plays Polar (signed
order.paid webhooks, retried until answered 202, as Polar does) and Faurya (a real aiohttp
server in this process whose answers the test scripts). SIGKILL and SIGTERM are real signals;
the database is read with sqlite3.

What a payments engineer needs to hear, checked here:
- lost: a webhook answered 202 whose revenue call never got a 2xx. Must be 0.
- duplicates: 2xx answers beyond the first for one idempotency key. Only a kill can cause one
  (Faurya answered, the relay died before recording it), so every duplicate must follow a kill
  that caught its key in flight, and Faurya always saw the same key with the same bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import random
import re
import signal
import sqlite3
import time
import tomllib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from relay.config import load, parse
from relay.errors import ConfigError
from tests.helpers import (
    REPO,
    RelayProcess,
    RelayProcesses,
    env,
    order_paid,
    sign_headers,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONCURRENCY = 8  # destinations.faurya.concurrency here (fault_config sets it): the fault
# scenarios are sized for it (the shipped relay.toml has more)
HANG_S = 30.0  # a hanging answer outlives any relay timeout; the relay's timeout ends it first
SLOW_S = 0.3  # a slow 200, well inside the relay's timeout


# ---------------------------------------------------------------- config


def fault_config(
    tmp_path: Path,
    *,
    timeout_s: float,
    grace_s: float,
    base_s: float = 0.05,
    cap_s: float = 0.5,
    lease_s: float | None = None,
) -> Path:
    """The shipped relay.toml with shorter timings, written to tmp_path and validated the way
    `relay check` does it (relay.config.load)."""
    text = (REPO / "relay.toml").read_text()
    text = _set(text, "shutdown_grace_s", grace_s)
    text = _set(text, "timeout_s", timeout_s)
    text = _set(text, "base_s", base_s)
    text = _set(text, "cap_s", cap_s)
    text = _set(text, "concurrency", CONCURRENCY)
    text = _set(text, "concurrency_while_receiving", CONCURRENCY)
    if lease_s is not None:
        text = re.sub(r"(?m)^(timeout_s = .*)$", rf"\g<1>\nlease_s = {lease_s:g}", text)
    path = tmp_path / "relay-faults.toml"
    path.write_text(text)

    config = load(path, env())
    faurya = config.destinations["faurya"]
    assert config.server.shutdown_grace_s == grace_s
    assert (faurya.timeout_s, faurya.retry.base_s, faurya.retry.cap_s) == (timeout_s, base_s, cap_s)
    assert faurya.concurrency == CONCURRENCY
    assert faurya.lease_s >= faurya.timeout_s + 5
    if lease_s is not None:
        assert faurya.lease_s == lease_s
    return path


def _set(text: str, key: str, value: float) -> str:
    """Replace the value of the one line setting `key`; fail if the shipped file changed shape."""
    new, count = re.subn(rf"(?m)^({key} = )\S+", rf"\g<1>{value:g}", text)
    assert count == 1, f"relay.toml has {count} lines setting {key}"
    return new


# ---------------------------------------------------------------- the fake Faurya


@dataclass
class Call:
    """One revenue call as the fake Faurya saw it. `status` is the answer it gave (None: it
    gave none); times are time.monotonic()."""

    key: str
    body: bytes
    behaviour: str
    arrived_at: float
    ended_at: float | None = None
    status: int | None = None


Chooser = Callable[[str, int], str]  # (idempotency key, calls for it so far) -> behaviour


@dataclass
class ScriptedFaurya:
    """A real HTTP server standing in for Faurya. `choose` picks each call's behaviour:
    "ok" (200), "slow" (200 after SLOW_S), "500", "503", "hang" (no answer, until the client
    gives up) or "reset" (the connection is dropped without an answer). It records every call,
    the requests open per key right now, and the most ever open at once per key."""

    choose: Chooser
    slow_s: float = SLOW_S
    url: str = ""
    calls: list[Call] = field(default_factory=list)
    open: Counter[str] = field(default_factory=Counter)
    max_open: Counter[str] = field(default_factory=Counter)
    seen: Counter[str] = field(default_factory=Counter)
    answered: asyncio.Event = field(default_factory=asyncio.Event)  # set at every 2xx sent

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        key = request.headers.get("idempotency-key", "")
        call = Call(key, body, self.choose(key, self.seen[key]), time.monotonic())
        self.seen[key] += 1
        self.calls.append(call)
        self.open[key] += 1
        self.max_open[key] = max(self.max_open[key], self.open[key])
        try:
            return await self._answer(request, call)
        finally:
            # Also runs when the server cancels the handler because the client went away
            # (TestServer enables handler_cancellation): the request is no longer open.
            self.open[key] -= 1
            call.ended_at = time.monotonic()

    async def _answer(self, request: web.Request, call: Call) -> web.StreamResponse:
        behaviour = call.behaviour
        if behaviour in ("hang", "reset"):
            if behaviour == "hang":
                await asyncio.sleep(HANG_S)
            transport = request.transport
            assert transport is not None
            transport.abort()
            # The server notices the dropped connection and cancels this handler.
            await asyncio.sleep(HANG_S)
            raise AssertionError("the fake Faurya's dropped connection went unnoticed")
        if behaviour == "slow":
            await asyncio.sleep(self.slow_s)
        status = {"ok": 200, "slow": 200, "500": 500, "503": 503}[behaviour]
        response = web.json_response({"ok": status == 200}, status=status)
        await response.prepare(request)
        await response.write_eof()  # the answer has left: Faurya counted this call
        call.status = status
        if status == 200:
            self.answered.set()
        return response

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/revenue", self._handle)
        return app

    def open_keys(self) -> set[str]:
        return {key for key, count in self.open.items() if count > 0}

    def answered_2xx(self) -> dict[str, list[Call]]:
        """Per key, its calls answered with a 2xx, in order."""
        out: dict[str, list[Call]] = {}
        for call in self.calls:
            if call.status is not None and 200 <= call.status < 300:
                out.setdefault(call.key, []).append(call)
        return out

    def assert_same_key_same_bytes(self) -> None:
        """Every call for one key carries the key of the order in its body, and the same body
        bytes as every other call for that key."""
        bodies: dict[str, set[bytes]] = {}
        for call in self.calls:
            bodies.setdefault(call.key, set()).add(call.body)
        for key, variants in bodies.items():
            assert len(variants) == 1, f"{key}: {len(variants)} different bodies"
            [body] = variants
            assert key == f"polar:order:{json.loads(body)['providerPaymentId']}"


async def start_faurya(aiohttp_server: AiohttpServer, choose: Chooser) -> ScriptedFaurya:
    fake = ScriptedFaurya(choose)
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


# ---------------------------------------------------------------- relays, Polar, the database


MakeRelay = Callable[[Path, ScriptedFaurya], RelayProcess]


@pytest.fixture
def make_relay(relay_processes: RelayProcesses) -> MakeRelay:
    """Builds `relay serve` processes on the test database (`relay_processes` kills and reaps
    them)."""

    def make(config: Path, faurya: ScriptedFaurya) -> RelayProcess:
        return relay_processes.new(config, faurya.url)

    return make


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def order_key(order_id: str) -> str:
    return f"polar:order:{order_id}"


@dataclass
class Polar:
    """Plays Polar against whichever relay is current: `senders` tasks post signed order.paid
    webhooks, each with a fresh order id, one after another at Polar's pace. With `persist`,
    a webhook that fails to connect or gets a non-2xx is retried with the same webhook-id and
    body, while the relay is `up`, until it is answered 202, as Polar does."""

    http: aiohttp.ClientSession
    relay: RelayProcess
    persist: bool
    pace_s: float = 0.05
    up: asyncio.Event = field(default_factory=asyncio.Event)
    stop: asyncio.Event = field(default_factory=asyncio.Event)
    sent: dict[str, str] = field(default_factory=dict)  # webhook-id -> order id
    acked: dict[str, str] = field(default_factory=dict)  # webhook-id -> order id, answered 202
    retries: int = 0
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def start(self, senders: int = 5) -> None:
        self.up.set()
        self.tasks = [asyncio.create_task(self._sender()) for _ in range(senders)]

    async def finish(self) -> None:
        """Stop starting new webhooks; wait for the senders to finish the ones they hold."""
        self.stop.set()
        await asyncio.gather(*self.tasks)

    @property
    def acked_keys(self) -> set[str]:
        return {order_key(order) for order in self.acked.values()}

    async def _sender(self) -> None:
        while not self.stop.is_set():
            order_id, webhook_id = str(uuid.uuid4()), f"msg_{uuid.uuid4().hex}"
            self.sent[webhook_id] = order_id
            body = order_paid(order_id)
            while not await self._post(body, webhook_id):
                if not self.persist:
                    break
                self.retries += 1
                await self.up.wait()
                await asyncio.sleep(0.05)  # Polar's retry pause, not a synchronisation
            else:
                self.acked[webhook_id] = order_id
            await asyncio.sleep(self.pace_s)  # Polar's pace: the load's shape

    async def _post(self, body: bytes, webhook_id: str) -> bool:
        url = f"{self.relay.url}/webhooks/polar"
        try:
            headers = sign_headers(body, msg_id=webhook_id)
            async with self.http.post(url, data=body, headers=headers) as resp:
                await resp.read()
                return resp.status == 202
        except (aiohttp.ClientError, TimeoutError):
            return False


def db_rows(db_path: Path, sql: str) -> list[tuple[object, ...]]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return list(db.execute(sql))


def keys_by_status(db_path: Path) -> dict[str, set[str]]:
    out: dict[str, set[str]] = {}
    for status, key in db_rows(db_path, "SELECT status, idempotency_key FROM outbound_messages"):
        out.setdefault(str(status), set()).add(str(key))
    return out


def stored_webhook_ids(db_path: Path) -> set[str]:
    return {str(r[0]) for r in db_rows(db_path, "SELECT webhook_id FROM inbound_events")}


# ---------------------------------------------------------------- 1. kill -9 under load


BEHAVIOURS = ("ok", "500", "503", "hang", "slow", "reset")
WEIGHTS = (35, 15, 15, 10, 15, 10)


@dataclass(frozen=True)
class Kill:
    """One SIGKILL: from the signal (`at`) to the reaped process (`done`), and the keys it
    caught in flight: requests open at Faurya, or rows still `inflight` in the database.
    `after_2xx`: it was sent just as a 200 left Faurya."""

    after_2xx: bool
    at: float
    done: float
    open_at_faurya: frozenset[str]
    inflight_in_db: frozenset[str]

    @property
    def in_flight(self) -> frozenset[str]:
        return self.open_at_faurya | self.inflight_in_db


# Seeds whose schedules mix kills at any moment with kills just after a 2xx (4 and 5 kills).
@pytest.mark.parametrize("seed", [7, 5])
async def test_kill_9_under_load_loses_nothing_and_duplicates_only_what_was_in_flight(
    seed: int,
    tmp_path: Path,
    db_path: Path,
    aiohttp_server: AiohttpServer,
    make_relay: MakeRelay,
    http: aiohttp.ClientSession,
) -> None:
    """SIGKILLed 3 to 5 times at random moments under sustained load while Faurya flaps, the
    relay delivers every webhook it answered 202 (none lost), and every duplicate 2xx follows a
    kill that caught its key in flight, with the same key and identical bytes on every call."""
    schedule, answers = random.Random(seed), random.Random(seed + 1)
    flapping = True

    def choose(key: str, seen: int) -> str:
        return answers.choices(BEHAVIOURS, WEIGHTS)[0] if flapping else "ok"

    faurya = await start_faurya(aiohttp_server, choose)
    config = fault_config(tmp_path, timeout_s=1, grace_s=3)
    relay = await make_relay(config, faurya).start()
    relays = [relay]
    polar = Polar(http, relay, persist=True)
    polar.start()

    kills: list[Kill] = []
    for _ in range(schedule.randint(3, 5)):
        await asyncio.sleep(schedule.uniform(0.3, 1.5))  # the fault schedule: load, then kill
        after_2xx = schedule.random() < 0.5
        if after_2xx:
            # The worst moment: just as a 200 leaves Faurya, before the relay can record it.
            faurya.answered.clear()
            async with asyncio.timeout(10):
                await faurya.answered.wait()
        polar.up.clear()
        open_at_faurya = frozenset(faurya.open_keys())
        at = time.monotonic()
        assert await relay.signal(signal.SIGKILL) == -signal.SIGKILL
        done = time.monotonic()
        inflight = frozenset(keys_by_status(db_path).get("inflight", set()))
        kills.append(Kill(after_2xx, at, done, open_at_faurya, inflight))

        relay = await make_relay(config, faurya).start()
        relays.append(relay)
        # It took the serve lock, so the dead relay's leases came back to pending at once.
        assert relay.logged("store_opened")[0]["recovered"] == len(inflight)
        polar.relay = relay
        polar.up.set()

    await polar.finish()
    flapping = False
    acked = polar.acked_keys
    assert len(polar.acked) == len(polar.sent)  # Polar got its 202 for every webhook it sent

    async def all_delivered() -> bool:
        return keys_by_status(db_path) == {"delivered": acked} and acked <= set(
            faurya.answered_2xx()
        )

    with contextlib.suppress(TimeoutError):  # then the figures and assertions say what is missing
        await wait_until(all_delivered, timeout_s=60)
    assert await relay.signal(signal.SIGTERM, timeout_s=10) == 0

    answered = faurya.answered_2xx()
    lost = acked - set(answered)
    duplicates = {key: len(calls) - 1 for key, calls in answered.items() if len(calls) > 1}
    in_flight_at_kills = sum(len(kill.in_flight) for kill in kills)
    print(
        f"\nkill -9 seed={seed}: runs={len(kills) + 1} kills={len(kills)} "
        f"(just after a 2xx: {sum(k.after_2xx for k in kills)}) "
        f"webhooks_acked={len(polar.acked)} polar_retries={polar.retries} "
        f"(already stored: {sum(len(r.logged('webhook_duplicate')) for r in relays)}) "
        f"delivered={len(answered)} lost={len(lost)} duplicates={sum(duplicates.values())} "
        f"in_flight_at_kills={in_flight_at_kills} "
        f"(open_at_faurya={sum(len(k.open_at_faurya) for k in kills)}, "
        f"inflight_in_db={sum(len(k.inflight_in_db) for k in kills)}) "
        f"faurya_calls={len(faurya.calls)} "
        f"behaviours={dict(Counter(c.behaviour for c in faurya.calls))}"
    )

    assert lost == set()
    assert set(answered) == acked  # and nothing Polar did not send reached Faurya
    assert sum(duplicates.values()) <= in_flight_at_kills
    for key, calls in answered.items():
        for first, again in itertools.pairwise(calls):
            # Faurya answered `first`, then a kill caught the key before the relay recorded it.
            assert any(
                key in kill.in_flight and first.arrived_at < kill.done < again.arrived_at
                for kill in kills
            ), f"{key} got a 2xx again with no kill in between that caught it in flight"
    faurya.assert_same_key_same_bytes()
    assert max(faurya.max_open.values()) == 1  # never two requests for one key at once
    assert stored_webhook_ids(db_path) == set(polar.sent)
    assert keys_by_status(db_path) == {"delivered": acked}


# ---------------------------------------------------------------- 2. SIGTERM under load


async def test_sigterm_under_load_keeps_every_acked_webhook_and_leaves_nothing_inflight(
    tmp_path: Path,
    db_path: Path,
    aiohttp_server: AiohttpServer,
    make_relay: MakeRelay,
    http: aiohttp.ClientSession,
) -> None:
    """SIGTERM while webhooks flow and Faurya answers slowly: the relay exits 0 within its grace
    period, every webhook answered 202 is stored, no message is left inflight, and a restart
    delivers the pending ones so that every key gets exactly one 2xx."""
    grace_s = 3.0
    faurya = await start_faurya(aiohttp_server, lambda key, seen: "slow")
    faurya.slow_s = 0.5
    config = fault_config(tmp_path, timeout_s=2, grace_s=grace_s)
    relay = await make_relay(config, faurya).start()
    polar = Polar(http, relay, persist=False)
    polar.start()

    async def loaded() -> bool:
        return len(faurya.open_keys()) == CONCURRENCY and len(polar.acked) >= 30

    await wait_until(loaded)  # every delivery slot busy, webhooks still coming
    in_flight = faurya.open_keys()
    stopping_at = time.monotonic()
    assert await relay.signal(signal.SIGTERM, timeout_s=grace_s + 10) == 0
    stopped_in_s = time.monotonic() - stopping_at
    await polar.finish()

    # Within the grace period, plus time for a loaded machine to release, close and exit.
    assert stopped_in_s < grace_s + 2.5
    assert relay.logged("relay_stopping")
    assert relay.logged("relay_stopped")
    assert not relay.logged("delivery_cancelled_at_shutdown")
    stored = stored_webhook_ids(db_path)
    assert set(polar.acked) <= stored <= set(polar.sent)
    by_status = keys_by_status(db_path)
    assert set(by_status) == {"delivered", "pending"}  # nothing inflight, nothing dead
    assert by_status["delivered"] == set(faurya.answered_2xx())  # each 2xx was recorded
    assert in_flight <= by_status["delivered"]  # the attempts open at SIGTERM could finish
    assert polar.acked_keys <= by_status["delivered"] | by_status["pending"]
    pending = by_status["pending"]

    restarted = await make_relay(config, faurya).start()
    assert restarted.logged("store_opened")[0]["recovered"] == 0
    every_key = by_status["delivered"] | pending

    async def all_delivered() -> bool:
        return keys_by_status(db_path) == {"delivered": every_key}

    await wait_until(all_delivered, timeout_s=60)
    assert await restarted.signal(signal.SIGTERM, timeout_s=grace_s + 5) == 0

    print(
        f"\nSIGTERM: acked={len(polar.acked)} sent={len(polar.sent)} stopped_in_s="
        f"{stopped_in_s:.2f} delivered_before={len(by_status['delivered'])} "
        f"pending_at_stop={len(pending)}"
    )
    assert {key: len(calls) for key, calls in faurya.answered_2xx().items()} == dict.fromkeys(
        every_key, 1
    )
    assert len(restarted.logged("delivery_succeeded")) == len(pending)
    faurya.assert_same_key_same_bytes()


# ---------------------------------------------------------------- 3. a hanging Faurya


def test_a_lease_shorter_than_the_request_timeout_plus_5_s_is_rejected() -> None:
    """Config validation refuses lease_s < timeout_s + 5, the margin that keeps an expired
    lease from starting a second request while the first may still be open."""
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["destinations"]["faurya"].update(timeout_s=1, lease_s=5.9)

    with pytest.raises(ConfigError) as rejected:
        parse(raw, env())

    assert rejected.value.problems == [
        "destinations.faurya.lease_s: must be at least timeout_s + 5 (6)"
    ]
    raw["destinations"]["faurya"]["lease_s"] = 6
    assert parse(raw, env()).destinations["faurya"].lease_s == 6


async def test_a_hanging_faurya_never_gets_one_key_twice_at_once(
    tmp_path: Path,
    db_path: Path,
    aiohttp_server: AiohttpServer,
    make_relay: MakeRelay,
    http: aiohttp.ClientSession,
) -> None:
    """When Faurya never answers the first call for a key, the relay's timeout ends it and the
    retry gets the 200; with the shortest lease allowed, no key ever has two requests open at
    once and each is counted once."""
    timeout_s, orders = 1.0, 2 * CONCURRENCY
    faurya = await start_faurya(aiohttp_server, lambda key, seen: "hang" if seen == 0 else "ok")
    # The shortest lease the config allows; base_s keeps a retry clear of the closed request.
    config = fault_config(
        tmp_path, timeout_s=timeout_s, grace_s=3, base_s=0.2, cap_s=0.5, lease_s=timeout_s + 5
    )
    relay = await make_relay(config, faurya).start()

    async def post(order_id: str) -> int:
        body = order_paid(order_id)
        url = f"{relay.url}/webhooks/polar"
        async with http.post(url, data=body, headers=sign_headers(body)) as resp:
            return resp.status

    order_ids = [str(uuid.uuid4()) for _ in range(orders)]
    assert await asyncio.gather(*(post(o) for o in order_ids)) == [202] * orders
    keys = {order_key(o) for o in order_ids}

    async def all_delivered() -> bool:
        return keys_by_status(db_path) == {"delivered": keys}

    await wait_until(all_delivered, timeout_s=60)
    assert await relay.signal(signal.SIGTERM, timeout_s=10) == 0

    hangs = [call for call in faurya.calls if call.behaviour == "hang"]
    assert {call.key for call in hangs} == keys
    for call in hangs:
        assert call.status is None
        assert call.ended_at is not None
        # The relay's timeout, not the fake, ended the hang.
        assert timeout_s * 0.9 <= call.ended_at - call.arrived_at <= timeout_s + 1
    assert {key: len(calls) for key, calls in faurya.answered_2xx().items()} == dict.fromkeys(
        keys, 1
    )
    assert set(faurya.max_open.values()) == {1}
    retries = relay.logged("delivery_retry_scheduled")
    assert len(retries) == len(keys)
    assert {r["reason"] for r in retries} == {"timeout"}
    attempts = db_rows(db_path, "SELECT DISTINCT attempts FROM outbound_messages")
    assert attempts == [(2,)]
    assert not relay.logged("leases_expired_requeued")
