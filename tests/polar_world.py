"""Polar as it really behaves, for revenue scenarios: orders, subscriptions, refunds, disputes,
the webhooks each sends, and Polar's own ledger; and a Faurya that keeps its contract.

Built on tests/polar_fake.py (the API a reconciliation reads): every order, refund and dispute
made here is also in the fake's listings. What it models, from Polar's source (see
/work/shared/polar.md, "Traps"):
- checkout metadata must keep Polar's rules (1-500 character strings, <= 50 keys of <= 40
  characters), else the checkout is refused and the sale never happens;
- the metadata is copied onto the subscription and from there onto every renewal order, so
  every order of a subscription carries the first purchase's merchant `orderId`;
- a trial checkout creates a paid order of 0; the first real charge is a `subscription_cycle`;
- a downgrade's proration can be a paid order with a negative `net_amount`;
- a succeeded refund can later become `failed` or `canceled`, lowering the order's refunded
  amount;
- a lost dispute sends no webhook and creates no refund.

`FauryaBook` is a Faurya that records each purchase once by `orderId` and each refund once by
`refundId`, as Faurya's contract says, answering 409 to a repeat; a purchase whose `orderId`
was already recorded for another payment is a payment Faurya dropped, and is listed as such.
Nothing here imports relay code.
"""

from __future__ import annotations

import copy
import json
import uuid
from collections import defaultdict
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from aiohttp import web

from tests.polar_fake import FakePolar, iso, metadata_problem

AMOUNT_RULES = ("net", "total")


class PolarRefused(Exception):
    """Polar answered 422: the request would not have gone through."""


@dataclass
class Webhook:
    """One event Polar sends (or, when `lost`, would have sent to an endpoint that was down)."""

    type: str
    data: dict[str, Any]
    lost: bool = False

    def body(self) -> bytes:
        return json.dumps(
            {
                "type": self.type,
                "timestamp": iso(datetime.now(UTC)),
                "api_version": "2026-04",
                "data": self.data,
            }
        ).encode()


@dataclass
class PolarWorld:
    """Makes orders, refunds and disputes as Polar does, in `fake`'s listings, and queues the
    webhooks Polar would send for them."""

    fake: FakePolar
    webhooks: list[Webhook] = field(default_factory=list)
    subscriptions: dict[str, dict[str, Any]] = field(default_factory=dict)

    # ------------------------------------------------------------ orders

    def _order(
        self,
        *,
        metadata: dict[str, Any],
        net: int,
        tax: int,
        currency: str,
        billing_reason: str,
        subscription_id: str | None,
        applied_balance: int = 0,
        lost: bool = False,
    ) -> dict[str, Any]:
        problem = metadata_problem(metadata)
        if problem is not None:
            raise PolarRefused(problem)
        fixture = (
            "order.paid.purchase.json"
            if billing_reason == "purchase"
            else "order.paid.subscription_create.json"
        )
        order = self.fake.add_order(fixture)
        order["metadata"] = copy.deepcopy(metadata)
        order.update(
            subtotal_amount=net,
            discount_amount=0,
            discount_id=None,
            discount=None,
            net_amount=net,
            amount=net,
            tax_amount=tax,
            total_amount=net + tax,
            applied_balance_amount=applied_balance,
            due_amount=max(0, net + tax - applied_balance),
            refunded_amount=0,
            refunded_tax_amount=0,
            currency=currency.lower(),
            billing_reason=billing_reason,
            subscription_id=subscription_id,
        )
        if subscription_id is None:
            order["subscription"] = None
        # A checkout purchase sends order.created, order.updated, then order.paid; only
        # order.paid counts (the others are acknowledged and ignored).
        for event_type in ("order.created", "order.updated", "order.paid"):
            self.webhooks.append(Webhook(event_type, copy.deepcopy(order), lost=lost))
        return order

    def purchase(
        self,
        metadata: dict[str, Any],
        *,
        net: int,
        currency: str,
        tax: int = 0,
        lost: bool = False,
    ) -> dict[str, Any]:
        """A one-time purchase through a checkout with `metadata`. `lost`: its webhooks never
        reach the relay (an outage longer than Polar's retries)."""
        return self._order(
            metadata=metadata,
            net=net,
            tax=tax,
            currency=currency,
            billing_reason="purchase",
            subscription_id=None,
            lost=lost,
        )

    def subscribe(
        self,
        metadata: dict[str, Any],
        *,
        net: int,
        currency: str,
        tax: int = 0,
        trial: bool = False,
    ) -> tuple[str, dict[str, Any]]:
        """A subscription checkout: its first order (of 0 with a trial) and the subscription's
        id. The checkout's metadata is copied onto the subscription."""
        subscription_id = str(uuid.uuid4())
        self.subscriptions[subscription_id] = {"metadata": copy.deepcopy(metadata)}
        first = self._order(
            metadata=metadata,
            net=0 if trial else net,
            tax=0 if trial else tax,
            currency=currency,
            billing_reason="subscription_create",
            subscription_id=subscription_id,
        )
        return subscription_id, first

    def renew(
        self,
        subscription_id: str,
        *,
        net: int,
        currency: str,
        tax: int = 0,
        billing_reason: str = "subscription_cycle",
        applied_balance: int = 0,
        lost: bool = False,
    ) -> dict[str, Any]:
        """A later order of the subscription, carrying the subscription's metadata (the first
        checkout's). `lost`: its webhooks never reach the relay (an endpoint Polar disabled)."""
        return self._order(
            metadata=self.subscriptions[subscription_id]["metadata"],
            net=net,
            tax=tax,
            currency=currency,
            billing_reason=billing_reason,
            subscription_id=subscription_id,
            applied_balance=applied_balance,
            lost=lost,
        )

    # ------------------------------------------------------------ refunds and disputes

    def refund(self, order: dict[str, Any], *, amount: int, tax: int = 0) -> dict[str, Any]:
        """A refund that succeeds: refund.created (pending), then refund.updated (succeeded),
        order.updated and order.refunded with the cumulative refunded amount."""
        refund = self.fake.add_refund(order, amount=amount, status="pending")
        refund.update(tax_amount=tax, subscription_id=order.get("subscription_id"))
        self.webhooks.append(Webhook("refund.created", copy.deepcopy(refund)))
        refund["status"] = "succeeded"
        self.webhooks.append(Webhook("refund.updated", copy.deepcopy(refund)))
        order["refunded_amount"] += amount
        order["refunded_tax_amount"] += tax
        order["status"] = (
            "refunded" if order["refunded_amount"] >= order["net_amount"] else "partially_refunded"
        )
        for event_type in ("order.updated", "order.refunded"):
            self.webhooks.append(Webhook(event_type, copy.deepcopy(order)))
        return refund

    def undo_refund(
        self, order: dict[str, Any], refund: dict[str, Any], *, status: str = "failed", lost: bool
    ) -> None:
        """A succeeded refund that Polar moves to `failed` or `canceled`: the money stays with
        the merchant, and the order's refunded amount goes down again."""
        refund["status"] = status
        self.webhooks.append(Webhook("refund.updated", copy.deepcopy(refund), lost=lost))
        order["refunded_amount"] -= refund["amount"]
        order["refunded_tax_amount"] -= refund["tax_amount"]
        order["status"] = "partially_refunded" if order["refunded_amount"] else "paid"
        self.webhooks.append(Webhook("order.updated", copy.deepcopy(order), lost=lost))

    def lose_dispute(self, order: dict[str, Any], *, tax: int = 0) -> dict[str, Any]:
        """A chargeback the merchant lost: no webhook, no refund, the order unchanged."""
        return self.fake.add_dispute(order, amount=order["net_amount"], tax_amount=tax)

    # ------------------------------------------------------------ Polar's ledger

    def ledger(self, rule: str = "net") -> dict[str, int]:
        """Net revenue per upper-case currency, in Polar's minor units: paid orders minus
        succeeded refunds minus lost disputes; `rule` "net" (before tax) or "total"."""
        assert rule in AMOUNT_RULES
        out: dict[str, int] = defaultdict(int)
        for order in self.fake.orders:
            if order["paid"]:
                amount = order["net_amount"] if rule == "net" else order["total_amount"]
                out[order["currency"].upper()] += amount
        for refund in self.fake.refunds:
            if refund["status"] == "succeeded":
                tax = refund["tax_amount"] if rule == "total" else 0
                out[refund["currency"].upper()] -= refund["amount"] + tax
        for dispute in self.fake.disputes:
            if dispute["status"] == "lost":
                tax = dispute["tax_amount"] if rule == "total" else 0
                out[dispute["currency"].upper()] -= dispute["amount"] + tax
        return {code: amount for code, amount in out.items() if amount}


