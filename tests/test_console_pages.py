"""The console's HTML pages on the admin listener, through real HTTP against an in-process relay
(a real SQLite store in tmp_path, a fake Faurya on loopback): every page renders for a signed-in
caller, redirects to the login form without one, refuses a read-only caller's actions, a
missing or wrong CSRF token and a foreign Host; the fix forms change the store and land on the
audit page. Plus the pure parts: the SVG chart and the value formatting.
"""

from __future__ import annotations

import asyncio
import functools
import re
import time
import xml.etree.ElementTree as ET
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import pytest
import structlog
from pytest_aiohttp import AiohttpServer

from relay.app import CONFIG, POLAR_API, STORE
from relay.config import Secret
from relay.console.auth import COOKIE
from relay.console.chart import ledger_svg, nice_ceiling, throughput_svg
from relay.console.formatting import (
    describe_condition,
    duration,
    minor_to_text,
    polar_money,
    target_links,
)
from relay.console.service import ListFilters, MessageItem
from relay.mapping.conditions import compile_condition
from relay.models import MessageStatus
from relay.reconcile import Reconciler
from tests.admin_helpers import ADMIN_TOKEN, CSRF_RE, READ_TOKEN, AdminRelay, csrf_of
from tests.conftest import MakeAdminRelay, store_of
from tests.helpers import (
    LEGACY_SECRET,
    WRITE_KEY,
    Client,
    FakeClock,
    order_paid,
    sign_headers,
    wait_until,
)
from tests.polar_fake import FakePolar
from tests.polar_fake import serve as serve_polar
from tests.polar_world import PolarWorld

SVG = "{http://www.w3.org/2000/svg}"


@dataclass(frozen=True)
class Minute:
    minute_at: float
    delivered: int
    failed: int


@dataclass
class Console(AdminRelay):
    """A relay and its admin listener, driven through the console's pages and forms."""

    async def message(self, order_id: str) -> MessageItem:
        page = await self.service.list_messages(ListFilters(q=order_id))
        assert len(page.items) == 1, page
        item: MessageItem = page.items[0]
        return item

    async def settled(self, order_id: str, status: MessageStatus) -> MessageItem:
        """The message of `order_id`, once it reached `status` (a deadline, not a sleep)."""
        async with asyncio.timeout(10):
            while (item := await self.message(order_id)).status is not status:  # noqa: ASYNC110
                await asyncio.sleep(0.02)
        return item

    async def page(self, path: str, **kwargs: Any) -> tuple[int, str]:
        resp = await self.admin.get(path, allow_redirects=False, **kwargs)
        return resp.status, await resp.text()

    async def csrf(self, path: str = "/") -> str:
        return await csrf_of(self.admin, path)

    async def post(self, path: str, data: dict[str, str]) -> tuple[int, str, str | None]:
        resp = await self.admin.post(path, data=data, allow_redirects=False)
        return resp.status, await resp.text(), resp.headers.get("Location")


MakeConsole = Callable[..., Awaitable[Console]]


@pytest.fixture
def make_console(make_admin_relay: MakeAdminRelay) -> MakeConsole:
    """Start a relay with the given admin settings (and `db`, `polar`): see
    `make_admin_relay`."""
    return functools.partial(make_admin_relay, Console)


@pytest.fixture
async def console(make_console: MakeConsole) -> Console:
    """Open mode: a loopback admin listener without a token."""
    return await make_console(token=None, read_token=None)


@pytest.fixture
async def guarded(make_console: MakeConsole) -> Console:
    """A loopback admin listener with an admin token and a read token: sign-in required."""
    return await make_console(token=Secret(ADMIN_TOKEN), read_token=Secret(READ_TOKEN))


async def sign_in(console: Console, token: str) -> None:
    status, _, location = await console.post("/login", {"token": token, "next": "/"})
    assert (status, location) == (303, "/")


async def seed(console: Console) -> tuple[MessageItem, MessageItem]:
    """One delivered purchase (ord_ok) and one dead one (ord_bad)."""
    console.refused.add("pol-bad")
    await console.send("pol-ok", "ord_ok")
    await console.send("pol-bad", "ord_bad")
    return (
        await console.settled("ord_ok", MessageStatus.DELIVERED),
        await console.settled("ord_bad", MessageStatus.DEAD),
    )


IDS = {"faVisitorId": "v_5f2c9e1ab7d34c0e", "faSessionId": "s_8d1a7c3e92f0b6d4"}


@dataclass(frozen=True)
class LedgerSeed:
    """What `seed_ledger` made: the Polar ids, and the ids of the dead and forged messages."""

    dead_order: str
    lost_order: str
    dead_message: int
    forged_message: int


