"""Test helpers: a fake Faurya (a real aiohttp server on loopback), real signatures, configs.

Nothing here replaces relay code: the fakes stand in for Polar and Faurya, and for the clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
import tomllib
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, MutableMapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from aiohttp import web
from aiohttp.test_utils import TestClient
from prometheus_client.parser import text_string_to_metric_families
from standardwebhooks.webhooks import Webhook

from relay.config import Config, parse
from relay.mapping import Route
from relay.models import MessageRecord, MessageStatus

FIXTURES = Path(__file__).parent / "fixtures" / "polar"
REPO = Path(__file__).parent.parent

# Fake secrets, one per Polar key scheme.
LEGACY_SECRET = "polar_whs_9Kq1xY7mVb3NcR2tLp8ZsW4dF6gH0jAe"  # signs with its own UTF-8 bytes
STANDARD_SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY="  # base64 key
WRITE_KEY = "wk_live_TESTWRITEKEY_5d8e1f"
SITE_ID = "site_test_123"
# Every fake secret value, the standard key bare too: none may reach a log, error or metric.
SECRETS = (LEGACY_SECRET, STANDARD_SECRET, STANDARD_SECRET.removeprefix("whsec_"), WRITE_KEY)

Client = TestClient[web.Request, web.Application]
LogList = list[MutableMapping[str, Any]]  # what structlog.testing.capture_logs collects


def logged(logs: LogList, event: str) -> LogList:
    """The captured log entries of one event."""
    return [entry for entry in logs if entry["event"] == event]


class StartRelay(Protocol):
    """The `start` fixture (conftest.py): the relay app on a loopback port, on the test's
    FakeClock unless `real_clock`, its workers polling every `poll_interval_s`."""

    async def __call__(
        self,
        config_: Config | None = None,
        *,
        real_clock: bool = False,
        poll_interval_s: float = 30,
    ) -> Client: ...


def fixture_body(name: str) -> bytes:
    return (FIXTURES / name).read_bytes()


def sign_headers(
    body: bytes,
    secret: str = LEGACY_SECRET,
    *,
    scheme: str = "legacy",
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    """Standard Webhooks headers made with the standardwebhooks library itself.
    scheme "legacy": key = UTF-8 bytes of the whole secret; "standard": base64 after whsec_."""
    from datetime import UTC, datetime

    # legacy: the secret's own bytes; standard: the library's whsec_ handling (base64 key).
    hook = Webhook(secret.encode()) if scheme == "legacy" else Webhook(secret)
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    ts = int(time.time()) if timestamp is None else timestamp
    signature = hook.sign(msg_id, datetime.fromtimestamp(ts, tz=UTC), body.decode())
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(ts),
        "webhook-signature": signature,
        "content-type": "application/json",
        "user-agent": "polar.sh webhooks",
    }


def order_paid(order_id: str | None = None, **metadata: Any) -> bytes:
    """The order.paid fixture, with a fresh order id and optional metadata overrides."""
    event = json.loads(fixture_body("order.paid.purchase.json"))
    event["data"]["id"] = order_id or str(uuid.uuid4())
    event["data"]["metadata"].update(metadata)
    return json.dumps(event).encode()


class FakeClock:
    """A clock we own: tests move it by hand."""

    def __init__(self, start: float | None = None) -> None:
        self.t = time.time() if start is None else start

    def now(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Received:
    headers: dict[str, str]
    body: bytes

    @property
    def json(self) -> Any:
        return json.loads(self.body)


Responder = Callable[[web.Request, int], Awaitable[web.StreamResponse]]


def refusing(refused: set[str]) -> Responder:
    """A FakeFaurya script: 422 "unknown site" for a body whose providerPaymentId is in
    `refused` when it arrives (the set may change meanwhile), 200 for the others."""

    async def script(request: web.Request, n: int) -> web.StreamResponse:
        body = await request.json()
        if body.get("providerPaymentId") in refused:
            return web.json_response({"error": "unknown site"}, status=422)
        return web.json_response({"ok": True})

    return script


@dataclass
class FakeFaurya:
    """A real HTTP server that records revenue calls. `script` answers the n-th call (0-based);
    by default every call gets 200."""

    received: list[Received] = field(default_factory=list)
    script: Responder | None = None
    url: str = ""
    _event: asyncio.Event = field(default_factory=asyncio.Event)

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        n = len(self.received)
        self.received.append(Received(dict(request.headers), body))
        self._event.set()
        if self.script is not None:
            return await self.script(request, n)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/revenue", self._handle)
        return app

    async def wait_for(self, count: int, timeout_s: float = 30.0) -> list[Received]:
        """Await until `count` calls arrived (a condition with a deadline, not a sleep; the
        deadline only bounds how long a failing test hangs, so it is generous)."""
        async with asyncio.timeout(timeout_s):
            while len(self.received) < count:
                self._event.clear()
                if len(self.received) >= count:
                    break
                await self._event.wait()
        return self.received


def shipped_config(faurya_url: str, db_path: Path, **env_overrides: str) -> Config:
    """The shipped relay.toml, parsed with test env vars, pointing at a fake Faurya."""
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["storage"]["path"] = str(db_path)
    return parse(raw, env(FAURYA_URL=faurya_url, **env_overrides))


def env(**overrides: str) -> dict[str, str]:
    base = {
        "POLAR_WEBHOOK_SECRET": f"{LEGACY_SECRET},{STANDARD_SECRET}",
        "FAURYA_URL": "http://127.0.0.1:9",
        "FAURYA_SITE_ID": SITE_ID,
        "FAURYA_WRITE_KEY": WRITE_KEY,
        # The shipped relay.toml's admin listener, on a port of the OS's choosing: relays of
        # tests running side by side must not fight over 9090.
        "RELAY_ADMIN_LISTEN": "127.0.0.1:0",
    }
    base.update(overrides)
    return base


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 30.0) -> None:
    """Poll an async condition until it holds, or fail at the deadline. The deadline only
    bounds how long a failing test hangs (a passing one never waits for it), so it is generous:
    a loaded 2-core CI machine may be slow to start a process or run a worker."""
    async with asyncio.timeout(timeout_s):
        # A deadline-bound poll of an async predicate (a DB query): there is no event to await.
        while not await predicate():  # noqa: ASYNC110
            await asyncio.sleep(0.01)


def metric(text: str, name: str, labels: dict[str, str] | None = None) -> float | None:
    """One sample from a Prometheus exposition (a scraped /metrics), or None when absent."""
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == name and sample.labels == (labels or {}):
                return float(sample.value)
    return None


@contextlib.asynccontextmanager
async def raw_connection(
    port: int,
) -> AsyncIterator[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    """A bare TCP connection to a loopback port, for requests aiohttp's client cannot send."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        yield reader, writer
    finally:
        writer.close()
        with contextlib.suppress(OSError):
            await writer.wait_closed()


