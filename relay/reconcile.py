"""Reconciliation: revenue Polar knows about and the relay does not, enqueued exactly once.

Polar gives up on a webhook after about 30 minutes, disables an endpoint after 10 failed
events and then creates no events for it at all; webhooks are also missed while the relay is
down or misconfigured, and a lost dispute (a chargeback) never sends one. This pages through
Polar's orders, refunds and lost disputes (newest first, stopping at the cut-off), turns each
into the event a webhook would have carried, and runs it through the same routes:
- a paid order is `order.paid`;
- a refund that succeeded, or that succeeded once and then failed or was canceled, is
  `refund.updated` with its current status (the routes decide: a refund route takes
  `succeeded`, a reversal route takes `failed`/`canceled` only where the refund was recorded);
- a lost dispute is `dispute.lost`, an event type of the relay's own (Polar has no such
  webhook) whose `data` is Polar's Dispute object. Listing disputes needs the token's
  `disputes:read` scope; without it the run goes on and says what it skipped.

A message whose idempotency key the outbox already holds was recorded (by a
webhook or an earlier reconciliation) and is skipped; the rest are enqueued through the store
with those same keys, so reconciling twice, or a webhook arriving later, never double-counts.

Every object a run reads (orders of any status, refunds, lost disputes) is kept in the store's
Polar snapshot, page by page, and the window it covers when the run completes: the revenue
ledger (relay/ledger.py) reads Polar's side from there and never walks Polar's API a second
time. Only the fields the ledger needs are kept: those the source's routes read, and the
ledger's own (`LEDGER_FIELDS`); never the customer object unless a route reads it, and then
with `log.redact` applied as in stored webhook bodies.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from relay.config import Config
from relay.ingest import resolve_lookups
from relay.mapping import MapResult, Path, encode, format_path, map_event, parse_path, redact
from relay.models import (
    Clock,
    EventStatus,
    InboundDraft,
    PolarKind,
    PolarRecord,
    SnapshotCoverage,
)
from relay.polar_api import PolarApi, PolarApiError, is_paid
from relay.store import Store


@dataclass(slots=True)
class Summary:
    seen: int = 0  # paid orders and succeeded refunds in the window
    already_recorded: int = 0
    enqueued: int = 0
    unmappable: int = 0
    ignored: int = 0  # no route takes them
    pages: int = 0
    details: list[str] = field(default_factory=list)
    skipped: list[str] = field(default_factory=list)  # listings Polar would not give us

    def line(self) -> str:
        text = (
            f"seen {self.seen}, already recorded {self.already_recorded}, "
            f"enqueued {self.enqueued}, unmappable {self.unmappable}, "
            f"ignored {self.ignored} ({self.pages} pages)"
        )
        if self.skipped:
            text += "; skipped: " + "; ".join(self.skipped)
        return text


# Refund statuses worth a look: succeeded ones are revenue going out; failed and canceled ones
# may be a succeeded refund undone (Polar then lowers the order's refunded amount). Pending
# refunds are neither yet.
REFUND_STATUSES = frozenset({"succeeded", "failed", "canceled"})
DISPUTE_EVENT = "dispute.lost"
DISPUTES_SCOPE = "disputes:read"
# The fields of a Polar object the ledger reads itself, whatever the routes read.
LEDGER_FIELDS = (
    "data.id",
    "data.status",
    "data.paid",
    "data.created_at",
    "data.currency",
    "data.net_amount",
    "data.amount",
    "data.order_id",
)
_EVENT_TYPES = {
    PolarKind.ORDER: "order.paid",
    PolarKind.REFUND: "refund.updated",
    PolarKind.DISPUTE: DISPUTE_EVENT,
}


def polar_event_type(kind: PolarKind, data: dict[str, Any]) -> str | None:
    """The event a Polar object of this kind is read as (see the module docstring), or None
    when it is not revenue (yet). Reconciliation and the ledger (relay/ledger_source.py) both
    read Polar's objects through this and `map_polar`, so the two can never disagree."""
    status = data.get("status")
    if kind is PolarKind.ORDER:
        wanted = is_paid(data)
    elif kind is PolarKind.REFUND:
        wanted = status in REFUND_STATUSES
    else:
        wanted = status == "lost"
    return _EVENT_TYPES[kind] if wanted else None


