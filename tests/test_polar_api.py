"""The Polar API client against the fake Polar API on loopback: paging, pacing, retries and the
errors it gives up with (never quoting the token)."""

from __future__ import annotations

import asyncio
import socket
import time
from collections.abc import AsyncIterator, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import aiohttp
import pytest

from relay.polar_api import PolarApi, PolarApiError, is_paid
from tests.polar_fake import TOKEN, FakePolar

MakeApi = Callable[..., PolarApi]


@pytest.fixture
async def session() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
def make_api(polar: FakePolar, session: aiohttp.ClientSession) -> MakeApi:
    """A client of the fake; no pacing and three tries unless a test says otherwise."""

    def make(**kwargs: Any) -> PolarApi:
        options: dict[str, Any] = {"min_interval_s": 0.0, "max_tries": 3}
        options.update(kwargs)
        url = options.pop("url", polar.url)
        token = options.pop("token", polar.token)
        return PolarApi(session, url, token, **options)

    return make


async def test_pages_walks_every_page_newest_first(polar: FakePolar, make_api: MakeApi) -> None:
    """pages() asks for page 1, 2, 3 sorted by -created_at and yields every order once."""
    start = datetime.now(UTC)
    orders = polar.add_orders(7, start=start, step=timedelta(minutes=1))
    api = make_api()

    pages = [page async for page in api.pages("/v1/orders/", limit=3)]

    assert [(p.page, p.max_page, p.total_count, len(p.items)) for p in pages] == [
        (1, 3, 7, 3),
        (2, 3, 7, 3),
        (3, 3, 7, 1),
    ]
    assert [i["id"] for p in pages for i in p.items] == [o["id"] for o in orders]
    asked = polar.requests_to("/v1/orders/")
    assert [c.query for c in asked] == [
        {"page": str(n), "limit": "3", "sorting": "-created_at"} for n in (1, 2, 3)
    ]
    assert all(c.headers["Authorization"] == f"Bearer {TOKEN}" for c in asked)
    assert api.requests == 3


async def test_pages_of_an_empty_listing_is_one_empty_page(
    polar: FakePolar, make_api: MakeApi
) -> None:
    """An empty listing (Polar says max_page 0) is one page without items, not a loop."""
    pages = [page async for page in make_api().pages("/v1/refunds/", {"succeeded": "true"})]

    assert [(p.page, p.items) for p in pages] == [(1, [])]
    [call] = polar.requests_to("/v1/refunds/")
    assert call.query["succeeded"] == "true"


async def test_requests_are_paced_by_min_interval(polar: FakePolar, make_api: MakeApi) -> None:
    """Back-to-back requests are spaced by min_interval_s, and the wait is counted."""
    polar.add_order()
    api = make_api(min_interval_s=0.1)

    # Measured from before the first send, not from the first arrival: on a loaded machine the
    # first request can reach the fake late, which says nothing about our pacing.
    started_at = time.monotonic()
    await api.get_order(polar.orders[0]["id"])
    first_done_at = time.monotonic()
    await api.get_order(polar.orders[0]["id"])

    first, second = polar.calls
    assert second.at - started_at >= 0.099
    # The second request waited out what was left of the interval, and counted it. The pacer
    # took the first slot before the first request reached the fake, and measured the second
    # wait after `first_done_at`: so at most the interval less that gap, and never more.
    assert api.waited_s <= 0.1 - (first_done_at - first.at)
    # A wait was counted unless the first round trip itself used up (nearly) the interval.
    assert api.waited_s > 0 or first_done_at - started_at >= 0.05


async def test_concurrent_requests_are_paced_too(polar: FakePolar, make_api: MakeApi) -> None:
    """Callers at the same moment (the delivery workers' payment checks) each take the next
    slot: four requests arrive min_interval_s apart, not in a burst."""
    order = polar.add_order()
    api = make_api(min_interval_s=0.05)

    started_at = time.monotonic()
    await asyncio.gather(*(api.get_order(order["id"]) for _ in range(4)))

    # Each request is sent no earlier than its slot; arrival can only be later than sending.
    arrivals = sorted(c.at - started_at for c in polar.calls)
    assert len(arrivals) == 4
    assert all(at >= 0.05 * slot - 0.001 for slot, at in enumerate(arrivals))
    # The four took their slots before the first request reached the fake (they run in the
    # same loop turn), so each waited its slot less at most that delay: the counted wait is
    # 0.05 + 0.10 + 0.15, less up to three times the first arrival's delay on a slow machine.
    first_arrival_s = arrivals[0]
    assert 0.30 - 3 * first_arrival_s <= api.waited_s <= 0.30 + 1e-9


async def test_429_waits_for_retry_after_and_counts_it(polar: FakePolar, make_api: MakeApi) -> None:
    """A 429 with Retry-After: 1 is retried after one second, counted in waited_s."""
    order = polar.add_order()
    polar.fail_next(429, retry_after="1")
    api = make_api()

    started_at = time.monotonic()
    found = await api.get_order(order["id"])

    assert found is not None
    assert found["id"] == order["id"]
    _, second = polar.calls
    assert second.at - started_at >= 0.999
    assert api.waited_s == pytest.approx(1.0)
    assert api.requests == 2


