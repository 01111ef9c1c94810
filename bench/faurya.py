"""A fake Faurya for the benchmark: answers every revenue call 200 at once and records when
each idempotency key first arrived (time.monotonic(), comparable across processes).

    python -m bench.faurya [--port 0]

Prints one JSON line `{"event": "listening", "port": N}` on stdout. Control endpoints, for
bench/run.py only:
    GET  /_stats     {"unique": n, "total": n, "first": t, "last": t}
    GET  /_arrivals  {"arrivals": {idempotency key: first arrival time}}
    POST /_reset     forget everything
"""

from __future__ import annotations

import argparse
import asyncio
import time

from aiohttp import web

from bench.servers.base import serve


class Recorder:
    def __init__(self) -> None:
        self.arrivals: dict[str, float] = {}
        self.total = 0
        self.first = 0.0
        self.last = 0.0

    async def revenue(self, request: web.Request) -> web.Response:
        await request.read()
        now = time.monotonic()
        self.total += 1
        key = request.headers.get("idempotency-key", "")
        if key not in self.arrivals:
            self.arrivals[key] = now
            if len(self.arrivals) == 1:
                self.first = now
            self.last = now
        return web.json_response({"ok": True})

    async def stats(self, request: web.Request) -> web.Response:
        return web.json_response(
            {
                "unique": len(self.arrivals),
                "total": self.total,
                "first": self.first,
                "last": self.last,
            }
        )

    async def dump(self, request: web.Request) -> web.Response:
        return web.json_response({"arrivals": self.arrivals})

    async def reset(self, request: web.Request) -> web.Response:
        self.arrivals = {}
        self.total = 0
        self.first = self.last = 0.0
        return web.json_response({"ok": True})


def make_app() -> web.Application:
    recorder = Recorder()
    app = web.Application()
    app.router.add_post("/api/revenue", recorder.revenue)
    app.router.add_get("/_stats", recorder.stats)
    app.router.add_get("/_arrivals", recorder.dump)
    app.router.add_post("/_reset", recorder.reset)
    return app


def main() -> None:
    parser = argparse.ArgumentParser(description="fake Faurya for bench/run.py")
    parser.add_argument("--port", type=int, default=0)
    asyncio.run(serve(make_app(), parser.parse_args().port))


if __name__ == "__main__":
    main()
