"""The console's HTML pages on the admin listener: server-rendered, readable without JavaScript.

Owns: the page routes (overview, find, one message, rejected requests, routes with a dry run,
audit, bulk jobs, login), their forms (every state-changing one carries the CSRF field that
relay/console/auth.py checks), and the template filters. Reads and actions go through
`ConsoleService` only, the same calls as the JSON API; nothing here knows SQL or a secret.
Templates are jinja2 with autoescaping on: no value is ever marked safe except the chart's
SVG, which relay/console/chart.py builds with every text escaped.
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlencode

import aiohttp_jinja2
import jinja2
from aiohttp import web
from markupsafe import Markup

from relay import __version__
from relay.console import auth
from relay.console.chart import ledger_svg, throughput_svg
from relay.console.formatting import FILTERS, describe_condition
from relay.console.rejected import DEFAULT_CAPACITY
from relay.console.service import (
    LONG_PENDING_S,
    Caller,
    ConsoleError,
    ConsoleService,
    Cursor,
    ListFilters,
    StatusClass,
    Summary,
)
from relay.currency import polar_exponent
from relay.ledger import POLAR_SCOPES, Ledger
from relay.ledger_differences import Why
from relay.models import MessageStatus

HERE = Path(__file__).parent
TEMPLATES = HERE / "templates"
STYLESHEET = HERE / "static" / "console.css"
PAGE_SIZE = 50
LIVE_REFRESH_S = 5  # live mode of the message list: a <meta refresh>, no script
JOB_REFRESH_S = 2  # a running bulk job's page
AUDIT_PAGE = 100
# Pages show outbox data: never cached, never framed (clickjacking of the fix buttons), no
# script at all, forms only to ourselves.
PAGE_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": (
        "default-src 'none'; style-src 'self'; img-src 'self' data:; form-action 'self'; "
        "frame-ancestors 'none'; base-uri 'none'"
    ),
}
# Every other answer of the admin listener (the API's JSON, its errors, /metrics, a 404) gets
# these unless it set its own: nothing there is to be cached, framed or sniffed as HTML.
DEFAULT_HEADERS = {
    "Cache-Control": "no-store",
    "X-Frame-Options": "DENY",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'",
}
# A path on this console: one slash, then no backslash and no control character (a browser
# drops tabs and newlines from a URL, so "/<tab>/evil.example" would become "//evil.example").
_LOCAL_PATH = re.compile(r"/(?![/\\])[^\x00-\x1f\x7f\\]*")
# After an action the browser is redirected (post/redirect/get) with one of these keys; the
# text shown is ours, never taken from the URL.
NOTICES = {
    "retry": "Retry scheduled: the message is due now.",
    "replay": "Replay scheduled, under the same idempotency key: Faurya records it once.",
    "discard": "Discarded. The reason is on the audit page.",
    "pause": "Destination paused: nothing is sent to it until you resume it.",
    "resume": "Destination resumed.",
    "cancel": "Job cancelled: what it replayed so far stays replayed.",
    "restart": "Job restarted from where it stopped.",
}

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def add_pages(admin: web.Application) -> None:
    """Add the console's pages to the admin app (which holds `auth.SERVICE`)."""
    env = aiohttp_jinja2.setup(
        admin,
        loader=jinja2.FileSystemLoader(TEMPLATES),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
        default_helpers=False,
    )
    env.filters.update(FILTERS)
    stylesheet = STYLESHEET.read_bytes()
    admin.on_response_prepare.append(_default_headers)

    async def css(request: web.Request) -> web.Response:
        return web.Response(
            body=stylesheet,
            content_type="text/css",
            headers={"Cache-Control": "max-age=300", "X-Content-Type-Options": "nosniff"},
        )

    # Ids fit in a signed 64-bit column: a longer number is no page (404), never a
    # database overflow.
    r = admin.router
    r.add_get("/static/console.css", css)
    r.add_get("/", _page(overview))
    r.add_get("/messages", _page(messages))
    r.add_get(r"/messages/{id:\d{1,18}}", _page(message))
    r.add_post(r"/messages/{id:\d{1,18}}/{action:retry|replay|discard}", _page(message_action))
    r.add_post("/destinations/{name}/{action:pause|resume}", _page(destination_action))
    r.add_get("/dead/replay", _page(confirm_bulk_replay))
    r.add_post("/dead/replay", _page(start_bulk_replay))
    r.add_get(r"/jobs/{id:\d{1,18}}", _page(job))
    r.add_post(r"/jobs/{id:\d{1,18}}/{action:cancel|restart}", _page(job_action))
    r.add_get("/rejected", _page(rejected))
    r.add_get("/routes", _page(routes))
    r.add_post("/routes", _page(routes))
    r.add_get("/audit", _page(audit))
    r.add_get("/ledger", _page(ledger))
    r.add_get("/login", login_form)
    r.add_post("/login", login)
    r.add_post("/logout", logout)


