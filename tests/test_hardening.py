"""Hardening: source allowlists, trusted proxies, HTTPS, TLS, the admin listener, slow clients,
header limits, payload redaction and request ids.

What the app decides runs in process (create_app on loopback, real SQLite). What the server
around it decides (TLS, the admin listener, aiohttp's connection limits) runs in the real
`relay serve` subprocess with a copy of the shipped relay.toml, spoken to over raw sockets
where a well-behaved client library would not misbehave on purpose.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import os
import shutil
import socket
import sqlite3
import ssl
import stat
import time
import tomllib
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator, MutableMapping
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient

from relay import hardening
from relay.access import parse_networks
from relay.app import METRICS, READINESS, create_app
from relay.config import AdminConfig, Config, Secret, parse
from relay.errors import ConfigError
from relay.mapping import REDACTED, parse_path
from relay.readiness import Readiness
from relay.store import open_store
from relay.store.postgres import _safe
from tests.helpers import (
    REPO,
    SITE_ID,
    Client,
    FakeClock,
    FakeFaurya,
    LogList,
    RelayProcess,
    RelayProcesses,
    admin_get,
    env,
    logged,
    order_paid,
    process_env,
    raw_connection,
    relay_command,
    run_command,
    sign_headers,
    status_line_after,
    wait_until,
)

pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events

MakeRelay = Callable[[Config], Awaitable[Client]]
StartRelay = Callable[..., Awaitable[RelayProcess]]

PATH = "/webhooks/polar"
SHIPPED_TEXT = (REPO / "relay.toml").read_text(encoding="utf-8")
ADMIN_TOKEN = "adm_tok_7Fh2Kq9ZxW3pLm5N"
EMAIL = "jane.doe@example.com"  # the customer's, in the order.paid fixture


@pytest.fixture
def make_relay(aiohttp_client: AiohttpClient) -> MakeRelay:
    async def make(config: Config) -> Client:
        return await aiohttp_client(create_app(config, poll_interval_s=0.05))

    return make


def with_server(config: Config, **changes: Any) -> Config:
    return dataclasses.replace(config, server=dataclasses.replace(config.server, **changes))


def with_allow_ips(config: Config, *networks: str) -> Config:
    source = dataclasses.replace(config.sources["polar"], allow_ips=parse_networks(networks))
    return dataclasses.replace(config, sources={"polar": source})


def rows(db_path: Path) -> tuple[int, int]:
    """(inbound events, outbound messages) committed to the database file."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        events = db.execute("SELECT COUNT(*) FROM inbound_events").fetchone()[0]
        messages = db.execute("SELECT COUNT(*) FROM outbound_messages").fetchone()[0]
    return int(events), int(messages)


def received(client: Client, outcome: str, event_type: str = "unknown") -> float:
    labels = {"source": "polar", "event_type": event_type, "outcome": outcome}
    value = client.app[METRICS].registry.get_sample_value("relay_webhooks_received_total", labels)
    return value or 0.0


async def post_with_lines(client: Client, header: str, *values: str) -> int:
    """A signed order.paid with one `header` line per value, in order; the answer's status."""
    body = order_paid()
    headers = CIMultiDict(sign_headers(body))
    for value in values:
        headers.add(header, value)
    resp = await client.post(PATH, data=body, headers=headers)
    return resp.status


async def post_order(client: Client, extra: dict[str, str] | None = None) -> tuple[int, Any]:
    body = order_paid()
    resp = await client.post(PATH, data=body, headers={**sign_headers(body), **(extra or {})})
    return resp.status, await resp.json()


# ---------------------------------------------------------------- source allowlist


async def test_allow_ips_refuses_a_peer_outside_the_list(
    make_relay: MakeRelay, config: Config, db_path: Path, logs: LogList
) -> None:
    """A correctly signed webhook from 127.0.0.1 with allow_ips = 10.0.0.0/8 gets 403, is not
    stored, is counted as forbidden and logged as webhook_forbidden."""
    client = await make_relay(with_allow_ips(config, "10.0.0.0/8"))

    status, answer = await post_order(client)

    assert (status, answer) == (403, {"error": "source address not allowed"})
    assert rows(db_path) == (0, 0)
    assert received(client, "forbidden") == 1
    [entry] = logged(logs, "webhook_forbidden")
    assert (entry["client_ip"], entry["reason"]) == ("127.0.0.1", "not in allow_ips")
    assert logged(logs, "webhook_accepted") == []


async def test_allow_ips_accepts_a_peer_inside_the_list(
    make_relay: MakeRelay, config: Config, db_path: Path, logs: LogList
) -> None:
    """With allow_ips = 127.0.0.0/8 a signed webhook from loopback is accepted and stored."""
    client = await make_relay(with_allow_ips(config, "127.0.0.0/8"))

    status, answer = await post_order(client)

    assert (status, answer["status"]) == (202, "accepted")
    assert rows(db_path) == (1, 1)
    assert received(client, "forbidden") == 0
    assert logged(logs, "webhook_forbidden") == []


# ---------------------------------------------------------------- trusted proxies