async def seed_ledger(main: Client, polar: FakePolar, refused: set[str]) -> LedgerSeed:
    """Polar has three paid orders: one delivered (12.34 USD), one Faurya refuses (dead, 25.00
    USD) and one whose webhooks never came (5.00 EUR); the relay also delivered a purchase
    Polar never had (a forged webhook, 44.10 USD). Then a dry-run reconciliation stores
    Polar's side, as `relay serve` does every interval (the dry run enqueues nothing)."""
    world = PolarWorld(polar)
    world.purchase({"orderId": "ord_ok", **IDS}, net=1234, currency="usd")
    dead = world.purchase({"orderId": "ord_dead", **IDS}, net=2500, currency="usd")
    lost = world.purchase({"orderId": "ord_lost", **IDS}, net=500, currency="eur", lost=True)
    refused.add(dead["id"])
    bodies = [h.body() for h in world.webhooks if not h.lost]
    bodies.append(order_paid("pol-forged", orderId="ord_forged"))
    for body in bodies:
        resp = await main.post("/webhooks/polar", data=body, headers=sign_headers(body))
        assert resp.status == 202, await resp.text()
    store = main.app[STORE]

    async def settled() -> bool:
        counts = (await store.stats("faurya")).counts
        return (counts[MessageStatus.DELIVERED], counts[MessageStatus.DEAD]) == (2, 1)

    await wait_until(settled)
    config = main.app[CONFIG]
    api = main.app[POLAR_API]
    await Reconciler(store, config, api, FakeClock(time.time()), dry_run=True).run(None, None)
    messages = await store.list_messages()
    return LedgerSeed(
        dead_order=dead["id"],
        lost_order=lost["id"],
        dead_message=next(m.id for m in messages if m.status is MessageStatus.DEAD),
        forged_message=next(m.id for m in messages if b"pol-forged" in m.body),
    )


PAGES = (
    "/",
    "/messages",
    "/messages?status=dead&sort=amount",
    "/messages?q=ord_ok&live=1",
    "/rejected",
    "/routes",
    "/audit",
    "/dead/replay?status=dead",
    "/ledger",
    "/ledger?since=7d&currency=usd&timezone=Europe/Berlin",
)


# ---------------------------------------------------------------- every page renders


async def test_every_page_renders_for_the_local_caller_under_the_open_banner(
    console: Console,
) -> None:
    """Open mode: each page answers 200 HTML with the open-console banner, no-store, a CSP
    without script, and never the write key or the webhook secret."""
    delivered, dead = await seed(console)
    for path in (*PAGES, f"/messages/{delivered.id}", f"/messages/{dead.id}"):
        resp = await console.admin.get(path, allow_redirects=False)
        html = await resp.text()
        assert resp.status == 200, (path, html)
        assert resp.content_type == "text/html", path
        assert "Open console." in html, path
        assert resp.headers["Cache-Control"] == "no-store", path
        assert "script-src" not in resp.headers["Content-Security-Policy"], path
        assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"], path
        assert WRITE_KEY not in html, path
        assert LEGACY_SECRET not in html, path
        assert "<script" not in html, path
    css = await console.admin.get("/static/console.css")
    assert css.status == 200
    assert css.content_type == "text/css"


async def test_every_page_renders_on_postgresql(make_console: MakeConsole, pg_url: str) -> None:
    """The same pages over the PostgreSQL outbox: each renders, and a dead message's page
    shows its attempt; retry from the page delivers it once Faurya accepts it."""
    console = await make_console(db=pg_url, token=None, read_token=None)
    delivered, dead = await seed(console)
    for path in (*PAGES, f"/messages/{delivered.id}", f"/messages/{dead.id}"):
        status, html = await console.page(path)
        assert status == 200, (path, html)
    _, html = await console.page(f"/messages/{dead.id}")
    assert ">422<" in html
    console.refused.clear()
    csrf = await console.csrf()
    status, _, _ = await console.post(f"/messages/{dead.id}/retry", {"csrf": csrf})
    assert status == 303
    await console.settled("ord_bad", MessageStatus.DELIVERED)


async def test_overview_shows_counts_revenue_at_risk_and_the_chart(console: Console) -> None:
    """The overview has the destination's counts, today's delivered revenue, the dead money
    at risk linking to the dead letters sorted by amount, and an inline SVG chart."""
    await seed(console)
    status, html = await console.page("/")
    assert status == 200
    assert "44.10 USD" in html  # delivered today, and at risk (the same amount, dead)
    assert "1 dead purchase" in html
    assert 'href="/messages?status=dead&amp;sort=amount"' in html
    assert '<svg class="chart"' in html
    assert re.search(r"<desc>\d+ delivered and \d+ failed attempts", html)
    assert "faurya" in html
    assert "running" in html


async def test_message_page_shows_attempts_the_request_as_sent_and_the_inbound_webhook(
    console: Console,
) -> None:
    """One dead message: its 422 attempt with the response snippet, the request with the
    write key masked, the inbound headers without the signature, the route that mapped it."""
    _, dead = await seed(console)
    status, html = await console.page(f"/messages/{dead.id}")
    assert status == 200
    assert f"Message #{dead.id}" in html
    assert ">422<" in html
    assert "unknown site" in html  # the response snippet
    assert "Bearer ***" in html or "***" in html
    assert WRITE_KEY not in html
    assert "webhook-signature" not in html.lower()
    assert "webhook-id" in html
    assert "polar-order-paid" in html
    assert "Retry now" in html
    assert "Discard" in html