# ---------------------------------------------------------------- plumbing

PageHandler = Callable[[web.Request, Caller], Awaitable[web.StreamResponse]]


def _page(handler: PageHandler) -> Handler:
    """A page for a signed-in caller: others go to the login form (then back here). A
    console error becomes an error page with its status, never a traceback."""

    async def wrapped(request: web.Request) -> web.StreamResponse:
        caller = auth.page_caller(request)
        reads = request.method in ("GET", "HEAD")
        if caller is None:
            if not reads:
                return _error(request, None, 401, "Signed out", "Sign in again, then retry.")
            return _redirect(f"/login?{urlencode({'next': request.path_qs})}")
        # The dry run (POST /routes) only reads: a read session may use it.
        if not reads and not caller.can_act and handler is not routes:
            return _error(
                request,
                caller,
                403,
                "Read only",
                "This session can look but not act: sign in with the admin token.",
            )
        try:
            return await handler(request, caller)
        except ConsoleError as exc:
            return _error(request, caller, exc.http_status, "Cannot do that", exc.message)

    return wrapped


async def _default_headers(request: web.Request, response: web.StreamResponse) -> None:
    for name, value in DEFAULT_HEADERS.items():
        response.headers.setdefault(name, value)


def _service(request: web.Request) -> ConsoleService:
    return request.app[auth.SERVICE]


def _render(
    request: web.Request,
    caller: Caller | None,
    template: str,
    context: Mapping[str, Any],
    *,
    status: int = 200,
    nav: str = "",
) -> web.Response:
    service = _service(request)
    done = request.query.get("done", "")
    base: dict[str, Any] = {
        "caller": caller,
        "open_access": service.open_access,
        "csrf": auth.csrf_token(request) if caller is not None else "",
        "nav": nav,
        "now": service.clock.now(),
        "version": __version__,
        "title": "",
        "refresh_s": None,
        "notice": NOTICES.get(done),
        "notice_kind": "ok",
        "generated_at": None,
    }
    base.update(context)
    response = aiohttp_jinja2.render_template(template, request, base, status=status)
    response.headers.update(PAGE_HEADERS)
    return response


def _error(
    request: web.Request, caller: Caller | None, status: int, heading: str, message: str
) -> web.Response:
    back = request.headers.get("Referer", "")
    # Only a link back into this console: the Referer is the browser's, not ours.
    back_path = _local_path(back.split(request.host, 1)[-1]) if request.host in back else "/"
    return _render(
        request,
        caller,
        "error.html",
        {"title": heading, "heading": heading, "message": message, "back": back_path},
        status=status,
    )


def _redirect(location: str) -> web.Response:
    return web.Response(status=303, headers={"Location": location, **PAGE_HEADERS})


def _local_path(target: str | None) -> str:
    """`target` if it is a path on this console, else "/": a login link must not send the
    browser elsewhere (an open redirect)."""
    if not target or not _LOCAL_PATH.fullmatch(target):
        return "/"
    # Anything beyond printable ASCII goes as %XX: a Location header carries bytes as they are.
    return quote(target, safe="/?&=%:;@!$'()*+,~#[]")


def _number(text: str, max_digits: int) -> bool:
    """`text` is a plain decimal number of at most `max_digits` digits (str.isdigit alone
    also takes "²", which int() refuses)."""
    return text.isascii() and text.isdigit() and len(text) <= max_digits


def _path_id(request: web.Request) -> int:
    return int(request.match_info["id"])


# ---------------------------------------------------------------- overview


