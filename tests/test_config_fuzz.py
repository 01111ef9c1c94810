"""Property: any variant of a valid relay.toml loads as a Config or fails with ConfigError.

Hypothesis mutates real configs (the shipped relay.toml, config/*.toml and a rich one that uses
every section and rule form): keys dropped, renamed, retyped, values swapped between two places
(between rules too). Whatever it builds, `parse` must return a `Config` or raise `ConfigError`
whose every problem names a key path: never a KeyError, TypeError or any other crash.
"""

from __future__ import annotations

import copy
import datetime
import math
import tomllib
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from relay.config import Config, parse
from relay.errors import ConfigError
from tests.helpers import REPO, env

Keys = tuple[str | int, ...]

# Every section and rule form, so that mutations reach every reader.
RICH = """
[server]
host = "127.0.0.1"
port = "${RELAY_PORT:-8080}"
max_body_bytes = 262144
shutdown_grace_s = 8
delivery_processes = 1
keepalive_timeout_s = 15
body_timeout_s = 10
max_header_bytes = 8190
max_headers = 64
require_https = false
trusted_proxies = ["10.0.0.0/8", "127.0.0.1"]
[storage]
path = "relay.db"
busy_timeout_ms = 5000
max_batch = 256
[log]
level = "info"
format = "json"
redact = ["data.customer.email"]
[retention]
bodies_s = 2592000
rows_s = 31536000
interval_s = 3600
[admin]
listen = "127.0.0.1:9090"
token = "admin-token"
[polar_api]
url = "https://sandbox-api.polar.sh"
token = "polar_oat_x"
min_interval_s = 0.15
[reconcile]
interval_s = 3600
lookback_s = 259200
source = "polar"
[checkout]
enabled = true
path = "/checkout"
allow_origins = ["https://shop.example"]
success_url = "https://shop.example/thanks"
return_url = "https://shop.example/"
rate_limit_per_min = 10
[checkout.plans]
pro = "prod_1"
[sources.polar]
kind = "polar"
path = "/webhooks/polar"
secrets = ["${POLAR_WEBHOOK_SECRET}"]
tolerance_s = 300
allow_ips = ["0.0.0.0/0"]
[sources.other]
kind = "standard-webhooks"
secrets = "whsec_c2VjcmV0"
[destinations.faurya]
url = "${FAURYA_URL}/api/revenue"
timeout_s = 10
lease_s = 60
concurrency = 64
concurrency_while_receiving = 16
paused = false
[destinations.faurya.headers]
x-faurya-write-key = "${FAURYA_WRITE_KEY}"
[destinations.faurya.retry]
max_attempts = 1000
base_s = 1
cap_s = 600
max_age_s = 604800
jitter = 0.5
max_retry_after_s = 3600
[[routes]]
name = "paid"
source = "polar"
events = ["order.paid", "order.*"]
when = [{ path = "data.status", eq = "paid" }, { any = [{ path = "data.x", in = [1, 2] },
        { not = { path = "data.y", exists = true } }] }]
destination = "faurya"
idempotency_key = "polar:order:{data.id}"
verify_order = "{data.id}"
[routes.body]
event = "purchase"
amount = { path = "data.net_amount", type = "int", required = true, default = 0 }
major = { path = "data.net_amount", minor_to_major = "data.currency" }
minor = { path = "data.major", major_to_minor = "data.currency", type = "float" }
currency = { path = "data.currency", transform = ["trim", "iso4217"] }
orderId = { first = ["data.metadata.orderId", "data.id"], type = "string" }
label = { template = "order {data.id}", transform = "upper" }
list = { const = [1, 2] }
[routes.body.nested]
flag = { path = "data.flag", type = "bool" }
[[routes]]
name = "refund"
source = "polar"
events = ["refund.created"]
when = { path = "data.status", ne = "pending" }
destination = "faurya"
idempotency_key = "polar:refund:{data.id}"
[routes.lookup.purchase]
destination = "faurya"
idempotency_key = "polar:order:{data.order_id}"
[routes.body]
event = "refund"
amount = { path = "data.amount", type = "int" }
orderId = { first = ["lookup.purchase.orderId", "data.order_id"] }
"""

BASES: dict[str, dict[str, Any]] = {
    "rich": tomllib.loads(RICH),
    **{
        str(p.relative_to(REPO)): tomllib.loads(p.read_text(encoding="utf-8"))
        for p in [REPO / "relay.toml", *sorted((REPO / "config").glob("*.toml"))]
    },
}

# Values that have tripped validators: each is tried at every key (the table test below), and
# hypothesis draws from them too.
ODD_VALUES: list[Any] = [
    "",
    " ",
    "${UNSET_VARIABLE}",
    "data.id",
    "{data.id}",
    "{data.id",
    "http://[::1",
    "http://h:99999/x",
    "postgresql://[::1",
    "x\x00y",
    "a" * 5000,
    "iso4271",
    "/webhooks/polar",
    "127.0.0.1:99999",
    "nan",
    "inf",
    "1e400",
    0,
    -1,
    2**70,
    0.5,
    math.nan,
    math.inf,
    True,
    datetime.date(2024, 1, 1),
    datetime.datetime(2024, 1, 1, 12, 0, tzinfo=datetime.UTC),
    datetime.time(12, 0),
    [],
    [1],
    ["x"],
    [{"a": 1}],
    {},
    {"path": "data.id"},
    {"zz": 1},
]
SCALARS = st.one_of(
    st.integers(min_value=-(2**63), max_value=2**63 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.booleans(),
    st.text(max_size=12),
    st.sampled_from(ODD_VALUES),
)
VALUES = st.recursive(
    SCALARS,
    lambda inner: (
        st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=6), inner, max_size=3)
    ),
    max_leaves=6,
)


