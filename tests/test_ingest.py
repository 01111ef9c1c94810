"""POST /webhooks/polar on the real app: what is answered, stored, logged and counted.

The relay runs on loopback with a real SQLite file; Faurya is the fake server of tests/helpers.
Row counts are read with sqlite3 straight from the database file, so they show what a restart
would find.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import sqlite3
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import pytest
from pytest_aiohttp import AiohttpClient

from relay.app import METRICS, STORE, WORKERS, create_app
from relay.config import Config
from relay.models import MessageStatus
from tests import helpers
from tests.helpers import (
    LEGACY_SECRET,
    STANDARD_SECRET,
    Client,
    FakeFaurya,
    LogList,
    admin_get,
    fixture_body,
    logged,
    order_paid,
    shipped_config,
    shipped_redaction,
    sign_headers,
    stored_form,
    wait_until,
)

MakeRelay = Callable[[Config], Awaitable[Client]]

PATH = "/webhooks/polar"
# A secret Polar no longer signs with, kept first in the list during a rotation.
RETIRED_SECRET = "polar_whs_RetiredRetiredRetired0000000000"
RETIRED_WHSEC = "whsec_" + "cmV0aXJlZC1rZXktbm8tbG9uZ2VyLXVzZWQtMDAwMDA="
SECRETS = (*helpers.SECRETS, RETIRED_SECRET, RETIRED_WHSEC)

pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events
LIMIT = 256 * 1024  # the shipped server.max_body_bytes


@pytest.fixture
def log_secrets() -> tuple[str, ...]:
    """No log event of a test here may hold one of these."""
    return SECRETS


@pytest.fixture
def make_relay(aiohttp_client: AiohttpClient) -> MakeRelay:
    async def make(config: Config) -> Client:
        return await aiohttp_client(create_app(config, poll_interval_s=0.05))

    return make


def rows(db_path: Path) -> tuple[int, int]:
    """(inbound events, outbound messages) committed to the database file."""
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        events = db.execute("SELECT COUNT(*) FROM inbound_events").fetchone()[0]
        messages = db.execute("SELECT COUNT(*) FROM outbound_messages").fetchone()[0]
    return int(events), int(messages)


def events_in(db_path: Path) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM inbound_events ORDER BY id").fetchall()


def messages_in(db_path: Path) -> list[sqlite3.Row]:
    with contextlib.closing(sqlite3.connect(db_path)) as db:
        db.row_factory = sqlite3.Row
        return db.execute("SELECT * FROM outbound_messages ORDER BY id").fetchall()


def received(client: Client, outcome: str, event_type: str = "order.paid") -> float:
    """relay_webhooks_received_total for the polar source (0 when never incremented)."""
    labels = {"source": "polar", "event_type": event_type, "outcome": outcome}
    value = client.app[METRICS].registry.get_sample_value("relay_webhooks_received_total", labels)
    return value or 0.0


async def post(client: Client, body: bytes, headers: dict[str, str]) -> tuple[int, Any]:
    resp = await client.post(PATH, data=body, headers=headers)
    assert resp.content_type == "application/json"
    return resp.status, await resp.json()


# ---------------------------------------------------------------- accepted


@pytest.mark.parametrize(
    ("secrets", "signer", "scheme"),
    [
        pytest.param(None, LEGACY_SECRET, "legacy", id="legacy-polar_whs"),
        pytest.param(None, STANDARD_SECRET, "standard", id="standard-whsec"),
        pytest.param(
            f"{RETIRED_SECRET},{LEGACY_SECRET}", LEGACY_SECRET, "legacy", id="rotated-legacy"
        ),
        pytest.param(
            f"{RETIRED_WHSEC}, {STANDARD_SECRET}", STANDARD_SECRET, "standard", id="rotated-whsec"
        ),
    ],
)
async def test_signed_order_paid_is_accepted_and_stored(
    make_relay: MakeRelay,
    faurya: FakeFaurya,
    db_path: Path,
    logs: LogList,
    secrets: str | None,
    signer: str,
    scheme: str,
) -> None:
    """A signed order.paid (either key scheme, any configured secret) is committed with its
    message and answered 202 accepted."""
    overrides = {} if secrets is None else {"POLAR_WEBHOOK_SECRET": secrets}
    relay = await make_relay(shipped_config(faurya.url, db_path, **overrides))
    body = order_paid("5a6b7c8d-0000-4000-8000-000000000001")
    headers = sign_headers(body, signer, scheme=scheme, msg_id="msg_accept_1")

    status, answer = await post(relay, body, headers)

    assert status == 202
    assert answer["status"] == "accepted"
    assert answer["messages"] == 1
    [event] = events_in(db_path)
    assert (event["id"], event["source"], event["webhook_id"]) == (
        answer["event_id"],
        "polar",
        "msg_accept_1",
    )
    # Kept as read, less the customer PII the shipped relay.toml redacts.
    assert (event["event_type"], event["status"], bytes(event["body"])) == (
        "order.paid",
        "routed",
        stored_form(body, shipped_redaction()),
    )
    [message] = messages_in(db_path)
    assert message["event_id"] == event["id"]
    assert message["route"] == "polar-order-paid"
    assert message["idempotency_key"] == "polar:order:5a6b7c8d-0000-4000-8000-000000000001"
    assert received(relay, "accepted") == 1
    [entry] = logged(logs, "webhook_accepted")
    assert entry["event_id"] == event["id"]
    assert entry["message_ids"] == [message["id"]]


async def test_a_signed_webhook_with_an_undecodable_stored_header_is_accepted(
    make_relay: MakeRelay, faurya: FakeFaurya, db_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A header the relay keeps but no signature covers (User-Agent) with a byte that is not
    UTF-8 does not cost a verified webhook: it is committed and answered 202, the header kept
    escaped, instead of a 500 from the JSON encoder."""
    # The access log line would carry the surrogate into pytest's log capture, which xdist
    # cannot send between processes.
    monkeypatch.setattr(logging.getLogger("aiohttp.access"), "disabled", True)
    relay = await make_relay(shipped_config(faurya.url, db_path))
    body = order_paid("5a6b7c8d-0000-4000-8000-0000000000ff")
    signed = sign_headers(body, LEGACY_SECRET, msg_id="msg_odd_agent")
    head = "".join(
        f"{k}: {v}\r\n"
        for k, v in signed.items()
        if k.lower() not in ("user-agent", "content-type", "content-length")
    )
    request = (
        (
            f"POST {PATH} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n{head}"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        ).encode()
        + b"User-Agent: Polar\xff\r\n\r\n"
        + body
    )
    assert relay.server.port is not None

    async with helpers.raw_connection(relay.server.port) as (reader, writer):
        writer.write(request)
        await writer.drain()
        status_line = await reader.readline()

    assert status_line.startswith(b"HTTP/1.1 202"), status_line
    [event] = events_in(db_path)
    assert event["webhook_id"] == "msg_odd_agent"
    assert json.loads(event["headers_json"])["user-agent"] == "Polar\udcff"
    assert rows(db_path) == (1, 1)


