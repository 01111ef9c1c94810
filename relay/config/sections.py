"""One function per relay.toml section: a checked table in, a frozen dataclass out."""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any
from urllib.parse import urlsplit

from relay.access import is_loopback_host
from relay.config.model import (
    RECONCILE_DEFAULT_INTERVAL_S,
    AdminConfig,
    CheckoutConfig,
    DestinationConfig,
    Header,
    LedgerConfig,
    LogConfig,
    PolarApiConfig,
    ReconcileConfig,
    RetentionConfig,
    RetryPolicy,
    Secret,
    ServerConfig,
    SourceConfig,
    StorageConfig,
)
from relay.config.reader import (
    UNSET_MARK,
    Table,
    between,
    http_url,
    listen_address,
    networks,
    one_of,
    positive,
    readable_file,
    url_path,
)
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
from relay.models import is_postgres_url

_SENSITIVE_HEADER = re.compile(r"key|token|secret|auth|password|cookie|signature", re.I)
_NAME = re.compile(r"^[A-Za-z0-9_\-]+$")

# ---------------------------------------------------------------- sections


def read_server(t: Table) -> ServerConfig:
    d = ServerConfig()
    s = ServerConfig(
        host=t.get("host", str, d.host),
        port=t.get("port", int, d.port, between(0, 65535)),
        max_body_bytes=t.get("max_body_bytes", int, d.max_body_bytes, between(1024, 64 << 20)),
        shutdown_grace_s=t.get("shutdown_grace_s", float, d.shutdown_grace_s, between(0, 3600)),
        delivery_processes=t.get("delivery_processes", int, d.delivery_processes, between(0, 16)),
        keepalive_timeout_s=t.get(
            "keepalive_timeout_s", float, d.keepalive_timeout_s, between(1, 3600)
        ),
        body_timeout_s=t.get("body_timeout_s", float, d.body_timeout_s, between(0.5, 600)),
        max_header_bytes=t.get("max_header_bytes", int, d.max_header_bytes, between(256, 65536)),
        max_headers=t.get("max_headers", int, d.max_headers, between(8, 1000)),
        tls_cert=t.get("tls_cert", str, d.tls_cert, readable_file),
        tls_key=t.get("tls_key", str, d.tls_key, readable_file),
        require_https=t.get("require_https", bool, d.require_https),
        trusted_proxies=networks(t, "trusted_proxies"),
    )
    # Judged on what was written: a cert that failed its own check must not also read as unset.
    if bool(t.raw.get("tls_cert")) != bool(t.raw.get("tls_key")):
        t.problems.append(f"{t.path('tls_key')}: tls_cert and tls_key go together")
    t.done()
    return s


def read_polar_api(t: Table) -> PolarApiConfig:
    d = PolarApiConfig()
    token = t.get("token", str, "")
    c = PolarApiConfig(
        url=t.get("url", str, d.url, http_url).rstrip("/"),
        token=Secret(token) if token else None,
        min_interval_s=t.get("min_interval_s", float, d.min_interval_s, between(0, 60)),
    )
    t.done()
    return c


def read_reconcile(
    t: Table, sources: Mapping[str, Any], *, has_token: bool = False
) -> ReconcileConfig:
    d = ReconcileConfig()
    default_interval_s = RECONCILE_DEFAULT_INTERVAL_S if has_token else 0.0
    c = ReconcileConfig(
        interval_s=t.get("interval_s", float, default_interval_s, between(0, 7 * 86400)),
        lookback_s=t.get("lookback_s", float, d.lookback_s, positive),
        source=t.get("source", str, d.source),
        first_run_after_s=t.get(
            "first_run_after_s", float, d.first_run_after_s, between(0, 7 * 86400)
        ),
    )
    if c.source not in sources and sources:
        t.problems.append(f"{t.path('source')}: no source named {c.source!r}")
    t.done()
    return c


def read_ledger(t: Table) -> LedgerConfig:
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    c = LedgerConfig(timezone=t.get("timezone", str, LedgerConfig().timezone))
    try:
        ZoneInfo(c.timezone)
    except (ZoneInfoNotFoundError, ValueError):
        t.problems.append(
            f"{t.path('timezone')}: unknown time zone {c.timezone!r} (an IANA name such as "
            "UTC or Europe/Berlin)"
        )
        c = LedgerConfig()
    t.done()
    return c


