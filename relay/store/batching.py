"""The group-commit engine: every write of a serving relay goes through one task and one
connection, whichever the backend.

Webhook enqueues, delivery acks and claims from all workers queue up here; the writer takes
everything waiting (up to `max_batch` webhooks), runs it in ONE transaction and commits with
one fsync, then answers each caller. So a burst of webhooks and the deliveries draining them
share commits instead of each paying an fsync, and the relay never contends with itself for
the database's write lock (no busy-waits). Acks of the same answer status are one statement.

If a batch fails (disk full, database locked by another process), it is rolled back whole and
each job is retried alone, so one job's failure is that job's alone. Operator commands, which
open the store without serving, run each write in its own transaction right away (`direct`).

The backend says how a transaction runs (`Runner`: SQLite hands the whole of it to its
connection's thread at once, relay/store/sqlite_thread.py) and which errors mean "locked".
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Awaitable, Callable, Coroutine, Iterable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from relay.errors import StorageUnavailable
from relay.models import ClaimedMessage, Clock, EnqueueResult, InboundDraft
from relay.store import sql
from relay.store.connection import Connection
from relay.store.writes import insert_drafts, mark_delivered

T = TypeVar("T")
Work = Callable[[Connection], Awaitable[Any]]
# A transaction written against `Connection`, and how a backend runs one on its connection.
Transaction = Callable[[Connection], Coroutine[Any, Any, None]]
Runner = Callable[[Transaction], Awaitable[None]]


@dataclass(frozen=True, slots=True)
class BatchStats:
    """Reported after every commit that carried webhooks."""

    size: int  # webhooks in the commit
    commit_s: float
    ok: bool


@dataclass(slots=True)
class _Job:
    future: asyncio.Future[Any]
    draft: InboundDraft | None = None  # an enqueue
    delivered: tuple[ClaimedMessage, int] | None = None  # an ack of a 2xx/409
    work: Work | None = None  # anything else: claims, retries, operator writes
    result: Any = field(default=None)


class Writer:
    """Runs write jobs in shared transactions (serve) or one by one (direct)."""

    def __init__(
        self,
        db: Connection,
        clock: Clock,
        *,
        max_batch: int,
        serve: bool,
        dialect: sql.Dialect = sql.SQLITE,
        runner: Runner | None = None,
        locked: Callable[[Exception], bool] = lambda exc: False,
        on_batch: Callable[[BatchStats], None] | None = None,
    ) -> None:
        self._db = db
        self._dialect = dialect
        # How a transaction runs: by default its statements are awaited one by one.
        self._runner: Runner = runner or (lambda transaction: transaction(db))
        # SQLITE_BUSY and the like: another process holds the write lock.
        self._locked = locked
        self._clock = clock
        self._max_batch = max_batch
        self._queue: asyncio.Queue[_Job] = asyncio.Queue()
        self._task: asyncio.Task[None] | None = None
        self._direct_lock = asyncio.Lock()
        self.on_batch = on_batch
        self.on_commit: Callable[[set[str]], None] | None = None
        # Runs inside each committing transaction with the destinations that got messages
        # (PostgreSQL: NOTIFY the other replicas).
        self.publish: Callable[[Connection, set[str]], Awaitable[None]] | None = None
        self.last_error: str | None = None
        if serve:
            self._task = asyncio.create_task(self._loop(), name="store-writer")

    @property
    def running(self) -> bool:
        return self._task is None or not self._task.done()

    async def close(self) -> None:
        if self._task is not None:
            # Queued jobs belong to requests still waiting for their 2xx: let them finish.
            if not self._task.done():
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self._queue.join(), timeout=10)
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task

    # ------------------------------------------------------------ submitting

    async def enqueue(self, draft: InboundDraft) -> EnqueueResult:
        result: EnqueueResult = await self._submit(_Job(self._future(), draft=draft))
        return result

    async def delivered(self, msg: ClaimedMessage, status: int) -> bool:
        changed: bool = await self._submit(_Job(self._future(), delivered=(msg, status)))
        return changed

    async def run(self, work: Callable[[Connection], Awaitable[T]]) -> T:
        result: T = await self._submit(_Job(self._future(), work=work))
        return result

    def _future(self) -> asyncio.Future[Any]:
        return asyncio.get_running_loop().create_future()

    async def _submit(self, job: _Job) -> Any:
        if self._task is None:
            async with self._direct_lock:
                await self._run_batch([job])
        else:
            if self._task.done():
                raise StorageUnavailable("the store writer is not running")
            self._queue.put_nowait(job)
        return await job.future

    # ------------------------------------------------------------ the loop

    async def _loop(self) -> None:
        while True:
            jobs = [await self._queue.get()]
            webhooks = 1 if jobs[0].draft is not None else 0
            while webhooks < self._max_batch and not self._queue.empty():
                job = self._queue.get_nowait()
                jobs.append(job)
                webhooks += job.draft is not None
            try:
                await self._run_batch(jobs)
            finally:
                for _ in jobs:
                    self._queue.task_done()

    async def _run_batch(self, jobs: list[_Job]) -> None:
        started = time.perf_counter()
        webhooks = sum(job.draft is not None for job in jobs)
        try:
            await self._transaction(jobs)
        except Exception as exc:
            # Any failure, expected (disk full, locked) or not, rolls the whole batch back.
            self.last_error = f"{type(exc).__name__}: {exc}"
            if webhooks:
                self._report(BatchStats(webhooks, time.perf_counter() - started, ok=False))
            if len(jobs) == 1 or self._locked(exc):
                # Locked by another process: every job would wait out the busy timeout again.
                for job in jobs:
                    self._fail(job, exc)
                return
            await self._one_by_one(jobs)
            return
        self.last_error = None
        if webhooks:
            self._report(BatchStats(webhooks, time.perf_counter() - started, ok=True))
        self._succeed(jobs)

    async def _one_by_one(self, jobs: list[_Job]) -> None:
        """After a shared batch failed: each job alone, so one job's failure (a constraint,
        a body too large for the disk left) is that job's alone, and a request never hangs
        on a future nobody resolves."""
        failed = False
        for job in jobs:
            started = time.perf_counter()
            try:
                await self._transaction([job])
            except Exception as exc:
                failed = True
                self.last_error = f"{type(exc).__name__}: {exc}"
                if job.draft is not None:
                    self._report(BatchStats(1, time.perf_counter() - started, ok=False))
                self._fail(job, exc)
            else:
                if job.draft is not None:
                    self._report(BatchStats(1, time.perf_counter() - started, ok=True))
                self._succeed([job])
        if not failed:
            self.last_error = None

    def _fail(self, job: _Job, exc: Exception) -> None:
        if not job.future.done():
            error = (
                exc
                if isinstance(exc, StorageUnavailable)
                else StorageUnavailable(f"{type(exc).__name__}: {exc}")
            )
            job.future.set_exception(error)

    def _succeed(self, jobs: Iterable[_Job]) -> None:
        destinations: set[str] = set()
        for job in jobs:
            if job.draft is not None:
                destinations.update(m.destination for m in job.draft.messages)
            if not job.future.done():
                job.future.set_result(job.result)
        if destinations and self.on_commit is not None:
            self.on_commit(destinations)

    def _report(self, stats: BatchStats) -> None:
        if self.on_batch is not None:
            self.on_batch(stats)

    async def _transaction(self, jobs: list[_Job]) -> None:
        await self._runner(lambda db: self._statements(db, jobs))

    async def _statements(self, db: Connection, jobs: list[_Job]) -> None:
        await db.execute(sql.BEGIN)
        try:
            drafts = [job for job in jobs if job.draft is not None]
            if drafts:
                results = await insert_drafts(
                    db, [job.draft for job in drafts if job.draft is not None], self._clock.now()
                )
                for job, result in zip(drafts, results, strict=True):
                    job.result = result
            acks = [job for job in jobs if job.delivered is not None]
            if acks:
                changed = await mark_delivered(
                    db,
                    self._dialect,
                    [job.delivered for job in acks if job.delivered],
                    self._clock.now(),
                )
                for job in acks:
                    assert job.delivered is not None
                    job.result = job.delivered[0].id in changed
            for job in jobs:
                if job.work is not None:
                    job.result = await job.work(db)
            if self.publish is not None:
                destinations = {m.destination for d in drafts if d.draft for m in d.draft.messages}
                if destinations:
                    await self.publish(db, destinations)
            await db.execute(sql.COMMIT)
        except BaseException:
            # Whatever the ROLLBACK raises (a lost connection, either backend), the error to
            # report is the one that failed the transaction.
            with contextlib.suppress(Exception):
                await db.execute(sql.ROLLBACK)
            raise