@pytest.mark.parametrize(
    ("forwarded_for", "status"),
    [
        ("203.0.113.7", 202),
        ("198.51.100.1", 403),
        # The client wrote the left hop itself; the proxy appended the real address.
        ("203.0.113.99, 198.51.100.1", 403),
        ("198.51.100.1, 203.0.113.7", 202),
    ],
)
async def test_forwarded_for_from_a_trusted_proxy_names_the_client(
    make_relay: MakeRelay,
    config: Config,
    db_path: Path,
    logs: LogList,
    forwarded_for: str,
    status: int,
) -> None:
    """Behind a trusted proxy (127.0.0.1), the right-most untrusted X-Forwarded-For hop is what
    allow_ips judges."""
    config = with_server(config, trusted_proxies=parse_networks(["127.0.0.1/32"]))
    client = await make_relay(with_allow_ips(config, "203.0.113.0/24"))

    got, _ = await post_order(client, {"x-forwarded-for": forwarded_for})

    assert got == status
    assert rows(db_path) == ((1, 1) if status == 202 else (0, 0))
    assert received(client, "forbidden") == (1 if status == 403 else 0)
    client_ip = forwarded_for.split(",")[-1].strip()
    if status == 403:
        [entry] = logged(logs, "webhook_forbidden")
        assert entry["client_ip"] == client_ip


@pytest.mark.parametrize(
    ("allow", "forwarded_for", "status"),
    [
        ("203.0.113.0/24", "203.0.113.7", 403),  # a claimed address does not get in ...
        ("127.0.0.0/8", "198.51.100.1", 202),  # ... nor does a claimed address keep one out
    ],
)
async def test_forwarded_for_without_trusted_proxies_is_ignored(
    make_relay: MakeRelay,
    config: Config,
    db_path: Path,
    logs: LogList,
    allow: str,
    forwarded_for: str,
    status: int,
) -> None:
    """With no trusted proxies the TCP peer (127.0.0.1) is the client, whatever
    X-Forwarded-For says."""
    client = await make_relay(with_allow_ips(config, allow))

    got, _ = await post_order(client, {"x-forwarded-for": forwarded_for})

    assert got == status
    assert rows(db_path) == ((1, 1) if status == 202 else (0, 0))
    assert received(client, "forbidden") == (1 if status == 403 else 0)
    for entry in logged(logs, "webhook_forbidden"):
        assert entry["client_ip"] == "127.0.0.1"


async def test_every_forwarded_for_line_counts_not_only_the_first(
    make_relay: MakeRelay, config: Config, db_path: Path, logs: LogList
) -> None:
    """Two X-Forwarded-For lines, the client's forged `10.1.1.1` then the one its proxy
    appended (`203.0.113.9`, as HAProxy's `option forwardfor` does), read as one list: the
    client is 203.0.113.9, outside allow_ips 10.0.0.0/8, so 403."""
    config = with_server(config, trusted_proxies=parse_networks(["127.0.0.1/32"]))
    client = await make_relay(with_allow_ips(config, "10.0.0.0/8"))

    status = await post_with_lines(client, "X-Forwarded-For", "10.1.1.1", "203.0.113.9")

    assert status == 403
    assert rows(db_path) == (0, 0)
    assert received(client, "forbidden") == 1
    [entry] = logged(logs, "webhook_forbidden")
    assert entry["client_ip"] == "203.0.113.9"


async def test_every_forwarded_proto_line_counts_not_only_the_first(
    make_relay: MakeRelay, config: Config, db_path: Path
) -> None:
    """Two X-Forwarded-Proto lines, a forged `https` then the proxy's `http`: the request came
    over plain HTTP, so require_https refuses it."""
    config = with_server(
        config, trusted_proxies=parse_networks(["127.0.0.1/32"]), require_https=True
    )
    client = await make_relay(config)

    status = await post_with_lines(client, "X-Forwarded-Proto", "https", "http")

    assert status == 403
    assert rows(db_path) == (0, 0)
    assert received(client, "https_required") == 1


# ---------------------------------------------------------------- require_https


@pytest.mark.parametrize(
    ("trusted", "proto", "status"),
    [
        ("127.0.0.1/32", "http", 403),
        ("127.0.0.1/32", "https", 202),
        ("127.0.0.1/32", None, 403),
        ("10.0.0.0/8", "https", 403),  # the peer is no trusted proxy: its claim is not believed
    ],
)
async def test_require_https_believes_only_a_trusted_proxy(
    make_relay: MakeRelay,
    config: Config,
    db_path: Path,
    logs: LogList,
    trusted: str,
    proto: str | None,
    status: int,
) -> None:
    """With require_https, plain HTTP is refused with 403 unless a trusted proxy says the
    client came over HTTPS (X-Forwarded-Proto: https)."""
    config = with_server(config, require_https=True, trusted_proxies=parse_networks([trusted]))
    client = await make_relay(config)
    extra = {"x-forwarded-proto": proto} if proto else {}

    got, answer = await post_order(client, extra)

    assert got == status
    if status == 403:
        assert answer == {"error": "https required"}
        assert rows(db_path) == (0, 0)
        assert received(client, "https_required") == 1
        [entry] = logged(logs, "webhook_forbidden")
        assert (entry["client_ip"], entry["reason"]) == ("127.0.0.1", "not over https")
    else:
        assert rows(db_path) == (1, 1)
        assert received(client, "https_required") == 0


# ---------------------------------------------------------------- /metrics token, in process


async def test_the_public_port_has_no_metrics_even_with_a_token(
    make_relay: MakeRelay, config: Config
) -> None:
    """The webhook port serves only the webhook path, /healthz and /readyz: /metrics (revenue,
    backlog) is 404 there with or without the admin token, and is served by the admin app,
    which asks for the bearer token (401 with WWW-Authenticate without it or with a wrong one)."""
    client = await make_relay(dataclasses.replace(config, admin=AdminConfig(token=Secret("t0k"))))

    for headers in ({}, {"authorization": "Bearer t0k"}):
        resp = await client.get("/metrics", headers=headers)
        assert resp.status == 404, headers
        assert "relay_" not in await resp.text()
    for headers in ({}, {"authorization": "Bearer nope"}, {"authorization": "t0k"}):
        scraped = await admin_get(client, headers=headers)
        assert scraped.status == 401, headers
        assert scraped.headers["WWW-Authenticate"].startswith("Bearer")
        assert "relay_ready" not in scraped.text
    scraped = await admin_get(client, headers={"authorization": "Bearer t0k"})
    assert scraped.status == 200
    assert "relay_webhooks_received_total" in scraped.text
    # Health checks stay open: orchestrators probe them without credentials.
    assert (await client.get("/readyz")).status == 200
    assert (await client.get("/healthz")).status == 200


