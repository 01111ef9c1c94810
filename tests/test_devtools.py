"""The commands for trying the relay out, as a person runs them: `relay sign`, `relay map`,
`relay send`, `relay dev`, and `relay outbox events` after a short `relay serve`.

Each is the installed console script as a subprocess. Signatures are checked with the
standardwebhooks library itself; `relay send` and `relay outbox events` face a real
`relay serve` on loopback, and `relay dev` is read line by line as it prints.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import re
import signal
import socket
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from standardwebhooks.webhooks import Webhook, WebhookVerificationError

from relay.mapping import map_event
from relay.models import EventFilter, EventStatus, InboundDraft, MessageStatus
from relay.store import Store
from tests.helpers import (
    FIXTURES,
    LEGACY_SECRET,
    REPO,
    STANDARD_SECRET,
    WRITE_KEY,
    FakeFaurya,
    RelayProcess,
    Run,
    configured,
    fixture_body,
    metric,
    process_env,
    relay_command,
    run_relay,
    shipped_config,
    sign_headers,
)

pytestmark = pytest.mark.e2e

CONFIG = REPO / "relay.toml"
GOLDEN = Path(__file__).parent / "golden"
FAURYA_URL = "https://faurya.example"  # the golden files' destination origin
PURCHASE = FIXTURES / "order.paid.purchase.json"
PURCHASE_ORDER_ID = "b4c1f2e3-6d7a-4b8c-9e0f-1a2b3c4d5e6f"  # Polar's id in that fixture


relay = run_relay


def header_lines(text: str) -> dict[str, str]:
    """The `name: value` lines `relay sign` prints."""
    pairs = (line.partition(": ") for line in text.splitlines() if line)
    return {name: value for name, _, value in pairs}


def golden(name: str) -> dict[str, Any]:
    data: dict[str, Any] = json.loads((GOLDEN / name).read_text())
    return data


def printed_request(text: str) -> tuple[list[str], dict[str, Any]]:
    """What `relay map` prints for one request: the lines before the body, and the body."""
    head, _, body = text.partition("\n\n")
    return head.splitlines(), json.loads(body)


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def stored_events(db: Path) -> list[tuple[str, EventStatus]]:
    store = await Store.open(str(db))
    try:
        return [(e.event_type, e.status) for e in await store.list_events(EventFilter())]
    finally:
        await store.close()


# ---------------------------------------------------------------- relay sign


SIGN_CASES = [
    # secret, --scheme, the key standardwebhooks verifies with, a key that must NOT verify
    (LEGACY_SECRET, "auto", Webhook(LEGACY_SECRET.encode()), None),
    (LEGACY_SECRET, "legacy", Webhook(LEGACY_SECRET.encode()), None),
    (STANDARD_SECRET, "standard", Webhook(STANDARD_SECRET), Webhook(STANDARD_SECRET.encode())),
    (STANDARD_SECRET, "legacy", Webhook(STANDARD_SECRET.encode()), Webhook(STANDARD_SECRET)),
]


@pytest.mark.parametrize(
    ("secret", "scheme", "key", "other_key"),
    SIGN_CASES,
    ids=["polar_whs-auto", "polar_whs-legacy", "whsec-standard", "whsec-legacy"],
)
async def test_sign_prints_headers_the_library_verifies(
    secret: str, scheme: str, key: Webhook, other_key: Webhook | None
) -> None:
    """`relay sign` prints webhook headers (as lines and as --json) with the given id and
    timestamp, signed with the key of the chosen scheme, which standardwebhooks verifies."""
    body = PURCHASE.read_bytes()
    timestamp = int(time.time()) - 30  # inside the library's 5-minute tolerance
    args = ["sign", "--secret", secret, "--scheme", scheme, "--id", "msg_try_1"]
    args += ["--timestamp", str(timestamp), str(PURCHASE)]

    as_lines, as_json = await asyncio.gather(relay(*args), relay(*args, "--json"))

    assert as_lines.code == 0, as_lines.err
    assert as_json.code == 0, as_json.err
    headers = header_lines(as_lines.out)
    assert json.loads(as_json.out) == headers  # same id and timestamp: the same signature
    assert headers["webhook-id"] == "msg_try_1"
    assert headers["webhook-timestamp"] == str(timestamp)
    assert headers["content-type"] == "application/json"
    assert key.verify(body, headers) == json.loads(body)
    if other_key is not None:
        with pytest.raises(WebhookVerificationError):
            other_key.verify(body, headers)


async def test_sign_standard_scheme_needs_a_whsec_secret() -> None:
    """`relay sign --scheme standard` with a polar_whs_ secret exits 1 with one line and
    prints no headers."""
    result = await relay("sign", "--secret", LEGACY_SECRET, "--scheme", "standard", str(PURCHASE))

    assert result.code == 1
    assert result.out == ""
    assert result.err.splitlines() == [
        "relay: error: the standard scheme needs a whsec_ secret with a base64 key"
    ]


async def test_sign_refuses_a_file_that_is_not_json(tmp_path: Path) -> None:
    """`relay sign` of a file that is not JSON exits 1 with one line naming the file."""
    path = tmp_path / "body.txt"
    path.write_text("order paid, 44.10 USD\n")

    result = await relay("sign", "--secret", LEGACY_SECRET, str(path))

    assert result.code == 1
    assert result.out == ""
    [line] = result.err.splitlines()
    assert line.startswith(f"relay: error: {path}: not JSON: ")


# ---------------------------------------------------------------- relay map


async def map_event_file(path: Path, *extra: str) -> Run:
    return await relay(
        "map",
        "--config",
        str(CONFIG),
        "--event",
        str(path),
        *extra,
        environ=configured(FAURYA_URL=FAURYA_URL),
    )


async def test_map_prints_the_purchase_request_with_the_write_key_masked() -> None:
    """`relay map` of the purchase prints the POST to Faurya, its idempotency key, the write
    key only as ***, and the golden body."""
    result = await map_event_file(PURCHASE)

    assert result.code == 0, result.err
    lines, body = printed_request(result.out)
    [expected] = golden("order.paid.purchase.json")["requests"]
    assert lines[0] == "route polar-order-paid -> destination faurya"
    assert lines[1] == f"POST {FAURYA_URL}/api/revenue"
    assert f"idempotency-key: polar:order:{PURCHASE_ORDER_ID}" in lines
    assert "x-faurya-write-key: ***" in lines
    assert body == expected["body"]
    assert WRITE_KEY not in result.out + result.err


async def test_map_of_an_event_no_route_takes_says_nothing_would_be_sent() -> None:
    """`relay map` of order.created says nothing would be sent and names the event type."""
    result = await map_event_file(FIXTURES / "order.created.purchase.json")

    assert result.code == 0, result.err
    [line] = result.out.splitlines()
    assert line.startswith("nothing would be sent: no route of source 'polar' selects ")
    assert "'order.created'" in line
    assert "202 ignored" in line


async def test_map_of_an_order_without_net_amount_is_unmappable(tmp_path: Path) -> None:
    """`relay map` of an order.paid without data.net_amount says it is unmappable and names
    the rule's key path and the missing field."""
    event = json.loads(PURCHASE.read_bytes())
    del event["data"]["net_amount"]
    path = tmp_path / "order.paid.json"
    path.write_text(json.dumps(event))

    result = await map_event_file(path)

    assert result.code == 0, result.err
    first, second = result.out.splitlines()
    assert first.startswith(
        "nothing would be sent: unmappable: routes.polar-order-paid.body.amount"
    )
    assert "data.net_amount" in first
    assert "relay reprocess" in second


