"""The console's JSON API (/api/v1 on the admin listener) and the store work under it, through
real HTTP against an in-process relay: a real SQLite store in tmp_path, real signed webhooks on
the public port, a fake Faurya on loopback. Every route answers, every action changes the store,
writes an audit row and logs `console_action`; errors are JSON with a 4xx; no answer shows a
secret. Plus the store: search columns extracted at mapping time (and backfilled by the
migration), attempts recorded with their outcome and pruned with their message.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import sqlite3
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import pytest
import structlog
from aiohttp import web
from pytest_aiohttp import AiohttpServer

from relay.app import REJECTED, STORE
from relay.config import Secret
from relay.models import (
    AttemptRecord,
    BodyFacts,
    Dead,
    EventStatus,
    InboundDraft,
    MessageFilter,
    MessageStatus,
    OutboundDraft,
)
from relay.store import Store, migrations
from relay.store.outbox import Outbox
from tests.admin_helpers import ADMIN_TOKEN, READ_TOKEN, AdminRelay
from tests.conftest import MakeAdminRelay
from tests.helpers import (
    LEGACY_SECRET,
    STANDARD_SECRET,
    WRITE_KEY,
    FakeClock,
    order_paid,
    sign_headers,
    wait_until,
)
from tests.polar_fake import serve as serve_polar
from tests.test_console_pages import seed_ledger

SECRETS = (ADMIN_TOKEN, READ_TOKEN, WRITE_KEY, LEGACY_SECRET, STANDARD_SECRET)


@dataclass
class Relay(AdminRelay):
    """A relay and its admin listener, with the API's JSON answers checked for secrets."""

    headers: dict[str, str] = field(default_factory=dict)

    @property
    def store(self) -> Store:
        return self.main.app[STORE]

    async def get(self, path: str, status: int = 200, **kwargs: Any) -> Any:
        resp = await self.admin.get(path, headers=self.headers, **kwargs)
        text = await resp.text()
        assert resp.status == status, text
        assert resp.content_type == "application/json"
        for secret in SECRETS:
            assert secret not in text
        return json.loads(text)

    async def post(self, path: str, body: Any = None, status: int = 200) -> Any:
        resp = await self.admin.post(
            path, json=body if body is not None else {}, headers=self.headers
        )
        text = await resp.text()
        assert resp.status == status, text
        for secret in SECRETS:
            assert secret not in text
        return json.loads(text)

    async def item(self, order_id: str) -> dict[str, Any]:
        found = await self.get(f"/api/v1/messages?q={order_id}")
        assert len(found["items"]) == 1, found
        item: dict[str, Any] = found["items"][0]
        return item

    async def settled(self, order_id: str, status: str) -> dict[str, Any]:
        async def reached() -> bool:
            return bool((await self.item(order_id))["status"] == status)

        await wait_until(reached)
        return await self.item(order_id)


MakeRelay = Callable[..., Awaitable[Relay]]


@pytest.fixture
def make_relay(make_admin_relay: MakeAdminRelay) -> MakeRelay:
    return functools.partial(make_admin_relay, Relay)


@pytest.fixture
async def relay(make_relay: MakeRelay) -> Relay:
    """Open mode: a loopback admin listener and no token (the API acts as `local`)."""
    return await make_relay(token=None, read_token=None)


async def seed(relay: Relay) -> tuple[dict[str, Any], dict[str, Any]]:
    """One delivered purchase (ord_ok) and one dead one (ord_bad, Faurya answers 422)."""
    relay.refused.add("pol_bad")
    await relay.send("pol_ok", "ord_ok")
    await relay.send("pol_bad", "ord_bad")
    return (
        await relay.settled("ord_ok", "delivered"),
        await relay.settled("ord_bad", "dead"),
    )


async def test_summary_counts_revenue_risk_chart_and_retention(relay: Relay) -> None:
    """The summary counts each destination's messages by status, sums delivered revenue and
    the money in dead purchases per currency, charts the attempts, and shows retention."""
    await seed(relay)
    summary = await relay.get("/api/v1/summary")
    (faurya,) = [d for d in summary["destinations"] if d["name"] == "faurya"]
    assert (faurya["delivered"], faurya["dead"], faurya["pending"]) == (1, 1, 0)
    assert faurya["paused"] is False
    assert faurya["last_success_at"] is not None
    assert "422" in faurya["last_error"]
    [today] = summary["revenue"]["today"]
    assert today["amount_minor"] > 0
    assert today["count"] == 1
    [dead] = summary["at_risk"]["dead"]
    assert (dead["currency"], dead["amount_minor"], dead["count"]) == (
        today["currency"],
        today["amount_minor"],
        1,
    )
    assert len(summary["chart"]) == 60
    assert sum(m["delivered"] for m in summary["chart"]) == 1
    assert sum(m["failed"] for m in summary["chart"]) == 1
    assert summary["retention"]["rows_s"] > 0
    assert summary["retention"]["store_size_bytes"] > 0
    assert summary["open_access"] is True


