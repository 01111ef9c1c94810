"""The store's seams: `Store`, what the relay calls (the app, ingest, the workers,
reconcile, operator commands, the CLI, the console), and `Backend`, what one database driver
offers the shared outbox (relay/store/outbox.py) underneath it.

A `Store` comes from `open_store(location)` (or `Store.open(location)`): a SQLite file path or
a postgresql:// URL. Every method returns the dataclasses of relay/models.py, and every
failure of the database reaches the caller as `StorageUnavailable` (a `StorageError`), never
as a driver's exception: nothing outside relay/store/ imports a driver.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import TYPE_CHECKING, Any, Protocol

from relay.models import (
    AttemptRecord,
    ClaimedMessage,
    Clock,
    Dead,
    DestinationStats,
    EnqueueResult,
    EventFilter,
    EventStatus,
    InboundDraft,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    OutboundDraft,
    PolarRecord,
    PruneResult,
    RetryLater,
    SnapshotCoverage,
    StoredEvent,
)
from relay.store import sql
from relay.store.batching import BatchStats, Runner
from relay.store.connection import Connection, Row

if TYPE_CHECKING:
    from relay.console.service import (
        Attempt,
        AuditEntry,
        Cursor,
        Inbound,
        Job,
        ListFilters,
        MessageItem,
    )

Fetch = Callable[[str, Sequence[Any]], Awaitable[list[Row]]]


class Store(Protocol):
    """The outbox. Writes of a serving store share group commits (one fsync for many
    callers); an operator's store (`serve=False`) commits each write on its own."""

    @staticmethod
    async def open(
        location: str,
        *,
        clock: Clock | None = None,
        busy_timeout_ms: int = 5000,
        max_batch: int = 256,
        serve: bool = False,
    ) -> Store:
        """Open (creating and migrating as needed) the store at `location`, as `open_store`.
        `serve=True` takes the one-server lock (SQLite) and starts the group-commit writer."""
        from relay.store import open_store

        return await open_store(
            location, clock=clock, busy_timeout_ms=busy_timeout_ms, max_batch=max_batch, serve=serve
        )

    # ------------------------------------------------------------ identity and hooks

    @property
    def path(self) -> str:
        """Where the data lives, for messages: a file path, or a URL without its secrets."""

    @property
    def exclusive(self) -> bool:
        """Whether this process alone serves the database (SQLite's serve lock): then every
        inflight row found at start-up belongs to a dead process."""

    @property
    def listening(self) -> bool | None:
        """PostgreSQL: whether commits of other replicas wake this one. None on SQLite."""

    # Called with the destinations that got new or newly due messages.
    on_commit: Callable[[set[str]], None] | None
    # Called after every commit that carried webhooks.
    on_batch: Callable[[BatchStats], None] | None
    # Called when an operator changed the outbox (this process or another).
    on_operation: Callable[[], None] | None
    # Called when `listening` changes.
    on_listening: Callable[[bool], None] | None

    @property
    def writer_running(self) -> bool:
        """Whether the group-commit writer runs (always true for an operator's store)."""

    @property
    def last_write_error(self) -> str | None:
        """`Type: message` of the last failed commit, None once one succeeded since."""

    async def close(self) -> None:
        """Finish queued writes (up to 10 s), stop, close the connections, release the lock."""

    # ------------------------------------------------------------ health

    async def probe(self) -> None:
        """Prove the database takes a synced write right now; clears `last_write_error`.
        Raises `StorageUnavailable`."""

    async def pragmas(self) -> dict[str, Any]:
        """The durability settings in force (SQLite's pragmas, PostgreSQL's
        synchronous_commit)."""

    async def schema_version(self) -> int:
        """The last migration applied."""

    async def db_size_bytes(self) -> int:
        """The database's size on disk."""

    # ------------------------------------------------------------ ingest

    async def enqueue(self, draft: InboundDraft) -> EnqueueResult:
        """Commit one event with its messages (deduped by webhook-id and by idempotency key,
        in the same transaction), sharing the fsync with concurrent callers."""

    async def enqueue_now(self, drafts: Sequence[InboundDraft]) -> list[EnqueueResult]:
        """Several events in one transaction of their own (operator commands and tests)."""

    async def find_bodies(self, wanted: Sequence[tuple[str, str]]) -> dict[tuple[str, str], bytes]:
        """The stored bodies of messages by (destination, idempotency key)."""

    # ------------------------------------------------------------ delivery

    async def claim(self, destination: str, limit: int, lease_s: float) -> list[ClaimedMessage]:
        """Lease up to `limit` due messages of `destination` for `lease_s` (race-free)."""

    async def mark_delivered(
        self, msg: ClaimedMessage, status: int, attempt: AttemptRecord | None = None
    ) -> bool:
        """Delivered with answer `status`; False if the lease was lost meanwhile. `attempt`
        (and each of the other outcomes') is recorded in the same transaction."""

    async def mark_retry(
        self,
        msg: ClaimedMessage,
        outcome: RetryLater,
        error: str,
        attempt: AttemptRecord | None = None,
    ) -> bool:
        """Pending again, due at `outcome.at`; a throttled attempt gives its attempt back."""

    async def mark_dead(
        self, msg: ClaimedMessage, outcome: Dead, error: str, attempt: AttemptRecord | None = None
    ) -> bool:
        """Dead-lettered: kept for an operator, never sent again unless retried."""

    async def release(self, msg: ClaimedMessage) -> bool:
        """Give a claimed message back untried (shutdown): due now, attempt not counted."""

    async def requeue_inflight(self, *, expired_only: bool = True) -> int:
        """Return leased messages to pending: those whose lease ran out, or all of them."""

    async def next_due_at(self, destination: str) -> float | None:
        """When the next pending message of `destination` is due; None if none is."""

    # ------------------------------------------------------------ operator

    async def stats(self, destination: str) -> DestinationStats:
        """Counts by status and the oldest undelivered message's age."""

    async def list_messages(
        self,
        selection: MessageFilter | None = None,
        *,
        status: MessageStatus | None = None,
        destination: str | None = None,
        limit: int = 100,
    ) -> list[MessageRecord]:
        """The selected messages, newest first."""

    async def get_message(self, message_id: int) -> MessageRecord | None:
        """One message, or None."""

    async def replay(self, selection: MessageFilter, *, dry_run: bool = False) -> int:
        """The selected messages due now with a fresh budget (not inflight, not discarded);
        the count."""

    async def retry_messages(self, ids: Iterable[int] = (), *, all_dead: bool = False) -> int:
        """Dead (or pending) messages due now with a fresh budget; the count."""

    async def discard(self, selection: MessageFilter, reason: str) -> list[int]:
        """The selected DEAD messages become `discarded`, never sent; their ids."""

    async def destinations(self) -> list[str]:
        """Every destination that has messages."""

    async def paused_overrides(self) -> dict[str, bool]:
        """Pause states set by `relay pause|resume`; they override the config's `paused`."""

    async def set_paused(self, destination: str, paused: bool) -> None:
        """Pause or resume `destination`, for every relay serving this outbox."""

    async def prune(
        self, *, bodies_before: float, rows_before: float, batch: int = 1000
    ) -> PruneResult:
        """Retention in short transactions (relay/store/admin.py says what goes when)."""

    async def backfill_facts(self, batch: int = 1000) -> int:
        """Fill the search and revenue columns of messages stored before they existed."""

    async def list_events(
        self, selection: EventFilter, limit: int = 10_000, *, newest_first: bool = False
    ) -> list[StoredEvent]:
        """The selected inbound events."""

    async def remap_event(
        self,
        event_id: int,
        status: EventStatus,
        reason: str | None,
        messages: Sequence[OutboundDraft],
    ) -> EnqueueResult:
        """Store a new mapping of a stored event (`relay reprocess`) in one transaction; a
        message whose key exists is not inserted again."""

    async def event_count(self) -> int:
        """How many inbound events are stored."""

    # ------------------------------------------------------------ the console
    # (relay/store/console.py; the view types are relay/console/service.py's)

    async def console_messages(
        self, filters: ListFilters, cursor: Cursor | None, limit: int
    ) -> list[MessageItem]:
        """The console's message list: newest first (or largest amount first), keyset-paged."""

    async def console_message(self, message_id: int) -> MessageItem | None:
        """One message as the console lists it, or None."""

    async def console_message_body(self, message_id: int) -> tuple[int, bytes] | None:
        """(event id, body as sent) of a message."""

    async def console_related(self, item: MessageItem, event_id: int) -> list[MessageItem]:
        """Messages of the same event, order or Polar payment (a refund and its purchase)."""

    async def console_event(self, event_id: int) -> Inbound | None:
        """The inbound event of a message: headers and body as stored (None: gone)."""

    async def console_attempts(self, message_id: int) -> list[Attempt]:
        """A message's recorded delivery attempts, oldest first."""

    async def console_count_dead(self, filters: ListFilters) -> int:
        """How many DEAD messages the filter matches (a bulk replay's confirmation)."""

    async def console_max_id(self) -> int:
        """The largest message id (a bulk job covers messages up to it)."""

    async def console_dead_batch(
        self, filters: ListFilters, after_id: int, upper_id: int, limit: int
    ) -> list[int]:
        """Ids of the next DEAD messages the filter matches, by id (keyset, ascending)."""

    async def console_status_counts(
        self, destinations: Sequence[str]
    ) -> list[tuple[str, str, int, int, float | None]]:
        """(destination, status, count, retrying, oldest created_at) of every status but delivered,
        for these destinations: each count read from the (destination, status) index alone;
        retrying and the oldest only for the backlog (the delivered count is
        `console_delivered_count`, a longer read)."""

    async def console_waiting_destinations(self) -> list[str]:
        """Destinations with messages not delivered (a destination gone from the config may still
        have some): read from the (status, id) index, few rows."""

    async def console_delivered_count(self, destination: str) -> int:
        """Delivered messages of one destination (counted along the (destination, status) index:
        every delivered row is visited, so callers cache it)."""

    async def console_activity(self) -> dict[str, tuple[float | None, str | None, float | None]]:
        """destination -> (last success at, last error, last error at)."""

    async def console_minutes(self, since: float) -> list[tuple[int, str, int]]:
        """(minute number since the epoch, outcome, attempts) since `since`."""

    async def console_revenue(self, since: float) -> list[tuple[str, str, int, int, int]]:
        """(event kind, currency, sum of amounts, count, unattributed count) of purchases and
        refunds delivered since `since`."""

    async def console_at_risk(self, pending_before: float) -> list[tuple[str, str, int, int]]:
        """("dead" | "pending", currency, amount, count) of purchases not delivered: dead, or
        pending (inflight) since before `pending_before`. The dead ones are summed from the
        revenue index alone (status, delivered_at, event_kind, currency, amount)."""

    async def add_audit(
        self, actor: str, action: str, target: str, detail: str | None, count: int
    ) -> int:
        """Record a console action; its id."""

    async def audit_entries(self, limit: int, before_id: int | None) -> list[AuditEntry]:
        """Console actions, newest first, before `before_id` when given."""

    async def create_job(
        self, kind: str, filter_query: str, actor: str, total: int, upper_id: int, owner: str
    ) -> int:
        """A new bulk job row, running, owned by `owner`; its id."""

    async def job_progress(self, job_id: int, done_more: int, last_id: int, owner: str) -> str:
        """Record a batch done (and a heartbeat); returns the job's status as stored, so a cancel
        from any relay's console stops the runner at its next batch."""

    async def set_job_status(
        self,
        job_id: int,
        status: str,
        *,
        from_statuses: Sequence[str],
        owner: str | None = None,
        error: str | None = None,
    ) -> bool:
        """Move a job to `status` if it is in one of `from_statuses` (and take it over when `owner`
        is given). False when it was not."""

    async def console_jobs(self, limit: int) -> list[Job]:
        """The newest bulk jobs (a running one without a heartbeat for a minute shows as
        interrupted)."""

    async def console_job(self, job_id: int) -> Job | None:
        """One bulk job, or None."""

    async def job_position(self, job_id: int) -> tuple[int, int] | None:
        """(last id done, upper id) of a job: where a restart continues."""

    # ------------------------------------------------------------ the ledger's Polar snapshot

    async def save_polar_records(self, records: Sequence[PolarRecord]) -> None:
        """Store objects one reconciliation run read (a page at a time), replacing the stored
        ones of the same kind and id."""

    async def finish_polar_snapshot(self, coverage: SnapshotCoverage) -> None:
        """End a run: its coverage becomes the union of the stored one and its window when
        they overlap (else its window alone); rows of its kinds in its window that it did not
        read, and rows outside the coverage, go."""

    async def snapshot_coverage(self) -> SnapshotCoverage | None:
        """What the stored snapshot covers; None before any reconciliation run stored one."""

    async def polar_snapshot(
        self, since: float | None = None, until: float | None = None
    ) -> list[PolarRecord]:
        """The stored Polar objects created in [since, until), oldest first."""


