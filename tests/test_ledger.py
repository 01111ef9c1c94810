"""The revenue ledger: Polar's side (the snapshot reconciliation keeps) against the outbox, per
day and currency, and each difference with its fix.

The scenario runs the real app with the shipped relay.toml against the fake Polar API
(tests/polar_fake.py, tests/polar_world.py) and a Faurya that keeps its contract; webhooks are
signed and posted; the ledger is read from the real store. The pure parts (days cut in a time
zone, zero-decimal currencies, the JSON and CSV formats) are table-tested on `relay.ledger`.
"""

from __future__ import annotations

import copy
import csv
import dataclasses
import io
import json
import time
import tomllib
import uuid
from collections import defaultdict
from datetime import UTC, date, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay import ledger_report
from relay.app import LEDGER_GAUGE, METRICS, POLAR_API, STORE, create_app
from relay.config import Config, LedgerConfig, parse
from relay.ledger import NO_TOKEN_NOTE, Ledger, build
from relay.ledger_differences import Expected, Kind, PolarEntry, Why
from relay.ledger_gauge import LedgerGauge
from relay.ledger_report import major, parse_bound, to_json
from relay.ledger_source import read_ledger, settle_s
from relay.models import (
    EventStatus,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    PolarKind,
    SnapshotCoverage,
)
from relay.outbox_commands import BadTime
from relay.reconcile import Reconciler
from relay.revenue import RevenueFacts
from relay.store import Store
from tests.helpers import (
    REPO,
    FakeClock,
    admin_get,
    drained,
    env,
    order_paid,
    process_env,
    relay_command,
    run_command,
    sign_headers,
)
from tests.polar_fake import FakePolar, serve, with_polar_api
from tests.polar_world import FauryaBook, PolarWorld, Webhook

Client = TestClient[web.Request, web.Application]
IDS = {
    "faVisitorId": "v_5f2c9e1ab7d34c0e",
    "faSessionId": "s_8d1a7c3e92f0b6d4",
    "faAttributionToken": "fat_Qm9vdEF0dHJpYnV0aW9u",
}
HOUR_S = 3600.0


@pytest.fixture
async def polar(aiohttp_server: AiohttpServer) -> FakePolar:
    return await serve(aiohttp_server)


def shipped(book: FauryaBook, db_path: Path, polar: FakePolar | None = None) -> Config:
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["storage"]["path"] = str(db_path)
    config = parse(raw, env(FAURYA_URL=book.url))
    return config if polar is None else with_polar_api(config, polar)


async def post(relay: Client, body: bytes) -> None:
    resp = await relay.post("/webhooks/polar", data=body, headers=sign_headers(body))
    assert resp.status == 202, await resp.text()


async def post_webhooks(relay: Client, hooks: list[Webhook]) -> None:
    for hook in hooks:
        if not hook.lost:
            await post(relay, hook.body())


def shape(ledger: Ledger) -> set[tuple[str, str, str, int, str | None]]:
    """Each difference as (kind, why, currency, amount, Polar id or message id)."""
    return {
        (d.kind.value, d.why.value, d.currency, d.amount_minor, d.polar_id or str(d.message_id))
        for d in ledger.differences
    }


def by_currency(ledger: Ledger) -> dict[str, int]:
    out: dict[str, int] = defaultdict(int)
    for d in ledger.differences:
        out[d.currency] += d.amount_minor
    return {k: v for k, v in out.items() if v}


def minus(a: dict[str, int], b: dict[str, int]) -> dict[str, int]:
    return {k: a.get(k, 0) - b.get(k, 0) for k in a.keys() | b.keys() if a.get(k, 0) != b.get(k, 0)}


# ---------------------------------------------------------------- the scenario


