"""One delivery attempt: POST a stored message over a shared aiohttp ClientSession.

Owns the outbound request (headers, timeout, how much of the answer to read) and turns what
happened into an `AttemptResult`. It decides nothing: `relay.retry.decide` does. Never raises for
anything the destination or the network does.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Protocol

import aiohttp
import yarl

from relay import __version__
from relay.config import DestinationConfig
from relay.models import ClaimedMessage, ErrorKind

SNIPPET_BYTES = 512
USER_AGENT = f"faurya-relay/{__version__}"


# An AttemptResult's fields in order, as they cross a delivery child's socket.
WireResult = tuple[int | None, str | None, str | None, str, float, ErrorKind | None]


@dataclass(frozen=True, slots=True)
class AttemptResult:
    status: int | None  # None: no HTTP answer
    error: str | None  # `kind.text(...)`: "timeout", "connect: ...", never a secret
    retry_after: str | None
    snippet: str
    duration_s: float
    kind: ErrorKind | None = None  # set exactly when there is no HTTP answer

    @classmethod
    def answered(
        cls, status: int, retry_after: str | None, snippet: str, duration_s: float
    ) -> AttemptResult:
        """The destination answered with HTTP `status` (any status: retry.decide judges it)."""
        return cls(status, None, retry_after, snippet, duration_s)

    @classmethod
    def failed(cls, kind: ErrorKind, detail: str, duration_s: float) -> AttemptResult:
        """No HTTP answer: `kind` says why (a timeout, a refused connection, a check)."""
        return cls(None, kind.text(detail), None, "", duration_s, kind)

    def to_wire(self) -> WireResult:
        """As a plain tuple, for a delivery child's socket: a tuple pickles in a fraction of
        the time of a dataclass, once per attempt."""
        return (self.status, self.error, self.retry_after, self.snippet, self.duration_s, self.kind)

    @classmethod
    def from_wire(cls, fields: WireResult) -> AttemptResult:
        """The result `to_wire` made, read back from a delivery child's socket."""
        status, error, retry_after, snippet, duration_s, kind = fields
        return cls(status, error, retry_after, snippet, duration_s, kind)


class Redactor:
    """Replaces every configured secret value in text that may be stored or logged (a
    misbehaving receiver could echo our write key back in its error body)."""

    def __init__(self, secret_values: Iterable[str]) -> None:
        self._values = sorted({v for v in secret_values if len(v) >= 4}, key=len, reverse=True)

    def __call__(self, text: str) -> str:
        for value in self._values:
            if value in text:
                text = text.replace(value, "***")
        return text

    @property
    def margin(self) -> int:
        """How far past a cut to read so that a secret across the cut is seen whole."""
        return max((len(v.encode()) for v in self._values), default=0)

    def cut(self, text: str, limit: int) -> str:
        """`text` cut to about `limit` characters, redacted. A secret the cut would split is
        kept whole so that it is masked: a cut secret's first part would not match, and leak.
        `text` should run `margin` past `limit`."""
        end, moved = limit, True
        while moved:
            moved = False
            for value in self._values:
                start = text.find(value, max(0, end - len(value) + 1))
                if -1 < start < end < start + len(value):
                    end, moved = start + len(value), True
        return self(text[:end])


async def _read_up_to(stream: aiohttp.StreamReader, size: int) -> bytes:
    """Up to `size` bytes of a body, fewer only where it ends. One read() returns whatever
    arrived so far: a secret split there would be kept cut, unmasked."""
    chunks = []
    while size > 0 and (chunk := await stream.read(size)):
        chunks.append(chunk)
        size -= len(chunk)
    return b"".join(chunks)


class Attempts(Protocol):
    """What a destination worker sends through: `Sender`, or a child process's
    (`relay.delivery_process`)."""

    async def send(self, msg: ClaimedMessage) -> AttemptResult: ...


def client_session(limit: int) -> aiohttp.ClientSession:
    """The one HTTP client of deliveries (serving process or delivery child): at most `limit`
    connections, and no cookie jar. A receiver's Set-Cookie must not ride along on the next
    message (another merchant's, under a shared session), and skipping the jar's filtering
    and parsing is a few percent of each attempt's CPU."""
    return aiohttp.ClientSession(
        connector=aiohttp.TCPConnector(limit=limit), cookie_jar=aiohttp.DummyCookieJar()
    )


class Sender:
    """Sends messages to one destination."""

    def __init__(
        self, session: aiohttp.ClientSession, destination: DestinationConfig, redact: Redactor
    ) -> None:
        self._session = session
        self._destination = destination
        self._redact = redact
        self._timeout = aiohttp.ClientTimeout(total=destination.timeout_s)
        self._url = yarl.URL(destination.url)  # parsed once, not per attempt
        self._base_headers = {h.name: h.text for h in destination.headers}
        self._base_headers.update({"content-type": "application/json", "user-agent": USER_AGENT})

    async def send(self, msg: ClaimedMessage) -> AttemptResult:
        return await self.post(msg.idempotency_key, msg.body)

    async def post(self, idempotency_key: str, body: bytes) -> AttemptResult:
        headers = dict(self._base_headers)
        headers["idempotency-key"] = idempotency_key
        started = time.perf_counter()
        try:
            async with self._session.post(
                self._url,
                data=body,
                headers=headers,
                timeout=self._timeout,
                allow_redirects=False,
            ) as response:
                raw = await _read_up_to(response.content, SNIPPET_BYTES + self._redact.margin)
                return AttemptResult.answered(
                    response.status,
                    response.headers.get("Retry-After"),
                    self._redact.cut(raw.decode("utf-8", errors="replace"), SNIPPET_BYTES),
                    time.perf_counter() - started,
                )
        except TimeoutError:
            kind, detail = ErrorKind.TIMEOUT, ""
        except aiohttp.ClientConnectorError as exc:
            # The exception text can carry the URL; keep only its class and the OS reason.
            kind = ErrorKind.CONNECT
            detail = f"{type(exc).__name__} ({exc.os_error.strerror or 'connect failed'})"
        except (aiohttp.ClientError, OSError, asyncio.IncompleteReadError) as exc:
            kind, detail = ErrorKind.CONNECTION, type(exc).__name__
        return AttemptResult.failed(kind, detail, time.perf_counter() - started)
