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
itself, and in open mode a JSON content type, which a cross-site form cannot send. Besides the
token, a state-changing request that a browser marks as cross-site (`Sec-Fetch-Site`, or an
`Origin` that is not the `Host`) is refused: the sign-in form too, so another site cannot spend
this address's failed-login budget. Sign-out revokes the session id in this process.

Failed sign-ins and wrong bearer tokens (API and /metrics alike) share one rate limit per client
(an IPv6 client by its /64): a script cannot guess the token faster than the form can.
"""

from __future__ import annotations

import hashlib
import hmac
import ipaddress
import secrets
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

from aiohttp import web

from relay.access import bearer_ok, equal_text, is_loopback_host
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
MAX_TRACKED_CLIENTS = 10_000  # addresses with recent failures kept; the oldest go first
# Probes reach these by whatever name their network gives the relay, and they show only
# "ok": no Host check there.
UNCHECKED_PATHS = frozenset({"/healthz", "/readyz"})
# Prometheus too; /metrics shows revenue, so without admin.token (which protects it then) the
# Host is checked as for the console: a DNS-rebinding page must not read it.
METRICS_PATH = "/metrics"
API_PREFIX = "/api/"
# Read-only requests that are POSTs (a body to evaluate, nothing written).
READ_ONLY_POSTS = frozenset({"/api/v1/dry-run", "/routes", "/login", "/logout"})
LOCAL = Caller("local", Role.ACT)
CALLER = web.RequestKey("console_caller", Caller)  # the Caller of this request, when known
_SAFE_METHODS = frozenset({"GET", "HEAD", "OPTIONS"})


def client_key(address: str) -> str:
    """Whom a failure counts against: an IPv4 address, or an IPv6 client's /64 (one host
    usually has a whole /64 to pick addresses from)."""
    try:
        ip = ipaddress.ip_address(address.split("%", 1)[0])
    except ValueError:
        return address
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is None:
        return str(ipaddress.IPv6Network((ip, 64), strict=False))
    return str(ip.ipv4_mapped if isinstance(ip, ipaddress.IPv6Address) else ip)


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
        self.extra_hosts = frozenset(h.lower() for h in admin.hosts)
        self._key = secrets.token_bytes(32)
        self._failures: dict[str, deque[float]] = {}
        # Signed-out session ids, until their cookie would expire anyway.
        self._revoked: dict[str, float] = {}

    @property
    def has_admin_token(self) -> bool:
        return self._token is not None

    # ------------------------------------------------------------ Host

    def host_ok(self, request: web.Request) -> bool:
        host = (request.headers.get("Host") or "").strip().lower()
        if not host:
            return False
        if host in self.extra_hosts:
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
        if port_text and not (port_text.isascii() and port_text.isdigit() and len(port_text) <= 5):
            return False
        if port_text and int(port_text) != port:
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
        if not cookie or len(cookie) > 200 or not cookie.isascii():
            return None  # ours are ASCII: anything else (even undecodable bytes) is not one
        parts = cookie.split(".")
        if len(parts) != 4:
            return None
        sid, role_text, expires_text, mac = parts
        payload = f"{sid}.{role_text}.{expires_text}"
        if not equal_text(mac, self._mac(payload)) or sid in self._revoked:
            return None
        try:
            role = Role(role_text)
            expires = float(int(expires_text))
        except ValueError:
            return None
        if expires <= self._clock():
            return None
        return Session(sid, role, expires)

    def revoke(self, session: Session) -> None:
        """Sign a session out for good: its cookie is refused from now on, not only deleted
        from this browser (a copy elsewhere stops working too)."""
        now = self._clock()
        for sid in [s for s, expires in self._revoked.items() if expires <= now]:
            del self._revoked[sid]
        self._revoked[session.sid] = session.expires_at

    def csrf_for(self, session: Session | None) -> str:
        return self._mac("csrf:" + (session.sid if session is not None else "local"))

    def csrf_ok(self, offered: object, session: Session | None) -> bool:
        return isinstance(offered, str) and equal_text(offered, self.csrf_for(session))

    # ------------------------------------------------------------ failures

    def limited(self, address: str) -> float | None:
        """Seconds until `address` may try a token again; None: it may now."""
        now = self._clock()
        failures = self._failures.get(client_key(address))
        if failures is None:
            return None
        while failures and failures[0] <= now - LOGIN_WINDOW_S:
            failures.popleft()
        if len(failures) < LOGIN_FAILURES_PER_WINDOW:
            return None
        return max(1.0, failures[0] + LOGIN_WINDOW_S - now)

    def failed(self, address: str) -> None:
        """Count a wrong token (form, API or /metrics) against `address`."""
        key = client_key(address)
        failures = self._failures.pop(key, None) or deque()
        failures.append(self._clock())
        self._failures[key] = failures  # most recent last: eviction takes the oldest
        if len(self._failures) > MAX_TRACKED_CLIENTS:
            for old in list(self._failures)[: MAX_TRACKED_CLIENTS // 10]:
                del self._failures[old]

    # ------------------------------------------------------------ login

    def check_login(self, address: str, token: str) -> Caller:
        """The caller a pasted token proves; raises LoginRefused (rate limited per address)."""
        retry = self.limited(address)
        if retry is not None:
            log.warning("console_login_failed", address=address, reason="rate_limited", via="form")
            raise LoginRefused(f"too many failed sign-ins; wait {retry:.0f} s", retry)
        caller = self.bearer_caller(f"Bearer {token.strip()}") if token.strip() else None
        if caller is None:
            self.failed(address)
            log.warning("console_login_failed", address=address, reason="wrong_token", via="form")
            raise LoginRefused("that token is not this relay's admin or read token")
        if caller.can_act:
            # Only the top token clears the count: a read token's sign-in between guesses
            # would otherwise let its holder guess admin.token without limit.
            self._failures.pop(client_key(address), None)
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


def end_session(response: web.StreamResponse, request: web.Request) -> None:
    auth = _auth(request)
    session = auth.session(request.cookies.get(COOKIE))
    if session is not None:
        auth.revoke(session)
    response.del_cookie(COOKIE, path="/")


# ---------------------------------------------------------------- the middleware


def _error(status: int, message: str, **headers: str) -> web.Response:
    return web.json_response({"error": message}, status=status, headers=headers or None)


Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def cross_site(request: web.Request, hosts: frozenset[str] = frozenset()) -> bool:
    """Whether the browser says this request comes from another site: `Sec-Fetch-Site`
    other than same-origin or none (typed in), or an `Origin` whose host is neither the `Host`
    nor one of `hosts` (admin.hosts: a proxy may rewrite `Host`). Scripts send neither
    header, and pass."""
    site = request.headers.get("Sec-Fetch-Site")
    if site is not None and site.strip().lower() not in ("same-origin", "none"):
        return True
    origin = request.headers.get("Origin")
    if origin is None:
        return False
    try:
        netloc = urlsplit(origin.strip()).netloc.lower()
    except ValueError:
        return True
    host = (request.headers.get("Host") or "").strip().lower()
    return not netloc or (netloc != host and netloc not in hosts)


@web.middleware
async def console_guard(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Host check, then who is calling and whether they may do this, then CSRF."""
    path = request.path
    if path in UNCHECKED_PATHS:
        return await handler(request)
    auth = _auth(request)
    if path == METRICS_PATH and auth.has_admin_token:
        return await _metrics(request, handler, auth)
    if not auth.host_ok(request):
        log.warning(
            "console_host_refused", address=request.remote, host=request.headers.get("Host")
        )
        return _error(421, "this Host is not the admin listener's; add it to admin.hosts")
    if path == METRICS_PATH:
        return await handler(request)
    if path.startswith(API_PREFIX):
        return await _api(request, handler, auth)
    return await _page(request, handler, auth)