# ---------------------------------------------------------------- auth


async def test_pages_without_a_session_redirect_to_the_login_form(guarded: Console) -> None:
    """With a token configured, every page sends a browser without a session (or with a
    tampered cookie) to /login with the page to come back to, actions without one change
    nothing, and the login form itself renders without the open banner."""
    for path in PAGES:
        status, _ = await guarded.page(path)
        resp = await guarded.admin.get(path, allow_redirects=False)
        assert resp.status == 303, path
        assert resp.headers["Location"].startswith("/login?next=%2F"), path
    _, dead = await seed(guarded)
    for path in (f"/messages/{dead.id}", "/jobs/1"):
        resp = await guarded.admin.get(path, allow_redirects=False)
        assert resp.status == 303, path
    # A forged or tampered cookie is no session.
    guarded.admin.session.cookie_jar.update_cookies({COOKIE: "x.act.9999999999.deadbeef"})
    assert (await guarded.admin.get("/", allow_redirects=False)).status == 303
    # Actions without a session change nothing.
    for action in ("retry", "replay", "discard"):
        status, _, _ = await guarded.post(
            f"/messages/{dead.id}/{action}", {"csrf": "x", "reason": "r"}
        )
        assert status in (303, 401, 403), action
    assert (await guarded.message("ord_bad")).status is MessageStatus.DEAD
    status, html = await guarded.page("/login?next=/audit")
    assert status == 200
    assert 'name="next" value="/audit"' in html
    assert "Open console." not in html


async def test_login_sets_a_strict_httponly_session_and_logout_ends_it(guarded: Console) -> None:
    """The admin token signs in: a HttpOnly SameSite=Strict cookie, back to the page asked
    for (only a local path: no open redirect); sign-out clears it."""
    resp = await guarded.admin.post(
        "/login", data={"token": ADMIN_TOKEN, "next": "/audit"}, allow_redirects=False
    )
    assert resp.status == 303
    assert resp.headers["Location"] == "/audit"
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"] is True
    assert cookie["samesite"] == "Strict"
    status, html = await guarded.page("/")
    assert status == 200
    assert "signed in as <strong>admin</strong>" in html
    assert ADMIN_TOKEN not in html

    status, _, location = await guarded.post("/logout", {"csrf": CSRF_RE.findall(html)[0]})
    assert (status, location) == (303, "/login")
    assert (await guarded.admin.get("/", allow_redirects=False)).status == 303

    _, _, location = await guarded.post(
        "/login", {"token": ADMIN_TOKEN, "next": "//evil.example/x"}
    )
    assert location == "/"


async def test_wrong_tokens_are_refused_logged_and_rate_limited(guarded: Console) -> None:
    """A wrong token gets the form again with a 401 and `console_login_failed`; after five
    failures in a minute even the right token gets 429 with Retry-After."""
    with structlog.testing.capture_logs() as logs:
        for _ in range(5):
            status, html, _ = await guarded.post("/login", {"token": "nope", "next": "/"})
            assert status == 401
            assert "not this relay" in html
        resp = await guarded.admin.post(
            "/login", data={"token": ADMIN_TOKEN, "next": "/"}, allow_redirects=False
        )
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) >= 1
    assert "too many failed sign-ins" in await resp.text()
    failed = [e for e in logs if e["event"] == "console_login_failed"]
    assert [e["reason"] for e in failed] == ["wrong_token"] * 5 + ["rate_limited"]
    assert all("nope" not in str(e) for e in logs)


async def test_a_read_session_sees_pages_but_cannot_act(guarded: Console) -> None:
    """The read token signs in to look: every page renders, without fix buttons, and a
    forged retry with a valid CSRF token is 403 and changes nothing."""
    _, dead = await seed(guarded)
    await sign_in(guarded, READ_TOKEN)
    for path in PAGES:
        status, html = await guarded.page(path)
        assert status == 200, path
        assert "(read only)" in html, path
    status, html = await guarded.page(f"/messages/{dead.id}")
    assert status == 200
    assert "(read only)" in html
    assert "Retry now" not in html
    csrf = CSRF_RE.findall(html)[0]
    status, _, _ = await guarded.post(f"/messages/{dead.id}/retry", {"csrf": csrf})
    assert status == 403
    assert (await guarded.message("ord_bad")).status is MessageStatus.DEAD
    # The dry run only reads: a read session may use it.
    event = order_paid("pol-dry").decode()
    status, html, _ = await guarded.post("/routes", {"csrf": csrf, "event": event})
    assert status == 200, html


async def test_actions_without_or_with_a_wrong_csrf_token_are_refused(console: Console) -> None:
    """A form post without the CSRF field, or with another value, is 403 and the message
    stays dead (open mode too: a cross-site form must not act on a local console)."""
    _, dead = await seed(console)
    for data in ({}, {"csrf": "0" * 64}):
        status, _, _ = await console.post(f"/messages/{dead.id}/retry", data)
        assert status == 403, data
    assert (await console.message("ord_bad")).status is MessageStatus.DEAD