def polar_event(event_type: str, data: dict[str, Any], at: float) -> dict[str, Any]:
    """The webhook Polar would have sent for `data`, stamped `at` (epoch seconds)."""
    return {
        "type": event_type,
        "timestamp": datetime.fromtimestamp(at, tz=UTC).isoformat(),
        "data": data,
    }


async def map_polar(store: Store, config: Config, event: dict[str, Any]) -> MapResult:
    """`event` through the routes of the reconcile source, their lookups read from the store."""
    routes, source = config.routes, config.reconcile.source
    found = await resolve_lookups(store, routes, source, event)
    return map_event(routes, source, event, found)


def _created_at(item: dict[str, Any]) -> float | None:
    value = item.get("created_at")
    if not isinstance(value, str):
        return None
    try:
        when = datetime.fromisoformat(value)
    except ValueError:
        return None
    return (when if when.tzinfo else when.replace(tzinfo=UTC)).timestamp()


def _webhook_id(event_type: str, data: dict[str, Any], mapped: EventStatus) -> str:
    """Unique per event, stable across runs; never a real webhook-id. A refund that succeeded
    and was later undone is two events (two states), so a status other than `succeeded` is part
    of its id: else the reversal would be taken for the refund already recorded. An unmappable
    event has an id of its own too: else, once the object maps, its enqueue would be a
    duplicate of that earlier event and the payment never sent."""
    ident = f"reconcile:{event_type}:{data.get('id')}"
    status = data.get("status")
    if event_type == "refund.updated" and status != "succeeded":
        ident += f":{status}"
    if mapped is EventStatus.UNMAPPABLE:
        ident += ":unmappable"
    return ident


def snapshot_paths(config: Config) -> tuple[Path, ...]:
    """The fields of Polar's objects the snapshot keeps: what the routes of the reconcile
    source read, and LEDGER_FIELDS, sorted (a route change shows as a different set)."""
    source = config.reconcile.source
    paths = {parse_path(text, "LEDGER_FIELDS") for text in LEDGER_FIELDS}
    for route in config.routes:
        if route.source == source:
            paths.update(p for p in route.reads() if p[:1] == ("data",) and len(p) > 1)
    return tuple(sorted(paths, key=format_path))


def project(data: dict[str, Any], paths: tuple[Path, ...]) -> dict[str, Any]:
    """`data` with only the values at `paths` (each path under "data."); a path into a list
    keeps that whole list."""
    out: dict[str, Any] = {}
    for path in paths:
        _copy(data, out, path[1:])
    return out


def _copy(source: Any, target: dict[str, Any], parts: Path) -> None:
    part = parts[0]
    if not isinstance(source, dict) or not isinstance(part, str) or part not in source:
        return
    value = source[part]
    rest = parts[1:]
    if not rest or not isinstance(value, dict) or isinstance(rest[0], int):
        target[part] = value  # a leaf, a list, or everything under it
        return
    child = target.get(part)
    if child is None:
        child = target[part] = {}
    if isinstance(child, dict) and child is not value:
        _copy(value, child, rest)