async def test_a_signed_body_with_an_escaped_lone_surrogate_is_accepted(
    make_relay: MakeRelay, faurya: FakeFaurya, db_path: Path
) -> None:
    """JSON may escape a lone surrogate ("\\udcff"), which has no UTF-8 form: a signed webhook
    carrying one in a field the mapping does not read is committed and answered 202, its
    redacted copy stored escaped, not refused as malformed (which Polar would not retry)."""
    relay = await make_relay(shipped_config(faurya.url, db_path))
    body = order_paid("5a6b7c8d-0000-4000-8000-0000000000fe", note="odd \udcff")
    assert b"\\udcff" in body
    headers = sign_headers(body, LEGACY_SECRET, msg_id="msg_surrogate")

    status, answer = await post(relay, body, headers)

    assert (status, answer["status"], answer["messages"]) == (202, "accepted", 1)
    [event] = events_in(db_path)
    stored = json.loads(bytes(event["body"]))
    assert stored["data"]["metadata"]["note"] == "odd \udcff"
    assert rows(db_path) == (1, 1)


async def test_refund_is_enriched_from_the_recorded_purchase(
    relay: Client, db_path: Path, logs: LogList
) -> None:
    """A succeeded refund after its purchase carries the purchase's orderId and attribution,
    read from the outbox by the route's lookup, and is keyed by the refund id."""
    purchase = fixture_body("order.paid.purchase.json")
    refund = fixture_body("refund.created.json")

    assert (await post(relay, purchase, sign_headers(purchase)))[0] == 202
    status, answer = await post(relay, refund, sign_headers(refund))

    assert (status, answer["status"]) == (202, "accepted")
    _, refund_message = messages_in(db_path)
    assert refund_message["idempotency_key"] == "polar:refund:e7f4a5b6-9c0d-4e1f-a2b3-4d5e6f708192"
    body = json.loads(refund_message["body"])
    assert (body["event"], body["amount"], body["orderId"]) == ("refund", 2000, "ord_7Hq2kP9xL3")
    assert body["attribution"]["faSessionId"] == "s_81d0c4a2e9f7"
    assert received(relay, "accepted", "refund.created") == 1