class Wakeups(Protocol):
    """What a backend tells the outbox above it (from its watcher or LISTEN connection)."""

    def operation_seen(self) -> None:
        """An operator changed the outbox."""

    def commits_seen(self, destinations: set[str]) -> None:
        """Messages were committed for `destinations` (empty: look at every destination)."""

    def listening_changed(self, listening: bool) -> None:
        """Whether commits of other replicas wake this one."""


class Backend(Protocol):
    """One database driver under the shared outbox: its connections, its dialect, its errors
    and what it does beyond SQL (a lock file, a watcher, LISTEN/NOTIFY)."""

    path: str
    exclusive: bool
    dialect: sql.Dialect
    # What the driver raises when the database cannot answer: the store turns these into
    # `StorageUnavailable`.
    driver_errors: tuple[type[Exception], ...]
    reads: Connection
    writes: Connection

    @property
    def runner(self) -> Runner | None:
        """How the engine runs a transaction on `writes` (None: statement by statement)."""

    # A statement (with params) that tells every relay an operator changed the outbox; None:
    # the backend tells this process only (`Wakeups.operation_seen`).
    announcement: tuple[str, tuple[Any, ...]] | None

    # Runs inside each committing transaction that enqueued for some destinations (PostgreSQL:
    # NOTIFY the other replicas); None: nothing to run, not even an await.
    publish: Callable[[Connection, set[str]], Awaitable[None]] | None

    def locked(self, exc: Exception) -> bool:
        """Another process holds the write lock: the batch's jobs would wait it out again."""

    async def start(self, wakeups: Wakeups) -> None:
        """Serving: begin watching for other processes' commits."""

    async def pragmas(self, fetch: Fetch) -> dict[str, Any]:
        """`Store.pragmas`, read through `fetch` (the outbox's reads, errors converted)."""

    async def schema_version(self, fetch: Fetch) -> int:
        """`Store.schema_version`, read through `fetch`."""

    async def db_size_bytes(self, fetch: Fetch) -> int:
        """`Store.db_size_bytes` (SQLite: the files' sizes; PostgreSQL: through `fetch`)."""

    async def close(self) -> None:
        """Stop watching, close the connections, release what the backend holds."""