async def overview(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    summary = await service.summary()
    return _render(
        request,
        caller,
        "overview.html",
        {
            "title": "Overview",
            "summary": summary,
            "totals": _totals(summary),
            "chart": Markup(throughput_svg(summary.chart)),  # noqa: S704 - built escaped
            "long_pending_s": LONG_PENDING_S,
            "generated_at": summary.generated_at,
        },
        nav="overview",
    )


def _totals(summary: Summary) -> dict[str, Any]:
    ages = [
        d.oldest_pending_age_s for d in summary.destinations if d.oldest_pending_age_s is not None
    ]
    return {
        "pending": sum(d.pending for d in summary.destinations),
        "dead": sum(d.dead for d in summary.destinations),
        "oldest_age_s": max(ages) if ages else None,
    }


# ---------------------------------------------------------------- find


async def messages(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    query = request.query
    error = None
    page = None
    filters = ListFilters()
    cursor_text = query.get("cursor") or None
    try:
        filters = ListFilters.from_query(query, service.clock.now())
        limit_text = query.get("limit", "")
        limit = int(limit_text) if _number(limit_text, 6) else PAGE_SIZE
        page = await service.list_messages(filters, Cursor.decode(cursor_text), limit)
    except ConsoleError as exc:
        if exc.http_status >= 500:
            raise
        error = exc.message
    dead_view = filters.statuses == (MessageStatus.DEAD,)
    live = query.get("live") == "1"
    statuses = [s for chunk in query.getall("status", []) for s in chunk.split(",") if s]
    config = service.config
    form = {
        "q": query.get("q", ""),
        "statuses": statuses,
        "destination": query.get("destination", ""),
        "route": query.get("route", ""),
        "event_type": query.get("event_type", ""),
        "status_class": query.get("status_class", ""),
        "since": query.get("since", ""),
        "until": query.get("until", ""),
        "sort": query.get("sort", ""),
    }
    has_filters = any(v for k, v in form.items() if k != "sort")
    labels = {"status_class": "last answer", "event_type": "event"}
    chips = [f"status: {', '.join(statuses)}"] if statuses else []
    chips += [
        f"{labels.get(k, k)}: {v}"
        for k, v in form.items()
        if v and k not in ("q", "statuses", "sort")
    ]
    if form["sort"] == "amount":
        chips.append("largest amount first")
    if dead_view:
        heading = "Dead letters"
        sub = (
            "Largest amount first: fix the costliest failure first."
            if filters.sort.value == "amount"
            else "Messages that used up their retries."
        )
    else:
        heading = "Find messages"
        sub = "Newest first. Filters live in the URL: copy it to share this view."
    pairs = [(k, v) for k, v in query.items()]

    def query_with(**changes: str) -> str:
        kept = [(k, v) for k, v in pairs if k not in changes and k != "cursor"]
        return urlencode(kept + list(changes.items()))

    def query_without(*names: str) -> str:
        return urlencode([(k, v) for k, v in pairs if k not in names])

    return _render(
        request,
        caller,
        "messages.html",
        {
            "title": heading,
            "heading": heading,
            "subheading": sub,
            "page": page,
            "error": error,
            "cursor": cursor_text,
            "form": form,
            "has_filters": has_filters,
            "chips": chips,
            # Open when a filter beyond the status and the order is set, or one is wrong.
            "open_filters": error is not None
            or any(
                form[k]
                for k in ("destination", "route", "event_type", "status_class", "since", "until")
            ),
            "live": live,
            "refresh_s": LIVE_REFRESH_S if live else None,
            "statuses": [s.value for s in MessageStatus],
            "status_classes": [c.value for c in StatusClass],
            "destinations": sorted(config.destinations),
            "routes": [r.name for r in config.routes],
            "event_types": sorted({e for r in config.routes for e in r.events if "*" not in e}),
            "can_bulk": caller.can_act
            and page is not None
            and (not filters.statuses or MessageStatus.DEAD in filters.statuses),
            "query_with": query_with,
            "query_without": query_without,
        },
        status=400 if error else 200,
        nav="dead" if dead_view else "messages",
    )


# ---------------------------------------------------------------- one message


async def message(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    detail = await service.message_detail(_path_id(request))
    return _render(
        request,
        caller,
        "message.html",
        {
            "title": f"Message #{detail.message.id}",
            "d": detail,
            "bodies_s": service.config.retention.bodies_s,
        },
        nav="messages",
    )


async def message_action(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    message_id = _path_id(request)
    action = request.match_info["action"]
    if action == "retry":
        await service.retry(caller, message_id)
    elif action == "replay":
        await service.replay(caller, message_id)
    else:
        form = await request.post()
        reason = str(form.get("reason", "")).strip()
        if not reason:
            raise ConsoleError("a discard needs a reason (it goes to the audit)")
        await service.discard(caller, message_id, reason)
    return _redirect(f"/messages/{message_id}?done={action}")


async def destination_action(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    name = request.match_info["name"]
    if request.match_info["action"] == "pause":
        await service.pause(caller, name)
    else:
        await service.resume(caller, name)
    return _redirect(f"/?done={request.match_info['action']}")


# ---------------------------------------------------------------- bulk replay and jobs

FILTER_LABELS = {
    "status": "Status",
    "destination": "Destination",
    "route": "Route",
    "event_type": "Event type",
    "status_class": "Last answer",
    "since": "Since",
    "until": "Until",
    "q": "Search",
}


def _bulk_filters(request: web.Request, service: ConsoleService) -> ListFilters:
    filters = ListFilters.from_query(request.query, service.clock.now())
    # The job replays dead messages only, whatever other status the list showed.
    return dataclasses.replace(filters, statuses=(MessageStatus.DEAD,))


async def confirm_bulk_replay(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    filters = _bulk_filters(request, service)
    count = await service.bulk_replay_preview(filters)
    shown = {k: v for k, v in filters.to_query().items() if k != "sort"}
    return _render(
        request,
        caller,
        "confirm_replay.html",
        {
            "title": "Replay dead messages",
            "count": count,
            "filter_items": [(FILTER_LABELS.get(k, k), v) for k, v in shown.items()],
            "query": urlencode(shown),
        },
        nav="dead",
    )


async def start_bulk_replay(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    result = await service.bulk_replay(caller, _bulk_filters(request, service))
    if result.job is None:
        return _redirect("/messages?status=dead")
    return _redirect(f"/jobs/{result.job.id}")


async def job(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    found = await service.job(_path_id(request))
    return _render(
        request,
        caller,
        "job.html",
        {
            "title": f"Job #{found.id}",
            "job": found,
            "refresh_s": JOB_REFRESH_S if found.active else None,
        },
        nav="dead",
    )


async def job_action(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    job_id = _path_id(request)
    action = request.match_info["action"]
    if action == "cancel":
        await service.cancel_job(caller, job_id)
    else:
        await service.restart_job(caller, job_id)
    return _redirect(f"/jobs/{job_id}?done={action}")


# ---------------------------------------------------------------- rejected, audit


async def rejected(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    return _render(
        request,
        caller,
        "rejected.html",
        {
            "title": "Rejected requests",
            "items": service.rejected(limit=DEFAULT_CAPACITY),
            "capacity": DEFAULT_CAPACITY,
        },
        nav="rejected",
    )


async def audit(request: web.Request, caller: Caller) -> web.StreamResponse:
    service = _service(request)
    before_text = request.query.get("before", "")
    if before_text and not _number(before_text, 18):
        raise ConsoleError("before must be an audit entry id")
    entries = await service.audit(AUDIT_PAGE, int(before_text) if before_text else None)
    return _render(
        request,
        caller,
        "audit.html",
        {
            "title": "Audit",
            "entries": entries,
            "next_before": entries[-1].id if len(entries) == AUDIT_PAGE else None,
        },
        nav="audit",
    )


# ---------------------------------------------------------------- the revenue ledger

LEDGER_PARAMS = ("since", "until", "currency", "timezone")
# Differences whose fix is a console action on their message: it is dead or being retried,
# and "Retry now" sends it (the message page has it too).
RETRYABLE = (Why.DEAD, Why.PENDING)


@dataclasses.dataclass(frozen=True, slots=True)
class _ChartDay:
    label: str
    polar: int | None
    faurya: int


async def ledger(request: web.Request, caller: Caller) -> web.StreamResponse:
    """Polar's revenue against what Faurya got, per day and currency, with the differences
    (relay/ledger.py); filters in the URL as for `relay ledger`."""
    service = _service(request)
    form = {k: request.query.get(k, "") for k in LEDGER_PARAMS}
    error = None
    view = None
    try:
        view = await service.ledger(request.query)
    except ConsoleError as exc:
        if exc.http_status >= 500:
            raise
        error = exc.message
    return _render(
        request,
        caller,
        "ledger.html",
        {
            "title": "Revenue ledger",
            "form": form,
            "error": error,
            "view": view,
            "ledger": None if view is None else view.ledger,
            "charts": [] if view is None else _ledger_charts(view.ledger),
            "scopes": POLAR_SCOPES,
            "retryable": RETRYABLE,
            "default_timezone": service.config.ledger.timezone,
        },
        status=400 if error else 200,
        nav="ledger",
    )


def _ledger_charts(found: Ledger) -> list[tuple[str, Markup]]:
    """One chart per currency (amounts in two currencies share no axis): Polar's net per day
    against the net Faurya got."""
    by_currency: dict[str, list[_ChartDay]] = {}
    for row in found.rows:
        by_currency.setdefault(row.currency, []).append(
            _ChartDay(
                row.day.strftime("%m-%d"),
                None if row.polar is None else row.polar.net_minor,
                row.delivered.net_minor,
            )
        )
    charts = []
    for code, days in sorted(by_currency.items()):
        unit = 10 ** (polar_exponent(code) or 0)
        title = f"Polar vs Faurya per day, {code}"
        svg = ledger_svg(days, currency=code, unit=unit, title=title)
        charts.append((code, Markup(svg)))  # noqa: S704 - built escaped
    return charts


# ---------------------------------------------------------------- routes and the dry run


async def routes(request: web.Request, caller: Caller) -> web.StreamResponse:
    """The configured routes; a POST runs the dry run (read-only: any signed-in caller)."""
    service = _service(request)
    config = service.config
    sources = list(config.sources)
    source = sources[0] if sources else ""
    event_text = ""
    result = None
    error = None
    if request.method == "POST":
        form = await request.post()
        event_text = str(form.get("event", ""))
        source = str(form.get("source", source)) or source
        try:
            event = json.loads(event_text)
        except ValueError as exc:
            error = f"not JSON: {exc}"
        except RecursionError:
            error = "not JSON this relay reads: nested too deeply"
        else:
            try:
                result = await service.dry_run(event, source)
            except ConsoleError as exc:
                if exc.http_status >= 500:
                    raise
                error = exc.message
    rows = [
        {
            "name": r.name,
            "source": r.source,
            "events": r.events,
            "when": describe_condition(r.when) if r.when is not None else None,
            "destination": r.destination,
            "paused": service.config.destinations[r.destination].paused
            if r.destination in config.destinations
            else False,
            "verify_order": r.verify_order is not None,
        }
        for r in config.routes
    ]
    return _render(
        request,
        caller,
        "routes.html",
        {
            "title": "Routes",
            "routes": rows,
            "sources": sources,
            "source": source,
            "event_text": event_text,
            "result": result,
            "error": error,
        },
        status=400 if error else 200,
        nav="routes",
    )


# ---------------------------------------------------------------- login


async def login_form(request: web.Request) -> web.StreamResponse:
    service = _service(request)
    target = _local_path(request.query.get("next"))
    if service.open_access or auth.page_caller(request) is not None:
        return _redirect(target)
    return _render(request, None, "login.html", {"title": "Sign in", "next": target, "error": None})


async def login(request: web.Request) -> web.StreamResponse:
    form = await request.post()
    target = _local_path(str(form.get("next", "")))
    try:
        caller = auth.login(request, str(form.get("token", "")))
    except auth.LoginRefused as exc:
        status = 429 if exc.retry_after_s else 401
        response = _render(
            request,
            None,
            "login.html",
            {"title": "Sign in", "next": target, "error": str(exc)},
            status=status,
        )
        if exc.retry_after_s:
            response.headers["Retry-After"] = str(int(exc.retry_after_s) + 1)
        return response
    response = _redirect(target)
    auth.start_session(response, request, caller)
    return response


async def logout(request: web.Request) -> web.StreamResponse:
    response = _redirect("/login")
    auth.end_session(response, request)
    return response
