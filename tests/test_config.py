"""relay.config: the shipped relay.toml, interpolation, masked secrets, and key-path errors."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import pytest

from relay.config import Config, RetryPolicy, Secret, parse, storage_path
from relay.errors import ConfigError
from tests.helpers import LEGACY_SECRET, REPO, SITE_ID, STANDARD_SECRET, WRITE_KEY, env

SHIPPED = REPO / "relay.toml"
DELETE: Any = object()
ALLOWED = re.compile(r" \(allowed: [^)]*\)$")
Keys = tuple[str | int, ...]


def shipped_raw(*edits: tuple[Keys, Any]) -> dict[str, Any]:
    """The shipped relay.toml as a dict, with `(keys, value)` edits applied (DELETE removes)."""
    raw = tomllib.loads(SHIPPED.read_text(encoding="utf-8"))
    for keys, value in edits:
        *parents, last = keys
        node: Any = raw
        for key in parents:
            node = node[key]
        if value is DELETE:
            del node[last]
        else:
            node[last] = value
    return raw


def problems(raw: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    """The problems `parse` reports for `raw`, each without its "(allowed: ...)" list (which
    grows with features); fails the test if `parse` accepts `raw`."""
    with pytest.raises(ConfigError) as info:
        parse(raw, env() if environ is None else environ)
    assert str(info.value) == "; ".join(info.value.problems)
    return [ALLOWED.sub("", p) for p in info.value.problems]


def test_shipped_config_parses_with_the_documented_env() -> None:
    """The shipped relay.toml, with only the four documented variables set, gives these values."""
    config = parse(shipped_raw(), env())

    assert config.server.port == 8080
    assert config.server.max_body_bytes == 262144
    assert config.storage.path == "relay.db"
    [source] = config.sources.values()
    assert (source.name, source.kind, source.path, source.tolerance_s) == (
        "polar",
        "polar",
        "/webhooks/polar",
        300,
    )
    assert source.secrets == (Secret(LEGACY_SECRET), Secret(STANDARD_SECRET))
    faurya = config.destinations["faurya"]
    assert faurya.url == "http://127.0.0.1:9/api/revenue"
    assert [(h.name, h.text, h.shown()) for h in faurya.headers] == [
        ("x-faurya-site-id", SITE_ID, SITE_ID),
        ("x-faurya-write-key", WRITE_KEY, "***"),
    ]
    assert (faurya.timeout_s, faurya.concurrency, faurya.lease_s) == (10.0, 64, 60.0)
    assert config.server.delivery_processes == 1
    assert faurya.concurrency_while_receiving == 16
    assert faurya.retry == RetryPolicy(
        max_attempts=1000, base_s=1.0, cap_s=600.0, max_age_s=604800.0, jitter=0.5
    )
    assert [(r.name, r.source, r.events, r.destination) for r in config.routes] == [
        ("polar-order-paid", "polar", ("order.paid",), "faurya"),
        ("polar-order-renewal", "polar", ("order.paid",), "faurya"),
        ("polar-order-credit", "polar", ("order.paid",), "faurya"),
        ("polar-refund-succeeded", "polar", ("refund.created", "refund.updated"), "faurya"),
        ("polar-refund-reversed", "polar", ("refund.updated",), "faurya"),
        ("polar-dispute-lost", "polar", ("dispute.lost",), "faurya"),
    ]


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("${RELAY_DB}", {"RELAY_DB": "/data/relay.db"}, "/data/relay.db"),
        ("${RELAY_DB:-relay.db}", {}, "relay.db"),
        ("${RELAY_DB:-relay.db}", {"RELAY_DB": ""}, "relay.db"),
        ("${RELAY_DB:-relay.db}", {"RELAY_DB": "/x.db"}, "/x.db"),
        ("${RELAY_DB:-/var/lib/a:-b.db}", {}, "/var/lib/a:-b.db"),
        ("/d/${A}-${B}.db", {"A": "one", "B": "two"}, "/d/one-two.db"),
        ("$$HOME/relay.db", {"HOME": "/root"}, "$HOME/relay.db"),
        ("$${RELAY_DB}", {"RELAY_DB": "/x.db"}, "${RELAY_DB}"),
        ("cost$$5.db", {}, "cost$5.db"),
        ("$5.db", {}, "$5.db"),
    ],
)
def test_interpolation(text: str, environ: dict[str, str], expected: str) -> None:
    """`${VAR}` and `${VAR:-default}` (also for an empty VAR) are replaced; `$$` is a `$`."""
    config = parse(shipped_raw((("storage", "path"), text)), env(**environ))
    assert config.storage.path == expected


@pytest.mark.parametrize(
    ("variable", "key_path"),
    [
        ("POLAR_WEBHOOK_SECRET", "sources.polar.secrets"),
        ("FAURYA_URL", "destinations.faurya.url"),
        ("FAURYA_SITE_ID", "destinations.faurya.headers.x-faurya-site-id"),
        ("FAURYA_WRITE_KEY", "destinations.faurya.headers.x-faurya-write-key"),
    ],
)
def test_missing_variable_is_one_message_naming_it_and_its_key(
    variable: str, key_path: str
) -> None:
    """A missing variable gives a single ConfigError message naming the variable and the key."""
    environ = env()
    del environ[variable]
    assert problems(shipped_raw(), environ) == [
        f"environment variable {variable} is not set or empty (needed by {key_path})"
    ]


def test_missing_variables_are_reported_alone_on_one_line() -> None:
    """Several missing variables make one message, without echoing the problems they cause."""
    raw = shipped_raw((("routes", 0, "events"), ["${EVENT_TYPE}"]))
    assert problems(raw, {}) == [
        "environment variable POLAR_WEBHOOK_SECRET is not set or empty "
        "(needed by sources.polar.secrets); "
        "environment variable FAURYA_URL is not set or empty (needed by destinations.faurya.url); "
        "environment variable FAURYA_SITE_ID is not set or empty "
        "(needed by destinations.faurya.headers.x-faurya-site-id); "
        "environment variable FAURYA_WRITE_KEY is not set or empty "
        "(needed by destinations.faurya.headers.x-faurya-write-key); "
        "environment variable EVENT_TYPE is not set or empty (needed by routes[0].events[0])"
    ]


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("polar_whs_a", ("polar_whs_a",)),
        ("polar_whs_old,whsec_new", ("polar_whs_old", "whsec_new")),
        (" polar_whs_a , whsec_b ,whsec_c ", ("polar_whs_a", "whsec_b", "whsec_c")),
        ("polar_whs_a,,whsec_b,", ("polar_whs_a", "whsec_b")),
    ],
)
def test_comma_separated_secrets_become_several_secrets(
    value: str, expected: tuple[str, ...]
) -> None:
    """POLAR_WEBHOOK_SECRET with commas (rotation) gives one trimmed Secret per entry."""
    config = parse(shipped_raw(), env(POLAR_WEBHOOK_SECRET=value))
    assert config.sources["polar"].secrets == tuple(Secret(v) for v in expected)


def test_secrets_may_be_a_toml_array() -> None:
    """`secrets = [...]` in the file works like the comma-separated form."""
    config = parse(shipped_raw((("sources", "polar", "secrets"), ["a", " b "])), env())
    assert config.sources["polar"].secrets == (Secret("a"), Secret("b"))


def test_empty_secret_variable_is_reported_like_a_missing_one() -> None:
    """POLAR_WEBHOOK_SECRET set to "" is as good as unset: one line naming the variable."""
    assert problems(shipped_raw(), env(POLAR_WEBHOOK_SECRET="")) == [
        "environment variable POLAR_WEBHOOK_SECRET is not set or empty "
        "(needed by sources.polar.secrets)"
    ]


@pytest.mark.parametrize("value", [" , ", ","])
def test_no_secret_at_all_is_an_error(value: str) -> None:
    """A POLAR_WEBHOOK_SECRET of only commas and blanks is rejected, not verifying nothing."""
    assert problems(shipped_raw(), env(POLAR_WEBHOOK_SECRET=value)) == [
        "sources.polar.secrets: at least one webhook secret is required"
    ]


def test_secret_repr_and_str_are_masked() -> None:
    """A Secret never shows its value through repr, str or formatting."""
    secret = Secret("s3cr3t-value")
    assert repr(secret) == "Secret('***')"
    assert str(secret) == "***"
    assert f"{secret} {secret!r} {[secret]}" == "*** Secret('***') [Secret('***')]"
    assert secret.value == "s3cr3t-value"


def test_config_repr_contains_no_secret() -> None:
    """repr(config) shows neither webhook secret nor the write key, but does show the site id."""
    config = parse(shipped_raw(), env())
    for text in (repr(config), str(config)):
        assert LEGACY_SECRET not in text
        assert STANDARD_SECRET not in text
        assert WRITE_KEY not in text
        assert SITE_ID in text


@pytest.mark.parametrize(
    ("name", "masked"),
    [
        ("x-faurya-write-key", True),
        ("X-Api-Key", True),
        ("x-access-token", True),
        ("x-client-secret", True),
        ("authorization", True),
        ("x-faurya-site-id", False),
        ("x-request-source", False),
    ],
)
def test_header_names_with_key_token_or_secret_are_masked(name: str, masked: bool) -> None:
    """A header whose name says key/token/secret/auth is a Secret: shown() gives '***'."""
    raw = shipped_raw((("destinations", "faurya", "headers"), {name: "hunter2-value"}))
    [header] = parse(raw, env()).destinations["faurya"].headers
    assert header.text == "hunter2-value"
    assert header.shown() == ("***" if masked else "hunter2-value")
    assert isinstance(header.value, Secret) is masked
    assert ("hunter2-value" in repr(header)) is not masked


BAD_VALUES: list[tuple[Keys, Any, list[str]]] = [
    (
        ("destinations", "faurya", "retry", "jitter"),
        1.5,
        ["destinations.faurya.retry.jitter: must be between 0 and 1"],
    ),
    (
        ("destinations", "faurya", "retry", "jitter"),
        "lots",
        ["destinations.faurya.retry.jitter: must be a number"],
    ),
    (
        ("destinations", "faurya", "retry", "jiter"),
        0.5,
        ["destinations.faurya.retry.jiter: unknown key"],
    ),
    (
        ("destinations", "faurya", "retry", "cap_s"),
        0.5,
        ["destinations.faurya.retry.cap_s: must be at least base_s (1)"],
    ),
    (
        ("destinations", "faurya", "retry", "base_s"),
        -1,
        ["destinations.faurya.retry.base_s: must be greater than 0"],
    ),
    (
        ("destinations", "faurya", "retry", "max_attempts"),
        2.5,
        ["destinations.faurya.retry.max_attempts: must be an integer"],
    ),
    (
        ("destinations", "faurya", "retry"),
        "fast",
        ["destinations.faurya.retry: must be a table"],
    ),
    (("server", "port"), 70000, ["server.port: must be between 0 and 65535"]),
    (("server", "port"), True, ["server.port: must be an integer"]),
    (("server", "port"), 80.5, ["server.port: must be an integer"]),
    (
        ("server", "hots"),
        "::",
        ["server.hots: unknown key"],
    ),
    (
        ("serverr",),
        {},
        ["serverr: unknown key"],
    ),
    (("log", "level"), "verbose", ["log.level: must be one of debug, info, warning, error"]),
    (("storage", "path"), "", ["storage.path: must not be empty"]),
    (("storage", "max_batch"), 0, ["storage.max_batch: must be between 1 and 2000"]),
    (("sources", "polar", "path"), "webhooks/polar", ["sources.polar.path: must start with /"]),
    (
        ("sources", "polar", "kind"),
        "stripe",
        ["sources.polar.kind: must be one of polar, standard-webhooks"],
    ),
    (
        ("sources", "polar", "tolerance_s"),
        0,
        ["sources.polar.tolerance_s: must be between 1 and 86400"],
    ),
    (("sources", "polar", "secrets"), DELETE, ["sources.polar.secrets: required"]),
    (
        ("sources", "polar", "secrets"),
        5,
        ["sources.polar.secrets: must be a string (comma-separated) or an array of strings"],
    ),
    (
        ("sources",),
        {},
        [
            "sources: define at least one source",
            *[f"routes[{i}].source: no source named 'polar' (defined: none)" for i in range(6)],
        ],
    ),
    (
        ("destinations", "faurya", "url"),
        "ftp://faurya.example/api/revenue",
        ["destinations.faurya.url: must be an http:// or https:// URL with a host"],
    ),
    (
        ("destinations", "faurya", "timeout_s"),
        0,
        ["destinations.faurya.timeout_s: must be between 0.1 and 300"],
    ),
    (
        ("destinations", "faurya", "concurrency"),
        0,
        ["destinations.faurya.concurrency: must be between 1 and 1000"],
    ),
    (
        ("destinations", "faurya", "headers", "content-type"),
        "text/plain",
        ["destinations.faurya.headers.content-type: set by the relay itself; remove it"],
    ),
    (
        ("destinations", "faurya", "headers", "Idempotency-Key"),
        "x",
        ["destinations.faurya.headers.Idempotency-Key: set by the relay itself; remove it"],
    ),
    (
        ("destinations", "faurya", "headers", "x-retries"),
        3,
        ["destinations.faurya.headers.x-retries: must be a string"],
    ),
    (
        ("routes", 0, "body", "currency", "transform"),
        "uper",
        ["routes[0].body.currency.transform: unknown transform 'uper'"],
    ),
    (
        ("routes", 0, "body", "amount", "type"),
        "integer",
        ["routes[0].body.amount.type: unknown type 'integer'"],
    ),
    (
        ("routes", 0, "body", "amount", "requird"),
        True,
        ["routes[0].body.amount.requird: unknown rule key"],
    ),
    (
        ("routes", 0, "body", "attribution", "faVisitorId", "path"),
        "data.metadata..faVisitorId",
        [
            "routes[0].body.attribution.faVisitorId.path: bad path "
            "'data.metadata..faVisitorId' (use dotted names and [index]: data.items[0].id)"
        ],
    ),
    (("routes", 0, "body"), "purchase", ["routes[0].body: must be a table"]),
    (("routes", 0, "body"), DELETE, ["routes[0].body: required"]),
    (("routes", 0, "idempotency_key"), DELETE, ["routes[0].idempotency_key: required"]),
    (
        ("routes", 0, "idempotency_key"),
        "polar:order:{data.id",
        ["routes[0].idempotency_key: unbalanced brace in template 'polar:order:{data.id'"],
    ),
    (
        ("routes", 0, "events"),
        [],
        ["routes[0].events: must be a non-empty array of event types"],
    ),
    (("routes", 0, "events"), "order.paid", ["routes[0].events: must be an array"]),
    (
        ("routes", 0, "source"),
        "stripe",
        ["routes[0].source: no source named 'stripe' (defined: polar)"],
    ),
    (
        ("routes", 0, "destination"),
        "datafast",
        ["routes[0].destination: no destination named 'datafast' (defined: faurya)"],
    ),
    (("routes", 0, "name"), "polar order", ["routes[0].name: use letters, digits, - and _"]),
    (
        ("routes", 0, "retries"),
        3,
        ["routes[0].retries: unknown key"],
    ),
    (
        ("routes", 0, "when"),
        {"path": "data.status", "equals": "paid"},
        [
            "routes[0].when.equals: unknown condition key",
            "routes[0].when: give exactly one of eq, ne, in, not_in, exists, lt, le, gt, ge",
        ],
    ),
    (
        ("routes", 0),
        "polar-order-paid",
        [
            "routes[0]: must be a table",
            "routes[0].source: required",
            "routes[0].destination: required",
            "routes[0].events: required",
            "routes[0].idempotency_key: required",
            "routes[0].body: required",
        ],
    ),
]


@pytest.mark.parametrize(
    ("keys", "value", "expected"),
    BAD_VALUES,
    ids=[".".join(map(str, keys)) for keys, _, _ in BAD_VALUES],
)
def test_bad_config_names_the_full_key_path(keys: Keys, value: Any, expected: list[str]) -> None:
    """Each unknown key, wrong type or bad value is reported with its full key path."""
    assert problems(shipped_raw((keys, value))) == expected


@pytest.mark.parametrize(
    ("keys", "value", "allowed"),
    [
        (("server", "hots"), "::", {"host", "port", "max_body_bytes", "shutdown_grace_s"}),
        (("destinations", "faurya", "retry", "jiter"), 0.5, {"jitter", "base_s", "cap_s"}),
        (("routes", 0, "when"), {"path": "a", "equals": 1}, {"eq", "ne", "in", "not", "all"}),
        (("routes", 0, "body", "currency", "transform"), "uper", {"upper", "empty_to_null"}),
        (("routes", 0, "body", "amount", "type"), "integer", {"string", "int", "float", "bool"}),
        (("routes", 0, "body", "amount", "requird"), 1, {"path", "first", "required", "type"}),
    ],
    ids=["server", "retry", "when", "transform", "type", "rule"],
)
def test_unknown_names_list_the_allowed_ones(keys: Keys, value: Any, allowed: set[str]) -> None:
    """An unknown key, type or transform is reported with the names that would be accepted."""
    with pytest.raises(ConfigError) as info:
        parse(shipped_raw((keys, value)), env())
    match = re.search(r"\(allowed: ([^)]*)\)$", info.value.problems[0])
    assert match is not None, info.value.problems
    assert allowed <= set(match.group(1).split(", "))


def test_several_problems_are_reported_together() -> None:
    """Validation does not stop at the first problem: every one is listed, none quoting a secret."""
    raw = shipped_raw(
        (("destinations", "faurya", "retry", "jitter"), 2),
        (("routes", 0, "body", "currency", "transform"), "uper"),
        (("log", "colour"), True),
    )
    with pytest.raises(ConfigError) as info:
        parse(raw, env(RELAY_PORT="http"))
    assert [ALLOWED.sub("", p) for p in info.value.problems] == [
        "server.port: must be an integer",
        "log.colour: unknown key",
        "destinations.faurya.retry.jitter: must be between 0 and 1",
        "routes[0].body.currency.transform: unknown transform 'uper'",
    ]
    for secret in (LEGACY_SECRET, STANDARD_SECRET, WRITE_KEY):
        assert secret not in str(info.value)


def test_duplicate_route_names_and_source_paths_are_errors() -> None:
    """Two routes with one name, or two sources on one path, are rejected."""
    raw = shipped_raw()
    raw["routes"].append(dict(raw["routes"][0]))
    raw["sources"]["polar2"] = {"path": "/webhooks/polar", "secrets": "polar_whs_x"}
    assert problems(raw) == [
        "sources: path /webhooks/polar is used by more than one source",
        "routes: the name 'polar-order-paid' is used more than once",
    ]


@pytest.mark.parametrize(
    ("timeout_s", "lease_s", "expected_lease_s"),
    [
        (10, 15, 15.0),
        (10, None, 60.0),
        (40, None, 85.0),
        (0.5, 5.5, 5.5),
    ],
)
def test_lease_outlasts_the_request(
    timeout_s: float, lease_s: float | None, expected_lease_s: float
) -> None:
    """lease_s defaults to max(60, 2 * timeout_s + 5) and may be as short as timeout_s + 5."""
    edits: list[tuple[Keys, Any]] = [(("destinations", "faurya", "timeout_s"), timeout_s)]
    if lease_s is not None:
        edits.append((("destinations", "faurya", "lease_s"), lease_s))
    config = parse(shipped_raw(*edits), env())
    assert config.destinations["faurya"].lease_s == expected_lease_s


@pytest.mark.parametrize(("timeout_s", "lease_s"), [(10, 14.9), (10, 5), (60, 60)])
def test_lease_shorter_than_timeout_plus_5_is_rejected(timeout_s: float, lease_s: float) -> None:
    """A lease that could expire while its request is still in flight is a config error."""
    raw = shipped_raw(
        (("destinations", "faurya", "timeout_s"), timeout_s),
        (("destinations", "faurya", "lease_s"), lease_s),
    )
    assert problems(raw) == [
        f"destinations.faurya.lease_s: must be at least timeout_s + 5 ({timeout_s + 5:g})"
    ]


@pytest.mark.parametrize(
    ("environ", "port"),
    [({}, 8080), ({"RELAY_PORT": "9090"}, 9090), ({"RELAY_PORT": " 9091 "}, 9091)],
)
def test_numeric_strings_from_interpolation_become_ints(environ: dict[str, str], port: int) -> None:
    """`port = "${RELAY_PORT:-8080}"` yields an int, not the string "8080"."""
    config = parse(shipped_raw(), env(**environ))
    assert config.server.port == port
    assert type(config.server.port) is int


@pytest.mark.parametrize(
    ("text", "environ", "expected"),
    [
        ("${TIMEOUT:-2.5}", {}, 2.5),
        ("${TIMEOUT}", {"TIMEOUT": "7"}, 7.0),
    ],
)
def test_numeric_strings_become_floats(text: str, environ: dict[str, str], expected: float) -> None:
    """Interpolated numbers also fill float settings."""
    config = parse(shipped_raw((("destinations", "faurya", "timeout_s"), text)), env(**environ))
    assert config.destinations["faurya"].timeout_s == expected


@pytest.mark.parametrize(
    ("port", "problem"),
    [("http", "must be an integer"), ("80.5", "must be an integer"), ("99999", None)],
)
def test_non_numeric_port_text_is_a_type_error(port: str, problem: str | None) -> None:
    """Text that is not an integer is reported as a type error on server.port."""
    expected = problem or "must be between 0 and 65535"
    assert problems(shipped_raw(), env(RELAY_PORT=port)) == [f"server.port: {expected}"]


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({}, "relay.db"), ({"RELAY_DB": "/var/lib/relay/relay.db"}, "/var/lib/relay/relay.db")],
)
def test_storage_path_needs_no_secrets(environ: dict[str, str], expected: str) -> None:
    """storage_path() reads only [storage], so outbox commands work without the secret vars."""
    assert storage_path(SHIPPED, environ) == expected
    with pytest.raises(ConfigError):
        parse(shipped_raw(), environ)  # while the full config needs them


def test_storage_path_reports_its_own_problems(tmp_path: Path) -> None:
    """storage_path() names a missing variable in [storage], and a missing file."""
    path = tmp_path / "relay.toml"
    path.write_text('[storage]\npath = "${DB_DIR}/relay.db"\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        storage_path(path, {})
    assert info.value.problems == [
        "environment variable DB_DIR is not set or empty (needed by storage.path)"
    ]
    with pytest.raises(ConfigError, match="no such config file"):
        storage_path(tmp_path / "absent.toml", {})


@pytest.mark.parametrize(
    ("faurya_url", "expected"),
    [
        ("https://faurya.example", "https://faurya.example/api/revenue"),
        ("https://faurya.example/", "https://faurya.example/api/revenue"),
        ("https://faurya.example//", "https://faurya.example/api/revenue"),
        ("https://proxy.example/faurya/", "https://proxy.example/faurya/api/revenue"),
        ("http://127.0.0.1:8081/", "http://127.0.0.1:8081/api/revenue"),
    ],
)
def test_trailing_slash_in_faurya_url_does_not_double(faurya_url: str, expected: str) -> None:
    """FAURYA_URL with a trailing slash still gives a single `/` before api/revenue."""
    config: Config = parse(shipped_raw(), env(FAURYA_URL=faurya_url))
    assert config.destinations["faurya"].url == expected


def test_redacting_a_path_a_route_reads_is_a_config_error() -> None:
    """log.redact may not hide a field the mapping needs: reprocess would map "[redacted]"."""
    raw = shipped_raw((("log", "redact"), ["data.customer.email", "data.metadata"]))
    assert problems(raw) == [
        "log.redact[1]: routes.polar-order-paid reads data.metadata.orderId: a redacted "
        "stored body could not be mapped again by relay reprocess"
    ]


def test_shipped_config_redacts_customer_pii() -> None:
    """The shipped relay.toml keeps no customer email or address in stored bodies."""
    config = parse(shipped_raw(), env())
    assert ("data", "customer", "email") in config.log.redact
    assert ("data", "billing_address") in config.log.redact


def test_concurrency_while_receiving_defaults_to_the_whole_pool() -> None:
    raw = shipped_raw((("destinations", "faurya", "concurrency_while_receiving"), DELETE))
    assert parse(raw, env()).destinations["faurya"].concurrency_while_receiving == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (65, "must be at most concurrency (64)"),
        (0, "must be between 1 and 1000"),
        ("many", "must be an integer"),
    ],
)
def test_concurrency_while_receiving_is_checked(value: Any, problem: str) -> None:
    raw = shipped_raw((("destinations", "faurya", "concurrency_while_receiving"), value))
    assert problems(raw) == [f"destinations.faurya.concurrency_while_receiving: {problem}"]