def _too_many(request: web.Request, auth: ConsoleAuth, via: str) -> web.Response | None:
    """429 while this client is over the failed-token limit (whatever it sends now)."""
    address = request.remote or "unknown"
    retry = auth.limited(address)
    if retry is None:
        return None
    log.warning("console_login_failed", address=address, reason="rate_limited", via=via)
    return _error(
        429, f"too many wrong tokens; wait {retry:.0f} s", **{"Retry-After": str(int(retry) + 1)}
    )


def _wrong_token(request: web.Request, auth: ConsoleAuth, via: str) -> None:
    address = request.remote or "unknown"
    auth.failed(address)
    log.warning("console_login_failed", address=address, reason="wrong_token", via=via)


async def _metrics(request: web.Request, handler: Handler, auth: ConsoleAuth) -> web.StreamResponse:
    """/metrics checks admin.token itself (relay/app.py); a wrong one counts here."""
    offered = bool(request.headers.get("Authorization"))
    if offered and (refused := _too_many(request, auth, "metrics")) is not None:
        return refused
    response = await handler(request)
    if offered and response.status == 401:
        _wrong_token(request, auth, "metrics")
    return response


async def _api(request: web.Request, handler: Handler, auth: ConsoleAuth) -> web.StreamResponse:
    authorization = request.headers.get("Authorization")
    if authorization and (refused := _too_many(request, auth, "api")) is not None:
        return refused
    caller = auth.bearer_caller(authorization)
    if caller is None:
        if authorization:
            _wrong_token(request, auth, "api")
        if authorization or not auth.open:
            return _error(
                401, "bearer token required", **{"WWW-Authenticate": 'Bearer realm="relay-admin"'}
            )
        caller = LOCAL
        if request.method not in _SAFE_METHODS:
            if request.content_type != "application/json":
                # Open mode has no token: a cross-site form could post here, but it cannot
                # send a JSON content type without a preflight, which we never grant.
                return _error(415, "send Content-Type: application/json")
            if cross_site(request, auth.extra_hosts):
                return _cross_site_refused(request)
    if request.method not in _SAFE_METHODS and path_needs_act(request.path) and not caller.can_act:
        return _error(403, "this token can only read; actions need admin.token")
    request[CALLER] = caller
    return await handler(request)


def path_needs_act(path: str) -> bool:
    return path not in READ_ONLY_POSTS


def _cross_site_refused(request: web.Request) -> web.Response:
    log.warning(
        "console_cross_site_refused",
        address=request.remote,
        path=request.path,
        origin=request.headers.get("Origin"),
        site=request.headers.get("Sec-Fetch-Site"),
    )
    return _error(403, "cross-site request refused: use the console's own pages")


async def _page(request: web.Request, handler: Handler, auth: ConsoleAuth) -> web.StreamResponse:
    session = auth.session(request.cookies.get(COOKIE))
    caller = session.caller if session is not None else (LOCAL if auth.open else None)
    if caller is not None:
        request[CALLER] = caller
    if request.method in _SAFE_METHODS:
        return await handler(request)
    if cross_site(request, auth.extra_hosts):
        return _cross_site_refused(request)
    if request.path == "/login":
        return await handler(request)
    if caller is None:
        raise web.HTTPSeeOther("/login")
    form = await request.post()
    if not auth.csrf_ok(form.get("csrf"), session):
        log.warning("console_csrf_refused", address=request.remote, path=request.path)
        return _error(403, "missing or wrong CSRF token: reload the page and try again")
    if path_needs_act(request.path) and not caller.can_act:
        return _error(403, "this token can only read; actions need admin.token")
    return await handler(request)
