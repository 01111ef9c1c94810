"""A fake Polar API: a real aiohttp app on loopback, for reconciliation, checkouts and payment
checks.

It serves what the relay calls (see /work/shared/polar.md, "API"):
- `GET /v1/orders/` and `GET /v1/refunds/`: real pagination (`page` from 1, `limit` <= 100,
  `sorting` `-created_at` or `created_at`, `pagination.total_count` and `max_page`), refunds
  filtered by `succeeded` and `order_id`;
- `GET /v1/orders/{id}`: the order, or 404;
- `GET /v1/disputes/`: real pagination, filtered by repeated `status` and `order_id`;
- `POST /v1/checkouts/`: records the request and answers 201 with `{"id", "url", ...}`, the
  url being a page on this same server (`GET /checkout/{id}`), as Polar's hosted checkout.
  Its `metadata` must keep Polar's rules (polar/kit/metadata.py): at most 50 keys, keys of 1-40
  characters, values strings of 1-500 characters, integers, floats or booleans; else 422,
  as Polar answers, so a checkout that would block a real sale fails here too.
Orders and refunds are built from tests/fixtures/polar/*.json with fresh ids. Every `/v1/`
request is recorded and needs `Authorization: Bearer <token>` (else 401); faults are scripted:
`fail_next` answers the next requests with a status (and `Retry-After`), `outage` answers every
request until `recover`. Nothing here imports relay code.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import math
import time
import uuid
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from aiohttp import web
from pytest_aiohttp import AiohttpServer

from relay.config import Config, Secret
from tests.helpers import FIXTURES

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]
TOKEN = "polar_oat_fake_token_0123456789"
PAID = ("paid", "refunded", "partially_refunded")


@dataclass(frozen=True, slots=True)
class Fault:
    """One scripted answer instead of the real one."""

    status: int
    retry_after: str | None = None
    body: Any = None  # the JSON to answer with (default: an error object)


@dataclass(frozen=True, slots=True)
class Call:
    """One request the fake received."""

    method: str
    path: str
    query: dict[str, str]
    headers: dict[str, str]
    json: Any
    at: float  # time.monotonic() on arrival
    answer: Any = None  # what a checkout creation answered (its id and url)


CALL = web.RequestKey("call", Call)


def _data(fixture: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((FIXTURES / fixture).read_text())["data"]
    return data


def iso(when: datetime) -> str:
    """Polar's timestamp format: ISO 8601, microseconds, `Z`."""
    return when.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


