"""Recording a delivery attempt's outcome: the one store call, its metrics and its log line.

Owns: the mapping of an outcome to exactly one store call (delivered, retry, dead, or release
when a stop interrupts an attempt), the delivery metrics, the `delivery_*` log events and the
revenue counters of delivered calls. It decides nothing (relay/retry.py does) and never
raises for a store error: the lease still holds the message, which returns to pending when
the lease expires and is sent again with the same idempotency key.
"""

from __future__ import annotations

import contextlib
from typing import Any

from relay import revenue
from relay.delivery import AttemptResult
from relay.errors import StorageError
from relay.logs import get_logger
from relay.metrics import Metrics, status_class
from relay.models import (
    AttemptRecord,
    ClaimedMessage,
    Clock,
    Dead,
    Delivered,
    Outcome,
    RetryLater,
)
from relay.store import Store

log = get_logger("relay.recorder")
# The store turns every driver error into a StorageError (relay/store/outbox.py).
_STORE_ERRORS = (StorageError,)


class Recorder:
    """Records the outcomes of one destination's attempts."""

    def __init__(self, store: Store, destination: str, clock: Clock, metrics: Metrics) -> None:
        self._store = store
        self._name = destination
        self._clock = clock
        self._metrics = metrics
        # Label children bound once: .labels() takes a lock and a lookup, per delivery.
        self._duration = metrics.delivery_duration.labels(destination)
        self._outcomes = {
            o: metrics.deliveries.labels(destination, o) for o in ("delivered", "retry", "dead")
        }
        self._attempts: dict[str, Any] = {}  # status class -> its bound child, as met

    async def release(self, msg: ClaimedMessage) -> None:
        """Hand a message back untried (a stop interrupted its attempt)."""
        with contextlib.suppress(*_STORE_ERRORS):
            await self._store.release(msg)
        log.info("delivery_released", destination=msg.destination, message_id=msg.id)

    async def record(self, msg: ClaimedMessage, result: AttemptResult, outcome: Outcome) -> None:
        name = self._name
        m = self._metrics
        self._duration.observe(result.duration_s)
        status = status_class(result.status, result.kind)
        attempts = self._attempts.get(status)
        if attempts is None:  # a handful of classes: 2xx, 4xx, 5xx, timeout, ...
            attempts = self._attempts[status] = m.delivery_attempts.labels(name, status)
        attempts.inc()
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
        name = self._name
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
