"""The store is the only place that knows a database driver: nothing outside relay/store/
imports sqlite3, aiosqlite or asyncpg (mypy checks that both backends' store satisfies the
`Store` protocol the rest of the relay uses)."""

from __future__ import annotations

import ast
from pathlib import Path

from tests.helpers import REPO

DRIVERS = {"sqlite3", "aiosqlite", "asyncpg"}
STORE = REPO / "relay" / "store"


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
