"""structlog set-up, done once per process.

JSON lines when stderr is not a TTY (or `format = "json"`), a readable console otherwise.
Context (request id, webhook id, message id) is bound with contextvars by the callers.
Event names are stable snake_case identifiers (README, "Log events"); values are never secrets.
"""

from __future__ import annotations

import logging
import sys
from typing import Any

import orjson
import structlog

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(
    level: str = "info", fmt: str = "auto", stream: Any = None, *, cache: bool = False
) -> None:
    """cache: resolve each module's logger once (a serving relay, a few us per log line);
    not in tests, where structlog.testing.capture_logs() must reach every logger."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Any = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(stream),
        cache_logger_on_first_use=cache,
    )


def _json_line(event: Any, **_: Any) -> str:
    # orjson: a log line per webhook and per delivery is on the hot path (see relay/codec.py).
    return orjson.dumps(event, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
