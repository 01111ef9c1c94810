"""PostgreSQL for the tests: a server, and a fresh database for every test that asks for one.

The server is the one named by RELAY_TEST_PG_URL (CI's .ci/run starts a throwaway cluster and
sets it), else a throwaway cluster this module starts for the session from the local
PostgreSQL binaries (initdb into a temp dir, as the postgres user when we are root: PostgreSQL
refuses to run as root), stopped and deleted at the end. With neither, the PostgreSQL tests
skip and say why. `pg_url` gives each test its own database (CREATE DATABASE on the server,
dropped WITH (FORCE) at teardown), so tests never see each other's rows.

Under pytest-xdist a session is a worker's: with RELAY_TEST_PG_URL the workers share that
server (each test still has a database of its own); without it each worker that runs a
PostgreSQL test starts its own throwaway cluster (~2 s, on a port of its own), so no worker
waits for another's or stops one another is using.
"""

from __future__ import annotations

import asyncio
import contextlib
import glob
import os
import shutil
import socket
import subprocess
import tempfile
import uuid
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import pytest

from relay.store import open_store
from tests.helpers import RelayProcess

PG_URL_ENV = "RELAY_TEST_PG_URL"
START_TIMEOUT_S = 30


# ---------------------------------------------------------------- the server


@dataclass(frozen=True)
class Cluster:
    """A throwaway cluster started by this module."""

    url: str
    bindir: Path
    base: Path  # the temp dir: data/, the socket, the server log
    user: tuple[int, int] | None  # (uid, gid) to run the binaries as; None: as ourselves

    def run(self, *args: str) -> subprocess.CompletedProcess[bytes]:
        return _run_as(self.user, self.base, [str(self.bindir / args[0]), *args[1:]])

    def stop(self) -> None:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.run("pg_ctl", "-D", str(self.base / "data"), "-m", "immediate", "-w", "stop")
        shutil.rmtree(self.base, ignore_errors=True)


def _bindir() -> Path | None:
    """The newest installed PostgreSQL's binaries (Debian's layout first, then PATH)."""
    found = sorted(
        glob.glob("/usr/lib/postgresql/*/bin/initdb"),
        key=lambda p: int(p.split("/")[4]) if p.split("/")[4].isdigit() else 0,
    )
    if found:
        return Path(found[-1]).parent
    initdb = shutil.which("initdb")
    return Path(initdb).parent if initdb else None


def _run_as(
    user: tuple[int, int] | None, cwd: Path, args: list[str]
) -> subprocess.CompletedProcess[bytes]:
    # The server's output goes to its log file (pg_ctl -l), so these pipes close at once.
    ids: dict[str, Any] = {} if user is None else {"user": user[0], "group": user[1]}
    if user is not None:
        ids["extra_groups"] = []
    return subprocess.run(
        args,
        cwd=cwd,
        capture_output=True,
        timeout=START_TIMEOUT_S,
        check=False,
        **ids,
    )


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def start_cluster() -> Cluster:
    """initdb + pg_ctl start on a free loopback port. Raises RuntimeError saying why not."""
    bindir = _bindir()
    if bindir is None:
        raise RuntimeError("no PostgreSQL binaries (apt-get install postgresql)")
    user = None
    if os.geteuid() == 0:
        import pwd

        try:
            entry = pwd.getpwnam("postgres")
        except KeyError:
            raise RuntimeError("running as root and there is no postgres user") from None
        user = (entry.pw_uid, entry.pw_gid)
    base = Path(tempfile.mkdtemp(prefix="relay-test-pg-"))
    if user is not None:
        os.chown(base, *user)
    port = free_port()
    cluster = Cluster(f"postgresql://postgres@127.0.0.1:{port}/postgres", bindir, base, user)
    data = str(base / "data")
    # fsync off: a throwaway cluster; a process crash (what the tests do) loses nothing.
    server = f"-p {port} -k {base} -c listen_addresses=127.0.0.1 -c fsync=off"
    steps = [
        ["initdb", "-D", data, "-A", "trust", "-U", "postgres", "--no-sync", "-E", "UTF8"],
        ["pg_ctl", "-D", data, "-l", str(base / "log"), "-w", "-t", "30", "-o", server, "start"],
    ]
    for step in steps:
        try:
            done = cluster.run(*step)
        except (OSError, subprocess.SubprocessError) as exc:
            cluster.stop()
            raise RuntimeError(f"{step[0]}: {exc}") from None
        if done.returncode != 0:
            log = (base / "log").read_text() if (base / "log").exists() else ""
            cluster.stop()
            output = (done.stdout + done.stderr).decode(errors="replace") + log
            raise RuntimeError(f"{step[0]} failed: {output.strip()[-500:]}")
    return cluster


