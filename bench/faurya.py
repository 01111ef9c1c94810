"""A fake Faurya for the benchmark: answers every revenue call 200 at once and records when
each idempotency key first arrived (time.monotonic(), comparable across processes).

    python -m bench.faurya [--port 0]

Prints one JSON line `{"event": "listening", "port": N}` on stdout. Control endpoints, for
bench/run.py only:
    GET  /_stats     {"unique": n, "total": n, "first": t, "last": t}
    GET  /_arrivals  {"arrivals": {idempotency key: first arrival time}}
    POST /_reset     forget everything

It is a bare asyncio protocol with a minimal HTTP/1.1 parser (Content-Length bodies over
keep-alive connections), not an aiohttp app, for the same reason the load generator has its
own client: it shares the 2 cores with the server under test. As an aiohttp app it used
0.18 ms of CPU per call, as much as the relay's own HTTP client work, and a drain measured
the fake as much as the relay. This one uses a fraction of that.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import time
from typing import Any

_OK = b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 11\r\n\r\n{"ok":true}'


class Recorder:
    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.total = 0
        self.first = 0.0
        self.last = 0.0

    def revenue(self, key: str) -> None:
        now = time.monotonic()
        self.total += 1
        if key not in self.arrivals:
            self.arrivals[key] = now
            if len(self.arrivals) == 1:
                self.first = now
            self.last = now

    def control(self, method: bytes, path: bytes) -> Any:
        if method == b"GET" and path == b"/_stats":
            return {
                "unique": len(self.arrivals),
                "total": self.total,
                "first": self.first,
                "last": self.last,
            }
        if method == b"GET" and path == b"/_arrivals":
            return {"arrivals": self.arrivals}
        if method == b"POST" and path == b"/_reset":
            self.reset()
            return {"ok": True}
        return None


class FakeFaurya(asyncio.Protocol):
    def __init__(self, recorder: Recorder) -> None:
        self.recorder = recorder
        self.buffer = b""
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport

    def data_received(self, data: bytes) -> None:
        assert self.transport is not None
        self.buffer += data
        out = []
        while True:
            end = self.buffer.find(b"\r\n\r\n")
            if end < 0:
                break
            head = self.buffer[:end].split(b"\r\n")
            headers = {}
            for line in head[1:]:
                name, _, value = line.partition(b":")
                headers[name.strip().lower()] = value.strip()
            if b"transfer-encoding" in headers:
                self.transport.write(
                    b"HTTP/1.1 411 Length Required\r\nContent-Length: 0\r\n"
                    b"Connection: close\r\n\r\n"
                )
                self.transport.close()
                return
            size = int(headers.get(b"content-length", b"0"))
            if len(self.buffer) < end + 4 + size:
                break
            self.buffer = self.buffer[end + 4 + size :]
            method, path, _ = head[0].split(b" ", 2)
            if method == b"POST" and path == b"/api/revenue":
                self.recorder.revenue(headers.get(b"idempotency-key", b"").decode())
                out.append(_OK)
                continue
            answer = self.recorder.control(method, path)
            if answer is None:
                out.append(b"HTTP/1.1 404 Not Found\r\nContent-Length: 0\r\n\r\n")
            else:
                body = json.dumps(answer).encode()
                out.append(
                    b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
                    b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
                )
        if out:
            self.transport.write(b"".join(out))


async def serve(port: int) -> None:
    recorder = Recorder()
    loop = asyncio.get_running_loop()
    server = await loop.create_server(lambda: FakeFaurya(recorder), "127.0.0.1", port, backlog=1024)
    sock_port = server.sockets[0].getsockname()[1]
    print(json.dumps({"event": "listening", "port": sock_port}), flush=True)
    async with server:
        await server.serve_forever()


def main() -> None:
    parser = argparse.ArgumentParser(description="fake Faurya for bench/run.py")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(parser.parse_args().port))


if __name__ == "__main__":
    main()