def read_checkout(t: Table) -> CheckoutConfig:
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
        # "https://shop.example/" is forgiven (the slash is stripped below); any other path,
        # a query or a fragment is not an origin.
        if (
            not isinstance(origin, str)
            or http_url(origin) is not None
            or urlsplit(origin).path not in ("", "/")
            or urlsplit(origin).query
            or urlsplit(origin).fragment
        ):
            t.problems.append(
                f"{t.path('allow_origins')}[{i}]: must be an origin like https://shop.example"
            )
    c = CheckoutConfig(
        enabled=t.get("enabled", bool, d.enabled),
        path=t.get("path", str, d.path, url_path),
        plans=tuple(plan_items),
        allow_origins=tuple(o.rstrip("/") for o in origins if isinstance(o, str)),
        success_url=t.get(
            "success_url", str, d.success_url, lambda v: None if not v else http_url(v)
        ),
        return_url=t.get("return_url", str, d.return_url, lambda v: None if not v else http_url(v)),
        rate_limit_per_min=t.get(
            "rate_limit_per_min", int, d.rate_limit_per_min, between(1, 100_000)
        ),
        global_rate_limit_per_min=t.get(
            "global_rate_limit_per_min", int, d.global_rate_limit_per_min, between(1, 100_000)
        ),
    )
    if c.enabled and not c.plans:
        t.problems.append(f"{t.path('plans')}: the checkout endpoint needs at least one plan")
    t.done()
    return c


def read_admin(t: Table) -> AdminConfig:
    listen = t.get("listen", str, "", listen_address)
    token = t.get("token", str, "")
    t.done()
    admin = AdminConfig(listen=listen, token=Secret(token) if token else None)
    # Metrics show revenue and the backlog: off loopback, only behind a token.
    if listen and not token and not listen_address(listen):
        host = admin.host_port[0]
        if not is_loopback_host(host):
            t.problems.append(
                f"{t.path('listen')}: {listen} is not a loopback address, so admin.token "
                "(RELAY_ADMIN_TOKEN) is required"
            )
    return admin


def _storage_url(t: Table) -> Secret | None:
    # The URL may hold a password: never quote it in a message.
    value = t.get("url", str, "")
    if not value:
        return None
    if not is_postgres_url(value) and not UNSET_MARK.search(value):
        t.problems.append(
            f"{t.path('url')}: must be a postgresql:// URL (or leave it out "
            "and set path for SQLite)"
        )
        return None
    return Secret(value)


def read_storage(t: Table) -> StorageConfig:
    d = StorageConfig()
    s = StorageConfig(
        path=t.get("path", str, d.path, lambda v: None if v else "must not be empty"),
        url=_storage_url(t),
        busy_timeout_ms=t.get("busy_timeout_ms", int, d.busy_timeout_ms, between(0, 600_000)),
        max_batch=t.get("max_batch", int, d.max_batch, between(1, 2000)),
        min_free_bytes=t.get("min_free_bytes", int, d.min_free_bytes, between(0, 2**62)),
    )
    t.done()
    return s


def read_retention(t: Table) -> RetentionConfig:
    d = RetentionConfig()
    r = RetentionConfig(
        bodies_s=t.get("bodies_s", float, d.bodies_s, positive),
        rows_s=t.get("rows_s", float, d.rows_s, positive),
        interval_s=t.get("interval_s", float, d.interval_s, positive),
    )
    if r.rows_s < r.bodies_s:
        t.problems.append(f"{t.path('rows_s')}: must be at least bodies_s ({r.bodies_s:g})")
    t.done()
    return r


def read_log(t: Table) -> LogConfig:
    d = LogConfig()
    s = LogConfig(
        level=t.get("level", str, d.level, one_of("debug", "info", "warning", "error")),
        format=t.get("format", str, d.format, one_of("auto", "json", "console")),
        redact=_redact_paths(t),
    )
    t.done()
    return s


def _redact_paths(t: Table) -> tuple[PathTuple, ...]:
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


