"""The attacker's review of the admin listener (docs/security.md, "Attacker's review"): each
attack that worked against the console before its fix, replayed through real HTTP against the
admin app of an in-process relay (raw sockets where aiohttp's client will not misbehave).

Token guessing past the sign-in limit, a session that outlived its sign-out, an open redirect
through a tab, /metrics read by a DNS-rebinding page, cross-site posts, answers without
security headers, and malformed input that used to end in a 500 and a traceback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import MutableMapping
from typing import Any

import pytest
import structlog

from relay import hardening
from relay.config import AdminConfig, Config, Secret
from relay.console.auth import (
    COOKIE,
    LOGIN_FAILURES_PER_WINDOW,
    MAX_TRACKED_CLIENTS,
    ConsoleAuth,
    LoginRefused,
)
from relay.console.service import Role
from tests.admin_helpers import ADMIN_TOKEN, READ_TOKEN, bearer, csrf_of, sign_in
from tests.conftest import MakeAdmin
from tests.helpers import Client, FakeClock, raw_connection


@pytest.fixture
async def open_admin(make_admin: MakeAdmin) -> Client:
    """A loopback admin listener without tokens: the open console."""
    return await make_admin(token=None, read_token=None)


async def audit_actions(admin: Client, **headers: str) -> list[str]:
    resp = await admin.get("/api/v1/audit", headers=headers)
    return [e["action"] for e in (await resp.json())["items"]]


async def raw_request(port: int, head: bytes, body: bytes = b"") -> tuple[int, bytes]:
    """Send a request as raw bytes (Connection: close) and return the status and the body."""
    async with raw_connection(port) as (reader, writer):
        length = b"Content-Length: %d\r\n" % len(body)
        writer.write(head.rstrip(b"\r\n") + b"\r\nConnection: close\r\n" + length + b"\r\n" + body)
        await writer.drain()
        answer = await reader.read()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


def no_traceback(logs: list[MutableMapping[str, Any]]) -> None:
    assert not [e for e in logs if e["event"] == "request_failed"], logs


# ---------------------------------------------------------------- guessing the token


async def test_wrong_bearer_tokens_share_the_sign_in_limit(admin: Client) -> None:
    """Five wrong bearer tokens a minute from one client and the sixth request gets 429 with
    Retry-After, even with the right token, on the API and /metrics, and the sign-in form is
    closed to that client too: a script cannot guess faster than the form. Each failure is
    logged as console_login_failed without the token offered."""
    with structlog.testing.capture_logs() as logs:
        for n in range(LOGIN_FAILURES_PER_WINDOW):
            path = "/metrics" if n % 2 else "/api/v1/summary"
            resp = await admin.get(path, headers=bearer(f"guess-{n}"))
            assert resp.status == 401, path
        api = await admin.get("/api/v1/summary", headers=bearer(ADMIN_TOKEN))
        metrics = await admin.get("/metrics", headers=bearer(ADMIN_TOKEN))
        form = await admin.post("/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert api.status == 429
    assert int(api.headers["Retry-After"]) > 0
    assert "too many wrong tokens" in (await api.json())["error"]
    assert metrics.status == 429
    assert form.status == 429
    failed = [e for e in logs if e["event"] == "console_login_failed"]
    assert [e["via"] for e in failed[:LOGIN_FAILURES_PER_WINDOW]] == [
        "api",
        "metrics",
        "api",
        "metrics",
        "api",
    ]
    assert {e["reason"] for e in failed[LOGIN_FAILURES_PER_WINDOW:]} == {"rate_limited"}
    assert all("guess-" not in str(e) and ADMIN_TOKEN not in str(e) for e in logs)


def test_an_ipv6_client_is_limited_by_its_slash_64() -> None:
    """Failures from one IPv6 /64 count together (a host picks any address in its /64), and a
    neighbouring /64 or an IPv4 client is not affected."""
    auth = ConsoleAuth(AdminConfig(listen="127.0.0.1:9090", token=Secret("tok")))
    for n in range(LOGIN_FAILURES_PER_WINDOW):
        with pytest.raises(LoginRefused):
            auth.check_login(f"2001:db8:0:1::{n + 1:x}", "nope")
    with pytest.raises(LoginRefused) as refused:
        auth.check_login("2001:db8:0:1:ffff::99", "tok")
    assert refused.value.retry_after_s is not None
    assert auth.check_login("2001:db8:0:2::1", "tok").actor == "admin"
    assert auth.check_login("192.0.2.7", "tok").actor == "admin"


def test_a_read_token_sign_in_does_not_reset_the_guesses_at_the_admin_token() -> None:
    """Only the admin token's sign-in clears a client's failures: a read-token holder who
    signs in between guesses still gets 429 after five wrong tokens, so the read token is no
    way to guess the admin token without limit."""
    auth = ConsoleAuth(
        AdminConfig(listen="127.0.0.1:9090", token=Secret(ADMIN_TOKEN), read_token=Secret("r"))
    )
    for n in range(LOGIN_FAILURES_PER_WINDOW):
        with pytest.raises(LoginRefused):
            auth.check_login("192.0.2.9", f"guess-{n}")
        if n < LOGIN_FAILURES_PER_WINDOW - 1:
            assert auth.check_login("192.0.2.9", "r").role is Role.READ
    with pytest.raises(LoginRefused) as refused:
        auth.check_login("192.0.2.9", "r")
    assert refused.value.retry_after_s is not None


def test_the_failed_token_count_keeps_a_bounded_number_of_clients() -> None:
    """Failures from more than MAX_TRACKED_CLIENTS addresses do not grow the count without
    bound: the clients whose last failure is oldest are forgotten first, and one that just
    went over the limit stays limited."""
    auth = ConsoleAuth(AdminConfig(listen="127.0.0.1:9090", token=Secret(ADMIN_TOKEN)))
    for n in range(MAX_TRACKED_CLIENTS):
        auth.failed(f"10.{n >> 16}.{(n >> 8) & 255}.{n & 255}")
    for _ in range(LOGIN_FAILURES_PER_WINDOW):
        auth.failed("192.0.2.1")
    assert len(auth._failures) <= MAX_TRACKED_CLIENTS
    assert "10.0.0.0" not in auth._failures  # the oldest went first
    assert auth.limited("192.0.2.1") is not None


def test_signing_out_revokes_the_session_everywhere() -> None:
    """A revoked session's cookie is refused by this process until it would have expired,
    and the list of revoked ids forgets those past their expiry."""
    clock = FakeClock(1_000_000.0)
    auth = ConsoleAuth(AdminConfig(listen="127.0.0.1:9090", token=Secret("t")), clock=clock.now)
    cookie, session = auth.new_cookie(Role.ACT)
    other, _ = auth.new_cookie(Role.READ)
    auth.revoke(session)
    assert auth.session(cookie) is None
    assert auth.session(other) is not None
    clock.advance(13 * 3600)
    later, later_session = auth.new_cookie(Role.ACT)
    auth.revoke(later_session)
    assert auth.session(later) is None
    assert list(auth._revoked) == [later_session.sid]  # the expired one was dropped


async def test_a_signed_out_cookie_no_longer_opens_the_console(admin: Client) -> None:
    """After "Sign out", a copy of the session cookie (another tab, a stolen one) is sent to
    the sign-in page, not shown the console."""
    await sign_in(admin)
    cookie = admin.session.cookie_jar.filter_cookies(admin.make_url("/"))[COOKIE].value
    resp = await admin.post("/logout", data={"csrf": await csrf_of(admin)}, allow_redirects=False)
    assert resp.status == 303
    resp = await admin.get("/", headers={"Cookie": f"{COOKIE}={cookie}"}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/login")


# ---------------------------------------------------------------- redirects


@pytest.mark.parametrize(
    "target",
    [
        "/\t/evil.example",
        "/\n/evil.example",
        "/\r/evil.example",
        "/ \\evil.example",
        "//evil.example",
    ],
    ids=["tab", "newline", "return", "backslash", "double-slash"],
)
async def test_sign_in_never_redirects_off_the_console(admin: Client, target: str) -> None:
    """A `next` that a browser would read as another site (it drops tabs and newlines, so
    "/<tab>/evil.example" is "//evil.example") redirects to the overview instead, from the
    sign-in form and from the login page of a signed-in browser; never a 500."""
    with structlog.testing.capture_logs() as logs:
        resp = await admin.post(
            "/login", data={"token": ADMIN_TOKEN, "next": target}, allow_redirects=False
        )
        assert resp.status == 303
        assert resp.headers["Location"] == "/"
        resp = await admin.get("/login", params={"next": target}, allow_redirects=False)
        assert resp.status == 303
        assert resp.headers["Location"] == "/"
    no_traceback(logs)


async def test_a_local_next_with_any_text_survives_sign_in(admin: Client) -> None:
    """A search link with spaces and non-ASCII text is still where sign-in goes back to,
    percent-encoded."""
    resp = await admin.post(
        "/login",
        data={"token": ADMIN_TOKEN, "next": "/messages?q=caf\u00e9 ord&x=1"},
        allow_redirects=False,
    )
    assert resp.headers["Location"] == "/messages?q=caf%C3%A9%20ord&x=1"


async def test_the_error_page_back_link_stays_on_the_console(admin: Client) -> None:
    """The error page's "Back" link comes from the Referer only when it is a path on this
    console: a tab trick in it gives "/"."""
    await sign_in(admin)
    referer = f"http://{admin.host}:{admin.port}/\t/evil.example"
    resp = await admin.get("/messages/999", headers={"Referer": referer})
    assert resp.status == 404
    assert '<a href="/">← Back</a>' in await resp.text()


# ---------------------------------------------------------------- DNS rebinding, cross-site


async def test_open_metrics_refuse_a_foreign_host(open_admin: Client) -> None:
    """Without admin.token, /metrics (revenue per currency) checks the Host like the console:
    a DNS-rebinding page on another name gets 421; the listener's own name still reads it."""
    assert open_admin.port is not None
    resp = await open_admin.get("/metrics", headers={"Host": f"evil.example:{open_admin.port}"})
    assert resp.status == 421
    assert (await open_admin.get("/metrics")).status == 200