async def test_a_foreign_host_header_is_refused(console: Console) -> None:
    """DNS rebinding: a page asked for under another Host name is refused with 421."""
    port = console.admin.port
    assert port is not None
    for host in (f"evil.example:{port}", f"127.0.0.1:{port + 1}"):
        resp = await console.admin.get("/", headers={"Host": host}, allow_redirects=False)
        assert resp.status == 421, host
    resp = await console.admin.get("/", headers={"Host": f"localhost:{port}"})
    assert resp.status == 200


# ---------------------------------------------------------------- find


async def test_search_by_order_id_keeps_filters_in_the_url_and_pages_by_keyset(
    console: Console,
) -> None:
    """The search box finds a message by the merchant's order id; filters come back in the
    form; with a page size of 1 the "next" link leads to the older message; a bad filter is a
    400 with the reason, not a traceback."""
    await seed(console)
    status, html = await console.page("/messages?q=ord_bad")
    assert status == 200
    assert "ord_bad" in html
    assert "ord_ok" not in html
    assert 'value="ord_bad"' in html

    status, html = await console.page("/messages?status=delivered&status=dead&limit=1")
    assert status == 200
    first = re.findall(r'href="/messages/(\d+)"', html)
    nxt = re.search(r'rel="next" href="([^"]+)"', html)
    assert len(first) == 1
    assert nxt
    status, html = await console.page(nxt.group(1).replace("&amp;", "&"))
    second = re.findall(r'href="/messages/(\d+)"', html)
    assert len(second) == 1
    assert int(second[0]) < int(first[0])
    assert 'value="dead" checked' in html
    assert 'value="delivered" checked' in html

    status, html = await console.page("/messages?q=ord_ba")
    assert status == 200
    assert "No message matches these filters" in html
    assert "matches a whole id exactly" in html

    status, html = await console.page("/messages?status=lost")
    assert status == 400
    assert "unknown status" in html


async def test_audit_pages_back_and_refuses_a_bad_cursor(console: Console) -> None:
    """The audit page lists actions newest first; `before` must be an entry id (400 else)."""
    csrf = await console.csrf()
    for action in ("pause", "resume"):
        await console.post(f"/destinations/faurya/{action}", {"csrf": csrf})
    _, html = await console.page("/audit")
    assert html.index(">resume<") < html.index(">pause<")
    status, html = await console.page("/audit?before=abc")
    assert status == 400
    assert "before must be an audit entry id" in html


async def test_ids_too_large_for_the_store_are_not_found_not_a_crash(console: Console) -> None:
    """A message, job or audit id past 64 bits is a 404 (or 400), never a 5xx."""
    huge = "9" * 23
    with structlog.testing.capture_logs() as logs:
        for path in (f"/messages/{huge}", f"/jobs/{huge}"):
            status, _ = await console.page(path)
            assert status == 404, path
        status, _ = await console.page(f"/audit?before={huge}")
        assert status == 400
    assert not [e for e in logs if e["event"] == "request_failed"]


async def test_live_mode_refreshes_by_meta_tag(console: Console) -> None:
    """Live mode needs no script: a meta refresh, and a link to stop it."""
    _, html = await console.page("/messages?live=1")
    assert '<meta http-equiv="refresh" content="5">' in html
    assert "Stop live" in html
    _, html = await console.page("/messages")
    assert 'http-equiv="refresh"' not in html


# ---------------------------------------------------------------- fix


async def test_retry_after_fixing_faurya_delivers_and_is_audited(console: Console) -> None:
    """Retry on a dead message, once Faurya accepts it: redirect with a notice, the message
    is delivered with a second attempt, and the audit page shows who did it."""
    _, dead = await seed(console)
    console.refused.clear()
    csrf = await console.csrf(f"/messages/{dead.id}")
    status, _, location = await console.post(f"/messages/{dead.id}/retry", {"csrf": csrf})
    assert (status, location) == (303, f"/messages/{dead.id}?done=retry")
    assert location is not None
    await console.settled("ord_bad", MessageStatus.DELIVERED)
    _, html = await console.page(location)
    assert "Retry scheduled" in html
    assert "2 recorded" in html
    _, html = await console.page("/audit")
    assert "local" in html
    assert "retry" in html
    assert f'href="/messages/{dead.id}"' in html