async def test_ledger_shows_exactly_the_differences_and_what_fixes_them(
    aiohttp_client: AiohttpClient, book: FauryaBook, polar: FakePolar, tmp_path: Path
) -> None:
    """Purchases in USD, EUR and JPY, a refund pending then succeeded, an order whose webhook
    was lost, a lost dispute, a forged delivery and a tampered amount: the ledger lists exactly
    the lost order, the dispute, the forged delivery and the mismatch (each Polar - Faurya, the
    sums equal to Polar's books minus Faurya's), and after `relay reconcile` only the two no
    relay command can fix."""
    clock = FakeClock(time.time())
    config = shipped(book, tmp_path / "relay.db", polar)
    relay = await aiohttp_client(create_app(config, clock=clock, poll_interval_s=0.05))
    store = relay.app[STORE]
    world = PolarWorld(polar)
    world.purchase({"orderId": "ord_usd", **IDS}, net=4410, currency="usd")
    eur = world.purchase({"orderId": "ord_eur", **IDS}, net=1900, currency="eur")
    yen = world.purchase({"orderId": "ord_jpy", **IDS}, net=5000, currency="jpy")
    lost = world.purchase({"orderId": "ord_lost", **IDS}, net=2500, currency="eur", lost=True)
    big = world.purchase({"orderId": "ord_big", **IDS}, net=3000, currency="usd")
    # A tampered copy of a real order's webhook, signed, arrives first: the real one is then
    # a duplicate of its key, and Faurya keeps the tampered amount.
    tampered = copy.deepcopy(big)
    tampered.update(net_amount=30000, amount=30000, total_amount=30000)
    await post(relay, Webhook("order.paid", tampered).body())
    # A forged (or test) order.paid for an order Polar does not have.
    forged_id = str(uuid.uuid4())
    await post(relay, order_paid(forged_id, orderId="ord_forged"))
    await post_webhooks(relay, world.webhooks)
    # A chargeback on the EUR order, lost: Polar sends no webhook for it.
    dispute = world.lose_dispute(eur)
    # A refund of the USD order, pending for now (refund.created only).
    usd_order = polar.orders[0]
    refund = polar.add_refund(usd_order, amount=1000, status="pending")
    await post(relay, Webhook("refund.created", copy.deepcopy(refund)).body())
    await drained(relay)
    forged_msg = next(m for m in await store.list_messages() if forged_id in m.body.decode())
    big_msg = next(m for m in await store.list_messages() if big["id"] in m.body.decode())

    # A dry run stores Polar's side without enqueueing anything (a minute later: Polar
    # stamps its objects with the real clock).
    clock.advance(60)
    api = relay.app[POLAR_API]
    since = clock.now() - config.reconcile.lookback_s
    dry = await Reconciler(store, config, api, clock, dry_run=True).run(since, None)
    assert dry.enqueued == 2  # the lost order and the dispute, only counted
    ledger = await read_ledger(store, config, now=clock.now())
    assert ledger.polar_available
    assert ledger.note is None
    assert shape(ledger) == {
        ("missing", "never_received", "EUR", 2500, lost["id"]),
        ("missing", "never_received", "EUR", -1900, dispute["id"]),
        ("unknown_to_polar", "not_found", "USD", -4410, str(forged_msg.id)),
        ("mismatch", "amount", "USD", 3000 - 30000, big["id"]),
    }
    fixes = {d.why: (d.fix, d.message_id) for d in ledger.differences}
    assert fixes[Why.NEVER_RECEIVED] == ("relay reconcile", None)
    assert fixes[Why.NOT_FOUND][1] == forged_msg.id
    assert fixes[Why.AMOUNT][1] == big_msg.id
    assert "forged" in next(d.detail for d in ledger.differences if d.why is Why.NOT_FOUND)
    # The differences add up to Polar's books minus Faurya's, per currency.
    assert by_currency(ledger) == minus(world.ledger("net"), book.ledger())
    [jpy_row] = [r for r in ledger.rows if r.currency == "JPY"]
    assert jpy_row.polar is not None
    assert (jpy_row.polar.net_minor, jpy_row.delivered.net_minor, jpy_row.difference_minor) == (
        5000,
        5000,
        0,
    )
    assert major(jpy_row.delivered.net_minor, "JPY") == "5000"
    # The pending refund is nobody's revenue yet.
    [usd_row] = [r for r in ledger.rows if r.currency == "USD"]
    assert usd_row.polar is not None
    assert usd_row.polar.refunds == 0
    assert yen["currency"] == "jpy"

    # The refund succeeds; then `relay reconcile` enqueues the lost order, and it is delivered.
    refund["status"] = "succeeded"
    await post(relay, Webhook("refund.updated", copy.deepcopy(refund)).body())
    summary = await Reconciler(store, config, api, clock).run(since, None)
    assert summary.enqueued == 2
    await drained(relay)
    ledger = await read_ledger(store, config, now=clock.now())
    assert shape(ledger) == {
        ("unknown_to_polar", "not_found", "USD", -4410, str(forged_msg.id)),
        ("mismatch", "amount", "USD", -27000, big["id"]),
    }
    assert by_currency(ledger) == minus(world.ledger("net"), book.ledger())
    rows = {r.currency: r for r in ledger.rows}
    assert rows["EUR"].difference_minor == 0
    assert rows["JPY"].difference_minor == 0
    assert rows["USD"].polar is not None
    assert rows["USD"].polar.refund_minor == 1000
    assert rows["USD"].delivered.refund_minor == 1000

    # The gauges count only differences older than one reconcile interval.
    await _gauge(relay).refresh(store)
    registry = relay.app[METRICS].registry
    assert registry.get_sample_value("relay_ledger_differences", {"currency": "USD"}) == 0
    clock.advance(settle_s(config) + 1)
    await _gauge(relay).refresh(store)
    assert registry.get_sample_value("relay_ledger_differences", {"currency": "USD"}) == 2
    assert (
        registry.get_sample_value("relay_ledger_difference_minor_units", {"currency": "USD"})
        == -31410
    )
    assert registry.get_sample_value("relay_ledger_differences", {"currency": "EUR"}) == 0
    scrape = await admin_get(relay)
    assert 'relay_ledger_difference_minor_units{currency="USD"} -31410.0' in scrape.text


