"""relay.mapping: rule forms, conditions, routes and map_event, plus the shipped routes."""

from __future__ import annotations

import copy
import datetime
import json
import re
from typing import Any

import pytest

from relay.errors import MappingError
from relay.mapping import (
    MapResult,
    Route,
    RuleSyntaxError,
    compile_condition,
    compile_object,
    compile_template,
    compile_value,
    encode,
    map_event,
    redact,
)
from relay.models import EventStatus, OutboundDraft
from tests import helpers
from tests.helpers import fixture_body, order_paid

EVENT: dict[str, Any] = {
    "type": "order.paid",
    "data": {
        "id": "ord_1",
        "amount": 4410,
        "currency": "usd",
        "paid": True,
        "items": [{"amount": 4900}, {"amount": 100}],
        "metadata": {
            "empty": "",
            "null": None,
            "pad": "  x  ",
            "blank": "   ",
            "num": "42",
            "flt": "1.5",
            "yes": " True ",
            "nested": {"a": 1},
        },
    },
}

BAD_PATH = "(use dotted names and [index]: data.items[0].id)"
ALLOWED = re.compile(r" \(allowed: [^)]*\)$")


def evaluate(raw: Any, event: Any = EVENT) -> Any:
    """Compile one body entry and evaluate it at key path `body.x`."""
    return compile_value(raw, "body.x").evaluate(event, "body.x")


def make_route(
    name: str = "r",
    *,
    body: dict[str, Any] | None = None,
    events: tuple[str, ...] = ("order.paid",),
    when: Any = None,
    key: str = "k:{data.id}",
    destination: str = "faurya",
) -> Route:
    """A compiled route of source "polar", as relay.config would build it."""
    return Route(
        name=name,
        source="polar",
        events=events,
        destination=destination,
        idempotency_key=compile_template(key, "idempotency_key"),
        body=compile_object({"amount": {"path": "data.amount"}} if body is None else body, "body"),
        when=None if when is None else compile_condition(when, "when"),
    )


def syntax_problems(compile_: Any, raw: Any, where: str) -> list[str]:
    """The compile problems, each without its "(allowed: ...)" list (it grows with features)."""
    with pytest.raises(RuleSyntaxError) as info:
        compile_(raw, where)
    assert str(info.value) == "; ".join(info.value.problems)
    return [ALLOWED.sub("", p) for p in info.value.problems]


