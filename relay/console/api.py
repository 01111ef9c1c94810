"""The console's JSON API under /api/v1 on the admin listener (docs/console.md, "API").

Owns: the routes, reading their parameters, and answering JSON; every read and action is a
`ConsoleService` call, the same the pages make. Errors are `{"error": "..."}` with a 4xx (503
when the store cannot answer). Who may call what is decided before a handler runs
(relay/console/auth.py): a handler finds its `Caller` in `request[auth.CALLER]`.
"""

from __future__ import annotations

import json
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web

from relay.console import auth
from relay.console.service import (
    DEFAULT_LIMIT,
    MAX_ID,
    Caller,
    ConsoleError,
    ConsoleService,
    Cursor,
    ListFilters,
    plain,
)
from relay.errors import StorageUnavailable
from relay.ledger_report import to_json
from relay.logs import get_logger

log = get_logger("relay.console.api")

PREFIX = "/api/v1"
MAX_AUDIT = 500
MAX_REJECTED = 1000

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_api(app: web.Application) -> None:
    """Add the API routes to the admin app (which holds `auth.SERVICE` and `auth.AUTH`)."""
    r = app.router
    r.add_get(f"{PREFIX}/summary", _json(summary))
    r.add_get(f"{PREFIX}/messages", _json(messages))
    r.add_get(f"{PREFIX}/messages/{{id}}", _json(message))
    r.add_post(f"{PREFIX}/messages/{{id}}/retry", _json(retry))
    r.add_post(f"{PREFIX}/messages/{{id}}/replay", _json(replay))
    r.add_post(f"{PREFIX}/messages/{{id}}/discard", _json(discard))
    r.add_get(f"{PREFIX}/dead/replay", _json(dead_replay_preview))
    r.add_post(f"{PREFIX}/dead/replay", _json(dead_replay))
    r.add_post(f"{PREFIX}/destinations/{{name}}/pause", _json(pause))
    r.add_post(f"{PREFIX}/destinations/{{name}}/resume", _json(resume))
    r.add_post(f"{PREFIX}/dry-run", _json(dry_run))
    r.add_get(f"{PREFIX}/audit", _json(audit))
    r.add_get(f"{PREFIX}/ledger", _json(ledger))
    r.add_get(f"{PREFIX}/rejected", _json(rejected))
    r.add_get(f"{PREFIX}/jobs", _json(jobs))
    r.add_get(f"{PREFIX}/jobs/{{id}}", _json(job))
    r.add_post(f"{PREFIX}/jobs/{{id}}/cancel", _json(cancel_job))
    r.add_post(f"{PREFIX}/jobs/{{id}}/restart", _json(restart_job))
    r.add_route("*", "/api/{tail:.*}", _json(_unknown))


def _json(handler: Callable[[web.Request], Awaitable[Any]]) -> Handler:
    """A handler returning data, answered as JSON; ConsoleError as `{"error": ...}`."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        try:
            data = await handler(request)
        except ConsoleError as exc:
            return _error(exc.http_status, exc.message)
        except StorageUnavailable as exc:
            log.warning("console_store_unavailable", path=request.path, error=str(exc))
            return _error(503, "the store cannot answer right now; retry later")
        return web.json_response(data, dumps=_dumps, headers={"Cache-Control": "no-store"})

    return wrapped


def _dumps(data: Any) -> str:
    return json.dumps(data, ensure_ascii=False)


def _error(status: int, message: str) -> web.Response:
    return web.json_response({"error": message}, status=status)


def _service(request: web.Request) -> ConsoleService:
    return request.app[auth.SERVICE]


def _caller(request: web.Request) -> Caller:
    caller: Caller = request[auth.CALLER]
    return caller


def _int(text: str | None, name: str, *, default: int | None = None) -> int:
    if text is None or text == "":
        if default is None:
            raise ConsoleError(f"{name} is required")
        return default
    try:
        value = int(text)
    except ValueError:
        raise ConsoleError(f"{name} must be an integer, not {text[:40]!r}") from None
    if abs(value) >= MAX_ID:  # beyond the stores' 64-bit integers
        raise ConsoleError(f"{name} is out of range")
    return value


def _id(request: web.Request) -> int:
    """A path id; one out of the stores' range names nothing (404)."""
    text = request.match_info["id"]
    # Beyond the stores' 64-bit ids (and int() refuses 4,300 digits and more).
    digits = text.isascii() and text.isdigit()
    if digits and len(text) > 18 and (len(text) > 19 or int(text) >= MAX_ID):
        raise ConsoleError(f"no such id {text[:40]}", 404)
    value = _int(text, "id")
    if value < 1:
        raise ConsoleError("id must be a positive integer")
    return value


