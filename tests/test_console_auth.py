"""Who may use the console (relay/console/auth.py), through real HTTP against the admin listener
of an in-process relay: the API's bearer tokens (missing, wrong, read-only acting), the Host
check against DNS rebinding, the signed session cookie and its CSRF token, the login rate limit,
and the open mode of a loopback listener without a token. Plus the config rules of the tokens.
"""

from __future__ import annotations

from typing import Any

import pytest
import structlog

from relay.config import AdminConfig, Secret
from relay.console.auth import COOKIE, LOGIN_FAILURES_PER_WINDOW, ConsoleAuth, LoginRefused
from relay.console.service import Role
from relay.errors import ConfigError
from tests.admin_helpers import ADMIN_TOKEN, READ_TOKEN, bearer, csrf_of, sign_in
from tests.conftest import MakeAdmin
from tests.helpers import Client, FakeClock, FakeFaurya, shipped_config


async def error_of(resp: Any) -> str:
    assert resp.content_type == "application/json"
    error: str = (await resp.json())["error"]
    return error


@pytest.mark.parametrize(
    "headers",
    [{}, bearer("wrong-token"), {"Authorization": f"Basic {ADMIN_TOKEN}"}, bearer("")],
    ids=["missing", "wrong", "not-bearer", "empty"],
)
@pytest.mark.parametrize(
    ("method", "path"),
    [
        ("GET", "/api/v1/summary"),
        ("GET", "/api/v1/messages"),
        ("GET", "/api/v1/messages/1"),
        ("GET", "/api/v1/audit"),
        ("GET", "/api/v1/rejected"),
        ("GET", "/api/v1/ledger"),
        ("POST", "/api/v1/messages/1/retry"),
        ("POST", "/api/v1/messages/1/replay"),
        ("POST", "/api/v1/messages/1/discard"),
        ("POST", "/api/v1/dead/replay"),
        ("POST", "/api/v1/destinations/faurya/pause"),
        ("POST", "/api/v1/destinations/faurya/resume"),
        ("POST", "/api/v1/dry-run"),
    ],
)
async def test_api_without_a_valid_token_is_401(
    admin: Client, headers: dict[str, str], method: str, path: str
) -> None:
    """Every API route answers 401 JSON (with a Bearer challenge) to a missing, wrong or
    non-bearer token, and changes nothing."""
    resp = await admin.request(method, path, headers=headers, json={"reason": "x"})
    assert resp.status == 401
    assert resp.headers["WWW-Authenticate"] == 'Bearer realm="relay-admin"'
    assert await error_of(resp) == "bearer token required"


@pytest.mark.parametrize(
    "path",
    [
        "/api/v1/messages/1/retry",
        "/api/v1/messages/1/replay",
        "/api/v1/messages/1/discard",
        "/api/v1/dead/replay",
        "/api/v1/destinations/faurya/pause",
        "/api/v1/destinations/faurya/resume",
        "/api/v1/jobs/1/cancel",
        "/api/v1/jobs/1/restart",
    ],
)
async def test_read_token_cannot_act(admin: Client, path: str) -> None:
    """The read token reads but every action answers 403, and no audit row is written."""
    resp = await admin.post(path, headers=bearer(READ_TOKEN), json={"reason": "x"})
    assert resp.status == 403
    assert "can only read" in await error_of(resp)
    audit = await admin.get("/api/v1/audit", headers=bearer(READ_TOKEN))
    assert (await audit.json())["items"] == []


async def test_read_token_reads_and_may_dry_run(admin: Client) -> None:
    """The read token lists, reads the summary and runs a dry run (which writes nothing)."""
    for path in (
        "/api/v1/summary",
        "/api/v1/messages",
        "/api/v1/audit",
        "/api/v1/rejected",
        "/api/v1/ledger",
    ):
        resp = await admin.get(path, headers=bearer(READ_TOKEN))
        assert resp.status == 200, path
    resp = await admin.post(
        "/api/v1/dry-run", headers=bearer(READ_TOKEN), json={"type": "order.paid", "data": {}}
    )
    assert resp.status == 200