@pytest.mark.parametrize(
    ("fixture", "event_type"),
    [
        ("order.created.purchase.json", "order.created"),
        ("order.refunded.partial.json", "order.refunded"),
    ],
)
async def test_signed_event_without_route_is_stored_as_ignored(
    relay: Client, db_path: Path, logs: LogList, fixture: str, event_type: str
) -> None:
    """A signed event no route selects gets 202 "ignored": stored for the record, no message."""
    body = fixture_body(fixture)

    status, answer = await post(relay, body, sign_headers(body))

    assert status == 202
    assert answer == {"status": "ignored", "event_id": answer["event_id"], "messages": 0}
    [event] = events_in(db_path)
    assert (event["event_type"], event["status"]) == (event_type, "ignored")
    assert messages_in(db_path) == []
    assert received(relay, "ignored", event_type) == 1
    assert logged(logs, "webhook_ignored")[0]["event_type"] == event_type


# ---------------------------------------------------------------- duplicates


async def test_same_webhook_id_twice_is_one_event_and_one_call(
    relay: Client, faurya: FakeFaurya, db_path: Path, logs: LogList
) -> None:
    """Polar's retry (same webhook-id) answers 202 "duplicate" and changes nothing."""
    body = order_paid()
    headers = sign_headers(body, msg_id="msg_retried")

    first = await post(relay, body, headers)
    second = await post(relay, body, headers)

    assert first[0] == second[0] == 202
    assert first[1]["status"] == "accepted"
    assert second[1] == {"status": "duplicate", "event_id": None, "messages": 0}
    await faurya.wait_for(1)
    await relay.app[WORKERS].run_until_idle()
    assert len(faurya.received) == 1
    assert rows(db_path) == (1, 1)
    assert received(relay, "accepted") == 1
    assert received(relay, "duplicate") == 1
    assert len(logged(logs, "webhook_duplicate")) == 1


async def test_same_order_under_new_webhook_id_is_sent_once(
    relay: Client, faurya: FakeFaurya, db_path: Path, logs: LogList
) -> None:
    """Another webhook for an order already enqueued answers "duplicate": one Faurya call."""
    body = order_paid("5a6b7c8d-0000-4000-8000-000000000002")

    first = await post(relay, body, sign_headers(body, msg_id="msg_first"))
    await faurya.wait_for(1)
    second = await post(relay, body, sign_headers(body, msg_id="msg_second"))
    await relay.app[WORKERS].run_until_idle()

    assert (first[0], first[1]["status"]) == (202, "accepted")
    assert (second[0], second[1]["status"], second[1]["messages"]) == (202, "duplicate", 0)
    assert len(faurya.received) == 1
    first_event, second_event = events_in(db_path)
    assert first_event["status"] == "routed"
    assert second_event["webhook_id"] == "msg_second"
    assert second_event["status"] == "duplicate"
    assert len(messages_in(db_path)) == 1
    assert received(relay, "duplicate") == 1
    [entry] = logged(logs, "webhook_duplicate")
    assert entry["duplicate_keys"] == ["polar:order:5a6b7c8d-0000-4000-8000-000000000002"]


