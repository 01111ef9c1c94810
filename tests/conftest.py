"""Shared fixtures: a fake Faurya on loopback, the shipped config pointed at it, a relay app."""

from __future__ import annotations

import asyncio
import compileall
import dataclasses
import os
import shutil
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any, Protocol, TypeVar

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay.app import STORE, WORKERS, create_admin_app, create_app
from relay.config import Config, Secret
from relay.store import Store, open_store
from relay.workers import Workers
from tests.admin_helpers import ADMIN_TOKEN, READ_TOKEN, AdminRelay
from tests.helpers import (
    REPO,
    Client,
    FakeClock,
    FakeFaurya,
    LogList,
    RelayProcesses,
    StartRelay,
    refusing,
    shipped_config,
)
from tests.polar_fake import FakePolar, serve, with_polar_api
from tests.polar_world import FauryaBook


def pytest_configure(config: pytest.Config) -> None:
    """Bytecode for relay/ and tests/, even where PYTHONDONTWRITEBYTECODE is set (this
    machine, the Dockerfile's builder): the suite starts ~300 Python processes (`relay ...`,
    delivery children) that would each compile relay/ from source (~0.1 s of CPU each), and
    each xdist worker would rewrite and compile every test module (~2.5 s). The files go to
    __pycache__ (ignored by git); Python checks them against the source's mtime."""
    sys.dont_write_bytecode = False  # this process's test modules (pytest's rewritten ones)
    if not hasattr(config, "workerinput"):  # once, in the controller, before the workers
        compileall.compile_dir(REPO / "relay", quiet=1)


@pytest.fixture(autouse=True)
def _plain_logs() -> None:
    """Logs as JSON lines to stderr, the way the daemon writes them without a TTY."""
    from relay import logs

    logs.configure("debug", "json")
    structlog.contextvars.clear_contextvars()


@pytest.fixture
def log_secrets() -> tuple[str, ...]:
    """Values no log event of a test may hold: a module whose tests handle secrets overrides
    this fixture with them, and `logs` checks every event against them."""
    return ()


@pytest.fixture
def logs(_plain_logs: None, log_secrets: tuple[str, ...]) -> Iterator[LogList]:
    """Every log event of the test (app shutdown included, when `logs` is set up before the
    app: a module makes it autouse with `pytestmark = pytest.mark.usefixtures("logs")`); none
    may hold a value of `log_secrets`."""
    with structlog.testing.capture_logs() as captured:
        yield captured
    leaks = [entry for entry in captured if any(s in repr(entry) for s in log_secrets)]
    assert leaks == []


@pytest.fixture
def aiohttp_client(aiohttp_server: AiohttpServer, aiohttp_client: AiohttpClient) -> AiohttpClient:
    """pytest-aiohttp's `aiohttp_client`, set up after `aiohttp_server` so that it is torn down
    first: the apps under test stop before the fake servers they call (Faurya, Polar). In the
    other order, a delivery in flight at teardown waited out its 10 s timeout against a fake
    Faurya that was already gone."""
    return aiohttp_client


@pytest.fixture
async def faurya(aiohttp_server: AiohttpServer) -> FakeFaurya:
    fake = FakeFaurya()
    server: TestServer = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
async def polar(aiohttp_server: AiohttpServer) -> FakePolar:
    """A fake Polar API on loopback (tests/polar_fake.py)."""
    return await serve(aiohttp_server)


@pytest.fixture
async def book(aiohttp_server: AiohttpServer) -> FauryaBook:
    """A fake Faurya that keeps the books (tests/polar_world.py), on loopback."""
    book = FauryaBook()
    server = await aiohttp_server(book.app())
    book.url = str(server.make_url("")).rstrip("/")
    return book


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    """Where the test's SQLite database goes; nothing is there yet."""
    return tmp_path / "relay.db"