async def test_admin_token_acts(admin: Client) -> None:
    """The admin token acts, and the audit names it `admin`."""
    resp = await admin.post("/api/v1/destinations/faurya/pause", headers=bearer(ADMIN_TOKEN))
    assert resp.status == 200
    audit = await (await admin.get("/api/v1/audit", headers=bearer(ADMIN_TOKEN))).json()
    assert [(e["actor"], e["action"]) for e in audit["items"]] == [("admin", "pause")]


async def test_api_ignores_the_session_cookie(admin: Client) -> None:
    """The API takes only the bearer header: a browser's session cookie (which a cross-site
    request would carry) does not authorize it."""
    await sign_in(admin, ADMIN_TOKEN)
    resp = await admin.post("/api/v1/destinations/faurya/pause")
    assert resp.status == 401


@pytest.mark.parametrize(
    "host",
    ["evil.example", "evil.example:{port}", "127.0.0.1:1", "attacker.test:{port}", "[::2]:{port}"],
)
async def test_a_foreign_host_is_refused(admin: Client, host: str) -> None:
    """A Host that is not the listener's (a DNS-rebinding page's name, another port) gets 421
    JSON on the API and the pages, whatever the token; the probes still answer."""
    assert admin.port is not None
    host = host.format(port=admin.port)
    with structlog.testing.capture_logs() as logs:
        for path in ("/api/v1/summary", "/api/v1/ledger", "/", "/ledger", "/login"):
            resp = await admin.get(path, headers={"Host": host, **bearer(ADMIN_TOKEN)})
            assert resp.status == 421, path
            assert "admin.hosts" in await error_of(resp)
    assert any(e["event"] == "console_host_refused" for e in logs)
    assert (await admin.get("/healthz", headers={"Host": host})).status == 200


@pytest.mark.parametrize("name", ["localhost", "127.0.0.1", "[::1]"])
async def test_loopback_names_of_the_same_port_are_accepted(admin: Client, name: str) -> None:
    """On a loopback listener, localhost / 127.0.0.1 / [::1] with its port are its own."""
    resp = await admin.get(
        "/api/v1/summary", headers={"Host": f"{name}:{admin.port}", **bearer(READ_TOKEN)}
    )
    assert resp.status == 200


async def test_configured_hosts_are_accepted(make_admin: MakeAdmin) -> None:
    """admin.hosts adds names the listener is reached by."""
    admin = await make_admin(token=Secret(ADMIN_TOKEN), hosts=("relay.internal:9090",))
    resp = await admin.get(
        "/api/v1/summary", headers={"Host": "relay.internal:9090", **bearer(ADMIN_TOKEN)}
    )
    assert resp.status == 200
    resp = await admin.get(
        "/api/v1/summary", headers={"Host": "relay.internal:9091", **bearer(ADMIN_TOKEN)}
    )
    assert resp.status == 421


async def test_session_cookie_is_signed_httponly_strict_and_expiring(admin: Client) -> None:
    """A login sets an HttpOnly, SameSite=Strict cookie with a 12 h lifetime, not Secure over
    plain HTTP; its value is not the token."""
    resp = await admin.post(
        "/login", data={"token": ADMIN_TOKEN, "next": "/"}, allow_redirects=False
    )
    cookie = resp.cookies[COOKIE]
    assert cookie["httponly"]
    assert cookie["samesite"] == "Strict"
    assert cookie["max-age"] == str(12 * 3600)
    assert not cookie["secure"]
    assert ADMIN_TOKEN not in cookie.value