@dataclass
class FakePolar:
    token: str = TOKEN
    orders: list[dict[str, Any]] = field(default_factory=list)
    refunds: list[dict[str, Any]] = field(default_factory=list)
    disputes: list[dict[str, Any]] = field(default_factory=list)
    # Scopes the token has: Polar answers 403 on a listing whose scope it lacks.
    scopes: frozenset[str] = frozenset(
        {"orders:read", "refunds:read", "disputes:read", "checkouts:write"}
    )
    calls: list[Call] = field(default_factory=list)
    faults: deque[Fault] = field(default_factory=deque)
    down: Fault | None = None
    url: str = ""  # set once served

    # ------------------------------------------------------------ data

    def add_order(
        self,
        fixture: str = "order.paid.purchase.json",
        *,
        order_id: str | None = None,
        created_at: datetime | None = None,
        status: str = "paid",
        **metadata: Any,
    ) -> dict[str, Any]:
        """An order from a fixture's `data`, with a fresh id (or `order_id`), created now (or
        at `created_at`), in `status`; `metadata` overrides keys of the fixture's metadata."""
        order = _data(fixture)
        order["id"] = order_id or str(uuid.uuid4())
        order["created_at"] = iso(created_at or datetime.now(UTC))
        order["status"] = status
        order["paid"] = status in PAID
        order["metadata"].update(metadata)
        self.orders.append(order)
        return order

    def add_refund(
        self,
        order: dict[str, Any] | str,
        *,
        amount: int = 2000,
        status: str = "succeeded",
        created_at: datetime | None = None,
    ) -> dict[str, Any]:
        """A refund of `order` (an order, or just its id) from refund.created.json's `data`."""
        refund = _data("refund.created.json")
        refund["id"] = str(uuid.uuid4())
        refund["created_at"] = iso(created_at or datetime.now(UTC))
        refund["status"] = status
        refund["amount"] = amount
        if isinstance(order, dict):
            refund["order_id"] = order["id"]
            refund["currency"] = order["currency"]
        else:
            refund["order_id"] = order
        self.refunds.append(refund)
        return refund

    def add_dispute(
        self,
        order: dict[str, Any],
        *,
        amount: int | None = None,
        tax_amount: int = 0,
        status: str = "lost",
        created_at: datetime | None = None,
    ) -> dict[str, Any]:
        """A dispute of `order` (Polar's Dispute schema): by default lost, of the order's whole
        net amount. A lost dispute changes neither the order nor any refund, and sends no
        webhook: only this listing shows it."""
        dispute = {
            "id": str(uuid.uuid4()),
            "created_at": iso(created_at or datetime.now(UTC)),
            "modified_at": None,
            "status": status,
            "resolved": status in ("lost", "won"),
            "closed": status in ("lost", "won", "prevented"),
            "amount": order["net_amount"] if amount is None else amount,
            "tax_amount": tax_amount,
            "currency": order["currency"],
            "reason": "fraudulent",
            "evidence_due_by": None,
            "past_due": False,
            "order_id": order["id"],
            "payment_id": str(uuid.uuid4()),
            "customer": order.get("customer"),
            "case_id": None,
        }
        self.disputes.append(dispute)
        return dispute

    def add_orders(self, count: int, *, start: datetime, step: timedelta) -> list[dict[str, Any]]:
        """`count` paid orders, created at start, start - step, start - 2 * step, ..."""
        return [self.add_order(created_at=start - i * step) for i in range(count)]

    # ------------------------------------------------------------ faults

    def fail_next(
        self, status: int, times: int = 1, retry_after: str | None = None, body: Any = None
    ) -> None:
        """The next `times` API requests get `status` (with `Retry-After` when given, and
        `body` as JSON when given)."""
        self.faults.extend([Fault(status, retry_after, body)] * times)

    def outage(self, status: int, retry_after: str | None = None) -> None:
        """Every API request gets `status` until `recover()`."""
        self.down = Fault(status, retry_after)

    def recover(self) -> None:
        self.down = None
        self.faults.clear()

    # ------------------------------------------------------------ what was asked

    def requests_to(self, path: str, method: str = "GET") -> list[Call]:
        return [c for c in self.calls if c.path == path and c.method == method]

    @property
    def checkouts(self) -> list[Call]:
        """Every checkout creation request that reached the handler (faults excluded)."""
        return [c for c in self.requests_to("/v1/checkouts/", "POST") if c.answer is not None]

    # ------------------------------------------------------------ the server

    def app(self) -> web.Application:
        app = web.Application(middlewares=[self._gate])
        app.router.add_get("/v1/orders/", self._list_orders)
        app.router.add_get("/v1/orders/{id}", self._get_order)
        app.router.add_get("/v1/refunds/", self._list_refunds)
        app.router.add_get("/v1/disputes/", self._list_disputes)
        app.router.add_post("/v1/checkouts/", self._create_checkout)
        app.router.add_get("/checkout/{id}", self._checkout_page)
        return app

    @web.middleware
    async def _gate(self, request: web.Request, handler: Handler) -> web.StreamResponse:
        """Records API requests, then applies faults and authentication, in Polar's order."""
        if not request.path.startswith("/v1/"):
            return await handler(request)
        body = None
        if request.can_read_body:
            try:
                body = await request.json()
            except ValueError:
                body = "<not JSON>"
        call = Call(
            request.method,
            request.path,
            dict(request.query),
            dict(request.headers),
            body,
            time.monotonic(),
        )
        self.calls.append(call)
        fault = self.faults.popleft() if self.faults else self.down
        if fault is not None:
            headers = {} if fault.retry_after is None else {"Retry-After": fault.retry_after}
            body = fault.body
            if body is None:
                body = {"error": "FakeFault", "detail": f"scripted {fault.status}"}
            return web.json_response(
                body,
                status=fault.status,
                headers=headers,
            )
        if request.headers.get("authorization") != f"Bearer {self.token}":
            return web.json_response(
                {"error": "invalid_token", "error_description": "The access token is invalid"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer error="invalid_token"'},
            )
        request[CALL] = call
        return await handler(request)

    def _listing(self, request: web.Request, items: list[dict[str, Any]]) -> web.Response:
        try:
            page = int(request.query.get("page", "1"))
            limit = int(request.query.get("limit", "10"))
        except ValueError:
            return _invalid("page and limit must be integers")
        if page < 1 or not 1 <= limit <= 100:
            return _invalid("page >= 1, 1 <= limit <= 100")
        sorting = request.query.getall("sorting", ["-created_at"])
        if sorting not in (["-created_at"], ["created_at"]):
            return _invalid(f"unsupported sorting {sorting}")
        # Stable: equal timestamps keep the order they were added in.
        ordered = sorted(items, key=lambda i: i["created_at"], reverse=sorting == ["-created_at"])
        chunk = ordered[(page - 1) * limit : page * limit]
        return web.json_response(
            {
                "items": chunk,
                "pagination": {
                    "total_count": len(ordered),
                    "max_page": math.ceil(len(ordered) / limit),
                },
            }
        )

    async def _list_orders(self, request: web.Request) -> web.Response:
        statuses = request.query.getall("status", [])
        orders = [o for o in self.orders if not statuses or o["status"] in statuses]
        return self._listing(request, orders)

    async def _list_refunds(self, request: web.Request) -> web.Response:
        refunds = self.refunds
        succeeded = request.query.get("succeeded")
        if succeeded is not None:
            if succeeded not in ("true", "false"):
                return _invalid("succeeded must be true or false")
            refunds = [r for r in refunds if (r["status"] == "succeeded") == (succeeded == "true")]
        if "order_id" in request.query:
            refunds = [r for r in refunds if r["order_id"] == request.query["order_id"]]
        return self._listing(request, refunds)

    async def _list_disputes(self, request: web.Request) -> web.Response:
        if "disputes:read" not in self.scopes:
            return _forbidden("disputes:read")
        statuses = request.query.getall("status", [])
        disputes = [d for d in self.disputes if not statuses or d["status"] in statuses]
        if "order_id" in request.query:
            disputes = [d for d in disputes if d["order_id"] == request.query["order_id"]]
        return self._listing(request, disputes)

    async def _get_order(self, request: web.Request) -> web.Response:
        for order in self.orders:
            if order["id"] == request.match_info["id"]:
                return web.json_response(order)
        return web.json_response({"error": "ResourceNotFound", "detail": "Not found"}, status=404)

    async def _create_checkout(self, request: web.Request) -> web.Response:
        call = request[CALL]
        payload = call.json
        if (
            not isinstance(payload, dict)
            or not isinstance(payload.get("products"), list)
            or not payload["products"]
            or not all(isinstance(p, str) for p in payload["products"])
        ):
            return _invalid("products: a non-empty list of product ids is required")
        problem = metadata_problem(payload.get("metadata", {}))
        if problem is not None:
            return _invalid(f"metadata: {problem}")
        checkout_id = str(uuid.uuid4())
        client_secret = f"polar_c_{uuid.uuid4().hex}"
        answer = {
            "id": checkout_id,
            "status": "open",
            "client_secret": client_secret,
            "url": f"{request.url.origin()}/checkout/{client_secret}",
            "products": payload["products"],
            "metadata": payload.get("metadata", {}),
            "success_url": payload.get("success_url"),
        }
        # Calls are frozen: record the answer on a copy in the same place.
        index = self.calls.index(call)
        self.calls[index] = dataclasses.replace(call, answer=copy.deepcopy(answer))
        return web.json_response(answer, status=201)

    async def _checkout_page(self, request: web.Request) -> web.Response:
        secret = request.match_info["id"]
        return web.Response(
            text=f"<!doctype html><title>Polar checkout</title><h1 id='checkout'>{secret}</h1>",
            content_type="text/html",
        )


METADATA_MAX_KEYS = 50
METADATA_MAX_KEY_CHARS = 40
METADATA_MAX_VALUE_CHARS = 500


def metadata_problem(metadata: Any) -> str | None:
    """Why Polar would refuse this metadata (polar/kit/metadata.py), or None."""
    if not isinstance(metadata, dict):
        return "must be an object"
    if len(metadata) > METADATA_MAX_KEYS:
        return f"at most {METADATA_MAX_KEYS} keys"
    for key, value in metadata.items():
        if not 1 <= len(key) <= METADATA_MAX_KEY_CHARS:
            return f"key {key!r}: 1 to {METADATA_MAX_KEY_CHARS} characters"
        if isinstance(value, str):
            if not 1 <= len(value) <= METADATA_MAX_VALUE_CHARS:
                return f"{key}: a string of 1 to {METADATA_MAX_VALUE_CHARS} characters"
        elif not isinstance(value, int | float | bool):
            return f"{key}: a string, integer, float or boolean"
    return None


def _forbidden(scope: str) -> web.Response:
    return web.json_response(
        {"error": "insufficient_scope", "detail": f"The token lacks the {scope} scope"},
        status=403,
    )


def _invalid(message: str) -> web.Response:
    return web.json_response({"error": "RequestValidationError", "detail": message}, status=422)


async def serve(aiohttp_server: AiohttpServer, fake: FakePolar | None = None) -> FakePolar:
    """The fake on a loopback port; its `url` is set."""
    fake = fake or FakePolar()
    server = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


def with_polar_api(config: Config, fake: FakePolar, token: str | None = None) -> Config:
    """`config` pointed at the fake, with its token (or `token`) and no request pacing."""
    api = dataclasses.replace(
        config.polar_api, url=fake.url, token=Secret(token or fake.token), min_interval_s=0.0
    )
    return dataclasses.replace(config, polar_api=api)
