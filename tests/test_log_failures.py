"""A log line that cannot be written never changes an answer: it is dropped and counted.

In-process, the app logs to a real file that refuses writes (/dev/full: ENOSPC on every write)
or is closed; end to end, `relay serve` runs with its stdout and stderr on /dev/full or on a
pipe whose reader is gone (EPIPE). Webhooks still get their 202 and are delivered.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import sqlite3
from collections.abc import Iterator
from pathlib import Path
from typing import IO

import aiohttp
import pytest
import structlog

from relay import logs
from relay.app import METRICS
from tests.helpers import (
    REPO,
    Client,
    FakeFaurya,
    env,
    order_paid,
    process_env,
    relay_command,
    sign_headers,
)

PATH = "/webhooks/polar"
DEV_FULL = Path("/dev/full")
needs_dev_full = pytest.mark.skipif(not DEV_FULL.exists(), reason="no /dev/full (Linux only)")


def dropped_metric(relay: Client) -> float:
    for line in relay.app[METRICS].render().decode().splitlines():
        if line.startswith("relay_log_lines_dropped_total "):
            return float(line.split()[1])
    raise AssertionError("relay_log_lines_dropped_total is not exported")


@pytest.fixture
def full_disk_log() -> Iterator[IO[str]]:
    """The relay's log stream is a file on a full disk (every write: ENOSPC)."""
    stream = DEV_FULL.open("w")
    logs.configure("debug", "json", stream)
    yield stream
    with contextlib.suppress(OSError):  # close flushes what the failed writes left behind
        stream.close()


@pytest.fixture
def closed_log(tmp_path: Path) -> IO[str]:
    """The relay's log stream is a closed file (every write: ValueError)."""
    stream = (tmp_path / "log").open("w")
    stream.close()
    logs.configure("debug", "json", stream)
    return stream


@needs_dev_full
@pytest.mark.parametrize("log_stream", ["full_disk_log", "closed_log"])
async def test_webhooks_get_202_when_no_log_line_can_be_written(
    relay: Client, faurya: FakeFaurya, log_stream: str, request: pytest.FixtureRequest
) -> None:
    """With every log write failing, 30 webhooks are answered 202 and delivered, and each lost
    line is counted in relay_log_lines_dropped_total."""
    request.getfixturevalue(log_stream)
    before = dropped_metric(relay)

    answers = []
    for _ in range(30):
        body = order_paid()
        response = await relay.post(PATH, data=body, headers=sign_headers(body))
        answers.append(response.status)

    assert answers == [202] * 30
    await faurya.wait_for(30)
    assert dropped_metric(relay) >= before + 30  # at least each webhook_accepted line


@needs_dev_full
def test_a_failed_write_drops_only_that_line(tmp_path: Path) -> None:
    """A log call on a failing stream returns normally and counts one dropped line; the next
    line on a working stream is written whole."""
    full = DEV_FULL.open("w")
    logs.configure("info", "json", full)
    before = logs.dropped_lines()
    structlog.get_logger("t").info("webhook_accepted", webhook_id="w1")
    assert logs.dropped_lines() == before + 1
    with contextlib.suppress(OSError):
        full.close()

    path = tmp_path / "log"
    with path.open("w") as good:
        logs.configure("info", "json", good)
        structlog.get_logger("t").info("webhook_accepted", webhook_id="w2")
    assert '"webhook_id":"w2"' in path.read_text()
    assert logs.dropped_lines() == before + 1


# ---------------------------------------------------------------- the real `relay serve`


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


async def await_healthy(url: str, proc: asyncio.subprocess.Process) -> None:
    """Poll /healthz until it answers (the relay's log, which would say so, is unwritable)."""
    async with asyncio.timeout(15), aiohttp.ClientSession() as session:
        while True:
            assert proc.returncode is None, f"relay exited with {proc.returncode}"
            try:
                async with session.get(f"{url}/healthz") as response:
                    if response.status == 200:
                        return
            except aiohttp.ClientConnectionError:
                pass
            await asyncio.sleep(0.05)


def rows(db_path: Path) -> int:
    with sqlite3.connect(db_path) as conn:
        return int(conn.execute("SELECT count(*) FROM inbound_events").fetchone()[0])


@pytest.mark.e2e
@needs_dev_full
@pytest.mark.parametrize("output", ["dev_full", "closed_pipe"])
async def test_relay_serve_answers_202_with_unwritable_stdout_and_stderr(
    output: str, faurya: FakeFaurya, tmp_path: Path
) -> None:
    """`relay serve` whose stdout and stderr are /dev/full, or a pipe nobody reads, answers
    every webhook 202, stores and delivers them all, and stops cleanly on SIGTERM."""
    db_path = tmp_path / "relay.db"
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    if output == "dev_full":
        sink = os.open(DEV_FULL, os.O_WRONLY)
    else:
        read_end, sink = os.pipe()
        os.close(read_end)  # the reader is gone: every write is EPIPE
    try:
        proc = await asyncio.create_subprocess_exec(
            relay_command(),
            "serve",
            "--config",
            str(REPO / "relay.toml"),
            "--db",
            str(db_path),
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            env=process_env(**env(FAURYA_URL=faurya.url)),
            stdin=asyncio.subprocess.DEVNULL,
            stdout=sink,
            stderr=sink,
        )
    finally:
        os.close(sink)  # the relay holds its own copies
    try:
        await await_healthy(url, proc)
        answers = []
        async with aiohttp.ClientSession() as session:
            for _ in range(30):
                body = order_paid()
                async with session.post(
                    f"{url}{PATH}", data=body, headers=sign_headers(body)
                ) as response:
                    answers.append(response.status)

        assert answers == [202] * 30
        assert rows(db_path) == 30
        await faurya.wait_for(30)
        proc.send_signal(signal.SIGTERM)
        async with asyncio.timeout(15):
            assert await proc.wait() == 0
    finally:
        if proc.returncode is None:
            proc.kill()
            await proc.wait()
