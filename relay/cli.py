"""The `relay` command: serve, check, outbox list|show|retry.

Owns argument parsing, the serve loop (signals, start-up and graceful stop) and turning errors
into one short line and an exit code: 2 for configuration and usage errors, 1 for run-time
failures. No traceback unless `--debug`.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import os
import signal
import sys
from collections.abc import Sequence
from typing import Any

from relay import __version__, hardening, logs
from relay.config import (
    Config,
    RetentionConfig,
    Secret,
    is_postgres_url,
    load,
    load_offline,
    storage_path,
)
from relay.errors import ConfigError, RelayError
from relay.mapping import ObjectRule, ValueRule
from relay.models import EventStatus, MessageStatus

log = logs.get_logger("relay.cli")


def _config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("RELAY_CONFIG") or "relay.toml")


def load_config(args: argparse.Namespace, *, offline: bool = False) -> Config:
    """offline: for commands that serve nothing; unset variables read as `<unset: NAME>`
    (and `note_unset` says so once)."""
    config = load(_config_path(args), os.environ, offline=offline)
    server = config.server
    if getattr(args, "host", None):
        server = dataclasses.replace(server, host=args.host)
    if getattr(args, "port", None) is not None:
        server = dataclasses.replace(server, port=args.port)
    storage = config.storage
    if getattr(args, "db", None):
        if is_postgres_url(args.db):
            storage = dataclasses.replace(storage, url=Secret(args.db))
        else:
            storage = dataclasses.replace(storage, path=args.db, url=None)
    return dataclasses.replace(config, server=server, storage=storage)


def note_unset(config: Config) -> None:
    """Say once which variables were not set (on stderr: stdout is the command's output)."""
    if config.unset_variables:
        names = ", ".join(config.unset_variables)
        print(
            f"relay: note: not set, shown as <unset: NAME>: {names} "
            "(relay serve needs them; relay check --strict fails on them)",
            file=sys.stderr,
        )


def _db_path(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    return storage_path(_config_path(args), os.environ)


# ---------------------------------------------------------------- serve


async def serve(config: Config) -> None:
    # aiohttp and the app load only for the commands that need them: `relay check` and the
    # operator commands start in a fraction of the time.
    from aiohttp import web, web_response

    from relay.app import SERVER_HEADER, create_admin_app, create_app

    # Answers aiohttp makes before any app sees the request (a malformed request line, an
    # oversized header: 400) get its module default, which names Python's and aiohttp's
    # versions; the apps' on_response_prepare cannot reach those.
    web_response.SERVER_SOFTWARE = SERVER_HEADER  # type: ignore[attr-defined]

    server = config.server
    app = create_app(config)
    limits: dict[str, Any] = {
        "keepalive_timeout": server.keepalive_timeout_s,
        "max_line_size": server.max_header_bytes,
        "max_field_size": server.max_header_bytes,
        "max_headers": server.max_headers,
    }
    runner = web.AppRunner(
        app,
        handle_signals=False,
        access_log=None,
        shutdown_timeout=server.shutdown_grace_s,
        **limits,
    )
    admin_runner = None
    await runner.setup()
    try:
        ssl_context = _ssl_context(server.tls_cert, server.tls_key)
        await start_site(
            web.TCPSite(runner, server.host, server.port, ssl_context=ssl_context),
            (server.host, server.port),
            "server.port",
            "--port, --host or RELAY_PORT",
        )
        host, port = _bound(runner)
        # Handlers first: a SIGTERM sent as soon as relay_listening is seen must stop gracefully.
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        fields: dict[str, Any] = {}
        if config.admin.listen:
            admin_runner = web.AppRunner(create_admin_app(app), access_log=None, **limits)
            await admin_runner.setup()
            admin_host, admin_port = config.admin.host_port
            await start_site(
                web.TCPSite(admin_runner, admin_host, admin_port),
                (admin_host, admin_port),
                "admin.listen",
                # 9090 is the shipped default, and Prometheus's own: say which key to change.
                "RELAY_ADMIN_LISTEN (admin.listen)",
            )
            fields["admin_host"], fields["admin_port"] = _bound(admin_runner)
        log.info(
            "relay_listening",
            host=host,
            port=port,
            tls=ssl_context is not None,
            version=__version__,
            sources={s.name: s.path for s in config.sources.values()},
            destinations=list(config.destinations),
            **fields,
        )
        await stop.wait()
        log.info("relay_stopping", grace_s=server.shutdown_grace_s)
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        # Stops accepting, lets in-flight requests finish, then runs cleanup_ctx in reverse:
        # workers (within the grace period), then the store.
        await runner.cleanup()
    log.info("relay_stopped")


async def start_site(site: Any, address: tuple[str, int], key: str, change: str) -> None:
    """Start listening; a port in use (or an address this host does not have, or a port it
    may not bind) is a one-line configuration error naming the address and what changes it."""
    try:
        await site.start()
    except OSError as exc:
        import errno

        host, port = address
        shown = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
        reason = (
            "is already in use (another process listens there)"
            if exc.errno == errno.EADDRINUSE
            else f"cannot be listened on: {exc.strerror or exc}"
        )
        raise ConfigError(f"{key}: {shown} {reason}; change it with {change}") from None


def _ssl_context(cert: str, key: str) -> Any:
    if not cert:
        return None
    import ssl

    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigError(f"server.tls_cert / server.tls_key: cannot load: {exc}") from None
    return context


def _bound(runner: Any) -> tuple[str, int]:
    address = runner.addresses[0]
    return str(address[0]), int(address[1])


def _file_warnings(config: Config) -> list[str]:
    return [] if config.storage.url is not None else hardening.file_warnings(config.storage.path)


def cmd_serve(args: argparse.Namespace) -> int:
    config = load_config(args)
    logs.configure(config.log.level, config.log.format, cache=True)
    for warning in hardening.warnings(config) + _file_warnings(config):
        log.warning("unsafe_setting", warning=warning)
    asyncio.run(serve(config))
    return 0


# ---------------------------------------------------------------- check


def describe_rule(rule: ValueRule | ObjectRule, indent: str) -> list[str]:
    if isinstance(rule, ObjectRule):
        lines = []
        for name, child in rule.fields:
            if isinstance(child, ObjectRule):
                lines.append(f"{indent}{name}:")
                lines += describe_rule(child, indent + "  ")
            else:
                lines.append(f"{indent}{name} = {_describe_value(child)}")
        return lines
    return [f"{indent}{_describe_value(rule)}"]


def _describe_value(rule: ValueRule) -> str:
    text = rule.source_text()
    if rule.type:
        text += f" as {rule.type}"
    if rule.transforms:
        text += " | " + " | ".join(rule.transforms)
    if rule.required:
        text += " (required)"
    return text


RECONCILE_SCOPES = "orders:read, refunds:read, disputes:read"


def _reconcile_line(config: Config) -> str:
    """What `relay serve` will reconcile, or a warning that it will not (webhooks alone miss
    what Polar gave up on, everything while an endpoint is disabled, and every lost dispute)."""
    missed = "webhooks Polar gave up on and lost disputes will never reach Faurya"
    if config.polar_api.token is None:
        # Not a warning: relaying webhooks needs no token. But say what is given up.
        return (
            f"reconcile: off, no polar_api.token: {missed}; set POLAR_ACCESS_TOKEN "
            f"(an organization access token with {RECONCILE_SCOPES})"
        )
    if config.reconcile.interval_s <= 0:
        return f"warning: reconcile: off (reconcile.interval_s = 0): {missed}"
    return (
        f"reconcile: every {config.reconcile.interval_s:g} s over the last "
        f"{config.reconcile.lookback_s / 86400:g} days (token scopes: {RECONCILE_SCOPES}; "
        "without disputes:read, lost disputes are skipped)"
    )


def cmd_check(args: argparse.Namespace) -> int:
    from relay import polar_schema

    config = load_config(args, offline=not args.strict)
    # Paths no Polar event of the route has (a typo: data.net_amunt): before deploy, not at
    # start-up, where a field Polar adds after this relay was built must not stop serving.
    if problems := polar_schema.check(config):
        raise ConfigError(problems)
    out = [f"{_config_path(args)}: ok"]
    for source in config.sources.values():
        out.append(
            f"source {source.name}: POST {source.path} ({source.kind}, "
            f"{len(source.secrets)} secret(s), tolerance {source.tolerance_s} s)"
        )
    for dest in config.destinations.values():
        headers = ", ".join(f"{h.name}: {h.shown()}" for h in dest.headers)
        out.append(
            f"destination {dest.name}: POST {dest.url} (timeout {dest.timeout_s:g} s, "
            f"concurrency {dest.concurrency}{'; ' + headers if headers else ''})"
        )
    for route in config.routes:
        out.append(
            f"route {route.name}: {route.source} {' | '.join(route.events)}"
            f"{' (with conditions)' if route.when else ''} -> {route.destination}"
        )
        out.append(f"  idempotency key: {route.idempotency_key.text}")
        if route.verify_order is not None:
            from relay.order_check import compared_fields

            compared = ", ".join(compared_fields(route)) or "nothing (only that it is paid)"
            out.append(
                f"  payment check: Polar order {route.verify_order.text}, compares {compared}"
            )
        out.append("  body:")
        out += describe_rule(route.body, "    ")
    if not config.routes:
        out.append("no routes: every event is acknowledged and ignored")
    out.append(_reconcile_line(config))
    out.append(
        f"admin: /metrics on {config.admin.listen}"
        + (" (bearer token)" if config.admin.token else "")
        if config.admin.listen
        else "admin: no admin listener (admin.listen): /metrics is not served"
    )
    out += [f"warning: {w}" for w in hardening.warnings(config) + _file_warnings(config)]
    print("\n".join(out))
    note_unset(config)
    return 0


# ---------------------------------------------------------------- operator commands


def _run_operator(args: argparse.Namespace) -> int:
    """Commands that only need the database open them without the config's secrets; those
    that re-run the mapping (`reprocess`) load the whole config."""
    from relay import operator

    if args.func_name == "reprocess":
        config = load_config(args)
        return asyncio.run(operator.run(args, config.storage.location, config.retention, config))
    retention = RetentionConfig()
    if not args.db or args.func_name == "prune":
        offline = load_offline(_config_path(args), os.environ)
        retention = offline.retention
    return asyncio.run(operator.run(args, _db_path(args), retention, None))


# ---------------------------------------------------------------- Polar's API


def cmd_reconcile(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config.polar_api.token is None:
        raise ConfigError(
            "environment variable POLAR_ACCESS_TOKEN is not set or empty (needed by "
            "polar_api.token for relay reconcile)"
        )
    return asyncio.run(_reconcile(args, config))


async def _reconcile(args: argparse.Namespace, config: Config) -> int:
    import aiohttp

    from relay.models import SystemClock
    from relay.operator import parse_time
    from relay.polar_api import PolarApi
    from relay.reconcile import Reconciler
    from relay.store import open_store

    clock = SystemClock()
    now = clock.now()
    since = parse_time(args.since, now) if args.since else now - config.reconcile.lookback_s
    until = parse_time(args.until, now)
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        if tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    store = await open_store(
        config.storage.location, busy_timeout_ms=config.storage.busy_timeout_ms
    )
    try:
        assert config.polar_api.token is not None
        async with aiohttp.ClientSession() as session:
            api = PolarApi(
                session,
                config.polar_api.url,
                config.polar_api.token.value,
                min_interval_s=config.polar_api.min_interval_s,
            )
            summary = await Reconciler(
                store, config, api, clock, dry_run=args.dry_run, progress=progress
            ).run(since, until)
    finally:
        await store.close()
    if tty:
        print(file=sys.stderr)
    for detail in summary.details:
        print(detail)
    print(("dry run: " if args.dry_run else "") + summary.line())
    return 0


def ledger_arguments(p: argparse.ArgumentParser) -> argparse.ArgumentParser:
    p.add_argument(
        "--since",
        help="a day (in the ledger's time zone), ISO time or an age like 7d "
        "(default: the window reconciliation read)",
    )
    p.add_argument("--until", help="a day (included), ISO time or an age (default: now)")
    p.add_argument("--currency", help="only this currency (ISO 4217, e.g. USD)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--timezone", help="cut days in this IANA time zone (default: ledger.timezone)")
    p.add_argument(
        "--differences", action="store_true", help="only the differences (CSV: one per row)"
    )
    return p


def cmd_ledger(args: argparse.Namespace) -> int:
    from relay import ledger_report

    # Offline: the ledger maps with the routes but sends nothing, so no secret is needed.
    config = load_config(args, offline=True)
    return asyncio.run(ledger_report.run(args, config))


# ---------------------------------------------------------------- migrate


def cmd_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(args))


async def _migrate(args: argparse.Namespace) -> int:
    from relay.store import open_store

    location = _db_path(args)
    if args.from_sqlite:
        from relay.store.transfer import copy_sqlite_to_postgres

        if not is_postgres_url(location):
            raise ConfigError(
                "--from-sqlite copies INTO PostgreSQL: give --db postgresql://... "
                "or set storage.url"
            )
        result = await copy_sqlite_to_postgres(args.from_sqlite, location)
        print(
            f"copied {result.events} events and {result.messages} messages "
            f"({result.pending} still to deliver, {result.dead} dead) into PostgreSQL; "
            "now start the relays with storage.url"
        )
        return 0
    store = await open_store(location)
    try:
        print(f"schema at version {await store.schema_version()} ({store.path})")
    finally:
        await store.close()
    return 0


# ---------------------------------------------------------------- trying it out
# devtools imports aiohttp; loaded only by these commands.


def cmd_map(args: argparse.Namespace) -> int:
    from relay import devtools

    config = load_config(args, offline=True)
    note_unset(config)
    return devtools.cmd_map(args, config)


def cmd_sign(args: argparse.Namespace) -> int:
    from relay import devtools

    return devtools.cmd_sign(args)


def cmd_send(args: argparse.Namespace) -> int:
    from relay import devtools

    # With --secret and --url nothing from the config is needed (e.g. against `relay dev`);
    # otherwise only the source's secret and the server's address: devtools says which
    # variable is missing when the secret is.
    config = None if args.secret and args.url else load_config(args, offline=True)
    return devtools.cmd_send(args, config)


def cmd_dev(args: argparse.Namespace) -> int:
    from relay import devtools

    return devtools.cmd_dev(args, _config_path(args))


# ---------------------------------------------------------------- parser


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Faurya Relay: Polar webhooks "
        "to Faurya revenue calls, through a durable outbox.",
    )
    parser.add_argument("--version", action="version", version=f"faurya-relay {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", help="relay.toml to use (default: $RELAY_CONFIG or ./relay.toml)"
    )
    common.add_argument("--debug", action="store_true", help="show tracebacks")
    with_db = argparse.ArgumentParser(add_help=False)
    with_db.add_argument(
        "--db",
        help="SQLite database path or postgresql:// URL (overrides storage.path / storage.url)",
    )
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve", parents=[common, with_db], help="run the relay")
    p.add_argument("--host", help="listen address (overrides server.host)")
    p.add_argument("--port", type=int, help="listen port (overrides server.port; 0 = any)")
    p.set_defaults(func=cmd_serve)

    p = sub.add_parser(
        "check",
        parents=[common],
        help="validate the config, print the routes (works without the secrets: unset "
        "variables show as <unset: NAME>)",
    )
    p.add_argument(
        "--strict",
        action="store_true",
        help="also fail (exit 2) on unset environment variables, as relay serve does (for CI)",
    )
    p.set_defaults(func=cmd_check)

    def selection_args(q: argparse.ArgumentParser, statuses: Sequence[str]) -> None:
        q.add_argument(
            "--status", action="append", choices=list(statuses), help="repeat for several"
        )
        q.add_argument("--destination")
        q.add_argument("--event-type")
        q.add_argument("--since", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
        q.add_argument("--until", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")

    message_statuses = [s.value for s in MessageStatus]
    p = sub.add_parser("outbox", help="inspect and retry outbound messages")
    outbox = p.add_subparsers(dest="outbox_command", required=True)
    q = outbox.add_parser("list", parents=[common, with_db], help="list messages, newest first")
    selection_args(q, message_statuses)
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=_run_operator, func_name="list")
    q = outbox.add_parser("show", parents=[common, with_db], help="one message with its body")
    q.add_argument("id", type=int)
    q.set_defaults(func=_run_operator, func_name="show")
    q = outbox.add_parser(
        "retry",
        parents=[common, with_db],
        help="make dead (or waiting) messages due now, with fresh attempts",
    )
    q.add_argument("ids", type=int, nargs="*")
    q.add_argument("--all-dead", action="store_true")
    q.set_defaults(func=_run_operator, func_name="retry")
    q = outbox.add_parser(
        "discard",
        parents=[common, with_db],
        help="give up on dead messages: kept and listed as discarded, never sent, no longer "
        "counted as dead (clears the dead-letter alert)",
    )
    q.add_argument("ids", type=int, nargs="*", help="message ids (else: the filters)")
    q.add_argument("--reason", required=True, help="why (kept with each message)")
    q.add_argument("--destination")
    q.add_argument("--event-type")
    q.add_argument("--since", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
    q.add_argument("--until", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
    q.add_argument("--dry-run", action="store_true", help="only list what would be discarded")
    q.set_defaults(func=_run_operator, func_name="discard")
    q = outbox.add_parser(
        "stats",
        parents=[common, with_db],
        help="messages by destination and status, and pause states",
    )
    q.set_defaults(func=_run_operator, func_name="stats")
    q = outbox.add_parser(
        "events",
        parents=[common, with_db],
        help="inbound webhooks, newest first, with what happened to each (e.g. --status "
        "unmappable shows the reason nothing was sent)",
    )
    q.add_argument("--status", action="append", choices=[s.value for s in EventStatus])
    q.add_argument("--event-type")
    q.add_argument("--since", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
    q.add_argument("--until", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=_run_operator, func_name="events")

    p = sub.add_parser(
        "replay",
        parents=[common, with_db],
        help="send messages again (dead by default; any status with --status)",
    )
    p.add_argument("ids", type=int, nargs="*", help="message ids (else: the filters)")
    selection_args(p, message_statuses)
    p.add_argument("--dry-run", action="store_true", help="only count what would be replayed")
    p.set_defaults(func=_run_operator, func_name="replay")

    p = sub.add_parser(
        "reprocess",
        parents=[common],
        help="run the current mapping again on stored inbound events "
        "(unmappable ones by default); keys already sent are not sent again",
    )
    p.add_argument("ids", type=int, nargs="*", help="event ids (else: the filters)")
    p.add_argument("--status", action="append", choices=[s.value for s in EventStatus])
    p.add_argument("--event-type")
    p.add_argument("--since", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
    p.add_argument("--until", help="ISO date/time (UTC) or an age like 30m, 6h, 7d")
    p.add_argument("--dry-run", action="store_true", help="show what the mapping gives now")
    p.add_argument(
        "--db",
        help="SQLite database path or postgresql:// URL (overrides storage.path / storage.url)",
    )
    p.set_defaults(func=_run_operator, func_name="reprocess")

    for name, text in (
        ("pause", "stop deliveries to a destination (messages wait)"),
        ("resume", "resume deliveries to a destination"),
    ):
        p = sub.add_parser(name, parents=[common, with_db], help=text)
        p.add_argument("destination")
        p.set_defaults(func=_run_operator, func_name=name)

    p = sub.add_parser(
        "migrate",
        parents=[common, with_db],
        help="create or upgrade the outbox schema (SQLite or PostgreSQL); with --from-sqlite, "
        "copy a stopped SQLite relay's outbox into an empty PostgreSQL one",
    )
    p.add_argument("--from-sqlite", metavar="PATH", help="the SQLite database to copy")
    p.set_defaults(func=cmd_migrate)

    p = sub.add_parser(
        "reconcile",
        parents=[common, with_db],
        help="find paid orders and succeeded refunds in Polar that the relay has no record of, "
        "and enqueue them (same routes and keys: never double-counts)",
    )
    p.add_argument(
        "--since", help="ISO date/time or an age like 7d (default: reconcile.lookback_s, 3 days)"
    )
    p.add_argument("--until", help="ISO date/time or an age")
    p.add_argument("--dry-run", action="store_true", help="list what would be enqueued")
    p.set_defaults(func=cmd_reconcile)

    ledger_arguments(
        sub.add_parser(
            "ledger",
            parents=[common, with_db],
            help="the revenue ledger: Polar's paid orders and refunds against what Faurya got, "
            "per day and currency, and each difference with its fix (Polar's side as the last "
            "reconciliation read it)",
        )
    ).set_defaults(func=cmd_ledger)

    p = sub.add_parser(
        "map",
        parents=[common],
        help="dry run: print the requests the relay would send for an event",
    )
    p.add_argument("--event", required=True, help="a webhook body (JSON file, or - for stdin)")
    p.add_argument("--route", help="only this route")
    p.add_argument("--source", help="the source the event comes from (default: the first)")
    p.add_argument("--db", help="resolve lookups (refunds) from this database")
    p.set_defaults(func=cmd_map)

    p = sub.add_parser("sign", parents=[common], help="print Standard Webhooks headers for a body")
    p.add_argument("file", help="the body (JSON file, or - for stdin)")
    p.add_argument("--secret", required=True, help="polar_whs_... or whsec_...")
    p.add_argument(
        "--scheme",
        choices=["auto", "legacy", "standard"],
        default="auto",
        help="Polar's key scheme: legacy = the secret's bytes, standard = base64 "
        "after whsec_ (auto: standard for whsec_ secrets)",
    )
    p.add_argument("--id", help="webhook-id (default: random)")
    p.add_argument("--timestamp", type=int, help="webhook-timestamp (default: now)")
    p.add_argument("--json", action="store_true")
    p.set_defaults(func=cmd_sign)

    p = sub.add_parser(
        "send",
        parents=[common],
        help="sign a body with the configured secret and POST it to a relay",
    )
    p.add_argument("file", help="the body (JSON file, or - for stdin)")
    p.add_argument("--url", help="default: this config's server address and source path")
    p.add_argument("--secret", help="default: the source's first secret")
    p.add_argument("--source", help="default: the first source")
    p.add_argument("--id", help="webhook-id (default: random; reuse one to test dedupe)")
    p.set_defaults(func=cmd_send)

    p = sub.add_parser(
        "dev",
        parents=[common],
        help="the relay with a generated secret and a local Faurya sink that "
        "prints every revenue call",
    )
    p.add_argument(
        "--host", default="127.0.0.1", help="listen address for webhooks (default: 127.0.0.1)"
    )
    p.add_argument(
        "--port", type=int, default=8080, help="listen port for webhooks (default: 8080; 0 = any)"
    )
    p.add_argument("--db", help="default: a temporary database")
    p.set_defaults(func=cmd_dev)

    p = sub.add_parser(
        "prune",
        parents=[common, with_db],
        help="apply retention now (relay serve also does it periodically)",
    )
    p.set_defaults(func=_run_operator, func_name="prune")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        if len(exc.problems) == 1:
            print(f"relay: config error: {exc.problems[0]}", file=sys.stderr)
        else:
            print(f"relay: {len(exc.problems)} config errors:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return 2
    except RelayError as exc:
        if args.debug:
            raise
        print(f"relay: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `relay outbox list | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
