"""relay.toml -> validated, frozen configuration objects.

Owns: TOML parsing, `${VAR}` / `${VAR:-default}` interpolation, every validation rule, and the
error messages that name the full key path of each problem. Pure apart from reading the file and
the environment mapping it is given; imports no I/O library. Secrets live only in `Secret`
objects whose repr is masked, and no error message quotes a secret's value.
"""

from __future__ import annotations

import re
import tomllib
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar
from urllib.parse import urlsplit

from relay.access import Network, parse_networks
from relay.errors import ConfigError, MissingEnvVar
from relay.mapping import (
    Lookup,
    Route,
    RuleSyntaxError,
    compile_condition,
    compile_object,
    compile_template,
    parse_path,
)
from relay.mapping import Path as PathTuple

T = TypeVar("T")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_SENSITIVE_HEADER = re.compile(r"key|token|secret|auth|password|cookie|signature", re.I)
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")
_REQUIRED: Any = object()

DEFAULT_BODY_LIMIT_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string; its repr and str are masked so it cannot leak by accident."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar listens on all interfaces by design
    port: int = 8080
    max_body_bytes: int = DEFAULT_BODY_LIMIT_BYTES
    shutdown_grace_s: float = 10.0
    # Slow clients: a connection must deliver its request headers within keepalive_timeout_s
    # (and idle keep-alive connections close after it), and its body within body_timeout_s.
    keepalive_timeout_s: float = 15.0
    body_timeout_s: float = 10.0
    max_header_bytes: int = 8190  # per header line and per field
    max_headers: int = 64
    tls_cert: str = ""  # serve HTTPS directly when both are set
    tls_key: str = ""
    require_https: bool = False  # behind a proxy: refuse what did not arrive over HTTPS
    trusted_proxies: tuple[Network, ...] = ()  # whose X-Forwarded-For/-Proto we believe


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """/metrics (and /healthz, /readyz) on a separate listener, and/or behind a token."""

    listen: str = ""  # "127.0.0.1:9090"; empty: on the main listener
    token: Secret | None = None  # required as `Authorization: Bearer` for /metrics

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: str = "relay.db"
    busy_timeout_ms: int = 5000
    max_batch: int = 256


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """Delivered messages and raw bodies are pruned by age; dead ones stay until handled."""

    # Raw inbound bodies (they hold customer PII: email, billing address) once no message of
    # the event still needs them.
    bodies_s: float = 30 * 24 * 3600.0
    # Delivered messages (with their bodies, kept for replay and refund lookups) and finished
    # events. Their idempotency keys go with them: keep this longer than any resend window.
    rows_s: float = 365 * 24 * 3600.0
    interval_s: float = 3600.0  # how often `relay serve` prunes


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: console on a TTY, JSON otherwise
    # Payload fields replaced by "[redacted]" in the stored raw body (customer PII). The
    # mapping still sees them: it runs before the body is stored.
    redact: tuple[PathTuple, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    path: str
    secrets: tuple[Secret, ...]
    kind: str = "polar"
    tolerance_s: int = 300
    allow_ips: tuple[Network, ...] = ()  # empty: any address (the signature still rules)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Pure data; `relay.retry` computes with it."""

    max_attempts: int = 1000
    base_s: float = 1.0
    cap_s: float = 600.0
    max_age_s: float = 7 * 24 * 3600.0
    jitter: float = 0.5  # each delay is drawn from [(1 - jitter) * d, d]
    max_retry_after_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: Secret | str

    @property
    def text(self) -> str:
        return self.value.value if isinstance(self.value, Secret) else self.value

    def shown(self) -> str:
        return "***" if isinstance(self.value, Secret) else self.value


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    name: str
    url: str
    headers: tuple[Header, ...] = ()
    timeout_s: float = 10.0
    concurrency: int = 8
    lease_s: float = 60.0
    paused: bool = False
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True, slots=True)
class PolarApiConfig:
    """Polar's API, for reconciliation, checkout creation and payment checks."""

    url: str = "https://api.polar.sh"  # sandbox: https://sandbox-api.polar.sh
    token: Secret | None = None  # an organization access token (POLAR_ACCESS_TOKEN)
    min_interval_s: float = 0.15  # request spacing: 400/min, under Polar's 500/min


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    """`relay serve` reconciles every `interval_s` (0: never) over the last `lookback_s`."""

    interval_s: float = 0.0
    lookback_s: float = 3 * 24 * 3600.0
    source: str = "polar"


