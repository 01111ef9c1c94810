"""Connections, pragmas, numbered migrations, the one-server lock file, and the permissions
of what the relay creates on disk.

Schema = the numbered files in relay/migrations, applied in order inside one transaction each,
tracked by `PRAGMA user_version`.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sqlite3
from importlib import resources
from pathlib import Path
from typing import IO

import aiosqlite

from relay.errors import StoreLocked

# FULL: the WAL is fsynced at every commit, so a 2xx survives power loss, not just a process
# crash. Group commit keeps this affordable.
PRAGMAS = {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1}  # 2 = FULL

# The database holds raw webhook bodies with customer data: only the relay's user may read it,
# whatever the umask. SQLite creates -wal and -shm with the database file's own mode.
PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def create_private(db_path: str) -> None:
    """Create the database's directory (and missing parents) 0700 and the database file 0600
    when they do not exist yet; existing ones keep their modes (`relay check` warns)."""
    if db_path == ":memory:" or db_path.startswith("file:"):
        return
    missing = []
    directory = Path(db_path).absolute().parent
    while not directory.exists():
        missing.append(directory)
        directory = directory.parent
    for directory in reversed(missing):
        with contextlib.suppress(FileExistsError):
            directory.mkdir(mode=PRIVATE_DIR_MODE)
            os.chmod(directory, PRIVATE_DIR_MODE)  # mkdir's mode is masked by the umask
    fd = _create_file(db_path)
    if fd is not None:
        os.close(fd)


def _create_file(path: str) -> int | None:
    """Create `path` 0600 (an empty file is an empty SQLite database); None if it existed,
    else its open descriptor, for the caller to use or close."""
    try:
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, PRIVATE_FILE_MODE)
    except FileExistsError:
        return None
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)  # os.open's mode is masked by the umask
    except OSError:
        os.close(fd)
        raise
    return fd


def migrations() -> list[tuple[int, str]]:
    """The numbered migration scripts, in order: (version, sql)."""
    found = []
    for entry in resources.files("relay.migrations").iterdir():
        name = entry.name
        if name.endswith(".sql") and name[:4].isdigit():
            found.append((int(name[:4]), entry.read_text(encoding="utf-8")))
    return sorted(found)


async def connect(path: str, busy_timeout_ms: int) -> aiosqlite.Connection:
    create_private(path)
    # isolation_level=None: we issue BEGIN/COMMIT ourselves; single statements autocommit.
    db = await aiosqlite.connect(path, isolation_level=None)
    try:
        await db.execute(f"PRAGMA busy_timeout = {int(busy_timeout_ms)}")
        await db.execute("PRAGMA journal_mode = WAL")
        await db.execute("PRAGMA synchronous = FULL")
        await db.execute("PRAGMA foreign_keys = ON")
    except BaseException:
        await db.close()
        raise
    return db


async def migrate(db: aiosqlite.Connection) -> int:
    rows = await db.execute_fetchall("PRAGMA user_version")
    current = int(next(iter(rows))[0])
    for version, sql in migrations():
        if version <= current:
            continue
        await db.execute("BEGIN IMMEDIATE")
        try:
            # executescript would COMMIT first; run statement by statement inside our txn.
            for statement in split_sql(sql):
                await db.execute(statement)
            await db.execute(f"PRAGMA user_version = {version}")
            await db.execute("COMMIT")
        except BaseException:
            await db.execute("ROLLBACK")
            raise
        current = version
    return current


def split_sql(script: str) -> list[str]:
    statements, buffer = [], ""
    for line in script.splitlines(keepends=True):
        if line.lstrip().startswith("--"):
            continue
        buffer += line
        if sqlite3.complete_statement(buffer):
            statements.append(buffer.strip())
            buffer = ""
    if buffer.strip():
        statements.append(buffer.strip())
    return statements


class ServeLock:
    """An flock on `<db>.lock`: one serving relay per database file. Because of it, every
    `inflight` row found at start-up belongs to a dead process and can go back to pending."""

    def __init__(self, db_path: str) -> None:
        self.path = f"{db_path}.lock"
        self.file: IO[str] | None = None

    def acquire(self) -> None:
        fd = _create_file(self.path)
        if fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_APPEND)
        handle = os.fdopen(fd, "a+")  # held for the life of the process
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.close()
            raise StoreLocked(f"another relay is already serving {self.path[:-5]}") from None
        self.file = handle

    def release(self) -> None:
        if self.file is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self.file.fileno(), fcntl.LOCK_UN)
            self.file.close()
            self.file = None
