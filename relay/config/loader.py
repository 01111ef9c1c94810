"""Loading relay.toml: the whole config (`load`, `parse`) or, for operator commands, only the
sections that need no secrets (`load_offline`)."""

from __future__ import annotations

import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from relay.config.model import Config, OfflineConfig
from relay.config.reader import Table, interpolate
from relay.config.sections import (
    named_tables,
    read_admin,
    read_checkout,
    read_destination,
    read_ledger,
    read_log,
    read_polar_api,
    read_reconcile,
    read_retention,
    read_route,
    read_server,
    read_source,
    read_storage,
)
from relay.errors import ConfigError, MissingEnvVar
from relay.mapping import format_path


def parse(raw: dict[str, Any], env: Mapping[str, str], *, offline: bool = False) -> Config:
    """Validate an already-parsed TOML document. Raises `ConfigError` listing every problem.

    offline: for commands that serve nothing (`relay check`, `relay map`): an unset variable
    reads as `<unset: NAME>` and is listed in `Config.unset_variables` instead of failing."""
    missing: list[MissingEnvVar] = []
    doc = interpolate(raw, env, "", missing, placeholders=offline)
    if missing and not offline:
        # Missing variables first and alone, on one line: the rest would only echo them as
        # empty values.
        raise ConfigError("; ".join(m.message for m in missing))
    problems: list[str] = []
    top = Table(doc, "", problems)
    server = read_server(top.sub("server"))
    storage = read_storage(top.sub("storage"))
    log = read_log(top.sub("log"))
    retention = read_retention(top.sub("retention"))
    admin = read_admin(top.sub("admin"))
    polar_api = read_polar_api(top.sub("polar_api"))
    checkout = read_checkout(top.sub("checkout"))
    ledger = read_ledger(top.sub("ledger"))
    sources = {n: read_source(n, st) for n, st in named_tables(top, "sources").items()}
    reconcile = read_reconcile(top.sub("reconcile"), sources, has_token=polar_api.token is not None)
    if checkout.enabled and polar_api.token is None:
        problems.append("polar_api.token: the checkout endpoint needs a Polar access token")
    if reconcile.interval_s and polar_api.token is None:
        problems.append("polar_api.token: periodic reconciliation needs a Polar access token")
    destinations = {
        n: read_destination(n, dt) for n, dt in named_tables(top, "destinations").items()
    }
    if not sources:
        problems.append("sources: define at least one source")
    paths = [s.path for s in sources.values()]
    for p in {p for p in paths if paths.count(p) > 1}:
        problems.append(f"sources: path {p} is used by more than one source")
    raw_routes = top.get("routes", list, [])
    routes = []
    for i, rt in enumerate(raw_routes or []):
        route = read_route(i, Table(rt, f"routes[{i}]", problems), sources, destinations)
        if route is not None:
            routes.append(route)
    names = [r.name for r in routes]
    for n in {n for n in names if names.count(n) > 1}:
        problems.append(f"routes: the name {n!r} is used more than once")
    reads = [(route, route.reads()) for route in routes]  # each route walked once
    for i, redacted in enumerate(log.redact):
        for route, route_reads in reads:
            clash = next(
                (
                    p
                    for p in route_reads
                    if p[: len(redacted)] == redacted or redacted[: len(p)] == p
                ),
                None,
            )
            if clash is not None:
                problems.append(
                    f"log.redact[{i}]: routes.{route.name} reads {format_path(clash)}: a "
                    "redacted stored body could not be mapped again by relay reprocess"
                )
                break
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
        unset_variables=tuple(dict.fromkeys(m.var_name for m in missing)),
        ledger=ledger,
    )


def load(path: str | Path, env: Mapping[str, str], *, offline: bool = False) -> Config:
    """Read and validate relay.toml (offline: see `parse`)."""
    return parse(read_toml(path), env, offline=offline)


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
        storage=read_storage(Table(doc["storage"], "storage", problems)),
        retention=read_retention(Table(doc["retention"], "retention", problems)),
    )
    if problems:
        raise ConfigError(problems)
    return offline


def storage_path(path: str | Path, env: Mapping[str, str]) -> str:
    """Just where the store is (`storage.url`, else `storage.path`), for commands that only
    need the database: they must work without the webhook secrets and write keys."""
    return load_offline(path, env).storage.location
