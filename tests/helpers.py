"""Test helpers: a fake Faurya (a real aiohttp server on loopback), real signatures, configs.

Nothing here replaces relay code: the fakes stand in for Polar and Faurya, and for the clock.
"""

from __future__ import annotations

import asyncio
import json
import tomllib
import time
import uuid
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from aiohttp import web

from relay.config import Config, parse
from standardwebhooks.webhooks import Webhook

FIXTURES = Path(__file__).parent / "fixtures" / "polar"
REPO = Path(__file__).parent.parent

# Fake secrets, one per Polar key scheme.
LEGACY_SECRET = "polar_whs_9Kq1xY7mVb3NcR2tLp8ZsW4dF6gH0jAe"  # signs with its own UTF-8 bytes
STANDARD_SECRET = "whsec_" + "c2VjcmV0LWtleS1mb3ItdGVzdHMtb25seS0xMjM0NTY="  # base64 key
WRITE_KEY = "wk_live_TESTWRITEKEY_5d8e1f"
SITE_ID = "site_test_123"


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

    if scheme == "legacy":
        hook = Webhook(secret.encode())
    else:
        hook = Webhook(secret)  # the library's own whsec_ handling: base64-decodes the key
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

    async def wait_for(self, count: int, timeout_s: float = 10.0) -> list[Received]:
        """Await until `count` calls arrived (a condition with a deadline, not a sleep)."""
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
    }
    base.update(overrides)
    return base


async def wait_until(predicate: Callable[[], Awaitable[bool]], timeout_s: float = 10.0) -> None:
    """Poll an async condition until it holds, or fail at the deadline."""
    async with asyncio.timeout(timeout_s):
        while not await predicate():
            await asyncio.sleep(0.01)
