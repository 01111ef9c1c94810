"""Running a benchmark server: loopback only, no access log, the port on stdout as JSON."""

from __future__ import annotations

import asyncio
import json
import signal

from aiohttp import web


async def serve(app: web.Application, port: int) -> None:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        await site.start()
        bound = int(runner.addresses[0][1])
        print(json.dumps({"event": "listening", "port": bound}), flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for signum in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(signum, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