async def test_map_with_an_unknown_route_exits_1() -> None:
    """`relay map --route` naming no route exits 1 with one line listing the routes."""
    result = await map_event_file(PURCHASE, "--route", "polar-order-pad")

    assert result.code == 1
    assert result.out == ""
    assert result.err.splitlines() == [
        "relay: error: no route named 'polar-order-pad' "
        "(routes: polar-order-paid, polar-order-renewal, polar-order-credit, "
        "polar-refund-succeeded, polar-refund-reversed, polar-dispute-lost)"
    ]


async def test_map_with_a_missing_db_refuses_and_creates_nothing(tmp_path: Path) -> None:
    """`relay map --db` naming no file exits 1 instead of creating an empty database (a typo
    would otherwise read as "the relay never saw this purchase")."""
    missing = tmp_path / "typo.db"

    result = await map_event_file(FIXTURES / "refund.created.json", "--db", str(missing))

    assert result.code == 1
    assert result.err.splitlines() == [f"relay: error: no database at {missing}"]
    assert not missing.exists()


async def test_map_of_a_refund_without_db_notes_that_lookups_find_nothing() -> None:
    """`relay map` of a refund without --db says lookups find nothing, and the refund falls
    back to Polar's order id with no attribution."""
    result = await map_event_file(FIXTURES / "refund.created.json")

    assert result.code == 0, result.err
    note, *lines = printed_request(result.out)[0]
    assert note == "(no --db: lookups find nothing, as for an order the relay never saw)"
    assert lines[0] == "route polar-refund-succeeded -> destination faurya"
    [expected] = golden("refund.created.json")["requests"]
    assert printed_request(result.out)[1] == expected["body"]
    assert expected["body"]["orderId"] == PURCHASE_ORDER_ID


