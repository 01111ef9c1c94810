"""What the operator console can see and do: one typed service that the JSON API
(relay/console/api.py) and the HTML pages (relay/console/pages.py) both call.

Owns: the console's view types (frozen dataclasses, no I/O), the filters and cursors of the
message list, and the actions (retry, replay, discard, pause, resume, bulk replay) with their
audit record. Reads and writes go through the store's interface only; secrets never reach a
view (headers are masked, bodies shown as stored: already redacted at ingest).
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import json
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from relay.errors import RelayError
from relay.logs import get_logger
from relay.models import Clock, MessageStatus

if TYPE_CHECKING:
    from relay.config import Config
    from relay.console.jobs import Jobs
    from relay.console.rejected import RejectedLog
    from relay.ledger import Ledger
    from relay.store import Store

log = get_logger("relay.console")

DEFAULT_LIMIT = 50
MAX_LIMIT = 500
# A pending purchase older than this counts as "at risk" on the overview.
LONG_PENDING_S = 3600.0
DELIVERED_COUNT_TTL_S = 30.0
MAX_ID = 2**63  # ids and amounts are 64-bit integers in both stores
# Headers never shown, whatever their value: the signature proves nothing to a reader and
# the write key is the destination's secret.
HIDDEN_HEADERS = frozenset({"webhook-signature", "authorization", "cookie", "x-api-key"})
MASK = "***"


class ConsoleError(RelayError):
    """A console request that cannot be served as asked (a bad filter, an unknown id, an
    action that does not apply). The API answers it as `{"error": ...}` with `http_status`."""

    def __init__(self, message: str, http_status: int = 400) -> None:
        super().__init__(message)
        self.http_status = http_status


class NotFound(ConsoleError):
    def __init__(self, message: str) -> None:
        super().__init__(message, 404)


def open_store(store: Callable[[], Store | None]) -> Store:
    """The relay's store, or a 503 while it is not open yet (start-up, shutdown)."""
    found = store()
    if found is None:
        raise ConsoleError("the store is not open yet; retry in a moment", 503)
    return found


class Role(StrEnum):
    """What a caller may do: `act` (admin.token, or local without a token) or `read`."""

    READ = "read"
    ACT = "act"


@dataclass(frozen=True, slots=True)
class Caller:
    """Who is calling: `actor` is what the audit records (`admin`, `read`, or `local`)."""

    actor: str
    role: Role

    @property
    def can_act(self) -> bool:
        return self.role is Role.ACT


class StatusClass(StrEnum):
    """The last HTTP answer of a message, as a filter: 2xx..5xx, `error` (no HTTP answer:
    timeout, connection), `none` (never attempted)."""

    S2XX = "2xx"
    S3XX = "3xx"
    S4XX = "4xx"
    S5XX = "5xx"
    ERROR = "error"
    NONE = "none"


class Sort(StrEnum):
    NEWEST = "newest"  # by id, newest first (the default)
    AMOUNT = "amount"  # by amount_minor, largest first (the dead-letter triage)


@dataclass(frozen=True, slots=True)
class ListFilters:
    """The message list's filters, as kept in the URL query (see `from_query`)."""

    statuses: tuple[MessageStatus, ...] = ()
    destination: str | None = None
    route: str | None = None
    event_type: str | None = None
    status_class: StatusClass | None = None
    since: float | None = None  # created_at >= since
    until: float | None = None  # created_at < until
    q: str | None = None  # an order id, refund id, payment ref, webhook id or idempotency key
    sort: Sort = Sort.NEWEST

    @classmethod
    def from_query(cls, query: Mapping[str, str] | Any, now: float) -> ListFilters:
        """Read filters from a URL query (a MultiDict: `status` may repeat, or be
        comma-separated). Raises ConsoleError naming the bad parameter."""
        from relay.outbox_commands import BadTime, parse_time

        getall = getattr(query, "getall", None)
        raw_statuses: list[str] = list(getall("status", [])) if getall else []
        if not getall and query.get("status"):
            raw_statuses = [query["status"]]
        statuses: list[MessageStatus] = []
        for chunk in raw_statuses:
            for name in chunk.split(","):
                name = name.strip()
                if not name:
                    continue
                try:
                    statuses.append(MessageStatus(name))
                except ValueError:
                    allowed = ", ".join(s.value for s in MessageStatus)
                    raise ConsoleError(f"unknown status {name!r}: use {allowed}") from None
        status_class = None
        if text := (query.get("status_class") or "").strip():
            try:
                status_class = StatusClass(text)
            except ValueError:
                allowed = ", ".join(s.value for s in StatusClass)
                raise ConsoleError(f"unknown status_class {text!r}: use {allowed}") from None
        sort = Sort.NEWEST
        if text := (query.get("sort") or "").strip():
            try:
                sort = Sort(text)
            except ValueError:
                raise ConsoleError(f"unknown sort {text!r}: use newest or amount") from None
        try:
            since = parse_time(query.get("since") or None, now)
            until = parse_time(query.get("until") or None, now)
        except BadTime as exc:
            raise ConsoleError(str(exc)) from None

        def text_of(name: str) -> str | None:
            value = (query.get(name) or "").strip()
            return value or None

        return cls(
            statuses=tuple(dict.fromkeys(statuses)),
            destination=text_of("destination"),
            route=text_of("route"),
            event_type=text_of("event_type"),
            status_class=status_class,
            since=since,
            until=until,
            q=text_of("q"),
            sort=sort,
        )

    def to_query(self) -> dict[str, str]:
        """The filters as URL query parameters (times as epoch seconds)."""
        out: dict[str, str] = {}
        if self.statuses:
            out["status"] = ",".join(s.value for s in self.statuses)
        for name in ("destination", "route", "event_type", "q"):
            value = getattr(self, name)
            if value:
                out[name] = value
        if self.status_class is not None:
            out["status_class"] = self.status_class.value
        if self.since is not None:
            out["since"] = _iso(self.since)
        if self.until is not None:
            out["until"] = _iso(self.until)
        if self.sort is not Sort.NEWEST:
            out["sort"] = self.sort.value
        return out