async def test_the_public_port_routes_nothing_else(make_relay: MakeRelay, config: Config) -> None:
    """Every route of the public app is the webhook path, /checkout (when enabled), /healthz or
    /readyz: nothing that shows data or changes state."""
    client = await make_relay(config)

    paths = {r.resource.canonical for r in client.app.router.routes() if r.resource is not None}

    assert paths == {"/webhooks/polar", "/healthz", "/readyz"}


@pytest.mark.parametrize("listen", ["0.0.0.0:9090", "[::]:9090", "10.0.0.5:9090", "relay:9090"])
def test_an_admin_listener_off_loopback_needs_a_token(listen: str) -> None:
    """An admin listener on an address other machines can reach, without admin.token, is a
    configuration error naming admin.listen; loopback needs no token, and a token makes any
    address acceptable."""
    raw = tomllib.loads(SHIPPED_TEXT)

    with pytest.raises(ConfigError) as caught:
        parse(raw, env(RELAY_ADMIN_LISTEN=listen))
    assert caught.value.problems == [
        f"admin.listen: {listen} is not a loopback address, so admin.token "
        "(RELAY_ADMIN_TOKEN) is required"
    ]
    for loopback in ("127.0.0.1:9090", "[::1]:9090", "localhost:9090", "127.0.0.2:0"):
        assert parse(raw, env(RELAY_ADMIN_LISTEN=loopback)).admin.token is None
    config = parse(raw, env(RELAY_ADMIN_LISTEN=listen, RELAY_ADMIN_TOKEN=ADMIN_TOKEN))
    assert config.admin.listen == listen


def test_the_shipped_config_has_the_admin_listener_on_loopback() -> None:
    """relay.toml as shipped puts /metrics on 127.0.0.1:9090, with no token needed there."""
    environ = {k: v for k, v in env().items() if k != "RELAY_ADMIN_LISTEN"}

    shipped = parse(tomllib.loads(SHIPPED_TEXT), environ)

    assert shipped.admin.listen == "127.0.0.1:9090"
    assert shipped.admin.token is None


# ---------------------------------------------------------------- redaction and request ids


async def test_redacted_fields_are_not_stored_but_mapped(
    make_relay: MakeRelay,
    config: Config,
    db_path: Path,
    faurya: FakeFaurya,
    logs: LogList,
) -> None:
    """log.redact replaces those paths with "[redacted]" in the stored raw body, and no file of
    the database holds the customer's email, while the Faurya call is built from the full
    event (a redacted attribution field still reaches Faurya)."""
    paths = [
        "data.customer.email",
        "data.billing_address",
        "data.customer.billing_address",
        # The fixture repeats the email under data.user: redact is by path, so list it too.
        "data.user.email",
        # Used by the mapping: proves the mapping ran on the unredacted event.
        "data.metadata.faVisitorId",
    ]
    redact = tuple(parse_path(p, f"log.redact[{i}]") for i, p in enumerate(paths))
    client = await make_relay(
        dataclasses.replace(config, log=dataclasses.replace(config.log, redact=redact))
    )
    body = order_paid("0d9c3a52-1b7e-4f60-9a8d-2c4e6f8a0b1c")
    assert EMAIL.encode() in body

    resp = await client.post(PATH, data=body, headers=sign_headers(body))

    assert resp.status == 202, await resp.text()
    [call] = await faurya.wait_for(1)
    assert call.json["attribution"]["faVisitorId"] == "v_5f2c9e1ab7d34c0e"
    assert call.json["amount"] == 4410
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        [(stored,)] = db.execute("SELECT body FROM inbound_events").fetchall()
    event = json.loads(stored)
    assert event["data"]["customer"]["email"] == REDACTED
    assert event["data"]["customer"]["billing_address"] == REDACTED
    assert event["data"]["billing_address"] == REDACTED
    assert event["data"]["user"]["email"] == REDACTED
    assert event["data"]["metadata"]["faVisitorId"] == REDACTED
    # Everything else is as it arrived.
    original = json.loads(body)
    assert event["data"]["customer"]["name"] == original["data"]["customer"]["name"]
    assert event["data"]["net_amount"] == original["data"]["net_amount"]
    files = sorted(db_path.parent.glob(db_path.name + "*"))
    assert files, "no database files"
    holding = [f.name for f in files if EMAIL.encode() in f.read_bytes()]
    assert holding == []
    assert all(EMAIL not in repr(entry) for entry in logs)


async def delivery_succeeded(logs: LogList) -> MutableMapping[str, Any]:
    """Await the one delivery_succeeded log event; the event."""

    async def delivered() -> bool:
        return bool(logged(logs, "delivery_succeeded"))

    await wait_until(delivered)
    [entry] = logged(logs, "delivery_succeeded")
    return entry