# ---------------------------------------------------------------- rejected: 401


def _without(header: str) -> Callable[[bytes], dict[str, str]]:
    def make(body: bytes) -> dict[str, str]:
        headers = sign_headers(body)
        del headers[header]
        return headers

    return make


def _signature(value: str) -> Callable[[bytes], dict[str, str]]:
    def make(body: bytes) -> dict[str, str]:
        return {**sign_headers(body), "webhook-signature": value}

    return make


@pytest.mark.parametrize(
    ("make_headers", "outcome"),
    [
        pytest.param(lambda body: {"content-type": "application/json"}, "bad_signature", id="none"),
        pytest.param(_without("webhook-id"), "bad_signature", id="no-id"),
        pytest.param(_without("webhook-timestamp"), "bad_signature", id="no-timestamp"),
        pytest.param(_without("webhook-signature"), "bad_signature", id="no-signature"),
        pytest.param(_signature("v1"), "bad_signature", id="v1-without-comma"),
        pytest.param(_signature("v1,not*base64!"), "bad_signature", id="bad-base64"),
        pytest.param(_signature("v2,AAAA v1a,BBBB"), "bad_signature", id="no-v1-entry"),
        pytest.param(
            lambda body: sign_headers(body, "polar_whs_SomeoneElsesSecret00000000000"),
            "bad_signature",
            id="wrong-secret",
        ),
        pytest.param(
            lambda body: sign_headers(body, RETIRED_WHSEC, scheme="standard"),
            "bad_signature",
            id="wrong-whsec",
        ),
        pytest.param(
            lambda body: sign_headers(body, timestamp=int(time.time()) - 301),
            "stale_timestamp",
            id="stale",
        ),
        pytest.param(
            lambda body: sign_headers(body, timestamp=int(time.time()) + 400),
            "stale_timestamp",
            id="from-the-future",
        ),
    ],
)
async def test_unverified_webhook_is_401_and_stores_nothing(
    relay: Client,
    db_path: Path,
    logs: LogList,
    make_headers: Callable[[bytes], dict[str, str]],
    outcome: str,
) -> None:
    """A request whose signature headers are missing, malformed, wrong or stale gets 401 and
    leaves only a log line and a counter."""
    body = order_paid()

    status, answer = await post(relay, body, make_headers(body))

    assert status == 401
    assert answer == {"error": "invalid signature"}  # the same for every failure
    assert rows(db_path) == (0, 0)
    [entry] = logged(logs, "signature_rejected")
    assert entry["outcome"] == outcome
    assert entry["reason"]
    assert received(relay, outcome, "unknown") == 1
    other = "stale_timestamp" if outcome == "bad_signature" else "bad_signature"
    assert received(relay, other, "unknown") == 0


async def test_a_stale_genuine_webhook_and_a_forgery_get_the_same_401(relay: Client) -> None:
    """A captured genuine webhook replayed after the tolerance and a forged one get
    byte-identical 401 answers (headers aside from Date), so an outsider cannot use the relay
    to tell a genuine capture from a forgery."""
    body = order_paid()
    stale = sign_headers(body, timestamp=int(time.time()) - 3600)
    forged = sign_headers(body, "polar_whs_SomeoneElsesSecret00000000000")

    answers = []
    for headers in (stale, forged):
        resp = await relay.post(PATH, data=body, headers=headers)
        answers.append((resp.status, await resp.read(), resp.headers.get("Server")))

    assert answers[0] == answers[1]
    assert answers[0][0] == 401
    assert received(relay, "stale_timestamp", "unknown") == 1
    assert received(relay, "bad_signature", "unknown") == 1


