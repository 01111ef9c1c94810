"""structlog set-up, done once per process.

JSON lines when stderr is not a TTY (or `format = "json"`), a readable console otherwise.
Context (request id, webhook id, message id) is bound with contextvars by the callers.
Event names are stable snake_case identifiers (README, "Log events"); values are never secrets.
A line that cannot be written (stderr on a full disk, a closed pipe) is dropped and counted
(`dropped_lines`, exported as `relay_log_lines_dropped_total`): logging never changes an answer.
"""

from __future__ import annotations

import logging
import sys
import threading
from typing import Any, TextIO

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
        logger_factory=_SafeLoggerFactory(stream),
        cache_logger_on_first_use=cache,
    )


_dropped = 0


def dropped_lines() -> int:
    """Log lines this process could not write since it started."""
    return _dropped


class _SafeLogger:
    """structlog's PrintLogger, except that a failed write drops the line and counts it. A log
    call sits inside every request handler and delivery: an OSError (ENOSPC, EPIPE) or the
    ValueError of a closed file must not turn a webhook's 202 or 503 into a 500."""

    def __init__(self, stream: TextIO) -> None:
        self._stream = stream
        self._lock = threading.Lock()  # code on the store's connection thread may log too

    def msg(self, message: str) -> None:
        global _dropped
        with self._lock:
            try:
                self._stream.write(message + "\n")
                self._stream.flush()
            except (OSError, ValueError):
                _dropped += 1

    log = debug = info = warn = warning = msg
    err = error = critical = exception = fatal = failure = msg


class _SafeLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._logger = _SafeLogger(stream)

    def __call__(self, *args: Any) -> _SafeLogger:
        return self._logger


def _json_line(event: Any, **_: Any) -> str:
    # orjson: a log line per webhook and per delivery is on the hot path (see relay/codec.py).
    return orjson.dumps(event, default=str, option=orjson.OPT_NON_STR_KEYS).decode()


def get_logger(name: str) -> Any:
    return structlog.get_logger(name)
