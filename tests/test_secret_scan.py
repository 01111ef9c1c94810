"""No secret leaves the relay: one full scenario with the real `relay serve`, then a scan of
everything it and the operator commands produced.

The fake Faurya misbehaves on purpose: its error answers echo the write key and the webhook
secrets back. The relay's environment also holds an unrelated token (POLAR_ACCESS_TOKEN) that it
must never print. Scanned: the relay's stderr and stdout, the /metrics text, the output of every
CLI command, and the raw bytes of every file in the database directory.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import signal
import sqlite3
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import aiohttp
import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay.app import create_app
from relay.delivery import SNIPPET_BYTES
from tests.helpers import (
    LEGACY_SECRET,
    REPO,
    STANDARD_SECRET,
    WRITE_KEY,
    Client,
    FakeFaurya,
    LogList,
    RelayProcess,
    env,
    fixture_body,
    order_paid,
    process_env,
    relay_command,
    shipped_config,
    sign_headers,
    wait_until,
)

PATH = "/webhooks/polar"
ADMIN_TOKEN = "adm_scan_Q7vK2mX9pL4wR8tZ"
POLAR_ACCESS_TOKEN = "polar_oat_FAKE_3hJ8sD1fG6kL0zX5cV"
WRONG_SECRET = "polar_whs_NotTheRightOneNotTheRightOne00"
STANDARD_KEY_B64 = STANDARD_SECRET.removeprefix("whsec_")

# Every secret in every form it could leak in.
NEEDLES: dict[str, bytes] = {
    "legacy webhook secret": LEGACY_SECRET.encode(),
    "whsec_ webhook secret": STANDARD_SECRET.encode(),
    "whsec_ key (base64)": STANDARD_KEY_B64.rstrip("=").encode(),
    "whsec_ key (raw bytes)": base64.b64decode(STANDARD_KEY_B64),
    "Faurya write key": WRITE_KEY.encode(),
    "admin token": ADMIN_TOKEN.encode(),
    "POLAR_ACCESS_TOKEN": POLAR_ACCESS_TOKEN.encode(),
}
ECHO = (
    f"rejected write key {WRITE_KEY}; while you are at it, your Polar secrets are "
    f"{LEGACY_SECRET} and {STANDARD_SECRET}"
)


class Misbehaving:
    """The fake Faurya's script, by order id: `dead` gets 400 and `flaky` 500 then 200, both
    answers echoing the secrets; every other order gets 200."""

    def __init__(self) -> None:
        self.dead = str(uuid.uuid4())
        self.flaky = str(uuid.uuid4())
        self.answered: list[tuple[str, int]] = []

    async def __call__(self, request: web.Request, n: int) -> web.StreamResponse:
        order = json.loads(await request.read())["providerPaymentId"]
        status = 200
        if order == self.dead:
            status = 400
        elif order == self.flaky and (order, 500) not in self.answered:
            status = 500
        self.answered.append((order, status))
        if status == 200:
            return web.json_response({"ok": True})
        echoed = {"error": ECHO, "your_headers": dict(request.headers)}
        return web.json_response(echoed, status=status)


class CapturedRelay(RelayProcess):
    """`relay serve` with its stdout kept in a file as well (RelayProcess discards it)."""

    def __init__(self, config: Path, db: Path, env: dict[str, str], stdout: Path) -> None:
        super().__init__(config, db, env)
        self.stdout_path = stdout

    async def launch(self) -> None:
        with self.stdout_path.open("wb") as stdout:
            self._proc = await asyncio.create_subprocess_exec(
                *self.args,
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=stdout,
                stderr=asyncio.subprocess.PIPE,
            )
        self._reader = asyncio.create_task(self._read_stderr())


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def config_with_admin(tmp_path: Path) -> Path:
    """The shipped relay.toml: its admin listener takes RELAY_ADMIN_LISTEN and the token
    RELAY_ADMIN_TOKEN from the environment."""
    text = (REPO / "relay.toml").read_text(encoding="utf-8")
    assert 'token = "${RELAY_ADMIN_TOKEN:-}"' in text
    path = tmp_path / "relay.scan.toml"
    path.write_text(text, encoding="utf-8")
    return path


def find_leaks(outputs: dict[str, bytes]) -> list[str]:
    """'<where>: <which secret> at byte <n>: ...context...' for every occurrence."""
    found = []
    for where, data in outputs.items():
        for name, needle in NEEDLES.items():
            start = data.find(needle)
            while start != -1:
                context = data[max(0, start - 60) : start + len(needle) + 20]
                found.append(f"{where}: {name} at byte {start}: {context!r}")
                start = data.find(needle, start + 1)
    return found


@pytest.mark.e2e
async def test_no_secret_in_anything_the_relay_produces(
    tmp_path: Path, faurya: FakeFaurya, http: aiohttp.ClientSession
) -> None:
    """Through accepted, retried, dead-lettered, forged, malformed and oversized webhooks,
    metric scrapes, operator commands and SIGTERM, no webhook secret (in any form), write
    key, admin token or unrelated environment token appears in any log, output or database
    file."""
    script = Misbehaving()
    faurya.script = script
    db_dir = tmp_path / "db"
    db_dir.mkdir()
    db = db_dir / "relay.db"
    config = config_with_admin(tmp_path)
    environ = process_env(
        **env(FAURYA_URL=faurya.url),
        RELAY_ADMIN_TOKEN=ADMIN_TOKEN,
        POLAR_ACCESS_TOKEN=POLAR_ACCESS_TOKEN,
    )
    outputs: dict[str, bytes] = {}
    relay = CapturedRelay(config, db, environ, tmp_path / "relay.stdout")
    try:
        await relay.start()
        admin = f"http://127.0.0.1:{relay.logged('relay_listening')[0]['admin_port']}"
        webhooks = f"{relay.url}{PATH}"

        async def post(body: bytes, headers: dict[str, str]) -> int:
            async with http.post(webhooks, data=body, headers=headers) as resp:
                outputs[f"answer to webhook {len(outputs)}"] = await resp.read()
                return resp.status

        # Play Polar, with both key schemes, and some things Polar would never send.
        good = [str(uuid.uuid4()), str(uuid.uuid4())]
        statuses = []
        for i, order in enumerate([*good, script.flaky, script.dead]):
            body = order_paid(order)
            if i % 2:
                headers = sign_headers(body, STANDARD_SECRET, scheme="standard")
            else:
                headers = sign_headers(body)
            statuses.append(await post(body, headers))
        assert statuses == [202] * 4
        forged = order_paid()
        assert await post(forged, sign_headers(forged, WRONG_SECRET)) == 401
        stale = order_paid()
        assert await post(stale, sign_headers(stale, timestamp=1_000_000_000)) == 401
        malformed = b'{"type": "order.paid", "data": '
        assert await post(malformed, sign_headers(malformed)) == 400
        oversized = b'{"type": "order.paid", "pad": "' + b"x" * (300 * 1024) + b'"}'
        assert await post(oversized, sign_headers(oversized)) == 413

        # Two delivered at once, one after a 500, one dead after a 400.
        await relay.wait_log("delivery_dead_lettered")

        async def delivered() -> bool:
            return len(relay.logged("delivery_succeeded")) >= 3

        await wait_until(delivered)
        assert relay.logged("delivery_retry_scheduled")
        assert sorted(status for _, status in script.answered) == [200, 200, 200, 400, 500]

        # Scrape, with and without the token.
        async with http.get(f"{admin}/metrics") as resp:
            assert resp.status == 401
            outputs["/metrics without token"] = await resp.read()
        token = {"authorization": f"Bearer {ADMIN_TOKEN}"}
        async with http.get(f"{admin}/metrics", headers=token) as resp:
            assert resp.status == 200
            outputs["/metrics"] = await resp.read()
        assert b'outcome="bad_signature"' in outputs["/metrics"]

        # Everything an operator would look at.
        async def cli(*args: str) -> bytes:
            proc = await asyncio.create_subprocess_exec(
                relay_command(),
                *args,
                env=environ,
                stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.PIPE,
            )
            out, err = await asyncio.wait_for(proc.communicate(), 30)
            assert proc.returncode == 0, (args, out, err)
            outputs[f"relay {' '.join(args)}: stdout"] = out
            outputs[f"relay {' '.join(args)}: stderr"] = err
            return out

        listed = await cli("outbox", "list", "--json", "--db", str(db))
        records = [json.loads(line) for line in listed.decode().splitlines()]
        kept = sorted(r["status"] for r in records)
        assert kept == ["dead", "delivered", "delivered", "delivered"]
        for record in records:
            shown = json.loads(await cli("outbox", "show", str(record["id"]), "--db", str(db)))
            if record["status"] == "dead":
                # The echo was kept (an operator needs it), with the secrets masked.
                assert "rejected write key ***" in shown["last_error"]
        await cli("outbox", "list", "--db", str(db))
        await cli("outbox", "stats", "--db", str(db))
        await cli("check", "--config", str(config))
        event = tmp_path / "order.paid.json"
        event.write_bytes(fixture_body("order.paid.purchase.json"))
        await cli("map", "--event", str(event), "--config", str(config))
        await cli("replay", "--dry-run", "--db", str(db))

        assert await relay.signal(signal.SIGTERM) == 0
    finally:
        await relay.close()

    outputs["relay stderr"] = "\n".join(relay.lines).encode()
    outputs["relay stdout"] = relay.stdout_path.read_bytes()
    assert relay.logged("relay_stopped")
    # Whatever SQLite left behind (db, -wal, -shm), as raw bytes; then once more after a
    # checkpoint folded the WAL into the database file.
    files = sorted(db_dir.iterdir())
    assert db in files
    outputs.update({f"file {f.name}": f.read_bytes() for f in files})
    with contextlib.closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    outputs["file relay.db after checkpoint"] = db.read_bytes()

    assert find_leaks(outputs) == []
    # The scan can see: what the fake Faurya received and echoed does hold them.
    seen = json.dumps([c.headers for c in faurya.received]).encode() + ECHO.encode()
    assert {leak.split(" at ")[0] for leak in find_leaks({"faurya": seen})} == {
        "faurya: legacy webhook secret",
        "faurya: whsec_ webhook secret",
        "faurya: whsec_ key (base64)",
        "faurya: Faurya write key",
    }


# ---------------------------------------------------------------- a secret cut in half


async def dead_lettered(client: Client, db_path: Path) -> tuple[str, LogList]:
    """POST a signed order.paid and await its message's dead-lettering: the message's
    last_error, and every log event on the way."""
    body = order_paid()
    with structlog.testing.capture_logs() as logs:
        resp = await client.post(PATH, data=body, headers=sign_headers(body))
        assert resp.status == 202

        async def dead() -> bool:
            return any(e["event"] == "delivery_dead_lettered" for e in logs)

        await wait_until(dead)
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        [(last_error,)] = db.execute("SELECT last_error FROM outbound_messages").fetchall()
    return str(last_error), logs


@pytest.mark.parametrize("cut_at", [8, 12, 20])
@pytest.mark.parametrize("secret", [WRITE_KEY, LEGACY_SECRET, STANDARD_SECRET])
async def test_an_echoed_secret_cut_by_the_snippet_limit_is_not_kept(
    aiohttp_client: AiohttpClient,
    faurya: FakeFaurya,
    db_path: Path,
    secret: str,
    cut_at: int,
) -> None:
    """An error answer whose echoed secret straddles the end of the kept snippet (512 bytes)
    leaves no piece of that secret in the dead message or the logs."""

    async def echo(request: web.Request, n: int) -> web.StreamResponse:
        padding = "x" * (SNIPPET_BYTES - cut_at)
        return web.Response(status=400, text=padding + secret + " and more text after it")

    faurya.script = echo
    client = await aiohttp_client(create_app(shipped_config(faurya.url, db_path)))
    last_error, logs = await dead_lettered(client, db_path)
    assert "HTTP 400" in last_error
    assert last_error.endswith("***")  # masked whole, not cut
    piece = secret[:cut_at]
    assert piece not in last_error
    assert all(piece not in repr(entry) for entry in logs)


async def test_an_echoed_secret_split_across_network_reads_is_not_kept(
    aiohttp_client: AiohttpClient, faurya: FakeFaurya, db_path: Path
) -> None:
    """An error answer that arrives in pieces, split inside an echoed write key, leaves no
    piece of the key in the dead message (the snippet is not just the first piece)."""

    async def trickle(request: web.Request, n: int) -> web.StreamResponse:
        response = web.StreamResponse(status=400)
        await response.prepare(request)
        await response.write(f"rejected key {WRITE_KEY[:12]}".encode())
        # A slow network, not a synchronisation: the relay reads what arrived so far.
        await asyncio.sleep(0.2)
        await response.write(f"{WRITE_KEY[12:]} (echoed)".encode())
        await response.write_eof()
        return response

    faurya.script = trickle
    client = await aiohttp_client(create_app(shipped_config(faurya.url, db_path)))
    last_error, logs = await dead_lettered(client, db_path)
    assert last_error.endswith("HTTP 400: rejected key *** (echoed)")
    assert all(WRITE_KEY[:8] not in repr(entry) for entry in logs)