async def test_messages_list_filters_search_and_pages(relay: Relay) -> None:
    """The list has the documented fields, searches order id / Polar id / webhook id / key,
    filters by several statuses and status class, and pages newest first by cursor."""
    ok, bad = await seed(relay)
    for name in ("id", "status", "destination", "route", "idempotency_key", "order_id"):
        assert name in ok
    assert {"attempts", "last_error", "created_at"} <= set(ok)
    assert ok["order_id"] == "ord_ok"
    assert (await relay.item("pol_bad"))["id"] == bad["id"]
    assert (await relay.item(bad["idempotency_key"]))["id"] == bad["id"]
    assert (await relay.item(bad["webhook_id"]))["id"] == bad["id"]

    both = await relay.get("/api/v1/messages?status=dead,delivered")
    assert [i["id"] for i in both["items"]] == sorted([ok["id"], bad["id"]], reverse=True)
    dead = await relay.get("/api/v1/messages?status=dead")
    assert [i["id"] for i in dead["items"]] == [bad["id"]]
    client_errors = await relay.get("/api/v1/messages?status_class=4xx")
    assert [i["id"] for i in client_errors["items"]] == [bad["id"]]
    assert (await relay.get("/api/v1/messages?destination=nowhere"))["items"] == []

    first = await relay.get("/api/v1/messages?limit=1")
    assert [i["id"] for i in first["items"]] == [max(ok["id"], bad["id"])]
    second = await relay.get(f"/api/v1/messages?limit=1&cursor={first['next']}")
    assert [i["id"] for i in second["items"]] == [min(ok["id"], bad["id"])]
    assert second["next"] is None


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("status=lost", "unknown status 'lost'"),
        ("status_class=6xx", "unknown status_class"),
        ("limit=0", "limit must be between"),
        ("limit=ten", "limit must be an integer"),
        ("cursor=%%%", "bad cursor"),
        ("since=yesterday", "cannot read time"),
        # {"id": 10**24}: beyond the stores' 64-bit ids (was an OverflowError, a 503)
        ("cursor=eyJpZCI6MTAwMDAwMDAwMDAwMDAwMDAwMDAwMDAwMH0", "bad cursor"),
    ],
)
async def test_messages_list_refuses_bad_parameters(relay: Relay, query: str, error: str) -> None:
    """A bad filter is a 400 naming the parameter, never a 500."""
    answer = await relay.get(f"/api/v1/messages?{query}", status=400)
    assert error in answer["error"]


async def test_message_detail_shows_attempts_inbound_and_request_without_secrets(
    relay: Relay,
) -> None:
    """One message: its attempts as a list (status, duration, snippet), the inbound webhook
    without its signature, the route and why, the request with the write key masked."""
    _, bad = await seed(relay)
    detail = await relay.get(f"/api/v1/messages/{bad['id']}")
    [attempt] = detail["attempts"]
    assert (attempt["number"], attempt["status"], attempt["outcome"]) == (1, 422, "dead")
    assert "unknown site" in attempt["response_snippet"]
    assert attempt["duration_s"] >= 0
    headers = dict(detail["inbound"]["headers"])
    assert "webhook-id" in headers
    assert "webhook-signature" not in headers
    assert detail["route_info"]["exists"] is True
    assert "order.paid" in detail["route_info"]["why"]
    sent = dict(detail["request"]["headers"])
    assert sent["idempotency-key"] == bad["idempotency_key"]
    assert "***" in sent.values()
    assert json.loads(detail["request"]["body"])["orderId"] == "ord_bad"
    assert detail["next_attempt_at"] is None


async def test_message_detail_of_a_missing_or_malformed_id(relay: Relay) -> None:
    """An unknown id is a JSON 404; a non-numeric one a 400."""
    assert "no message with id 999" in (await relay.get("/api/v1/messages/999", 404))["error"]
    assert "integer" in (await relay.get("/api/v1/messages/abc", 400))["error"]
    assert "no such id" in (await relay.get(f"/api/v1/messages/{10**24}", 404))["error"]
    assert "out of range" in (await relay.get(f"/api/v1/audit?before={10**24}", 400))["error"]


