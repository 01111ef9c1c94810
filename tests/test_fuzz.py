"""Fuzzing POST /webhooks/polar on the real app with hypothesis.

Whatever arrives (random bytes, JSON of any shape with NaN and huge numbers, signed bodies
mutated after signing, garbage and unicode in every header) the relay answers with a 4xx or a
202, never a 5xx while its store is healthy, stores an event only when the signature was valid,
and is still ready afterwards. One relay serves all examples of a test; every example counts
the stored events before and after itself with sqlite3.
"""

from __future__ import annotations

import base64
import contextlib
import dataclasses
import json
import sqlite3
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pytest_aiohttp import AiohttpClient

from relay.access import parse_networks
from relay.app import create_app
from relay.config import Config
from tests.helpers import (
    LEGACY_SECRET,
    STANDARD_SECRET,
    Client,
    fixture_body,
    order_paid,
    sign_headers,
)

PATH = "/webhooks/polar"
WRONG_SECRET = "polar_whs_FuzzFuzzFuzzFuzzFuzzFuzzFuzz000"
SIGNATURE_HEADERS = ("webhook-id", "webhook-timestamp", "webhook-signature")

FUZZ = settings(
    deadline=None,
    max_examples=200,
    # One relay for all examples is the point (it must survive them all); each example
    # asserts on differences only.
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


def stored_events(db_path: Path) -> int:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        return int(db.execute("SELECT COUNT(*) FROM inbound_events").fetchone()[0])


def is_event(body: bytes) -> bool:
    """What the relay takes after the signature: a JSON object with a string "type"."""
    try:
        event = json.loads(body)
    except (ValueError, RecursionError):
        return False
    return isinstance(event, dict) and isinstance(event.get("type"), str)


@pytest.fixture
async def fuzzed(aiohttp_client: AiohttpClient, config: Config) -> AsyncIterator[Client]:
    """The relay every example of a test talks to; after the last one it must still be
    ready (its store takes writes)."""
    client = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    yield client
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()


async def post(
    client: Client, db_path: Path, body: bytes, headers: dict[str, str]
) -> tuple[int, int, Any]:
    """POST one webhook: (status, events stored by it, JSON answer)."""
    before = stored_events(db_path)
    resp = await client.post(PATH, data=body, headers=headers)
    answer = await resp.json() if resp.content_type == "application/json" else await resp.text()
    return resp.status, stored_events(db_path) - before, answer


def check(status: int, added: int, answer: Any, *, signed: bool, body: bytes) -> None:
    """The invariants of every example."""
    assert status < 500, answer
    if not signed:
        assert (status, added) == (401, 0), answer
    elif is_event(body):
        assert status == 202, answer
        # Every new webhook-id is recorded, even when its messages were all sent before
        # (status "duplicate"); a webhook-id seen before is not (no event_id).
        assert added == (0 if answer["event_id"] is None else 1), answer
    else:
        assert (status, added) == (400, 0), answer


# ---------------------------------------------------------------- strategies

# Header text as an HTTP client can send it: no control characters but tab, any unicode.
# Header text as an HTTP client can send it: no control characters but tab, any unicode.
header_char = st.characters(blacklist_categories=("Cc", "Cs")) | st.sampled_from(["\t", " ", ","])
header_text = st.text(header_char, max_size=60)
long_header_text = st.text(header_char, min_size=60, max_size=400)
numberish = st.one_of(
    st.integers(min_value=-(10**40), max_value=10**40).map(str),
    st.sampled_from(
        [
            "",
            "0",
            "-1",
            "1e9",
            "999999999999",  # 12 digits: past year 9999
            "99999999999999999999999",
            "\u0661\u0667" + "\u0660" * 8,  # 1700000000 in Arabic-Indic digits
            "\uff11\uff17" + "\uff10" * 8,  # ... in fullwidth digits
            " 1700000000",
            "1700000000,1700000000",
            "0x1F",
        ]
    ),
)
signature_entry = st.one_of(
    st.just("v1,"),
    st.sampled_from(["v1", "v2,abc=", ",", "v1,,", "v1,====", "v1a,AAAA"]),
    st.binary(max_size=64).map(lambda b: "v1," + base64.b64encode(b).decode()),
    header_text.map(lambda t: "v1," + t),
)
garbage = {
    "webhook-id": st.one_of(header_text, long_header_text, st.just("msg_" + "x" * 257)),
    "webhook-timestamp": st.one_of(numberish, header_text),
    "webhook-signature": st.one_of(
        st.lists(signature_entry, max_size=6).map(" ".join), header_text, st.just("v1," * 2000)
    ),
}

special_numbers = st.sampled_from(
    [
        float("nan"),
        float("inf"),
        float("-inf"),
        1e308,
        -0.0,
        2**53 + 1,
        10**30,
        -(10**30),
        2**63,
        0.1,
    ]
)
json_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(),
    st.floats(),
    special_numbers,
    st.text(max_size=20),
    st.sampled_from(["usd", "USD", "xxx", "", " ", "[redacted]", "€", "0", "-1", "1e400"]),
)
json_value = st.recursive(
    json_leaf,
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=12), children, max_size=4)
    ),
    max_leaves=12,
)
event_types = st.one_of(
    st.sampled_from(["order.paid", "refund.created", "refund.updated", "order.created"]),
    st.text(max_size=30),
)
FIELDS = [
    ("type",),
    ("data",),
    ("data", "id"),
    ("data", "net_amount"),
    ("data", "currency"),
    ("data", "status"),
    ("data", "amount"),
    ("data", "order_id"),
    ("data", "metadata"),
    ("data", "metadata", "orderId"),
    ("data", "metadata", "faVisitorId"),
    ("data", "metadata", "faSessionId"),
    ("data", "metadata", "faAttributionToken"),
]