class Reconciler:
    def __init__(
        self,
        store: Store,
        config: Config,
        api: PolarApi,
        clock: Clock,
        *,
        dry_run: bool = False,
        progress: Callable[[str], None] | None = None,
    ) -> None:
        self._store = store
        self._config = config
        self._api = api
        self._clock = clock
        self._dry_run = dry_run
        self._progress = progress
        self._source = config.reconcile.source
        self._first_at: float | None = None
        self._started_at = 0.0
        self._paths = snapshot_paths(config)

    async def run(self, since: float | None, until: float | None) -> Summary:
        """Orders first, then refunds, then disputes: a refund or dispute reads the purchase
        (and a reversal the refund) that the walk before it may have just enqueued. A run
        that completes (a dry run too) stores what it read as the Polar snapshot."""
        summary = Summary()
        self._first_at = None
        self._started_at = self._clock.now()
        kinds = [PolarKind.ORDER, PolarKind.REFUND, PolarKind.DISPUTE]
        await self._walk("/v1/orders/", {}, PolarKind.ORDER, since, until, summary)
        await self._walk("/v1/refunds/", {}, PolarKind.REFUND, since, until, summary)
        try:
            await self._walk(
                "/v1/disputes/",
                {"status": "lost"},
                PolarKind.DISPUTE,
                since,
                until,
                summary,
                scope=DISPUTES_SCOPE,
            )
        except PolarApiError as exc:
            if exc.status not in (401, 403):
                raise
            # An older token without disputes:read: orders and refunds still reconcile.
            summary.skipped.append(
                f"lost disputes (the token lacks the {DISPUTES_SCOPE} scope: {exc.status})"
            )
            kinds.remove(PolarKind.DISPUTE)
        # A dry run too: the snapshot is Polar's data, not the outbox, and is what the ledger
        # compares the outbox with (a dry run is how to see what is missing, in the ledger).
        first = self._started_at if self._first_at is None else self._first_at
        coverage = SnapshotCoverage(
            since=first if since is None else since,
            until=until,
            fetched_at=self._started_at,
            kinds=tuple(kinds),
            fields=tuple(format_path(p) for p in self._paths),
        )
        await self._store.finish_polar_snapshot(coverage)
        return summary

    def _keep(
        self, kind: PolarKind, item: dict[str, Any], created: float | None
    ) -> PolarRecord | None:
        """One object of a page as the snapshot keeps it: the fields the ledger needs,
        customer PII redacted as in stored webhook bodies (None: no id or no time)."""
        ident = item.get("id")
        if not isinstance(ident, str) or created is None:
            return None
        self._first_at = created if self._first_at is None else min(self._first_at, created)
        data = redact({"data": project(item, self._paths)}, self._config.log.redact)["data"]
        return PolarRecord(
            kind=kind,
            polar_id=ident,
            created_at=created,
            status=str(item.get("status")),
            data=encode(data),
            fetched_at=self._started_at,
        )

    async def _walk(
        self,
        path: str,
        params: dict[str, Any],
        kind: PolarKind,
        since: float | None,
        until: float | None,
        summary: Summary,
        *,
        scope: str = "orders:read, refunds:read",
    ) -> None:
        async for page in self._api.pages(path, params, scope=scope):
            summary.pages += 1
            past_cutoff = False
            kept: list[PolarRecord] = []
            for item in page.items:
                created = _created_at(item)
                if until is not None and created is not None and created >= until:
                    continue
                if since is not None and created is not None and created < since:
                    # Newest first: everything after this is older still.
                    past_cutoff = True
                    break
                if (record := self._keep(kind, item, created)) is not None:
                    kept.append(record)
                event_type = polar_event_type(kind, item)
                if event_type is not None:
                    summary.seen += 1
                    await self._one(event_type, item, summary)
            # Page by page: a 30-day window of a large shop never sits in memory whole.
            await self._store.save_polar_records(kept)
            if self._progress is not None:
                self._progress(f"{path} page {page.page}/{page.max_page}: {summary.line()}")
            if past_cutoff:
                return

    async def _one(self, event_type: str, data: dict[str, Any], summary: Summary) -> None:
        event = polar_event(event_type, data, self._clock.now())
        mapped = await map_polar(self._store, self._config, event)
        ident = f"{event_type} {data.get('id')}"
        if mapped.status is EventStatus.IGNORED:
            summary.ignored += 1
            return
        if mapped.status is EventStatus.UNMAPPABLE:
            summary.unmappable += 1
            summary.details.append(f"{ident}: unmappable: {mapped.reason}")
        else:
            known = await self._store.find_bodies(
                [(m.destination, m.idempotency_key) for m in mapped.messages]
            )
            if all((m.destination, m.idempotency_key) in known for m in mapped.messages):
                summary.already_recorded += 1
                return
        if self._dry_run:
            if mapped.status is EventStatus.ROUTED:
                summary.enqueued += 1
                summary.details.append(
                    f"{ident}: would enqueue "
                    + ", ".join(m.idempotency_key for m in mapped.messages)
                )
            return
        draft = InboundDraft(
            source=self._source,
            webhook_id=_webhook_id(event_type, data, mapped.status),
            event_type=event_type,
            received_at=self._clock.now(),
            headers={"x-relay-origin": "reconcile"},
            body=encode(event),
            status=mapped.status,
            reason=mapped.reason,
            messages=mapped.messages,
        )
        result = await self._store.enqueue(draft)
        if mapped.status is not EventStatus.ROUTED:
            return
        if result.message_ids:
            summary.enqueued += 1
            summary.details.append(
                f"{ident}: enqueued " + ", ".join(m.idempotency_key for m in mapped.messages)
            )
        else:
            summary.already_recorded += 1  # a webhook won the race meanwhile