async def test_map_of_a_refund_with_db_takes_the_recorded_purchase(tmp_path: Path) -> None:
    """`relay map --db` of a refund finds the purchase enqueued in that outbox and carries its
    orderId and attribution, and the dry run writes nothing."""
    db = tmp_path / "relay.db"
    config = shipped_config(FAURYA_URL, db)
    mapped = map_event(config.routes, "polar", json.loads(PURCHASE.read_bytes()))
    store = await Store.open(str(db))
    try:
        await store.enqueue_now(
            [
                InboundDraft(
                    source="polar",
                    webhook_id="msg_purchase",
                    event_type="order.paid",
                    received_at=time.time(),
                    headers={},
                    body=PURCHASE.read_bytes(),
                    status=mapped.status,
                    messages=mapped.messages,
                )
            ]
        )
    finally:
        await store.close()

    result = await map_event_file(FIXTURES / "refund.created.json", "--db", str(db))

    assert result.code == 0, result.err
    lines, body = printed_request(result.out)
    assert lines[0] == "route polar-refund-succeeded -> destination faurya"
    assert body["orderId"] == "ord_7Hq2kP9xL3"
    assert body == golden("refund.created.with-purchase.json")["requests"][0]["body"]
    store = await Store.open(str(db))
    try:
        assert [m.idempotency_key for m in await store.list_messages()] == [
            f"polar:order:{PURCHASE_ORDER_ID}"
        ]
    finally:
        await store.close()
    assert await stored_events(db) == [("order.paid", EventStatus.ROUTED)]


# ---------------------------------------------------------------- relay send


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@dataclass(frozen=True)
class Serving:
    """A `relay serve` on the port the config names (RELAY_PORT), and its environment."""

    process: RelayProcess
    environ: dict[str, str]
    db: Path

    @property
    def webhook_url(self) -> str:
        return f"{self.process.url}/webhooks/polar"


@pytest.fixture
async def serving(faurya: FakeFaurya, db_path: Path) -> AsyncIterator[Serving]:
    """`relay serve` of the shipped config on a free port given by RELAY_PORT (not --port), so
    that a `relay send` reading the same config finds it."""
    environ = configured(FAURYA_URL=faurya.url, RELAY_PORT=str(free_port()))
    process = RelayProcess(CONFIG, db_path, environ)
    assert process.args[-2:] == ["--port", "0"]
    process.args = process.args[:-2]
    try:
        await process.start()
        assert process.port == int(environ["RELAY_PORT"])
        yield Serving(process, environ, db_path)
    finally:
        await process.close()


async def test_send_is_accepted_and_the_same_id_again_is_a_duplicate(
    serving: Serving, faurya: FakeFaurya
) -> None:
    """`relay send --url --secret` prints HTTP 202 and exits 0; the same file with the same
    --id is answered as a duplicate, and Faurya gets one call."""
    args = ["send", str(PURCHASE), "--url", serving.webhook_url, "--secret", LEGACY_SECRET]
    args += ["--id", "msg_send_1"]

    first = await relay(*args)
    again = await relay(*args)

    assert first.code == 0, first.err
    assert first.out.startswith(f"order.paid -> {serving.webhook_url}: HTTP 202 ")
    assert '"status":"accepted"' in first.out
    assert again.code == 0, again.err
    assert "HTTP 202" in again.out
    assert '"status":"duplicate"' in again.out
    [call] = await faurya.wait_for(1)
    assert call.headers["idempotency-key"] == f"polar:order:{PURCHASE_ORDER_ID}"
    assert await stored_events(serving.db) == [("order.paid", EventStatus.ROUTED)]


