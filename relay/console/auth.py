"""Who may use the console, and how they prove it.

Owns: the `Host` check (against DNS rebinding), the two tokens (`admin.token` acts,
`admin.read_token` only reads; the API takes them as `Authorization: Bearer`), the browser's
signed session cookie and its CSRF token, the login rate limit, and the open mode (a loopback
listener with no token: the console is open to this machine, and says so).

Sessions: the cookie holds `<session id>.<role>.<expiry>.<mac>`, the mac an HMAC-SHA256 over
the first three with a key made at random when the process starts: nothing is stored, a restart
signs everyone out, and a cookie cannot be forged or moved to another role or expiry. CSRF: every
state-changing page request carries `csrf` = HMAC of the session id (or, in open mode, of a
fixed label with the same per-process key); a cross-site page can neither read nor compute it.
The API does not take the cookie at all: only the bearer header, which a browser never adds by
itself, and in open mode a JSON content type, which a cross-site form cannot send.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from aiohttp import web

from relay.access import bearer_ok, is_loopback_host
from relay.config import AdminConfig
from relay.console.service import Caller, ConsoleService, Role
from relay.errors import RelayError
from relay.logs import get_logger

log = get_logger("relay.console.auth")

SERVICE = web.AppKey("console", ConsoleService)
COOKIE = "relay_console"
SESSION_TTL_S = 12 * 3600.0
LOGIN_FAILURES_PER_WINDOW = 5
LOGIN_WINDOW_S = 60.0
# Admin paths outside the console: Prometheus and probes reach them by whatever name their
# network gives the relay, and they change nothing, so no Host check there.
UNCHECKED_PATHS = frozenset({"/metrics", "/healthz", "/readyz"})
API_PREFIX = "/api/"
# Read-only requests that are POSTs (a body to evaluate, nothing written).
READ_ONLY_POSTS = frozenset({"/api/v1/dry-run", "/routes", "/login", "/logout"})
LOCAL = Caller("local", Role.ACT)
CALLER = web.RequestKey("console_caller", Caller)  # the Caller of this request, when known
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


class LoginRefused(RelayError):
    """A login that did not succeed: a wrong token, or too many attempts."""

    def __init__(self, message: str, retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


@dataclass(frozen=True, slots=True)
class Session:
    sid: str
    role: Role
    expires_at: float

    @property
    def caller(self) -> Caller:
        return Caller("admin" if self.role is Role.ACT else "read", self.role)


class ConsoleAuth:
    """The console's access rules for one admin listener."""

    def __init__(self, admin: AdminConfig, *, clock: Callable[[], float] = time.time) -> None:
        self._token = None if admin.token is None else admin.token.value
        self._read_token = None if admin.read_token is None else admin.read_token.value
        self._clock = clock
        host = admin.host_port[0] if admin.listen else "127.0.0.1"
        self.loopback = is_loopback_host(host)
        # Open: only this machine can reach the listener, and no token was set.
        self.open = self.loopback and self._token is None and self._read_token is None
        names = {host.lower()}
        if self.loopback or host in ("0.0.0.0", "::", ""):  # noqa: S104 - names, not binds
            # Literal loopback names cannot be rebound to another address by a DNS answer.
            names |= {"localhost", "127.0.0.1", "::1"}
        self._names = names
        self._extra_hosts = set(admin.hosts)
        self._key = secrets.token_bytes(32)
        self._failures: dict[str, deque[float]] = {}

    # ------------------------------------------------------------ Host

    def host_ok(self, request: web.Request) -> bool:
        host = (request.headers.get("Host") or "").strip().lower()
        if not host:
            return False
        if host in self._extra_hosts:
            return True
        sockname = request.transport.get_extra_info("sockname") if request.transport else None
        port = int(sockname[1]) if sockname else None
        if host.startswith("["):
            end = host.find("]")
            name, rest = host[1:end], host[end + 1 :]
            if end < 0 or (rest and not rest.startswith(":")):
                return False
            port_text = rest[1:]
        else:
            name, _, port_text = host.partition(":")
        if port_text and (not port_text.isdigit() or int(port_text) != port):
            return False
        if not port_text and port not in (80, None):
            return False
        return name in self._names

    # ------------------------------------------------------------ tokens

    def bearer_caller(self, authorization: str | None) -> Caller | None:
        """The caller a bearer header proves, or None."""
        if not authorization:
            return None
        if self._token is not None and bearer_ok(authorization, self._token):
            return Caller("admin", Role.ACT)
        if self._read_token is not None and bearer_ok(authorization, self._read_token):
            return Caller("read", Role.READ)
        return None

    # ------------------------------------------------------------ sessions

    def _mac(self, text: str) -> str:
        return hmac.new(self._key, text.encode(), hashlib.sha256).hexdigest()

    def new_cookie(self, role: Role) -> tuple[str, Session]:
        sid = secrets.token_urlsafe(18)
        expires = int(self._clock() + SESSION_TTL_S)
        payload = f"{sid}.{role.value}.{expires}"
        return f"{payload}.{self._mac(payload)}", Session(sid, role, float(expires))

    def session(self, cookie: str | None) -> Session | None:
        if not cookie or len(cookie) > 200:
            return None
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        sid, role_text, expires_text, mac = parts
        payload = f"{sid}.{role_text}.{expires_text}"
        if not hmac.compare_digest(mac, self._mac(payload)):
            return None
        try:
            role = Role(role_text)
            expires = float(int(expires_text))
        except ValueError:
            return None
        if expires <= self._clock():
            return None
        return Session(sid, role, expires)

    def csrf_for(self, session: Session | None) -> str:
        return self._mac("csrf:" + (session.sid if session is not None else "local"))

    # ------------------------------------------------------------ login

    def check_login(self, address: str, token: str) -> Caller:
        """The caller a pasted token proves; raises LoginRefused (rate limited per address)."""
        now = self._clock()
        failures = self._failures.setdefault(address, deque())
        while failures and failures[0] <= now - LOGIN_WINDOW_S:
            failures.popleft()
        if len(failures) >= LOGIN_FAILURES_PER_WINDOW:
            retry = max(1.0, failures[0] + LOGIN_WINDOW_S - now)
            log.warning("console_login_failed", address=address, reason="rate_limited")
            raise LoginRefused(f"too many failed sign-ins; wait {retry:.0f} s", retry)
        caller = self.bearer_caller(f"Bearer {token.strip()}") if token.strip() else None
        if caller is None:
            failures.append(now)
            if len(self._failures) > 10_000:  # bounded: drop the oldest addresses
                for old in list(self._failures)[:1000]:
                    self._failures.pop(old, None)
            log.warning("console_login_failed", address=address, reason="wrong_token")
            raise LoginRefused("that token is not this relay's admin or read token")
        failures.clear()
        log.info("console_login", address=address, actor=caller.actor)
        return caller


