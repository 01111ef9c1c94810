"""The stored snapshot of Polar's orders, refunds and lost disputes (the revenue ledger's view
of Polar). Half of `Outbox` (relay/store/outbox.py), beside `AdminQueries`: written by
reconciliation, read by the ledger. Its statements are in relay/store/sql.py.

A run writes each page of objects as it reads it (`save_polar_records`, through the single
writer in chunks of `SNAPSHOT_CHUNK` rows, each its own job, so a 30-day snapshot never holds a
webhook's commit for long nor sits in memory whole), then its coverage (`finish_polar_snapshot`:
which window, kinds and fields the rows stand for, in `relay_meta`). Until a run has finished,
the ledger reads the previous run's coverage.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import replace

from relay.models import PolarKind, PolarRecord, SnapshotCoverage
from relay.store import sql
from relay.store.connection import Connection
from relay.store.queries import Queries

# Rows per write job: each shares a group commit with webhooks, which must not wait long.
SNAPSHOT_CHUNK = 200
_COVERAGE_KEY = "polar_snapshot"


class SnapshotQueries(Queries):
    """The Polar snapshot's queries; `Outbox` provides what `Queries` declares."""

    async def save_polar_records(self, records: Sequence[PolarRecord]) -> None:
        for start in range(0, len(records), SNAPSHOT_CHUNK):
            await self._writer.run(_upserter(records[start : start + SNAPSHOT_CHUNK]))

    async def finish_polar_snapshot(self, coverage: SnapshotCoverage) -> None:
        previous = await self.snapshot_coverage()
        merged = coverage
        if (
            previous is not None
            and previous.since <= coverage.end
            and coverage.since <= previous.end
        ):
            # A run with an `until` (by hand, over an older part) read nothing after it: the
            # union ends where the later of the two ended, not at this run's fetched_at.
            until = None if coverage.until is None else max(previous.end, coverage.end)
            merged = replace(coverage, since=min(previous.since, coverage.since), until=until)
        await self._writer.run(lambda db: _finish(db, coverage, merged))

    async def snapshot_coverage(self) -> SnapshotCoverage | None:
        found = await self._fetch(sql.SELECT_META, (_COVERAGE_KEY,))
        if not found:
            return None
        try:
            raw = json.loads(found[0][0])
            return SnapshotCoverage(
                since=float(raw["since"]),
                until=None if raw["until"] is None else float(raw["until"]),
                fetched_at=float(raw["fetched_at"]),
                kinds=tuple(PolarKind(k) for k in raw["kinds"]),
                fields=tuple(str(f) for f in raw.get("fields", ())),
            )
        except (ValueError, KeyError, TypeError):
            return None  # written by a newer relay, say: as if no run had stored anything

    async def polar_snapshot(
        self, since: float | None = None, until: float | None = None
    ) -> list[PolarRecord]:
        found = await self._fetch(
            sql.SELECT_POLAR_RECORDS,
            (-1e300 if since is None else since, 1e300 if until is None else until),
        )
        return [
            PolarRecord(PolarKind(r[0]), r[1], float(r[2]), r[3], bytes(r[4]), float(r[5]))
            for r in found
        ]


def _upserter(records: Sequence[PolarRecord]) -> Callable[[Connection], Awaitable[None]]:
    async def work(db: Connection) -> None:
        for r in records:
            cursor = await db.execute(
                sql.UPSERT_POLAR_RECORD,
                (r.kind.value, r.polar_id, r.created_at, r.status, r.data, r.fetched_at),
            )
            await cursor.close()

    return work


async def _finish(db: Connection, run: SnapshotCoverage, merged: SnapshotCoverage) -> None:
    kinds = [k.value for k in run.kinds]
    # What this run's listings no longer show in its window goes (rare: Polar keeps orders).
    if kinds:
        cursor = await db.execute(
            sql.delete_polar_unlisted(len(kinds)), (*kinds, run.since, run.end, run.fetched_at)
        )
        await cursor.close()
    cursor = await db.execute(sql.DELETE_POLAR_OUTSIDE, (merged.since, merged.end))
    await cursor.close()
    value = json.dumps(
        {
            "since": merged.since,
            "until": merged.until,
            "fetched_at": merged.fetched_at,
            "kinds": [k.value for k in merged.kinds],
            "fields": list(merged.fields),
        }
    )
    cursor = await db.execute(sql.UPSERT_META, (_COVERAGE_KEY, value))
    await cursor.close()