def _gauge(relay: Client) -> LedgerGauge:
    return relay.app[LEDGER_GAUGE]


async def test_a_dead_or_discarded_purchase_names_its_message_and_fix(
    aiohttp_client: AiohttpClient, book: FauryaBook, polar: FakePolar, tmp_path: Path
) -> None:
    """A purchase Faurya refused for good is a `dead` difference naming its message and
    `relay outbox retry <id>`; once discarded, a `discarded` one with the operator's reason."""
    config = shipped(book, tmp_path / "relay.db", polar)
    config = dataclasses.replace(
        config,
        destinations={
            "faurya": dataclasses.replace(
                config.destinations["faurya"], url=book.url + "/api/nowhere"
            )
        },
    )
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    store: Store = relay.app[STORE]
    world = PolarWorld(polar)
    order = world.purchase({"orderId": "ord_dead", **IDS}, net=1234, currency="usd")
    await post_webhooks(relay, world.webhooks)
    await drained(relay)
    [message] = await store.list_messages(status=MessageStatus.DEAD)
    await Reconciler(store, config, relay.app[POLAR_API], FakeClock(time.time())).run(None, None)
    ledger = await read_ledger(store, config, now=time.time())
    [diff] = ledger.differences
    assert (diff.kind, diff.why, diff.polar_id, diff.message_id, diff.amount_minor) == (
        Kind.MISSING,
        Why.DEAD,
        order["id"],
        message.id,
        1234,
    )
    assert diff.fix.endswith(f"relay outbox retry {message.id}")
    await store.discard(MessageFilter(ids=(message.id,)), "test order")
    [diff] = (await read_ledger(store, config, now=time.time())).differences
    assert (diff.why, diff.message_id) == (Why.DISCARDED, message.id)
    assert "test order" in diff.detail
    [row] = (await read_ledger(store, config, now=time.time())).rows
    assert row.discarded.net_minor == 1234
    assert row.delivered.net_minor == 0


async def test_without_a_token_the_ledger_shows_the_relays_side_and_says_why(
    aiohttp_client: AiohttpClient, book: FauryaBook, tmp_path: Path
) -> None:
    """With no polar_api.token, the ledger still has received and delivered per day and
    currency, no Polar column and no differences, and says Polar's side needs the token and
    its scopes."""
    config = shipped(book, tmp_path / "relay.db")
    assert config.polar_api.token is None
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    await post(relay, order_paid())
    await drained(relay)
    ledger = await read_ledger(relay.app[STORE], config, now=time.time())
    assert ledger.note == NO_TOKEN_NOTE
    assert "orders:read" in NO_TOKEN_NOTE
    assert "refunds:read" in NO_TOKEN_NOTE
    [row] = ledger.rows
    assert row.polar is None
    assert (row.currency, row.received.net_minor, row.delivered.net_minor) == ("USD", 4410, 4410)
    assert ledger.differences == ()
    text = ledger_report.table(ledger)
    assert "polar_api.token" in text
    assert "disputes:read" in text


# ---------------------------------------------------------------- the pure ledger

TZ_BERLIN = ZoneInfo("Europe/Berlin")