@dataclass(frozen=True, slots=True)
class Cursor:
    """Where the next page starts (keyset): after the message `after_id` (and, sorted by
    amount, after `after_amount`). Opaque in URLs: base64 of a small JSON."""

    after_id: int
    after_amount: int | None = None

    def encode(self) -> str:
        data = {"id": self.after_id}
        if self.after_amount is not None:
            data["a"] = self.after_amount
        raw = json.dumps(data, separators=(",", ":")).encode()
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    @classmethod
    def decode(cls, text: str | None) -> Cursor | None:
        if not text:
            return None
        try:
            raw = base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
            data = json.loads(raw)
            after_id = data["id"]
            amount = data.get("a")
            if not isinstance(after_id, int) or not (amount is None or isinstance(amount, int)):
                raise ValueError
            # Both backends store 64-bit integers: anything beyond is no position of ours.
            if not 0 <= after_id < MAX_ID or (amount is not None and abs(amount) >= MAX_ID):
                raise ValueError
        except (ValueError, KeyError, TypeError, binascii.Error):
            raise ConsoleError("bad cursor: use the `next` value of a previous page") from None
        return cls(after_id, amount)


@dataclass(frozen=True, slots=True)
class MessageItem:
    """One row of the message list (and the head of a message's detail)."""

    id: int
    status: MessageStatus
    destination: str
    route: str
    event_type: str
    webhook_id: str
    idempotency_key: str
    order_id: str | None
    payment_ref: str | None
    refund_id: str | None
    event_kind: str | None  # the body's "event": purchase, refund, ...
    amount_minor: int | None
    currency: str | None
    attempts: int
    last_status: int | None
    last_error: str | None
    created_at: float
    next_attempt_at: float | None  # None once delivered, dead or discarded
    delivered_at: float | None
    discarded_at: float | None = None
    discard_reason: str | None = None

    @property
    def retrying(self) -> bool:
        """Pending after at least one failed attempt."""
        return self.status is MessageStatus.PENDING and self.attempts > 0

    def to_json(self) -> dict[str, Any]:
        out: dict[str, Any] = plain(self)
        return out


@dataclass(frozen=True, slots=True)
class MessagePage:
    items: tuple[MessageItem, ...]
    next: Cursor | None


@dataclass(frozen=True, slots=True)
class Attempt:
    """One delivery attempt as recorded with its outcome."""

    number: int
    at: float
    status: int | None  # the HTTP status, when there was an answer
    error_kind: str | None  # relay.models.ErrorKind value, when there was none
    duration_s: float
    response_snippet: str  # truncated, secret-free
    outcome: str  # delivered, retry, dead


@dataclass(frozen=True, slots=True)
class Inbound:
    """The webhook a message came from: headers without the signature, the body as stored
    (redacted at ingest; None once retention cleared it)."""

    id: int
    source: str
    webhook_id: str
    event_type: str
    received_at: float
    status: str
    reason: str | None
    headers: tuple[tuple[str, str], ...]
    body: str | None
    request_id: str | None = None


@dataclass(frozen=True, slots=True)
class RouteInfo:
    """The route that built a message, and why it took the event."""

    name: str
    exists: bool  # False: the config no longer has it
    events: tuple[str, ...] = ()
    condition: str | None = None  # the route's `when`, described
    why: str = ""


@dataclass(frozen=True, slots=True)
class SentRequest:
    """The request exactly as sent (or as it will be), the write key masked."""

    method: str
    url: str
    headers: tuple[tuple[str, str], ...]
    body: str