async def test_discard_needs_a_reason_and_the_reason_is_on_the_audit_page(
    console: Console,
) -> None:
    """Discard without a reason is refused (400, still dead); with one the message is
    discarded, its page shows the reason (escaped) and no fix button, and the audit page shows
    the reason."""
    _, dead = await seed(console)
    csrf = await console.csrf(f"/messages/{dead.id}")
    status, html, _ = await console.post(f"/messages/{dead.id}/discard", {"csrf": csrf})
    assert status == 400
    assert "needs a reason" in html
    assert (await console.message("ord_bad")).status is MessageStatus.DEAD
    status, _, location = await console.post(
        f"/messages/{dead.id}/discard", {"csrf": csrf, "reason": "test order <b>x</b>"}
    )
    assert (status, location) == (303, f"/messages/{dead.id}?done=discard")
    assert (await console.message("ord_bad")).status is MessageStatus.DISCARDED
    _, html = await console.page(f"/messages/{dead.id}")
    assert "test order &lt;b&gt;x&lt;/b&gt;" in html
    assert "Retry now" not in html
    assert f'action="/messages/{dead.id}/replay"' not in html
    _, html = await console.page("/audit")
    assert "test order &lt;b&gt;x&lt;/b&gt;" in html


async def test_replay_of_a_delivered_message_sends_it_again_under_the_same_key(
    console: Console,
) -> None:
    """Replay sends a delivered message again with its idempotency key."""
    delivered, _ = await seed(console)
    before = len(console.faurya.received)
    csrf = await console.csrf(f"/messages/{delivered.id}")
    status, _, _ = await console.post(f"/messages/{delivered.id}/replay", {"csrf": csrf})
    assert status == 303
    calls = await console.faurya.wait_for(before + 1)
    keys = [{k.lower(): v for k, v in c.headers.items()}["idempotency-key"] for c in calls]
    assert keys[-1] == delivered.idempotency_key


async def test_an_action_that_does_not_apply_is_an_error_page(console: Console) -> None:
    """Discarding a delivered message is refused with the service's reason, as a page."""
    delivered, _ = await seed(console)
    csrf = await console.csrf()
    status, html, _ = await console.post(
        f"/messages/{delivered.id}/discard", {"csrf": csrf, "reason": "x"}
    )
    assert 400 <= status < 500
    assert "Cannot do that" in html
    status, _ = await console.page("/messages/999999")
    assert status == 404


async def test_pause_and_resume_a_destination_from_the_overview(console: Console) -> None:
    """The overview's pause button pauses the destination (shown as paused), resume undoes it;
    both are audited."""
    csrf = await console.csrf()
    status, _, location = await console.post("/destinations/faurya/pause", {"csrf": csrf})
    assert (status, location) == (303, "/?done=pause")
    assert location is not None
    _, html = await console.page(location)
    assert "Destination paused" in html
    assert '<span class="pill paused">paused</span>' in html
    status, _, _ = await console.post("/destinations/faurya/resume", {"csrf": csrf})
    assert status == 303
    _, html = await console.page("/")
    assert '<span class="pill running">running</span>' in html
    _, html = await console.page("/audit")
    assert "pause" in html
    assert "resume" in html


async def test_bulk_replay_confirms_the_count_then_runs_as_a_job(console: Console) -> None:
    """Replay all dead matching a filter: the confirmation says how many, the post starts a
    job, every matching dead message is delivered, and the finished job's page shows 2 of 2
    with no cancel button (a cancel now is a 409 page); the audit links the job."""
    console.refused |= {"pol-b1", "pol-b2"}
    for n in (1, 2):
        await console.send(f"pol-b{n}", f"ord_b{n}")
    for n in (1, 2):
        await console.settled(f"ord_b{n}", MessageStatus.DEAD)
    console.refused.clear()
    status, html = await console.page("/dead/replay?status=dead&destination=faurya")
    assert status == 200
    assert "This replays <strong>2</strong> dead messages" in html
    form = re.search(r'<form method="post" action="([^"]+)"', html)
    assert form
    csrf = CSRF_RE.findall(html)[0]
    status, _, location = await console.post(form.group(1).replace("&amp;", "&"), {"csrf": csrf})
    assert status == 303
    assert location
    assert re.fullmatch(r"/jobs/\d+", location)
    for n in (1, 2):
        await console.settled(f"ord_b{n}", MessageStatus.DELIVERED)
    job_id = int(location.rsplit("/", 1)[1])

    async def finished() -> bool:
        return bool((await console.service.job(job_id)).status.value == "done")

    await wait_until(finished)
    status, html = await console.page(location)
    assert status == 200
    assert "of 2" in html
    assert '<span class="pill done">done</span>' in html
    assert 'http-equiv="refresh"' not in html
    assert f'action="/jobs/{job_id}/cancel"' not in html
    # A finished job cannot be cancelled: an error page with the service's reason.
    status, html, _ = await console.post(f"/jobs/{job_id}/cancel", {"csrf": csrf})
    assert status == 409
    assert "is not running" in html
    _, html = await console.page("/audit")
    assert f'href="/jobs/{job_id}"' in html


