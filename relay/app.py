"""The aiohttp application: `create_app(config)` wires every part together.

Owns: routes, start-up and shutdown order (`cleanup_ctx`), health endpoints and the error
middleware. Start-up: open the store (taking the one-server lock), return orphaned leases to
pending, start the workers. Shutdown (after aiohttp has stopped accepting and let in-flight
requests finish): stop the workers within the grace period, then close the store.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from typing import Any

import aiohttp
from aiohttp import web

from relay.access import bearer_ok, resolve_client
from relay.checkout import CHECKOUT_MAX_WAIT_S, CheckoutEndpoint
from relay.config import Config, DestinationConfig
from relay.console import auth as console_auth
from relay.console.api import add_api
from relay.console.jobs import Jobs
from relay.console.rejected import RejectedLog
from relay.console.service import ConsoleService, ReconcileRun
from relay.delivery import Attempts, Redactor, Sender, client_session
from relay.delivery_process import ProcessSenders
from relay.diskspace import DiskSpace
from relay.ingest import WebhookIngest
from relay.ledger_gauge import LedgerGauge
from relay.logs import get_logger
from relay.metrics import CONTENT_TYPE, Metrics
from relay.models import Clock, MessageStatus, SystemClock, is_postgres_url
from relay.polar_api import PolarApi
from relay.readiness import Readiness
from relay.store import BatchStats, Store, open_store
from relay.workers import DestinationWorker, Workers

log = get_logger("relay.app")

CONFIG = web.AppKey("config", Config)
METRICS = web.AppKey("metrics", Metrics)
CLOCK = web.AppKey("clock", Clock)
STORE = web.AppKey("store", Store)
WORKERS = web.AppKey("workers", Workers)
DB_PATH = web.AppKey("db_path", str)
POLL_INTERVAL_S = web.AppKey("poll_interval_s", float)
POLAR_API = web.AppKey("polar_api", PolarApi)
DISK = web.AppKey("disk", DiskSpace)
# The checkout's own budget: a flood of checkouts must not delay payment checks or reconcile.
CHECKOUT_API = web.AppKey("checkout_api", PolarApi)
READINESS = web.AppKey("readiness", Readiness)
# The console: requests refused before they could be trusted (memory only), this relay's bulk
# jobs, and the last reconcile run.
REJECTED = web.AppKey("rejected", RejectedLog)
JOBS = web.AppKey("jobs", Jobs)
RECONCILE_RUNS = web.AppKey("reconcile_runs", list[ReconcileRun])
LEDGER_GAUGE = web.AppKey("ledger_gauge", LedgerGauge)


def secret_values(config: Config) -> list[str]:
    """Every secret the config holds, for redaction of text we store or log."""
    values = [s.value for src in config.sources.values() for s in src.secrets]
    # A whsec_ secret's key part alone is as secret as the whole string.
    values += [v.removeprefix("whsec_") for v in values if v.startswith("whsec_")]
    values += [
        h.text for d in config.destinations.values() for h in d.headers if h.shown() == "***"
    ]
    for token in (
        config.admin.token,
        config.admin.read_token,
        config.polar_api.token,
        config.storage.url,
    ):
        if token is not None:
            values.append(token.value)
    return values


SERVER_HEADER = "faurya-relay"


async def _server_header(request: web.Request, response: web.StreamResponse) -> None:
    """No versions in `Server` (aiohttp's default names Python's and its own): they only help
    an attacker pick an exploit."""
    response.headers["Server"] = SERVER_HEADER


@web.middleware
async def _errors(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    try:
        return await handler(request)
    except web.HTTPException:
        raise
    except Exception:
        # A bug of ours must not turn into a lost webhook: 503 makes Polar retry.
        log.exception("request_failed", path=request.path)
        return web.json_response({"error": "internal error; retry later"}, status=503)


def create_app(
    config: Config,
    *,
    clock: Clock | None = None,
    db_path: str | None = None,
    poll_interval_s: float = 1.0,
) -> web.Application:
    app = web.Application(client_max_size=config.server.max_body_bytes, middlewares=[_errors])
    app.on_response_prepare.append(_server_header)
    app[CONFIG] = config
    app[METRICS] = Metrics()
    app[CLOCK] = clock or SystemClock()
    app[DB_PATH] = db_path or config.storage.location
    app[POLL_INTERVAL_S] = poll_interval_s
    if config.storage.min_free_bytes and not is_postgres_url(app[DB_PATH]):
        app[DISK] = DiskSpace(app[DB_PATH], config.storage.min_free_bytes)
    app[READINESS] = _readiness_checks(app)
    app[REJECTED] = RejectedLog()
    app[JOBS] = Jobs(lambda: app.get(STORE), app[CLOCK])
    app[RECONCILE_RUNS] = []
    app[LEDGER_GAUGE] = LedgerGauge(config, app[METRICS], app[CLOCK])
    if config.polar_api.token is not None:
        app.cleanup_ctx.append(_polar_api_ctx)
    app.cleanup_ctx.append(_store_ctx)
    app.cleanup_ctx.append(_jobs_ctx)
    app.cleanup_ctx.append(_workers_ctx)
    app.cleanup_ctx.append(_retention_ctx)
    if config.reconcile.interval_s > 0:
        app.cleanup_ctx.append(_reconcile_ctx)

    def current_store() -> Store | None:
        return app.get(STORE)

    rejected = _rejection_recorder(app)
    app.middlewares.append(_unknown_paths(rejected))
    for source in config.sources.values():
        ingest = WebhookIngest(
            source,
            config,
            current_store,
            app[METRICS],
            app[CLOCK],
            rejected=_for_source(rejected, source.name),
        )
        app.router.add_post(source.path, ingest.handle)
    if config.checkout.enabled:
        checkout = CheckoutEndpoint(
            config.checkout, config.server, lambda: app[CHECKOUT_API], app[METRICS]
        )
        app.router.add_post(config.checkout.path, checkout.create)
        app.router.add_route("OPTIONS", config.checkout.path, checkout.preflight)
    # The public port (Polar and browsers reach it) serves nothing else: /metrics shows
    # revenue and the backlog, so it lives on the admin listener only.
    app.router.add_get("/healthz", _healthz)
    app.router.add_get("/readyz", _readyz)
    return app


Rejection = Callable[[web.Request, str, str | None], None]


def _for_source(record: Rejection, source: str) -> Callable[[web.Request, str], None]:
    def recorder(request: web.Request, reason: str) -> None:
        record(request, reason, source)

    return recorder


def _rejection_recorder(app: web.Application) -> Rejection:
    """Keep a refused request in the console's ring buffer: when, from where (the client
    behind trusted proxies), why, the path and the webhook-id it claimed. Never its body."""
    server = app[CONFIG].server

    def record(request: web.Request, reason: str, source: str | None = None) -> None:
        client = resolve_client(
            request.remote,
            request.headers.getall("x-forwarded-for", ()),
            request.headers.getall("x-forwarded-proto", ()),
            tls=request.secure,
            trusted_proxies=server.trusted_proxies,
        )
        app[REJECTED].add(
            app[CLOCK].now(),
            client.ip or "unknown",
            reason,
            request.path,
            request.headers.get("webhook-id"),
            source,
        )

    return record


def _unknown_paths(record: Rejection) -> Any:  # aiohttp's middleware type is not exported
    """Requests to a path the public port does not serve are rejected requests too."""

    @web.middleware
    async def middleware(
        request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
    ) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPNotFound:
            record(request, "unknown_path", None)
            raise

    return middleware


def create_admin_app(main: web.Application) -> web.Application:
    """The admin listener (`admin.listen`, loopback by default): /metrics, /healthz and
    /readyz of `main`, and the operator console (pages and /api/v1, relay/console/), away from
    the public webhook port. Off loopback the config requires `admin.token`, which /metrics
    and the console then ask for."""
    from relay.console.pages import add_pages

    config = main[CONFIG]
    guard = console_auth.ConsoleAuth(config.admin, clock=main[CLOCK].now)
    admin = web.Application(middlewares=[_errors, console_auth.console_guard])
    admin.on_response_prepare.append(_server_header)

    def paused(name: str) -> bool | None:
        workers = main.get(WORKERS)
        worker = workers.by_destination.get(name) if workers is not None else None
        return None if worker is None else worker.paused

    def last_reconcile() -> ReconcileRun | None:
        runs = main[RECONCILE_RUNS]
        return runs[-1] if runs else None

    admin[console_auth.AUTH] = guard
    admin[console_auth.SERVICE] = ConsoleService(
        lambda: main.get(STORE),
        config,
        main[CLOCK],
        main[REJECTED],
        main[JOBS],
        open_access=guard.open,
        paused=paused,
        last_reconcile=last_reconcile,
    )
    add_api(admin)
    add_pages(admin)

    async def metrics(request: web.Request) -> web.Response:
        return await _render_metrics(main, request)

    async def readyz(request: web.Request) -> web.Response:
        return await _readiness(main)

    admin.router.add_get("/metrics", metrics)
    admin.router.add_get("/healthz", _healthz)
    admin.router.add_get("/readyz", readyz)
    return admin


async def _polar_api_ctx(app: web.Application) -> AsyncIterator[None]:
    """Clients for Polar's API, when a token is configured: one for payment checks and
    reconciliation, and one with its own bounded budget for the checkout endpoint."""
    config = app[CONFIG].polar_api
    checkout = app[CONFIG].checkout
    assert config.token is not None
    async with aiohttp.ClientSession() as session:
        app[POLAR_API] = PolarApi(
            session, config.url, config.token.value, min_interval_s=config.min_interval_s
        )
        if checkout.enabled:
            app[CHECKOUT_API] = PolarApi(
                session,
                config.url,
                config.token.value,
                min_interval_s=60.0 / checkout.global_rate_limit_per_min,
                # A browser waits: a short queue, and 503 past it.
                max_wait_s=CHECKOUT_MAX_WAIT_S,
            )
        yield


async def _store_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    metrics = app[METRICS]
    store = await open_store(
        app[DB_PATH],
        clock=app[CLOCK],
        busy_timeout_ms=config.storage.busy_timeout_ms,
        max_batch=config.storage.max_batch,
        serve=True,
    )

    readiness = app[READINESS]

    def on_batch(stats: BatchStats) -> None:
        metrics.commit_duration.observe(stats.commit_s)
        metrics.commit_batch_size.observe(stats.size)
        if not stats.ok:
            metrics.commit_failures.inc()
            readiness.commit_failed()
        else:
            readiness.committed()

    store.on_batch = on_batch

    def on_listening(listening: bool) -> None:
        metrics.notify_fallback.set(0 if listening else 1)
        if listening:
            log.info("notify_listen_restored", channel="relay_outbox")
        else:
            log.warning(
                "notify_listen_lost",
                channel="relay_outbox",
                fallback_poll_s=app[POLL_INTERVAL_S],
                hint="re-establishing LISTEN with backoff; workers poll meanwhile",
            )

    store.on_listening = on_listening
    # SQLite: we hold the serve lock, so every inflight row belongs to a process that died.
    # PostgreSQL: other replicas may own live leases; only expired ones come back.
    recovered = await store.requeue_inflight(expired_only=not store.exclusive)
    if recovered:
        log.warning("leases_recovered_at_startup", count=recovered)
    app[STORE] = store
    log.info("store_opened", path=store.path, recovered=recovered)
    try:
        yield
    finally:
        await app[LEDGER_GAUGE].close()  # a scrape's refresh still reading the store
        await store.close()
        log.info("store_closed")


async def _jobs_ctx(app: web.Application) -> AsyncIterator[None]:
    """Bulk jobs stop before the store closes; theirs show as interrupted, to restart."""
    try:
        yield
    finally:
        await app[JOBS].close()


async def _workers_ctx(app: web.Application) -> AsyncIterator[None]:
    config = app[CONFIG]
    destinations = list(config.destinations.values())
    redact = Redactor(secret_values(config))
    processes: ProcessSenders | None = None
    async with contextlib.AsyncExitStack() as stack:
        if config.server.delivery_processes:
            processes = ProcessSenders(
                destinations,
                secret_values(config),
                config.server.delivery_processes,
                log_level=config.log.level,
                log_format=config.log.format,
                metrics=app[METRICS],
            )
            # Closed last: after the workers' graceful stop, which may still use them.
            stack.push_async_callback(processes.close)
            processes.start_soon()
            app[METRICS].watch_children(processes.pids)
        session = await stack.enter_async_context(
            client_session(sum(d.concurrency for d in destinations))
        )

        def sender(dest: DestinationConfig) -> Attempts:
            if processes is not None:
                return processes.sender(dest)
            return Sender(session, dest, redact)

        workers = Workers(
            DestinationWorker(
                app[STORE],
                sender(dest),
                dest,
                app[CLOCK],
                app[METRICS],
                poll_interval_s=app[POLL_INTERVAL_S],
                polar=lambda: app.get(POLAR_API),
                routes={route.name: route for route in config.routes},
            )
            for dest in destinations
        )
        app[STORE].on_commit = workers.notify
        app[STORE].on_operation = workers.refresh
        app[WORKERS] = workers
        workers.start()
        try:
            yield
        finally:
            await workers.stop(config.server.shutdown_grace_s)


async def prune_once(store: Store, config: Config, now: float, metrics: Metrics) -> None:
    retention = config.retention
    result = await store.prune(
        bodies_before=now - retention.bodies_s, rows_before=now - retention.rows_s
    )
    for kind, count in dataclasses.asdict(result).items():
        if count:
            metrics.retention_pruned.labels(kind).inc(count)
    if any(dataclasses.astuple(result)):
        log.info("retention_pruned", **dataclasses.asdict(result))


async def _retention_ctx(app: web.Application) -> AsyncIterator[None]:
    """Prune by age every `retention.interval_s`, starting right after start-up."""

    async def loop() -> None:
        while True:
            try:
                await prune_once(app[STORE], app[CONFIG], app[CLOCK].now(), app[METRICS])
            except Exception as exc:  # retention failing must not stop the relay
                log.error("retention_failed", error=f"{type(exc).__name__}: {exc}")
            await asyncio.sleep(app[CONFIG].retention.interval_s)

    async with _running(loop(), "retention"):
        yield


@contextlib.asynccontextmanager
async def _running(coro: Coroutine[Any, Any, None], name: str) -> AsyncIterator[None]:
    """A background loop for the life of the app, cancelled at shutdown."""
    task = asyncio.create_task(coro, name=name)
    try:
        yield
    finally:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task


async def _reconcile_ctx(app: web.Application) -> AsyncIterator[None]:
    """Reconcile with Polar's API every `reconcile.interval_s` over `reconcile.lookback_s`
    (the config guarantees a token, so `_polar_api_ctx` has made the client)."""
    from relay.reconcile import Reconciler

    config = app[CONFIG]
    metrics = app[METRICS]

    async def loop() -> None:
        delay_s = min(config.reconcile.first_run_after_s, config.reconcile.interval_s)
        while True:
            await asyncio.sleep(delay_s)
            delay_s = config.reconcile.interval_s
            now = app[CLOCK].now()
            try:
                summary = await Reconciler(app[STORE], config, app[POLAR_API], app[CLOCK]).run(
                    now - config.reconcile.lookback_s, None
                )
            except Exception as exc:  # a failed run must not end the loop: the next one retries
                metrics.reconcile_runs.labels("failed").inc()
                _note_reconcile(app, ReconcileRun(now, False, error=type(exc).__name__))
                log.error("reconcile_failed", error=f"{type(exc).__name__}: {exc}")
                continue
            metrics.reconcile_runs.labels("ok").inc()
            _note_reconcile(
                app,
                ReconcileRun(
                    now,
                    True,
                    seen=summary.seen,
                    enqueued=summary.enqueued,
                    already_recorded=summary.already_recorded,
                    unmappable=summary.unmappable,
                ),
            )
            metrics.reconcile_enqueued.inc(summary.enqueued)
            log.info(
                "reconcile_finished",
                seen=summary.seen,
                enqueued=summary.enqueued,
                already_recorded=summary.already_recorded,
                unmappable=summary.unmappable,
                pages=summary.pages,
                skipped=summary.skipped or None,
            )
            await app[LEDGER_GAUGE].refresh(app[STORE])

    async with _running(loop(), "reconcile"):
        yield


def _note_reconcile(app: web.Application, run: ReconcileRun) -> None:
    runs = app[RECONCILE_RUNS]
    runs.append(run)
    del runs[:-10]  # the overview shows the last one


async def _healthz(request: web.Request) -> web.Response:
    return web.json_response({"status": "ok"})


def _readiness_checks(app: web.Application) -> Readiness:
    """The store (from its last commit, or a probe at most a second old), the workers, and
    free space on the database's filesystem (where storage.min_free_bytes is set)."""
    readiness = Readiness()

    def workers() -> str:
        running = app.get(WORKERS)
        return "ok" if running is not None and running.running else "not running"

    readiness.add("store", lambda: readiness.store(app.get(STORE)))
    readiness.add("workers", workers)
    if DISK in app:
        readiness.add("disk", lambda: _disk_check(app))
    return readiness