@pytest.mark.parametrize(
    ("sent", "expected"),
    [
        ("req-7c1e-checkout-42", "req-7c1e-checkout-42"),
        ("r" * 100, "r" * 64),  # bounded: a header cannot bloat every log line
    ],
)
async def test_request_id_follows_the_event_into_delivery(
    make_relay: MakeRelay,
    config: Config,
    db_path: Path,
    faurya: FakeFaurya,
    logs: LogList,
    sent: str,
    expected: str,
) -> None:
    """The x-request-id of a webhook is stored with its event and messages and is logged with
    the delivery (delivery_succeeded carries request_id)."""
    client = await make_relay(config)

    status, _ = await post_order(client, {"x-request-id": sent})

    assert status == 202
    entry = await delivery_succeeded(logs)
    assert entry["request_id"] == expected
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT request_id FROM inbound_events").fetchall() == [(expected,)]
        assert db.execute("SELECT request_id FROM outbound_messages").fetchall() == [(expected,)]


async def test_request_id_is_made_when_none_is_sent(
    make_relay: MakeRelay, config: Config, db_path: Path, faurya: FakeFaurya, logs: LogList
) -> None:
    """Without x-request-id the relay makes one (16 hex digits) and uses it the same way."""
    client = await make_relay(config)

    status, _ = await post_order(client)

    assert status == 202
    entry = await delivery_succeeded(logs)
    made = entry["request_id"]
    assert isinstance(made, str)
    assert len(made) == 16
    int(made, 16)
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        assert db.execute("SELECT request_id FROM outbound_messages").fetchall() == [(made,)]


# ---------------------------------------------------------------- configuration


def shipped_raw(section: tuple[str, ...], key: str, value: Any) -> dict[str, Any]:
    raw = tomllib.loads(SHIPPED_TEXT)
    node = raw
    for name in section:
        node = node.setdefault(name, {})
    node[key] = value
    return raw


def problems_of(raw: dict[str, Any], environ: dict[str, str] | None = None) -> list[str]:
    with pytest.raises(ConfigError) as info:
        parse(raw, env() if environ is None else environ)
    return [p.split(" (allowed:")[0] for p in info.value.problems]


@pytest.mark.parametrize(
    ("section", "key", "value", "problem"),
    [
        (
            ("server",),
            "trusted_proxies",
            ["10.0.0.0/8", "nope"],
            "server.trusted_proxies: 'nope' is not an IP address or CIDR network",
        ),
        (("server",), "trusted_proxies", "10.0.0.0/8", "server.trusted_proxies: must be an array"),
        (
            ("server",),
            "trusted_proxies",
            [10],
            "server.trusted_proxies: must be an array of addresses or CIDR networks",
        ),
        (
            ("sources", "polar"),
            "allow_ips",
            ["192.0.2.0/24", "300.0.0.1"],
            "sources.polar.allow_ips: '300.0.0.1' is not an IP address or CIDR network",
        ),
        (
            ("server",),
            "keepalive_timeout_s",
            0,
            "server.keepalive_timeout_s: must be between 1 and 3600",
        ),
        (("server",), "body_timeout_s", 0.1, "server.body_timeout_s: must be between 0.5 and 600"),
        (
            ("server",),
            "max_header_bytes",
            100,
            "server.max_header_bytes: must be between 256 and 65536",
        ),
        (("server",), "max_headers", 2, "server.max_headers: must be between 8 and 1000"),
        (("server",), "require_https", "yes", "server.require_https: must be true or false"),
        (("admin",), "listen", "9090", "admin.listen: must be host:port, like 127.0.0.1:9090"),
        (
            ("admin",),
            "listen",
            "127.0.0.1:70000",
            "admin.listen: must be host:port, like 127.0.0.1:9090",
        ),
        (("admin",), "token", 5, "admin.token: must be a string"),
        (("admin",), "tokn", "x", "admin.tokn: unknown key"),
        (
            ("log",),
            "redact",
            ["data.customer.email", "data..email"],
            "log.redact[1]: bad path 'data..email' (use dotted names and [index]: "
            "data.items[0].id)",
        ),
        (("log",), "redact", "data.customer.email", "log.redact: must be an array"),
    ],
)
def test_hardening_keys_are_validated_with_their_key_paths(
    section: tuple[str, ...], key: str, value: Any, problem: str
) -> None:
    """Each bad value of a hardening key is reported once, with its full key path."""
    assert problems_of(shipped_raw(section, key, value)) == [problem]


@pytest.mark.parametrize("missing", ["tls_cert", "tls_key"])
def test_a_missing_tls_file_is_named(tmp_path: Path, missing: str) -> None:
    """With both TLS keys set, a file that does not exist is the one problem, on its key."""
    raw = shipped_raw(("server",), "tls_cert", str(tmp_path / "relay.pem"))
    raw["server"]["tls_key"] = str(tmp_path / "relay.key")
    for key in ("tls_cert", "tls_key"):
        if key != missing:
            Path(raw["server"][key]).write_text("not read by the config check")
    assert problems_of(raw) == [f"server.{missing}: no such file"]


def test_tls_cert_without_key_is_refused(tmp_path: Path) -> None:
    """tls_cert and tls_key go together: one alone is a config error on server.tls_key."""
    cert = tmp_path / "relay.pem"
    cert.write_text("not checked here")
    raw = shipped_raw(("server",), "tls_cert", str(cert))
    assert problems_of(raw) == ["server.tls_key: tls_cert and tls_key go together"]