async def test_an_interrupted_job_shows_on_the_overview_and_restarts_from_its_page(
    console: Console,
) -> None:
    """A bulk job its relay left unfinished shows on the overview as interrupted; its page
    offers Restart (no Cancel), and the restart finishes it."""
    console.refused.add("pol-int")
    await console.send("pol-int", "ord_int")
    await console.settled("ord_int", MessageStatus.DEAD)
    csrf = await console.csrf()
    _, _, location = await console.post("/dead/replay?status=dead", {"csrf": csrf})
    assert location is not None
    job_id = int(location.rsplit("/", 1)[1])

    async def finished() -> bool:
        return bool((await console.service.job(job_id)).status.value == "done")

    await wait_until(finished)
    # What a relay stopped mid-job leaves behind (the store's own transition, as at close).
    store = store_of(console.main)
    assert await store.set_job_status(job_id, "interrupted", from_statuses=("done",))
    _, html = await console.page("/")
    assert f'<a href="/jobs/{job_id}">Job #{job_id}</a>' in html
    assert '<span class="pill interrupted">interrupted</span>' in html
    _, html = await console.page(location)
    assert "stopped before it finished" in html
    assert f'action="/jobs/{job_id}/restart"' in html
    assert f'action="/jobs/{job_id}/cancel"' not in html
    status, _, back = await console.post(f"/jobs/{job_id}/restart", {"csrf": csrf})
    assert (status, back) == (303, f"/jobs/{job_id}?done=restart")
    await wait_until(finished)
    _, html = await console.page(f"/jobs/{job_id}")
    assert '<span class="pill done">done</span>' in html


async def test_dry_run_shows_what_each_route_would_send(console: Console) -> None:
    """The routes page lists the routes; pasting an order.paid shows the body the purchase
    route would send; bad JSON is a 400 with the parse error."""
    status, html = await console.page("/routes")
    assert status == 200
    assert "polar-order-paid" in html
    csrf = CSRF_RE.findall(html)[0]
    event = order_paid("pol-dry", orderId="ord_dry").decode()
    status, html, _ = await console.post("/routes", {"csrf": csrf, "event": event})
    assert status == 200, html
    assert "would send" in html
    assert "ord_dry" in html
    status, html, _ = await console.post("/routes", {"csrf": csrf, "event": "{nope"})
    assert status == 400
    assert "not JSON" in html


async def test_rejected_page_lists_a_bad_signature_without_its_body(console: Console) -> None:
    """A webhook with a bad signature shows on the rejected page with its reason and webhook
    id, and nothing of its body."""
    body = order_paid("pol-forged", orderId="ord_forged_secret_body")
    headers = sign_headers(body, msg_id="msg_forged_1")
    headers["webhook-signature"] = "v1,AAAA"
    resp = await console.main.post("/webhooks/polar", data=body, headers=headers)
    assert resp.status == 401
    status, html = await console.page("/rejected")
    assert status == 200
    assert "msg_forged_1" in html
    assert "signature" in html
    assert "ord_forged_secret_body" not in html


# ---------------------------------------------------------------- the revenue ledger


@pytest.fixture
async def polar(aiohttp_server: AiohttpServer) -> FakePolar:
    return await serve_polar(aiohttp_server)


async def test_ledger_page_shows_polar_against_faurya_and_each_difference(
    make_console: MakeConsole, polar: FakePolar
) -> None:
    """With Polar's side stored, the ledger page has a row per day and currency in major
    units (Polar, delivered, dead, the signed difference), a chart per currency, and each
    difference with its fix; the dead one links its message and has a CSRF-protected retry
    that, once Faurya accepts it, leaves only the differences a retry cannot fix."""
    console = await make_console(token=None, read_token=None, polar=polar)
    seed = await seed_ledger(console.main, polar, console.refused)
    status, html = await console.page("/ledger")
    assert status == 200, html
    assert 'href="/ledger" aria-current="page"' in html
    day = re.search(r"<td>(\d{4}-\d{2}-\d{2})</td>\s*<td>USD</td>(.*?)</tr>", html, re.S)
    assert day is not None, html
    cells = re.findall(r'<td class="num[^"]*">(.*?)</td>', day.group(2), re.S)
    text = [re.sub(r"\s+\(\d+\)", "", re.sub(r"<[^>]+>", "", c)).strip() for c in cells]
    assert text == [
        "37.34 USD",  # Polar: 12.34 + 25.00
        "56.44 USD",  # delivered: 12.34 + the forged 44.10
        "0.00 USD",
        "25.00 USD",  # dead
        "0.00 USD",
        "-19.10 USD",  # +25.00 never delivered, -44.10 Polar does not know
    ]
    assert ">+5.00 EUR<" in html
    assert html.count('<svg class="chart ledger-chart"') == 2
    assert "Differences (3)" in html
    assert f'<a href="/messages/{seed.dead_message}">' in html
    assert f'<a href="/messages/{seed.forged_message}">' in html
    assert seed.lost_order in html
    assert f"relay outbox retry {seed.dead_message}" in html
    assert f'action="/messages/{seed.dead_message}/retry"' in html
    assert f'action="/messages/{seed.forged_message}/' not in html
    assert "needs a token" not in html
    for secret in (polar.token, WRITE_KEY, LEGACY_SECRET):
        assert secret not in html

    console.refused.clear()
    csrf = CSRF_RE.findall(html)[0]
    status, _, location = await console.post(f"/messages/{seed.dead_message}/retry", {"csrf": csrf})
    assert (status, location) == (303, f"/messages/{seed.dead_message}?done=retry")
    await console.settled("ord_dead", MessageStatus.DELIVERED)
    _, html = await console.page("/ledger?currency=usd")
    assert "Differences (1)" in html
    assert f'<a href="/messages/{seed.forged_message}">' in html
    assert ">+5.00 EUR<" not in html