async def test_retry_sends_a_dead_message_again_and_is_audited(relay: Relay) -> None:
    """Retry makes a dead message due now: once Faurya is fixed it is delivered; the action
    is in the audit with actor `local` and logged as console_action."""
    _, bad = await seed(relay)
    relay.refused.clear()
    with structlog.testing.capture_logs() as logs:
        answer = await relay.post(f"/api/v1/messages/{bad['id']}/retry")
    assert (answer["action"], answer["count"], answer["ids"]) == ("retry", 1, [bad["id"]])
    await relay.settled("ord_bad", "delivered")
    [entry] = (await relay.get("/api/v1/audit"))["items"]
    assert (entry["actor"], entry["action"], entry["target"], entry["count"]) == (
        "local",
        "retry",
        str(bad["id"]),
        1,
    )
    assert any(e["event"] == "console_action" and e["action"] == "retry" for e in logs)
    again = await relay.post(f"/api/v1/messages/{bad['id']}/retry", status=409)
    assert "delivered" in again["error"]


async def test_replay_sends_a_delivered_message_again_under_the_same_key(relay: Relay) -> None:
    """Replay of a delivered message sends the same bytes with the same idempotency key."""
    ok, _ = await seed(relay)
    before = len(relay.faurya.received)
    answer = await relay.post(f"/api/v1/messages/{ok['id']}/replay")
    assert answer["count"] == 1
    sent = await relay.faurya.wait_for(before + 1)
    headers = [{k.lower(): v for k, v in r.headers.items()} for r in sent]
    keys = [
        h["idempotency-key"]
        for h, r in zip(headers, sent, strict=True)
        if r.json["orderId"] == "ord_ok"
    ]
    assert keys == [ok["idempotency_key"]] * 2

    async def twice() -> bool:
        detail = await relay.get(f"/api/v1/messages/{ok['id']}")
        return len(detail["attempts"]) == 2

    await wait_until(twice)


async def test_discard_needs_a_reason_and_a_dead_message(relay: Relay) -> None:
    """Discard takes {"reason"}; it applies to dead messages only; the reason is audited."""
    ok, bad = await seed(relay)
    assert "reason" in (await relay.post(f"/api/v1/messages/{bad['id']}/discard", {}, 400))["error"]
    conflict = await relay.post(f"/api/v1/messages/{ok['id']}/discard", {"reason": "x"}, 409)
    assert "only dead" in conflict["error"]
    answer = await relay.post(
        f"/api/v1/messages/{bad['id']}/discard", {"reason": "test order, never paid"}
    )
    assert answer["ids"] == [bad["id"]]
    detail = await relay.get(f"/api/v1/messages/{bad['id']}")
    assert (detail["status"], detail["discard_reason"]) == ("discarded", "test order, never paid")
    [entry] = (await relay.get("/api/v1/audit"))["items"]
    assert (entry["action"], entry["detail"]) == ("discard", "test order, never paid")


async def test_discard_with_a_body_that_is_not_json(relay: Relay) -> None:
    """A malformed body is a 400, not a 500."""
    _, bad = await seed(relay)
    resp = await relay.admin.post(
        f"/api/v1/messages/{bad['id']}/discard",
        data=b"{not json",
        headers={"Content-Type": "application/json"},
    )
    assert resp.status == 400
    assert (await resp.json())["error"] == "the body is not valid JSON"


async def test_dead_replay_by_filter_counts_then_replays_everything_matched(
    relay: Relay,
) -> None:
    """GET dead/replay says how many dead messages the filter matches; POST replays them all
    in a background job (not one page), answers the count, and is audited with the filter."""
    relay.refused.update({"pol_d1", "pol_d2", "pol_d3"})
    for n in (1, 2, 3):
        await relay.send(f"pol_d{n}", f"ord_d{n}")
    for n in (1, 2, 3):
        await relay.settled(f"ord_d{n}", "dead")
    assert (await relay.get("/api/v1/dead/replay?destination=faurya"))["count"] == 3
    assert (await relay.get("/api/v1/dead/replay?destination=other"))["count"] == 0
    relay.refused.clear()
    answer = await relay.post("/api/v1/dead/replay?destination=faurya")
    assert answer["count"] == 3
    job_id = answer["job"]["id"]
    for n in (1, 2, 3):
        await relay.settled(f"ord_d{n}", "delivered")

    async def done() -> bool:
        return bool((await relay.get(f"/api/v1/jobs/{job_id}"))["status"] == "done")

    await wait_until(done)
    job = await relay.get(f"/api/v1/jobs/{job_id}")
    assert (job["total"], job["done"]) == (3, 3)
    [entry] = (await relay.get("/api/v1/audit"))["items"]
    assert (entry["action"], entry["target"], entry["count"]) == (
        "bulk_replay",
        "status=dead&destination=faurya",
        3,
    )


