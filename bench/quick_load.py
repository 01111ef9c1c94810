"""A quick local load: the real `relay serve` as a subprocess, signed order.paid webhooks from
this process over loopback, and a fake Faurya (also here) that counts what arrives.

    .venv/bin/python bench/quick_load.py [--webhooks 5000] [--concurrency 64]

Prints acceptance throughput, acknowledgement latency (p50/p99/max) and the time until every
message reached the fake Faurya. The full benchmark (issue 7) will live beside this file.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

import aiohttp
from aiohttp import web

REPO = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(REPO))

from tests.helpers import LEGACY_SECRET, order_paid, sign_headers  # noqa: E402


async def fake_faurya(
    received: list[float], expected: int, done: asyncio.Event
) -> tuple[web.AppRunner, int]:
    async def handle(request: web.Request) -> web.Response:
        await request.read()
        received.append(time.perf_counter())
        if len(received) >= expected:
            done.set()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/api/revenue", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    return runner, int(runner.addresses[0][1])


async def start_relay(db: Path, faurya_port: int) -> tuple[asyncio.subprocess.Process, int]:
    relay = shutil.which("relay") or str(Path(sys.executable).parent / "relay")
    env = dict(
        os.environ,
        POLAR_WEBHOOK_SECRET=LEGACY_SECRET,
        FAURYA_URL=f"http://127.0.0.1:{faurya_port}",
        FAURYA_SITE_ID="bench",
        FAURYA_WRITE_KEY="bench-write-key",
    )
    proc = await asyncio.create_subprocess_exec(
        relay,
        "serve",
        "--config",
        str(REPO / "relay.toml"),
        "--db",
        str(db),
        "--host",
        "127.0.0.1",
        "--port",
        "0",
        env=env,
        stdout=asyncio.subprocess.DEVNULL,
        stderr=asyncio.subprocess.PIPE,
    )
    assert proc.stderr is not None
    async with asyncio.timeout(20):
        while True:
            line = await proc.stderr.readline()
            if not line:
                raise RuntimeError("relay exited before listening")
            entry = json.loads(line)
            if entry.get("event") == "relay_listening":
                break

    async def drain_logs() -> None:  # keep the pipe from filling up
        assert proc.stderr is not None
        while await proc.stderr.readline():
            pass

    asyncio.get_running_loop().create_task(drain_logs())
    return proc, int(entry["port"])


async def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--webhooks", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    args = parser.parse_args()

    received: list[float] = []
    all_delivered = asyncio.Event()
    runner, faurya_port = await fake_faurya(received, args.webhooks, all_delivered)
    with tempfile.TemporaryDirectory() as tmp:
        proc, port = await start_relay(Path(tmp) / "relay.db", faurya_port)
        url = f"http://127.0.0.1:{port}/webhooks/polar"
        payloads = []
        for _ in range(args.webhooks):
            body = order_paid(str(uuid.uuid4()))
            payloads.append((body, sign_headers(body)))
        latencies: list[float] = []
        statuses: dict[int, int] = {}
        queue = iter(payloads)
        connector = aiohttp.TCPConnector(limit=args.concurrency)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def client() -> None:
                for body, headers in queue:
                    t0 = time.perf_counter()
                    async with session.post(url, data=body, headers=headers) as resp:
                        await resp.read()
                        statuses[resp.status] = statuses.get(resp.status, 0) + 1
                    latencies.append(time.perf_counter() - t0)

            started = time.perf_counter()
            await asyncio.gather(*(client() for _ in range(args.concurrency)))
            accepted_s = time.perf_counter() - started
            async with asyncio.timeout(120):
                await all_delivered.wait()
            drained_s = received[-1] - started
        proc.send_signal(signal.SIGTERM)
        await proc.wait()
        await runner.cleanup()

    latencies.sort()
    q = statistics.quantiles(latencies, n=100)
    print(f"webhooks: {args.webhooks}, concurrency: {args.concurrency}, answers: {statuses}")
    print(f"accepted: {args.webhooks / accepted_s:,.0f} webhooks/s ({accepted_s:.2f} s for all)")
    print(
        f"ack latency: p50 {q[49] * 1000:.1f} ms, p99 {q[98] * 1000:.1f} ms, "
        f"max {latencies[-1] * 1000:.1f} ms"
    )
    print(
        f"all {len(received)} delivered to the fake Faurya {drained_s:.2f} s after the start "
        f"({args.webhooks / drained_s:,.0f} messages/s end to end)"
    )


if __name__ == "__main__":
    asyncio.run(main())