@pytest.fixture(scope="session")
def pg_server() -> Iterator[str]:
    """The URL of a PostgreSQL server's `postgres` database (for CREATE DATABASE)."""
    url = os.environ.get(PG_URL_ENV)
    if url:
        yield url
        return
    try:
        cluster = start_cluster()
    except RuntimeError as exc:
        pytest.skip(f"PostgreSQL tests: {PG_URL_ENV} is not set and no local server: {exc}")
    try:
        yield cluster.url
    finally:
        cluster.stop()


# ---------------------------------------------------------------- a database per test


def with_database(url: str, name: str) -> str:
    return urlsplit(url)._replace(path=f"/{name}").geturl()


async def create_database(server_url: str, template: str | None = None) -> str:
    """A new database on the server, empty or a copy of the database at URL `template`;
    its URL."""
    name = f"relay_test_{uuid.uuid4().hex}"
    admin = await asyncpg.connect(server_url)
    try:
        # FILE_COPY (PostgreSQL 15+; the only way before) copies the small template's files:
        # ~15 ms a database against ~70 ms for the default WAL_LOG, which logs every block.
        strategy = " STRATEGY FILE_COPY" if admin.get_server_version().major >= 15 else ""
        source = f' TEMPLATE "{urlsplit(template).path.lstrip("/")}"' if template else ""
        await admin.execute(f'CREATE DATABASE "{name}"{source}{strategy}')
    finally:
        await admin.close()
    return with_database(server_url, name)


async def drop_database(server_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    admin = await asyncpg.connect(server_url)
    try:
        await admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await admin.close()


@pytest.fixture
async def pg_url(pg_server: str) -> AsyncIterator[str]:
    """A fresh, empty database for this test alone (dropped at teardown)."""
    url = await create_database(pg_server)
    try:
        yield url
    finally:
        await drop_database(pg_server, url)


@pytest.fixture(scope="session")
def pg_migrated_template(pg_server: str) -> Iterator[str]:
    """The URL of a database the relay created and migrated, once per worker, to copy: a
    store opened on a new database runs every migration (~0.15 s here); a copy of this one
    (CREATE DATABASE ... TEMPLATE) takes ~0.05 s and migrates nothing."""

    async def create() -> str:
        url = await create_database(pg_server)
        await (await open_store(url)).close()
        return url

    url = asyncio.run(create())
    try:
        yield url
    finally:
        asyncio.run(drop_database(pg_server, url))


@pytest.fixture
async def migrated_pg_url(pg_server: str, pg_migrated_template: str) -> AsyncIterator[str]:
    """A database for this test alone, at the latest schema and without rows (dropped at
    teardown)."""
    url = await create_database(pg_server, template=pg_migrated_template)
    try:
        yield url
    finally:
        await drop_database(pg_server, url)


# ---------------------------------------------------------------- reading and running


async def pg_rows(url: str, sql: str, *args: Any) -> list[tuple[Any, ...]]:
    """Read the database through a connection of its own: what it shows is committed."""
    conn = await asyncpg.connect(url)
    try:
        return [tuple(r) for r in await conn.fetch(sql, *args)]
    finally:
        await conn.close()


def relay_on(url: str, config: Path, env: dict[str, str]) -> RelayProcess:
    """`relay serve --db <postgresql:// URL>` (RelayProcess takes a SQLite path)."""
    relay = RelayProcess(config, Path("unused.db"), env)
    relay.args[relay.args.index("--db") + 1] = url
    return relay


def relay_configured(config: Path, env: dict[str, str]) -> RelayProcess:
    """`relay serve` on the database its config names (storage.url), without --db."""
    relay = RelayProcess(config, Path("unused.db"), env)
    at = relay.args.index("--db")
    del relay.args[at : at + 2]
    return relay
