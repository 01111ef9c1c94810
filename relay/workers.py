"""Delivery workers: one pool per destination, draining the outbox.

Owns: the claim loop (`concurrency` attempts at once, `concurrency_while_receiving` while
webhooks arrive, refilled in chunks), wake-ups (a commit wakes idle workers at once; otherwise
they sleep until the next retry is due, at most `poll_interval_s`), the periodic return of
expired leases, the bookkeeping write of each attempt (a tracked task, shielded where a
cancellation could reach it: stop() waits for every one), the optional payment check, and the
graceful stop.

Each attempt's outcome maps to exactly one store call: delivered, retry, dead (or release, when
a stop interrupts it). A message never leaves the outbox any other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import time
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from relay import order_check, retry, revenue
from relay.config import DestinationConfig
from relay.delivery import AttemptResult, Attempts
from relay.errors import StorageError
from relay.logs import get_logger
from relay.mapping import Route
from relay.metrics import Metrics, status_class
from relay.models import (
    AttemptRecord,
    ClaimedMessage,
    Clock,
    Dead,
    Delivered,
    ErrorKind,
    Outcome,
    RetryLater,
)
from relay.order_check import is_polar_id, shown_id
from relay.polar_api import PolarApi, PolarApiError, WrongOrder, is_paid
from relay.store import Store

log = get_logger("relay.workers")
# How long after the last commit of new messages a worker keeps to its smaller pool.
RECEIVING_WINDOW_S = 1.0
# The store turns every driver error into a StorageError (relay/store/outbox.py).
_STORE_ERRORS = (StorageError,)


class DestinationWorker:
    """Claims and delivers the messages of one destination."""

    def __init__(
        self,
        store: Store,
        sender: Attempts,
        destination: DestinationConfig,
        clock: Clock,
        metrics: Metrics,
        *,
        poll_interval_s: float = 1.0,
        rand: Callable[[], float] = random.random,
        polar: Callable[[], PolarApi | None] | None = None,
        routes: Mapping[str, Route] | None = None,
    ) -> None:
        self.destination = destination
        self._store = store
        self._sender = sender
        self._clock = clock
        self._metrics = metrics
        self._poll_interval_s = poll_interval_s
        self._rand = rand
        self._polar = polar
        self._routes = routes or {}  # by name: what a payment check compares a message with
        self._wake = asyncio.Event()
        self._attempts: set[asyncio.Task[None]] = set()
        self._writes: set[asyncio.Task[None]] = set()
        self._main: asyncio.Task[None] | None = None
        self._stopping = False
        self.paused = destination.paused
        self.sleeping = False  # waiting for a wake-up (a commit, a finished attempt) or a timer
        self._received_at = -1e18  # loop time of the last commit that brought messages
        self.receiving_window_s = RECEIVING_WINDOW_S
        self._pause_checked_at = -1e18  # loop time of the last read of the pause override
        # Label children bound once: .labels() takes a lock and a lookup, per delivery.
        name = destination.name
        self._duration = metrics.delivery_duration.labels(name)
        self._outcomes = {
            o: metrics.deliveries.labels(name, o) for o in ("delivered", "retry", "dead")
        }

    @property
    def running(self) -> bool:
        return self._main is not None and not self._main.done()

    def start(self) -> None:
        self._main = asyncio.create_task(self._run(), name=f"worker-{self.destination.name}")

    async def _run(self) -> None:
        name = self.destination.name
        log.info("worker_started", destination=name, concurrency=self.destination.concurrency)
        loop = asyncio.get_running_loop()
        next_sweep = loop.time() + self.destination.lease_s / 2
        while not self._stopping:
            # Clear before looking, so a commit that lands while we query still wakes us.
            self._wake.clear()
            timeout_s = self._poll_interval_s
            try:
                if await self._check_paused(loop.time()):
                    pass  # paused: messages wait in the outbox, none is dropped
                elif await self._fill() and not self._attempts:
                    # Idle: sleep until the next retry is due. (While attempts run, each one
                    # that ends wakes us, and the claim then takes whatever has come due.)
                    due_at = await self._store.next_due_at(name)
                    if due_at is not None:
                        timeout_s = min(timeout_s, max(0.0, due_at - self._clock.now()))
                if loop.time() >= next_sweep:
                    next_sweep = loop.time() + self.destination.lease_s / 2
                    if count := await self._store.requeue_inflight(expired_only=True):
                        log.warning("leases_expired_requeued", destination=name, count=count)
            except Exception as exc:
                # Never let the loop die: messages would wait silently. Log, then poll again.
                log.error(
                    "worker_loop_error", destination=name, error=f"{type(exc).__name__}: {exc}"
                )
            if timeout_s > 0:
                self.sleeping = True
                try:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(timeout_s):
                            await self._wake.wait()
                finally:
                    self.sleeping = False
        log.info("worker_stopped", destination=name)

    async def _check_paused(self, now: float) -> bool:
        """The pause state: `relay pause|resume` (in the store) overrides the config. Read at
        most once per poll interval, so a busy worker does not query it per message."""
        if now - self._pause_checked_at >= self._poll_interval_s:
            self._pause_checked_at = now
            overrides = await self._store.paused_overrides()
            paused = overrides.get(self.destination.name, self.destination.paused)
            if paused != self.paused:
                log.warning(
                    "destination_paused" if paused else "destination_resumed",
                    destination=self.destination.name,
                )
            self.paused = paused
        return self.paused

    def wake(self) -> None:
        self._wake.set()

    def refresh(self) -> None:
        """An operator changed the outbox: read the pause state again and claim now."""
        self._pause_checked_at = -1e18
        self._wake.set()

    def received(self) -> None:
        """New messages were committed (webhooks are arriving): wake up, and hold back to
        `concurrency_while_receiving` for `receiving_window_s`."""
        self._received_at = asyncio.get_running_loop().time()
        self._wake.set()

    @property
    def limit(self) -> int:
        """Attempts allowed in flight now. A full pool finishing at once is a burst of
        bookkeeping on the serving loop (acks, logs, the next claim): while webhooks arrive,
        a smaller pool keeps their acknowledgements fast; a backlog with nothing arriving
        drains with the whole pool."""
        d = self.destination
        if d.concurrency_while_receiving and (
            asyncio.get_running_loop().time() - self._received_at < self.receiving_window_s
        ):
            return d.concurrency_while_receiving
        return d.concurrency

    @property
    def idle(self) -> bool:
        """No attempt in flight and no bookkeeping write pending. A message's metrics and log
        lines come just after its commit: the store shows it settled a moment before they do."""
        return not self._attempts and not self._writes

    async def _fill(self) -> bool:
        """Claim as many due messages as there are free slots. True when slots remain free
        (nothing more is due), False when the pool is full."""
        limit = self.limit
        free = limit - len(self._attempts)
        # Refill in chunks while attempts run (a claim is a write), one by one only when idle.
        if free <= 0 or (self._attempts and free < max(1, limit // 4)):
            return False
        claimed = await self._store.claim(self.destination.name, free, self.destination.lease_s)
        for msg in claimed:
            self._spawn(msg)
        return len(claimed) < free

    def _spawn(self, msg: ClaimedMessage) -> None:
        task = asyncio.create_task(self._attempt(msg), name=f"deliver-{msg.id}")
        self._attempts.add(task)
        task.add_done_callback(self._attempt_done)

    def _attempt_done(self, task: asyncio.Task[None]) -> None:
        self._attempts.discard(task)
        self._wake.set()  # a slot is free

    async def _attempt(self, msg: ClaimedMessage) -> None:
        if msg.verify_ref is not None:
            refused = await self._check_payment(msg)
            if refused is not None:
                await self._shielded(self._record(msg, *refused))
                return
        try:
            result = await self._sender.send(msg)
        except asyncio.CancelledError:
            # Stopped mid-request: hand the message back untried (it may still have reached
            # the destination; the idempotency key covers the resend).
            await self._shielded(self._release(msg))
            raise
        now = self._clock.now()
        outcome = retry.decide(
            self.destination.retry,
            attempt=msg.attempt,
            retry_from_at=msg.retry_from_at,
            now=now,
            status=result.status,
            error=result.error,
            retry_after_s=retry.parse_retry_after(result.retry_after, now),
            rand=self._rand(),
        )
        # The slot frees now: the bookkeeping write runs on, tracked (stop() and
        # run_until_idle() wait for it), so the next claim shares the writer's commit with
        # this ack instead of waiting a commit for it.
        self._background(self._record(msg, result, outcome))

    async def _check_payment(self, msg: ClaimedMessage) -> tuple[AttemptResult, Outcome] | None:
        """Confirm with Polar that the order is paid and is the one the message describes,
        before sending (routes with `verify_order`). None when it is; else what to record
        instead of a delivery: a retry when Polar could not answer; dead when the id is not a
        Polar id, Polar returns another order, the order is unknown or unpaid, or a field the
        message sends differs from Polar's order (relay/order_check.py says why the stored body
        is kept and compared, not rebuilt from Polar's order)."""
        ref = msg.verify_ref
        assert ref is not None
        started = time.perf_counter()
        route = self._routes.get(msg.route or "")
        if not is_polar_id(ref):
            return self._unverified("bad_id", f"{shown_id(ref)} is not a Polar order id", started)
        if route is None:
            # Config changed since ingest: nothing to compare the message with.
            return self._unverified(
                "no_route",
                f"route {msg.route!r} is not configured any more: cannot compare order {ref}",
                started,
            )
        api = self._polar() if self._polar is not None else None
        now = self._clock.now()
        order = None
        error = "no Polar API client (polar_api.token)"
        if api is not None:
            try:
                order = await api.get_order(ref)
                error = ""
            except WrongOrder as exc:
                self._mismatched(msg, ref, ["id"])
                return self._unverified("mismatch", exc.message, started)
            except PolarApiError as exc:
                error = exc.message
        if error:
            self._metrics.payment_checks.labels("error").inc()
            result = AttemptResult.failed(
                ErrorKind.PAYMENT_CHECK, error, time.perf_counter() - started
            )
            return result, retry.decide(
                self.destination.retry,
                attempt=msg.attempt,
                retry_from_at=msg.retry_from_at,
                now=now,
                status=None,
                error=result.error,
                retry_after_s=None,
                rand=self._rand(),
            )
        if order is None or not is_paid(order):
            state = "unknown to Polar" if order is None else f"{order.get('status')!s}"
            return self._unverified("not_paid", f"Polar order {ref} is {state}", started)
        mismatches = order_check.compare(route, msg.body, order)
        if mismatches:
            self._mismatched(msg, ref, [m.field for m in mismatches])
            return self._unverified(
                "mismatch",
                f"Polar order {ref} differs from the message in "
                + "; ".join(m.describe() for m in mismatches),
                started,
            )
        self._metrics.payment_checks.labels("paid").inc()
        return None

    def _unverified(self, outcome: str, why: str, started: float) -> tuple[AttemptResult, Outcome]:
        """Dead-letter: the payment is not what the message claims (counted by `outcome`)."""
        self._metrics.payment_checks.labels(outcome).inc()
        result = AttemptResult.failed(
            ErrorKind.PAYMENT_NOT_VERIFIED, why, time.perf_counter() - started
        )
        assert result.error is not None
        return result, Dead(result.error, None)

    def _mismatched(self, msg: ClaimedMessage, order_id: str, fields: list[str]) -> None:
        route = msg.route or ""
        for name in fields:
            self._metrics.payment_check_mismatches.labels(route, name).inc()
        log.error(
            "payment_check_mismatch",
            destination=self.destination.name,
            message_id=msg.id,
            route=route,
            order_id=order_id,
            fields=fields,
        )

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        await asyncio.shield(task)

    async def _release(self, msg: ClaimedMessage) -> None:
        with contextlib.suppress(*_STORE_ERRORS):
            await self._store.release(msg)
        log.info("delivery_released", destination=msg.destination, message_id=msg.id)

    async def _record(self, msg: ClaimedMessage, result: AttemptResult, outcome: Outcome) -> None:
        name = self.destination.name
        m = self._metrics
        self._duration.observe(result.duration_s)
        m.delivery_attempts.labels(name, status_class(result.status, result.kind)).inc()
        detail = result.error or (f"HTTP {result.status}: {result.snippet}".strip())
        fields = {
            "destination": name,
            "message_id": msg.id,
            "request_id": msg.request_id,
            "idempotency_key": msg.idempotency_key,
            "attempt": msg.attempt,
            "status": result.status,
            "duration_ms": round(result.duration_s * 1000, 2),
        }
        if result.kind is not None:
            fields["error_kind"] = result.kind.value
        # The console's attempt timeline: stored with the outcome, in its transaction.
        attempt = AttemptRecord(
            at=self._clock.now(),
            status=result.status,
            error_kind=None if result.kind is None else result.kind.value,
            duration_s=result.duration_s,
            snippet=result.snippet,
        )
        try:
            if isinstance(outcome, Delivered):
                changed = await self._store.mark_delivered(msg, outcome.status, attempt)
                self._outcomes["delivered"].inc()
                log.info("delivery_succeeded", **fields)
                if changed:
                    self._count_revenue(msg, fields)
            elif isinstance(outcome, RetryLater):
                changed = await self._store.mark_retry(msg, outcome, detail[:1000], attempt)
                self._outcomes["retry"].inc()
                if outcome.retry_after_s is not None:
                    # What we actually wait, not what was asked (it is clamped).
                    m.retry_after_wait.labels(name).inc(outcome.at - self._clock.now())
                log.warning(
                    "delivery_retry_scheduled",
                    **fields,
                    reason=outcome.reason,
                    retry_in_s=round(outcome.at - self._clock.now(), 3),
                    counts_attempt=outcome.counts_attempt,
                )
            else:
                assert isinstance(outcome, Dead)
                changed = await self._store.mark_dead(
                    msg, outcome, f"{outcome.reason}; {detail}"[:1000], attempt
                )
                self._outcomes["dead"].inc()
                log.error(
                    "delivery_dead_lettered",
                    **fields,
                    reason=outcome.reason,
                    response=result.snippet[:200],
                )
        except _STORE_ERRORS as exc:
            # The lease still holds the message; it returns to pending when the lease expires
            # and is sent again with the same idempotency key. Nothing is lost.
            log.error("delivery_record_failed", **fields, error=str(exc))
            return
        if not changed:
            log.warning("delivery_lease_lost", **fields)

    def _count_revenue(self, msg: ClaimedMessage, fields: dict[str, Any]) -> None:
        found = revenue.facts(msg.body)
        if found is None:
            return
        name = self.destination.name
        self._metrics.revenue_delivered.labels(name, found.event, found.currency).inc(
            found.amount_minor
        )
        if found.event == "purchase" and not found.attributed:
            self._metrics.unattributed.labels(name).inc()
            self._metrics.unattributed_amount.labels(name, found.currency).inc(found.amount_minor)
            log.warning(
                "revenue_unattributed",
                **fields,
                amount_minor=found.amount_minor,
                currency=found.currency,
                hint="the order's metadata had no faSessionId or faAttributionToken; see "
                + revenue.TROUBLESHOOTING,
            )

    async def run_until_idle(self) -> None:
        """Deliver every message that is due now, then return (tests, and `burst` use)."""
        self._pause_checked_at = -1e18
        if await self._check_paused(asyncio.get_running_loop().time()):
            return
        while True:
            claimed = await self._store.claim(
                self.destination.name, self.destination.concurrency, self.destination.lease_s
            )
            if not claimed:
                return
            await asyncio.gather(*(self._attempt(m) for m in claimed))
            await asyncio.gather(*set(self._writes))

    async def stop(self, grace_s: float) -> None:
        """Stop claiming; give in-flight attempts `grace_s` to finish; release the rest."""
        self._stopping = True
        self._wake.set()
        if self._main is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await self._main
        if self._attempts:
            _, late = await asyncio.wait(set(self._attempts), timeout=grace_s)
            for task in late:
                task.cancel()
            if late:
                log.warning(
                    "delivery_cancelled_at_shutdown",
                    destination=self.destination.name,
                    count=len(late),
                )
                await asyncio.gather(*late, return_exceptions=True)
        if self._writes:
            # The bookkeeping writes of finished or released attempts must land before the
            # store closes.
            await asyncio.gather(*set(self._writes), return_exceptions=True)


class Workers:
    """All destination workers of one relay."""

    def __init__(self, workers: Iterable[DestinationWorker]) -> None:
        self.by_destination = {w.destination.name: w for w in workers}

    def notify(self, destinations: set[str]) -> None:
        """Called after a commit: wake the named destinations (all of them for an empty set)."""
        for name, worker in self.by_destination.items():
            if not destinations or name in destinations:
                worker.received()

    def refresh(self) -> None:
        """An operator changed the outbox (pause, resume, replay, retry), in this process or
        another: every worker reads the pause state again and looks for due messages now."""
        for worker in self.by_destination.values():
            worker.refresh()

    def start(self) -> None:
        for worker in self.by_destination.values():
            worker.start()

    @property
    def running(self) -> bool:
        return all(w.running for w in self.by_destination.values())

    @property
    def idle(self) -> bool:
        return all(w.idle for w in self.by_destination.values())

    async def stop(self, grace_s: float) -> None:
        await asyncio.gather(*(w.stop(grace_s) for w in self.by_destination.values()))

    async def run_until_idle(self) -> None:
        for worker in self.by_destination.values():
            await worker.run_until_idle()
