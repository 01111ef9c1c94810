"""Shared fixtures: a fake Faurya on loopback, the shipped config pointed at it, a relay app."""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
import structlog
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay.app import STORE, WORKERS, create_app
from relay.config import Config
from relay.store import Store
from relay.workers import Workers
from tests.helpers import FakeClock, FakeFaurya, shipped_config


@pytest.fixture(autouse=True)
def _plain_logs() -> None:
    """Logs as JSON lines to stderr, the way the daemon writes them without a TTY."""
    from relay import logs

    logs.configure("debug", "json")
    structlog.contextvars.clear_contextvars()


@pytest.fixture
async def faurya(aiohttp_server: AiohttpServer) -> FakeFaurya:
    fake = FakeFaurya()
    server: TestServer = await aiohttp_server(fake.app())
    fake.url = str(server.make_url("")).rstrip("/")
    return fake


@pytest.fixture
def db_path(tmp_path: Path) -> Path:
    return tmp_path / "relay.db"


@pytest.fixture
def config(faurya: FakeFaurya, db_path: Path) -> Config:
    return shipped_config(faurya.url, db_path)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


MakeRelay = Callable[..., "AsyncIterator[TestClient[web.Request, web.Application]]"]


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