@pytest.mark.parametrize("csrf", [None, "", "0" * 64], ids=["missing", "empty", "wrong"])
async def test_state_changing_page_requests_need_the_csrf_token(
    admin: Client, csrf: str | None
) -> None:
    """A signed-in browser's POST without the session's CSRF token is refused (403) and
    changes nothing; with it, it acts."""
    await sign_in(admin, ADMIN_TOKEN)
    data = {} if csrf is None else {"csrf": csrf}
    with structlog.testing.capture_logs() as logs:
        resp = await admin.post("/destinations/faurya/pause", data=data, allow_redirects=False)
    assert resp.status == 403
    assert "CSRF" in await error_of(resp)
    assert any(e["event"] == "console_csrf_refused" for e in logs)
    audit = await (await admin.get("/api/v1/audit", headers=bearer(ADMIN_TOKEN))).json()
    assert audit["items"] == []
    good = {"csrf": await csrf_of(admin)}
    resp = await admin.post("/destinations/faurya/pause", data=good, allow_redirects=False)
    assert resp.status == 303


async def test_a_read_session_cannot_act_through_the_pages(admin: Client) -> None:
    """Signed in with the read token, a page action with a valid CSRF token is still 403."""
    await sign_in(admin, READ_TOKEN)
    resp = await admin.post(
        "/destinations/faurya/pause", data={"csrf": await csrf_of(admin)}, allow_redirects=False
    )
    assert resp.status == 403


async def test_page_post_without_a_session_goes_to_the_login(admin: Client) -> None:
    """Without a session, a state-changing page request is sent to sign in, not acted on."""
    resp = await admin.post("/destinations/faurya/pause", data={}, allow_redirects=False)
    assert resp.status == 303
    assert resp.headers["Location"].startswith("/login")


async def test_failed_logins_are_rate_limited_and_logged(admin: Client) -> None:
    """Five wrong tokens a minute from one address are answered; the sixth attempt, even with
    the right token, is refused with Retry-After; each failure logs console_login_failed
    without the token."""
    with structlog.testing.capture_logs() as logs:
        for _ in range(LOGIN_FAILURES_PER_WINDOW):
            resp = await admin.post("/login", data={"token": "guess"}, allow_redirects=False)
            assert resp.status == 401
        resp = await admin.post("/login", data={"token": ADMIN_TOKEN}, allow_redirects=False)
    assert resp.status == 429
    assert int(resp.headers["Retry-After"]) > 0
    failed = [e for e in logs if e["event"] == "console_login_failed"]
    assert [e["reason"] for e in failed] == ["wrong_token"] * 5 + ["rate_limited"]
    assert all("guess" not in str(e) and ADMIN_TOKEN not in str(e) for e in logs)


def test_session_tampering_and_expiry() -> None:
    """A cookie is refused once its role, expiry or mac is changed, or after 12 hours; a
    cookie of another process (another key) is refused too."""
    clock = FakeClock(1_000_000.0)
    auth = ConsoleAuth(
        AdminConfig(listen="127.0.0.1:9090", token=Secret("a"), read_token=Secret("r")),
        clock=clock.now,
    )
    cookie, session = auth.new_cookie(Role.READ)
    assert auth.session(cookie) == session
    sid, role, expires, mac = cookie.split(".")
    assert auth.session(f"{sid}.act.{expires}.{mac}") is None
    assert auth.session(f"{sid}.{role}.{int(expires) + 3600}.{mac}") is None
    assert auth.session(f"{sid}.{role}.{expires}.{'0' * len(mac)}") is None
    assert auth.session("garbage") is None
    other = ConsoleAuth(AdminConfig(listen="127.0.0.1:9090", token=Secret("a")))
    assert other.session(cookie) is None
    clock.advance(12 * 3600)
    assert auth.session(cookie) is None


def test_login_window_forgets_old_failures() -> None:
    """The rate limit counts failures of the last minute: after it, a login works again."""
    clock = FakeClock(1_000_000.0)
    auth = ConsoleAuth(AdminConfig(listen="127.0.0.1:9090", token=Secret("tok")), clock=clock.now)
    for _ in range(LOGIN_FAILURES_PER_WINDOW):
        with pytest.raises(LoginRefused):
            auth.check_login("10.0.0.1", "nope")
    with pytest.raises(LoginRefused) as refused:
        auth.check_login("10.0.0.1", "tok")
    assert refused.value.retry_after_s is not None
    assert auth.check_login("10.0.0.2", "tok").actor == "admin"  # another address
    clock.advance(61)
    assert auth.check_login("10.0.0.1", "tok").role is Role.ACT


