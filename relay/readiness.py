"""Readiness (/readyz, `relay_ready`): whether this relay can take a webhook now.

Owns: the list of named checks and the answer built from them. A probe costs no write: the
store is ready when its group-commit writer runs and a commit succeeded within the last
`max_age_s`; only otherwise does a probe write run, its success trusted for `max_age_s`, and
one probe at a time shared by every concurrent caller (a flood of /readyz once ran thousands
of writes a second and slowed the webhooks' commits). A failed commit voids both; a failed
probe is not cached, so a relay whose fault cleared is ready at the next call. More
conditions (say, free disk space) join with `add()`.
"""

from __future__ import annotations

import asyncio
import inspect
import time
from collections.abc import Awaitable, Callable

from relay.errors import StorageUnavailable
from relay.store import Store

OK = "ok"
# A check returns "ok" or a short reason (its value in /readyz's "checks").
Check = Callable[[], str | Awaitable[str]]


class Readiness:
    """Named checks, in order; ready when every one says "ok"."""

    def __init__(
        self, *, max_age_s: float = 1.0, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.max_age_s = max_age_s
        self._clock = clock
        self._checks: list[tuple[str, Check]] = []
        self._committed_at = -float("inf")  # last successful commit (clock time)
        self._probed_at = -float("inf")  # last successful probe
        self._probing: asyncio.Task[str] | None = None
        self.probes = 0  # probe writes run (tests, and the reason this module exists)

    def add(self, name: str, check: Check) -> None:
        """One more condition, shown under `name` in /readyz's "checks"."""
        self._checks.append((name, check))

    def committed(self) -> None:
        """The store just committed a batch successfully (proof that it takes writes)."""
        self._committed_at = self._clock()

    def commit_failed(self) -> None:
        """A commit failed: no earlier success vouches for the store any more."""
        self._committed_at = self._probed_at = -float("inf")

    async def check(self) -> tuple[bool, dict[str, str]]:
        checks = {}
        for name, check in self._checks:
            result = check()
            checks[name] = await result if inspect.isawaitable(result) else result
        return all(v == OK for v in checks.values()), checks

    async def store(self, store: Store | None) -> str:
        """The store's check: open, its writer running, and a recent write that succeeded."""
        if store is None:
            return "not open"
        if not store.writer_running:
            return "the group-commit writer is not running"
        now = self._clock()
        recent = max(self._committed_at, self._probed_at)
        if store.last_write_error is None and now - recent <= self.max_age_s:
            return OK
        if self._probing is None:
            self._probing = asyncio.create_task(self._probe(store))
        # Shielded: a caller that goes away must not cancel the probe others wait for.
        return await asyncio.shield(self._probing)

    async def _probe(self, store: Store) -> str:
        try:
            self.probes += 1
            await store.probe()
            result = OK
        except StorageUnavailable as exc:
            result = exc.message
        finally:
            self._probing = None
        if result == OK and store.last_write_error is not None:
            result = f"last commit failed: {store.last_write_error}"
        if result == OK:
            self._probed_at = self._clock()
        return result