async def test_the_same_file_sent_again_is_a_duplicate(
    serving: Serving, faurya: FakeFaurya
) -> None:
    """As the README's quick start says: the same file sent again (a new webhook id, the same
    order) is answered `202 duplicate`, and Faurya gets one call."""
    args = ["send", str(PURCHASE), "--url", serving.webhook_url, "--secret", LEGACY_SECRET]

    first = await relay(*args)
    again = await relay(*args)

    assert '"status":"accepted"' in first.out, first.err
    assert again.code == 0, again.err
    assert "HTTP 202" in again.out
    assert '"status":"duplicate"' in again.out
    assert len(await faurya.wait_for(1)) == 1


async def test_send_with_a_wrong_secret_gets_401_and_exits_1(
    serving: Serving, http: aiohttp.ClientSession
) -> None:
    """`relay send` with a secret the relay does not know prints HTTP 401 and exits 1; the
    relay logs signature_rejected, counts bad_signature and stores nothing."""
    result = await relay(
        "send",
        str(PURCHASE),
        "--url",
        serving.webhook_url,
        "--secret",
        "polar_whs_notTheRelaysSecret0000000000",
    )

    assert result.code == 1
    assert "HTTP 401" in result.out
    assert "invalid signature" in result.out
    rejected = await serving.process.wait_log("signature_rejected")
    assert rejected["outcome"] == "bad_signature"
    assert rejected["reason"] == "no signature matches"  # in the log, not the answer
    async with http.get(f"{serving.process.admin_url}/metrics") as resp:
        text = await resp.text()
    labels = {"source": "polar", "event_type": "unknown", "outcome": "bad_signature"}
    assert metric(text, "relay_webhooks_received_total", labels) == 1
    assert await stored_events(serving.db) == []


async def test_send_without_url_or_secret_uses_the_config(serving: Serving) -> None:
    """`relay send FILE` alone signs with the config's first secret and posts to the config's
    server port on 127.0.0.1 (server.host is 0.0.0.0)."""
    result = await relay("send", "--config", str(CONFIG), str(PURCHASE), environ=serving.environ)

    assert result.code == 0, result.err
    port = serving.environ["RELAY_PORT"]
    assert result.out.startswith(f"order.paid -> http://127.0.0.1:{port}/webhooks/polar: HTTP 202")
    assert await stored_events(serving.db) == [("order.paid", EventStatus.ROUTED)]


# ---------------------------------------------------------------- relay dev


class Lines:
    """A process's stdout, read continuously (so its pipe never fills), awaitable by line."""

    def __init__(self, proc: asyncio.subprocess.Process) -> None:
        self.proc = proc
        self.lines: list[str] = []
        self._changed = asyncio.Event()
        self._reader = asyncio.create_task(self._read())

    async def _read(self) -> None:
        assert self.proc.stdout is not None
        async for raw in self.proc.stdout:
            self.lines.append(raw.decode("utf-8", errors="replace").rstrip("\n"))
            self._changed.set()
        self._changed.set()

    async def wait_for(self, predicate: Callable[[str], bool], timeout_s: float = 10.0) -> str:
        """The first line that satisfies `predicate`; fail at the deadline or at the end."""
        try:
            async with asyncio.timeout(timeout_s):
                while True:
                    self._changed.clear()
                    if found := [line for line in self.lines if predicate(line)]:
                        return found[0]
                    if self._reader.done():
                        raise AssertionError("output ended:\n" + "\n".join(self.lines))
                    await self._changed.wait()
        except TimeoutError:
            raise AssertionError("no such line in time:\n" + "\n".join(self.lines)) from None

    async def close(self) -> None:
        if self.proc.returncode is None:
            with contextlib.suppress(ProcessLookupError):
                self.proc.kill()
        await self.proc.wait()
        await self._reader