@dataclass(frozen=True, slots=True)
class MessageDetail:
    message: MessageItem
    inbound: Inbound | None
    route: RouteInfo
    request: SentRequest | None  # None when the destination is no longer configured
    attempts: tuple[Attempt, ...]
    related: tuple[MessageItem, ...]  # a refund and its purchase, other routes of the event

    def to_json(self) -> dict[str, Any]:
        out = self.message.to_json()
        out["inbound"] = None if self.inbound is None else plain(self.inbound)
        out["route_info"] = plain(self.route)
        out["request"] = None if self.request is None else plain(self.request)
        out["attempts"] = [plain(a) for a in self.attempts]
        out["related"] = [r.to_json() for r in self.related]
        return out


@dataclass(frozen=True, slots=True)
class DestinationState:
    """One destination on the overview."""

    name: str
    pending: int
    inflight: int
    retrying: int  # pending with at least one failed attempt (also counted in `pending`)
    dead: int
    discarded: int
    delivered: int
    oldest_pending_age_s: float | None
    paused: bool
    configured: bool  # False: messages exist for a destination the config no longer has
    last_success_at: float | None
    last_error: str | None
    last_error_at: float | None


@dataclass(frozen=True, slots=True)
class MinuteCount:
    """Delivered and failed attempts in one minute (the overview's chart)."""

    minute_at: float  # start of the minute, epoch seconds
    delivered: int
    failed: int


@dataclass(frozen=True, slots=True)
class Money:
    """An amount in minor units of one currency (`major` is for display)."""

    currency: str
    amount_minor: int
    count: int = 0

    @property
    def major(self) -> str:
        from relay.currency import exponent

        digits = exponent(self.currency)
        if digits is None or digits == 0:
            return f"{self.amount_minor} {self.currency}"
        sign = "-" if self.amount_minor < 0 else ""
        whole, frac = divmod(abs(self.amount_minor), 10**digits)
        return f"{sign}{whole:,}.{frac:0{digits}d} {self.currency}"


@dataclass(frozen=True, slots=True)
class Revenue:
    """Purchases delivered to Faurya, per currency, and the share without attribution."""

    today: tuple[Money, ...]
    week: tuple[Money, ...]  # the last 7 days, today included
    unattributed_share: float | None  # of the week's purchases (by count); None: none yet


@dataclass(frozen=True, slots=True)
class AtRisk:
    """Money in dead purchase messages and in purchases pending longer than LONG_PENDING_S."""

    dead: tuple[Money, ...]
    long_pending: tuple[Money, ...]


@dataclass(frozen=True, slots=True)
class Retention:
    bodies_s: float
    rows_s: float
    store_size_bytes: int | None


@dataclass(frozen=True, slots=True)
class ReconcileRun:
    """The last reconcile run of this relay (None before the first)."""

    at: float
    ok: bool
    seen: int = 0
    enqueued: int = 0
    already_recorded: int = 0
    unmappable: int = 0
    error: str | None = None


@dataclass(frozen=True, slots=True)
class Summary:
    """The overview."""

    generated_at: float
    destinations: tuple[DestinationState, ...]
    chart: tuple[MinuteCount, ...]  # the last 60 minutes, oldest first
    revenue: Revenue
    at_risk: AtRisk
    retention: Retention
    reconcile: ReconcileRun | None
    open_access: bool  # loopback listener without a token: anyone local may act
    jobs: tuple[Job, ...] = ()  # running or interrupted bulk jobs
    # When the delivered counts were taken (they are refreshed every DELIVERED_COUNT_TTL_S).
    delivered_counted_at: float | None = None

    def to_json(self) -> dict[str, Any]:
        return plain(self)  # type: ignore[no-any-return]


@dataclass(frozen=True, slots=True)
class Rejected:
    """One request the relay refused before it could be trusted. No body, ever."""

    at: float
    address: str
    reason: str  # bad_signature, stale_timestamp, refused_address, too_large, unknown_path, ...
    path: str
    webhook_id: str | None
    source: str | None = None


@dataclass(frozen=True, slots=True)
class AuditEntry:
    id: int
    at: float
    actor: str
    action: str
    target: str  # message ids ("12,13"), a destination, or a filter as a URL query
    detail: str | None
    count: int


@dataclass(frozen=True, slots=True)
class ActionResult:
    """What an action did: `count` messages changed (`ids` when few enough to list)."""

    action: str
    count: int
    ids: tuple[int, ...] = ()
    job: Job | None = None
    message: str = ""

    def to_json(self) -> dict[str, Any]:
        return plain(self)  # type: ignore[no-any-return]


class JobStatus(StrEnum):
    RUNNING = "running"
    DONE = "done"
    CANCELLED = "cancelled"
    FAILED = "failed"
    INTERRUPTED = "interrupted"  # its relay stopped while it ran; it can be restarted