def test_hardening_keys_parse() -> None:
    """Good values of every hardening key land in the config as typed values."""
    raw = shipped_raw(("server",), "trusted_proxies", ["10.0.0.0/8", "::1"])
    raw["server"].update(
        keepalive_timeout_s=5, body_timeout_s=2.5, max_header_bytes=4096, max_headers=32
    )
    raw["server"]["require_https"] = True
    raw["sources"]["polar"]["allow_ips"] = ["192.0.2.0/24"]
    raw["admin"] = {"listen": "[::1]:9090", "token": "${RELAY_ADMIN_TOKEN}"}
    raw["log"]["redact"] = ["data.customer.email", "data.items[0].name"]

    config = parse(raw, env(RELAY_ADMIN_TOKEN=ADMIN_TOKEN))

    s = config.server
    assert (s.keepalive_timeout_s, s.body_timeout_s, s.max_header_bytes, s.max_headers) == (
        5.0,
        2.5,
        4096,
        32,
    )
    assert s.require_https is True
    assert [str(n) for n in s.trusted_proxies] == ["10.0.0.0/8", "::1/128"]
    assert [str(n) for n in config.sources["polar"].allow_ips] == ["192.0.2.0/24"]
    assert config.admin.host_port == ("::1", 9090)
    assert config.admin.token == Secret(ADMIN_TOKEN)
    assert ADMIN_TOKEN not in repr(config)
    assert config.log.redact == (("data", "customer", "email"), ("data", "items", 0, "name"))


def test_admin_token_variable_must_be_set() -> None:
    """admin.token = "${RELAY_ADMIN_TOKEN}" with the variable unset names the variable and the
    key, like every other required variable."""
    raw = shipped_raw(("admin",), "token", "${RELAY_ADMIN_TOKEN}")
    assert problems_of(raw) == [
        "environment variable RELAY_ADMIN_TOKEN is not set or empty (needed by admin.token)"
    ]


# ---------------------------------------------------------------- the real `relay serve`


def config_copy(tmp_path: Path, *, server: str = "", tail: str = "") -> Path:
    """The shipped relay.toml with lines added to [server] and tables appended."""
    assert SHIPPED_TEXT.count("[server]\n") == 1
    text = SHIPPED_TEXT.replace("[server]\n", f"[server]\n{server}\n", 1)
    path = tmp_path / "relay.test.toml"
    path.write_text(f"{text}\n{tail}\n", encoding="utf-8")
    tomllib.loads(path.read_text(encoding="utf-8"))  # still TOML
    return path


@pytest.fixture
def start_relay(
    faurya: FakeFaurya, relay_processes: RelayProcesses
) -> Callable[..., Awaitable[RelayProcess]]:
    """Starts `relay serve` subprocesses on the test database (`relay_processes` kills and
    reaps them)."""

    async def start(config: Path, **variables: str) -> RelayProcess:
        return await relay_processes.new(config, faurya.url, **variables).start()

    return start


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


def sample(text: str, name: str, labels: dict[str, str]) -> float:
    """One sample of a scraped /metrics text (0 when absent)."""
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                return float(s.value)
    return 0.0


async def scrape(http: aiohttp.ClientSession, url: str) -> str:
    async with http.get(f"{url}/metrics") as resp:
        assert resp.status == 200
        return await resp.text()