@pytest.mark.parametrize(
    ("method", "path"),
    [("POST", PATH), ("GET", "/healthz"), ("GET", "/readyz"), ("GET", "/nope"), ("PUT", PATH)],
)
async def test_no_version_in_the_server_header(relay: Client, method: str, path: str) -> None:
    """Every answer of the relay, 2xx, 4xx or 404, says `Server: faurya-relay` and names no
    Python or aiohttp version."""
    resp = await relay.request(method, path, data=b"{}")

    assert resp.headers["Server"] == "faurya-relay"
    admin = await admin_get(relay, path)
    assert admin.headers["Server"] == "faurya-relay"


# ---------------------------------------------------------------- rejected: 400


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"not json at all", id="not-json"),
        pytest.param(b'[{"type": "order.paid"}]', id="array"),
        pytest.param(b'{"data": {}}', id="no-type"),
        pytest.param(b'{"type": 42, "data": {}}', id="type-not-string"),
        pytest.param(b'"order.paid"', id="json-string"),
    ],
)
async def test_signed_body_that_is_not_an_event_is_400(
    relay: Client, db_path: Path, logs: LogList, body: bytes
) -> None:
    """A correctly signed body that is not a JSON object with a string type gets 400 and
    stores nothing."""
    status, answer = await post(relay, body, sign_headers(body))

    assert status == 400
    assert "type" in answer["error"]
    assert rows(db_path) == (0, 0)
    [entry] = logged(logs, "webhook_malformed")
    assert entry["body_bytes"] == len(body)
    assert received(relay, "malformed", "unknown") == 1


# ---------------------------------------------------------------- rejected: 413


def _padded(size: int) -> bytes:
    """A valid order.paid JSON body of exactly `size` bytes (trailing whitespace)."""
    body = order_paid()
    assert len(body) <= size
    return body + b" " * (size - len(body))


async def _chunked(body: bytes) -> AsyncIterator[bytes]:
    for start in range(0, len(body), 64 * 1024):
        yield body[start : start + 64 * 1024]


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_over_the_limit_is_413_and_stores_nothing(
    relay: Client, db_path: Path, logs: LogList, chunked: bool
) -> None:
    """A body larger than max_body_bytes gets 413, whether announced or streamed, even when
    correctly signed."""
    body = _padded(LIMIT + 1)
    headers = sign_headers(body)

    resp = await relay.post(PATH, data=_chunked(body) if chunked else body, headers=headers)

    assert resp.status == 413
    assert "262144" in (await resp.json())["error"]
    assert rows(db_path) == (0, 0)
    [entry] = logged(logs, "webhook_too_large")
    assert entry["content_length"] == (None if chunked else LIMIT + 1)
    assert entry["limit_bytes"] == LIMIT
    assert received(relay, "too_large", "unknown") == 1


@pytest.mark.parametrize("chunked", [False, True], ids=["content-length", "chunked"])
async def test_body_of_exactly_the_limit_is_accepted(
    relay: Client, db_path: Path, chunked: bool
) -> None:
    """max_body_bytes is the largest body taken, not the first one refused."""
    body = _padded(LIMIT)
    headers = sign_headers(body)

    resp = await relay.post(PATH, data=_chunked(body) if chunked else body, headers=headers)

    assert resp.status == 202
    assert rows(db_path) == (1, 1)


# ---------------------------------------------------------------- unmappable