@dataclass(frozen=True, slots=True)
class Job:
    """A background bulk replay over everything a filter matches."""

    id: int
    kind: str  # "replay_dead"
    filter_query: str  # the filter, as a URL query string
    actor: str
    status: JobStatus
    total: int
    done: int
    created_at: float
    updated_at: float
    owner: str  # the relay process running it
    error: str | None = None

    @property
    def active(self) -> bool:
        return self.status is JobStatus.RUNNING


@dataclass(frozen=True, slots=True)
class DryRunRoute:
    """What one route would do with a pasted event."""

    route: str
    destination: str
    selected: bool
    reason: str  # why it is (not) selected, or why it failed
    idempotency_key: str | None = None
    body: str | None = None  # pretty JSON of what would be sent


@dataclass(frozen=True, slots=True)
class DryRun:
    event_type: str | None
    status: str  # routed, ignored, unmappable (as `relay map` says)
    reason: str | None
    routes: tuple[DryRunRoute, ...]

    def to_json(self) -> dict[str, Any]:
        return plain(self)  # type: ignore[no-any-return]


def _iso(ts: float) -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(ts))


def plain(value: Any) -> Any:
    """A view as JSON-ready data (enums as values, tuples as lists)."""
    import dataclasses

    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        out = {f.name: plain(getattr(value, f.name)) for f in dataclasses.fields(value)}
        if isinstance(value, Money):
            out["major"] = value.major
        return out
    if isinstance(value, StrEnum):
        return value.value
    if isinstance(value, (tuple, list)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): plain(v) for k, v in value.items()}
    return value


MAX_LEDGER_PARAM = 64  # a time, a date, a zone name or a code is never longer


@dataclass(frozen=True, slots=True)
class LedgerView:
    """The ledger as the console shows it, and whether this relay has a Polar token now."""

    ledger: Ledger
    has_token: bool