# ---------------------------------------------------------------- value rules


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        # scalar constants and const
        ("polar", "polar"),
        (7, 7),
        (1.5, 1.5),
        (False, False),
        ({"const": [1, "a"]}, [1, "a"]),
        ({"const": {"a": 1}}, {"a": 1}),
        ({"const": "purchase"}, "purchase"),
        # path, with array indexes and odd shapes that resolve to null
        ({"path": "data.id"}, "ord_1"),
        ({"path": "data.items[0].amount"}, 4900),
        ({"path": "data.items[1].amount"}, 100),
        ({"path": "data.items[2].amount"}, None),
        ({"path": "data.items"}, [{"amount": 4900}, {"amount": 100}]),
        ({"path": "data.nope"}, None),
        ({"path": "data.id.deeper"}, None),
        ({"path": "data.items.amount"}, None),
        ({"path": "data.metadata[0]"}, None),
        ({"path": "data.metadata.null"}, None),
        ({"path": "data.metadata.empty"}, ""),
        # first: skips missing, null and ""
        ({"first": ["data.nope", "data.metadata.null", "data.metadata.empty", "data.id"]}, "ord_1"),
        ({"first": ["data.metadata.pad", "data.id"]}, "  x  "),
        ({"first": ["data.nope", "data.metadata.null", "data.metadata.empty"]}, None),
        # template
        ({"template": "polar:order:{data.id}"}, "polar:order:ord_1"),
        ({"template": "{data.items[0].amount}/{ data.paid }"}, "4900/true"),
        ({"template": "{{literal}} {data.id}"}, "{literal} ord_1"),
        # default: for missing or null only
        ({"path": "data.nope", "default": 0}, 0),
        ({"path": "data.metadata.null", "default": "x"}, "x"),
        ({"path": "data.metadata.empty", "default": "x"}, ""),
        ({"first": ["data.nope", "data.metadata.empty"], "default": "anon"}, "anon"),
        # type coercion (after default, before transforms)
        ({"path": "data.amount", "type": "string"}, "4410"),
        ({"path": "data.paid", "type": "string"}, "true"),
        ({"const": 1.5, "type": "string"}, "1.5"),
        ({"path": "data.metadata.num", "type": "int"}, 42),
        ({"const": " -3 ", "type": "int"}, -3),
        ({"const": 42.0, "type": "int"}, 42),
        ({"path": "data.amount", "type": "int"}, 4410),
        ({"path": "data.amount", "type": "float"}, 4410.0),
        ({"path": "data.metadata.flt", "type": "float"}, 1.5),
        ({"path": "data.metadata.yes", "type": "bool"}, True),
        ({"const": "false", "type": "bool"}, False),
        ({"path": "data.paid", "type": "bool"}, True),
        ({"path": "data.nope", "type": "int"}, None),
        ({"path": "data.nope", "default": "7", "type": "int"}, 7),
        # transforms, in order, skipped for null
        ({"path": "data.currency", "transform": "upper"}, "USD"),
        ({"const": "USD", "transform": "lower"}, "usd"),
        ({"path": "data.metadata.pad", "transform": "trim"}, "x"),
        ({"path": "data.metadata.empty", "transform": "empty_to_null"}, None),
        ({"path": "data.metadata.blank", "transform": ["trim", "empty_to_null"]}, None),
        ({"path": "data.metadata.blank", "transform": ["empty_to_null", "trim"]}, ""),
        ({"path": "data.metadata.pad", "transform": ["trim", "upper"]}, "X"),
        ({"path": "data.nope", "transform": "upper"}, None),
        ({"path": "data.amount", "type": "string", "transform": "upper"}, "4410"),
        # required, satisfied
        ({"path": "data.id", "required": True}, "ord_1"),
        ({"path": "data.nope", "default": "d", "required": True}, "d"),
        ({"path": "data.nope", "required": False}, None),
    ],
    ids=repr,
)
def test_value_rule(raw: Any, expected: Any) -> None:
    """Each rule form and option gives this value for the sample event."""
    value = evaluate(raw)
    assert value == expected
    assert type(value) is type(expected)


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (
            {"path": "data.nope", "required": True},
            "body.x: required, but data.nope is missing, null or empty",
        ),
        (
            {"path": "data.metadata.null", "type": "string", "required": True},
            "body.x: required, but data.metadata.null is missing, null or empty",
        ),
        (
            {"first": ["data.nope", "data.metadata.empty"], "required": True},
            "body.x: required, but data.nope / data.metadata.empty is missing, null or empty",
        ),
        (
            {
                "path": "data.metadata.blank",
                "transform": ["trim", "empty_to_null"],
                "required": True,
            },
            "body.x: required, but data.metadata.blank is missing, null or empty",
        ),
        (
            {"const": " ", "transform": ["trim", "empty_to_null"], "required": True},
            "body.x: required, but the constant is missing, null or empty",
        ),
        ({"template": "x:{data.nope}"}, "body.x: data.nope is missing or empty"),
        ({"template": "x:{data.metadata.null}"}, "body.x: data.metadata.null is missing or empty"),
        (
            {"template": "x:{data.metadata.empty}"},
            "body.x: data.metadata.empty is missing or empty",
        ),
        ({"template": "x:{data.items}"}, "body.x: data.items is not a scalar"),
        ({"path": "data.currency", "type": "int"}, 'body.x: cannot make int of string "usd"'),
        ({"const": "4.5", "type": "int"}, 'body.x: cannot make int of string "4.5"'),
        ({"path": "data.paid", "type": "int"}, "body.x: cannot make int of bool true"),
        ({"const": 1.5, "type": "int"}, "body.x: cannot make int of float 1.5"),
        ({"path": "data.metadata.nested", "type": "int"}, "body.x: cannot make int of object"),
        ({"path": "data.items", "type": "string"}, "body.x: cannot make string of array"),
        ({"path": "data.currency", "type": "float"}, 'body.x: cannot make float of string "usd"'),
        ({"path": "data.paid", "type": "float"}, "body.x: cannot make float of bool true"),
        ({"path": "data.items", "type": "float"}, "body.x: cannot make float of array"),
        ({"path": "data.metadata.num", "type": "bool"}, 'body.x: cannot make bool of string "42"'),
        ({"path": "data.amount", "type": "bool"}, "body.x: cannot make bool of int 4410"),
        (
            {"path": "data.amount", "transform": "upper"},
            "body.x: transform 'upper' needs a string, got int",
        ),
        (
            {"path": "data.items", "transform": ["trim"]},
            "body.x: transform 'trim' needs a string, got array",
        ),
    ],
    ids=repr,
)
def test_value_rule_failure_names_the_key_path(raw: Any, message: str) -> None:
    """A rule that cannot produce its value raises MappingError naming the key path and why."""
    with pytest.raises(MappingError, match=f"^{re.escape(message)}"):
        evaluate(raw)