async def test_pause_and_resume_a_destination(relay: Relay) -> None:
    """Pause holds a destination's messages (the summary says paused); resume sends them."""
    await relay.post("/api/v1/destinations/faurya/pause")

    async def paused() -> bool:
        summary = await relay.get("/api/v1/summary")
        return bool(summary["destinations"][0]["paused"])

    await wait_until(paused)
    await relay.send("pol_p", "ord_p")
    assert (await relay.item("ord_p"))["status"] == "pending"
    await relay.post("/api/v1/destinations/faurya/resume")
    await relay.settled("ord_p", "delivered")
    actions = [e["action"] for e in (await relay.get("/api/v1/audit"))["items"]]
    assert actions == ["resume", "pause"]
    missing = await relay.post("/api/v1/destinations/nowhere/pause", status=404)
    assert "no destination named 'nowhere'" in missing["error"]


async def test_dry_run_shows_what_each_route_would_send(relay: Relay) -> None:
    """A pasted Polar event: the route that takes it with the body and key it would send, the
    others with why not; nothing is stored."""
    event = json.loads(order_paid("pol_dry", orderId="ord_dry"))
    answer = await relay.post("/api/v1/dry-run", event)
    assert answer["status"] == "routed"
    chosen = [r for r in answer["routes"] if r["selected"]]
    assert len(chosen) == 1
    assert json.loads(chosen[0]["body"])["orderId"] == "ord_dry"
    assert all(r["reason"] for r in answer["routes"] if not r["selected"])
    assert (await relay.get("/api/v1/messages"))["items"] == []
    assert "JSON object" in (await relay.post("/api/v1/dry-run", [1, 2], 400))["error"]
    resp = await relay.admin.post(
        "/api/v1/dry-run", data=b"", headers={"Content-Type": "application/json"}
    )
    assert resp.status == 400


async def test_rejected_requests_are_listed_without_a_body(relay: Relay) -> None:
    """A webhook with a bad signature and a request to an unknown path are in the rejected
    list (time, address, reason, webhook id), never their body; the store holds nothing."""
    body = order_paid("pol_forged", orderId="ord_forged")
    headers = sign_headers(body, msg_id="msg_forged")
    headers["webhook-signature"] = "v1,AAAA"
    assert (await relay.main.post("/webhooks/polar", data=body, headers=headers)).status == 401
    assert (await relay.main.get("/wp-login.php")).status == 404
    answer = await relay.get("/api/v1/rejected")
    reasons = {(r["reason"], r["path"], r["webhook_id"]) for r in answer["items"]}
    assert reasons == {
        ("bad_signature", "/webhooks/polar", "msg_forged"),
        ("unknown_path", "/wp-login.php", None),
    }
    assert all(r["address"] == "127.0.0.1" for r in answer["items"])
    assert "ord_forged" not in json.dumps(answer)
    assert relay.main.app[REJECTED].total == 2
    assert (await relay.get("/api/v1/messages"))["items"] == []


async def test_unknown_api_route_is_a_json_404(relay: Relay) -> None:
    """/api/v1/anything-else answers JSON, not an HTML 404."""
    assert "no API route" in (await relay.get("/api/v1/nothing", 404))["error"]


async def test_job_cancel_of_a_finished_job_and_restart_of_a_running_one(relay: Relay) -> None:
    """Cancel and restart refuse jobs they do not apply to (409) and unknown ids (404)."""
    answer = await relay.post("/api/v1/dead/replay")
    job_id = answer["job"]["id"]

    async def done() -> bool:
        return bool((await relay.get(f"/api/v1/jobs/{job_id}"))["status"] == "done")

    await wait_until(done)
    assert "not running" in (await relay.post(f"/api/v1/jobs/{job_id}/cancel", status=409))["error"]
    assert (
        "nothing to restart"
        in (await relay.post(f"/api/v1/jobs/{job_id}/restart", status=409))["error"]
    )
    assert (await relay.get("/api/v1/jobs/77", 404))["error"] == "no job with id 77"
    assert [j["id"] for j in (await relay.get("/api/v1/jobs"))["items"]] == [job_id]


# ---------------------------------------------------------------- the store under the console