class ConsoleService:
    """The console's reads and actions, over the store of the running relay.

    `store` is a callable because the store opens after the app is made; `paused` reports
    the live pause state of a destination's worker (None: not serving it here).
    """

    def __init__(
        self,
        store: Callable[[], Store | None],
        config: Config,
        clock: Clock,
        rejected: RejectedLog,
        jobs: Jobs | None = None,
        *,
        open_access: bool = False,
        paused: Callable[[str], bool | None] | None = None,
        last_reconcile: Callable[[], ReconcileRun | None] | None = None,
    ) -> None:
        self._store = store
        self.config = config
        self.clock = clock
        self.rejected_log = rejected
        self.jobs = jobs
        self.open_access = open_access
        self._paused = paused or (lambda name: None)
        self._last_reconcile = last_reconcile or (lambda: None)
        # Delivered counts visit every delivered row (a million is ~50 ms): counted at most
        # every DELIVERED_COUNT_TTL_S, in the background, so no overview request waits for it.
        self._delivered: dict[str, int] = {}
        self._delivered_at: float | None = None
        self._counting: asyncio.Task[None] | None = None

    @property
    def store(self) -> Store:
        return open_store(self._store)

    # ------------------------------------------------------------------ reads

    async def summary(self) -> Summary:
        return await self._summary()

    async def list_messages(
        self, filters: ListFilters, cursor: Cursor | None = None, limit: int = DEFAULT_LIMIT
    ) -> MessagePage:
        if not 1 <= limit <= MAX_LIMIT:
            raise ConsoleError(f"limit must be between 1 and {MAX_LIMIT}")
        items = await self.store.console_messages(filters, cursor, limit + 1)
        page = tuple(items[:limit])
        more = len(items) > limit
        nxt = None
        if more and page:
            last = page[-1]
            nxt = Cursor(last.id, (last.amount_minor or 0) if filters.sort is Sort.AMOUNT else None)
        return MessagePage(page, nxt)

    async def message_detail(self, message_id: int) -> MessageDetail:
        return await self._message_detail(message_id)

    def rejected(self, limit: int = 200) -> tuple[Rejected, ...]:
        """The most recent requests refused by this relay process, newest first."""
        return self.rejected_log.recent(limit)

    async def audit(self, limit: int = 200, before_id: int | None = None) -> list[AuditEntry]:
        return await self.store.audit_entries(limit, before_id)

    async def dry_run(self, event: Any, source: str | None = None) -> DryRun:
        return await self._dry_run(event, source)

    async def ledger(self, query: Mapping[str, str] | Any) -> LedgerView:
        """The revenue ledger (relay/ledger.py) for the filters in `query`: `since` and `until`
        (a bare date is a day in the ledger's time zone, `until` through its end; else ISO or an
        age such as 7d), `currency` and `timezone` (default `ledger.timezone`). Reads the
        store only, never Polar's API."""
        return await self._ledger(query)

    async def list_jobs(self, limit: int = 20) -> list[Job]:
        return await self.store.console_jobs(limit)

    async def job(self, job_id: int) -> Job:
        found = await self.store.console_job(job_id)
        if found is None:
            raise NotFound(f"no job with id {job_id}")
        return found

    # ------------------------------------------------------------------ actions

    async def retry(self, caller: Caller, message_id: int) -> ActionResult:
        """A dead or pending message becomes due now with a fresh retry budget."""
        return await self._retry(caller, message_id)

    async def replay(self, caller: Caller, message_id: int) -> ActionResult:
        """Send again (a delivered message too), under the same idempotency key."""
        return await self._replay(caller, message_id)

    async def discard(self, caller: Caller, message_id: int, reason: str) -> ActionResult:
        """Give up on a dead message, with a reason."""
        return await self._discard(caller, message_id, reason)

    async def pause(self, caller: Caller, destination: str) -> ActionResult:
        return await self._set_paused(caller, destination, True)

    async def resume(self, caller: Caller, destination: str) -> ActionResult:
        return await self._set_paused(caller, destination, False)

    async def bulk_replay_preview(self, filters: ListFilters) -> int:
        """How many dead messages `bulk_replay(filters)` would replay (the confirmation)."""
        return await self.store.console_count_dead(filters)

    async def bulk_replay(self, caller: Caller, filters: ListFilters) -> ActionResult:
        """Replay every DEAD message the filter matches, as a background job."""
        return await self._bulk_replay(caller, filters)

    async def cancel_job(self, caller: Caller, job_id: int) -> ActionResult:
        return await self._cancel_job(caller, job_id)

    async def restart_job(self, caller: Caller, job_id: int) -> ActionResult:
        """Start an interrupted (or cancelled) job again from where it stopped."""
        return await self._restart_job(caller, job_id)

    # ------------------------------------------------------------------ bodies

    async def _summary(self) -> Summary:
        store = self.store
        now = self.clock.now()
        # Configured destinations and any other that still has undelivered messages.
        known = sorted(
            set(self.config.destinations) | set(await store.console_waiting_destinations())
        )
        counts = await store.console_status_counts(known)
        delivered_at = await self._delivered_counts(store, now, known)
        activity = await store.console_activity()
        overrides = await store.paused_overrides()
        names = list(self.config.destinations)
        names += [name for name in known if name not in names]
        destinations = []
        for name in names:
            mine = {row[1]: row for row in counts if row[0] == name}

            def count(status: MessageStatus, mine: Mapping[str, Any] = mine) -> int:
                row = mine.get(status.value)
                return int(row[2]) if row else 0

            oldest = [
                row[4]
                for status in ("pending", "inflight")
                if (row := mine.get(status)) is not None and row[4] is not None
            ]
            pending_row = mine.get("pending")
            paused = self._paused(name)
            if paused is None:
                configured = self.config.destinations.get(name)
                paused = overrides.get(name, configured.paused if configured else False)
            success_at, error, error_at = activity.get(name, (None, None, None))
            destinations.append(
                DestinationState(
                    name=name,
                    pending=count(MessageStatus.PENDING),
                    inflight=count(MessageStatus.INFLIGHT),
                    retrying=int(pending_row[3]) if pending_row else 0,
                    dead=count(MessageStatus.DEAD),
                    discarded=count(MessageStatus.DISCARDED),
                    delivered=self._delivered.get(name, 0),
                    oldest_pending_age_s=max(0.0, now - min(oldest)) if oldest else None,
                    paused=paused,
                    configured=name in self.config.destinations,
                    last_success_at=success_at,
                    last_error=error,
                    last_error_at=error_at,
                )
            )
        first_minute = int(now // 60) - 59
        by_minute = {m: [0, 0] for m in range(first_minute, first_minute + 60)}
        for minute, outcome, n in await store.console_minutes(first_minute * 60.0):
            if minute in by_minute:
                by_minute[minute][0 if outcome == "delivered" else 1] += n
        chart = tuple(MinuteCount(m * 60.0, d, f) for m, (d, f) in sorted(by_minute.items()))
        day_start = now - (now % 86400)
        week_rows = await store.console_revenue(now - 7 * 86400)
        today_rows = await store.console_revenue(day_start)
        purchases = sum(r[3] for r in week_rows if r[0] == "purchase")
        unattributed = sum(r[4] for r in week_rows if r[0] == "purchase")
        revenue = Revenue(
            today=_money(today_rows),
            week=_money(week_rows),
            unattributed_share=(unattributed / purchases) if purchases else None,
        )
        risk = await store.console_at_risk(now - LONG_PENDING_S)
        at_risk = AtRisk(
            dead=tuple(
                sorted(
                    (Money(c, a, n) for kind, c, a, n in risk if kind == "dead"),
                    key=lambda m: -m.amount_minor,
                )
            ),
            long_pending=tuple(
                sorted(
                    (Money(c, a, n) for kind, c, a, n in risk if kind == "pending"),
                    key=lambda m: -m.amount_minor,
                )
            ),
        )
        try:
            size: int | None = await store.db_size_bytes()
        except Exception:  # the size is a nicety; the overview still answers
            size = None
        jobs = tuple(j for j in await store.console_jobs(5) if j.status in _SHOWN_JOBS)
        return Summary(
            generated_at=now,
            destinations=tuple(destinations),
            chart=chart,
            revenue=revenue,
            at_risk=at_risk,
            retention=Retention(self.config.retention.bodies_s, self.config.retention.rows_s, size),
            reconcile=self._last_reconcile(),
            open_access=self.open_access,
            jobs=jobs,
            delivered_counted_at=delivered_at,
        )

    async def _delivered_counts(self, store: Store, now: float, names: list[str]) -> float | None:
        """Refresh the delivered counts: at once the first time, else in the background
        once they are older than DELIVERED_COUNT_TTL_S. Returns when they were counted."""
        stale = self._delivered_at is None or now - self._delivered_at > DELIVERED_COUNT_TTL_S
        if self._delivered_at is None:
            await self._count_delivered(store, names)
        elif stale and (self._counting is None or self._counting.done()):
            self._counting = asyncio.create_task(self._count_delivered(store, names))
        return self._delivered_at

    async def _count_delivered(self, store: Store, names: list[str]) -> None:
        counted_at = self.clock.now()
        counts = {name: await store.console_delivered_count(name) for name in names}
        self._delivered, self._delivered_at = counts, counted_at

    async def _message_detail(self, message_id: int) -> MessageDetail:
        store = self.store
        item = await store.console_message(message_id)
        stored = await store.console_message_body(message_id)
        if item is None or stored is None:
            raise NotFound(f"no message with id {message_id}")
        event_id, body = stored
        inbound = await store.console_event(event_id)
        if inbound is not None:
            inbound = _without_hidden(inbound)
        route = next((r for r in self.config.routes if r.name == item.route), None)
        if route is None:
            info = RouteInfo(item.route, False, why="the config no longer has this route")
        else:
            condition = None if route.when is None else _describe_condition(route.when)
            why = f"it takes {', '.join(route.events)} from source {route.source}"
            if condition:
                why += f", when {condition}"
            info = RouteInfo(route.name, True, route.events, condition, why)
        destination = self.config.destinations.get(item.destination)
        request = None
        if destination is not None:
            from relay.delivery import USER_AGENT

            headers = [(h.name, h.shown()) for h in destination.headers]
            headers = [
                (name, MASK if name.lower() in HIDDEN_HEADERS else value) for name, value in headers
            ]
            headers += [
                ("content-type", "application/json"),
                ("user-agent", USER_AGENT),
                ("idempotency-key", item.idempotency_key),
            ]
            request = SentRequest(
                "POST", masked_url(destination.url), tuple(headers), _pretty(body)
            )
        attempts = tuple(await store.console_attempts(message_id))
        related = tuple(await store.console_related(item, event_id))
        return MessageDetail(item, inbound, info, request, attempts, related)

    async def _dry_run(self, event: Any, source: str | None) -> DryRun:
        from relay.ingest import resolve_lookups
        from relay.mapping import map_event, select
        from relay.models import EventStatus

        if not isinstance(event, dict):
            raise ConsoleError("the event must be a JSON object (a Polar webhook body)")
        source = source or next(iter(self.config.sources), None)
        if source is None or source not in self.config.sources:
            raise ConsoleError(f"no source named {source!r}")
        event_type = event.get("type")
        if not isinstance(event_type, str):
            raise ConsoleError('the event has no string "type"')
        routes = list(self.config.routes)
        found = await resolve_lookups(self.store, routes, source, event)
        mapped = map_event(routes, source, event, found)
        chosen = {r.name for r in select(routes, source, event, found)}
        built = {m.route: m for m in mapped.messages}
        out = []
        for route in routes:
            if route.name in built:
                m = built[route.name]
                out.append(
                    DryRunRoute(
                        route.name,
                        route.destination,
                        True,
                        "selected",
                        m.idempotency_key,
                        _pretty(m.body),
                    )
                )
            elif route.name in chosen:
                out.append(
                    DryRunRoute(route.name, route.destination, True, mapped.reason or "not built")
                )
            else:
                if route.source != source:
                    why = f"another source ({route.source})"
                elif not route.takes(event_type):
                    why = f"takes {', '.join(route.events)}, not {event_type}"
                else:
                    why = "its condition does not hold"
                out.append(DryRunRoute(route.name, route.destination, False, why))
        status = mapped.status
        return DryRun(
            event_type,
            status.value if isinstance(status, EventStatus) else str(status),
            mapped.reason,
            tuple(out),
        )

    async def _ledger(self, query: Mapping[str, str] | Any) -> LedgerView:
        from relay.errors import ConfigError
        from relay.ledger_report import parse_bound, zone
        from relay.ledger_source import read_ledger
        from relay.outbox_commands import BadTime

        def text(name: str) -> str | None:
            value = str(query.get(name, "")).strip()
            return value[:MAX_LEDGER_PARAM] if value else None

        now = self.clock.now()
        timezone = text("timezone") or self.config.ledger.timezone
        currency = text("currency")
        if currency is not None and not currency.isalpha():
            raise ConsoleError(f"currency must be a currency code such as USD, not {currency!r}")
        try:
            tz = zone(timezone)
        except ConfigError as exc:
            # The CLI's wording names its flag: the console's parameter has no dashes.
            raise ConsoleError(str(exc).removeprefix("--")) from None

        def bound(name: str, *, end: bool) -> float | None:
            value = text(name)
            try:
                return parse_bound(value, tz, now, end=end)
            except BadTime as exc:
                raise ConsoleError(f"{name}: {exc}") from None

        since = bound("since", end=False)
        until = bound("until", end=True)
        if since is not None and until is not None and until <= since:
            raise ConsoleError("until must be after since")
        ledger = await read_ledger(
            self.store,
            self.config,
            now=now,
            since=since,
            until=until,
            timezone=timezone,
            currency=currency,
        )
        return LedgerView(ledger, self.config.polar_api.token is not None)

    async def _one(self, message_id: int) -> MessageItem:
        item = await self.store.console_message(message_id)
        if item is None:
            raise NotFound(f"no message with id {message_id}")
        return item

    async def _audit(
        self,
        caller: Caller,
        action: str,
        target: str,
        count: int,
        detail: str | None = None,
    ) -> None:
        """Record an action in the store and the log (the audit page shows the store)."""
        await self.store.add_audit(caller.actor, action, target, detail, count)
        log.info(
            "console_action",
            actor=caller.actor,
            action=action,
            target=target,
            count=count,
            detail=detail,
        )

    def _must_act(self, caller: Caller) -> None:
        if not caller.can_act:
            raise ConsoleError("this token can only read; actions need admin.token", 403)

    async def _retry(self, caller: Caller, message_id: int) -> ActionResult:
        from relay.models import MessageFilter

        self._must_act(caller)
        item = await self._one(message_id)
        if item.status not in (MessageStatus.DEAD, MessageStatus.PENDING):
            raise ConsoleError(
                f"message {message_id} is {item.status.value}: only dead or pending messages "
                "are retried (a delivered one can be replayed)",
                409,
            )
        count = await self.store.replay(
            MessageFilter(ids=(message_id,), statuses=(MessageStatus.DEAD, MessageStatus.PENDING))
        )
        await self._audit(caller, "retry", str(message_id), count)
        return ActionResult(
            "retry",
            count,
            (message_id,) if count else (),
            message=(f"message {message_id} will be sent now" if count else "nothing to retry"),
        )

    async def _replay(self, caller: Caller, message_id: int) -> ActionResult:
        from relay.models import MessageFilter

        self._must_act(caller)
        item = await self._one(message_id)
        if item.status in (MessageStatus.INFLIGHT, MessageStatus.DISCARDED):
            raise ConsoleError(
                f"message {message_id} is {item.status.value}: it cannot be replayed", 409
            )
        count = await self.store.replay(MessageFilter(ids=(message_id,)))
        await self._audit(caller, "replay", str(message_id), count)
        return ActionResult(
            "replay",
            count,
            (message_id,) if count else (),
            message=(f"message {message_id} will be sent again under the same idempotency key"),
        )

    async def _discard(self, caller: Caller, message_id: int, reason: str) -> ActionResult:
        from relay.models import MessageFilter

        self._must_act(caller)
        reason = " ".join(reason.split())
        if not reason:
            raise ConsoleError("a discard needs a reason")
        if len(reason) > 500:
            raise ConsoleError("the reason is longer than 500 characters")
        item = await self._one(message_id)
        if item.status is not MessageStatus.DEAD:
            raise ConsoleError(
                f"message {message_id} is {item.status.value}: only dead messages are discarded",
                409,
            )
        ids = await self.store.discard(MessageFilter(ids=(message_id,)), reason)
        await self._audit(caller, "discard", str(message_id), len(ids), reason)
        return ActionResult(
            "discard",
            len(ids),
            tuple(ids),
            message=(f"message {message_id} discarded" if ids else "nothing discarded"),
        )

    async def _set_paused(self, caller: Caller, destination: str, paused: bool) -> ActionResult:
        self._must_act(caller)
        if destination not in self.config.destinations:
            raise NotFound(f"no destination named {destination!r}")
        await self.store.set_paused(destination, paused)
        action = "pause" if paused else "resume"
        await self._audit(caller, action, destination, 1)
        return ActionResult(action, 1, message=f"{destination} {'paused' if paused else 'resumed'}")

    async def _bulk_replay(self, caller: Caller, filters: ListFilters) -> ActionResult:
        self._must_act(caller)
        if self.jobs is None:
            raise ConsoleError("bulk jobs run only on a serving relay", 409)
        import dataclasses

        # Dead ones only, whatever statuses the view had: the job and its audit say so.
        filters = dataclasses.replace(filters, statuses=(MessageStatus.DEAD,))
        job = await self.jobs.start(caller, filters)
        await self._audit(caller, "bulk_replay", _query_text(filters), job.total, f"job:{job.id}")
        return ActionResult(
            "bulk_replay",
            job.total,
            job=job,
            message=f"job {job.id}: replaying {job.total} dead message(s) in the background",
        )

    async def _cancel_job(self, caller: Caller, job_id: int) -> ActionResult:
        self._must_act(caller)
        await self.job(job_id)
        changed = await self.store.set_job_status(
            job_id, "cancelled", from_statuses=("running", "interrupted")
        )
        if not changed:
            raise ConsoleError(f"job {job_id} is not running", 409)
        await self._audit(caller, "cancel_job", f"job:{job_id}", 0)
        return ActionResult("cancel_job", 0, job=await self.job(job_id), message="cancelled")

    async def _restart_job(self, caller: Caller, job_id: int) -> ActionResult:
        self._must_act(caller)
        if self.jobs is None:
            raise ConsoleError("bulk jobs run only on a serving relay", 409)
        job = await self.job(job_id)
        if job.status not in (JobStatus.INTERRUPTED, JobStatus.CANCELLED, JobStatus.FAILED):
            raise ConsoleError(f"job {job_id} is {job.status.value}: nothing to restart", 409)
        job = await self.jobs.restart(job)
        await self._audit(caller, "restart_job", f"job:{job_id}", job.total - job.done)
        return ActionResult("restart_job", job.total - job.done, job=job, message="restarted")


_SHOWN_JOBS = (JobStatus.RUNNING, JobStatus.INTERRUPTED)


def _query_text(filters: ListFilters) -> str:
    from urllib.parse import urlencode

    return urlencode(filters.to_query())


def _money(rows: list[tuple[str, str, int, int, int]]) -> tuple[Money, ...]:
    """Purchases minus refunds per currency, largest first."""
    net: dict[str, list[int]] = {}
    for kind, currency, amount, count, _ in rows:
        entry = net.setdefault(currency, [0, 0])
        if kind == "purchase":
            entry[0] += amount
            entry[1] += count
        else:
            entry[0] -= amount
    return tuple(
        sorted((Money(c, a, n) for c, (a, n) in net.items()), key=lambda m: -m.amount_minor)
    )


def _pretty(body: bytes) -> str:
    try:
        return json.dumps(json.loads(body), indent=2, ensure_ascii=False)
    except ValueError:
        return body.decode("utf-8", errors="replace")


def _without_hidden(inbound: Inbound) -> Inbound:
    import dataclasses

    kept = tuple((k, v) for k, v in inbound.headers if k.lower() not in HIDDEN_HEADERS)
    return dataclasses.replace(inbound, headers=kept)


def _describe_condition(condition: Any) -> str:
    """A route's `when`, in words: `data.currency eq "usd" and not (...)`."""
    from relay.mapping import format_path

    op = condition.op
    if op in ("all", "any"):
        joiner = " and " if op == "all" else " or "
        return "(" + joiner.join(_describe_condition(c) for c in condition.children) + ")"
    if op == "not":
        return f"not {_describe_condition(condition.children[0])}"
    path = format_path(condition.path)
    if op == "exists":
        return f"{path} {'exists' if condition.value else 'is absent'}"
    return f"{path} {op} {json.dumps(condition.value, default=str)}"


def masked_url(url: str) -> str:
    """A destination URL as shown: no user:password, and the query (which may carry a key)
    masked."""
    from urllib.parse import urlsplit, urlunsplit

    try:
        parts = urlsplit(url)
        host = parts.hostname or ""
        if ":" in host:
            host = f"[{host}]"
        if parts.port is not None:
            host = f"{host}:{parts.port}"
    except ValueError:
        return MASK
    return urlunsplit((parts.scheme, host, parts.path, MASK if parts.query else "", ""))


__all__ = [
    "DEFAULT_LIMIT",
    "HIDDEN_HEADERS",
    "MASK",
    "MAX_LIMIT",
    "ActionResult",
    "AtRisk",
    "Attempt",
    "AuditEntry",
    "Caller",
    "ConsoleError",
    "ConsoleService",
    "Cursor",
    "DestinationState",
    "DryRun",
    "DryRunRoute",
    "Inbound",
    "Job",
    "JobStatus",
    "ListFilters",
    "MessageDetail",
    "MessageItem",
    "MessagePage",
    "MinuteCount",
    "Money",
    "NotFound",
    "ReconcileRun",
    "Rejected",
    "Retention",
    "Revenue",
    "Role",
    "RouteInfo",
    "SentRequest",
    "Sort",
    "StatusClass",
    "Summary",
    "plain",
]
