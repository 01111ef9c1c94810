"""The payment check of routes with `verify_order`: ask Polar's API about a message's order
before it is sent.

Owns: fetching the order, judging it (relay/order_check.py compares it with the message) and
the `payment_checks` metrics and the `payment_check_mismatch` log line. Returns nothing when
the order is paid and is the one the message describes, else what the worker records instead
of a delivery. It never writes to the store and never sends: the worker does.
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Mapping

from relay import order_check, retry
from relay.config import DestinationConfig
from relay.delivery import AttemptResult
from relay.logs import get_logger
from relay.mapping import Route
from relay.metrics import Metrics
from relay.models import ClaimedMessage, Clock, Dead, ErrorKind, Outcome
from relay.order_check import is_polar_id, shown_id
from relay.polar_api import PolarApi, PolarApiError, WrongOrder, is_paid

log = get_logger("relay.payment_check")

# What to record instead of a delivery.
Refusal = tuple[AttemptResult, Outcome]


class PaymentCheck:
    """Checks the Polar order of one destination's messages."""

    def __init__(
        self,
        destination: DestinationConfig,
        clock: Clock,
        metrics: Metrics,
        *,
        polar: Callable[[], PolarApi | None] | None = None,
        routes: Mapping[str, Route] | None = None,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self._destination = destination
        self._clock = clock
        self._metrics = metrics
        self._polar = polar
        self._routes = routes or {}  # by name: what a check compares a message with
        self._rand = rand

    async def refusal(self, msg: ClaimedMessage) -> Refusal | None:
        """Confirm with Polar that the order is paid and is the one the message describes,
        before sending. None when it is; else what to record instead of a delivery: a retry
        when Polar could not answer; dead when the id is not a Polar id, Polar returns another
        order, the order is unknown or unpaid, or a field the message sends differs from
        Polar's order (relay/order_check.py says why the stored body is kept and compared, not
        rebuilt from Polar's order)."""
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
                self._destination.retry,
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

    def _unverified(self, outcome: str, why: str, started: float) -> Refusal:
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
            destination=self._destination.name,
            message_id=msg.id,
            route=route,
            order_id=order_id,
            fields=fields,
        )