def dumps(value: Any) -> bytes:
    # allow_nan: NaN and Infinity are what a fuzzer should send (Python's json reads them).
    return json.dumps(value, allow_nan=True, ensure_ascii=False).encode()


@st.composite
def mutated_event(draw: st.DrawFn) -> bytes:
    """A real Polar event (fresh ids) with some fields replaced by odd values."""
    name = draw(st.sampled_from(["order.paid.purchase.json", "refund.created.json"]))
    event = json.loads(fixture_body(name))
    event["data"]["id"] = str(uuid.uuid4())
    for path in draw(st.lists(st.sampled_from(FIELDS), max_size=4)):
        node = event
        for key in path[:-1]:
            if not isinstance(node, dict) or not isinstance(node.get(key), dict):
                break
            node = node[key]
        else:
            node[path[-1]] = draw(json_value)
    return dumps(event)


bodies = st.one_of(
    st.binary(max_size=512),
    st.text(max_size=200).map(str.encode),
    json_value.map(dumps),
    st.fixed_dictionaries({"type": event_types, "data": json_value}).map(dumps),
    mutated_event(),
    st.sampled_from(
        [
            b"",
            b"{}",
            b"[]",
            b"null",
            b'{"type": null}',
            b'{"type": "order.paid"}',
            b'{"type": "order.paid", "data": []}',
            b'{"type": "order.paid", "data": {"net_amount": ' + b"9" * 5000 + b"}}",
            b'{"type": "order.paid", "data": {"net_amount": 1e400, "currency": "usd"}}',
            b'{"type": "order.paid", "type": 5}',
            b"\xef\xbb\xbf{}",  # a UTF-8 byte order mark
            b'{"type": "order.paid", "data": ' * 2000,
        ]
    ),
)


@dataclass
class Attempt:
    body: bytes
    headers: dict[str, str]
    signed: bool  # a valid, fresh signature over exactly this body


def signed_headers(body: bytes, scheme: str, msg_id: str | None = None) -> dict[str, str]:
    secret = LEGACY_SECRET if scheme == "legacy" else STANDARD_SECRET
    return sign_headers(body, secret, scheme=scheme, msg_id=msg_id)


@st.composite
def attempts(draw: st.DrawFn) -> Attempt:
    """A body with valid, mismatched, mutated, missing or garbage signature headers."""
    body = draw(bodies)
    utf8 = True
    try:
        body.decode("utf-8")
    except UnicodeDecodeError:
        utf8 = False
    signable = body if utf8 else body.decode("utf-8", errors="replace").encode()
    scheme = draw(st.sampled_from(["legacy", "standard"]))
    # Now and then a webhook-id seen before: Polar's retries and redeliveries keep theirs.
    msg_id = draw(st.none() | st.sampled_from(["msg_fuzz_again_1", "msg_fuzz_again_2"]))
    valid = signed_headers(signable, scheme, msg_id)
    mode = draw(
        st.sampled_from(
            ["valid", "valid", "valid", "other_body", "wrong_secret", "stale", "missing", "garbage"]
        )
    )
    headers = dict(valid)
    if mode == "other_body":
        headers = signed_headers(signable + b" ", scheme)
    elif mode == "wrong_secret":
        headers = sign_headers(signable, WRONG_SECRET)
    elif mode == "stale":
        headers = sign_headers(signable, timestamp=int(time.time()) - 3600, scheme="legacy")
    elif mode == "missing":
        gone = draw(st.sets(st.sampled_from(SIGNATURE_HEADERS), min_size=1))
        headers = {k: v for k, v in headers.items() if k not in gone}
    elif mode == "garbage":
        for name in draw(st.sets(st.sampled_from(SIGNATURE_HEADERS), min_size=1)):
            headers[name] = draw(garbage[name])
    signed = utf8 and mode == "valid"
    if mode == "garbage":
        # A drawn value may be the valid one (or only differ by whitespace HTTP trims).
        signed = utf8 and all(headers[k].strip(" \t") == valid[k] for k in SIGNATURE_HEADERS)
    return Attempt(body, headers, signed)


