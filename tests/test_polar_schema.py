"""`relay check` knows the shape of Polar's webhooks: a path no event of the route has is a
config error with a suggestion; free-form objects, lookups, other sources and event types the
schema does not know stay unchecked."""

from __future__ import annotations

import copy
import importlib.util
import json
import subprocess
import sys
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relay import polar_schema
from relay.config import parse
from tests.helpers import REPO, env, process_env, relay_command

SHIPPED = tomllib.loads((REPO / "relay.toml").read_text(encoding="utf-8"))
ENV = env()


def shipped(**body: Any) -> dict[str, Any]:
    """The shipped config with fields of the purchase route's body replaced."""
    doc = copy.deepcopy(SHIPPED)
    doc["routes"][0]["body"].update(body)
    return doc


def problems(doc: dict[str, Any]) -> list[str]:
    return polar_schema.check(parse(doc, ENV))


def with_route(events: list[str], body: dict[str, Any], source: str = "polar") -> dict[str, Any]:
    doc = copy.deepcopy(SHIPPED)
    doc["routes"] = [
        {
            "name": "r",
            "source": source,
            "events": events,
            "destination": "faurya",
            "idempotency_key": "k:{data.id}",
            "body": body,
        }
    ]
    return doc


@pytest.mark.parametrize("path", [*sorted((REPO / "config").glob("*.toml")), REPO / "relay.toml"])
def test_the_shipped_configs_read_only_fields_polar_sends(path: Path) -> None:
    """relay.toml and every config/*.toml read only paths their events have."""
    assert problems(tomllib.loads(path.read_text(encoding="utf-8"))) == []


def test_a_misspelt_path_is_reported_with_the_field_it_meant() -> None:
    """data.net_amunt in the order.paid route: no such field; did you mean data.net_amount?"""
    doc = shipped(amount={"path": "data.net_amunt", "type": "int", "required": True})

    assert problems(doc) == [
        "routes[0].body.amount.path: data.net_amunt: no such field in order.paid; "
        "did you mean data.net_amount?"
    ]


def test_paths_in_templates_conditions_and_arrays_are_checked() -> None:
    """A template placeholder, a `first` entry, an array index into items and a `when` path are
    checked too, each reported at its own key path."""
    doc = shipped(
        label={"template": "order {data.idd}"},
        orderId={"first": ["data.metadata.orderId", "data.ordr_id"]},
        item={"path": "data.items[0].amont"},
    )
    doc["routes"][0]["when"] = {"path": "data.staus", "eq": "paid"}

    assert problems(doc) == [
        "routes[0].body.orderId.first[1]: data.ordr_id: no such field in order.paid",
        "routes[0].body.label.template: data.idd: no such field in order.paid; "
        "did you mean data.id?",
        "routes[0].body.item.path: data.items[0].amont: no such field in order.paid; "
        "did you mean data.items[0].amount?",
        "routes[0].when: data.staus: no such field in order.paid; did you mean data.status?",
    ]


def test_free_form_objects_lookups_and_envelope_fields_are_allowed() -> None:
    """Any key under data.metadata, any lookup path and the envelope's own fields pass."""
    doc = shipped(
        a={"path": "data.metadata.anything_at_all"},
        b={"path": "data.custom_field_data.x.y"},
        c={"path": "type"},
        d={"path": "timestamp"},
    )
    doc["routes"][1]["body"]["e"] = {"path": "lookup.purchase.whatever.deep"}

    assert problems(doc) == []


def test_a_path_into_a_scalar_is_reported() -> None:
    """data.net_amount.value: net_amount is a number, not an object."""
    doc = shipped(amount={"path": "data.net_amount.value"})

    assert problems(doc) == [
        "routes[0].body.amount.path: data.net_amount.value: no such field in order.paid "
        "(data.net_amount is not an object with fields)"
    ]


def test_a_path_any_of_the_routes_events_has_passes() -> None:
    """A route on order.* may read a field only some order events carry, but not one none
    has; a route on refund.created and refund.updated is checked against both."""
    assert problems(with_route(["order.*"], {"a": {"path": "data.net_amount"}})) == []
    refunds = with_route(["refund.created", "refund.updated"], {"a": {"path": "data.amont"}})
    assert problems(refunds) == [
        "routes[0].body.a.path: data.amont: no such field in refund.created, refund.updated; "
        "did you mean data.amount?"
    ]


def test_the_synthetic_dispute_lost_is_checked_against_polars_dispute() -> None:
    """dispute.lost, which reconciliation makes from Polar's Dispute object, knows its fields."""
    assert problems(with_route(["dispute.lost"], {"a": {"path": "data.order_id"}})) == []
    assert problems(with_route(["dispute.lost"], {"a": {"path": "data.ammount"}})) == [
        "routes[0].body.a.path: data.ammount: no such field in dispute.lost; "
        "did you mean data.amount?"
    ]


def test_unknown_event_types_and_other_sources_keep_todays_behaviour() -> None:
    """An event type the schema does not know, and a standard-webhooks source, are unchecked."""
    assert problems(with_route(["shop.thing_happened"], {"a": {"path": "data.nope"}})) == []
    doc = with_route(["order.paid"], {"a": {"path": "data.nope"}}, source="other")
    doc["sources"]["other"] = {"kind": "standard-webhooks", "secrets": "whsec_c2VjcmV0"}
    assert problems(doc) == []


@pytest.mark.e2e
def test_relay_check_exits_2_on_a_path_polar_does_not_send(tmp_path: Path) -> None:
    """`relay check` on a config with data.net_amunt exits 2 with the one-line suggestion."""
    config = tmp_path / "relay.toml"
    config.write_text(
        (REPO / "relay.toml")
        .read_text(encoding="utf-8")
        .replace('amount = { path = "data.net_amount"', 'amount = { path = "data.net_amunt"', 1)
    )

    result = subprocess.run(
        [relay_command(), "check", "--config", str(config)],
        env=process_env(**ENV),
        capture_output=True,
        text=True,
        timeout=30,
        check=False,
    )

    assert result.returncode == 2
    assert result.stderr.splitlines() == [
        "relay: config error: routes[0].body.amount.path: data.net_amunt: no such field in "
        "order.paid; did you mean data.net_amount?"
    ]


def test_the_schema_file_is_shipped_in_the_package() -> None:
    """polar_webhooks.json is package data, read through importlib.resources."""
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text(encoding="utf-8"))
    assert "polar_webhooks.json" in pyproject["tool"]["setuptools"]["package-data"]["relay"]
    assert polar_schema.schema().api_version == "2026-04"


@pytest.mark.skipif(
    importlib.util.find_spec("polar") is None,
    reason="polar-sdk is not installed (tools/polar_webhook_schema.py says how)",
)
def test_the_schema_file_is_what_the_tool_writes(tmp_path: Path) -> None:
    """With polar-sdk installed, the tool regenerates exactly the shipped file."""
    out = tmp_path / "schema.json"
    subprocess.run(
        [sys.executable, str(REPO / "tools/polar_webhook_schema.py"), str(out)], check=True
    )
    shipped_file = REPO / "relay" / "polar_webhooks.json"
    assert json.loads(out.read_text()) == json.loads(shipped_file.read_text())
