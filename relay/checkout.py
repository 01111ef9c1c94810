"""The optional checkout endpoint: Faurya's "create checkout session (server)" route, built in.

The merchant's page posts `{plan or productId, faVisitorId, faSessionId, faAttributionToken}`;
the relay creates the Polar checkout server-side with those IDs and a generated `orderId` in its
metadata and answers `{url}`. Polar copies the metadata onto the order, so the paid order's
webhook carries the attribution back to Faurya.

Owns: strict input validation (known fields only, bounded lengths, a safe character set, plans
from relay.toml only: nobody can inject metadata or buy an unlisted product), CORS for the
merchant's origins, a per-client rate limit, and the call to Polar. Off unless
`[checkout] enabled = true`.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import math
import re
import time
import uuid
from collections import OrderedDict
from typing import Any

from aiohttp import web

from relay.access import resolve_client
from relay.config import CheckoutConfig, ServerConfig
from relay.logs import get_logger
from relay.metrics import Metrics
from relay.polar_api import PolarApiBusy, PolarApiError

log = get_logger("relay.checkout")

MAX_BODY_BYTES = 4096
# Polar's metadata values are strings of 1 to 500 characters (polar/kit/metadata.py): longer
# or empty ones make Polar refuse the whole checkout, which would block the sale.
MAX_ID_CHARS = 500
_ID = re.compile(rf"[A-Za-z0-9._:=+/\-]{{1,{MAX_ID_CHARS}}}")
# The checkout's Polar budget queues at most this long; past it, 503 with Retry-After.
CHECKOUT_MAX_WAIT_S = 2.0
ID_FIELDS = ("faVisitorId", "faSessionId", "faAttributionToken")
FIELDS = ("plan", "productId", *ID_FIELDS)


class BadCheckoutRequest(ValueError):
    pass


def validate(payload: Any, config: CheckoutConfig) -> tuple[str, dict[str, str]]:
    """(product id, the attribution ids) from a browser's request, or BadCheckoutRequest."""
    if not isinstance(payload, dict):
        raise BadCheckoutRequest("body must be a JSON object")
    unknown = sorted(set(payload) - set(FIELDS))
    if unknown:
        raise BadCheckoutRequest(f"unknown field {unknown[0]!r} (allowed: {', '.join(FIELDS)})")
    plan, product = payload.get("plan"), payload.get("productId")
    if (plan is None) == (product is None):
        raise BadCheckoutRequest("give exactly one of plan, productId")
    if plan is not None:
        product_id = config.product_for(plan) if isinstance(plan, str) else None
        if product_id is None:
            raise BadCheckoutRequest(
                f"unknown plan (plans: {', '.join(name for name, _ in config.plans)})"
            )
    else:
        # Not a string (a list, an object) is as unknown as an unlisted id, and unhashable.
        if not isinstance(product, str) or product not in {p for _, p in config.plans}:
            raise BadCheckoutRequest("productId is not one of the configured plans' products")
        product_id = str(product)
    ids = {}
    for name in ID_FIELDS:
        value = payload.get(name)
        if value is None or value == "":
            # Left out, not "": Polar refuses an empty metadata string (422), and a visitor
            # without Faurya ids (an ad blocker) must still get a checkout. The relay's
            # mapping sends null for an id that is not in the order's metadata.
            continue
        if not isinstance(value, str) or not _ID.fullmatch(value):
            raise BadCheckoutRequest(
                f"{name} must be a string of at most {MAX_ID_CHARS} letters, digits or ._:=+/-"
            )
        ids[name] = value
    return product_id, ids


def client_key(ip: str | None) -> str:
    """Whom the per-client limit counts: the address, or its /64 for IPv6 (one subscriber
    gets a whole /64 and can pick any address in it)."""
    if ip is None:
        return "?"
    try:
        address = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(address, ipaddress.IPv6Address):
        return str(ipaddress.IPv6Network((address, 64), strict=False))
    return ip


class RateLimiter:
    """A token bucket per client address; the oldest addresses are forgotten past `max_clients`."""

    def __init__(self, per_min: int, max_clients: int = 10_000) -> None:
        self._rate_per_s = per_min / 60.0
        self._burst = float(per_min)
        self._buckets: OrderedDict[str, tuple[float, float]] = OrderedDict()
        self._max_clients = max_clients

    def take(self, client: str, now: float) -> float:
        """0 when allowed, else the seconds until a request would be."""
        tokens, at = self._buckets.pop(client, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate_per_s)
        wait = 0.0
        if tokens >= 1:
            tokens -= 1
        else:
            wait = (1 - tokens) / self._rate_per_s
        self._buckets[client] = (tokens, now)
        while len(self._buckets) > self._max_clients:
            self._buckets.popitem(last=False)
        return wait


