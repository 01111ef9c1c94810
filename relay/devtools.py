"""Tools to try the relay without Polar: `relay map`, `relay sign`, `relay send`, `relay dev`.

Owns: the offline dry run of the mapping (what would be sent, or why nothing would), signing a
body with Standard Webhooks headers (both Polar key schemes), posting a signed body to a
running relay, and the dev mode: the relay with a generated secret and a built-in Faurya sink
that prints each revenue call as it arrives. Nothing here is on the production path.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import json
import os
import secrets
import signal
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from relay import __version__, logs
from relay.app import create_app
from relay.config import UNSET_MARK, Config, is_postgres_url, load
from relay.delivery import USER_AGENT
from relay.errors import RelayError
from relay.ingest import resolve_lookups
from relay.mapping import map_event
from relay.models import EventStatus
from relay.serve import start_site
from relay.store import open_store
from relay.verify import sign


class ToolError(RelayError):
    """The command could not do what was asked."""


def read_event(path: str) -> tuple[bytes, dict[str, Any]]:
    try:
        raw = sys.stdin.buffer.read() if path == "-" else Path(path).read_bytes()
    except OSError as exc:
        raise ToolError(f"cannot read {path}: {exc.strerror}") from None
    try:
        event = json.loads(raw)
    except ValueError as exc:
        raise ToolError(f"{path}: not JSON: {exc}") from None
    if not isinstance(event, dict) or not isinstance(event.get("type"), str):
        raise ToolError(f"{path}: not a webhook event (a JSON object with a string 'type')")
    return raw, event


# ---------------------------------------------------------------- relay map


async def dry_run(
    config: Config, event: dict[str, Any], source: str, route: str | None, db: str | None
) -> list[str]:
    """The requests the relay would send for `event`, as text, or the reason for none."""
    routes = [r for r in config.routes if route is None or r.name == route]
    if route is not None and not routes:
        raise ToolError(
            f"no route named {route!r} (routes: "
            f"{', '.join(r.name for r in config.routes) or 'none'})"
        )
    found: dict[str, dict[str, Any]] = {}
    notes = []
    if db is not None:
        store = await open_store(db)
        try:
            found = await resolve_lookups(store, routes, source, event)
        finally:
            await store.close()
    elif any(r.wants_lookups(source, str(event.get("type"))) for r in routes):
        notes.append("(no --db: lookups find nothing, as for an order the relay never saw)")
    mapped = map_event(routes, source, event, found)
    if mapped.status is EventStatus.IGNORED:
        types = sorted({t for r in routes if r.source == source for t in r.events})
        return [
            *notes,
            f"nothing would be sent: no route of source {source!r} selects "
            f"{event['type']!r} (routes take: {', '.join(types) or 'nothing'}); "
            "the relay would answer 202 ignored",
        ]
    if mapped.status is EventStatus.UNMAPPABLE:
        return [
            *notes,
            f"nothing would be sent: unmappable: {mapped.reason}",
            "the relay would store the event and answer 202; fix relay.toml, then "
            "`relay reprocess`",
        ]
    out = notes
    for message in mapped.messages:
        destination = config.destinations[message.destination]
        out.append(f"route {message.route} -> destination {destination.name}")
        out.append(f"POST {destination.url}")
        headers = [(h.name, h.shown()) for h in destination.headers]
        headers += [
            ("content-type", "application/json"),
            ("user-agent", USER_AGENT),
            ("idempotency-key", message.idempotency_key),
        ]
        out += [f"{name}: {value}" for name, value in headers]
        out.append("")
        out.append(json.dumps(json.loads(message.body), indent=2))
        out.append("")
    return out


def cmd_map(args: argparse.Namespace, config: Config) -> int:
    _, event = read_event(args.event)
    if args.db and not is_postgres_url(args.db) and not Path(args.db).exists():
        # A dry run must not create a database, nor take a typo for "no purchase seen".
        raise ToolError(f"no database at {args.db}")
    source = args.source or next(iter(config.sources))
    if source not in config.sources:
        raise ToolError(f"no source named {source!r}")
    print("\n".join(asyncio.run(dry_run(config, event, source, args.route, args.db))))
    return 0


# ---------------------------------------------------------------- relay sign / send


def signed_headers(
    body: bytes,
    secret: str,
    *,
    scheme: str = "auto",
    msg_id: str | None = None,
    timestamp: int | None = None,
) -> dict[str, str]:
    msg_id = msg_id or f"msg_{uuid.uuid4().hex}"
    timestamp = int(time.time()) if timestamp is None else timestamp
    try:
        signature = sign(secret, msg_id, timestamp, body, scheme=scheme)
    except UnicodeDecodeError:
        raise ToolError("the body is not UTF-8") from None
    except ValueError as exc:
        raise ToolError(str(exc)) from None
    return {
        "webhook-id": msg_id,
        "webhook-timestamp": str(timestamp),
        "webhook-signature": signature,
        "content-type": "application/json",
    }


def cmd_sign(args: argparse.Namespace) -> int:
    raw, _ = read_event(args.file)
    headers = signed_headers(
        raw, args.secret, scheme=args.scheme, msg_id=args.id, timestamp=args.timestamp
    )
    if args.json:
        print(json.dumps(headers, indent=2))
    else:
        print("\n".join(f"{k}: {v}" for k, v in headers.items()))
    return 0


async def post_signed(url: str, raw: bytes, headers: dict[str, str]) -> tuple[int, str]:
    try:
        async with (
            aiohttp.ClientSession() as session,
            session.post(
                url, data=raw, headers=headers, timeout=aiohttp.ClientTimeout(total=15)
            ) as response,
        ):
            return response.status, await response.text()
    except (aiohttp.ClientError, TimeoutError) as exc:
        raise ToolError(f"cannot reach {url}: {type(exc).__name__}: {exc}") from None


def cmd_send(args: argparse.Namespace, config: Config | None) -> int:
    raw, event = read_event(args.file)
    secret = args.secret
    url = args.url
    if config is not None:
        if args.source and args.source not in config.sources:
            raise ToolError(f"no source named {args.source!r}")
        source = config.sources[args.source] if args.source else next(iter(config.sources.values()))
        if secret is None and (unset := UNSET_MARK.search(source.secrets[0].value)):
            raise ToolError(
                f"signing needs the webhook secret of source {source.name!r}: give --secret, "
                f"or set {unset.group(1)} (sources.{source.name}.secrets)"
            )
        secret = secret or source.secrets[0].value
        if url is None:
            wildcard = config.server.host in ("0.0.0.0", "::")  # noqa: S104 - a comparison
            host = "127.0.0.1" if wildcard else config.server.host
            url = f"http://{host}:{config.server.port}{source.path}"
    if secret is None or url is None:
        raise ToolError("give --secret and --url, or a config whose source has a secret")
    headers = signed_headers(raw, secret, msg_id=args.id)
    status, text = asyncio.run(post_signed(url, raw, headers))
    print(f"{event['type']} -> {url}: HTTP {status} {text}")
    return 0 if 200 <= status < 300 else 1


# ---------------------------------------------------------------- relay dev


def describe_call(body: bytes, headers: dict[str, str]) -> str:
    """One revenue call, the way a person reads it at a glance."""
    try:
        payload = json.loads(body)
    except ValueError:
        return f"unreadable body ({len(body)} bytes)"
    attribution = payload.get("attribution") or {}
    amount = payload.get("amount")
    code = str(payload.get("currency", "?"))
    from relay.currency import exponent, minor_to_major

    shown = str(amount)
    if isinstance(amount, int) and exponent(code) is not None:
        shown = f"{minor_to_major(amount, code):f} {code}"
    attributed = attribution.get("faSessionId") or attribution.get("faAttributionToken")
    parts = [
        f"{payload.get('event', '?'):<8} {shown:>14}",
        f"order {payload.get('orderId')}",
        f"polar {payload.get('providerPaymentId')}",
        f"session {attribution.get('faSessionId') or '-'}",
        "attributed" if attributed else "UNATTRIBUTED",
        f"key {headers.get('Idempotency-Key', headers.get('idempotency-key', '-'))}",
    ]
    return "  ".join(parts)


async def run_dev(config_path: str, port: int, host: str, db: str | None) -> None:
    calls = 0

    async def sink(request: web.Request) -> web.Response:
        nonlocal calls
        body = await request.read()
        calls += 1
        print(f"[faurya sink #{calls}] {describe_call(body, dict(request.headers))}", flush=True)
        return web.json_response({"ok": True})

    sink_app = web.Application()
    sink_app.router.add_post("/api/revenue", sink)
    sink_runner = web.AppRunner(sink_app, access_log=None)
    await sink_runner.setup()
    await web.TCPSite(sink_runner, "127.0.0.1", 0).start()
    sink_port = int(sink_runner.addresses[0][1])

    secret = os.environ.get("POLAR_WEBHOOK_SECRET") or f"polar_whs_dev{secrets.token_hex(16)}"
    env = dict(
        os.environ,
        POLAR_WEBHOOK_SECRET=secret,
        FAURYA_URL=f"http://127.0.0.1:{sink_port}",
        FAURYA_SITE_ID="dev-site",
        FAURYA_WRITE_KEY="dev-write-key",
    )
    config = load(config_path, env)
    tmp = None
    if db is None:
        tmp = tempfile.TemporaryDirectory(prefix="relay-dev-")
        db = str(Path(tmp.name) / "relay.db")
    config = dataclasses.replace(
        config,
        server=dataclasses.replace(config.server, host=host, port=port),
        storage=dataclasses.replace(config.storage, path=db),
    )
    runner = web.AppRunner(
        create_app(config, poll_interval_s=0.2), access_log=None, handle_signals=False
    )
    await runner.setup()
    try:
        await start_site(
            web.TCPSite(runner, host, port), (host, port), "--port", "--port or --host"
        )
        bound = int(runner.addresses[0][1])
        source = next(iter(config.sources.values()))
        url = f"http://127.0.0.1:{bound}{source.path}"
        print(f"Faurya Relay {__version__}, dev mode", flush=True)
        print(f"  webhooks:   {url}")
        print(f"  secret:     {secret}")
        print(f"  database:   {db}{' (temporary)' if tmp else ''}")
        print(f"  faurya:     built-in sink on 127.0.0.1:{sink_port}, prints every call below")
        print("  try, in another terminal:")
        print(
            f"    relay send --url {url} --secret {secret} "
            "tests/fixtures/polar/order.paid.purchase.json"
        )
        print("  Ctrl-C to stop.", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
        await sink_runner.cleanup()
        if tmp is not None:
            with contextlib.suppress(OSError):
                tmp.cleanup()


def cmd_dev(args: argparse.Namespace, config_path: str) -> int:
    # Logs go to a quiet level: the sink's lines are the show.
    logs.configure("warning", "console")
    asyncio.run(run_dev(config_path, args.port, args.host, args.db))
    return 0