def test_nested_objects_are_built_recursively() -> None:
    """A table without a source key is a nested object; errors inside name the nested path."""
    rule = compile_object(
        {"a": 1, "b": {"c": {"path": "data.id"}, "d": {"e": {"template": "{data.currency}!"}}}},
        "body",
    )
    assert rule.evaluate(EVENT, "body") == {"a": 1, "b": {"c": "ord_1", "d": {"e": "usd!"}}}

    rule = compile_object({"b": {"d": {"e": {"path": "data.nope", "required": True}}}}, "body")
    with pytest.raises(MappingError, match=r"^body\.b\.d\.e: required, but data\.nope"):
        rule.evaluate(EVENT, "body")


def test_encoding_keeps_the_configured_key_order() -> None:
    """Body keys come out in the order written in relay.toml, not sorted; compact UTF-8 JSON."""
    rule = compile_object(
        {"z": 1, "a": {"path": "data.id"}, "m": {"y": "é", "b": {"path": "data.nope"}}}, "body"
    )
    body = encode(rule.evaluate(EVENT, "body"))
    assert body == '{"z":1,"a":"ord_1","m":{"y":"é","b":null}}'.encode()


def test_body_encoding_is_deterministic() -> None:
    """The same event maps to identical bytes every time, whatever the event's own key order."""
    route = make_route(
        body={
            "amount": {"path": "data.amount", "type": "int"},
            "meta": {"a": {"path": "data.metadata.pad"}, "b": {"path": "data.items[0].amount"}},
        }
    )
    reordered = json.loads(json.dumps(EVENT, sort_keys=True))
    reordered["data"] = dict(reversed(list(reordered["data"].items())))
    bodies = {route.build(copy.deepcopy(event)).body for event in (EVENT, EVENT, reordered)}
    assert bodies == {b'{"amount":4410,"meta":{"a":"  x  ","b":4900}}'}


# ---------------------------------------------------------------- conditions

EQ_USD = {"path": "data.currency", "eq": "usd"}
EQ_EUR = {"path": "data.currency", "eq": "eur"}
HAS_ID = {"path": "data.id", "exists": True}