async def test_metrics_with_a_token_answer_any_host(admin: Client) -> None:
    """With admin.token, the token guards /metrics and Prometheus may use any name."""
    resp = await admin.get("/metrics", headers={"Host": "relay.svc:9090", **bearer(ADMIN_TOKEN)})
    assert resp.status == 200


@pytest.mark.parametrize(
    "headers",
    [
        {"Origin": "https://evil.example"},
        {"Origin": "null"},
        {"Sec-Fetch-Site": "cross-site"},
        {"Sec-Fetch-Site": "same-site"},
    ],
    ids=["origin", "null-origin", "cross-site", "same-site"],
)
async def test_a_cross_site_page_post_is_refused_even_with_the_csrf_token(
    admin: Client, headers: dict[str, str]
) -> None:
    """A state-changing page POST the browser marks as coming from another site is refused
    (403, logged), even carrying a valid session and CSRF token; nothing changes."""
    await sign_in(admin)
    csrf = await csrf_of(admin)
    with structlog.testing.capture_logs() as logs:
        resp = await admin.post(
            "/destinations/faurya/pause",
            data={"csrf": csrf},
            headers=headers,
            allow_redirects=False,
        )
    assert resp.status == 403
    assert "cross-site" in (await resp.json())["error"]
    assert any(e["event"] == "console_cross_site_refused" for e in logs)
    assert await audit_actions(admin, **bearer(ADMIN_TOKEN)) == []
    same = {"Origin": f"http://{admin.host}:{admin.port}", "Sec-Fetch-Site": "same-origin"}
    resp = await admin.post(
        "/destinations/faurya/pause", data={"csrf": csrf}, headers=same, allow_redirects=False
    )
    assert resp.status == 303
    assert await audit_actions(admin, **bearer(ADMIN_TOKEN)) == ["pause"]


