"""The rules that make Faurya's revenue match Polar's: numeric conditions, `first` with
templates, `sum`, number transforms, conditions on lookups, the shipped routes' orderId scheme,
Polar's currency exponents, revenue facts of a negative amount, and reconciliation's defaults."""

from __future__ import annotations

import json
import tomllib
from typing import Any

import pytest

from relay import currency, revenue
from relay.config import parse
from relay.errors import MappingError
from relay.mapping import (
    Lookup,
    Route,
    RuleSyntaxError,
    compile_condition,
    compile_object,
    compile_template,
    compile_value,
    map_event,
)
from relay.models import EventStatus
from tests.helpers import REPO, env, fixture_body, shipped_routes

ORDER: dict[str, Any] = json.loads(fixture_body("order.paid.subscription_create.json"))


def order(**changes: Any) -> dict[str, Any]:
    """The subscription order.paid fixture with `changes` applied to its data."""
    event: dict[str, Any] = json.loads(json.dumps(ORDER))
    event["data"].update(changes)
    return event


# ---------------------------------------------------------------- numeric conditions


@pytest.mark.parametrize(
    ("raw", "holds"),
    [
        ({"path": "data.net_amount", "gt": 0}, True),
        ({"path": "data.net_amount", "gt": 1900}, False),
        ({"path": "data.net_amount", "ge": 1900}, True),
        ({"path": "data.net_amount", "lt": 0}, False),
        ({"path": "data.net_amount", "le": 1900.0}, True),
        ({"path": "data.currency", "gt": 0}, False),  # a string is no number
        ({"path": "data.missing", "lt": 0}, False),  # neither is nothing
        ({"path": "data.paid", "gt": 0}, False),  # nor a bool
        ({"not": {"path": "data.missing", "le": 0}}, True),  # absent: "not le 0" takes it
    ],
)
def test_numeric_comparisons(raw: dict[str, Any], holds: bool) -> None:
    """lt/le/gt/ge compare numbers only; anything else (missing, a string, a bool) fails."""
    assert compile_condition(raw, "when").holds(ORDER) is holds


@pytest.mark.parametrize("value", ["0", True, [0], None])
def test_a_numeric_comparison_needs_a_number(value: Any) -> None:
    """`lt = "0"` (or a bool, an array) is a config error naming the key path."""
    with pytest.raises(RuleSyntaxError) as info:
        compile_condition({"path": "data.net_amount", "lt": value}, "when")
    assert info.value.problems == ["when.lt: must be a number"]


# ---------------------------------------------------------------- value rules


def test_first_takes_a_template_and_falls_back_when_it_cannot_render() -> None:
    """`first = [{ template = ... }, path]`: the template when its fields are there, else the
    next entry."""
    rule = compile_value(
        {"first": [{"template": "{data.metadata.orderId}:{data.id}"}, "data.id"]}, "orderId"
    )
    data = ORDER["data"]
    assert rule.evaluate(ORDER, "orderId") == f"{data['metadata']['orderId']}:{data['id']}"
    bare = order(metadata={})
    assert rule.evaluate(bare, "orderId") == data["id"]


def test_an_entry_of_first_is_a_path_or_a_template_table() -> None:
    """Anything else in `first` is a config error with its key path."""
    with pytest.raises(RuleSyntaxError) as info:
        compile_value({"first": [{"path": "data.id"}]}, "body.orderId")
    assert info.value.problems == [
        'body.orderId.first[0]: an entry of first is a path or { template = "..." }'
    ]


def test_sum_adds_numbers_and_is_missing_when_one_is() -> None:
    """`sum` adds the numbers at its paths; a missing one makes the value missing, so
    `required` names it; a string is a mapping error."""
    rule = compile_value(
        {"sum": ["data.net_amount", "data.tax_amount"], "type": "int", "required": True}, "a"
    )
    assert rule.evaluate(order(net_amount=1900, tax_amount=380), "a") == 2280
    with pytest.raises(MappingError, match=r"required, but sum of data\.net_amount"):
        rule.evaluate(order(tax_amount=None), "a")
    with pytest.raises(MappingError, match=r"sum needs numbers, got string at data\.tax_amount"):
        rule.evaluate(order(tax_amount="380"), "a")


def test_negate_and_abs_take_numbers_only() -> None:
    """`negate` turns a proration credit of -600 into 600; on a string it is a mapping error."""
    negate = compile_value({"path": "data.net_amount", "transform": "negate"}, "amount")
    assert negate.evaluate(order(net_amount=-600), "amount") == 600
    absolute = compile_value({"path": "data.net_amount", "transform": ["abs"]}, "amount")
    assert absolute.evaluate(order(net_amount=-600), "amount") == 600
    with pytest.raises(MappingError, match="transform 'negate' needs a number, got string"):
        negate.evaluate(order(net_amount="-600"), "amount")


def test_a_condition_can_read_the_routes_lookups() -> None:
    """A route's `when` sees its lookups: with the refund recorded it is selected, without it
    the event is ignored."""
    route = Route(
        name="reversal",
        source="polar",
        events=("refund.updated",),
        destination="faurya",
        idempotency_key=compile_template("rev:{data.id}", "k"),
        body=compile_object({"amount": {"path": "lookup.refund.amount"}}, "body"),
        when=compile_condition({"path": "lookup.refund.refundId", "exists": True}, "when"),
        lookups=(Lookup("refund", "faurya", compile_template("r:{data.id}", "k")),),
    )
    event = {"type": "refund.updated", "data": {"id": "r1", "status": "failed"}}

    assert map_event([route], "polar", event).status is EventStatus.IGNORED
    found = {"reversal": {"refund": {"refundId": "r1", "amount": 2000}}}
    mapped = map_event([route], "polar", event, found)
    assert mapped.status is EventStatus.ROUTED
    assert json.loads(mapped.messages[0].body) == {"amount": 2000}