async def status_line_after(port: int, sent: bytes, timeout_s: float) -> tuple[bytes, float]:
    """Send `sent` on a raw connection and read the answer's status line: the line, and the
    seconds from before connecting to the status line (the server's timers start no earlier
    than the connection, so this is never shorter than what the server waited)."""
    started = time.monotonic()
    async with raw_connection(port) as (reader, writer):
        writer.write(sent)
        await writer.drain()
        async with asyncio.timeout(timeout_s):
            status_line = await reader.readline()
        return status_line, time.monotonic() - started


# ---------------------------------------------------------------- the real `relay` command

# Everything the shipped relay.toml reads from the environment; a subprocess gets only ours.
RELAY_ENV_VARS = (
    "POLAR_WEBHOOK_SECRET",
    "FAURYA_URL",
    "FAURYA_SITE_ID",
    "FAURYA_WRITE_KEY",
    "RELAY_DB",
    "RELAY_PORT",
    "RELAY_CONFIG",
    "RELAY_ADMIN_LISTEN",
    "RELAY_ADMIN_TOKEN",
    "RELAY_EVENT_LOOP",
    "RELAY_GC",
)


def relay_command() -> str:
    """The installed `relay` console script, as an operator runs it."""
    import shutil
    import sys

    # The script beside this interpreter first: another `relay` earlier on PATH is not ours.
    beside = Path(sys.executable).parent / "relay"
    return str(beside) if beside.exists() else (shutil.which("relay") or "relay")