@pytest.mark.parametrize(
    ("raw", "holds"),
    [
        (EQ_USD, True),
        (EQ_EUR, False),
        ({"path": "data.items[0].amount", "eq": 4900}, True),
        ({"path": "data.paid", "eq": False}, False),
        ({"path": "data.currency", "ne": "eur"}, True),
        ({"path": "data.currency", "ne": "usd"}, False),
        ({"path": "data.nope", "ne": "x"}, True),
        ({"path": "data.currency", "in": ["usd", "eur"]}, True),
        ({"path": "data.currency", "in": ["eur"]}, False),
        ({"path": "data.nope", "in": ["x"]}, False),
        ({"path": "data.currency", "not_in": ["eur"]}, True),
        ({"path": "data.currency", "not_in": ["usd", "eur"]}, False),
        ({"path": "data.nope", "not_in": ["x"]}, True),
        (HAS_ID, True),
        ({"path": "data.nope", "exists": True}, False),
        ({"path": "data.metadata.null", "exists": True}, False),
        ({"path": "data.metadata.empty", "exists": True}, True),
        ({"path": "data.nope", "exists": False}, True),
        ({"path": "data.id", "exists": False}, False),
        ({"all": [EQ_USD, HAS_ID]}, True),
        ({"all": [EQ_USD, EQ_EUR]}, False),
        ({"all": []}, True),
        ({"any": [EQ_EUR, EQ_USD]}, True),
        ({"any": [EQ_EUR]}, False),
        ({"any": []}, False),
        ({"not": EQ_USD}, False),
        ({"not": EQ_EUR}, True),
        ({"not": {"not": EQ_USD}}, True),
        ([EQ_USD, HAS_ID], True),
        ([EQ_USD, EQ_EUR], False),
        ([], True),
        ({"any": [{"not": HAS_ID}, [EQ_USD, {"path": "data.amount", "in": [4410]}]]}, True),
    ],
    ids=repr,
)
def test_condition(raw: Any, holds: bool) -> None:
    """eq/ne/in/not_in/exists, all/any/not and list-as-all decide on the sample event."""
    assert compile_condition(raw, "when").holds(EVENT) is holds


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (
            {"path": "data.x"},
            ["when: give exactly one of eq, ne, in, not_in, exists, lt, le, gt, ge"],
        ),
        (
            {"path": "a", "eq": 1, "ne": 2},
            ["when: give exactly one of eq, ne, in, not_in, exists, lt, le, gt, ge"],
        ),
        ({"eq": 1}, ["when: a comparison needs a path"]),
        (
            {"path": "a", "equals": 1},
            [
                "when.equals: unknown condition key",
                "when: give exactly one of eq, ne, in, not_in, exists, lt, le, gt, ge",
            ],
        ),
        ({"path": "a", "in": "x"}, ["when.in: must be an array"]),
        ({"path": "a", "not_in": 3}, ["when.not_in: must be an array"]),
        ({"path": "a", "exists": "yes"}, ["when.exists: must be true or false"]),
        ({"path": "a", "eq": {"b": 1}}, ["when.eq: compare with a scalar, not a table"]),
        ({"all": EQ_USD}, ["when: { all = [...] } takes an array and nothing else"]),
        ({"any": [], "path": "a"}, ["when: { any = [...] } takes an array and nothing else"]),
        ({"not": EQ_USD, "path": "a"}, ["when: { not = {...} } takes one condition"]),
        ("data.paid", ["when: a condition must be a table or an array of tables"]),
        ([EQ_USD, {"path": "b c", "eq": 1}], [f"when[1].path: bad path 'b c' {BAD_PATH}"]),
        ({"all": [{"path": "a..b", "eq": 1}]}, [f"when.all[0].path: bad path 'a..b' {BAD_PATH}"]),
        ({"any": [EQ_USD, 5]}, ["when.any[1]: a condition must be a table or an array of tables"]),
        ({"not": {"path": "", "eq": 1}}, ["when.not.path: a path must be a non-empty string"]),
    ],
    ids=repr,
)
def test_bad_condition_names_the_key_path(raw: Any, expected: list[str]) -> None:
    """A malformed `when` is a RuleSyntaxError whose problems name the key path."""
    assert syntax_problems(compile_condition, raw, "when") == expected


