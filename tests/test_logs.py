"""The log set-up (relay/logs.py): the standard library's `logging` comes out as our JSON lines."""

from __future__ import annotations

import json
import logging
from pathlib import Path

from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay import logs


def json_lines(path: Path) -> list[dict[str, object]]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_a_stdlib_logging_record_is_one_json_line(tmp_path: Path) -> None:
    """A `logging` warning (as asyncpg writes them) is one JSON line with its event, level,
    logger name and timestamp, and the level filter applies to it."""
    path = tmp_path / "log"
    with path.open("w") as stream:
        logs.configure("warning", "json", stream)
        logging.getLogger("asyncpg.pool").warning("pool is closing with %d connections", 3)
        logging.getLogger("asyncpg.pool").info("not shown at level warning")

    [line] = json_lines(path)
    assert line["event"] == "pool is closing with 3 connections"
    assert line["level"] == "warning"
    assert line["logger"] == "asyncpg.pool"
    assert "timestamp" in line


async def test_an_aiohttp_server_error_is_one_json_line(
    aiohttp_client: AiohttpClient, tmp_path: Path
) -> None:
    """A handler that raises makes aiohttp log "Error handling request" through `logging`: it
    comes out as one JSON line (traceback inside, under `exception`), not as plain text."""

    async def broken(request: web.Request) -> web.Response:
        raise RuntimeError("boom")

    app = web.Application()
    app.router.add_get("/", broken)
    path = tmp_path / "log"
    with path.open("w") as stream:
        logs.configure("info", "json", stream)
        client = await aiohttp_client(app)
        response = await client.get("/")
        assert response.status == 500
        await client.close()

    lines = json_lines(path)  # every line parses as JSON
    [error] = [line for line in lines if line.get("logger") == "aiohttp.server"]
    assert str(error["event"]).startswith("Error handling request")
    assert error["level"] == "error"
    assert "RuntimeError: boom" in str(error["exception"])


def test_a_field_with_undecodable_bytes_is_still_one_json_line(tmp_path: Path) -> None:
    """A value holding surrogates (aiohttp's form of a header's non-UTF-8 bytes) is written
    escaped, not raised out of the log call by the JSON encoder. (The standard library's
    records take the same encoder; one is not logged here because pytest's own log capture
    cannot hand a surrogate to its xdist workers' parent.)"""
    path = tmp_path / "log"
    with path.open("w") as stream:
        logs.configure("info", "json", stream)
        logs.get_logger("relay.test").info("odd_agent", user_agent="Polar\udcff")

    [line] = json_lines(path)
    assert (line["event"], line["user_agent"]) == ("odd_agent", "Polar\udcff")