def message(
    ident: int, key: str, body: dict[str, Any], at: float, status: MessageStatus
) -> MessageRecord:
    return MessageRecord(
        id=ident,
        event_id=ident,
        route="r",
        destination="faurya",
        idempotency_key=key,
        status=status,
        attempts=1,
        created_at=at,
        next_attempt_at=at,
        lease_until=None,
        last_status=200,
        last_error=None,
        delivered_at=at,
        updated_at=at,
        event_type="order.paid",
        webhook_id=f"wh_{ident}",
        body=json.dumps(body).encode(),
    )


def order_entry(polar_id: str, at: float, amount: int, currency: str) -> PolarEntry:
    return PolarEntry(
        kind=PolarKind.ORDER,
        polar_id=polar_id,
        created_at=at,
        status="paid",
        mapping=EventStatus.ROUTED,
        expected=(
            Expected(
                "faurya",
                f"polar:order:{polar_id}",
                RevenueFacts("purchase", amount, currency, True),
            ),
        ),
        polar_minor=amount,
        currency=currency,
    )


def late_evening() -> tuple[float, list[PolarEntry], list[MessageRecord]]:
    """A USD order at 23:30 UTC on 2026-11-30, delivered; a JPY order the next noon, never
    delivered; an ISK order the same noon, delivered."""
    at = datetime(2026, 11, 30, 23, 30, tzinfo=UTC).timestamp()
    noon = datetime(2026, 12, 1, 12, 0, tzinfo=UTC).timestamp()
    entries = [
        order_entry("o1", at, 4410, "USD"),
        order_entry("o2", noon, 5000, "JPY"),
        order_entry("o3", noon, 990000, "ISK"),
    ]
    body = {"event": "purchase", "amount": 4410, "currency": "USD", "orderId": "x"}
    isk = {"event": "purchase", "amount": 990000, "currency": "ISK", "orderId": "y"}
    messages = [
        message(1, "polar:order:o1", body, at + 2, MessageStatus.DELIVERED),
        message(3, "polar:order:o3", isk, noon + 2, MessageStatus.DELIVERED),
    ]
    return at, entries, messages


def ledger_in(tz: ZoneInfo, *, polar_known: bool = True) -> Ledger:
    """The late-evening ledger in `tz`, built a day after its window; without `polar_known`,
    built at once and as without a snapshot: Polar's side unknown."""
    at, entries, messages = late_evening()
    coverage = SnapshotCoverage(at - 86400, None, at + 2 * 86400, tuple(PolarKind))
    return build(
        entries=entries if polar_known else [],
        messages=messages,
        coverage=coverage if polar_known else None,
        destinations={"faurya"},
        tz=tz,
        since=at - 86400,
        until=at + 2 * 86400,
        now=at + 3 * 86400 if polar_known else at,
        settle_s=HOUR_S,
    )


@pytest.mark.parametrize(
    ("zone", "usd_day"),
    [(ZoneInfo("UTC"), date(2026, 11, 30)), (TZ_BERLIN, date(2026, 12, 1))],
)
def test_days_are_cut_at_midnight_in_the_ledgers_time_zone(zone: ZoneInfo, usd_day: date) -> None:
    """An order at 23:30 UTC is on that day in UTC and on the next one in Europe/Berlin, with
    its delivery beside it."""
    ledger = ledger_in(zone)
    [usd] = [r for r in ledger.rows if r.currency == "USD"]
    assert usd.day == usd_day
    assert usd.polar is not None
    assert (usd.polar.net_minor, usd.delivered.net_minor, usd.difference_minor) == (4410, 4410, 0)


def test_zero_decimal_and_polars_exponents_in_every_format() -> None:
    """JPY amounts are whole yen (Polar's exponent 0) and ISK has two decimals (Polar's, not
    ISO's zero): in the table as major units, in JSON and CSV as minor units with the
    exponent."""
    ledger = ledger_in(TZ_BERLIN)
    [diff] = ledger.differences
    assert (diff.kind, diff.why, diff.currency, diff.amount_minor) == (
        Kind.MISSING,
        Why.NEVER_RECEIVED,
        "JPY",
        5000,
    )
    text = ledger_report.table(ledger)
    assert "JPY +5000 missing (never_received)" in text
    assert "9900.00" in text  # 990000 ISK minor units: Polar's two decimals
    days = {d["currency"]: d for d in to_json(ledger)["days"]}
    assert (days["JPY"]["exponent"], days["ISK"]["exponent"], days["USD"]["exponent"]) == (0, 2, 2)
    assert major(-1, "USD") == "-0.01"
    assert major(-5000, "JPY") == "-5000"


