"""The whole path once: a signed order.paid becomes exactly one Faurya revenue call."""

from __future__ import annotations

import json

from aiohttp import web
from aiohttp.test_utils import TestClient

from tests.helpers import SITE_ID, WRITE_KEY, FakeFaurya, order_paid, sign_headers


async def test_order_paid_reaches_faurya_once(
    relay: TestClient[web.Request, web.Application], faurya: FakeFaurya
) -> None:
    """A verified order.paid is committed, answered 202, and sent to Faurya with its key."""
    body = order_paid("b4c1f2e3-6d7a-4b8c-9e0f-1a2b3c4d5e6f")
    resp = await relay.post("/webhooks/polar", data=body, headers=sign_headers(body))
    assert resp.status == 202, await resp.text()
    assert (await resp.json())["status"] == "accepted"
    [call] = await faurya.wait_for(1)
    assert call.headers["idempotency-key"] == "polar:order:b4c1f2e3-6d7a-4b8c-9e0f-1a2b3c4d5e6f"
    assert call.headers["x-faurya-write-key"] == WRITE_KEY
    assert call.headers["x-faurya-site-id"] == SITE_ID
    assert call.json == {
        "event": "purchase",
        "amount": 4410,
        "currency": "USD",
        "orderId": "ord_7Hq2kP9xL3",
        "provider": "polar",
        "providerPaymentId": "b4c1f2e3-6d7a-4b8c-9e0f-1a2b3c4d5e6f",
        "attribution": {
            "faVisitorId": "v_5f2c9e1ab7d34c0e",
            "faSessionId": "s_81d0c4a2e9f7",
            "faAttributionToken": "fat_eyJ2IjoxLCJzIjoiczgxZDBjNGEyZTlmNyJ9",
        },
    }
    assert json.loads(call.body) == call.json
