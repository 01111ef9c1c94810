"""Serving a relay: `run(config)` starts the app and its admin listener, waits for SIGTERM or
SIGINT, and stops gracefully, as aiohttp's `web.run_app` does for a single app.

Owns: the listeners (the public port, with TLS when configured, and the admin listener),
the signal handlers, the `relay_listening` / `relay_stopping` / `relay_stopped` log lines and
a busy or unavailable port as a one-line configuration error. What runs inside the app (store,
workers, retention, reconcile) and its start-up and shutdown order is relay/app.py's.
"""

from __future__ import annotations

import asyncio
import errno
import signal
from typing import Any

from aiohttp import web, web_response

from relay import __version__, runtime
from relay.app import SERVER_HEADER, create_admin_app, create_app
from relay.config import Config
from relay.errors import ConfigError
from relay.logs import get_logger

log = get_logger("relay.serve")


def run(config: Config) -> None:
    """Serve `config` until SIGTERM or SIGINT, then stop gracefully (`relay serve`)."""
    runtime.run(serve(config))


async def serve(config: Config) -> None:
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
            event_loop=runtime.loop_name(),
            sources={s.name: s.path for s in config.sources.values()},
            destinations=list(config.destinations),
            **fields,
        )
        runtime.settle()
        await stop.wait()
        log.info("relay_stopping", grace_s=server.shutdown_grace_s)
    finally:
        if admin_runner is not None:
            await admin_runner.cleanup()
        # Stops accepting, lets in-flight requests finish, then runs cleanup_ctx in reverse:
        # workers (within the grace period), then the store.
        await runner.cleanup()
    log.info("relay_stopped")


async def start_site(site: web.BaseSite, address: tuple[str, int], key: str, change: str) -> None:
    """Start listening; a port in use (or an address this host does not have, or a port it
    may not bind) is a one-line configuration error naming the address and what changes it."""
    try:
        await site.start()
    except OSError as exc:
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


def _bound(runner: web.BaseRunner) -> tuple[str, int]:
    address = runner.addresses[0]
    return str(address[0]), int(address[1])