# ---------------------------------------------------------------- compile errors


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        ({"x": {"path": "data items"}}, [f"body.x.path: bad path 'data items' {BAD_PATH}"]),
        ({"x": {"path": "data.items[a]"}}, [f"body.x.path: bad path 'data.items[a]' {BAD_PATH}"]),
        ({"x": {"path": "data.[0]"}}, [f"body.x.path: bad path 'data.[0]' {BAD_PATH}"]),
        ({"x": {"path": "data.items[0]x"}}, [f"body.x.path: bad path 'data.items[0]x' {BAD_PATH}"]),
        ({"x": {"path": "data."}}, [f"body.x.path: bad path 'data.' {BAD_PATH}"]),
        ({"x": {"path": ""}}, ["body.x.path: a path must be a non-empty string"]),
        ({"x": {"path": 5}}, ["body.x.path: a path must be a non-empty string"]),
        (
            {"x": {"path": "data.id", "typ": "int"}},
            ["body.x.typ: unknown rule key"],
        ),
        (
            {"x": {"path": "data.id", "type": "integer"}},
            ["body.x.type: unknown type 'integer'"],
        ),
        (
            {"x": {"path": "data.id", "transform": ["trim", "uper"]}},
            ["body.x.transform[1]: unknown transform 'uper'"],
        ),
        (
            {"x": {"path": "data.id", "transform": [["upper"]]}},
            ["body.x.transform[0]: unknown transform ['upper']"],
        ),
        ({"x": {"path": "data.id", "required": "yes"}}, ["body.x.required: must be true or false"]),
        ({"x": {"path": "data.id", "const": 1}}, ["body.x: use only one of const, path"]),
        ({"x": {"first": []}}, ["body.x.first: must be a non-empty array of paths"]),
        ({"x": {"first": "data.id"}}, ["body.x.first: must be a non-empty array of paths"]),
        (
            {"x": {"first": ["data.id", "bad path"]}},
            [f"body.x.first[1]: bad path 'bad path' {BAD_PATH}"],
        ),
        (
            {"x": {"template": "a:{data.id"}},
            ["body.x.template: unbalanced brace in template 'a:{data.id'"],
        ),
        ({"x": {"template": "a}"}}, ["body.x.template: unbalanced brace in template 'a}'"]),
        ({"x": {"template": "a:{}"}}, ["body.x.template: a path must be a non-empty string"]),
        ({"x": {"template": ""}}, ["body.x.template: a template must be a non-empty string"]),
        (
            {"x": [1, 2]},
            ["body.x: an array is not a rule; write { const = [...] } for a constant array"],
        ),
        ({"x": datetime.date(2026, 1, 1)}, ["body.x: unsupported value of type date"]),
        (
            {"a": {"path": "x", "typ": 1, "type": "integr"}, "b": {"c": {"template": "}"}}},
            [
                "body.a.typ: unknown rule key",
                "body.a.type: unknown type 'integr'",
                "body.b.c.template: unbalanced brace in template '}'",
            ],
        ),
    ],
    ids=repr,
)
def test_bad_rule_names_the_key_path(raw: dict[str, Any], expected: list[str]) -> None:
    """Bad paths, unknown keys, types and transforms are all reported, each with its key path."""
    assert syntax_problems(compile_object, raw, "body") == expected


# ---------------------------------------------------------------- routes and map_event


@pytest.mark.parametrize(
    ("pattern", "event_type", "selected"),
    [
        ("order.paid", "order.paid", True),
        ("order.paid", "order.created", False),
        ("order.paid", "order.paid.late", False),
        ("order.*", "order.paid", True),
        ("order.*", "order.refunded", True),
        ("order.*", "order", False),
        ("order.*", "orders.paid", False),
        ("order.*", "refund.created", False),
        ("*", "refund.created", True),
        ("*", "order.paid", True),
    ],
)
def test_event_type_patterns(pattern: str, event_type: str, selected: bool) -> None:
    """A route's events are exact types, `prefix.*`, or `*`."""
    route = make_route(events=(pattern,))
    assert route.selects("polar", event_type, EVENT) is selected


def test_route_selects_only_its_own_source_and_condition() -> None:
    """Another source, or a `when` that does not hold, leaves the event unselected."""
    assert make_route().selects("polar", "order.paid", EVENT)
    assert not make_route().selects("stripe", "order.paid", EVENT)
    assert not make_route(when=EQ_EUR).selects("polar", "order.paid", EVENT)
    assert make_route(when=EQ_USD).selects("polar", "order.paid", EVENT)


def test_map_event_routes_one_message() -> None:
    """A selected event maps to one draft with the rendered key and encoded body."""
    result = map_event([make_route()], "polar", EVENT)
    assert result == MapResult(
        EventStatus.ROUTED,
        messages=(
            OutboundDraft(
                route="r", destination="faurya", idempotency_key="k:ord_1", body=b'{"amount":4410}'
            ),
        ),
    )


@pytest.mark.parametrize(
    ("routes", "source", "event"),
    [
        ([make_route()], "polar", {**EVENT, "type": "order.created"}),
        ([make_route()], "stripe", EVENT),
        ([make_route(when=EQ_EUR)], "polar", EVENT),
        ([], "polar", EVENT),
    ],
    ids=["other type", "other source", "when false", "no routes"],
)
def test_map_event_ignores_what_no_route_selects(
    routes: list[Route], source: str, event: dict[str, Any]
) -> None:
    """An event no route selects is IGNORED, with no messages and no reason."""
    assert map_event(routes, source, event) == MapResult(EventStatus.IGNORED)