def read_source(name: str, t: Table) -> SourceConfig:
    t.seen.add("secrets")
    if "secrets" in t.raw:
        secrets = _secrets(t.raw["secrets"], t.path("secrets"), t.problems)
    else:
        t.problems.append(f"{t.path('secrets')}: required")
        secrets = ()
    s = SourceConfig(
        name=name,
        kind=t.get("kind", str, "polar", one_of("polar", "standard-webhooks")),
        path=t.get("path", str, f"/webhooks/{name}", url_path),
        secrets=secrets,
        tolerance_s=t.get("tolerance_s", int, 300, between(1, 86400)),
        allow_ips=networks(t, "allow_ips"),
    )
    t.done()
    return s


def _retry(t: Table) -> RetryPolicy:
    d = RetryPolicy()
    r = RetryPolicy(
        max_attempts=t.get("max_attempts", int, d.max_attempts, between(1, 1_000_000)),
        base_s=t.get("base_s", float, d.base_s, positive),
        cap_s=t.get("cap_s", float, d.cap_s, positive),
        max_age_s=t.get("max_age_s", float, d.max_age_s, positive),
        jitter=t.get("jitter", float, d.jitter, between(0, 1)),
        max_retry_after_s=t.get("max_retry_after_s", float, d.max_retry_after_s, positive),
    )
    if r.cap_s < r.base_s:
        t.problems.append(f"{t.path('cap_s')}: must be at least base_s ({r.base_s:g})")
    t.done()
    return r


def _headers(t: Table) -> tuple[Header, ...]:
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


def read_destination(name: str, t: Table) -> DestinationConfig:
    d = DestinationConfig(name="", url="")
    url = t.get("url", str, check=http_url)
    if isinstance(url, str):
        # `${FAURYA_URL}/api/revenue` with a trailing slash in the variable: collapse it.
        parts = urlsplit(url)
        url = parts._replace(path=re.sub(r"/{2,}", "/", parts.path)).geturl()
    timeout_s = t.get("timeout_s", float, d.timeout_s, between(0.1, 300))
    lease_s = t.get("lease_s", float, max(d.lease_s, timeout_s * 2 + 5), positive)
    if lease_s < timeout_s + 5:
        # A lease shorter than the request would let a second attempt start while the first
        # is still in flight: a double send caused by us, not by a crash.
        t.problems.append(
            f"{t.path('lease_s')}: must be at least timeout_s + 5 ({timeout_s + 5:g})"
        )
    before = len(t.problems)
    concurrency = t.get("concurrency", int, d.concurrency, between(1, 1000))
    concurrency_ok = len(t.problems) == before  # else `concurrency` is only the default
    receiving = t.get("concurrency_while_receiving", int, 0, between(1, 1000))
    if concurrency_ok and isinstance(receiving, int) and receiving > concurrency:
        t.problems.append(
            f"{t.path('concurrency_while_receiving')}: must be at most concurrency ({concurrency})"
        )
    s = DestinationConfig(
        name=name,
        url=url or "",
        headers=_headers(t.sub("headers")),
        timeout_s=timeout_s,
        concurrency=concurrency,
        concurrency_while_receiving=receiving or 0,
        lease_s=lease_s,
        paused=t.get("paused", bool, d.paused),
        retry=_retry(t.sub("retry")),
    )
    t.done()
    return s


def read_route(
    index: int, t: Table, sources: Mapping[str, Any], destinations: Mapping[str, Any]
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
    # Build the route only from parts that all compiled: a bad `body` with a good `when` must
    # give its problem (already recorded), not a KeyError here.
    if None in (source, destination, events) or not {"idempotency_key", "body"} <= compiled.keys():
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


def _lookups(t: Table, destinations: Mapping[str, Any]) -> tuple[Lookup, ...]:
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


def named_tables(t: Table, key: str) -> dict[str, Table]:
    group = t.sub(key)
    tables = {}
    for name in group.raw:
        group.seen.add(name)
        if not _NAME.match(name):
            t.problems.append(f"{group.path(name)}: use letters, digits, - and _ in names")
        tables[name] = group.sub(name)
    return tables