async def test_interrupted_job_is_shown_and_restarts_where_it_stopped(
    relay: Relay,
) -> None:
    """A job whose relay stopped (no heartbeat for a minute) shows as interrupted; restart
    continues it from its last batch and replays the rest."""
    relay.refused.update({"pol_i1", "pol_i2"})
    for n in (1, 2):
        await relay.send(f"pol_i{n}", f"ord_i{n}")
        await relay.settled(f"ord_i{n}", "dead")
    relay.refused.clear()
    store = relay.store
    upper = await store.console_max_id()
    job_id = await store.create_job("replay_dead", "", "admin", 2, upper, "gone-host:1:abc")
    # Its runner's last heartbeat, two minutes ago: that relay is gone.
    outbox = cast(Outbox, store)
    await outbox._exec(
        "UPDATE console_jobs SET heartbeat_at = ? WHERE id = ?", (outbox._clock.now() - 120, job_id)
    )
    job = await relay.get(f"/api/v1/jobs/{job_id}")
    assert job["status"] == "interrupted"
    summary = await relay.get("/api/v1/summary")
    assert [j["id"] for j in summary["jobs"]] == [job_id]
    restarted = await relay.post(f"/api/v1/jobs/{job_id}/restart")
    assert restarted["job"]["status"] == "running"
    for n in (1, 2):
        await relay.settled(f"ord_i{n}", "delivered")


async def test_search_columns_are_extracted_at_mapping_time(relay: Relay) -> None:
    """A purchase's message carries order id, Polar payment id, kind, amount, currency and
    attribution in its own columns (indexed), from the body the mapping built."""
    await relay.send("pol_cols", "ord_cols", faSessionId="sess_1")
    item = await relay.item("ord_cols")
    assert item["payment_ref"] == "pol_cols"
    assert item["event_kind"] == "purchase"
    assert isinstance(item["amount_minor"], int)
    assert item["currency"] == item["currency"].upper()


def store_before_the_console(path: Path) -> sqlite3.Connection:
    """A SQLite store at schema 5 (before the console's migration) with one inbound event
    (id 1), open for the test to add the messages an older relay wrote."""
    db = sqlite3.connect(path)
    for version, sql in migrations():
        if version > 5:
            break
        db.executescript(sql)
        db.execute(f"PRAGMA user_version = {version}")
    db.execute(
        "INSERT INTO inbound_events (id, source, webhook_id, event_type, received_at, "
        "headers_json, body, status) VALUES (1, 'polar', 'w1', 'order.paid', 0, '{}', NULL, "
        "'routed')"
    )
    return db


def migrate_to_latest(path: Path) -> None:
    """Open the store as the relay does, which runs the migrations still to run."""

    async def reopen() -> None:
        store = await Store.open(str(path))
        await store.close()

    asyncio.run(reopen())