async def _ready(app: web.Application) -> tuple[bool, dict[str, str]]:
    return await app[READINESS].check()


def _disk_check(app: web.Application) -> str:
    """Free space on the database's filesystem against storage.min_free_bytes (a cached
    reading), exported as gauges so the alert can say why the relay is not ready."""
    reading = app[DISK].reading()
    metrics = app[METRICS]
    metrics.store_min_free.set(reading.min_free_bytes)
    if reading.free_bytes is not None:
        metrics.store_free.set(reading.free_bytes)
    return reading.describe()


async def _readyz(request: web.Request) -> web.Response:
    return await _readiness(request.app)


async def _readiness(app: web.Application) -> web.Response:
    ready, checks = await _ready(app)
    app[METRICS].ready.set(1 if ready else 0)
    return web.json_response({"ready": ready, "checks": checks}, status=200 if ready else 503)


async def _render_metrics(app: web.Application, request: web.Request) -> web.Response:
    token = app[CONFIG].admin.token
    if token is not None and not bearer_ok(request.headers.get("authorization"), token.value):
        return web.json_response(
            {"error": "bearer token required"},
            status=401,
            headers={"WWW-Authenticate": 'Bearer realm="relay-admin"'},
        )
    metrics = app[METRICS]
    store = app.get(STORE)
    if store is not None:
        # Backlog gauges are read from the store at scrape time, so they are exact.
        try:
            now = app[CLOCK].now()
            for name in app[CONFIG].destinations:
                stats = await store.stats(name)
                for status in MessageStatus:
                    metrics.outbox_messages.labels(name, status.value).set(stats.counts[status])
                worker = app[WORKERS].by_destination.get(name) if WORKERS in app else None
                metrics.destination_paused.labels(name).set(int(bool(worker and worker.paused)))
                oldest = stats.oldest_pending_created_at
                metrics.oldest_pending_age.labels(name).set(
                    0 if oldest is None else max(0.0, now - oldest)
                )
            metrics.db_size.set(await store.db_size_bytes())
            app[LEDGER_GAUGE].refresh_soon(store)
        except Exception as exc:  # a scrape must still answer (with the last values)
            log.warning("metrics_refresh_failed", error=str(exc))
        ready, _ = await _ready(app)
        metrics.ready.set(1 if ready else 0)
    return web.Response(body=metrics.render(), headers={"Content-Type": CONTENT_TYPE})
