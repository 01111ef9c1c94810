"""The load generator: signed order.paid webhooks over loopback, from its own process.

    python -m bench.load --url URL --mode closed --concurrency 64 --count 20000 --duration 5 \
        --out result.json
    python -m bench.load --url URL --mode open --rate 1000 --duration 10 --out result.json

Every payload is made and signed before the clock starts. Two shapes of load:

- closed: `concurrency` clients, each sending its next webhook as soon as the previous one is
  answered, until `count` webhooks or `duration` seconds. Gives the acceptance throughput and
  the acknowledgement latency at that concurrency (request sent to answer read).
- open: one webhook every 1/rate seconds on a timer, whatever the server does, for
  `duration` seconds. Latency is measured from each webhook's *scheduled* send time, so a
  server that stalls is charged for the queue it causes (no coordinated omission).

The result (one JSON object) goes to --out. With --record-sends it also holds, per idempotency
key, the scheduled send time and the answer time (time.monotonic(), comparable with the fake
Faurya's arrival times), for the end-to-end latency. With --watch-pid it holds the CPU seconds
that process used during the timed part and its memory at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import time
import urllib.parse
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp

from bench.common import Payload, cpu_seconds, make_payloads, memory_kb, summarize_ms

REQUEST_TIMEOUT_S = 30.0
OPEN_LOOP_CONNECTIONS = 1024
WARMUP_MAX_S = 30.0


class Watch:
    """CPU seconds a process (the server under test) uses during the timed part."""

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.cpu_s = 0.0
        self._before = 0.0

    def start(self) -> None:
        if self.pid:
            self._before = cpu_seconds(self.pid)

    def stop(self) -> None:
        if self.pid:
            self.cpu_s = cpu_seconds(self.pid) - self._before


@dataclass
class Tally:
    """What came back."""

    latencies_s: list[float] = field(default_factory=list)
    statuses: Counter[str] = field(default_factory=Counter)
    sends: dict[str, list[float]] = field(default_factory=dict)  # key -> [scheduled, answered]
    warmup: Counter[str] = field(default_factory=Counter)
    completed: int = 0
    accepted: int = 0  # answered 202

    def record(self, payload: Payload, status: str, start: float, end: float, keep: bool) -> None:
        self.statuses[status] += 1
        self.completed += 1
        if status == "202":
            self.accepted += 1
        self.latencies_s.append(end - start)
        if keep:
            self.sends[payload.idempotency_key] = [start, end]


def classify(status: int, body: bytes) -> str:
    """The HTTP status as text; a 202 that did not queue a message for Faurya (the relay's
    duplicate, ignored or unmappable answers) is told apart, so it is not counted as accepted."""
    if status == 202 and body:
        for outcome in (b"unmappable", b"duplicate", b"ignored"):
            if b'"' + outcome + b'"' in body:
                return f"202 {outcome.decode()}"
    return str(status)


class Client:
    """Sends one webhook and returns its HTTP status as text (or an error's class name)."""

    async def post(self, payload: Payload) -> str:
        raise NotImplementedError

    async def close(self) -> None:
        raise NotImplementedError


class AiohttpClient(Client):
    """aiohttp's client: what an ordinary Python sender would use; heavy on CPU."""

    def __init__(self, url: str, limit: int) -> None:
        self._url = url
        connector = aiohttp.TCPConnector(limit=limit, limit_per_host=0)
        self._session = aiohttp.ClientSession(
            connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
        )

    async def post(self, payload: Payload) -> str:
        try:
            async with self._session.post(
                self._url, data=payload.body, headers=payload.headers
            ) as response:
                return classify(response.status, await response.read())
        except (aiohttp.ClientError, OSError, TimeoutError) as exc:
            return type(exc).__name__

    async def close(self) -> None:
        await self._session.close()


class _Connection(asyncio.Protocol):
    """One keep-alive HTTP/1.1 connection carrying one request at a time. Reads just enough
    of each answer (status line, Content-Length) to know where it ends."""

    def __init__(self) -> None:
        self.transport: asyncio.Transport | None = None
        self.closed = False
        self._buffer = bytearray()
        self._waiter: asyncio.Future[tuple[int, bytes]] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        self._buffer += data
        waiter = self._waiter
        if waiter is None or waiter.done():
            return
        end = self._buffer.find(b"\r\n\r\n")
        if end < 0:
            return
        head = bytes(self._buffer[:end]).lower()
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name == b"content-length":
                length = int(value)
            elif name == b"transfer-encoding":
                waiter.set_exception(ValueError("chunked answers are not supported"))
                return
        if len(self._buffer) < end + 4 + length:
            return
        body = bytes(self._buffer[end + 4 : end + 4 + length])
        del self._buffer[: end + 4 + length]
        self._waiter = None
        waiter.set_result((int(head[9:12]), body))

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        if self._waiter is not None and not self._waiter.done():
            self._waiter.set_exception(ConnectionResetError("connection closed"))

    async def request(self, data: bytes) -> tuple[int, bytes]:
        assert self.transport is not None
        self._waiter = asyncio.get_running_loop().create_future()
        self.transport.write(data)
        return await self._waiter

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()
        self.closed = True


class RawClient(Client):
    """A minimal HTTP/1.1 client over asyncio protocols, with every request's bytes built
    before the clock starts. It costs a fraction of aiohttp's client per request, which
    matters here: on a 2-core machine the load generator shares the CPU with the server, and
    with aiohttp's client the trivial server was limited by its client, not by itself."""

    def __init__(self, url: str, limit: int) -> None:
        parsed = urllib.parse.urlsplit(url)
        assert parsed.hostname is not None
        assert parsed.port is not None
        self._host, self._port = parsed.hostname, parsed.port
        self._prefix = (
            f"POST {parsed.path} HTTP/1.1\r\nHost: {parsed.hostname}:{parsed.port}\r\n"
        ).encode()
        self._idle: list[_Connection] = []
        self._all: list[_Connection] = []
        self._slots = asyncio.Semaphore(limit)
        self._requests: dict[int, bytes] = {}

    def prepare(self, payloads: list[Payload]) -> None:
        """Build each distinct request's bytes (before timing)."""
        for payload in payloads:
            if id(payload) not in self._requests:
                head = "".join(f"{k}: {v}\r\n" for k, v in payload.headers.items())
                self._requests[id(payload)] = (
                    self._prefix
                    + f"{head}Content-Length: {len(payload.body)}\r\n\r\n".encode()
                    + payload.body
                )

    async def post(self, payload: Payload) -> str:
        data = self._requests[id(payload)]
        async with self._slots:
            connection = None
            try:
                if self._idle:
                    connection = self._idle.pop()
                else:
                    _, connection = await asyncio.get_running_loop().create_connection(
                        _Connection, self._host, self._port
                    )
                    self._all.append(connection)
                async with asyncio.timeout(REQUEST_TIMEOUT_S):
                    status, body = await connection.request(data)
            except (OSError, TimeoutError, ValueError) as exc:
                if connection is not None:
                    connection.close()
                return type(exc).__name__
            if not connection.closed:
                self._idle.append(connection)
            return classify(status, body)

    async def close(self) -> None:
        for connection in self._all:
            connection.close()


def new_client(kind: str, url: str, limit: int, payloads: list[Payload]) -> Client:
    if kind == "aiohttp":
        return AiohttpClient(url, limit)
    client = RawClient(url, limit)
    client.prepare(payloads)
    return client


async def warm_up(client: Client, payloads: list[Payload], concurrency: int) -> Counter[str]:
    """Open the connections and warm the server up; only the answers are counted."""
    queue = iter(payloads)
    statuses: Counter[str] = Counter()

    async def sender() -> None:
        for payload in queue:
            statuses[await client.post(payload)] += 1

    async with asyncio.timeout(WARMUP_MAX_S):
        await asyncio.gather(*(sender() for _ in range(min(concurrency, len(payloads)))))
    return statuses


async def closed_loop(
    url: str,
    payloads: list[Payload],
    warmup: list[Payload],
    concurrency: int,
    duration_s: float,
    watch: Watch,
    kind: str,
) -> tuple[Tally, float]:
    tally = Tally()
    client = new_client(kind, url, concurrency, warmup + payloads)
    try:
        tally.warmup = await warm_up(client, warmup, concurrency)
        queue = iter(payloads)
        deadline = 0.0

        async def worker() -> None:
            for payload in queue:
                if time.monotonic() >= deadline:
                    return
                start = time.monotonic()
                status = await client.post(payload)
                tally.record(payload, status, start, time.monotonic(), keep=False)

        watch.start()
        started = time.monotonic()
        deadline = started + duration_s
        # Bounded twice: by the payload count and by the deadline (plus one request's timeout).
        async with asyncio.timeout(duration_s + REQUEST_TIMEOUT_S + 5):
            await asyncio.gather(*(worker() for _ in range(concurrency)))
        elapsed = time.monotonic() - started
        watch.stop()
    finally:
        await client.close()
    return tally, elapsed


async def open_loop(
    url: str,
    payloads: list[Payload],
    warmup: list[Payload],
    rate: float,
    record_sends: bool,
    watch: Watch,
    kind: str,
) -> tuple[Tally, float, int]:
    tally = Tally()
    client = new_client(kind, url, OPEN_LOOP_CONNECTIONS, warmup + payloads)
    try:
        tally.warmup = await warm_up(client, warmup, 8)
        tasks: dict[asyncio.Task[None], float] = {}  # in flight -> scheduled send time

        async def send(payload: Payload, scheduled: float) -> None:
            status = await client.post(payload)
            tally.record(payload, status, scheduled, time.monotonic(), keep=record_sends)

        watch.start()
        started = time.monotonic() + 0.05
        interval = 1.0 / rate
        for i, payload in enumerate(payloads):
            scheduled = started + i * interval
            delay = scheduled - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(send(payload, scheduled))
            tasks[task] = scheduled
            task.add_done_callback(tasks.pop)
        # Stragglers get one request timeout; whatever is still open then is cancelled and
        # charged the time it had waited (a lower bound of its latency).
        if tasks:
            await asyncio.wait(set(tasks), timeout=REQUEST_TIMEOUT_S + 5)
        now = time.monotonic()
        elapsed = now - started
        watch.stop()
        unfinished = len(tasks)
        tally.latencies_s += [now - scheduled for scheduled in tasks.values()]
        for task in list(tasks):
            task.cancel()
    finally:
        await client.close()
    return tally, elapsed, unfinished


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--url", required=True)
    parser.add_argument("--mode", choices=["closed", "open"], required=True)
    parser.add_argument("--concurrency", type=int, default=64, help="closed loop")
    parser.add_argument("--rate", type=float, default=1000.0, help="open loop, webhooks/s")
    parser.add_argument("--duration", type=float, required=True, help="seconds of load")
    parser.add_argument("--count", type=int, default=0, help="closed loop: most webhooks")
    parser.add_argument("--warmup", type=int, default=200, help="unmeasured webhooks first")
    parser.add_argument("--distinct", type=int, default=0, help="reuse a pool of this many")
    parser.add_argument("--record-sends", action="store_true")
    parser.add_argument("--watch-pid", type=int, default=0)
    parser.add_argument("--client", choices=["raw", "aiohttp"], default="raw")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    if args.mode == "open":
        count = max(1, math.ceil(args.rate * args.duration))
    else:
        count = args.count or 1_000_000
    run_id = uuid.uuid4().hex[:12]
    signing_started = time.monotonic()
    warmup = make_payloads(args.warmup, f"warm-{run_id}")
    # --distinct: servers that do not deduplicate (trivial, inline) may get the same webhooks
    # again, which saves signing time; the relay always gets distinct ones.
    distinct = min(count, args.distinct) if args.distinct else count
    pool = make_payloads(distinct, f"ord-{run_id}")
    payloads = [pool[i % distinct] for i in range(count)] if distinct < count else pool
    signing_s = time.monotonic() - signing_started

    watch = Watch(args.watch_pid)
    unfinished = 0
    if args.mode == "closed":
        tally, elapsed = asyncio.run(
            closed_loop(
                args.url, payloads, warmup, args.concurrency, args.duration, watch, args.client
            )
        )
    else:
        tally, elapsed, unfinished = asyncio.run(
            open_loop(args.url, payloads, warmup, args.rate, args.record_sends, watch, args.client)
        )
    result: dict[str, Any] = {
        "mode": args.mode,
        "concurrency": args.concurrency if args.mode == "closed" else None,
        "rate": args.rate if args.mode == "open" else None,
        "duration_s": args.duration,
        "signing_s": round(signing_s, 3),
        "elapsed_s": elapsed,
        "completed": tally.completed,
        "accepted": tally.accepted,
        "unfinished": unfinished,
        "statuses": dict(tally.statuses),
        "warmup_statuses": dict(tally.warmup),
        "accepted_per_s": tally.accepted / elapsed if elapsed > 0 else 0.0,
        "latency_ms": summarize_ms(tally.latencies_s),
    }
    if args.watch_pid:
        result["server_cpu_s"] = watch.cpu_s
        result["server_memory_kb"] = memory_kb(args.watch_pid)
    if args.record_sends:
        result["sends"] = tally.sends
    Path(args.out).write_text(json.dumps(result))


if __name__ == "__main__":
    main()