AUTH = web.AppKey("console_auth", ConsoleAuth)


# ---------------------------------------------------------------- what pages call


def _auth(request: web.Request) -> ConsoleAuth:
    return request.app[AUTH]


def page_caller(request: web.Request) -> Caller | None:
    """The caller of a page: from the session cookie, or `local` in open mode; None: not
    signed in."""
    auth = _auth(request)
    session = auth.session(request.cookies.get(COOKIE))
    if session is not None:
        return session.caller
    return LOCAL if auth.open else None


def csrf_token(request: web.Request) -> str:
    """The value of the hidden `csrf` field of every form on this page."""
    auth = _auth(request)
    return auth.csrf_for(auth.session(request.cookies.get(COOKIE)))


def login(request: web.Request, token: str) -> Caller:
    return _auth(request).check_login(request.remote or "unknown", token)


def start_session(response: web.StreamResponse, request: web.Request, caller: Caller) -> None:
    cookie, _ = _auth(request).new_cookie(caller.role)
    response.set_cookie(
        COOKIE,
        cookie,
        max_age=int(SESSION_TTL_S),
        path="/",
        httponly=True,
        samesite="Strict",
        secure=request.secure,
    )


def end_session(response: web.StreamResponse) -> None:
    response.del_cookie(COOKIE, path="/")


# ---------------------------------------------------------------- the middleware


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


@web.middleware
async def console_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host check, then who is calling and whether they may do this, then CSRF."""
    path = request.path
    if path in UNCHECKED_PATHS:
        return await handler(request)
    auth = _auth(request)
    if not auth.host_ok(request):
        log.warning(
            "console_host_refused", address=request.remote, host=request.headers.get("Host")
        )
        return _error(421, "this Host is not the admin listener's; add it to admin.hosts")
    if path.startswith(API_PREFIX):
        return await _api(request, handler, auth)
    return await _page(request, handler, auth)


async def _api(request: web.Request, handler: Handler, auth: ConsoleAuth) -> web.StreamResponse:
    authorization = request.headers.get("Authorization")
    caller = auth.bearer_caller(authorization)
    if caller is None:
        if authorization or not auth.open:
            return _error(
                401, "bearer token required", **{"WWW-Authenticate": 'Bearer realm="relay-admin"'}
            )
        caller = LOCAL
        if request.method not in _SAFE_METHODS and request.content_type != "application/json":
            # Open mode has no token: a cross-site form could post here, but it cannot send
            # a JSON content type without a preflight, which we never grant.
            return _error(415, "send Content-Type: application/json")
    if request.method not in _SAFE_METHODS and path_needs_act(request.path) and not caller.can_act:
        return _error(403, "this token can only read; actions need admin.token")
    request[CALLER] = caller
    return await handler(request)


def path_needs_act(path: str) -> bool:
    return path not in READ_ONLY_POSTS


async def _page(request: web.Request, handler: Handler, auth: ConsoleAuth) -> web.StreamResponse:
    session = auth.session(request.cookies.get(COOKIE))
    caller = session.caller if session is not None else (LOCAL if auth.open else None)
    if caller is not None:
        request[CALLER] = caller
    if request.method in _SAFE_METHODS or request.path == "/login":
        return await handler(request)
    if caller is None:
        raise web.HTTPSeeOther("/login")
    form = await request.post()
    offered = form.get("csrf")
    if not isinstance(offered, str) or not hmac.compare_digest(offered, auth.csrf_for(session)):
        log.warning("console_csrf_refused", address=request.remote, path=request.path)
        return _error(403, "missing or wrong CSRF token: reload the page and try again")
    if path_needs_act(request.path) and not caller.can_act:
        return _error(403, "this token can only read; actions need admin.token")
    return await handler(request)