async def test_an_origin_named_in_admin_hosts_is_the_console_itself(make_admin: MakeAdmin) -> None:
    """Behind a proxy that rewrites `Host`, the browser's `Origin` is one of admin.hosts: its
    posts are same-site; another origin is still refused."""
    admin = await make_admin(token=Secret(ADMIN_TOKEN), hosts=("relay.example.com",))
    await sign_in(admin)
    csrf = await csrf_of(admin)
    for origin, status in (("https://evil.example", 403), ("https://relay.example.com", 303)):
        resp = await admin.post(
            "/destinations/faurya/pause",
            data={"csrf": csrf},
            headers={"Origin": origin},
            allow_redirects=False,
        )
        assert resp.status == status, origin


async def test_a_cross_site_page_cannot_lock_the_operator_out(admin: Client) -> None:
    """Cross-site sign-in posts (a page guessing tokens in visitors' browsers) are refused
    before they count: the operator's own sign-in from the same address still works."""
    for _ in range(LOGIN_FAILURES_PER_WINDOW + 1):
        resp = await admin.post(
            "/login",
            data={"token": "guess"},
            headers={"Origin": "https://evil.example"},
            allow_redirects=False,
        )
        assert resp.status == 403
    await sign_in(admin)


async def test_the_open_console_refuses_a_cross_site_json_post(open_admin: Client) -> None:
    """In open mode a JSON POST that says it comes from another site is refused."""
    resp = await open_admin.post(
        "/api/v1/destinations/faurya/pause",
        json={},
        headers={"Origin": "https://evil.example"},
    )
    assert resp.status == 403
    assert await audit_actions(open_admin) == []