async def test_open_mode_is_local_and_needs_json_to_act(make_admin: MakeAdmin) -> None:
    """A loopback listener without tokens is open (acting as `local`), but an API POST must
    be JSON: a cross-site form (text/plain or urlencoded) is refused with 415."""
    admin = await make_admin(token=None, read_token=None)
    assert (await admin.get("/api/v1/summary")).status == 200
    form = await admin.post("/api/v1/destinations/faurya/pause", data={"a": "b"})
    assert form.status == 415
    plain = await admin.post(
        "/api/v1/destinations/faurya/pause", data=b"x", headers={"Content-Type": "text/plain"}
    )
    assert plain.status == 415
    ok = await admin.post("/api/v1/destinations/faurya/pause", json={})
    assert ok.status == 200
    audit = await (await admin.get("/api/v1/audit")).json()
    assert [(e["actor"], e["action"]) for e in audit["items"]] == [("local", "pause")]


async def test_a_read_token_alone_closes_the_console(make_admin: MakeAdmin) -> None:
    """With only admin.read_token set, the console is not open: the API needs the token, and
    nobody can act through it."""
    admin = await make_admin(token=None, read_token=Secret(READ_TOKEN))
    assert (await admin.get("/api/v1/summary")).status == 401
    assert (await admin.get("/api/v1/summary", headers=bearer(READ_TOKEN))).status == 200
    resp = await admin.post("/api/v1/destinations/faurya/pause", headers=bearer(READ_TOKEN))
    assert resp.status == 403


@pytest.mark.parametrize(
    ("variables", "problem"),
    [
        # One token reads, the other acts: the same value for both is a mistake.
        (
            {"RELAY_ADMIN_TOKEN": "same-token", "RELAY_ADMIN_READ_TOKEN": "same-token"},
            r"read_token: must differ from admin\.token",
        ),
        # A read token alone does not open a non-loopback listener.
        (
            {"RELAY_ADMIN_LISTEN": "0.0.0.0:9090", "RELAY_ADMIN_READ_TOKEN": "t2"},
            r"admin\.token",
        ),
    ],
    ids=["read_token_equal_to_token", "non_loopback_without_token"],
)
def test_admin_token_settings_that_are_config_errors(
    faurya: FakeFaurya, tmp_path: Any, variables: dict[str, str], problem: str
) -> None:
    """admin.read_token equal to admin.token, and a non-loopback listener with a read token
    but no admin.token, are config errors naming the key."""
    with pytest.raises(ConfigError, match=problem):
        shipped_config(faurya.url, tmp_path / "r.db", **variables)


def test_the_read_token_is_masked(faurya: FakeFaurya, tmp_path: Any) -> None:
    """A read token that differs from the admin token is taken, and masked like every
    secret."""
    config = shipped_config(
        faurya.url, tmp_path / "r.db", RELAY_ADMIN_TOKEN="t1", RELAY_ADMIN_READ_TOKEN="t2"
    )
    assert config.admin.read_token == Secret("t2")
    assert "t2" not in repr(config.admin)


def test_an_unknown_key_with_a_newline_is_named_on_one_line(
    faurya: FakeFaurya, tmp_path: Any
) -> None:
    """A key TOML would quote (a newline in it) is named quoted in the error, which stays one
    line (the config fuzz test found it under [admin] once read_token and hosts were added)."""
    import tomllib

    from relay.config import parse
    from tests.helpers import REPO, env

    raw = tomllib.loads((REPO / "relay.toml").read_text())
    raw["admin"]["\n"] = "x"
    with pytest.raises(ConfigError) as refused:
        parse(raw, env())
    [problem] = [p for p in refused.value.problems if "unknown key" in p]
    assert problem.startswith('admin."\\n": unknown key')
    assert "\n" not in problem
