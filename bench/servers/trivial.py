"""(a) The framework's limit here: an aiohttp handler that reads the body and answers 202.

    python -m bench.servers.trivial [--port 0]

Prints `{"event": "listening", "port": N}` on stdout; stops on SIGTERM.
"""

from __future__ import annotations

import argparse
import asyncio

from aiohttp import web

from bench.servers.base import serve


async def handle(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(status=202)


def main() -> None:
    parser = argparse.ArgumentParser(description="trivial 202 server for bench/run.py")
    parser.add_argument("--port", type=int, default=0)
    port = parser.parse_args().port
    app = web.Application()
    app.router.add_post("/webhooks/polar", handle)
    asyncio.run(serve(app, port))


if __name__ == "__main__":
    main()