@pytest.fixture(scope="session")
def migrated_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A database the relay created and migrated, once per worker: opening a new file runs
    every migration, one synced transaction each (~15 ms), which hundreds of app tests would
    otherwise repeat. Creating and migrating a file is tested where it is the subject
    (test_store.py, test_store_contract.py, test_hardening.py)."""
    path = tmp_path_factory.mktemp("migrated") / "relay.db"

    async def create() -> None:
        await (await open_store(str(path))).close()

    asyncio.run(create())
    return path


@pytest.fixture
def migrated_db_path(db_path: Path, migrated_template: Path) -> Path:
    """`db_path` holding a copy of `migrated_template`, private as the relay makes it."""
    return copy_migrated(migrated_template, db_path)


def copy_migrated(template: Path, path: Path) -> Path:
    """Copy a closed, migrated database (`migrated_template`) to `path`, mode 0600."""
    shutil.copyfile(template, path)
    os.chmod(path, 0o600)  # the mode the relay gives a database it creates
    return path


@pytest.fixture
def config(faurya: FakeFaurya, migrated_db_path: Path) -> Config:
    """The shipped relay.toml pointed at the fake Faurya and at a migrated database, delivering
    in-process: an app test would otherwise start a delivery child (a Python process, ~0.25 s
    of CPU) for behaviour that does not depend on where the HTTP call is made. The child is
    tested where it is the subject: test_delivery.py (which asks for `shipped_delivery_config`),
    test_delivery_process.py, and every test that runs `relay serve` on the shipped relay.toml."""
    return in_process_delivery(shipped_config(faurya.url, migrated_db_path))


@pytest.fixture
def shipped_delivery_config(faurya: FakeFaurya, migrated_db_path: Path) -> Config:
    """The shipped relay.toml as it is, its delivery child included, on a migrated database."""
    return shipped_config(faurya.url, migrated_db_path)


def in_process_delivery(config: Config) -> Config:
    """`config` with its HTTP calls made by the relay process itself (no delivery child)."""
    return dataclasses.replace(
        config, server=dataclasses.replace(config.server, delivery_processes=0)
    )


@pytest.fixture
def clock() -> FakeClock:
    """A fake clock on a whole second, so HTTP dates (whole seconds) convert exactly and the
    times tests add up come out exact."""
    return FakeClock(float(int(time.time())))


@pytest.fixture
def start(aiohttp_client: AiohttpClient, config: Config, clock: FakeClock) -> StartRelay:
    """Starts the relay app (`config` unless given another) with its store and workers; the
    aiohttp client fixture stops it at teardown."""

    async def start_(
        config_: Config | None = None, *, real_clock: bool = False, poll_interval_s: float = 30
    ) -> Client:
        app = create_app(
            config_ or config,
            clock=None if real_clock else clock,
            poll_interval_s=poll_interval_s,
        )
        return await aiohttp_client(app)

    return start_


@pytest.fixture
async def relay_processes(db_path: Path) -> AsyncIterator[RelayProcesses]:
    """Makes `relay serve` subprocesses on the test database; teardown kills and reaps them.
    A fixture built on it that also takes `faurya` must name `faurya` first, so the processes
    stop before the fake Faurya does."""
    made = RelayProcesses(db_path)
    try:
        yield made
    finally:
        await made.close()


MakeRelay = Callable[..., "AsyncIterator[TestClient[web.Request, web.Application]]"]
MakeAdmin = Callable[..., Awaitable[Client]]
R = TypeVar("R", bound=AdminRelay)


class MakeAdminRelay(Protocol):
    """The `make_admin_relay` fixture: `await make_admin_relay(Console, token=Secret(...))`."""

    async def __call__(
        self, kind: type[R], db: str | None = None, polar: FakePolar | None = None, **admin: Any
    ) -> R: ...


@pytest.fixture
def make_admin_relay(
    aiohttp_client: AiohttpClient, config: Config, faurya: FakeFaurya
) -> MakeAdminRelay:
    """Makes a relay in process (on database `db` if given, reading `polar`'s API if given)
    and its admin listener (console, API, /metrics) with these `admin` settings, as a `kind`
    (an AdminRelay); Faurya answers 422 to the Polar order ids in its `refused`."""

    async def make(
        kind: type[R], db: str | None = None, polar: FakePolar | None = None, **admin: Any
    ) -> R:
        relay_config = dataclasses.replace(config, admin=dataclasses.replace(config.admin, **admin))
        if polar is not None:
            relay_config = with_polar_api(relay_config, polar)
        main = await aiohttp_client(create_app(relay_config, db_path=db, poll_interval_s=0.05))
        relay = kind(main, await aiohttp_client(create_admin_app(main.app)), faurya)
        faurya.script = refusing(relay.refused)
        return relay

    return make


@pytest.fixture
def make_admin(make_admin_relay: MakeAdminRelay) -> MakeAdmin:
    """Makes a relay's admin listener (console, API, /metrics) with these `admin` settings,
    e.g. `await make_admin(token=Secret(...), read_token=Secret(...))`."""

    async def make(**admin: Any) -> Client:
        return (await make_admin_relay(AdminRelay, **admin)).admin

    return make


@pytest.fixture
async def admin(make_admin: MakeAdmin) -> Client:
    """A loopback admin listener with both tokens: everything needs a token or a session."""
    return await make_admin(token=Secret(ADMIN_TOKEN), read_token=Secret(READ_TOKEN))


@pytest.fixture
async def relay(
    aiohttp_client: AiohttpClient, config: Config
) -> TestClient[web.Request, web.Application]:
    """The relay app on a real loopback port, with its real store and workers running."""
    app = create_app(config, poll_interval_s=0.05)
    return await aiohttp_client(app)


def store_of(client: TestClient[web.Request, web.Application]) -> Store:
    return client.app[STORE]


def workers_of(client: TestClient[web.Request, web.Application]) -> Workers:
    return client.app[WORKERS]


# The PostgreSQL fixtures (pg_server, pg_url: a fresh database per test), for every module.
pytest_plugins = ["tests.pg"]