def test_migration_backfills_search_columns_from_stored_bodies(tmp_path: Path) -> None:
    """A store written before the console gets its search columns filled once by the
    migration, from each message's body."""
    path = tmp_path / "old.db"
    db = store_before_the_console(path)
    body = {
        "event": "purchase",
        "amount": 4410,
        "currency": "usd",
        "orderId": "ord_old",
        "providerPaymentId": "pol_old",
        "attribution": {"faSessionId": "s"},
    }
    db.execute(
        "INSERT INTO outbound_messages (event_id, route, destination, idempotency_key, body, "
        "status, created_at, retry_from_at, next_attempt_at, updated_at) "
        "VALUES (1, 'r', 'faurya', 'k', ?, 'dead', 0, 0, 0, 0)",
        (json.dumps(body).encode(),),
    )
    db.commit()
    db.close()
    migrate_to_latest(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        row = db.execute(
            "SELECT order_id, payment_ref, event_kind, amount_minor, currency, attributed "
            "FROM outbound_messages"
        ).fetchone()
    assert row == ("ord_old", "pol_old", "purchase", 4410, "USD", 1)


async def test_attempts_are_recorded_with_outcomes_and_pruned_with_messages(
    relay: Relay,
) -> None:
    """Each attempt is one row (a retry then a success: two), and retention deletes a
    delivered message's attempts with it."""
    calls = {"n": 0}

    async def flaky(request: web.Request, n: int) -> web.StreamResponse:
        calls["n"] += 1
        if calls["n"] == 1:
            return web.json_response({"error": "busy"}, status=503)
        return web.json_response({"ok": True})

    relay.faurya.script = flaky
    await relay.send("pol_flaky", "ord_flaky")

    async def two_attempts() -> bool:
        item = await relay.item("ord_flaky")
        if item["status"] == "pending" and item["attempts"] > 0:
            # Due now instead of after the backoff (what the console's retry does).
            await relay.store.replay(
                MessageFilter(ids=(item["id"],), statuses=(MessageStatus.PENDING,))
            )
        return bool(item["status"] == "delivered")

    await wait_until(two_attempts)
    item = await relay.item("ord_flaky")
    attempts = await relay.store.console_attempts(item["id"])
    assert [(a.outcome, a.status) for a in attempts] == [("retry", 503), ("delivered", 200)]
    outbox = cast(Outbox, relay.store)
    result = await outbox.prune(bodies_before=0, rows_before=outbox._clock.now() + 1)
    assert result.messages_deleted == 1
    assert await outbox.console_attempts(item["id"]) == []
    rows = await outbox._fetch("SELECT COUNT(*) FROM message_attempts")
    assert rows[0][0] == 0


async def test_a_read_only_service_call_on_the_guarded_api(make_relay: MakeRelay) -> None:
    """With tokens set, the API answers the admin token and acts as `admin` in the audit."""
    relay = await make_relay(token=Secret(ADMIN_TOKEN), read_token=Secret(READ_TOKEN))
    relay.headers = {"Authorization": f"Bearer {ADMIN_TOKEN}"}
    await relay.post("/api/v1/destinations/faurya/pause")
    [entry] = (await relay.get("/api/v1/audit"))["items"]
    assert entry["actor"] == "admin"


# ---------------------------------------------------------------- the ledger


async def test_ledger_answers_polar_against_faurya_per_day_with_each_difference(
    make_relay: MakeRelay, aiohttp_server: AiohttpServer
) -> None:
    """GET /api/v1/ledger is the ledger as `relay ledger --format json` prints it: per day and
    currency Polar's net and the relay's, the signed difference, and each difference with
    its message id and fix; `currency` and `timezone` filter and cut the days."""
    polar = await serve_polar(aiohttp_server)
    relay = await make_relay(token=None, read_token=None, polar=polar)
    seed = await seed_ledger(relay.main, polar, relay.refused)
    data = await relay.get("/api/v1/ledger")
    assert polar.token not in json.dumps(data)
    assert data["polar"]["available"] is True
    assert data["timezone"] == "UTC"
    days = {d["currency"]: d for d in data["days"]}
    assert days["USD"]["polar"]["net_minor"] == 3734
    assert days["USD"]["delivered"]["net_minor"] == 1234 + 4410
    assert days["USD"]["dead"]["net_minor"] == 2500
    assert days["USD"]["difference_minor"] == 2500 - 4410
    assert (days["EUR"]["difference_minor"], days["EUR"]["exponent"]) == (500, 2)
    shape = {
        (d["kind"], d["why"], d["currency"], d["amount_minor"], d["message_id"])
        for d in data["differences"]
    }
    assert shape == {
        ("missing", "dead", "USD", 2500, seed.dead_message),
        ("missing", "never_received", "EUR", 500, None),
        ("unknown_to_polar", "not_found", "USD", -4410, seed.forged_message),
    }
    dead = next(d for d in data["differences"] if d["why"] == "dead")
    assert dead["polar_id"] == seed.dead_order
    assert dead["fix"].endswith(f"relay outbox retry {seed.dead_message}")

    euro = await relay.get("/api/v1/ledger?currency=eur&timezone=Asia/Tokyo&since=2d")
    assert euro["timezone"] == "Asia/Tokyo"
    assert [d["currency"] for d in euro["days"]] == ["EUR"]
    assert [d["polar_id"] for d in euro["differences"]] == [seed.lost_order]


async def test_ledger_without_a_polar_token_shows_the_relays_side(relay: Relay) -> None:
    """Without polar_api.token the ledger says Polar's side needs it (and which scopes) and
    still counts what the relay delivered and what is dead."""
    await seed(relay)
    data = await relay.get("/api/v1/ledger")
    assert data["polar"]["available"] is False
    for words in ("polar_api.token", "orders:read", "refunds:read"):
        assert words in data["polar"]["note"]
    [day] = data["days"]
    assert day["polar"] is None
    assert (day["delivered"]["purchases"], day["dead"]["purchases"]) == (1, 1)
    assert data["differences"] == []


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("timezone=Mars/Olympus", "timezone: unknown time zone 'Mars/Olympus'"),
        ("timezone=../../etc/passwd", "unknown time zone"),
        ("since=yesterday", "cannot read time 'yesterday'"),
        ("until=2026-13-40", "cannot read time"),
        ("since=99999999999999d", "out of range"),
        ("since=0001-01-01T00:00:00", "out of range"),
        # Beyond datetime's end, as a day or as a time a zone east of UTC cannot show.
        ("until=9999-12-31", "until: cannot read time '9999-12-31'"),
        ("timezone=Pacific/Kiritimati&until=9999-12-31T23:00:00", "until: '9999-12-31T23"),
        ("since=2026-12-02&until=2026-12-01", "until must be after since"),
        ("currency=US%24", "currency must be a currency code"),
    ],
)
async def test_ledger_refuses_bad_parameters(relay: Relay, query: str, error: str) -> None:
    """A time zone, date or currency the ledger cannot read is a 400 saying which."""
    data = await relay.get(f"/api/v1/ledger?{query}", status=400)
    assert error in data["error"]


