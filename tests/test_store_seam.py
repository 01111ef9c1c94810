"""The store is the only place that knows a database driver: nothing outside relay/store/
imports sqlite3, aiosqlite or asyncpg (mypy checks that both backends' store satisfies the
`Store` protocol the rest of the relay uses)."""

from __future__ import annotations

import ast
import asyncio
from pathlib import Path
from typing import Any

import aiosqlite
import pytest

from relay.models import EventStatus, InboundDraft, IngestOutcome, OutboundDraft
from relay.store import BatchStats, open_store
from tests.helpers import REPO, FakeClock

DRIVERS = {"sqlite3", "aiosqlite", "asyncpg"}
STORE = REPO / "relay" / "store"
T0 = 1_700_000_000.0


def driver_imports(path: Path, root: Path = REPO) -> list[str]:
    """`module:line imports name` for each import of a database driver in `path`."""
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"), str(path))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module is not None and node.level == 0:
            names = [node.module]
        else:
            continue
        for name in names:
            if name.split(".")[0] in DRIVERS:
                found.append(f"{path.relative_to(root)}:{node.lineno} imports {name}")
    return found


def test_nothing_outside_the_store_imports_a_database_driver() -> None:
    """No module of relay/ outside relay/store/ imports sqlite3, aiosqlite or asyncpg (at
    module level or inside a function): driver errors become StorageUnavailable in the store."""
    modules = [p for p in (REPO / "relay").rglob("*.py") if STORE not in p.parents]
    assert len(modules) > 20  # the walk found the package
    assert [line for p in sorted(modules) for line in driver_imports(p)] == []


def test_the_check_sees_a_driver_import(tmp_path: Path) -> None:
    """The AST walk reports plain, dotted and from-imports of a driver, so the check above
    can fail."""
    module = tmp_path / "probe.py"
    module.write_text(
        "import json, sqlite3\nfrom asyncpg.exceptions import PostgresError\n"
        "from . import sqlite\ndef f():\n    import aiosqlite.core\n",
        encoding="utf-8",
    )
    assert driver_imports(module, tmp_path) == [
        "probe.py:1 imports sqlite3",
        "probe.py:2 imports asyncpg.exceptions",
        "probe.py:5 imports aiosqlite.core",
    ]


async def test_a_group_commit_is_one_hand_off_to_the_sqlite_thread(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """However many webhooks a batch of the serving SQLite store carries, its transaction
    reaches aiosqlite's thread in one hand-off (relay/store/sqlite_thread.py: what the hot
    path's latency depends on), never a hand-off per statement."""
    hand_offs: list[str] = []
    real = aiosqlite.Connection._execute

    async def counted(self: aiosqlite.Connection, fn: Any, *args: Any, **kwargs: Any) -> Any:
        hand_offs.append(getattr(fn, "__name__", "?"))
        return await real(self, fn, *args, **kwargs)  # type: ignore[no-untyped-call]

    store = await open_store(str(tmp_path / "relay.db"), clock=FakeClock(T0), serve=True)
    batches: list[BatchStats] = []
    store.on_batch = batches.append
    drafts = [
        InboundDraft(
            "polar",
            f"wh_{n}",
            "order.paid",
            T0,
            {},
            b"{}",
            EventStatus.ROUTED,
            messages=(OutboundDraft("r", "faurya", f"k{n}", b"{}"),),
        )
        for n in range(40)
    ]
    try:
        monkeypatch.setattr(aiosqlite.Connection, "_execute", counted)
        results = await asyncio.gather(*(store.enqueue(d) for d in drafts))
        monkeypatch.undo()
    finally:
        await store.close()
    assert [r.outcome for r in results] == [IngestOutcome.ACCEPTED] * 40
    assert [b.size for b in batches] == [40]
    # Reads (the watcher's PRAGMA data_version) are `_execute_fetchall`; a statement run on
    # its own would be `execute` or another `_execute_fetchall` beside no `<lambda>`.
    assert [name for name in hand_offs if name != "_execute_fetchall"] == ["<lambda>"]