def test_json_and_csv_parse_back_to_the_same_ledger() -> None:
    """The JSON output is the ledger's JSON data; each CSV row (days, and with --differences
    the differences) reads back to the same numbers, an unknown Polar side as empty cells."""
    ledger = ledger_in(TZ_BERLIN)
    data = to_json(ledger)
    assert json.loads(ledger_report.render(ledger, "json")) == data
    rows = list(csv.DictReader(io.StringIO(ledger_report.render(ledger, "csv"))))
    assert len(rows) == len(data["days"])
    for row, day in zip(rows, data["days"], strict=True):
        assert (row["day"], row["currency"], int(row["exponent"])) == (
            day["day"],
            day["currency"],
            day["exponent"],
        )
        for tally in ledger_report.TALLIES:
            for key in ledger_report.TALLY_FIELDS:
                assert int(row[f"{tally}_{key}"]) == day[tally][key]
        assert int(row["difference_minor"]) == day["difference_minor"]
    diffs = list(
        csv.DictReader(io.StringIO(ledger_report.render(ledger, "csv", differences_only=True)))
    )
    assert [
        {**d, "amount_minor": int(d["amount_minor"]), "settled": d["settled"] == "True"}
        for d in diffs
    ] == [
        {k: "" if v is None else v for k, v in {**x, "amount_minor": x["amount_minor"]}.items()}
        for x in data["differences"]
    ]
    # Polar's side unknown (no snapshot): empty cells in CSV, null in JSON.
    blind = ledger_in(TZ_BERLIN, polar_known=False)
    blind_rows = {
        r["currency"]: r for r in csv.DictReader(io.StringIO(ledger_report.render(blind, "csv")))
    }
    assert blind_rows["USD"]["polar_net_minor"] == ""
    assert blind_rows["USD"]["delivered_net_minor"] == "4410"
    assert to_json(blind)["days"][0]["polar"] is None


async def test_relay_ledger_command_prints_json_and_csv_that_parse_back(
    aiohttp_client: AiohttpClient, book: FauryaBook, polar: FakePolar, tmp_path: Path
) -> None:
    """`relay ledger` (the real command) reads the snapshot a reconcile run stored, without
    any secret set, and its JSON and CSV parse back to the same days; a bad time zone is a
    one-line error with exit 2."""
    db_path = tmp_path / "relay.db"
    config = shipped(book, db_path, polar)
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    world = PolarWorld(polar)
    world.purchase({"orderId": "ord_a", **IDS}, net=4410, currency="usd")
    world.purchase({"orderId": "ord_b", **IDS}, net=700, currency="jpy", lost=True)
    await post_webhooks(relay, world.webhooks)
    await drained(relay)
    store = relay.app[STORE]
    await Reconciler(store, config, relay.app[POLAR_API], FakeClock(time.time()), dry_run=True).run(
        None, None
    )
    base = [relay_command(), "ledger", "--config", str(REPO / "relay.toml"), "--db", str(db_path)]
    environ = process_env()
    as_json = await run_command(*base, "--format", "json", environ=environ)
    assert as_json.code == 0, as_json.err
    data = json.loads(as_json.out)
    assert {(d["currency"], d["polar"]["net_minor"]) for d in data["days"]} == {
        ("USD", 4410),
        ("JPY", 700),
    }
    assert [(d["why"], d["currency"], d["amount_minor"]) for d in data["differences"]] == [
        ("never_received", "JPY", 700)
    ]
    as_csv = await run_command(*base, "--format", "csv", "--currency", "usd", environ=environ)
    assert as_csv.code == 0, as_csv.err
    [row] = list(csv.DictReader(io.StringIO(as_csv.out)))
    assert (row["currency"], row["delivered_net_minor"], row["difference_minor"]) == (
        "USD",
        "4410",
        "0",
    )
    table = await run_command(*base, "--timezone", "Europe/Berlin", environ=environ)
    assert table.code == 0, table.err
    assert "days in Europe/Berlin" in table.out
    assert "fix: relay reconcile" in table.out
    bad = await run_command(*base, "--timezone", "Mars/Olympus", environ=environ)
    assert bad.code == 2
    assert bad.err.strip().startswith("relay: config error: --timezone: unknown time zone")