async def test_dev_prints_each_revenue_call_and_stops_on_sigint() -> None:
    """`relay dev` without POLAR_WEBHOOK_SECRET prints a generated secret and the console's URL
    (which serves the overview); purchases sent with it appear as sink lines (attributed,
    then UNATTRIBUTED), and SIGINT exits 0."""
    port = free_port()
    proc = await asyncio.create_subprocess_exec(
        relay_command(),
        "dev",
        "--config",
        str(CONFIG),
        "--port",
        str(port),
        env=process_env(),
        stdin=asyncio.subprocess.DEVNULL,
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.STDOUT,
    )
    output = Lines(proc)
    try:
        secret_line = await output.wait_for(lambda line: line.startswith("  secret:     "))
        secret = secret_line.split()[-1]
        assert secret.startswith("polar_whs_dev")
        url = f"http://127.0.0.1:{port}/webhooks/polar"
        assert f"  webhooks:   {url}" in output.lines
        # The console's URL, on loopback and open (no token in dev): the demo shows it.
        console_line = await output.wait_for(lambda line: line.startswith("  console:    "))
        console_url = console_line.split()[1]
        assert re.fullmatch(r"http://127\.0\.0\.1:\d+/", console_url), console_line
        assert console_line.endswith("(open: loopback, no token)")
        async with aiohttp.ClientSession() as http, http.get(console_url) as page:
            assert page.status == 200
            assert "<h1>Overview</h1>" in await page.text()

        sent = await relay("send", str(PURCHASE), "--url", url, "--secret", secret)
        assert sent.code == 0, sent.out + sent.err
        purchase = await output.wait_for(lambda line: line.startswith("[faurya sink #1]"))
        assert re.match(
            r"\[faurya sink #1\] purchase +44\.10 USD  order ord_7Hq2kP9xL3  .*  attributed  ",
            purchase,
        ), purchase

        unattributed = FIXTURES / "order.paid.unattributed.json"
        sent = await relay("send", str(unattributed), "--url", url, "--secret", secret)
        assert sent.code == 0, sent.out + sent.err
        line = await output.wait_for(lambda line: line.startswith("[faurya sink #2]"))
        assert "  UNATTRIBUTED  " in line

        proc.send_signal(signal.SIGINT)
        async with asyncio.timeout(10):
            assert await proc.wait() == 0
    finally:
        await output.close()
    assert not [line for line in output.lines if line.startswith("[faurya sink #3]")]


# ---------------------------------------------------------------- relay outbox events


async def test_outbox_events_shows_why_an_event_was_unmappable(
    faurya: FakeFaurya, db_path: Path, http: aiohttp.ClientSession
) -> None:
    """After `relay serve` took an order.paid without net_amount and an order.created,
    `relay outbox events` lists both, the unmappable one with the reason naming
    routes.polar-order-paid.body.amount; --status filters and --json lines parse."""
    event = json.loads(fixture_body("order.paid.purchase.json"))
    del event["data"]["net_amount"]
    no_amount = json.dumps(event).encode()
    created = fixture_body("order.created.purchase.json")
    process = RelayProcess(CONFIG, db_path, configured(FAURYA_URL=faurya.url))
    try:
        await process.start()
        for webhook_id, body in (("msg_no_amount", no_amount), ("msg_created", created)):
            url = f"{process.url}/webhooks/polar"
            headers = sign_headers(body, msg_id=webhook_id)
            async with http.post(url, data=body, headers=headers) as resp:
                assert resp.status == 202, await resp.text()
        assert await process.signal(signal.SIGTERM) == 0
    finally:
        await process.close()
    assert faurya.received == []

    db = ["--db", str(db_path)]
    table, unmappable, as_json = await asyncio.gather(
        relay("outbox", "events", *db),
        relay("outbox", "events", *db, "--status", "unmappable"),
        relay("outbox", "events", *db, "--json"),
    )

    reason_start = "routes.polar-order-paid.body.amount: required, but data.net_amount"
    assert table.code == 0, table.err
    header, created_row, unmappable_row, reason, footer = table.out.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "EVENT"]
    assert created_row.split()[1:3] == ["ignored", "order.created"]
    assert created_row.split()[-1] == "msg_created"
    assert unmappable_row.split()[1:3] == ["unmappable", "order.paid"]
    assert unmappable_row.split()[-1] == "msg_no_amount"
    assert reason.strip().startswith(reason_start)
    assert footer == "(2 shown)"

    assert unmappable.code == 0, unmappable.err
    row, only_reason, only_footer = unmappable.out.splitlines()[1:]
    assert row == unmappable_row
    assert only_reason == reason
    assert only_footer == "(1 shown)"

    assert as_json.code == 0, as_json.err
    records = [json.loads(line) for line in as_json.out.splitlines()]
    by_id = {r["webhook_id"]: r for r in records}
    assert set(by_id) == {"msg_no_amount", "msg_created"}
    assert by_id["msg_no_amount"]["status"] == "unmappable"
    assert by_id["msg_no_amount"]["reason"].startswith(reason_start)
    assert by_id["msg_created"]["status"] == "ignored"
    assert by_id["msg_created"]["reason"] is None
    store = await Store.open(str(db_path))
    try:
        assert await store.list_messages(status=MessageStatus.PENDING) == []
    finally:
        await store.close()