async def test_a_read_session_gets_the_ledger_with_links_but_no_retry_button(
    make_console: MakeConsole, polar: FakePolar
) -> None:
    """A read session sees the same differences; where the fix is a retry it gets a link to
    the message, not a form it could not use."""
    console = await make_console(
        token=Secret(ADMIN_TOKEN), read_token=Secret(READ_TOKEN), polar=polar
    )
    seed = await seed_ledger(console.main, polar, console.refused)
    await sign_in(console, READ_TOKEN)
    status, html = await console.page("/ledger")
    assert status == 200, html
    assert "Differences (3)" in html
    assert "/retry" not in html
    assert f'<a href="/messages/{seed.dead_message}">open the message to retry it</a>' in html
    for secret in (polar.token, ADMIN_TOKEN, READ_TOKEN, WRITE_KEY):
        assert secret not in html


async def test_ledger_page_without_a_polar_token_says_what_it_needs(console: Console) -> None:
    """No polar_api.token: the page says plainly that Polar's side needs it and its scopes,
    and still shows the relay's side (delivered, dead) per day, with no differences."""
    await seed(console)
    status, html = await console.page("/ledger")
    assert status == 200, html
    assert "Polar's side needs a token." in html
    for words in ("polar_api.token", "orders:read", "refunds:read", "disputes:read"):
        assert words in html
    assert "the relay's own side only" in html
    assert "44.10 USD" in html
    assert "unknown</span>" in html
    assert "Differences (0)" in html


@pytest.mark.parametrize(
    ("query", "error"),
    [
        ("timezone=Mars/Olympus", "unknown time zone"),
        ("since=yesterday", "cannot read time"),
        ("since=2026-12-02&until=2026-12-01", "until must be after since"),
        ("currency=US%24", "currency must be a currency code"),
    ],
)
async def test_ledger_page_refuses_bad_filters_and_keeps_them(
    console: Console, query: str, error: str
) -> None:
    """A filter the ledger cannot read is a 400 page that says why and keeps the form."""
    status, html = await console.page(f"/ledger?{query}")
    assert status == 400, html
    assert error in html
    assert 'action="/ledger"' in html


async def test_overview_links_the_ledger(console: Console) -> None:
    """The overview and the navigation link the ledger page."""
    _, html = await console.page("/")
    assert html.count('href="/ledger"') == 2


# ---------------------------------------------------------------- the chart


def _svg(text: str) -> ET.Element:
    return ET.fromstring(text)  # noqa: S314 - our own chart, made by the test


def test_chart_is_valid_svg_with_one_stacked_bar_per_busy_minute() -> None:
    """60 minutes give well-formed SVG: a delivered bar for each minute with deliveries, a
    failed bar stacked on top where some failed, labels -45m..now, and totals in <desc>."""
    minutes = [Minute(60.0 * i, i % 7, 2 if i == 59 else 0) for i in range(60)]
    root = _svg(throughput_svg(minutes))
    ok = root.findall(f".//{SVG}rect[@class='ok']")
    bad = root.findall(f".//{SVG}rect[@class='bad']")
    assert len(ok) == sum(1 for m in minutes if m.delivered)
    assert len(bad) == 1
    last_ok = ok[-1]
    # Stacked: the failed bar ends where the delivered bar of the same minute starts.
    assert float(bad[0].get("y", "0")) + float(bad[0].get("height", "0")) == pytest.approx(
        float(last_ok.get("y", "0")), abs=0.11
    )
    labels = [t.text for t in root.findall(f".//{SVG}text")]
    assert {"-45m", "-30m", "-15m", "now"} <= set(labels)
    desc = root.find(f"{SVG}desc")
    assert desc is not None
    delivered = sum(m.delivered for m in minutes)
    assert desc.text == f"{delivered} delivered and 2 failed attempts over the last 60 minutes"


def test_chart_of_a_quiet_hour_has_no_bars_and_a_scale_of_one() -> None:
    """No traffic: no bars, no division by zero, a y axis from 0 to 1."""
    root = _svg(throughput_svg([Minute(60.0 * i, 0, 0) for i in range(60)]))
    assert root.findall(f".//{SVG}rect") == []
    assert "1" in [t.text for t in root.findall(f".//{SVG}text")]


def test_chart_escapes_its_title() -> None:
    """A title is text, never markup, inside the SVG."""
    svg = throughput_svg([Minute(0.0, 1, 0)], title="<script>alert(1)</script>")
    assert "<script>" not in svg
    _svg(svg)