# ---------------------------------------------------------------- both backends


T0 = 1_700_000_000.0


@pytest.fixture(params=["sqlite", "postgres"])
def store_location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file in tmp_path, or a fresh PostgreSQL database (tests/pg.py)."""
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    return str(request.getfixturevalue("pg_url"))


def purchase(order_id: str, amount: int, *, event: str = "purchase") -> OutboundDraft:
    body = {
        "event": event,
        "amount": amount,
        "currency": "eur",
        "orderId": order_id,
        "providerPaymentId": f"pol_{order_id}",
        "attribution": {},
    }
    return OutboundDraft(
        route="order_paid",
        destination="faurya",
        idempotency_key=f"key_{order_id}",
        body=json.dumps(body).encode(),
        facts=BodyFacts.of(body),
    )


def inbound(webhook_id: str, *messages: OutboundDraft) -> InboundDraft:
    return InboundDraft(
        source="polar",
        webhook_id=webhook_id,
        event_type="order.paid",
        received_at=T0,
        headers={"webhook-id": webhook_id, "webhook-signature": "v1,sig"},
        body=b'{"type": "order.paid"}',
        status=EventStatus.ROUTED,
        messages=messages,
    )


async def seed_three(store: Store) -> tuple[int, int, int]:
    """Three purchases (1000, 5000 and 300 cents): the first delivered, the other two dead
    with HTTP 422, each with its attempt recorded. Returns their message ids."""
    ids = []
    for n, amount in ((1, 1000), (2, 5000), (3, 300)):
        result = await store.enqueue(inbound(f"wh_{n}", purchase(f"ord_{n}", amount)))
        ids += list(result.message_ids)
    one, two, three = ids
    # 35 s into a minute: PostgreSQL's CAST would round it into the next one.
    attempt = AttemptRecord(T0 + 15, 422, None, 0.05, "unknown site")
    for claimed in await store.claim("faurya", 3, 30.0):
        if claimed.id == one:
            assert await store.mark_delivered(claimed, 200, AttemptRecord(T0 + 15, 200, None, 0.01))
        else:
            assert await store.mark_dead(claimed, Dead("422", 422), "HTTP 422", attempt)
    return one, two, three


async def test_console_store_queries_on_both_backends(store_location: str) -> None:
    """The console's store methods answer the same on SQLite and PostgreSQL: search by each
    id, filters, keyset pages, attempts written with outcomes, revenue and money at risk,
    per-minute counts, audit rows, job rows with progress and interruption, and retention
    deleting a delivered message's attempts."""
    from relay.console.service import Cursor, ListFilters, Sort, StatusClass
    from relay.store import open_store

    clock = FakeClock(T0)
    store = await open_store(store_location, clock=clock, serve=True)
    try:
        one, two, three = await seed_three(store)

        async def found(**kw: Any) -> list[int]:
            items = await store.console_messages(ListFilters(**kw), None, 10)
            return [i.id for i in items]

        assert await found(q="ord_2") == [two]
        assert await found(q="pol_ord_3") == [three]
        assert await found(q="key_ord_1") == [one]
        assert await found(q="wh_3") == [three]
        assert await found(q=str(two)) == [two]
        assert await found(statuses=(MessageStatus.DEAD,)) == [three, two]
        assert await found(status_class=StatusClass.S4XX) == [three, two]
        assert await found(status_class=StatusClass.S2XX) == [one]
        assert await found(route="other") == []
        assert await found(since=T0) == [three, two, one]
        assert await found(since=T0 + 1000) == []
        assert await found(until=T0) == []
        assert await found(until=T0 + 1, since=T0 - 1) == [three, two, one]
        assert await found(
            until=T0 + 1, statuses=(MessageStatus.DEAD, MessageStatus.DELIVERED)
        ) == [
            three,
            two,
            one,
        ]
        assert await found(sort=Sort.AMOUNT, statuses=(MessageStatus.DEAD,)) == [two, three]
        page = await store.console_messages(ListFilters(), Cursor(two), 10)
        assert [i.id for i in page] == [one]
        by_amount = await store.console_messages(
            ListFilters(sort=Sort.AMOUNT), Cursor(two, 5000), 10
        )
        assert [i.id for i in by_amount] == [one, three]
        item = (await store.console_messages(ListFilters(q="ord_2"), None, 1))[0]
        assert (item.order_id, item.amount_minor, item.currency) == ("ord_2", 5000, "EUR")
        assert item.event_kind == "purchase"

        [recorded] = await store.console_attempts(two)
        assert (recorded.status, recorded.outcome, recorded.response_snippet) == (
            422,
            "dead",
            "unknown site",
        )
        assert len(await store.console_attempts(one)) == 1
        activity = await store.console_activity()
        assert activity["faurya"][0] == T0
        assert activity["faurya"][1] == "HTTP 422"
        assert await store.console_count_dead(ListFilters()) == 2
        assert await store.console_dead_batch(ListFilters(), 0, three, 1) == [two]
        assert await store.console_revenue(T0 - 1) == [("purchase", "EUR", 1000, 1, 1)]
        assert await store.console_at_risk(T0) == [("dead", "EUR", 5300, 2)]
        minute = int((T0 + 15) // 60)
        assert sorted(await store.console_minutes(T0 - 60)) == [
            (minute, "dead", 2),
            (minute, "delivered", 1),
        ]
        assert await store.console_waiting_destinations() == ["faurya"]
        counts = {(r[0], r[1]): r[2] for r in await store.console_status_counts(["faurya"])}
        assert counts == {("faurya", "dead"): 2}
        assert await store.console_delivered_count("faurya") == 1
        stored = await store.console_message_body(two)
        assert stored is not None
        event = await store.console_event(stored[0])
        assert event is not None
        assert event.webhook_id == "wh_2"
        assert await store.console_related(item, stored[0]) == []

    finally:
        await store.close()


async def test_console_audit_jobs_and_retention_on_both_backends(store_location: str) -> None:
    """Audit rows, bulk-job rows (progress, interruption after a minute without heartbeat,
    cancel seen by the runner), and retention deleting a delivered message's attempts, the
    same on SQLite and PostgreSQL."""
    from relay.store import open_store

    clock = FakeClock(T0)
    store = await open_store(store_location, clock=clock, serve=True)
    try:
        one, two, three = await seed_three(store)

        audit_id = await store.add_audit("admin", "retry", str(two), None, 1)
        [entry] = await store.audit_entries(10, None)
        assert (entry.id, entry.actor, entry.target) == (audit_id, "admin", str(two))
        assert await store.audit_entries(10, audit_id) == []

        job_id = await store.create_job("replay_dead", "status=dead", "admin", 2, three, "me")
        assert await store.job_progress(job_id, 1, two, "me") == "running"
        assert await store.job_position(job_id) == (two, three)
        job = await store.console_job(job_id)
        assert job is not None
        assert (job.status.value, job.done, job.total) == ("running", 1, 2)
        clock.advance(120)
        job = await store.console_job(job_id)
        assert job is not None
        assert job.status.value == "interrupted"
        assert await store.set_job_status(job_id, "cancelled", from_statuses=("running",))
        assert await store.job_progress(job_id, 1, three, "me") == "cancelled"
        assert not await store.set_job_status(job_id, "done", from_statuses=("running",))

        pruned = await store.prune(bodies_before=0, rows_before=T0 + 1)
        assert pruned.messages_deleted == 1
        assert await store.console_attempts(one) == []
        assert len(await store.console_attempts(two)) == 1
    finally:
        await store.close()


def test_migration_backfill_counts_attribution_as_the_relay_does(tmp_path: Path) -> None:
    """The backfilled `attributed` of an old message is what the mapping extracts at ingest
    (relay/models.py BodyFacts): an empty id (what a checkout sends for a missing one) is not
    attribution."""
    from relay.models import BodyFacts

    path = tmp_path / "old.db"
    db = store_before_the_console(path)
    attributions: list[object] = [
        {"faSessionId": "s"},
        {"faAttributionToken": "t"},
        {"faSessionId": "", "faAttributionToken": ""},
        {"faSessionId": ""},
        {"faSessionId": None},
        {},
        "s",
    ]
    for n, attribution in enumerate(attributions):
        body = {"event": "purchase", "amount": 1, "currency": "usd", "attribution": attribution}
        db.execute(
            "INSERT INTO outbound_messages (event_id, route, destination, idempotency_key, "
            "body, status, created_at, retry_from_at, next_attempt_at, updated_at) "
            "VALUES (1, 'r', 'faurya', ?, ?, 'delivered', 0, 0, 0, 0)",
            (f"k{n}", json.dumps(body).encode()),
        )
    db.commit()
    db.close()
    migrate_to_latest(path)
    with contextlib.closing(sqlite3.connect(path)) as db:
        rows = db.execute("SELECT body, attributed FROM outbound_messages ORDER BY id").fetchall()
    expected = []
    for body, _ in rows:
        facts = BodyFacts.of(json.loads(body))
        assert facts is not None
        expected.append(int(bool(facts.attributed)))
    assert [attributed for _, attributed in rows] == expected