def make_certificate(directory: Path) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and localhost, and its key."""
    cert, key = directory / "relay.pem", directory / "relay.key"
    openssl = shutil.which("openssl")
    if openssl is None:
        pytest.skip("no openssl command to make a test certificate")
    import subprocess

    subprocess.run(
        [
            openssl,
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-subj",
            "/CN=localhost",
            "-days",
            "1",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
            str(key),
            "-out",
            str(cert),
        ],
        check=True,
        capture_output=True,
    )
    return cert, key


@pytest.mark.e2e
async def test_serves_https_with_the_configured_certificate(
    tmp_path: Path,
    start_relay: StartRelay,
    http: aiohttp.ClientSession,
    faurya: FakeFaurya,
    db_path: Path,
) -> None:
    """With tls_cert and tls_key the relay speaks HTTPS only: a signed webhook over TLS is
    accepted and delivered, and plain HTTP to the same port gets no answer."""
    cert, key = make_certificate(tmp_path)
    config = config_copy(tmp_path, server=f'tls_cert = "{cert}"\ntls_key = "{key}"')
    relay = await start_relay(config)
    assert relay.logged("relay_listening")[0]["tls"] is True
    trusting = ssl.create_default_context(cafile=str(cert))
    body = order_paid()

    url = f"https://127.0.0.1:{relay.port}{PATH}"
    async with http.post(url, data=body, headers=sign_headers(body), ssl=trusting) as resp:
        assert resp.status == 202, await resp.text()
    [call] = await faurya.wait_for(1)
    assert call.headers["x-faurya-site-id"] == SITE_ID
    assert rows(db_path) == (1, 1)

    with pytest.raises(aiohttp.ClientError):
        async with asyncio.timeout(15):
            await http.get(f"{relay.url}/healthz")
    # A client that does not trust the certificate refuses the connection.
    with pytest.raises(aiohttp.ClientConnectorCertificateError):
        await http.get(f"https://127.0.0.1:{relay.port}/healthz")
    async with http.get(f"https://127.0.0.1:{relay.port}/healthz", ssl=trusting) as resp:
        assert resp.status == 200


@pytest.mark.e2e
async def test_check_rejects_a_missing_certificate(tmp_path: Path, faurya: FakeFaurya) -> None:
    """`relay check` refuses a tls_cert that does not exist, naming server.tls_cert, exit 2."""
    _, key = make_certificate(tmp_path)
    missing = tmp_path / "missing.pem"
    config = config_copy(tmp_path, server=f'tls_cert = "{missing}"\ntls_key = "{key}"')
    proc = await asyncio.create_subprocess_exec(
        relay_command(),
        "check",
        "--config",
        str(config),
        env=process_env(**env(FAURYA_URL=faurya.url)),
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )
    out, err = await asyncio.wait_for(proc.communicate(), 15)
    assert proc.returncode == 2, (out, err)
    assert err.decode() == "relay: config error: server.tls_cert: no such file\n"
    assert out == b""


@pytest.mark.e2e
async def test_admin_listener_serves_metrics_apart(
    tmp_path: Path, start_relay: StartRelay, http: aiohttp.ClientSession
) -> None:
    """The shipped config serves /metrics on the admin listener only (404 on the webhook
    port), and the admin port also answers the health checks."""
    relay = await start_relay(config_copy(tmp_path))
    listening = relay.logged("relay_listening")[0]
    admin = relay.admin_url
    assert listening["admin_port"] not in (0, relay.port)
    assert listening["admin_host"] == "127.0.0.1"

    async with http.get(f"{relay.url}/metrics") as resp:
        assert resp.status == 404
    text = await scrape(http, admin)
    assert sample(text, "relay_ready", {}) == 1
    for path in ("/healthz", "/readyz"):
        async with http.get(f"{admin}{path}") as resp:
            assert resp.status == 200, path
        async with http.get(f"{relay.url}{path}") as resp:
            assert resp.status == 200, path


@pytest.mark.e2e
async def test_serve_refuses_an_open_admin_listener_without_a_token(
    tmp_path: Path, faurya: FakeFaurya, db_path: Path
) -> None:
    """`relay serve` with RELAY_ADMIN_LISTEN=0.0.0.0:... and no RELAY_ADMIN_TOKEN stops at
    once with a one-line config error naming admin.listen, exit 2, nothing listening."""
    environ = process_env(**env(FAURYA_URL=faurya.url, RELAY_ADMIN_LISTEN="0.0.0.0:0"))
    relay = RelayProcess(config_copy(tmp_path), db_path, environ)
    await relay.launch()
    code = await relay.wait(15)

    assert code == 2
    assert relay.lines == [
        "relay: config error: admin.listen: 0.0.0.0:0 is not a loopback address, so "
        "admin.token (RELAY_ADMIN_TOKEN) is required"
    ]


@pytest.mark.e2e
async def test_admin_token_guards_metrics_and_is_never_logged(
    tmp_path: Path, start_relay: StartRelay, http: aiohttp.ClientSession
) -> None:
    """With admin.token from the environment, the admin /metrics answers 401 without the
    bearer token or with a wrong one and 200 with it; the token appears in no log line."""
    relay = await start_relay(config_copy(tmp_path), RELAY_ADMIN_TOKEN=ADMIN_TOKEN)
    admin = relay.admin_url

    for headers in ({}, {"authorization": "Bearer wrong"}, {"authorization": ADMIN_TOKEN}):
        async with http.get(f"{admin}/metrics", headers=headers) as resp:
            assert resp.status == 401, headers
            assert ADMIN_TOKEN not in await resp.text()
    good = {"authorization": f"Bearer {ADMIN_TOKEN}"}
    async with http.get(f"{admin}/metrics", headers=good) as resp:
        assert resp.status == 200
        assert "relay_webhooks_received_total" in await resp.text()
    async with http.get(f"{admin}/healthz") as resp:
        assert resp.status == 200

    assert await relay.signal(15) == 0
    assert relay.logged("relay_stopped")
    assert [line for line in relay.lines if ADMIN_TOKEN in line] == []


# ---------------------------------------------------------------- slow and oversized clients

SLOW = "keepalive_timeout_s = 1\nbody_timeout_s = 1\nmax_header_bytes = 1024\nmax_headers = 16"


def request_head(port: int, body: bytes, extra: list[str] | None = None) -> bytes:
    lines = [f"POST {PATH} HTTP/1.1", f"Host: 127.0.0.1:{port}"]
    lines += [f"{k}: {v}" for k, v in sign_headers(body).items()]
    lines += [f"Content-Length: {len(body)}", *(extra or [])]
    return ("\r\n".join(lines) + "\r\n\r\n").encode()


@pytest.mark.e2e
async def test_a_client_that_never_finishes_its_headers_is_disconnected(
    tmp_path: Path, start_relay: StartRelay, db_path: Path
) -> None:
    """A connection that sends part of its request headers and then nothing is closed by the
    relay after keepalive_timeout_s (1 s here), without an answer."""
    relay = await start_relay(config_copy(tmp_path, server=SLOW))

    # From before connecting: the relay's timer starts no earlier than the connection.
    started = time.monotonic()
    async with raw_connection(relay.port) as (reader, writer):
        writer.write(f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Len".encode())
        await writer.drain()
        async with asyncio.timeout(9):
            answer = await reader.read()
        waited = time.monotonic() - started

    assert answer == b""
    # After keepalive_timeout_s (1 s), well before the default 15 s; wide for a loaded machine.
    assert 0.5 < waited < 8
    assert rows(db_path) == (0, 0)


@pytest.mark.e2e
@pytest.mark.parametrize("sent_fraction", [0.0, 0.5])
async def test_a_slow_body_gets_408_and_nothing_is_stored(
    tmp_path: Path,
    start_relay: StartRelay,
    http: aiohttp.ClientSession,
    db_path: Path,
    sent_fraction: float,
) -> None:
    """Full headers with Content-Length, then only part of the body (or none): the relay
    answers 408 after body_timeout_s (1 s here), stores nothing, logs webhook_body_timeout
    and counts the outcome timeout."""
    relay = await start_relay(config_copy(tmp_path, server=SLOW))
    body = order_paid()

    sent = request_head(relay.port, body) + body[: int(len(body) * sent_fraction)]
    status_line, waited = await status_line_after(relay.port, sent, timeout_s=9)

    assert status_line.startswith(b"HTTP/1.1 408 "), status_line
    # After body_timeout_s (1 s), well before the default 10 s; wide for a loaded machine.
    assert 0.5 < waited < 8
    entry = await relay.wait_log("webhook_body_timeout")
    assert entry["timeout_s"] == 1
    assert rows(db_path) == (0, 0)
    text = await scrape(http, relay.admin_url)
    labels = {"source": "polar", "outcome": "timeout"}
    assert sample(text, "relay_webhooks_received_total", labels) == 1


@pytest.mark.e2e
@pytest.mark.parametrize(
    "extra",
    [
        pytest.param([f"X-Padding: {'a' * 2000}"], id="header-line-too-long"),
        pytest.param([f"X-Filler-{n}: {n}" for n in range(40)], id="too-many-headers"),
    ],
)
async def test_oversized_headers_are_refused_and_the_relay_stays_healthy(
    tmp_path: Path,
    start_relay: StartRelay,
    http: aiohttp.ClientSession,
    db_path: Path,
    extra: list[str],
) -> None:
    """A header line longer than max_header_bytes, or more headers than max_headers, is
    refused with a 4xx before the handler runs; nothing is stored and the relay keeps
    serving (a signed webhook right after is accepted)."""
    relay = await start_relay(config_copy(tmp_path, server=SLOW))
    body = order_paid()

    sent = request_head(relay.port, body, extra) + body
    status_line, _ = await status_line_after(relay.port, sent, timeout_s=15)

    status = int(status_line.split()[1])
    assert 400 <= status < 500, status_line
    assert rows(db_path) == (0, 0)
    async with http.get(f"{relay.url}/readyz") as resp:
        assert resp.status == 200
    body = order_paid()
    async with http.post(f"{relay.url}{PATH}", data=body, headers=sign_headers(body)) as resp:
        assert resp.status == 202
    assert rows(db_path) == (1, 1)


@pytest.mark.e2e
async def test_the_running_relay_names_no_version_even_in_protocol_errors(
    tmp_path: Path, start_relay: StartRelay
) -> None:
    """`relay serve` says `Server: faurya-relay` on every answer, including those aiohttp
    makes before any app sees the request (a malformed request line): never Python's or
    aiohttp's version."""
    relay = await start_relay(config_copy(tmp_path))
    requests = [
        b"GARBAGE\r\n\r\n",
        f"GET /healthz HTTP/1.1\r\nHost: 127.0.0.1:{relay.port}\r\n\r\n".encode(),
    ]
    for port in (relay.port, relay.admin_port):
        for request in requests:
            async with raw_connection(port) as (reader, writer):
                writer.write(request)
                await writer.drain()
                async with asyncio.timeout(15):
                    head = await reader.readuntil(b"\r\n\r\n")
            assert b"\r\nServer: faurya-relay\r\n" in head, head
            assert b"aiohttp" not in head.lower()
            assert b"python" not in head.lower()