# ---------------------------------------------------------------- the tests


@FUZZ
@given(attempt=attempts())
async def test_any_body_with_any_signature_headers(
    fuzzed: Client, db_path: Path, attempt: Attempt
) -> None:
    """Random bodies with valid, mismatched, stale, missing or garbage signature headers: a
    valid signature gives 202 (stored) or 400 (not an event), anything else 401 and nothing
    stored; never a 5xx."""
    status, added, answer = await post(fuzzed, db_path, attempt.body, attempt.headers)
    event(f"HTTP {status}")  # shown by --hypothesis-show-statistics
    check(status, added, answer, signed=attempt.signed, body=attempt.body)


@st.composite
def tampered(draw: st.DrawFn) -> tuple[bytes, dict[str, str]]:
    """A signed event whose body or signature was changed after signing."""
    body = draw(st.one_of(mutated_event(), st.just(b'{"type":"order.paid"}')))
    headers = signed_headers(body, draw(st.sampled_from(["legacy", "standard"])))
    how = draw(st.sampled_from(["flip", "truncate", "append", "splice", "signature"]))
    if how == "flip":
        i = draw(st.integers(0, len(body) - 1))
        mask = draw(st.integers(1, 255))
        body = body[:i] + bytes([body[i] ^ mask]) + body[i + 1 :]
    elif how == "truncate":
        body = body[: draw(st.integers(0, len(body) - 1))]
    elif how == "append":
        body += draw(st.binary(min_size=1, max_size=32) | st.sampled_from([b" ", b"\n", b"\x00"]))
    elif how == "splice":
        i = draw(st.integers(0, len(body)))
        body = body[:i] + draw(st.binary(min_size=1, max_size=8)) + body[i:]
    else:
        version, _, value = headers["webhook-signature"].partition(",")
        i = draw(st.integers(0, 39))  # a full 6-bit symbol: any change changes the HMAC
        new = draw(
            st.sampled_from("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz+/!").filter(
                lambda c: c != value[i]
            )
        )
        headers["webhook-signature"] = f"{version},{value[:i]}{new}{value[i + 1 :]}"
    return body, headers


@FUZZ
@given(case=tampered())
async def test_a_body_or_signature_changed_after_signing_is_refused(
    fuzzed: Client, db_path: Path, case: tuple[bytes, dict[str, str]]
) -> None:
    """Any byte flipped, cut, appended or inserted after signing, or any symbol of the
    signature changed, gives 401 and stores nothing."""
    body, headers = case
    status, added, answer = await post(fuzzed, db_path, body, headers)
    event(f"HTTP {status}")
    check(status, added, answer, signed=False, body=body)


OTHER_HEADERS = (
    "x-request-id",
    "user-agent",
    "content-type",
    "webhook-api-version",
    "forwarded",
    "x-real-ip",
)
hops = st.one_of(
    st.sampled_from(["203.0.113.7", "127.0.0.1", "::ffff:203.0.113.9", "198.51.100.1"]),
    st.sampled_from(["unknown", "", " ", "203.0.113.7:443", "[2001:db8::1]", "fe80::1%eth0"]),
    st.ip_addresses().map(str),
    header_text,
)
forwarded_for = st.lists(hops, max_size=5).map(", ".join)
forwarded_proto = st.one_of(
    st.sampled_from(["https", "http", " HTTPS ", "http, https", "https, http", "https,"]),
    header_text,
)