def test_ledger_timezone_is_read_and_checked_from_relay_toml() -> None:
    """`[ledger] timezone` takes an IANA name (default UTC); an unknown one is a config error
    naming the key."""
    raw = tomllib.loads((REPO / "relay.toml").read_text())
    assert parse(raw, env()).ledger == LedgerConfig("UTC")
    raw["ledger"] = {"timezone": "Europe/Berlin"}
    assert parse(raw, env()).ledger.timezone == "Europe/Berlin"
    raw["ledger"] = {"timezone": "Europe/Atlantis"}
    with pytest.raises(Exception, match=r"ledger\.timezone: unknown time zone"):
        parse(raw, env())


async def test_the_snapshot_keeps_only_what_the_routes_read_and_notices_a_route_change(
    aiohttp_client: AiohttpClient, book: FauryaBook, polar: FakePolar, tmp_path: Path
) -> None:
    """Polar's objects are kept with the fields the routes and the ledger read (the checkout's
    metadata, the amount), without the customer; after a route starts reading a field the
    last run did not keep, the ledger says so and its gauges go absent until the next run."""
    config = shipped(book, tmp_path / "relay.db", polar)
    relay = await aiohttp_client(create_app(config, poll_interval_s=0.05))
    store = relay.app[STORE]
    world = PolarWorld(polar)
    order = world.purchase({"orderId": "ord_kept", **IDS}, net=4410, currency="usd")
    assert order["customer"]["email"]
    await post_webhooks(relay, world.webhooks)
    await drained(relay)
    clock = FakeClock(time.time() + 1)
    await Reconciler(store, config, relay.app[POLAR_API], clock, dry_run=True).run(None, None)
    [kept] = await store.polar_snapshot()
    data = json.loads(kept.data)
    assert "customer" not in data
    assert "email" not in kept.data.decode()
    assert data["metadata"]["orderId"] == "ord_kept"
    assert (data["net_amount"], data["currency"], data["billing_reason"]) == (
        4410,
        "usd",
        "purchase",
    )
    assert (await read_ledger(store, config, now=clock.now())).differences == ()

    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["storage"]["path"] = str(tmp_path / "relay.db")
    raw["routes"][0]["body"]["productId"] = {"path": "data.product_id"}
    changed = with_polar_api(parse(raw, env(FAURYA_URL=book.url)), polar)
    ledger = await read_ledger(store, changed, now=clock.now())
    assert ledger.stale
    assert ledger.note is not None
    assert "a route changed" in ledger.note
    gauge = LedgerGauge(changed, relay.app[METRICS], clock)
    await gauge.refresh(store)
    registry = relay.app[METRICS].registry
    assert registry.get_sample_value("relay_ledger_differences", {"currency": "USD"}) is None
    await Reconciler(store, changed, relay.app[POLAR_API], clock, dry_run=True).run(None, None)
    assert not (await read_ledger(store, changed, now=clock.now())).stale


def test_polars_side_of_a_25_hour_day_counts_its_last_hour() -> None:
    """On the day Berlin's clocks go back (25 hours), a snapshot that starts in the day's last
    hour still covers that day: Polar's side is shown, not left unknown."""
    since = datetime(2026, 10, 25, 22, 30, tzinfo=UTC).timestamp()  # 23:30 CET, Oct 25
    at = since + 900
    entries = [order_entry("o1", at, 4410, "USD")]
    body = {"event": "purchase", "amount": 4410, "currency": "USD", "orderId": "x"}
    messages = [message(1, "polar:order:o1", body, at + 2, MessageStatus.DELIVERED)]
    ledger = build(
        entries=entries,
        messages=messages,
        coverage=SnapshotCoverage(since, None, since + 3600, tuple(PolarKind)),
        destinations={"faurya"},
        tz=TZ_BERLIN,
        since=since,
        until=since + 3600,
        now=since + 7200,
        settle_s=HOUR_S,
    )
    [row] = ledger.rows
    assert row.day == date(2026, 10, 25)
    assert row.polar is not None
    assert (row.polar.net_minor, row.delivered.net_minor, row.difference_minor) == (4410, 4410, 0)