# ---------------------------------------------------------------- file permissions


@pytest.fixture
def umask_022() -> Iterator[None]:
    """The common default umask, under which files are created world-readable."""
    old = os.umask(0o022)
    try:
        yield
    finally:
        os.umask(old)


async def test_database_files_are_private_whatever_the_umask(
    tmp_path: Path, umask_022: None
) -> None:
    """Under umask 022, the directory the relay creates is 0700 and relay.db, -wal, -shm and
    .lock are 0600: raw webhook bodies (customer data) are readable by the relay's user only."""
    db = tmp_path / "new" / "dir" / "relay.db"
    store = await open_store(str(db), serve=True)
    try:
        await store.set_paused("faurya", True)  # a commit: the WAL and its index exist
        modes = {
            p.name: stat.S_IMODE(p.stat().st_mode)
            for p in db.parent.iterdir()
            if p.name.startswith("relay.db")
        }
    finally:
        await store.close()
    assert modes == {
        "relay.db": 0o600,
        "relay.db-wal": 0o600,
        "relay.db-shm": 0o600,
        "relay.db.lock": 0o600,
    }
    for directory in (db.parent, db.parent.parent):
        assert stat.S_IMODE(directory.stat().st_mode) == 0o700, directory


# ---------------------------------------------------------------- relay check warnings


@pytest.mark.e2e
async def test_check_warns_about_each_unsafe_setting_kept_on_purpose(tmp_path: Path) -> None:
    """`relay check` accepts (exit 0) but prints one `warning:` line per unsafe setting: an
    admin listener off loopback (token in clear text), trusted_proxies trusting everyone, and
    a database file others can read; the shipped config as is prints none."""
    db = tmp_path / "old.db"
    db.write_bytes(b"")
    db.chmod(0o644)
    config = config_copy(tmp_path, server='trusted_proxies = ["0.0.0.0/0"]')
    risky = process_env(
        **env(RELAY_ADMIN_LISTEN="0.0.0.0:9090", RELAY_ADMIN_TOKEN=ADMIN_TOKEN, RELAY_DB=str(db))
    )

    result = await run_command(relay_command(), "check", "--config", str(config), environ=risky)
    shipped = await run_command(
        relay_command(),
        "check",
        "--config",
        str(REPO / "relay.toml"),
        environ=process_env(**env(RELAY_DB=str(tmp_path / "new.db"))),
    )

    assert result.code == 0, result.err
    warnings = [line for line in result.out.splitlines() if line.startswith("warning: ")]
    assert [w.split(":")[1].strip() for w in warnings] == [
        "admin.listen",
        "server.trusted_proxies",
        "storage.path",
    ], warnings
    assert "admin token travels in clear text" in warnings[0]
    assert f"{db} is readable by other users (mode 0644)" in warnings[2]
    assert ADMIN_TOKEN not in result.out + result.err
    assert shipped.code == 0, shipped.err
    assert "warning:" not in shipped.out
    assert "admin: /metrics on 127.0.0.1:0" in shipped.out


