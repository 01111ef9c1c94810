"""The stored snapshot of Polar's orders, refunds and lost disputes (the revenue ledger's view
of Polar). Mixed into `Store`; written by reconciliation, read by the ledger.

Writes go through the single writer in chunks of `SNAPSHOT_CHUNK` rows, each its own job, so a
30-day snapshot never holds a webhook's commit for long. The coverage (which window and kinds
the rows stand for) is written last, in `relay_meta`: until a run has finished, the ledger
keeps reading the previous run's coverage.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from relay.models import PolarKind, PolarRecord, SnapshotCoverage
from relay.store.writer import Db, Writer

SNAPSHOT_CHUNK = 500
_COVERAGE_KEY = "polar_snapshot"


class SnapshotQueries:
    """Needs, from the class it is mixed into, the members declared here."""

    _writer: Writer

    async def _fetch(self, sql: str, params: Sequence[Any] = ()) -> list[Any]:
        raise NotImplementedError

    async def save_polar_snapshot(
        self, records: Sequence[PolarRecord], coverage: SnapshotCoverage
    ) -> None:
        """Store what one reconciliation run read: its rows replace those of the same kinds
        created in its window, and the coverage becomes the union of the old one and this
        window when they overlap (else this window alone). Rows outside the coverage go."""
        for start in range(0, len(records), SNAPSHOT_CHUNK):
            await self._writer.run(_upserter(records[start : start + SNAPSHOT_CHUNK]))
        previous = await self.snapshot_coverage()
        merged = coverage
        if (
            previous is not None
            and previous.since <= coverage.end
            and coverage.since <= (previous.end)
        ):
            merged = SnapshotCoverage(
                since=min(previous.since, coverage.since),
                until=None,
                fetched_at=coverage.fetched_at,
                kinds=coverage.kinds,
            )
        await self._writer.run(lambda db: _finish(db, coverage, merged))

    async def snapshot_coverage(self) -> SnapshotCoverage | None:
        rows = await self._fetch("SELECT value FROM relay_meta WHERE key = ?", (_COVERAGE_KEY,))
        if not rows:
            return None
        try:
            raw = json.loads(rows[0][0])
            return SnapshotCoverage(
                since=float(raw["since"]),
                until=None if raw["until"] is None else float(raw["until"]),
                fetched_at=float(raw["fetched_at"]),
                kinds=tuple(PolarKind(k) for k in raw["kinds"]),
            )
        except (ValueError, KeyError, TypeError):
            return None  # written by a newer relay, say: as if no run had stored anything

    async def polar_snapshot(
        self, since: float | None = None, until: float | None = None
    ) -> list[PolarRecord]:
        """The stored Polar objects created in [since, until), oldest first."""
        clauses, params = ["1 = 1"], []
        if since is not None:
            clauses.append("created_at >= ?")
            params.append(since)
        if until is not None:
            clauses.append("created_at < ?")
            params.append(until)
        rows = await self._fetch(
            "SELECT kind, polar_id, created_at, status, data, fetched_at FROM polar_snapshot "
            f"WHERE {' AND '.join(clauses)} ORDER BY created_at, kind, polar_id",
            params,
        )
        return [
            PolarRecord(PolarKind(r[0]), r[1], float(r[2]), r[3], bytes(r[4]), float(r[5]))
            for r in rows
        ]


def _upserter(records: Sequence[PolarRecord]) -> Callable[[Db], Awaitable[None]]:
    async def work(db: Db) -> None:
        await _upsert(db, records)

    return work


async def _upsert(db: Db, records: Sequence[PolarRecord]) -> None:
    for r in records:
        cursor = await db.execute(
            "INSERT INTO polar_snapshot (kind, polar_id, created_at, status, data, fetched_at) "
            "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (kind, polar_id) DO UPDATE SET "
            "created_at = excluded.created_at, status = excluded.status, "
            "data = excluded.data, fetched_at = excluded.fetched_at",
            (r.kind.value, r.polar_id, r.created_at, r.status, r.data, r.fetched_at),
        )
        await cursor.close()


async def _finish(db: Db, run: SnapshotCoverage, merged: SnapshotCoverage) -> None:
    kinds = [k.value for k in run.kinds]
    marks = ",".join("?" * len(kinds))
    # What this run's listings no longer show (rare: Polar does not delete orders) goes.
    if kinds:
        cursor = await db.execute(
            f"DELETE FROM polar_snapshot WHERE kind IN ({marks}) AND created_at >= ? "
            "AND created_at < ? AND fetched_at < ?",
            (*kinds, run.since, run.end, run.fetched_at),
        )
        await cursor.close()
    cursor = await db.execute(
        "DELETE FROM polar_snapshot WHERE created_at < ? OR created_at >= ?",
        (merged.since, merged.end),
    )
    await cursor.close()
    value = json.dumps(
        {
            "since": merged.since,
            "until": merged.until,
            "fetched_at": merged.fetched_at,
            "kinds": [k.value for k in merged.kinds],
        }
    )
    cursor = await db.execute(
        "INSERT INTO relay_meta (key, value) VALUES (?, ?) "
        "ON CONFLICT (key) DO UPDATE SET value = excluded.value",
        (_COVERAGE_KEY, value),
    )
    await cursor.close()