# ---------------------------------------------------------------- response headers


@pytest.mark.parametrize(
    ("path", "headers", "status"),
    [
        ("/api/v1/summary", {}, 401),
        ("/api/v1/summary", bearer(READ_TOKEN), 200),
        ("/api/v1/messages?limit=0", bearer(READ_TOKEN), 400),
        ("/api/v1/nowhere", bearer(READ_TOKEN), 404),
        ("/nowhere", {}, 404),
        ("/metrics", bearer(ADMIN_TOKEN), 200),
        ("/", {"Host": "evil.example"}, 421),
    ],
)
async def test_every_answer_is_unframeable_unsniffable_and_uncached(
    admin: Client, path: str, headers: dict[str, str], status: int
) -> None:
    """Not only the pages: API answers and errors, 404s, /metrics and the Host refusal carry
    nosniff, no-store, DENY framing and a CSP."""
    resp = await admin.get(path, headers=headers, allow_redirects=False)
    assert resp.status == status
    assert resp.headers["X-Content-Type-Options"] == "nosniff"
    assert resp.headers["Cache-Control"] == "no-store"
    assert resp.headers["X-Frame-Options"] == "DENY"
    assert "frame-ancestors 'none'" in resp.headers["Content-Security-Policy"]
    assert "Access-Control-Allow-Origin" not in resp.headers


# ---------------------------------------------------------------- malformed input: 4xx, never 500


@pytest.mark.parametrize(
    ("path", "status"),
    [
        ("/messages?limit=%C2%B2", 200),  # "²" is a digit to str.isdigit, not to int()
        ("/messages?limit=" + "9" * 5000, 200),
        ("/messages?q=%C2%B2", 200),
        ("/dead/replay?q=%C2%B2", 200),
        ("/audit?before=%C2%B2", 400),
        ("/api/v1/messages?q=%C2%B2", 200),
        ("/api/v1/dead/replay?q=%C2%B2", 200),
        ("/api/v1/messages/" + "9" * 5000, 404),
        ("/api/v1/jobs/" + "9" * 5000, 404),
    ],
)
async def test_odd_numbers_are_a_clear_answer(admin: Client, path: str, status: int) -> None:
    """Digits int() refuses (superscripts, 5,000 of them) in a limit, a search, a cursor
    position or an id: a page or a 4xx, never a 500 with a traceback."""
    await sign_in(admin)
    with structlog.testing.capture_logs() as logs:
        resp = await admin.get(path, headers=bearer(ADMIN_TOKEN))
    assert resp.status == status, await resp.text()
    no_traceback(logs)