# ---------------------------------------------------------------- /readyz costs no write


def probe_row(db_path: Path) -> str | None:
    """The value the store's probe write last left (its clock's time), or None."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        found = db.execute("SELECT value FROM relay_meta WHERE key = 'probe'").fetchone()
    return None if found is None else str(found[0])


async def test_a_readyz_flood_costs_no_write(
    aiohttp_client: AiohttpClient, config: Config, db_path: Path
) -> None:
    """224 /readyz calls, 32 at a time and the clock moving between rounds, right after a
    webhook's commit, are all answered 200 from that commit's success: the probe row, which
    each call used to rewrite with the time, changes at most once (a probe, if the flood took
    the machine over a second)."""
    clock = FakeClock(float(int(time.time())))
    client = await aiohttp_client(create_app(config, clock=clock, poll_interval_s=30))
    status, _ = await post_order(client)
    assert status == 202
    seen = [probe_row(db_path)]

    for _ in range(7):
        clock.advance(10)
        answers = await asyncio.gather(*(client.get("/readyz") for _ in range(32)))
        assert [a.status for a in answers] == [200] * 32
        seen.append(probe_row(db_path))

    assert len(set(seen)) <= 2, seen
    assert client.app[READINESS].probes <= 1


async def test_concurrent_readiness_checks_share_one_probe(tmp_path: Path) -> None:
    """Without a recent commit, 50 concurrent checks run one probe write between them; its
    success is trusted for max_age_s (1 s), then the next check probes again."""
    now = [1000.0]
    readiness = Readiness(clock=lambda: now[0])
    store = await open_store(str(tmp_path / "relay.db"), serve=True)
    try:
        answers = await asyncio.gather(*(readiness.store(store) for _ in range(50)))
        assert answers == ["ok"] * 50
        assert readiness.probes == 1
        now[0] += 0.9
        assert await readiness.store(store) == "ok"
        assert readiness.probes == 1
        now[0] += 0.2
        assert await readiness.store(store) == "ok"
        assert readiness.probes == 2
    finally:
        await store.close()


# ---------------------------------------------------------------- database URLs


def test_every_secret_query_parameter_of_a_database_url_is_masked() -> None:
    """The password in the userinfo, password=, sslpassword= and any parameter named like a
    secret are masked in the URL the relay logs and prints; the rest stays readable."""
    url = (
        "postgresql://relay:pw1@db.example:5432/relay?sslmode=verify-full"
        "&sslpassword=keypass2&password=pw3&application_name=relay&auth_token=tok4"
    )

    shown = _safe(url)

    assert shown == (
        "postgresql://relay:***@db.example:5432/relay?sslmode=verify-full"
        "&sslpassword=***&password=***&application_name=relay&auth_token=***"
    )


@pytest.mark.e2e
async def test_a_database_url_password_never_reaches_the_output(tmp_path: Path) -> None:
    """`relay migrate` with a PostgreSQL URL it cannot reach says so in one line, exit 1,
    with sslpassword= and the userinfo password masked."""
    url = "postgresql://relay:pw1@127.0.0.1:1/relay?sslmode=disable&sslpassword=keypass2"

    result = await run_command(relay_command(), "migrate", "--db", url, environ=process_env())

    assert result.code == 1
    assert result.err.startswith(
        "relay: error: cannot open database "
        "postgresql://relay:***@127.0.0.1:1/relay?sslmode=disable&sslpassword=***: "
    )
    assert "keypass2" not in result.out + result.err
    assert "pw1" not in result.out + result.err


@pytest.mark.parametrize(
    ("url", "warned"),
    [
        ("postgresql://relay@db.example/relay", True),
        ("postgresql://relay@db.example/relay?sslmode=require", True),
        ("postgresql://relay@10.0.0.5/relay?sslmode=verify-ca", True),
        ("postgresql://relay@db.example/relay?sslmode=verify-full", False),
        ("postgresql://relay@127.0.0.1:5432/relay", False),
        ("postgresql://relay@localhost/relay", False),
        ("postgresql:///relay?host=/var/run/postgresql", False),
    ],
)
def test_check_warns_when_postgres_off_loopback_does_not_verify_the_server(
    url: str, warned: bool
) -> None:
    """A PostgreSQL server reached over the network without sslmode=verify-full (certificate
    and host name checked) gets a storage.url warning; loopback and Unix sockets do not."""
    raw = tomllib.loads(SHIPPED_TEXT)
    raw["storage"]["url"] = url

    found = [w for w in hardening.warnings(parse(raw, env())) if w.startswith("storage.url")]

    assert bool(found) is warned
    assert all("sslmode=verify-full" in w for w in found)


@pytest.mark.e2e
async def test_a_busy_admin_port_is_a_one_line_error(
    tmp_path: Path, faurya: FakeFaurya, db_path: Path
) -> None:
    """The admin port taken (9090 is also Prometheus's): `relay serve` exits 2 (a
    configuration error) with one line naming admin.listen and RELAY_ADMIN_LISTEN, no
    traceback."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        busy = f"127.0.0.1:{taken.getsockname()[1]}"
        environ = process_env(**env(FAURYA_URL=faurya.url, RELAY_ADMIN_LISTEN=busy))
        relay = RelayProcess(config_copy(tmp_path), db_path, environ)
        await relay.launch()
        code = await relay.wait(15)

    assert code == 2
    assert relay.lines[-1] == (
        f"relay: config error: admin.listen: {busy} is already in use (another process listens "
        "there); change it with RELAY_ADMIN_LISTEN (admin.listen)"
    )
    assert not [line for line in relay.lines if "Traceback" in line]
