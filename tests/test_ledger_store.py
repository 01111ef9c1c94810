"""The stored Polar snapshot, on both backends: what a reconcile run read replaces the rows of
its window, the coverage grows across overlapping runs, and the ledger reads it back as stored.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from relay.models import PolarKind, PolarRecord, SnapshotCoverage
from relay.store import Store, open_store
from tests.helpers import FakeClock

T0 = 1_700_000_000.0
DAY_S = 86400.0
ALL = (PolarKind.ORDER, PolarKind.REFUND, PolarKind.DISPUTE)


@pytest.fixture(params=["sqlite", "postgres"])
def location(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A SQLite file in tmp_path, or the URL of a fresh PostgreSQL database."""
    if request.param == "sqlite":
        return str(tmp_path / "relay.db")
    return str(request.getfixturevalue("pg_url"))


@pytest.fixture
async def store(location: str) -> AsyncIterator[Store]:
    """A serving store, as the daemon opens it."""
    opened = await open_store(location, clock=FakeClock(T0), serve=True)
    try:
        yield opened
    finally:
        await opened.close()


def record(ident: str, at: float, status: str = "paid", *, fetched_at: float = T0) -> PolarRecord:
    kind = PolarKind.REFUND if ident.startswith("r") else PolarKind.ORDER
    data = f'{{"id": "{ident}", "status": "{status}"}}'.encode()
    return PolarRecord(kind, ident, at, status, data, fetched_at)


async def test_a_run_replaces_its_window_and_overlapping_runs_extend_the_coverage(
    store: Store,
) -> None:
    """The second run's rows replace the first's in its window (a changed status, an object
    gone), rows before its window stay when the windows overlap, and the coverage is their
    union as of the second run."""
    assert await store.snapshot_coverage() is None
    assert await store.polar_snapshot() == []
    first = [record("o1", T0 - 5 * DAY_S), record("o2", T0 - DAY_S), record("r1", T0 - DAY_S)]
    await store.save_polar_records(first)
    await store.finish_polar_snapshot(SnapshotCoverage(T0 - 10 * DAY_S, None, T0, ALL))
    assert await store.polar_snapshot() == first
    later = T0 + DAY_S
    second = [
        record("r1", T0 - DAY_S, "succeeded", fetched_at=later),
        record("o3", T0, fetched_at=later),
    ]
    await store.save_polar_records(second)
    await store.finish_polar_snapshot(SnapshotCoverage(T0 - 2 * DAY_S, None, later, ALL))
    stored = await store.polar_snapshot()
    # o2 (in the second window, not listed again) is gone; o1 (before it) stays.
    assert [(r.polar_id, r.status) for r in stored] == [
        ("o1", "paid"),
        ("r1", "succeeded"),
        ("o3", "paid"),
    ]
    assert await store.snapshot_coverage() == SnapshotCoverage(T0 - 10 * DAY_S, None, later, ALL)
    assert [r.polar_id for r in await store.polar_snapshot(T0 - 2 * DAY_S, T0)] == ["r1"]


async def test_a_window_apart_from_the_stored_one_replaces_it(store: Store) -> None:
    """A run over a window that does not touch the stored coverage (an old month, by hand)
    becomes the coverage alone, and the rows outside it go."""
    await store.save_polar_records([record("o1", T0 - DAY_S)])
    await store.finish_polar_snapshot(SnapshotCoverage(T0 - 2 * DAY_S, None, T0, ALL))
    old = SnapshotCoverage(T0 - 60 * DAY_S, T0 - 30 * DAY_S, T0, (PolarKind.ORDER,))
    await store.save_polar_records([record("o9", T0 - 40 * DAY_S)])
    await store.finish_polar_snapshot(old)
    assert await store.snapshot_coverage() == old
    assert [r.polar_id for r in await store.polar_snapshot()] == ["o9"]


async def test_a_run_inside_the_stored_window_does_not_claim_what_nobody_read(
    store: Store,
) -> None:
    """A run by hand over an older part of the stored window (with --until) keeps the
    coverage ending where the last full run ended: the time since was read by no run."""
    await store.save_polar_records([record("o1", T0 - DAY_S)])
    await store.finish_polar_snapshot(SnapshotCoverage(T0 - 10 * DAY_S, None, T0, ALL))
    later = T0 + DAY_S
    await store.finish_polar_snapshot(SnapshotCoverage(T0 - 5 * DAY_S, T0 - 3 * DAY_S, later, ALL))
    coverage = await store.snapshot_coverage()
    assert coverage is not None
    assert (coverage.since, coverage.end) == (T0 - 10 * DAY_S, T0)
    assert [r.polar_id for r in await store.polar_snapshot()] == ["o1"]
