"""A small client for the parts of Polar's API the relay uses: orders, refunds, checkouts.

Owns: authentication (`POLAR_ACCESS_TOKEN`, never logged), pacing under Polar's rate limit
(500 requests a minute; sandbox 100), retries of 429 (honouring Retry-After) and 5xx with
backoff, and turning answers into plain dicts. Errors are `PolarApiError` with a status and a
short reason, never the token.
"""

from __future__ import annotations

import asyncio
import time
import urllib.parse
from collections.abc import AsyncIterator
from dataclasses import dataclass
from typing import Any

import aiohttp

from relay import __version__, retry
from relay.errors import RelayError
from relay.order_check import is_polar_id, shown_id

PRODUCTION_URL = "https://api.polar.sh"
SANDBOX_URL = "https://sandbox-api.polar.sh"


PAID_STATUSES = frozenset({"paid", "refunded", "partially_refunded"})


def is_paid(order: dict[str, Any]) -> bool:
    """An order whose payment went through (refunds later do not undo that)."""
    return order.get("paid") is True or order.get("status") in PAID_STATUSES


def _refuse_token(status: int, scope: str) -> None:
    if status in (401, 403):
        raise PolarApiError(
            f"Polar refused the access token ({status}): check POLAR_ACCESS_TOKEN and its "
            f"scopes ({scope})",
            status,
        )


class PolarApiError(RelayError):
    """Polar's API did not give a usable answer."""

    def __init__(self, message: str, status: int | None = None) -> None:
        self.status = status
        super().__init__(message)

    @property
    def transient(self) -> bool:
        """Worth retrying later: no answer, or 408, 425, 429, 5xx."""
        return self.status is None or self.status in (408, 425, 429) or self.status >= 500


