"""structlog set-up, done once per process.

JSON lines when stderr is not a TTY (or `format = "json"`), a readable console otherwise.
Context (request id, webhook id, message id) is bound with contextvars by the callers.
Event names are stable snake_case identifiers (README, "Log events"); values are never secrets.
A line that cannot be written (stderr on a full disk, a closed pipe) is dropped and counted
(`dropped_lines`, exported as `relay_log_lines_dropped_total`): logging never changes an answer.
The standard library's `logging` (aiohttp's server errors, asyncpg's and asyncio's warnings)
goes through the same renderer and stream, with its logger's name in `logger`, so a container
gets nothing but JSON lines.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
from typing import Any, TextIO

import orjson
import structlog
from structlog.typing import FilteringBoundLogger, Processor

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure(
    level: str = "info", fmt: str = "auto", stream: Any = None, *, cache: bool = False
) -> None:
    """cache: resolve each module's logger once (a serving relay: it saves work per line);
    not in tests, where structlog.testing.capture_logs() must reach every logger."""
    stream = stream or sys.stderr
    use_json = fmt == "json" or (fmt == "auto" and not stream.isatty())
    renderer: Processor = (
        structlog.processors.JSONRenderer(serializer=_json_line)
        if use_json
        else structlog.dev.ConsoleRenderer(colors=stream.isatty())
    )
    factory = _SafeLoggerFactory(stream)
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=factory,
        cache_logger_on_first_use=cache,
    )
    _route_stdlib_logging(factory(), renderer, level)


def _route_stdlib_logging(out: _SafeLogger, renderer: Processor, level: str) -> None:
    """One handler on the root logger renders every `logging` record like our own lines, so
    nothing reaches stderr through logging's plain-text fallback. Never below INFO: the
    libraries' DEBUG is their internals (aiosqlite logs every statement), not ours."""
    formatter = structlog.stdlib.ProcessorFormatter(
        foreign_pre_chain=[
            structlog.contextvars.merge_contextvars,
            structlog.stdlib.add_log_level,
            structlog.stdlib.add_logger_name,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
        ],
        processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, renderer],
    )
    root = logging.getLogger()
    for old in [h for h in root.handlers if isinstance(h, _StdlibHandler)]:
        root.removeHandler(old)  # configure() again (tests, the delivery child) replaces it
    root.addHandler(_StdlibHandler(out, formatter))
    root.setLevel(max(_LEVELS[level], logging.INFO))


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


class _StdlibHandler(logging.Handler):
    """Writes a `logging` record, rendered by structlog, through a `_SafeLogger`."""

    def __init__(self, out: _SafeLogger, formatter: logging.Formatter) -> None:
        super().__init__()
        self._out = out
        self.setFormatter(formatter)

    def emit(self, record: logging.LogRecord) -> None:
        try:
            line = self.format(record)
        except Exception:  # logging's own contract: a bad record must not raise at its caller
            self.handleError(record)
            return
        self._out.msg(line)


class _SafeLoggerFactory:
    def __init__(self, stream: TextIO) -> None:
        self._logger = _SafeLogger(stream)

    def __call__(self, *args: Any) -> _SafeLogger:
        return self._logger


def _json_line(event: Any, **_: Any) -> str:
    # orjson: a log line per webhook and per delivery is on the hot path (see relay/codec.py).
    try:
        return orjson.dumps(event, default=str, option=orjson.OPT_NON_STR_KEYS).decode()
    except TypeError:
        # Surrogates (a header's non-UTF-8 bytes, as aiohttp hands them over), which orjson
        # refuses: the standard library escapes them.
        return json.dumps(event, default=str)


def get_logger(name: str) -> FilteringBoundLogger:
    """The module's logger (`configure` decides where its lines go)."""
    logger: FilteringBoundLogger = structlog.get_logger(name)
    return logger