@dataclass(frozen=True)
class LedgerDay:
    label: str
    polar: int | None
    faurya: int


def test_ledger_chart_pairs_polar_and_faurya_per_day_and_goes_below_zero() -> None:
    """The ledger chart is well-formed SVG with a Polar bar and a Faurya bar per day (none
    for a zero or unknown side), an axis in major units, a negative net below the zero line,
    and its title escaped."""
    days = [
        LedgerDay("12-01", 3734, 5644),
        LedgerDay("12-02", None, 1000),
        LedgerDay("12-03", -500, 0),
    ]
    svg = ledger_svg(days, currency="USD", unit=100, title="<b>USD</b>")
    root = _svg(svg)
    assert "<b>" not in svg
    polar = root.findall(f".//{SVG}rect[@class='polar']")
    faurya = root.findall(f".//{SVG}rect[@class='faurya']")
    assert (len(polar), len(faurya)) == (2, 2)
    labels = [t.text for t in root.findall(f".//{SVG}text")]
    assert {"100", "0", "-5", "12-01", "12-03"} <= set(labels)
    zero = next(
        float(line.get("y1", "0"))
        for line, text in zip(
            root.findall(f".//{SVG}line"), root.findall(f".//{SVG}text"), strict=False
        )
        if text.text == "0"
    )
    assert float(polar[1].get("y", "0")) == pytest.approx(zero)  # the refund hangs down
    assert root.findtext(f"{SVG}desc") == "3 days in USD: Polar 32.34, Faurya 66.44"


@pytest.mark.parametrize(
    ("amount", "currency", "signed", "text"),
    [
        (4410, "USD", False, "44.10 USD"),
        (4410, "USD", True, "+44.10 USD"),
        (-1910, "USD", True, "-19.10 USD"),
        (0, "USD", True, "0.00 USD"),
        (4410, "JPY", False, "4,410 JPY"),
        (500, "ISK", False, "5.00 ISK"),  # ISO has no decimals; Polar has two
        (1234, "KWD", False, "12.34 KWD"),  # ISO three, Polar two
        (None, "USD", False, "\u2013"),
    ],
)
def test_ledger_money_uses_polars_exponents(
    amount: int | None, currency: str, signed: bool, text: str
) -> None:
    """The ledger's amounts read in major units by Polar's exponent, not ISO's."""
    assert polar_money(amount, currency, signed=signed) == text


@pytest.mark.parametrize(
    ("value", "top"), [(0, 1), (1, 1), (3, 5), (7, 10), (10, 10), (11, 20), (240, 500)]
)
def test_y_axis_top_is_a_round_number(value: int, top: int) -> None:
    """The y axis ends on 1, 2 or 5 times a power of ten, at or above the tallest bar."""
    assert nice_ceiling(value) == top


# ---------------------------------------------------------------- formatting


@pytest.mark.parametrize(
    ("amount", "currency", "text"),
    [
        (4410, "USD", "44.10 USD"),
        (-1000, "EUR", "-10.00 EUR"),
        (123456789, "USD", "1,234,567.89 USD"),
        (500, "JPY", "500 JPY"),
        (1234, "KWD", "1.234 KWD"),
        (None, "USD", "\u2013"),
    ],
)
def test_money_is_shown_in_major_units_to_the_cent(
    amount: int | None, currency: str, text: str
) -> None:
    """Minor units become the currency's major units exactly (no float), by its exponent."""
    assert minor_to_text(amount, currency) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0, "0 s"), (59, "59 s"), (61, "1 min"), (3600, "1 h"), (3720, "1 h 2 min"),
     (90000, "1 d 1 h"), (30 * 86400, "30 d")],
)  # fmt: skip
def test_durations_read_in_the_two_largest_units(seconds: float, text: str) -> None:
    """Ages and retention periods read as a person says them."""
    assert duration(seconds) == text


def test_audit_targets_link_messages_filters_and_jobs() -> None:
    """Message ids link to their pages, a filter to the list it selects, a job to its page;
    anything else is plain text."""
    assert target_links("12,13") == [
        {"text": "#12", "href": "/messages/12"},
        {"text": "#13", "href": "/messages/13"},
    ]
    assert target_links("status=dead&destination=faurya") == [
        {
            "text": "status=dead&destination=faurya",
            "href": "/messages?status=dead&destination=faurya",
        }
    ]
    assert target_links("job:7") == [{"text": "job:7", "href": "/jobs/7"}]
    assert target_links("faurya") == [{"text": "faurya", "href": None}]


def test_route_conditions_read_as_expressions() -> None:
    """A route's `when` is shown the way it reads in relay.toml's intent."""
    cond = compile_condition(
        {
            "all": [
                {"path": "data.billing_reason", "eq": "purchase"},
                {"path": "data.paid", "exists": True},
            ]
        },
        "routes[0].when",
    )
    text = describe_condition(cond)
    assert re.fullmatch(r'\(data\.billing_reason == "purchase" and data\.paid exists\)', text), text