class PolarApiBusy(PolarApiError):
    """This client's request budget is spent for now (its pacing queue is full)."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        super().__init__(f"Polar API budget full; retry in {retry_after_s:.1f} s", None)


class WrongOrder(PolarApiError):
    """Polar answered with an order other than the one asked for."""


@dataclass(frozen=True, slots=True)
class Page:
    items: list[dict[str, Any]]
    page: int
    max_page: int
    total_count: int


class PolarApi:
    """One client per budget; `min_interval_s` spaces requests under the rate limit. With
    `max_wait_s`, a request that would wait longer than that for its slot is refused at once
    (PolarApiBusy) instead of queueing: the queue stays bounded."""

    def __init__(
        self,
        session: aiohttp.ClientSession,
        base_url: str,
        token: str,
        *,
        min_interval_s: float = 0.15,
        max_tries: int = 5,
        timeout_s: float = 15.0,
        max_wait_s: float | None = None,
    ) -> None:
        self._session = session
        self._base = base_url.rstrip("/")
        self._headers = {
            "authorization": f"Bearer {token}",
            "accept": "application/json",
            "user-agent": f"faurya-relay/{__version__}",
        }
        self._min_interval_s = min_interval_s
        self._max_wait_s = max_wait_s
        self._max_tries = max_tries
        self._timeout = aiohttp.ClientTimeout(total=timeout_s)
        self._last_request_at = 0.0
        self.requests = 0
        self.waited_s = 0.0  # time spent honouring Retry-After and pacing

    async def _pace(self) -> None:
        # Take the next free slot before sleeping, so concurrent callers (the workers' payment
        # checks, checkouts) queue up min_interval_s apart instead of all waking at once.
        now = time.monotonic()
        slot = max(now, self._last_request_at + self._min_interval_s)
        wait = slot - now
        if self._max_wait_s is not None and wait > self._max_wait_s:
            raise PolarApiBusy(wait)  # the slot is not taken: the queue does not grow
        self._last_request_at = slot
        if wait > 0:
            self.waited_s += wait
            await asyncio.sleep(wait)

    async def request(
        self, method: str, path: str, *, params: Any = None, json: Any = None
    ) -> tuple[int, Any]:
        """One API call with retries of transient failures; returns (status, parsed body)."""
        last: PolarApiError | None = None
        for attempt in range(1, self._max_tries + 1):
            await self._pace()
            self.requests += 1
            try:
                async with self._session.request(
                    method,
                    self._base + path,
                    params=params,
                    json=json,
                    headers=self._headers,
                    timeout=self._timeout,
                    allow_redirects=False,
                ) as response:
                    status = response.status
                    try:
                        body = await response.json(content_type=None)
                    except ValueError:
                        body = None
                    if status == 429 or status >= 500:
                        delay = retry.parse_retry_after(
                            response.headers.get("Retry-After"), time.time()
                        )
                        last = PolarApiError(f"Polar answered {status} on {path}", status)
                        if attempt < self._max_tries:
                            delay = min(60.0, delay if delay is not None else 0.5 * 2**attempt)
                            self.waited_s += delay
                            await asyncio.sleep(delay)
                            continue
                        raise last
                    return status, body
            except (aiohttp.ClientError, TimeoutError) as exc:
                last = PolarApiError(f"cannot reach Polar ({type(exc).__name__}) on {path}")
                if attempt < self._max_tries:
                    await asyncio.sleep(min(10.0, 0.5 * 2**attempt))
                    continue
        assert last is not None
        raise last

    async def _get_page(self, path: str, params: dict[str, Any], scope: str) -> Page:
        status, body = await self.request("GET", path, params=params)
        _refuse_token(status, scope)
        if status != 200 or not isinstance(body, dict) or not isinstance(body.get("items"), list):
            raise PolarApiError(f"unexpected answer {status} from {path}", status)
        pagination = body.get("pagination") or {}
        try:
            max_page = int(pagination.get("max_page") or 1)
            total_count = int(pagination.get("total_count") or len(body["items"]))
        except (AttributeError, TypeError, ValueError):
            # Polar changed its answer: an error the callers report, not a crash of theirs.
            raise PolarApiError(f"unreadable pagination from {path}", status) from None
        return Page(
            items=[i for i in body["items"] if isinstance(i, dict)],
            page=int(params.get("page", 1)),
            max_page=max_page,
            total_count=total_count,
        )

    async def pages(
        self,
        path: str,
        params: dict[str, Any] | None = None,
        *,
        limit: int = 100,
        scope: str = "orders:read, refunds:read",
    ) -> AsyncIterator[Page]:
        """Every page of a listing, newest first (`sorting=-created_at`); `scope` names the
        token scope the listing needs, for the error when Polar refuses the token."""
        page = 1
        while True:
            current = await self._get_page(
                path,
                {**(params or {}), "page": page, "limit": limit, "sorting": "-created_at"},
                scope,
            )
            yield current
            if page >= current.max_page or not current.items:
                return
            page += 1

    async def get_order(self, order_id: str) -> dict[str, Any] | None:
        """One order, or None when Polar has no such order (404). The id may come from a
        forged webhook: it must be a Polar id, goes into the URL as one escaped path segment,
        and the order Polar returns must carry that same id."""
        if not is_polar_id(order_id):
            raise PolarApiError(f"{shown_id(order_id)} is not a Polar order id", 400)
        path = f"/v1/orders/{urllib.parse.quote(order_id, safe='')}"
        status, body = await self.request("GET", path)
        if status == 404:
            return None
        _refuse_token(status, "orders:read")
        if status != 200 or not isinstance(body, dict):
            raise PolarApiError(f"unexpected answer {status} for order {order_id}", status)
        if body.get("id") != order_id:
            raise WrongOrder(
                f"Polar answered for order {order_id} with another order "
                f"({shown_id(str(body.get('id')))})",
                status,
            )
        return body

    async def create_checkout(self, payload: dict[str, Any]) -> dict[str, Any]:
        status, body = await self.request("POST", "/v1/checkouts/", json=payload)
        _refuse_token(status, "checkouts:write")
        if status not in (200, 201) or not isinstance(body, dict) or not body.get("url"):
            raise PolarApiError(f"Polar did not create the checkout ({status})", status)
        return body