@pytest.mark.parametrize(
    ("route", "event", "reason"),
    [
        (
            make_route(body={"amount": {"path": "data.nope", "required": True}}),
            EVENT,
            "routes.r.body.amount: required, but data.nope is missing, null or empty",
        ),
        (
            make_route(body={"a": {"b": {"path": "data.currency", "type": "int"}}}),
            EVENT,
            'routes.r.body.a.b: cannot make int of string "usd"',
        ),
        (
            make_route(key="k:{data.nope}"),
            EVENT,
            "routes.r.idempotency_key: data.nope is missing or empty",
        ),
        (make_route(), {**EVENT, "type": 5}, "event has no string type"),
        (make_route(), {"data": {}}, "event has no string type"),
    ],
    ids=["required", "type", "key", "type not a string", "no type"],
)
def test_map_event_unmappable_names_the_key_path(
    route: Route, event: dict[str, Any], reason: str
) -> None:
    """A selected event that cannot be mapped is UNMAPPABLE with a reason naming the key."""
    assert map_event([route], "polar", event) == MapResult(EventStatus.UNMAPPABLE, reason=reason)


def test_unencodable_body_is_unmappable_not_a_crash() -> None:
    """A NaN in the event (JSON allows it on input) makes the event UNMAPPABLE, never a crash."""
    event = json.loads('{"type": "order.paid", "data": {"id": "o", "amount": NaN}}')
    result = map_event([make_route()], "polar", event)
    assert result.status is EventStatus.UNMAPPABLE
    assert result.messages == ()
    assert result.reason is not None
    assert result.reason.startswith("cannot encode body: ")


@pytest.mark.parametrize(
    "const",
    [datetime.datetime(1979, 5, 27, 7, 32, tzinfo=datetime.UTC), datetime.date(1979, 5, 27)],
    ids=["datetime", "date"],
)
def test_a_toml_date_in_a_const_makes_the_event_unmappable(const: Any) -> None:
    """TOML has dates, JSON has none: a body with one is UNMAPPABLE (as with the standard
    library's encoder), not sent with the date turned into text."""
    route = make_route(body={"amount": {"path": "data.amount"}, "when": {"const": const}})
    result = map_event([route], "polar", EVENT)
    assert result.status is EventStatus.UNMAPPABLE
    assert result.reason is not None
    assert result.reason.startswith("cannot encode body: ")
    assert "not JSON serializable" in result.reason


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_encode_refuses_non_finite_numbers_anywhere(value: float) -> None:
    """JSON has no NaN or infinity: encode refuses them at any depth (ValueError, which
    map_event turns into UNMAPPABLE) rather than writing null."""
    for body in ({"a": value}, {"a": {"b": [1, value]}}, [value]):
        with pytest.raises(ValueError, match="not JSON compliant"):
            encode(body)


def test_encode_is_compact_utf8_in_configured_order() -> None:
    body = {"z": "é€", "a": [1, 2.5, None, True], "big": 2**70, "m": {"k": "v"}}
    assert encode(body) == json.dumps(body, separators=(",", ":"), ensure_ascii=False).encode()


REDACT_EVENT: dict[str, Any] = {
    "type": "order.paid",
    "data": {
        "id": "ord_1",
        "customer": {"email": "a@example.com", "name": "Ann", "id": "cus_1"},
        "user": None,
        "billing_name": None,
        "items": [{"email": "x@example.com", "sku": "s"}, "text"],
        "note": "plain",
    },
}


@pytest.mark.parametrize(
    ("paths", "expected_data"),
    [
        (
            [("data", "customer", "email"), ("data", "customer", "name")],
            {"customer": {"email": "[redacted]", "name": "[redacted]", "id": "cus_1"}},
        ),
        ([("data", "customer"), ("data", "customer", "email")], {"customer": "[redacted]"}),
        ([("data", "customer", "email"), ("data", "customer")], {"customer": "[redacted]"}),
        ([("data", "billing_name")], {"billing_name": "[redacted]"}),  # null is redacted too
        ([("data", "user", "email")], {}),  # through a null: nothing to redact
        ([("data", "note", "x")], {}),  # through a string
        ([("data", "absent", "x"), ("data", "absent2")], {}),
        (
            [("data", "items", 0, "email"), ("data", "items", 1, "email")],
            {"items": [{"email": "[redacted]", "sku": "s"}, "text"]},
        ),
        ([("data", "items", 5), ("data", "items", "email"), ("data", 0)], {}),
    ],
    ids=[
        "siblings",
        "parent first",
        "parent last",
        "null",
        "null parent",
        "string parent",
        "absent",
        "list index",
        "bad index or key",
    ],
)
def test_redact_replaces_each_present_path_and_copies(
    paths: list[tuple[str | int, ...]], expected_data: dict[str, Any]
) -> None:
    """redact replaces what each path names (absent or unreachable paths are skipped) and
    leaves the event it was given untouched."""
    original = copy.deepcopy(REDACT_EVENT)
    out = redact(REDACT_EVENT, paths)
    assert original == REDACT_EVENT
    assert out == {**original, "data": {**original["data"], **expected_data}}


