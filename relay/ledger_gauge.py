"""The ledger's gauges (`relay_ledger_difference_minor_units`, `relay_ledger_differences`),
refreshed from the stored Polar snapshot and the outbox: after each reconcile run, and at scrape
time at most every `SCRAPE_REFRESH_S`, in the background (a scrape never waits for it and
answers with the last values). Never asks Polar's API.
"""

from __future__ import annotations

import asyncio
import contextlib
import time

from relay.config import Config
from relay.ledger_source import read_ledger
from relay.logs import get_logger
from relay.metrics import Metrics
from relay.models import Clock
from relay.store import Store

log = get_logger("relay.ledger")

# Mapping a 30-day snapshot costs about a millisecond per hundred objects: at most this often.
SCRAPE_REFRESH_S = 300.0


class LedgerGauge:
    def __init__(self, config: Config, metrics: Metrics, clock: Clock) -> None:
        self._config = config
        self._metrics = metrics
        self._clock = clock
        self._refreshed_at: float | None = None  # time.monotonic()
        self._task: asyncio.Task[None] | None = None

    async def refresh(self, store: Store) -> None:
        """Recompute now (after a reconcile run). Failures are logged, never raised: the
        gauges keep their last values."""
        self._refreshed_at = time.monotonic()
        try:
            ledger = await read_ledger(store, self._config, now=self._clock.now())
        except Exception as exc:  # a gauge must never take the relay down
            log.warning("ledger_refresh_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if not ledger.polar_available or ledger.stale:
            # No (complete) Polar side: the gauges are absent, not a misleading value.
            self._metrics.ledger_difference.clear()
            self._metrics.ledger_differences.clear()
            return
        values = dict.fromkeys({row.currency for row in ledger.rows}, (0, 0))
        values.update(ledger.settled_by_currency())
        self._metrics.ledger_difference.clear()
        self._metrics.ledger_differences.clear()
        for currency, (total, count) in values.items():
            self._metrics.ledger_difference.labels(currency).set(total)
            self._metrics.ledger_differences.labels(currency).set(count)

    def refresh_soon(self, store: Store) -> None:
        """At scrape time: start a refresh in the background when the last one is older than
        SCRAPE_REFRESH_S and none is running."""
        stale = self._refreshed_at is None or (
            time.monotonic() - self._refreshed_at >= SCRAPE_REFRESH_S
        )
        if stale and (self._task is None or self._task.done()):
            self._task = asyncio.create_task(self.refresh(store), name="ledger-gauge")

    async def close(self) -> None:
        if self._task is not None and not self._task.done():
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