@pytest.mark.parametrize(
    ("text", "end"),
    [("9999-12-31", True), ("9999-12-31T23:00:00", False), ("99999999999999d", False)],
)
def test_a_time_beyond_what_a_datetime_shows_is_a_bad_time(text: str, end: bool) -> None:
    """`relay ledger --until 9999-12-31` (or a time no zone can show) is a one-line BadTime,
    not an OverflowError traceback."""
    with pytest.raises(BadTime, match=r"cannot read time|out of range"):
        parse_bound(text, ZoneInfo("Pacific/Kiritimati"), time.time(), end=end)


def within_a_minute(
    at: float, entries: list[PolarEntry], messages: list[MessageRecord], kind: PolarKind
) -> Ledger:
    """The ledger of the minute around `at` (UTC, nothing left to settle), Polar's `kind`
    objects read over it."""
    return build(
        entries=entries,
        messages=messages,
        coverage=SnapshotCoverage(at - 60, None, at + 60, (kind,)),
        destinations=["faurya"],
        tz=ZoneInfo("UTC"),
        since=at - 60,
        until=at + 60,
        now=at + 60,
        settle_s=0,
    )


def test_a_delivery_in_another_currency_is_missing_in_one_and_extra_in_the_other() -> None:
    """Polar's 4410 USD delivered as 4410 EUR is two mismatches (+4410 USD, -4410 EUR), never a
    subtraction across currencies; a refund delivered as a purchase is an event mismatch."""
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp()
    entries = [order_entry("o1", at, 4410, "USD"), order_entry("o2", at, 500, "USD")]
    eur = {"event": "purchase", "amount": 4410, "currency": "eur"}
    refund = {"event": "refund", "amount": 500, "currency": "USD"}
    ledger = within_a_minute(
        at,
        entries,
        [
            message(1, "polar:order:o1", eur, at + 1, MessageStatus.DELIVERED),
            message(2, "polar:order:o2", refund, at + 1, MessageStatus.DELIVERED),
        ],
        PolarKind.ORDER,
    )
    assert sorted(
        (d.why, d.currency, d.amount_minor, d.message_id) for d in ledger.differences
    ) == [
        (Why.CURRENCY, "EUR", -4410, 1),
        (Why.CURRENCY, "USD", 4410, 1),
        (Why.EVENT, "USD", 1000, 2),
    ]
    assert {d.kind for d in ledger.differences} == {Kind.MISMATCH}
    assert {(r.currency, r.difference_minor) for r in ledger.rows} == {
        ("EUR", -4410),
        ("USD", 5410),
    }


def test_the_currency_filter_finds_a_delivery_in_no_known_currency() -> None:
    """`--currency other` (any case) shows the day of a delivery whose currency the relay
    does not know, as `--currency usd` shows USD."""
    at, entries, messages = late_evening()
    odd = {"event": "purchase", "amount": 700, "currency": "XYZ"}
    messages = [*messages, message(9, "manual:9", odd, at + 5, MessageStatus.DELIVERED)]
    kwargs: dict[str, Any] = {
        "entries": entries,
        "messages": messages,
        "coverage": None,
        "destinations": ["faurya"],
        "tz": ZoneInfo("UTC"),
        "since": at - 60,
        "until": at + 86400,
        "now": at + 86400,
        "settle_s": 0,
    }
    for code in ("other", "OTHER"):
        rows = build(**kwargs, currency=code).rows
        assert [(r.currency, r.received.purchase_minor) for r in rows] == [("other", 700)]
    assert {r.currency for r in build(**kwargs, currency="usd").rows} == {"USD"}


def test_a_refund_delivered_as_a_negative_purchase_is_an_event_difference() -> None:
    """Polar's refund of 500 that Faurya got as a purchase of -500 moves the same money but is
    another event: an `event` mismatch of 0, not an `amount` one."""
    at = datetime(2026, 11, 30, 12, 0, tzinfo=UTC).timestamp()
    refund = PolarEntry(
        kind=PolarKind.REFUND,
        polar_id="r1",
        created_at=at,
        status="succeeded",
        mapping=EventStatus.ROUTED,
        expected=(Expected("faurya", "polar:refund:r1", RevenueFacts("refund", 500, "USD", True)),),
    )
    credit = {"event": "purchase", "amount": -500, "currency": "USD"}
    ledger = within_a_minute(
        at,
        [refund],
        [message(1, "polar:refund:r1", credit, at + 1, MessageStatus.DELIVERED)],
        PolarKind.REFUND,
    )
    assert [(d.kind, d.why, d.amount_minor) for d in ledger.differences] == [
        (Kind.MISMATCH, Why.EVENT, 0)
    ]