async def test_retry_after_zero_is_honoured_over_the_default_backoff(
    polar: FakePolar, make_api: MakeApi
) -> None:
    """Retry-After: 0 means now: the client does not fall back to its own (1 s) backoff."""
    order = polar.add_order()
    polar.fail_next(429, retry_after="0")
    api = make_api()
    started = time.monotonic()

    assert await api.get_order(order["id"]) is not None

    # The default backoff before a second try is 1 s (0.5 * 2**1): anything shorter means
    # it was not used, however slow the machine is at sending two local requests.
    assert time.monotonic() - started < 1.0
    assert len(polar.calls) == 2
    assert api.waited_s == 0.0


async def test_5xx_is_retried_then_succeeds(polar: FakePolar, make_api: MakeApi) -> None:
    """Two 503s, then the order: the caller gets the order, after three requests."""
    order = polar.add_order()
    polar.fail_next(503, times=2, retry_after="0")
    api = make_api()

    found = await api.get_order(order["id"])

    assert found == order
    assert len(polar.requests_to(f"/v1/orders/{order['id']}")) == 3


async def test_5xx_forever_gives_a_transient_error(polar: FakePolar, make_api: MakeApi) -> None:
    """A Polar that keeps answering 502 exhausts max_tries: a transient PolarApiError."""
    polar.outage(502, retry_after="0")
    api = make_api(max_tries=3)

    with pytest.raises(PolarApiError) as caught:
        [page async for page in api.pages("/v1/orders/")]

    assert caught.value.status == 502
    assert caught.value.transient
    assert "502" in caught.value.message
    assert len(polar.calls) == 3


async def test_401_names_the_variable_and_never_the_token(
    polar: FakePolar, make_api: MakeApi
) -> None:
    """A refused token is a permanent error naming POLAR_ACCESS_TOKEN, without its value."""
    wrong = "polar_oat_WRONG_but_still_secret_42"
    api = make_api(token=wrong)

    with pytest.raises(PolarApiError) as caught:
        [page async for page in api.pages("/v1/orders/")]

    assert caught.value.status == 401
    assert not caught.value.transient
    assert "POLAR_ACCESS_TOKEN" in caught.value.message
    assert wrong not in str(caught.value)
    assert wrong not in repr(caught.value)
    assert len(polar.calls) == 1  # a refused token is not retried


@pytest.mark.parametrize(
    "answer",
    [
        {"items": [], "pagination": {"total_count": 1, "max_page": "many"}},
        {"items": [], "pagination": ["not", "an", "object"]},
        {"items": {}, "pagination": {"total_count": 0, "max_page": 0}},
        {"pagination": {"total_count": 0, "max_page": 0}},
        ["items"],
    ],
)
async def test_an_unreadable_listing_is_a_polar_api_error(
    polar: FakePolar, make_api: MakeApi, answer: Any
) -> None:
    """A 200 listing of an unexpected shape (Polar changed its API) is a PolarApiError, which
    the reconciler reports, not a crash."""
    polar.fail_next(200, body=answer)

    with pytest.raises(PolarApiError) as caught:
        [page async for page in make_api().pages("/v1/orders/")]

    assert caught.value.status == 200
    assert "/v1/orders/" in caught.value.message
    assert not caught.value.transient


async def test_get_order_unknown_is_none(polar: FakePolar, make_api: MakeApi) -> None:
    """A 404 for an order id is an answer (None), not an error, and is not retried."""
    assert await make_api().get_order("00000000-0000-4000-8000-000000000000") is None
    assert len(polar.calls) == 1


async def test_create_checkout_returns_polar_answer(polar: FakePolar, make_api: MakeApi) -> None:
    """create_checkout posts the payload as JSON and returns the 201 body with its url."""
    payload = {"products": ["5f0e6c1e-8a4b-4c7e-9a53-2f6d1b0c7e11"], "metadata": {"a": "b"}}

    checkout = await make_api().create_checkout(payload)

    [call] = polar.checkouts
    assert call.json == payload
    assert checkout == call.answer
    assert checkout["url"].startswith(f"{polar.url}/checkout/polar_c_")


async def test_create_checkout_refused_is_a_permanent_error(
    polar: FakePolar, make_api: MakeApi
) -> None:
    """A checkout Polar refuses (422) is a PolarApiError with that status, not retried."""
    with pytest.raises(PolarApiError) as caught:
        await make_api().create_checkout({"products": []})

    assert caught.value.status == 422
    assert not caught.value.transient
    assert len(polar.calls) == 1


async def test_connection_refused_is_a_transient_error(make_api: MakeApi) -> None:
    """Nothing listening at the URL: a PolarApiError without a status, so transient."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    api = make_api(url=f"http://127.0.0.1:{port}", max_tries=1)

    with pytest.raises(PolarApiError) as caught:
        await api.get_order("00000000-0000-4000-8000-000000000000")

    assert caught.value.status is None
    assert caught.value.transient
    assert "cannot reach Polar" in caught.value.message


@pytest.mark.parametrize(
    ("fields", "paid"),
    [
        ({"status": "paid", "paid": True}, True),
        ({"status": "refunded", "paid": True}, True),
        ({"status": "partially_refunded"}, True),
        ({"status": "pending", "paid": True}, True),
        ({"status": "pending", "paid": False}, False),
        ({"status": "void", "paid": False}, False),
        ({"status": "draft"}, False),
        ({}, False),
    ],
)
def test_is_paid(fields: dict[str, Any], paid: bool) -> None:
    """An order counts as paid by its paid flag or a paid (or later refunded) status."""
    assert is_paid(fields) is paid