async def _body(request: web.Request, *, required: bool) -> Any:
    raw = await request.read()
    if not raw.strip():
        if required:
            raise ConsoleError("a JSON body is required")
        return {}
    try:
        return json.loads(raw)
    except (ValueError, UnicodeDecodeError):
        raise ConsoleError("the body is not valid JSON") from None
    except RecursionError:
        raise ConsoleError("the body is nested too deeply") from None


def _filters(request: web.Request) -> ListFilters:
    return ListFilters.from_query(request.query, _service(request).clock.now())


# ---------------------------------------------------------------- reads


async def summary(request: web.Request) -> Any:
    return (await _service(request).summary()).to_json()


async def messages(request: web.Request) -> Any:
    service = _service(request)
    filters = _filters(request)
    cursor = Cursor.decode(request.query.get("cursor"))
    limit = _int(request.query.get("limit"), "limit", default=DEFAULT_LIMIT)
    page = await service.list_messages(filters, cursor, limit)
    return {
        "items": [item.to_json() for item in page.items],
        "next": None if page.next is None else page.next.encode(),
    }


async def message(request: web.Request) -> Any:
    return (await _service(request).message_detail(_id(request))).to_json()


async def audit(request: web.Request) -> Any:
    limit = _int(request.query.get("limit"), "limit", default=100)
    if not 1 <= limit <= MAX_AUDIT:
        raise ConsoleError(f"limit must be between 1 and {MAX_AUDIT}")
    before = request.query.get("before")
    entries = await _service(request).audit(limit, None if not before else _int(before, "before"))
    return {"items": plain(entries), "next": str(entries[-1].id) if len(entries) == limit else None}


async def rejected(request: web.Request) -> Any:
    limit = _int(request.query.get("limit"), "limit", default=200)
    if not 1 <= limit <= MAX_REJECTED:
        raise ConsoleError(f"limit must be between 1 and {MAX_REJECTED}")
    service = _service(request)
    return {
        "items": plain(service.rejected(limit)),
        "kept": service.rejected_log.capacity,
        "note": "this relay process only, in memory; a refused request's body is never kept",
    }


async def ledger(request: web.Request) -> Any:
    """The revenue ledger, as `relay ledger --format json` prints it (docs/ledger.md)."""
    return to_json((await _service(request).ledger(request.query)).ledger)


async def jobs(request: web.Request) -> Any:
    return {"items": plain(await _service(request).list_jobs())}


async def job(request: web.Request) -> Any:
    return plain(await _service(request).job(_id(request)))


async def dry_run(request: web.Request) -> Any:
    event = await _body(request, required=True)
    source = request.query.get("source") or None
    return (await _service(request).dry_run(event, source)).to_json()


async def dead_replay_preview(request: web.Request) -> Any:
    """How many dead messages POST would replay (the confirmation)."""
    return {"count": await _service(request).bulk_replay_preview(_filters(request))}


# ---------------------------------------------------------------- actions


async def retry(request: web.Request) -> Any:
    return (await _service(request).retry(_caller(request), _id(request))).to_json()


async def replay(request: web.Request) -> Any:
    return (await _service(request).replay(_caller(request), _id(request))).to_json()


async def discard(request: web.Request) -> Any:
    body = await _body(request, required=True)
    reason = body.get("reason") if isinstance(body, dict) else None
    if not isinstance(reason, str) or not reason.strip():
        raise ConsoleError('a discard needs {"reason": "..."}')
    return (await _service(request).discard(_caller(request), _id(request), reason)).to_json()


async def dead_replay(request: web.Request) -> Any:
    """Replay every dead message the filters (in the query, as for the list) match, as a
    background job; answers how many."""
    service = _service(request)
    result = await service.bulk_replay(_caller(request), _filters(request))
    return result.to_json()


async def pause(request: web.Request) -> Any:
    name = request.match_info["name"]
    return (await _service(request).pause(_caller(request), name)).to_json()


async def resume(request: web.Request) -> Any:
    name = request.match_info["name"]
    return (await _service(request).resume(_caller(request), name)).to_json()


async def cancel_job(request: web.Request) -> Any:
    return (await _service(request).cancel_job(_caller(request), _id(request))).to_json()


async def restart_job(request: web.Request) -> Any:
    return (await _service(request).restart_job(_caller(request), _id(request))).to_json()


async def _unknown(request: web.Request) -> Any:
    raise ConsoleError(f"no API route {request.method} {request.path}", 404)
