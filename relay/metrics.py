"""Every Prometheus metric of the relay, on a per-app registry, and the /metrics handler.

Owns metric names, types, labels and buckets. Label values are bounded: source, destination
and route names come from relay.toml, event types are vetted by `event_type_label`, statuses
and outcomes are fixed sets. No ids, no free text, no secrets.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    ProcessCollector,
    generate_latest,
)
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.exposition import CONTENT_TYPE_LATEST
from prometheus_client.registry import Collector

from relay import logs
from relay.models import ErrorKind

_EVENT_TYPE = re.compile(r"^[a-z][a-z0-9_]{0,40}(\.[a-z][a-z0-9_]{0,40}){0,2}$")
CONTENT_TYPE = CONTENT_TYPE_LATEST

_FAST = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)
_HTTP = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0)


def event_type_label(event_type: str | None) -> str:
    """A signed event's type as a label: kept when it looks like `a.b`, else `other`."""
    if event_type is None:
        return "unknown"
    return event_type if _EVENT_TYPE.match(event_type) else "other"


class Metrics:
    """All metrics of one relay app."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        ProcessCollector(registry=r)
        self.webhooks_received = Counter(
            "relay_webhooks_received_total",
            "Webhooks received, by outcome: accepted, duplicate, ignored, unmappable, "
            "bad_signature, stale_timestamp, too_large, malformed, storage_error, forbidden, "
            "https_required, timeout.",
            ["source", "event_type", "outcome"],
            registry=r,
        )
        self.ingest_duration = Histogram(
            "relay_ingest_duration_seconds",
            "Time from request body read to the answer, for webhooks that reached the store.",
            ["source"],
            buckets=_FAST,
            registry=r,
        )
        self.messages_enqueued = Counter(
            "relay_messages_enqueued_total",
            "Outbound messages committed to the outbox.",
            ["route", "destination"],
            registry=r,
        )
        self.commit_duration = Histogram(
            "relay_store_commit_duration_seconds",
            "Duration of one group commit (all statements and the fsync).",
            buckets=_FAST,
            registry=r,
        )
        self.commit_batch_size = Histogram(
            "relay_store_commit_batch_size",
            "Webhooks per group commit.",
            buckets=(1, 2, 4, 8, 16, 32, 64, 128, 256, 512),
            registry=r,
        )
        self.commit_failures = Counter(
            "relay_store_commit_failures_total",
            "Group commits that failed (their webhooks were answered 503).",
            registry=r,
        )
        self.db_size = Gauge(
            "relay_store_db_size_bytes", "Database file plus WAL size.", registry=r
        )
        self.notify_fallback = Gauge(
            "relay_store_notify_fallback_polling",
            "1 while the PostgreSQL LISTEN connection is lost: commits of other replicas and "
            "operator commands wake no worker, which poll instead (being re-established).",
            registry=r,
        )
        self.store_free = Gauge(
            "relay_store_free_bytes",
            "Free space on the SQLite database's filesystem (read at most once a second).",
            registry=r,
        )
        self.store_min_free = Gauge(
            "relay_store_min_free_bytes",
            "storage.min_free_bytes: under it /readyz answers 503 (0 when not checked).",
            registry=r,
        )
        self.deliveries = Counter(
            "relay_deliveries_total",
            "Delivery attempts, by outcome: delivered, retry, dead.",
            ["destination", "outcome"],
            registry=r,
        )
        self.delivery_attempts = Counter(
            "relay_delivery_attempts_total",
            "Delivery attempts by the class of the answer (2xx, 3xx, 4xx, 5xx), or without "
            "one by the kind of error: " + ", ".join(ErrorKind) + ".",
            ["destination", "status_class"],
            registry=r,
        )
        self.delivery_processes_started = Counter(
            "relay_delivery_processes_started_total",
            "Delivery child processes started ([server] delivery_processes). More than the "
            "configured count means children died and were replaced.",
            registry=r,
        )
        self.delivery_duration = Histogram(
            "relay_delivery_duration_seconds",
            "Duration of one delivery attempt (request and the start of the answer).",
            ["destination"],
            buckets=_HTTP,
            registry=r,
        )
        self.retry_after_wait = Counter(
            "relay_delivery_retry_after_seconds_total",
            "Seconds of delay asked for by Retry-After headers.",
            ["destination"],
            registry=r,
        )
        self.revenue_delivered = Counter(
            "relay_revenue_delivered_minor_units_total",
            "Revenue amounts delivered, in minor units, by currency and event (purchase, refund).",
            ["destination", "event", "currency"],
            registry=r,
        )
        self.unattributed = Counter(
            "relay_unattributed_revenue_total",
            "Purchases delivered with neither faSessionId nor faAttributionToken.",
            ["destination"],
            registry=r,
        )
        self.unattributed_amount = Counter(
            "relay_unattributed_revenue_minor_units_total",
            "Amounts of unattributed purchases, in minor units, by currency.",
            ["destination", "currency"],
            registry=r,
        )
        self.outbox_messages = Gauge(
            "relay_outbox_messages",
            "Messages in the outbox by status (read at scrape time).",
            ["destination", "status"],
            registry=r,
        )
        self.oldest_pending_age = Gauge(
            "relay_outbox_oldest_pending_age_seconds",
            "Age of the oldest message not yet delivered or dead (0 when none).",
            ["destination"],
            registry=r,
        )
        self.retention_pruned = Counter(
            "relay_retention_pruned_total",
            "Rows or bodies removed by retention, by kind.",
            ["kind"],
            registry=r,
        )
        self.destination_paused = Gauge(
            "relay_destination_paused",
            "1 while deliveries to the destination are paused.",
            ["destination"],
            registry=r,
        )
        self.reconcile_runs = Counter(
            "relay_reconcile_runs_total",
            "Periodic reconciliation runs, by outcome: ok, failed.",
            ["outcome"],
            registry=r,
        )
        self.reconcile_enqueued = Counter(
            "relay_reconcile_enqueued_total",
            "Orders and refunds found in Polar with no record in the relay, and enqueued.",
            registry=r,
        )
        self.ledger_difference = Gauge(
            "relay_ledger_difference_minor_units",
            "The revenue ledger's difference, Polar minus Faurya, in minor units, by currency: "
            "the signed sum of the differences older than one reconcile interval (relay ledger "
            "lists them). Absent without a stored Polar snapshot.",
            ["currency"],
            registry=r,
        )
        self.ledger_differences = Gauge(
            "relay_ledger_differences",
            "How many revenue ledger differences older than one reconcile interval there are, "
            "by currency (a missing order and a forged one do not cancel out here).",
            ["currency"],
            registry=r,
        )
        self.checkouts = Counter(
            "relay_checkouts_total",
            "Checkout endpoint requests, by outcome: created, invalid, forbidden, "
            "rate_limited, busy (the checkout's Polar budget is full: 503), failed.",
            ["outcome"],
            registry=r,
        )
        self.payment_checks = Counter(
            "relay_payment_checks_total",
            "Orders confirmed with Polar before delivery, by outcome: paid, not_paid, "
            "mismatch (Polar's order differs from the message), bad_id, no_route (the route is "
            "gone from the config), error.",
            ["outcome"],
            registry=r,
        )
        self.payment_check_mismatches = Counter(
            "relay_payment_check_mismatches_total",
            "Payment checks that dead-lettered a message because a field differed from Polar's "
            "order, by route and body field.",
            ["route", "field"],
            registry=r,
        )
        self.ready = Gauge(
            "relay_ready", "1 when the store takes writes and the workers run.", registry=r
        )
        r.register(_LogLinesDropped())

    def render(self) -> bytes:
        return generate_latest(self.registry)

    def watch_children(self, pids: Callable[[], Iterable[tuple[int, int]]]) -> None:
        """Export CPU and memory of the delivery child processes, read from /proc at scrape
        time (`process_*` covers only this process). `pids` gives (slot, pid) pairs."""
        self.registry.register(_ChildProcesses(pids))


class _LogLinesDropped(Collector):
    """The log's own count (relay/logs.py): kept there, since a log line is written wherever
    the process is, not by one app."""

    def collect(self) -> Iterator[Metric]:
        yield CounterMetricFamily(
            "relay_log_lines_dropped",
            "Log lines that could not be written (stderr on a full disk, a closed pipe) and "
            "were dropped; the relay went on.",
            value=logs.dropped_lines(),
        )


class _ChildProcesses(Collector):
    def __init__(self, pids: Callable[[], Iterable[tuple[int, int]]]) -> None:
        self._pids = pids
        self._ticks_per_s = os.sysconf("SC_CLK_TCK")
        self._page_bytes = os.sysconf("SC_PAGE_SIZE")

    def collect(self) -> Iterator[Metric]:
        cpu = CounterMetricFamily(
            "relay_delivery_process_cpu_seconds",
            "User and system CPU time of each delivery child process.",
            labels=["slot"],
        )
        memory = GaugeMetricFamily(
            "relay_delivery_process_resident_memory_bytes",
            "Resident memory of each delivery child process.",
            labels=["slot"],
        )
        for slot, pid in self._pids():
            try:
                stat = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
                pages = int(Path(f"/proc/{pid}/statm").read_text().split()[1])
            except (OSError, IndexError, ValueError):
                continue  # exited meanwhile, or no /proc (not Linux)
            cpu.add_metric([str(slot)], (int(stat[11]) + int(stat[12])) / self._ticks_per_s)
            memory.add_metric([str(slot)], pages * self._page_bytes)
        yield cpu
        yield memory


def status_class(status: int | None, kind: ErrorKind | None) -> str:
    """The attempt's label: the class of its HTTP answer, or the kind of error without one."""
    if status is None:
        return (kind or ErrorKind.CONNECTION).value
    return f"{status // 100}xx" if 100 <= status < 600 else "other"
