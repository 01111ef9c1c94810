"""One function per relay.toml section: a checked table in, a frozen dataclass out.

A section's plain fields are read by `read_fields` from the bounds and defaults its dataclass
declares (relay/config/model.py); a function here adds only what is its own: secrets, nested
tables, and the checks that relate one field to another.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import replace
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
    http_url,
    listen_address,
    read_field,
    read_fields,
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
    s = read_fields(t, ServerConfig)
    # Judged on what was written: a cert that failed its own check must not also read as unset.
    if bool(t.raw.get("tls_cert")) != bool(t.raw.get("tls_key")):
        t.problems.append(f"{t.path('tls_key')}: tls_cert and tls_key go together")
    t.done()
    return s


def read_polar_api(t: Table) -> PolarApiConfig:
    token = t.get("token", str, "")
    c = read_fields(t, PolarApiConfig, given={"token": Secret(token) if token else None})
    t.done()
    return replace(c, url=c.url.rstrip("/"))


def read_reconcile(
    t: Table, sources: Mapping[str, Any], *, has_token: bool = False
) -> ReconcileConfig:
    default_interval_s = RECONCILE_DEFAULT_INTERVAL_S if has_token else 0.0
    c = read_fields(t, ReconcileConfig, defaults={"interval_s": default_interval_s})
    if c.source not in sources and sources:
        t.problems.append(f"{t.path('source')}: no source named {c.source!r}")
    t.done()
    return c


def read_ledger(t: Table) -> LedgerConfig:
    c = read_fields(t, LedgerConfig)
    t.done()
    return c


def read_checkout(t: Table) -> CheckoutConfig:
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
    c = read_fields(
        t,
        CheckoutConfig,
        given={
            "plans": tuple(plan_items),
            "allow_origins": tuple(o.rstrip("/") for o in origins if isinstance(o, str)),
        },
    )
    if c.enabled and not c.plans:
        t.problems.append(f"{t.path('plans')}: the checkout endpoint needs at least one plan")
    t.done()
    return c


def read_admin(t: Table) -> AdminConfig:
    token = t.get("token", str, "")
    read_token = t.get("read_token", str, "")
    hosts = t.get("hosts", list, [])
    for i, host in enumerate(hosts):
        if not isinstance(host, str) or not host.strip() or any(c in host for c in " /@?#"):
            t.problems.append(
                f"{t.path('hosts')}[{i}]: must be a host or host:port, like relay.internal:9090"
            )
    admin = read_fields(
        t,
        AdminConfig,
        given={
            "token": Secret(token) if token else None,
            "read_token": Secret(read_token) if read_token else None,
            "hosts": tuple(h.strip().lower() for h in hosts if isinstance(h, str)),
        },
    )
    listen = admin.listen
    t.done()
    if read_token and read_token == token:
        t.problems.append(
            f"{t.path('read_token')}: must differ from admin.token (one reads, one acts)"
        )
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
    s = read_fields(t, StorageConfig, given={"url": _storage_url(t)})
    t.done()
    return s


def read_retention(t: Table) -> RetentionConfig:
    r = read_fields(t, RetentionConfig)
    if r.rows_s < r.bodies_s:
        t.problems.append(f"{t.path('rows_s')}: must be at least bodies_s ({r.bodies_s:g})")
    t.done()
    return r


def read_log(t: Table) -> LogConfig:
    s = read_fields(t, LogConfig, given={"redact": _redact_paths(t)})
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
    s = read_fields(
        t,
        SourceConfig,
        given={"name": name, "secrets": secrets},
        defaults={"path": f"/webhooks/{name}"},
    )
    t.done()
    return s


def _retry(t: Table) -> RetryPolicy:
    r = read_fields(t, RetryPolicy)
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
    url = read_field(t, DestinationConfig, "url")
    if isinstance(url, str):
        # `${FAURYA_URL}/api/revenue` with a trailing slash in the variable: collapse it.
        parts = urlsplit(url)
        url = parts._replace(path=re.sub(r"/{2,}", "/", parts.path)).geturl()
    timeout_s = read_field(t, DestinationConfig, "timeout_s")
    lease_s = read_field(t, DestinationConfig, "lease_s", max(d.lease_s, timeout_s * 2 + 5))
    if lease_s < timeout_s + 5:
        # A lease shorter than the request would let a second attempt start while the first
        # is still in flight: a double send caused by us, not by a crash.
        t.problems.append(
            f"{t.path('lease_s')}: must be at least timeout_s + 5 ({timeout_s + 5:g})"
        )
    before = len(t.problems)
    concurrency = read_field(t, DestinationConfig, "concurrency")
    concurrency_ok = len(t.problems) == before  # else `concurrency` is only the default
    receiving = read_field(t, DestinationConfig, "concurrency_while_receiving")
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