def test_fan_out_to_two_routes() -> None:
    """An event selected by two routes yields one message per route, in route order."""
    routes = [
        make_route("a", destination="faurya"),
        make_route("b", destination="ledger", key="ledger:{data.id}", events=("order.*",)),
        make_route("c", events=("refund.created",)),
    ]
    result = map_event(routes, "polar", EVENT)
    assert result.status is EventStatus.ROUTED
    assert [(m.route, m.destination, m.idempotency_key) for m in result.messages] == [
        ("a", "faurya", "k:ord_1"),
        ("b", "ledger", "ledger:ord_1"),
    ]


def test_fan_out_is_all_or_nothing() -> None:
    """When one selected route fails, no message is produced for the others either."""
    routes = [
        make_route("a"),
        make_route("b", body={"refundId": {"path": "data.refund_id", "required": True}}),
    ]
    assert map_event(routes, "polar", EVENT) == MapResult(
        EventStatus.UNMAPPABLE,
        reason="routes.b.body.refundId: required, but data.refund_id is missing, null or empty",
    )


# ---------------------------------------------------------------- the shipped relay.toml


@pytest.fixture(scope="module", name="shipped_routes")
def shipped_routes_once() -> tuple[Route, ...]:
    return helpers.shipped_routes()


def fixture_event(name: str) -> dict[str, Any]:
    event: dict[str, Any] = json.loads(fixture_body(name))
    return event


def test_shipped_route_sends_the_documented_purchase(shipped_routes: tuple[Route, ...]) -> None:
    """order.paid (purchase) becomes exactly the body faurya-api.md documents, in its key order."""
    result = map_event(shipped_routes, "polar", fixture_event("order.paid.purchase.json"))
    assert result.status is EventStatus.ROUTED
    [message] = result.messages
    assert (message.route, message.destination, message.idempotency_key) == (
        "polar-order-paid",
        "faurya",
        "polar:order:b4c1f2e3-6d7a-4b8c-9e0f-1a2b3c4d5e6f",
    )
    assert message.body == (
        b'{"event":"purchase","amount":4410,"currency":"USD","orderId":"ord_7Hq2kP9xL3",'
        b'"provider":"polar","providerPaymentId":"b4c1f2e3-6d7a-4b8c-9e0f-1a2b3c4d5e6f",'
        b'"attribution":{"faVisitorId":"v_5f2c9e1ab7d34c0e","faSessionId":"s_81d0c4a2e9f7",'
        b'"faAttributionToken":"fat_eyJ2IjoxLCJzIjoiczgxZDBjNGEyZTlmNyJ9"}}'
    )


def test_shipped_route_sends_null_never_empty_attribution(
    shipped_routes: tuple[Route, ...],
) -> None:
    """Empty attribution metadata reaches Faurya as null, never as ""."""
    result = map_event(shipped_routes, "polar", fixture_event("order.paid.unattributed.json"))
    [message] = result.messages
    body = json.loads(message.body)
    assert body["orderId"] == "ord_NoAttr0001"
    assert body["providerPaymentId"] == "0d9c8b7a-6f5e-4d3c-9b2a-1f0e9d8c7b6a"
    assert body["attribution"] == {
        "faVisitorId": None,
        "faSessionId": None,
        "faAttributionToken": None,
    }
    assert b'""' not in message.body


