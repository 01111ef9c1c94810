"""Delivery workers: one pool per destination, draining the outbox.

Owns: the claim loop (`concurrency` attempts at once, `concurrency_while_receiving` while
webhooks arrive, refilled in chunks), wake-ups (a commit wakes idle workers at once; otherwise
they sleep until the next retry is due, at most `poll_interval_s`), the periodic return of
expired leases, the bookkeeping write of each attempt (a tracked task, shielded where a
cancellation could reach it: stop() waits for every one), and the graceful stop. Each attempt
is claim, (payment check,) send, decide, record: the payment check is relay/payment_check.py,
the decision relay/retry.py, and the record relay/recorder.py, which maps each outcome to
exactly one store call: delivered, retry, dead (or release, when a stop interrupts it). A
message never leaves the outbox any other way.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
from collections.abc import Callable, Coroutine, Iterable, Mapping
from typing import Any

from relay import retry
from relay.config import DestinationConfig
from relay.delivery import Attempts
from relay.logs import get_logger
from relay.mapping import Route
from relay.metrics import Metrics
from relay.models import ClaimedMessage, Clock
from relay.payment_check import PaymentCheck
from relay.polar_api import PolarApi
from relay.recorder import Recorder
from relay.store import Store

log = get_logger("relay.workers")
# How long after the last commit of new messages a worker keeps to its smaller pool.
RECEIVING_WINDOW_S = 1.0


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
        self._poll_interval_s = poll_interval_s
        self._rand = rand
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
        self._recorder = Recorder(store, destination.name, clock, metrics)
        self._payment_check = PaymentCheck(
            destination, clock, metrics, polar=polar, routes=routes, rand=rand
        )

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
            refused = await self._payment_check.refusal(msg)
            if refused is not None:
                await self._shielded(self._recorder.record(msg, *refused))
                return
        try:
            result = await self._sender.send(msg)
        except asyncio.CancelledError:
            # Stopped mid-request: hand the message back untried (it may still have reached
            # the destination; the idempotency key covers the resend).
            await self._shielded(self._recorder.release(msg))
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
        self._background(self._recorder.record(msg, result, outcome))

    def _background(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)

    async def _shielded(self, coro: Coroutine[Any, Any, None]) -> None:
        task = asyncio.create_task(coro)
        self._writes.add(task)
        task.add_done_callback(self._writes.discard)
        await asyncio.shield(task)

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
