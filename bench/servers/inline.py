"""(b) The guide's approach: verify the webhook with the standardwebhooks library, map it,
call Faurya inline, and only then answer. Nothing is stored: if Faurya is slow or down, the
webhook's answer waits or fails.

    POLAR_WEBHOOK_SECRET=... FAURYA_URL=http://127.0.0.1:P FAURYA_SITE_ID=... \
    FAURYA_WRITE_KEY=... python -m bench.servers.inline [--port 0]

Prints `{"event": "listening", "port": N}` on stdout; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import os
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
from aiohttp import web
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from bench.servers.base import serve

SESSION = web.AppKey("session", aiohttp.ClientSession)


def faurya_body(data: dict[str, Any]) -> dict[str, Any]:
    """Polar order -> Faurya revenue call, the same fields the relay's shipped config sends."""
    metadata = data.get("metadata") or {}

    def meta(name: str) -> str | None:
        value = metadata.get(name)
        return value.strip() or None if isinstance(value, str) else None

    return {
        "event": "purchase",
        "amount": int(data["net_amount"]),
        "currency": str(data["currency"]).upper(),
        "orderId": meta("orderId") or data["id"],
        "provider": "polar",
        "providerPaymentId": data["id"],
        "attribution": {
            "faVisitorId": meta("faVisitorId"),
            "faSessionId": meta("faSessionId"),
            "faAttributionToken": meta("faAttributionToken"),
        },
    }


def make_app() -> web.Application:
    secret = os.environ["POLAR_WEBHOOK_SECRET"]
    # Polar's secrets: the HMAC key is the secret's own bytes; standardwebhooks wants it base64.
    webhook = Webhook(base64.b64encode(secret.encode()).decode())
    revenue_url = os.environ["FAURYA_URL"].rstrip("/") + "/api/revenue"
    faurya_headers = {
        "x-faurya-site-id": os.environ["FAURYA_SITE_ID"],
        "x-faurya-write-key": os.environ["FAURYA_WRITE_KEY"],
    }
    timeout = aiohttp.ClientTimeout(total=10)

    async def session_ctx(app: web.Application) -> AsyncIterator[None]:
        async with aiohttp.ClientSession(timeout=timeout) as session:
            app[SESSION] = session
            yield

    async def handle(request: web.Request) -> web.Response:
        body = await request.read()
        try:
            event = webhook.verify(body, dict(request.headers))
        except WebhookVerificationError:
            return web.json_response({"error": "invalid signature"}, status=403)
        if event.get("type") != "order.paid":
            return web.json_response({"status": "ignored"}, status=202)
        data = event["data"]
        headers = dict(faurya_headers, **{"idempotency-key": f"polar:order:{data['id']}"})
        try:
            async with request.app[SESSION].post(
                revenue_url, json=faurya_body(data), headers=headers
            ) as response:
                await response.read()
                if response.status >= 300:
                    return web.json_response({"error": "faurya failed"}, status=502)
        except (aiohttp.ClientError, TimeoutError):
            return web.json_response({"error": "faurya unreachable"}, status=502)
        return web.json_response({"status": "accepted"}, status=202)

    app = web.Application()
    app.cleanup_ctx.append(session_ctx)
    app.router.add_post("/webhooks/polar", handle)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="inline (guide) server for bench/run.py")
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args().port
    asyncio.run(serve(make_app(), port))


if __name__ == "__main__":
    main()