def key_paths(node: Any, prefix: Keys = ()) -> list[Keys]:
    """Every key path in the document, containers included."""
    found: list[Keys] = []
    items: list[tuple[str | int, Any]] = (
        list(node.items())
        if isinstance(node, dict)
        else list(enumerate(node))
        if isinstance(node, list)
        else []
    )
    for key, value in items:
        found.append((*prefix, key))
        found += key_paths(value, (*prefix, key))
    return found


def parent_of(doc: Any, keys: Keys) -> Any:
    for key in keys[:-1]:
        doc = doc[key]
    return doc


@st.composite
def variants(draw: st.DrawFn) -> dict[str, Any]:
    """A base config with one to four mutations applied."""
    doc = copy.deepcopy(BASES[draw(st.sampled_from(sorted(BASES)))])
    for _ in range(draw(st.integers(min_value=1, max_value=4))):
        paths = key_paths(doc)
        if not paths:
            break
        keys = draw(st.sampled_from(paths))
        parent = parent_of(doc, keys)
        last = keys[-1]
        kind = draw(st.sampled_from(["drop", "rename", "retype", "swap"]))
        if kind == "drop":
            del parent[last]
        elif kind == "rename" and isinstance(parent, dict):
            new = draw(st.sampled_from([str(last) + "x", str(last)[:-1], str(last).upper(), "zz"]))
            parent[new] = parent.pop(last)
        elif kind == "retype":
            parent[last] = draw(VALUES)
        else:
            other = draw(st.sampled_from(paths))
            other_parent = parent_of(doc, other)
            # Not one inside the other: swapping a table with its own child makes a cycle.
            if other[: len(keys)] != keys and keys[: len(other)] != other:
                parent[last], other_parent[other[-1]] = (
                    copy.deepcopy(other_parent[other[-1]]),
                    copy.deepcopy(parent[last]),
                )
    return doc


ENV = env(POLAR_ACCESS_TOKEN="polar_oat_test")


@pytest.mark.parametrize("name", sorted(BASES))
def test_every_base_config_loads(name: str) -> None:
    """The unmutated bases are valid, so every failure below comes from a mutation."""
    assert isinstance(parse(copy.deepcopy(BASES[name]), ENV), Config)


@settings(
    max_examples=400,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)
@given(variants())
def test_a_mutated_config_loads_or_says_which_key_is_wrong(doc: dict[str, Any]) -> None:
    """Dropped, renamed, retyped or swapped keys give a Config or a ConfigError, nothing else,
    and every problem names its key path."""
    assert_loads_or_config_error(doc)


def assert_loads_or_config_error(doc: dict[str, Any]) -> None:
    problems: list[str] = []
    try:
        result = parse(doc, ENV)
    except ConfigError as exc:
        problems = exc.problems or ["(a ConfigError without problems)"]
    else:
        assert isinstance(result, Config)
    for problem in problems:
        # "key.path: what is wrong", or a missing variable "(needed by key.path)".
        assert ": " in problem or "(needed by " in problem, problem
        assert "\n" not in problem


def key_groups(name: str) -> list[tuple[str, Keys]]:
    """The key paths of a base config in groups of their first two keys (a section's key, a
    route): each group is a test of its own, so that pytest-xdist spreads the ~20k parses."""
    return [(name, group) for group in dict.fromkeys(keys[:2] for keys in key_paths(BASES[name]))]


@pytest.mark.parametrize(
    ("name", "group"),
    [*key_groups("rich"), *key_groups("relay.toml")],
    ids=lambda v: v if isinstance(v, str) else ".".join(map(str, v)),
)
def test_every_key_with_every_odd_value(name: str, group: Keys) -> None:
    """Each key of the config, set in turn to each value that has tripped a validator, gives a
    Config or a ConfigError (here the keys under `group`; the groups cover every key)."""
    base = BASES[name]
    pristine = copy.deepcopy(base)
    for keys in key_paths(base):
        if keys[:2] != group:
            continue
        for value in ODD_VALUES:
            assert_loads_or_config_error(replaced(base, keys, copy.deepcopy(value)))
    assert base == pristine  # parse changed nothing it was given, so sharing was safe


def replaced(node: Any, keys: Keys, value: Any) -> Any:
    """`node` with the value at `keys` replaced: the containers on the path are copied, the
    rest is shared with `node` (a deep copy of the whole config per parse was a quarter of
    this test's time)."""
    if not keys:
        return value
    head, rest = keys[0], keys[1:]
    if isinstance(node, list):
        assert isinstance(head, int)
        items = list(node)
        items[head] = replaced(node[head], rest, value)
        return items
    table = dict(node)
    table[head] = replaced(node[head], rest, value)
    return table


def test_a_misspelt_transform_is_one_config_error_with_its_key_path() -> None:
    """`transform = "iso4271"` in the shipped config's purchase route is reported at its key
    path (it was a KeyError: 'body')."""
    doc = copy.deepcopy(BASES["relay.toml"])
    doc["routes"][0]["body"]["currency"]["transform"] = "iso4271"
    with pytest.raises(ConfigError) as info:
        parse(doc, ENV)
    assert [p.split(" (allowed")[0] for p in info.value.problems] == [
        "routes[0].body.currency.transform: unknown transform 'iso4271'"
    ]


def test_a_url_the_parser_rejects_is_a_config_error() -> None:
    """A destination URL with an unclosed IPv6 bracket is a config error at its key path (it
    was urllib's ValueError)."""
    doc = copy.deepcopy(BASES["relay.toml"])
    doc["destinations"]["faurya"]["url"] = "http://[::1/api"
    with pytest.raises(ConfigError) as info:
        parse(doc, ENV)
    assert info.value.problems == [
        "destinations.faurya.url: must be an http:// or https:// URL with a host"
    ]