# ---------------------------------------------------------------- the shipped routes


@pytest.mark.parametrize(
    ("billing_reason", "route", "suffixed"),
    [
        ("purchase", "polar-order-paid", False),
        ("subscription_create", "polar-order-paid", False),
        ("subscription_cycle", "polar-order-renewal", True),
        ("subscription_update", "polar-order-renewal", True),
        ("subscription_meter_cycle", "polar-order-renewal", True),
        ("a_reason_polar_adds_later", "polar-order-renewal", True),
    ],
)
def test_every_payment_gets_an_order_id_of_its_own(
    billing_reason: str, route: str, suffixed: bool
) -> None:
    """The first payment keeps the merchant's orderId; every later one (and any billing reason
    Polar adds) is "<orderId>:<Polar order id>", with the subscription's attribution."""
    event = order(billing_reason=billing_reason)
    mapped = map_event(shipped_routes(), "polar", event)

    assert [m.route for m in mapped.messages] == [route]
    body = json.loads(mapped.messages[0].body)
    data = event["data"]
    merchant = data["metadata"]["orderId"]
    assert body["orderId"] == (f"{merchant}:{data['id']}" if suffixed else merchant)
    assert body["attribution"]["faSessionId"] == data["metadata"]["faSessionId"]
    assert mapped.messages[0].idempotency_key == f"polar:order:{data['id']}"


def test_a_renewal_without_a_merchant_order_id_uses_polars() -> None:
    """A renewal whose metadata has no orderId (a checkout link) goes out under Polar's id."""
    event = order(billing_reason="subscription_cycle", metadata={})
    [message] = map_event(shipped_routes(), "polar", event).messages
    assert json.loads(message.body)["orderId"] == event["data"]["id"]


def test_an_order_of_zero_is_not_sent() -> None:
    """A trial's order of 0 (or a 100% discount) is not revenue: acknowledged and ignored."""
    event = order(net_amount=0, total_amount=0)
    assert map_event(shipped_routes(), "polar", event).status is EventStatus.IGNORED


def test_an_order_without_an_amount_is_unmappable_not_ignored() -> None:
    """An order.paid without a numeric net_amount is stored as unmappable (visible), never
    silently ignored."""
    mapped = map_event(shipped_routes(), "polar", order(net_amount=None))
    assert mapped.status is EventStatus.UNMAPPABLE
    assert "data.net_amount" in (mapped.reason or "")


def test_a_negative_order_is_sent_as_a_refund_of_its_size() -> None:
    """A downgrade's proration credit (net -600) goes out as a refund of 600, refundId = the
    order's id, joined to the subscription's purchase by the merchant's orderId."""
    event = order(billing_reason="subscription_update", net_amount=-600)
    [message] = map_event(shipped_routes(), "polar", event).messages
    body = json.loads(message.body)
    data = event["data"]
    assert message.route == "polar-order-credit"
    assert (body["event"], body["amount"], body["currency"]) == ("refund", 600, "EUR")
    assert (body["orderId"], body["refundId"]) == (data["metadata"]["orderId"], data["id"])


def test_a_checkout_links_reference_id_is_the_attribution_token_fallback() -> None:
    """A checkout link copies only reference_id and utm_* into metadata: the snippet puts the
    attribution token into reference_id, and the purchase route reads it from there."""
    event = order(billing_reason="purchase", metadata={"reference_id": "fat_link", "utm_x": "y"})
    [message] = map_event(shipped_routes(), "polar", event).messages
    body = json.loads(message.body)
    assert body["orderId"] == event["data"]["id"]
    assert body["attribution"] == {
        "faVisitorId": None,
        "faSessionId": None,
        "faAttributionToken": "fat_link",
    }


# ---------------------------------------------------------------- money figures


@pytest.mark.parametrize(
    ("code", "iso", "polar"),
    [
        ("USD", 2, 2),
        ("jpy", 0, 0),
        ("ISK", 0, 2),
        ("UGX", 0, 2),
        ("MGA", 2, 0),
        ("KWD", 3, 2),
        ("XXX", None, None),
    ],
)
def test_polar_exponents_differ_from_iso_where_stripe_does(
    code: str, iso: int | None, polar: int | None
) -> None:
    """Polar's amounts follow Stripe: ISK and UGX with two decimals, MGA with none."""
    assert (currency.exponent(code), currency.polar_exponent(code)) == (iso, polar)


def test_a_negative_purchase_counts_as_a_credit() -> None:
    """A negative "purchase" (a config that does not turn credits into refunds) is counted as a
    credit of its size, never skipped: net revenue = purchase - refund - credit."""
    body = json.dumps({"event": "purchase", "amount": -600, "currency": "EUR"}).encode()
    facts = revenue.facts(body)
    assert facts is not None
    assert (facts.event, facts.amount_minor, facts.currency) == ("credit", 600, "EUR")


# ---------------------------------------------------------------- reconciliation defaults


def shipped_config(**variables: str) -> Any:
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    return parse(raw, env(**variables))


def test_reconciliation_is_on_by_default_with_a_token() -> None:
    """With POLAR_ACCESS_TOKEN the shipped config reconciles hourly over 30 days; without it,
    not at all; an explicit interval_s = 0 keeps it off."""
    with_token = shipped_config(POLAR_ACCESS_TOKEN="polar_oat_x")
    assert (with_token.reconcile.interval_s, with_token.reconcile.lookback_s) == (
        3600,
        30 * 86400,
    )
    assert shipped_config().reconcile.interval_s == 0
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["reconcile"]["interval_s"] = 0
    assert parse(raw, env(POLAR_ACCESS_TOKEN="polar_oat_x")).reconcile.interval_s == 0