def process_env(**variables: str) -> dict[str, str]:
    """This process's environment without any relay variable, plus `variables`."""
    import os

    base = {k: v for k, v in os.environ.items() if k not in RELAY_ENV_VARS}
    base["RELAY_ADMIN_LISTEN"] = "127.0.0.1:0"  # as in env(): no two test relays on 9090
    base.update(variables)
    return base


class RelayProcess:
    """`relay serve` as a subprocess on a loopback port chosen by the OS. Its stderr (JSON log
    lines, since it is a pipe) is read continuously, so the relay never blocks on a full pipe
    and tests can await log events."""

    def __init__(self, config: Path, db: Path, env: dict[str, str]) -> None:
        self.args = [
            relay_command(),
            "serve",
            "--config",
            str(config),
            "--db",
            str(db),
            "--host",
            "127.0.0.1",
            "--port",
            "0",
        ]
        self.env = env
        self.lines: list[str] = []
        self.events: list[dict[str, Any]] = []
        self.port = 0
        self.admin_port = 0  # 0: no admin listener
        self._proc: asyncio.subprocess.Process | None = None
        self._reader: asyncio.Task[None] | None = None
        self._changed = asyncio.Event()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The admin listener (/metrics), on loopback."""
        assert self.admin_port, "no admin listener"
        return f"http://127.0.0.1:{self.admin_port}"

    @property
    def proc(self) -> asyncio.subprocess.Process:
        assert self._proc is not None, "not started"
        return self._proc

    async def launch(self) -> None:
        """Start the process; do not wait for anything."""
        self._proc = await asyncio.create_subprocess_exec(
            *self.args,
            env=self.env,
            stdin=asyncio.subprocess.DEVNULL,
            stdout=asyncio.subprocess.DEVNULL,
            stderr=asyncio.subprocess.PIPE,
        )
        self._reader = asyncio.create_task(self._read_stderr())

    async def start(self, timeout_s: float = 30.0) -> RelayProcess:
        """Start the relay and return once it logged `relay_listening` (with its port)."""
        await self.launch()
        listening = await self.wait_log("relay_listening", timeout_s)
        self.port = int(listening["port"])
        self.admin_port = int(listening.get("admin_port", 0))
        return self

    async def _read_stderr(self) -> None:
        stream = self.proc.stderr
        assert stream is not None
        async for raw in stream:
            line = raw.decode("utf-8", errors="replace").rstrip("\n")
            self.lines.append(line)
            try:
                record = json.loads(line)
            except ValueError:
                record = None
            if isinstance(record, dict):
                self.events.append(record)
            self._changed.set()
        self._changed.set()

    def logged(self, event: str) -> list[dict[str, Any]]:
        return [e for e in self.events if e.get("event") == event]

    async def wait_log(self, event: str, timeout_s: float = 30.0) -> dict[str, Any]:
        """Await the first log line with this event name; fail at the deadline, or at once if
        the relay exits without writing it."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    self._changed.clear()
                    if found := self.logged(event):
                        return found[0]
                    if self._reader is not None and self._reader.done():
                        raise AssertionError(
                            f"relay exited without logging {event!r}:\n" + "\n".join(self.lines)
                        )
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError(
                f"no {event!r} within {timeout_s} s:\n" + "\n".join(self.lines)
            ) from None

    async def wait(self, timeout_s: float) -> int:
        """Await the exit (and the end of its stderr); the exit code."""
        async with asyncio.timeout(timeout_s):
            code = await self.proc.wait()
            if self._reader is not None:
                await self._reader
        return code

    async def signal(self, signum: int, timeout_s: float = 15.0) -> int:
        """Send a signal and await the exit; the exit code."""
        self.proc.send_signal(signum)
        return await self.wait(timeout_s)

    async def close(self) -> None:
        """Teardown: SIGKILL whatever still runs, and reap it."""
        import contextlib
        import signal

        if self._proc is None:
            return
        if self._proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self._proc.send_signal(signal.SIGKILL)
        await self._proc.wait()
        if self._reader is not None:
            await self._reader


class RelayProcesses:
    """The `relay serve` processes one test makes, on its database, with the shipped config's
    environment pointed at a fake Faurya; `close()` (the `relay_processes` fixture's teardown)
    kills and reaps every one."""

    def __init__(self, db: Path) -> None:
        self.db = db
        self.made: list[RelayProcess] = []

    def new(self, config: Path, faurya_url: str, **variables: str) -> RelayProcess:
        relay = RelayProcess(
            config, self.db, process_env(**env(FAURYA_URL=faurya_url), **variables)
        )
        self.made.append(relay)
        return relay

    async def close(self) -> None:
        for relay in self.made:
            await relay.close()