def test_shipped_route_maps_a_first_subscription_order(shipped_routes: tuple[Route, ...]) -> None:
    """order.paid for a new subscription sends its net amount, EUR, and the one empty id as null."""
    result = map_event(
        shipped_routes, "polar", fixture_event("order.paid.subscription_create.json")
    )
    [message] = result.messages
    assert message.idempotency_key == "polar:order:d6e7f8a9-b0c1-4d2e-9f3a-4b5c6d7e8f90"
    assert json.loads(message.body) == {
        "event": "purchase",
        "amount": 1900,
        "currency": "EUR",
        "orderId": "ord_Sub77aa01",
        "provider": "polar",
        "providerPaymentId": "d6e7f8a9-b0c1-4d2e-9f3a-4b5c6d7e8f90",
        "attribution": {
            "faVisitorId": "v_0a1b2c3d4e5f",
            "faSessionId": "s_9e8d7c6b5a4f",
            "faAttributionToken": None,
        },
    }


@pytest.mark.parametrize("name", ["order.created.purchase.json", "order.refunded.partial.json"])
def test_shipped_routes_ignore_non_revenue_events(
    shipped_routes: tuple[Route, ...], name: str
) -> None:
    """Purchases count on order.paid only: order.created and order.refunded are IGNORED."""
    assert map_event(shipped_routes, "polar", fixture_event(name)) == MapResult(EventStatus.IGNORED)


@pytest.mark.parametrize(
    ("metadata", "order_id", "attribution"),
    [
        ({"orderId": ""}, "b4c1f2e3", "v_5f2c9e1ab7d34c0e"),
        ({"orderId": None, "faVisitorId": "  v_pad  "}, "b4c1f2e3", "v_pad"),
        ({"faVisitorId": "   "}, "ord_7Hq2kP9xL3", None),
        ({"orderId": 12345, "faVisitorId": 7}, "12345", "7"),
    ],
)
def test_shipped_route_falls_back_and_cleans_metadata(
    shipped_routes: tuple[Route, ...],
    metadata: dict[str, Any],
    order_id: str,
    attribution: str | None,
) -> None:
    """orderId falls back to Polar's order id; attribution ids are trimmed, blank ones null."""
    event = json.loads(order_paid("b4c1f2e3", **metadata))
    [message] = map_event(shipped_routes, "polar", event).messages
    body = json.loads(message.body)
    assert body["orderId"] == order_id
    assert body["attribution"]["faVisitorId"] == attribution


def test_shipped_route_without_an_amount_is_unmappable(shipped_routes: tuple[Route, ...]) -> None:
    """An order.paid without net_amount is UNMAPPABLE, naming the body key that failed."""
    event = fixture_event("order.paid.purchase.json")
    del event["data"]["net_amount"]
    assert map_event(shipped_routes, "polar", event) == MapResult(
        EventStatus.UNMAPPABLE,
        reason="routes.polar-order-paid.body.amount: required, "
        "but data.net_amount is missing, null or empty",
    )


@pytest.mark.parametrize(
    ("raw", "holds"),
    [
        ({"path": "data.flag", "eq": 1}, False),
        ({"path": "data.flag", "eq": True}, True),
        ({"path": "data.one", "eq": True}, False),
        ({"path": "data.one", "in": [True]}, False),
        ({"path": "data.one", "eq": 1.0}, True),
        ({"path": "data.flag", "not_in": [1]}, True),
    ],
)
def test_conditions_compare_like_json_not_like_python(raw: dict[str, Any], holds: bool) -> None:
    """true is not 1 in a condition (Python's == says it is); 1 and 1.0 are equal."""
    event = {"type": "t", "data": {"flag": True, "one": 1}}
    assert compile_condition(raw, "when").holds(event) is holds


def test_rule_options_without_a_source_are_a_typo_not_an_object() -> None:
    """`{ pth = ..., type = "int" }` fails to compile instead of becoming a JSON object."""
    with pytest.raises(RuleSyntaxError) as info:
        compile_value({"pth": "data.net_amount", "type": "int"}, "body.amount")
    assert info.value.problems[0].startswith("body.amount: has type but no source")


def test_required_rejects_an_empty_string() -> None:
    """A required field whose value is "" makes the event unmappable."""
    with pytest.raises(MappingError, match="missing, null or empty"):
        compile_value({"path": "data.x", "required": True}, "body.x").evaluate(
            {"data": {"x": ""}}, "body.x"
        )