@pytest.fixture
async def guarded(aiohttp_client: AiohttpClient, config: Config) -> AsyncIterator[Client]:
    """A relay behind a trusted loopback proxy, taking only 203.0.113.0/24 over HTTPS."""
    server = dataclasses.replace(
        config.server, require_https=True, trusted_proxies=parse_networks(["127.0.0.1/32"])
    )
    source = dataclasses.replace(
        config.sources["polar"], allow_ips=parse_networks(["203.0.113.0/24"])
    )
    config = dataclasses.replace(config, server=server, sources={"polar": source})
    client = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    yield client
    resp = await client.get("/readyz")
    assert resp.status == 200, await resp.text()


def stored_request_ids(db_path: Path) -> list[str]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        rows = db.execute("SELECT request_id FROM inbound_events ORDER BY id DESC LIMIT 1")
        return [row[0] for row in rows]


@FUZZ
@given(
    # Half the time the proxy's own word (the last hop, the last proto) would let it in.
    xff=st.none() | forwarded_for | forwarded_for.map(lambda hops: f"{hops}, 203.0.113.7"),
    proto=st.none() | forwarded_proto | forwarded_proto.map(lambda p: f"{p}, https"),
    extra=st.dictionaries(
        st.sampled_from(OTHER_HEADERS), st.one_of(header_text, numberish, long_header_text)
    ),
)
async def test_any_other_header_value_behind_a_trusted_proxy(
    guarded: Client, db_path: Path, xff: str | None, proto: str | None, extra: dict[str, str]
) -> None:
    """Correctly signed events with random forwarding, request-id and other header values:
    403 or 202, stored (with the request id as sent, cut to 64 characters) only when 202,
    never a 5xx."""
    body = order_paid()
    headers = {**extra, **signed_headers(body, "legacy")}
    if xff is not None:
        headers["x-forwarded-for"] = xff
    if proto is not None:
        headers["x-forwarded-proto"] = proto

    status, added, answer = await post(guarded, db_path, body, headers)

    event(f"HTTP {status}")
    assert status in (202, 403), answer
    assert added == (1 if status == 202 else 0)
    if status == 202:
        # Only a trusted proxy's word gets it in: a hop in the allowed network, and https.
        assert "203.0.113." in (xff or ""), headers
        assert (proto or "").split(",")[-1].strip().lower() == "https", headers
        [request_id] = stored_request_ids(db_path)
        sent = extra.get("x-request-id", "").strip(" \t")[:64]
        assert request_id == sent or (not sent and len(request_id) == 16), headers


# ---------------------------------------------------------------- edge cases, every run

DEEP = 500  # deep, but json.loads still reads it


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b'{"type": "order.paid", "data": ' * 2000, id="deep-unterminated"),
        pytest.param(b'{"a":' * 5000 + b"1" + b"}" * 5000, id="deep-objects"),
        pytest.param(b"[" * 100_000 + b"]" * 100_000, id="deep-arrays"),
        pytest.param(
            b'{"type":"order.paid","data":' + b'{"a":' * DEEP + b"1" + b"}" * (DEEP + 1),
            id="deep-but-readable",
        ),
        pytest.param(
            b'{"type":"order.paid","data":{"net_amount":' + b"9" * 5000 + b"}}",
            id="5000-digit-int",
        ),
        pytest.param(
            b'{"type":"order.paid","data":{"id":"x","net_amount":NaN,"currency":"usd"}}',
            id="nan",
        ),
        pytest.param(
            b'{"type":"order.paid","data":{"id":"x","net_amount":1e400,"currency":"usd"}}',
            id="overflowing-float",
        ),
        pytest.param(b'\xef\xbb\xbf{"type":"order.paid"}', id="byte-order-mark"),
        pytest.param(b'{"type":"order.paid","type":5}', id="duplicate-key"),
    ],
)
@pytest.mark.parametrize("redacting", [False, True])
async def test_odd_but_signed_bodies(
    aiohttp_client: AiohttpClient, config: Config, db_path: Path, body: bytes, redacting: bool
) -> None:
    """Correctly signed bodies at the edges of JSON (nesting deeper than the parser takes,
    numbers too big for it, NaN, a byte order mark) get 202 or 400, never a 5xx, with and
    without log.redact (which re-encodes the stored body)."""
    if redacting:
        redact = (("data", "customer", "email"), ("data", "a"))
        config = dataclasses.replace(config, log=dataclasses.replace(config.log, redact=redact))
    client = await aiohttp_client(create_app(config, poll_interval_s=0.05))

    status, added, answer = await post(client, db_path, body, signed_headers(body, "legacy"))

    check(status, added, answer, signed=True, body=body)
    assert (await client.get("/readyz")).status == 200
