"""The webhook endpoint: verify, map, commit, answer.

Owns the request path of one source. Order matters and protects the invariants:
1. size limit, then the signature over the raw bytes: a request that fails either changes
   nothing but a counter and a log line;
2. parse and map (pure, in memory);
3. commit the event and its messages (group commit, fsync) and only then answer 202.
Anything that fails before the commit answers 503, so Polar retries. It never talks to Faurya.
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Sequence
from random import getrandbits
from typing import Any

import structlog
from aiohttp import web

from relay import codec
from relay.access import allowed, resolve_client
from relay.config import Config, SourceConfig
from relay.errors import SignatureInvalid, StorageUnavailable
from relay.logs import get_logger
from relay.mapping import Route, map_event, redact
from relay.metrics import Metrics, event_type_label
from relay.models import Clock, EventStatus, InboundDraft, IngestOutcome
from relay.store import Store
from relay.verify import Verifier

log = get_logger("relay.ingest")

# Distinct event types whose routes are remembered (WebhookIngest._routes_for).
MAX_CACHED_EVENT_TYPES = 256

# Stored with the raw body for debugging and replay. Not stored: anything else a proxy may
# add (cookies, authorization). The signature is harmless to keep: it is useless without the
# secret and stale after the tolerance.
STORED_HEADERS = (
    "webhook-id",
    "webhook-timestamp",
    "webhook-signature",
    "webhook-api-version",
    "user-agent",
    "content-type",
)


async def resolve_lookups(
    store: Store, routes: Sequence[Route], source: str, event: dict[str, Any]
) -> dict[str, dict[str, Any]]:
    """Read from the store what the lookups of the routes that take this event's type name:
    route -> name -> body (a route's condition may read them, so they come first).
    A lookup with nothing stored (or an unreadable body) is simply absent."""
    if not any(r.lookups for r in routes):
        return {}  # the usual case, decided without evaluating any route's conditions
    event_type = event.get("type")
    if not isinstance(event_type, str):
        return {}
    wanted = {r.name: r.lookup_keys(event) for r in routes if r.wants_lookups(source, event_type)}
    if not wanted:
        return {}
    bodies = await store.find_bodies([(d, k) for keys in wanted.values() for _, d, k in keys])
    found: dict[str, dict[str, Any]] = {}
    for route_name, keys in wanted.items():
        found[route_name] = {}
        for name, destination, key in keys:
            raw = bodies.get((destination, key))
            try:
                value = json.loads(raw) if raw else None
            except ValueError:
                value = None
            if value is not None:
                found[route_name][name] = value
    return found


def _answer(http_status: int, **payload: Any) -> web.Response:
    return web.json_response(payload, status=http_status, dumps=_dumps)


def _dumps(value: Any) -> str:
    return codec.dumps(value).decode()


class WebhookIngest:
    """The aiohttp handler for one source."""

    def __init__(
        self,
        source: SourceConfig,
        config: Config,
        store_getter: Any,
        metrics: Metrics,
        clock: Clock,
    ) -> None:
        self.source = source
        self._server = config.server
        self._redact = config.log.redact
        self._routes = [r for r in config.routes if r.source == source.name]
        # event type -> the routes whose `events` take it: mapping then looks at one or two
        # routes, not all of them. Types come from verified webhooks, but the size is capped
        # anyway.
        self._routes_by_type: dict[str, list[Route]] = {}
        # Metric children bound once: .labels() takes a lock and a lookup, per webhook.
        self._received: dict[tuple[str, str], Any] = {}
        self._enqueued: dict[tuple[str, str], Any] = {}
        self._duration = metrics.ingest_duration.labels(source.name)
        self._store_getter = store_getter
        self._metrics = metrics
        self._clock = clock
        self._max_body_bytes = config.server.max_body_bytes
        self._verifier = Verifier(source.secrets, source.tolerance_s, clock)

    def _routes_for(self, event_type: str) -> list[Route]:
        routes = self._routes_by_type.get(event_type)
        if routes is None:
            routes = [r for r in self._routes if r.takes(event_type)]
            if len(self._routes_by_type) < MAX_CACHED_EVENT_TYPES:
                self._routes_by_type[event_type] = routes
        return routes

    def _count(self, event_type: str | None, outcome: str) -> None:
        key = (event_type_label(event_type), outcome)
        counter = self._received.get(key)
        if counter is None:  # as bounded as the metric's own label sets
            counter = self._received[key] = self._metrics.webhooks_received.labels(
                self.source.name, *key
            )
        counter.inc()

    async def handle(self, request: web.Request) -> web.Response:
        # Not a secret, only unique enough to follow one webhook: no CSPRNG call per request.
        request_id = request.headers.get("x-request-id", "")[:64] or f"{getrandbits(64):016x}"
        structlog.contextvars.bind_contextvars(request_id=request_id, source=self.source.name)
        try:
            return await self._handle(request)
        finally:
            structlog.contextvars.unbind_contextvars("request_id", "source")

    async def _handle(self, request: web.Request) -> web.Response:
        if self.source.allow_ips or self._server.require_https:
            refused = self._refuse(request)
            if refused is not None:
                return refused
        length = request.content_length
        if length is not None and length > self._max_body_bytes:
            return self._too_large(length)
        try:
            if request.content.is_eof():
                # The whole body came in with the headers (the usual webhook): nothing to
                # wait for, so no timer to arm and cancel (a measurable share of the serving
                # loop's time: docs/performance.md).
                body = await request.read()
            else:
                # A slow body (slow-loris) cannot hold a handler longer than body_timeout_s.
                async with asyncio.timeout(self._server.body_timeout_s):
                    body = await request.read()
        except web.HTTPRequestEntityTooLarge:
            return self._too_large(length)
        except TimeoutError:
            self._count(None, "timeout")
            log.warning(
                "webhook_body_timeout", remote=request.remote, timeout_s=self._server.body_timeout_s
            )
            return _answer(408, error="request body too slow")
        started = time.perf_counter()

        try:
            webhook_id = self._verifier.verify(body, request.headers)
        except SignatureInvalid as exc:
            outcome = "stale_timestamp" if exc.stale else "bad_signature"
            self._count(None, outcome)
            log.warning(
                "signature_rejected",
                reason=exc.reason,
                outcome=outcome,
                body_bytes=len(body),
                remote=request.remote,
            )
            # One body for every failure: a reason such as "timestamp outside the tolerance"
            # (given only once the HMAC matched) would tell an outsider that a captured
            # webhook is genuine. The reason is in the log line and the metric label.
            return _answer(401, error="invalid signature")

        structlog.contextvars.bind_contextvars(webhook_id=webhook_id)
        try:
            return await self._accept(request, webhook_id, body, started)
        finally:
            structlog.contextvars.unbind_contextvars("webhook_id")

    def _refuse(self, request: web.Request) -> web.Response | None:
        """The allowlist and the HTTPS requirement (computed only when configured)."""
        client = resolve_client(
            request.remote,
            request.headers.getall("x-forwarded-for", ()),
            request.headers.getall("x-forwarded-proto", ()),
            tls=request.secure,  # aiohttp: https only when this connection itself is TLS
            trusted_proxies=self._server.trusted_proxies,
        )
        if not allowed(client.ip, self.source.allow_ips):
            self._count(None, "forbidden")
            log.warning("webhook_forbidden", client_ip=client.ip, reason="not in allow_ips")
            return _answer(403, error="source address not allowed")
        if self._server.require_https and not client.https:
            self._count(None, "https_required")
            log.warning("webhook_forbidden", client_ip=client.ip, reason="not over https")
            return _answer(403, error="https required")
        return None

    def _store_failed(self, event_type: str, error: str) -> web.Response:
        self._count(event_type, "storage_error")
        log.error("webhook_store_failed", event_type=event_type, error=error)
        return web.json_response(
            {"error": "could not store the event; retry later"},
            status=503,
            headers={"Retry-After": "5"},
        )

    def _too_large(self, length: int | None) -> web.Response:
        self._count(None, "too_large")
        log.warning("webhook_too_large", content_length=length, limit_bytes=self._max_body_bytes)
        return _answer(413, error=f"body larger than {self._max_body_bytes} bytes")

    async def _accept(
        self, request: web.Request, webhook_id: str, body: bytes, started: float
    ) -> web.Response:
        stored = body
        try:
            event, fast = codec.loads(body)
            if self._redact and isinstance(event, dict):
                # Redacted copies are re-encoded; they no longer match the signature (the
                # stored signature header then only documents what arrived).
                stored = codec.dumps(redact(event, self._redact), fast)
        except (ValueError, RecursionError):  # not JSON (NaN, too deep, ...): 400 below
            event = None
        if not isinstance(event, dict) or not isinstance(event.get("type"), str):
            self._count(None, "malformed")
            log.warning("webhook_malformed", body_bytes=len(body))
            return _answer(400, error="body must be a JSON object with a string 'type'")
        event_type: str = event["type"]

        store: Store | None = self._store_getter()
        routes = self._routes_for(event_type)
        try:
            if store is None:
                raise StorageUnavailable("the store is not open")
            found = await resolve_lookups(store, routes, self.source.name, event)
        except StorageUnavailable as exc:
            return self._store_failed(event_type, exc.message)
        mapped = map_event(routes, self.source.name, event, found)
        draft = InboundDraft(
            source=self.source.name,
            webhook_id=webhook_id,
            event_type=event_type,
            received_at=self._clock.now(),
            headers={k: request.headers[k] for k in STORED_HEADERS if k in request.headers},
            body=stored,
            status=mapped.status,
            reason=mapped.reason,
            messages=mapped.messages,
            request_id=structlog.contextvars.get_contextvars().get("request_id"),
        )
        try:
            result = await store.enqueue(draft)
        except StorageUnavailable as exc:
            return self._store_failed(event_type, exc.message)

        outcome = result.outcome.value
        if mapped.status is EventStatus.UNMAPPABLE and result.outcome is IngestOutcome.ACCEPTED:
            outcome = "unmappable"
        self._count(event_type, outcome)
        self._duration.observe(time.perf_counter() - started)
        for message in mapped.messages:
            if message.idempotency_key not in result.duplicate_keys:
                key = (message.route, message.destination)
                enqueued = self._enqueued.get(key)
                if enqueued is None:
                    enqueued = self._enqueued[key] = self._metrics.messages_enqueued.labels(*key)
                enqueued.inc()
        fields: dict[str, Any] = {
            "event_type": event_type,
            "outcome": outcome,
            "event_id": result.event_id,
            "message_ids": list(result.message_ids),
        }
        if result.duplicate_keys:
            fields["duplicate_keys"] = list(result.duplicate_keys)
        if mapped.status is EventStatus.UNMAPPABLE:
            log.warning("webhook_unmappable", reason=mapped.reason, **fields)
        else:
            log.info(f"webhook_{result.outcome.value}", **fields)
        payload: dict[str, Any] = {
            "status": result.outcome.value,
            "event_id": result.event_id,
            "messages": len(result.message_ids),
        }
        if mapped.status is EventStatus.UNMAPPABLE:
            payload["unmappable"] = mapped.reason
        return _answer(202, **payload)