class CheckoutEndpoint:
    def __init__(
        self,
        config: CheckoutConfig,
        server: ServerConfig,
        api: Any,  # a callable returning the app's PolarApi (created at start-up)
        metrics: Metrics,
    ) -> None:
        self._config = config
        self._server = server
        self._api = api
        self._metrics = metrics
        self._limiter = RateLimiter(config.rate_limit_per_min)

    def _cors(self, request: web.Request) -> tuple[bool, dict[str, str]]:
        origin = request.headers.get("origin")
        if origin is None:
            return True, {}  # same-origin or not a browser: nothing to grant
        if origin.rstrip("/") not in self._config.allow_origins:
            return False, {}
        return True, {"Access-Control-Allow-Origin": origin, "Vary": "Origin"}

    async def preflight(self, request: web.Request) -> web.Response:
        allowed, headers = self._cors(request)
        if not allowed or not headers:
            return web.Response(status=403)
        headers.update(
            {
                "Access-Control-Allow-Methods": "POST",
                "Access-Control-Allow-Headers": "content-type",
                "Access-Control-Max-Age": "600",
            }
        )
        return web.Response(status=204, headers=headers)

    def _answer(
        self, outcome: str, status: int, body: dict[str, Any], headers: dict[str, str]
    ) -> web.Response:
        self._metrics.checkouts.labels(outcome).inc()
        return web.json_response(body, status=status, headers=headers)

    async def _read_body(self, request: web.Request) -> bytes | None:
        """The whole body (however many TCP segments it came in), within
        `server.body_timeout_s` as a webhook's (else TimeoutError); None past MAX_BODY_BYTES
        (a chunked body has no Content-Length to refuse up front)."""
        raw = bytearray()
        async with asyncio.timeout(self._server.body_timeout_s):
            while chunk := await request.content.read(MAX_BODY_BYTES + 1 - len(raw)):
                raw += chunk
                if len(raw) > MAX_BODY_BYTES:
                    return None
        return bytes(raw)

    async def create(self, request: web.Request) -> web.Response:
        allowed, headers = self._cors(request)
        if not allowed:
            log.warning("checkout_rejected", reason="origin not allowed")
            return self._answer("forbidden", 403, {"error": "origin not allowed"}, {})
        client = resolve_client(
            request.remote,
            request.headers.getall("x-forwarded-for", ()),
            request.headers.getall("x-forwarded-proto", ()),
            tls=request.secure,
            trusted_proxies=self._server.trusted_proxies,
        )
        wait = self._limiter.take(client_key(client.ip), time.monotonic())
        if wait > 0:
            headers["Retry-After"] = str(max(1, round(wait)))
            return self._answer("rate_limited", 429, {"error": "too many requests"}, headers)
        if (request.content_length or 0) > MAX_BODY_BYTES:
            return self._answer("invalid", 413, {"error": "body too large"}, headers)
        try:
            raw = await self._read_body(request)
        except TimeoutError:
            log.info("checkout_rejected", reason="body too slow")
            return self._answer("invalid", 408, {"error": "request body too slow"}, headers)
        if raw is None:
            return self._answer("invalid", 413, {"error": "body too large"}, headers)
        try:
            product_id, ids = validate(json.loads(raw), self._config)
        except (ValueError, UnicodeDecodeError) as exc:
            message = str(exc) if isinstance(exc, BadCheckoutRequest) else "body must be JSON"
            log.info("checkout_rejected", reason=message)
            return self._answer("invalid", 400, {"error": message}, headers)
        order_id = f"ord_{uuid.uuid4().hex}"
        payload: dict[str, Any] = {
            "products": [product_id],
            "metadata": {"orderId": order_id, **ids},
        }
        if self._config.success_url:
            payload["success_url"] = self._config.success_url
        if self._config.return_url:
            payload["return_url"] = self._config.return_url
        try:
            checkout = await self._api().create_checkout(payload)
        except PolarApiBusy as exc:
            log.warning("checkout_busy", retry_after_s=round(exc.retry_after_s, 2))
            headers["Retry-After"] = str(max(1, math.ceil(exc.retry_after_s)))
            return self._answer("busy", 503, {"error": "too many checkouts; try again"}, headers)
        except PolarApiError as exc:
            log.error("checkout_failed", error=exc.message, status=exc.status)
            return self._answer(
                "failed", 502, {"error": "could not create the checkout; try again"}, headers
            )
        log.info(
            "checkout_created",
            order_id=order_id,
            checkout_id=checkout.get("id"),
            attributed=bool(ids.get("faSessionId") or ids.get("faAttributionToken")),
        )
        return self._answer("created", 200, {"url": checkout["url"], "orderId": order_id}, headers)