@dataclass
class FauryaBook:
    """A Faurya that keeps its contract: a purchase is recorded once by `orderId`, a refund once
    by `refundId`; a repeat gets 409 (already recorded) and changes nothing."""

    purchases: dict[str, dict[str, Any]] = field(default_factory=dict)
    refunds: dict[str, dict[str, Any]] = field(default_factory=dict)
    # Purchases refused because their orderId was recorded for another payment: lost revenue.
    dropped: list[dict[str, Any]] = field(default_factory=list)
    calls: int = 0
    url: str = ""

    async def _handle(self, request: web.Request) -> web.Response:
        self.calls += 1
        body = await request.json()
        if isinstance(body.get("amount"), bool) or not isinstance(body.get("amount"), int):
            return web.json_response({"error": "amount: an integer"}, status=422)
        if body["amount"] < 0:
            return web.json_response({"error": "amount: must not be negative"}, status=422)
        if body["event"] == "purchase":
            recorded = self.purchases.get(body["orderId"])
            if recorded is not None:
                if recorded["providerPaymentId"] != body["providerPaymentId"]:
                    self.dropped.append(body)
                return web.json_response({"error": "already recorded"}, status=409)
            self.purchases[body["orderId"]] = body
        elif body["event"] == "refund":
            if body["refundId"] in self.refunds:
                return web.json_response({"error": "already recorded"}, status=409)
            self.refunds[body["refundId"]] = body
        else:
            return web.json_response({"error": f"unknown event {body['event']!r}"}, status=422)
        return web.json_response({"ok": True})

    def app(self) -> web.Application:
        app = web.Application()
        app.router.add_post("/api/revenue", self._handle)
        return app

    def ledger(self) -> dict[str, int]:
        """Net revenue per currency as Faurya counts it: purchases minus refunds."""
        out: dict[str, int] = defaultdict(int)
        for purchase in self.purchases.values():
            out[purchase["currency"]] += purchase["amount"]
        for refund in self.refunds.values():
            out[refund["currency"]] -= refund["amount"]
        return {code: amount for code, amount in out.items() if amount}