async def test_deeply_nested_json_is_a_400(admin: Client) -> None:
    """A body nested past Python's recursion limit, to the dry run (API and page) and to a
    discard, is a 400 saying so, not a 500."""
    await sign_in(admin)
    deep = "[" * 100_000
    with structlog.testing.capture_logs() as logs:
        for path in ("/api/v1/dry-run", "/api/v1/messages/1/discard"):
            resp = await admin.post(
                path,
                data=deep,
                headers={**bearer(ADMIN_TOKEN), "Content-Type": "application/json"},
            )
            assert resp.status == 400, path
            assert (await resp.json())["error"] == "the body is nested too deeply"
        page = await admin.post("/routes", data={"csrf": await csrf_of(admin), "event": deep})
        assert page.status == 400
        assert "nested too deeply" in await page.text()
    no_traceback(logs)


async def test_odd_bytes_in_headers_and_cookies_are_refused_plainly(admin: Client) -> None:
    """Undecodable bytes in a bearer token, non-ASCII in a session cookie, and a Host port
    of odd digits answer 401, the sign-in page and 421, never a 500."""
    assert admin.port is not None
    host = b"Host: 127.0.0.1:%d\r\n" % admin.port
    with structlog.testing.capture_logs() as logs:
        status, _ = await raw_request(
            admin.port,
            b"GET /api/v1/summary HTTP/1.1\r\n" + host + b"Authorization: Bearer \xff\xfe\r\n",
        )
        assert status == 401
        status, _ = await raw_request(
            admin.port,
            b"GET /metrics HTTP/1.1\r\n" + host + b"Authorization: Bearer \xff\xfe\r\n",
        )
        assert status == 401
        for cookie in (b"a.act.1.\xc3\xa9", b"a.act.1.\xff", b"\xff.\xff.\xff.\xff"):
            status, _ = await raw_request(
                admin.port,
                b"GET / HTTP/1.1\r\n" + host + b"Cookie: " + COOKIE.encode() + b"=" + cookie,
            )
            assert status == 303
        for port in (b"\xc2\xb2", b"9" * 5000):
            status, _ = await raw_request(
                admin.port, b"GET / HTTP/1.1\r\nHost: 127.0.0.1:" + port + b"\r\n"
            )
            assert status == 421
    no_traceback(logs)


async def test_a_non_ascii_csrf_token_is_a_403(open_admin: Client) -> None:
    """A CSRF field with non-ASCII text is a wrong token (403), not a 500."""
    with structlog.testing.capture_logs() as logs:
        resp = await open_admin.post("/destinations/faurya/pause", data={"csrf": "\u00e9"})
    assert resp.status == 403
    no_traceback(logs)


# ---------------------------------------------------------------- relay check


def test_check_warns_about_a_short_admin_token(config: Config) -> None:
    """A token short enough to guess gets a `relay check` warning naming the key, never the
    token; a long one does not."""
    weak = dataclasses.replace(
        config,
        admin=dataclasses.replace(
            config.admin, token=Secret("changeme"), read_token=Secret("r" * 40)
        ),
    )
    found = [w for w in hardening.warnings(weak) if w.startswith("admin.")]
    assert found == [
        "admin.token: 8 characters can be guessed; use at least 20 random ones "
        "(openssl rand -hex 32)"
    ]
    strong = dataclasses.replace(
        config, admin=dataclasses.replace(config.admin, token=Secret("t" * 64))
    )
    assert not [w for w in hardening.warnings(strong) if w.startswith("admin.")]