def stored_form(body: bytes, config: Config) -> bytes:
    """The raw body as the relay keeps it: re-encoded with `log.redact` paths replaced (the
    shipped relay.toml redacts customer PII), or untouched when nothing is redacted."""
    if not config.log.redact:
        return body
    from relay.mapping import redact

    event = json.loads(body)
    return json.dumps(
        redact(event, config.log.redact), separators=(",", ":"), ensure_ascii=False
    ).encode()


def shipped_redaction() -> Config:
    """The shipped relay.toml parsed with test env vars (for its log.redact)."""
    return parse(tomllib.loads((REPO / "relay.toml").read_text()), env())


def shipped_routes() -> tuple[Route, ...]:
    """The routes of the shipped relay.toml, parsed with test env vars."""
    return shipped_redaction().routes


@dataclass(frozen=True)
class Run:
    """A finished command: exit code and decoded output."""

    code: int
    out: str
    err: str


async def run_command(
    *argv: str,
    environ: dict[str, str] | None = None,
    timeout_s: float = 60,
    cwd: Path | None = None,
) -> Run:
    """Run a command to completion; without `environ`, no relay variable is set at all."""
    proc = await asyncio.create_subprocess_exec(
        *argv,
        cwd=cwd,
        env=process_env() if environ is None else environ,
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    try:
        async with asyncio.timeout(timeout_s):
            out, err = await proc.communicate()
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
    assert proc.returncode is not None
    return Run(proc.returncode, out.decode(), err.decode())


async def run_relay(
    *args: str, environ: dict[str, str] | None = None, timeout_s: float = 60
) -> Run:
    """Run `relay ARGS` to completion; without `environ`, no relay variable is set at all."""
    return await run_command(relay_command(), *args, environ=environ, timeout_s=timeout_s)


def configured(**overrides: str) -> dict[str, str]:
    """The environment the shipped relay.toml needs, with test values."""
    return process_env(**env(**overrides))


async def settled(
    relay: TestClient[web.Request, web.Application], message_id: int
) -> MessageRecord:
    """Run every due attempt, then await the message's bookkeeping: out of INFLIGHT in the
    store, and the workers idle, so that the metrics and log lines of its outcome (which
    follow the commit) are there too. The background loop may hold the attempt instead of
    run_until_idle."""
    from relay.app import STORE, WORKERS

    await relay.app[WORKERS].run_until_idle()
    store = relay.app[STORE]
    record: MessageRecord | None = None

    async def done() -> bool:
        nonlocal record
        record = await store.get_message(message_id)
        return (
            record is not None
            and record.status is not MessageStatus.INFLIGHT
            and relay.app[WORKERS].idle
        )

    await wait_until(done)
    assert record is not None
    return record


async def drained(relay: TestClient[web.Request, web.Application]) -> None:
    """Deliver until nothing is pending or in flight: the workers run every due attempt, again
    until the outbox has nothing left for them."""
    from relay.app import STORE, WORKERS

    store = relay.app[STORE]

    async def idle() -> bool:
        await relay.app[WORKERS].run_until_idle()
        counts = (await store.stats("faurya")).counts
        return not counts[MessageStatus.PENDING] and not counts[MessageStatus.INFLIGHT]

    await wait_until(idle)


@dataclass(frozen=True)
class Scrape:
    status: int
    text: str
    headers: dict[str, str]


async def admin_get(
    relay: TestClient[web.Request, web.Application],
    path: str = "/metrics",
    headers: dict[str, str] | None = None,
) -> Scrape:
    """GET `path` from the admin listener of an in-process relay: `create_admin_app` around the
    running app, served on its own loopback port (the public app has no /metrics)."""
    from aiohttp.test_utils import TestServer

    from relay.app import create_admin_app

    async with TestClient(TestServer(create_admin_app(relay.app))) as admin:
        resp = await admin.get(path, headers=headers)
        return Scrape(resp.status, await resp.text(), dict(resp.headers))