@dataclass(frozen=True, slots=True)
class CheckoutConfig:
    """The optional checkout endpoint: the browser posts the Faurya IDs, the relay creates
    the Polar checkout with them (and a generated orderId) in its metadata."""

    enabled: bool = False
    path: str = "/checkout"
    plans: tuple[tuple[str, str], ...] = ()  # plan name -> Polar product id
    allow_origins: tuple[str, ...] = ()  # CORS: the merchant's page origins
    success_url: str = ""
    return_url: str = ""
    rate_limit_per_min: int = 10  # per client address

    def product_for(self, plan: str) -> str | None:
        return dict(self.plans).get(plan)


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    storage: StorageConfig
    log: LogConfig
    sources: dict[str, SourceConfig]
    destinations: dict[str, DestinationConfig]
    routes: tuple[Route, ...]
    retention: RetentionConfig = RetentionConfig()
    admin: AdminConfig = AdminConfig()
    polar_api: PolarApiConfig = PolarApiConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    checkout: CheckoutConfig = CheckoutConfig()


# ---------------------------------------------------------------- interpolation


def interpolate(raw: Any, env: Mapping[str, str], where: str, missing: list[MissingEnvVar]) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string; `$$` is a literal `$`."""
    if isinstance(raw, dict):
        return {k: interpolate(v, env, _join(where, k), missing) for k, v in raw.items()}
    if isinstance(raw, list):
        return [interpolate(v, env, f"{where}[{i}]", missing) for i, v in enumerate(raw)]
    if not isinstance(raw, str):
        return raw

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or value == "":
            if default is not None:
                return default
            # Set but empty is as good as missing: an empty write key or secret is a mistake.
            missing.append(MissingEnvVar(name, where))
            return ""
        return value

    return _VAR.sub(substitute, raw)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


# ---------------------------------------------------------------- a checked reader


class _Table:
    """Reads one TOML table, recording problems with full key paths; flags unknown keys."""

    def __init__(self, raw: Any, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        self.seen: set[str] = set()
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table")
            raw = {}
        self.raw: dict[str, Any] = raw

    def path(self, key: str) -> str:
        return _join(self.where, key)

    def get(
        self,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: Any = _REQUIRED,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is _REQUIRED:
                self.problems.append(f"{self.path(key)}: required")
            return None if default is _REQUIRED else default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, str) and str not in kinds:
            # "${RELAY_PORT:-8080}": interpolation yields strings; read numbers from them.
            value = _number_from_text(value, int in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            self.problems.append(f"{self.path(key)}: must be {names}")
            return None if default is _REQUIRED else default
        if check is not None and (message := check(value)) is not None:
            self.problems.append(f"{self.path(key)}: {message}")
            return None if default is _REQUIRED else default
        return value

    def sub(self, key: str) -> _Table:
        self.seen.add(key)
        return _Table(self.raw.get(key, {}), self.path(key), self.problems)

    def done(self, allowed_extra: tuple[str, ...] = ()) -> None:
        for key in self.raw:
            if key not in self.seen and key not in allowed_extra:
                allowed = ", ".join(sorted(self.seen)) or "none"
                self.problems.append(f"{self.path(key)}: unknown key (allowed: {allowed})")


def _number_from_text(text: str, integer: bool) -> Any:
    text = text.strip()
    try:
        return int(text) if integer and re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        return text  # left as a string: the type check below reports it


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "a table",
}


def _positive(value: float) -> str | None:
    return None if value > 0 else "must be greater than 0"


def _between(low: float, high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def _one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def _url(value: str) -> str | None:
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def _webhook_path(value: str) -> str | None:
    return None if value.startswith("/") else "must start with /"


# ---------------------------------------------------------------- sections


def _server(t: _Table) -> ServerConfig:
    d = ServerConfig()
    s = ServerConfig(
        host=t.get("host", str, d.host),
        port=t.get("port", int, d.port, _between(0, 65535)),
        max_body_bytes=t.get("max_body_bytes", int, d.max_body_bytes, _between(1024, 64 << 20)),
        shutdown_grace_s=t.get("shutdown_grace_s", float, d.shutdown_grace_s, _between(0, 3600)),
        keepalive_timeout_s=t.get(
            "keepalive_timeout_s", float, d.keepalive_timeout_s, _between(1, 3600)
        ),
        body_timeout_s=t.get("body_timeout_s", float, d.body_timeout_s, _between(0.5, 600)),
        max_header_bytes=t.get("max_header_bytes", int, d.max_header_bytes, _between(256, 65536)),
        max_headers=t.get("max_headers", int, d.max_headers, _between(8, 1000)),
        tls_cert=t.get("tls_cert", str, d.tls_cert, _readable_file),
        tls_key=t.get("tls_key", str, d.tls_key, _readable_file),
        require_https=t.get("require_https", bool, d.require_https),
        trusted_proxies=_networks(t, "trusted_proxies"),
    )
    # Judged on what was written: a cert that failed its own check must not also read as unset.
    if bool(t.raw.get("tls_cert")) != bool(t.raw.get("tls_key")):
        t.problems.append(f"{t.path('tls_key')}: tls_cert and tls_key go together")
    t.done()
    return s


def _readable_file(value: str) -> str | None:
    if value and not Path(value).is_file():
        return "no such file"
    return None


def _networks(t: _Table, key: str) -> tuple[Network, ...]:
    values = t.get(key, list, [])
    if not all(isinstance(v, str) for v in values):
        t.problems.append(f"{t.path(key)}: must be an array of addresses or CIDR networks")
        return ()
    try:
        return parse_networks(values)
    except ValueError as exc:
        t.problems.append(f"{t.path(key)}: {exc}")
        return ()


def _polar_api(t: _Table) -> PolarApiConfig:
    d = PolarApiConfig()
    token = t.get("token", str, "")
    c = PolarApiConfig(
        url=t.get("url", str, d.url, _url).rstrip("/"),
        token=Secret(token) if token else None,
        min_interval_s=t.get("min_interval_s", float, d.min_interval_s, _between(0, 60)),
    )
    t.done()
    return c


def _reconcile(t: _Table, sources: Mapping[str, Any]) -> ReconcileConfig:
    d = ReconcileConfig()
    c = ReconcileConfig(
        interval_s=t.get("interval_s", float, d.interval_s, _between(0, 7 * 86400)),
        lookback_s=t.get("lookback_s", float, d.lookback_s, _positive),
        source=t.get("source", str, d.source),
    )
    if c.source not in sources and sources:
        t.problems.append(f"{t.path('source')}: no source named {c.source!r}")
    t.done()
    return c


def _checkout(t: _Table) -> CheckoutConfig:
    d = CheckoutConfig()
    plans = t.sub("plans")
    plan_items = []
    for name, product in plans.raw.items():
        plans.seen.add(name)
        if not isinstance(product, str) or not product:
            plans.problems.append(f"{plans.path(name)}: must be a Polar product id (a string)")
        else:
            plan_items.append((name, product))
    origins = t.get("allow_origins", list, [])
    for i, origin in enumerate(origins):
        if not isinstance(origin, str) or _url(origin) is not None or urlsplit(origin).path:
            t.problems.append(
                f"{t.path('allow_origins')}[{i}]: must be an origin like https://shop.example"
            )
    c = CheckoutConfig(
        enabled=t.get("enabled", bool, d.enabled),
        path=t.get("path", str, d.path, _webhook_path),
        plans=tuple(plan_items),
        allow_origins=tuple(o.rstrip("/") for o in origins if isinstance(o, str)),
        success_url=t.get("success_url", str, d.success_url, lambda v: None if not v else _url(v)),
        return_url=t.get("return_url", str, d.return_url, lambda v: None if not v else _url(v)),
        rate_limit_per_min=t.get(
            "rate_limit_per_min", int, d.rate_limit_per_min, _between(1, 100_000)
        ),
    )
    if c.enabled and not c.plans:
        t.problems.append(f"{t.path('plans')}: the checkout endpoint needs at least one plan")
    t.done()
    return c


def _admin(t: _Table) -> AdminConfig:
    listen = t.get("listen", str, "", _listen_address)
    token = t.get("token", str, "")
    t.done()
    return AdminConfig(listen=listen, token=Secret(token) if token else None)


def _listen_address(value: str) -> str | None:
    if not value:
        return None
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be host:port, like 127.0.0.1:9090"
    return None


def _storage(t: _Table) -> StorageConfig:
    d = StorageConfig()
    s = StorageConfig(
        path=t.get("path", str, d.path, lambda v: None if v else "must not be empty"),
        busy_timeout_ms=t.get("busy_timeout_ms", int, d.busy_timeout_ms, _between(0, 600_000)),
        max_batch=t.get("max_batch", int, d.max_batch, _between(1, 2000)),
    )
    t.done()
    return s


def _retention(t: _Table) -> RetentionConfig:
    d = RetentionConfig()
    r = RetentionConfig(
        bodies_s=t.get("bodies_s", float, d.bodies_s, _positive),
        rows_s=t.get("rows_s", float, d.rows_s, _positive),
        interval_s=t.get("interval_s", float, d.interval_s, _positive),
    )
    if r.rows_s < r.bodies_s:
        t.problems.append(f"{t.path('rows_s')}: must be at least bodies_s ({r.bodies_s:g})")
    t.done()
    return r


def _log(t: _Table) -> LogConfig:
    d = LogConfig()
    s = LogConfig(
        level=t.get("level", str, d.level, _one_of("debug", "info", "warning", "error")),
        format=t.get("format", str, d.format, _one_of("auto", "json", "console")),
        redact=_redact_paths(t),
    )
    t.done()
    return s


def _redact_paths(t: _Table) -> tuple[PathTuple, ...]:
    values = t.get("redact", list, [])
    paths = []
    for i, value in enumerate(values):
        try:
            paths.append(parse_path(value, f"{t.path('redact')}[{i}]"))
        except RuleSyntaxError as exc:
            t.problems.extend(exc.problems)
    return tuple(paths)


def _secrets(raw: Any, where: str, problems: list[str]) -> tuple[Secret, ...]:
    # Never quote the value: this is a secret.
    items = raw.split(",") if isinstance(raw, str) else raw
    if not isinstance(items, list) or not all(isinstance(i, str) for i in items):
        problems.append(f"{where}: must be a string (comma-separated) or an array of strings")
        return ()
    secrets = tuple(Secret(i.strip()) for i in items if i.strip())
    if not secrets:
        problems.append(f"{where}: at least one webhook secret is required")
    return secrets


def _source(name: str, t: _Table) -> SourceConfig:
    t.seen.add("secrets")
    if "secrets" in t.raw:
        secrets = _secrets(t.raw["secrets"], t.path("secrets"), t.problems)
    else:
        t.problems.append(f"{t.path('secrets')}: required")
        secrets = ()
    s = SourceConfig(
        name=name,
        kind=t.get("kind", str, "polar", _one_of("polar", "standard-webhooks")),
        path=t.get("path", str, f"/webhooks/{name}", _webhook_path),
        secrets=secrets,
        tolerance_s=t.get("tolerance_s", int, 300, _between(1, 86400)),
        allow_ips=_networks(t, "allow_ips"),
    )
    t.done()
    return s


def _retry(t: _Table) -> RetryPolicy:
    d = RetryPolicy()
    r = RetryPolicy(
        max_attempts=t.get("max_attempts", int, d.max_attempts, _between(1, 1_000_000)),
        base_s=t.get("base_s", float, d.base_s, _positive),
        cap_s=t.get("cap_s", float, d.cap_s, _positive),
        max_age_s=t.get("max_age_s", float, d.max_age_s, _positive),
        jitter=t.get("jitter", float, d.jitter, _between(0, 1)),
        max_retry_after_s=t.get("max_retry_after_s", float, d.max_retry_after_s, _positive),
    )
    if r.cap_s < r.base_s:
        t.problems.append(f"{t.path('cap_s')}: must be at least base_s ({r.base_s:g})")
    t.done()
    return r


def _headers(t: _Table) -> tuple[Header, ...]:
    headers = []
    for name, value in t.raw.items():
        t.seen.add(name)
        if not isinstance(value, str):
            t.problems.append(f"{t.path(name)}: must be a string")
            continue
        if name.lower() in ("content-type", "idempotency-key", "content-length", "host"):
            t.problems.append(f"{t.path(name)}: set by the relay itself; remove it")
            continue
        secret = bool(_SENSITIVE_HEADER.search(name))
        headers.append(Header(name=name, value=Secret(value) if secret else value))
    return tuple(headers)


def _destination(name: str, t: _Table) -> DestinationConfig:
    d = DestinationConfig(name="", url="")
    url = t.get("url", str, check=_url)
    if isinstance(url, str):
        # `${FAURYA_URL}/api/revenue` with a trailing slash in the variable: collapse it.
        parts = urlsplit(url)
        url = parts._replace(path=re.sub(r"/{2,}", "/", parts.path)).geturl()
    timeout_s = t.get("timeout_s", float, d.timeout_s, _between(0.1, 300))
    lease_s = t.get("lease_s", float, max(d.lease_s, timeout_s * 2 + 5), _positive)
    if lease_s < timeout_s + 5:
        # A lease shorter than the request would let a second attempt start while the first
        # is still in flight: a double send caused by us, not by a crash.
        t.problems.append(
            f"{t.path('lease_s')}: must be at least timeout_s + 5 ({timeout_s + 5:g})"
        )
    s = DestinationConfig(
        name=name,
        url=url or "",
        headers=_headers(t.sub("headers")),
        timeout_s=timeout_s,
        concurrency=t.get("concurrency", int, d.concurrency, _between(1, 1000)),
        lease_s=lease_s,
        paused=t.get("paused", bool, d.paused),
        retry=_retry(t.sub("retry")),
    )
    t.done()
    return s


def _route(
    index: int, t: _Table, sources: Mapping[str, Any], destinations: Mapping[str, Any]
) -> Route | None:
    name = t.get(
        "name",
        str,
        f"route{index}",
        lambda v: None if _NAME.match(v) else "use letters, digits, - and _",
    )
    source = t.get("source", str)
    if isinstance(source, str) and source not in sources:
        t.problems.append(
            f"{t.path('source')}: no source named {source!r} "
            f"(defined: {', '.join(sources) or 'none'})"
        )
    destination = t.get("destination", str)
    if isinstance(destination, str) and destination not in destinations:
        t.problems.append(
            f"{t.path('destination')}: no destination named {destination!r} "
            f"(defined: {', '.join(destinations) or 'none'})"
        )
    events = t.get("events", list)
    if isinstance(events, list) and (
        not events or not all(isinstance(e, str) and e for e in events)
    ):
        t.problems.append(f"{t.path('events')}: must be a non-empty array of event types")
        events = None
    compiled: dict[str, Any] = {}
    for key, compile_ in (
        ("idempotency_key", compile_template),
        ("body", compile_object),
        ("when", compile_condition),
        ("verify_order", compile_template),
    ):
        t.seen.add(key)
        if key not in t.raw:
            if key not in ("when", "verify_order"):
                t.problems.append(f"{t.path(key)}: required")
            continue
        if key == "body" and not isinstance(t.raw[key], dict):
            t.problems.append(f"{t.path(key)}: must be a table")
            continue
        try:
            compiled[key] = compile_(t.raw[key], t.path(key))
        except RuleSyntaxError as exc:
            t.problems.extend(exc.problems)
    lookups = _lookups(t.sub("lookup"), destinations)
    t.done()
    if None in (source, destination, events) or len(compiled) < 2:
        return None
    return Route(
        name=name,
        source=source,
        events=tuple(events),
        destination=destination,
        idempotency_key=compiled["idempotency_key"],
        body=compiled["body"],
        when=compiled.get("when"),
        lookups=lookups,
        verify_order=compiled.get("verify_order"),
    )


def _lookups(t: _Table, destinations: Mapping[str, Any]) -> tuple[Lookup, ...]:
    found = []
    for name in t.raw:
        t.seen.add(name)
        if not _NAME.match(name):
            t.problems.append(f"{t.path(name)}: use letters, digits, - and _ in names")
            continue
        item = t.sub(name)
        destination = item.get("destination", str)
        if isinstance(destination, str) and destination not in destinations:
            item.problems.append(
                f"{item.path('destination')}: no destination named {destination!r} "
                f"(defined: {', '.join(destinations) or 'none'})"
            )
            destination = None
        item.seen.add("idempotency_key")
        key = None
        if "idempotency_key" not in item.raw:
            item.problems.append(f"{item.path('idempotency_key')}: required")
        else:
            try:
                key = compile_template(item.raw["idempotency_key"], item.path("idempotency_key"))
            except RuleSyntaxError as exc:
                item.problems.extend(exc.problems)
        item.done()
        if destination is not None and key is not None:
            found.append(Lookup(name=name, destination=destination, key=key))
    return tuple(found)


def _named_tables(t: _Table, key: str) -> dict[str, _Table]:
    group = t.sub(key)
    tables = {}
    for name in group.raw:
        group.seen.add(name)
        if not _NAME.match(name):
            t.problems.append(f"{group.path(name)}: use letters, digits, - and _ in names")
        tables[name] = group.sub(name)
    return tables


def parse(raw: dict[str, Any], env: Mapping[str, str]) -> Config:
    """Validate an already-parsed TOML document. Raises `ConfigError` listing every problem."""
    missing: list[MissingEnvVar] = []
    doc = interpolate(raw, env, "", missing)
    if missing:
        # Missing variables first and alone, on one line: the rest would only echo them as
        # empty values.
        raise ConfigError("; ".join(m.message for m in missing))
    problems: list[str] = []
    top = _Table(doc, "", problems)
    server = _server(top.sub("server"))
    storage = _storage(top.sub("storage"))
    log = _log(top.sub("log"))
    retention = _retention(top.sub("retention"))
    admin = _admin(top.sub("admin"))
    polar_api = _polar_api(top.sub("polar_api"))
    checkout = _checkout(top.sub("checkout"))
    sources = {n: _source(n, st) for n, st in _named_tables(top, "sources").items()}
    reconcile = _reconcile(top.sub("reconcile"), sources)
    if checkout.enabled and polar_api.token is None:
        problems.append("polar_api.token: the checkout endpoint needs a Polar access token")
    if reconcile.interval_s and polar_api.token is None:
        problems.append("polar_api.token: periodic reconciliation needs a Polar access token")
    destinations = {n: _destination(n, dt) for n, dt in _named_tables(top, "destinations").items()}
    if not sources:
        problems.append("sources: define at least one source")
    paths = [s.path for s in sources.values()]
    for p in {p for p in paths if paths.count(p) > 1}:
        problems.append(f"sources: path {p} is used by more than one source")
    raw_routes = top.get("routes", list, [])
    routes = []
    for i, rt in enumerate(raw_routes or []):
        route = _route(i, _Table(rt, f"routes[{i}]", problems), sources, destinations)
        if route is not None:
            routes.append(route)
    names = [r.name for r in routes]
    for n in {n for n in names if names.count(n) > 1}:
        problems.append(f"routes: the name {n!r} is used more than once")
    if any(r.verify_order for r in routes) and polar_api.token is None:
        problems.append("polar_api.token: routes with verify_order need a Polar access token")
    top.done()
    if problems:
        raise ConfigError(problems)
    return Config(
        server,
        storage,
        log,
        sources,
        destinations,
        tuple(routes),
        retention,
        admin,
        polar_api,
        reconcile,
        checkout,
    )


def load(path: str | Path, env: Mapping[str, str]) -> Config:
    """Read and validate relay.toml."""
    return parse(read_toml(path), env)


def read_toml(path: str | Path) -> dict[str, Any]:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file (use --config or RELAY_CONFIG)") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None
    try:
        return tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}") from None


@dataclass(frozen=True, slots=True)
class OfflineConfig:
    """The sections operator commands need: no secrets, so none are required in the env."""

    storage: StorageConfig
    retention: RetentionConfig


def load_offline(path: str | Path, env: Mapping[str, str]) -> OfflineConfig:
    raw = read_toml(path)
    missing: list[MissingEnvVar] = []
    doc = {
        key: interpolate(raw.get(key, {}), env, key, missing) for key in ("storage", "retention")
    }
    if missing:
        raise ConfigError("; ".join(m.message for m in missing))
    problems: list[str] = []
    offline = OfflineConfig(
        storage=_storage(_Table(doc["storage"], "storage", problems)),
        retention=_retention(_Table(doc["retention"], "retention", problems)),
    )
    if problems:
        raise ConfigError(problems)
    return offline


def storage_path(path: str | Path, env: Mapping[str, str]) -> str:
    """Just `storage.path`, for commands that only need the database: they must work without
    the webhook secrets and write keys in the environment."""
    return load_offline(path, env).storage.path
