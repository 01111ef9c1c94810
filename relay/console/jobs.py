"""Bulk replay jobs: "replay every dead message this filter matches", run in the background.

Owns the job runner of one relay process. A job is a row in the store (total, done, status,
keyset position, owner, heartbeat), so every relay's console shows its progress and can cancel
it; the relay whose console started it runs it, in batches of `batch` messages by ascending id
(keyset: each batch is one short transaction, so ingest never waits long), and covers
everything the filter matched when it started (ids up to the largest at that time), not a page.
A relay that stops leaves its job "running" with an old heartbeat: it shows as interrupted, and
`restart` continues it from its last batch on whichever relay restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import socket
from collections.abc import Callable
from urllib.parse import parse_qsl, urlencode

from relay.console.service import Caller, ConsoleError, Job, ListFilters, open_store
from relay.logs import get_logger
from relay.models import Clock, MessageFilter, MessageStatus
from relay.store import Store

log = get_logger("relay.console.jobs")

BATCH = 500
KIND_REPLAY_DEAD = "replay_dead"


def process_owner() -> str:
    """This relay process, as a job's owner: host, pid and a random part (pids are reused)."""
    return f"{socket.gethostname()}:{os.getpid()}:{secrets.token_hex(3)}"


class Jobs:
    """Runs this relay's bulk jobs; `close` stops them (they show as interrupted)."""

    def __init__(
        self,
        store: Callable[[], Store | None],
        clock: Clock,
        *,
        owner: str | None = None,
        batch: int = BATCH,
    ) -> None:
        self._store = store
        self._clock = clock
        self.owner = owner or process_owner()
        self._batch = batch
        self._tasks: dict[int, asyncio.Task[None]] = {}

    @property
    def store(self) -> Store:
        return open_store(self._store)

    async def start(self, caller: Caller, filters: ListFilters) -> Job:
        store = self.store
        total = await store.console_count_dead(filters)
        upper_id = await store.console_max_id()
        query = urlencode(filters.to_query())
        job_id = await store.create_job(
            KIND_REPLAY_DEAD, query, caller.actor, total, upper_id, self.owner
        )
        self._spawn(job_id, filters, 0, upper_id)
        return await self._job(job_id)

    async def restart(self, job: Job) -> Job:
        store = self.store
        taken = await store.set_job_status(
            job.id,
            "running",
            from_statuses=("running", "interrupted", "cancelled", "failed"),
            owner=self.owner,
        )
        position = await store.job_position(job.id)
        if not taken or position is None:
            raise ConsoleError(f"job {job.id} could not be restarted", 409)
        filters = ListFilters.from_query(dict(parse_qsl(job.filter_query)), self._clock.now())
        self._spawn(job.id, filters, position[0], position[1])
        return await self._job(job.id)

    async def _job(self, job_id: int) -> Job:
        job = await self.store.console_job(job_id)
        assert job is not None  # just written
        return job

    def _spawn(self, job_id: int, filters: ListFilters, after_id: int, upper_id: int) -> None:
        task = asyncio.create_task(
            self._run(job_id, filters, after_id, upper_id), name=f"console-job-{job_id}"
        )
        self._tasks[job_id] = task
        task.add_done_callback(lambda _: self._tasks.pop(job_id, None))

    async def _run(self, job_id: int, filters: ListFilters, after_id: int, upper_id: int) -> None:
        log.info("console_job_started", job_id=job_id, after_id=after_id, upper_id=upper_id)
        done = 0
        try:
            while True:
                store = self.store
                ids = await store.console_dead_batch(filters, after_id, upper_id, self._batch)
                if not ids:
                    await store.set_job_status(job_id, "done", from_statuses=("running",))
                    log.info("console_job_finished", job_id=job_id, replayed=done)
                    return
                # Still dead (the filter says so; replay checks again in its own statement).
                count = await store.replay(
                    MessageFilter(ids=tuple(ids), statuses=(MessageStatus.DEAD,))
                )
                done += count
                after_id = ids[-1]
                status = await store.job_progress(job_id, count, after_id, self.owner)
                if status != "running":
                    log.info("console_job_stopped", job_id=job_id, status=status, replayed=done)
                    return
                await asyncio.sleep(0)  # let webhooks in between batches
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # a failed job is shown as failed; the relay goes on
            log.error("console_job_failed", job_id=job_id, error=f"{type(exc).__name__}: {exc}")
            with contextlib.suppress(Exception):
                await self.store.set_job_status(
                    job_id, "failed", from_statuses=("running",), error=str(exc)[:500]
                )

    async def wait(self, job_id: int) -> None:
        """Until this process's run of the job ends (tests)."""
        task = self._tasks.get(job_id)
        if task is not None:
            with contextlib.suppress(asyncio.CancelledError):
                await task

    async def close(self) -> None:
        """Stop running jobs; they stay as they are in the store and show as interrupted."""
        tasks = list(self._tasks.values())
        for task in tasks:
            task.cancel()
        for task in tasks:
            with contextlib.suppress(asyncio.CancelledError, Exception):
                await task
        for job_id in list(self._tasks):
            self._tasks.pop(job_id, None)
        store = self._store()
        if store is not None:
            for task in tasks:
                job_id = int(task.get_name().rsplit("-", 1)[1])
                with contextlib.suppress(Exception):
                    await store.set_job_status(job_id, "interrupted", from_statuses=("running",))