async def test_order_paid_without_amount_is_stored_as_unmappable(
    relay: Client, db_path: Path, logs: LogList
) -> None:
    """A verified order.paid the route cannot map is kept (202, status unmappable, with the
    reason) instead of being sent or refused."""
    event = json.loads(order_paid())
    del event["data"]["net_amount"]
    body = json.dumps(event).encode()

    status, answer = await post(relay, body, sign_headers(body))

    assert status == 202
    assert answer["status"] == "accepted"
    assert answer["messages"] == 0
    assert "routes.polar-order-paid.body.amount" in answer["unmappable"]
    [row] = events_in(db_path)
    assert row["status"] == "unmappable"
    assert "routes.polar-order-paid.body.amount" in row["reason"]
    assert "data.net_amount" in row["reason"]
    assert messages_in(db_path) == []
    assert received(relay, "unmappable") == 1
    assert received(relay, "accepted") == 0
    [entry] = logged(logs, "webhook_unmappable")
    assert entry["reason"] == row["reason"]
    assert entry["outcome"] == "unmappable"


# ---------------------------------------------------------------- 503: the store cannot commit


async def test_locked_database_is_503_until_released(
    make_relay: MakeRelay, faurya: FakeFaurya, db_path: Path, logs: LogList
) -> None:
    """When the outbox cannot commit, the webhook gets 503 (nothing stored, /readyz 503); once
    the database is writable again /readyz is 200 and Polar's retry of it is accepted."""
    config = shipped_config(faurya.url, db_path)
    config = dataclasses.replace(
        config, storage=dataclasses.replace(config.storage, busy_timeout_ms=50)
    )
    relay = await make_relay(config)
    body = order_paid()
    headers = sign_headers(body, msg_id="msg_locked")
    locker = sqlite3.connect(db_path, isolation_level=None)
    try:
        locker.execute("BEGIN EXCLUSIVE")

        resp = await relay.post(PATH, data=body, headers=headers)
        ready = await relay.get("/readyz")

        assert resp.status == 503
        assert resp.headers["Retry-After"] == "5"
        assert "retry" in (await resp.json())["error"]
        assert ready.status == 503
        assert (await ready.json())["ready"] is False
        assert locker.execute("SELECT COUNT(*) FROM inbound_events").fetchone()[0] == 0
    finally:
        locker.execute("ROLLBACK")
        locker.close()
    assert rows(db_path) == (0, 0)
    # Ready again as soon as the database is writable, before any webhook proves it.
    assert (await relay.get("/readyz")).status == 200
    assert received(relay, "storage_error") == 1
    [entry] = logged(logs, "webhook_store_failed")
    assert entry["event_type"] == "order.paid"
    assert "locked" in entry["error"]

    status, answer = await post(relay, body, headers)

    assert (status, answer["status"]) == (202, "accepted")
    assert rows(db_path) == (1, 1)
    assert (await relay.get("/readyz")).status == 200


# ---------------------------------------------------------------- health and metrics


async def test_healthz_answers_200(relay: Client) -> None:
    """/healthz says the process is up."""
    resp = await relay.get("/healthz")

    assert resp.status == 200
    assert await resp.json() == {"status": "ok"}


async def test_metrics_text_has_the_relay_metrics_and_no_secret(
    relay: Client, faurya: FakeFaurya
) -> None:
    """/metrics serves the Prometheus text with ingest, backlog and delivery metrics and no
    secret value."""
    body = order_paid()
    assert (await relay.post(PATH, data=body, headers=sign_headers(body))).status == 202
    await faurya.wait_for(1)
    store = relay.app[STORE]

    async def delivered() -> bool:
        [message] = await store.list_messages()
        return message.status is MessageStatus.DELIVERED

    await wait_until(delivered)

    resp = await admin_get(relay)
    text = resp.text

    assert resp.status == 200
    assert resp.headers["Content-Type"].startswith("text/plain")
    assert (
        'relay_webhooks_received_total{event_type="order.paid",outcome="accepted",'
        'source="polar"} 1.0'
    ) in text
    assert 'relay_outbox_messages{destination="faurya",status="delivered"} 1.0' in text
    assert 'relay_outbox_messages{destination="faurya",status="pending"} 0.0' in text
    assert 'relay_outbox_oldest_pending_age_seconds{destination="faurya"} 0.0' in text
    assert 'relay_delivery_duration_seconds_count{destination="faurya"} 1.0' in text
    assert [s for s in SECRETS if s in text] == []
