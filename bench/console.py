"""The console's speed (docs/console.md: every page and API call within 100 ms, p95):

    .venv/bin/python bench/console.py             # 1,000,000 messages, about 5 minutes
    .venv/bin/python bench/console.py --quick     # 100,000 messages, no ack comparison

1. A store with `--messages` messages: the relay itself writes the schema and one real webhook,
   bench/prepopulate.py clones it into a year of delivered history (the console's search
   columns included); then one message in 200 is made dead (HTTP 422, as Faurya refusing it)
   and every message gets its one recorded attempt, as the workers would have written them.
2. The real `relay serve` on that store, its admin listener on a free loopback port, no token
   (open mode: no auth cost hides in the numbers; the auth checks are HMACs of microseconds).
3. Each API route and page is fetched `--requests` times one after the other (after a warm-up),
   and p50 / p95 / max are reported against the target: p95 under 100 ms.
4. Webhook acknowledgement at 1,000/s offered (bench/load.py, open loop), with the overview
   page reloaded every second during the load, against the same run without it
   (`--ack-runs` of each, alternating; the median p99 of each is compared).

Writes bench/results/console-<UTC timestamp>.json and prints a markdown table for
docs/performance.md.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import shutil
import signal
import socket
import sqlite3
import statistics
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench import prepopulate  # noqa: E402
from bench.common import LOOPBACK, BenchError, ServiceGroup, summarize_ms  # noqa: E402
from bench.orchestration import ACK_RATE, QUICK, Bench  # noqa: E402

TARGET_P95_MS = 100.0
DEAD_EVERY = 200  # one message in this many is dead
WARMUP = 5
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    with contextlib.closing(socket.socket()) as s:
        s.bind((LOOPBACK, 0))
        return int(s.getsockname()[1])


class ConsoleBench(Bench):
    """bench/run.py's services, with the admin listener on a port of our choosing."""

    admin_port = 0

    def relay_env(self) -> dict[str, str]:
        env = super().relay_env()
        env["RELAY_ADMIN_LISTEN"] = f"{LOOPBACK}:{self.admin_port}"
        return env


def shape(db: Path) -> dict[str, Any]:
    """Make one message in DEAD_EVERY dead and record each message's attempt, in one go."""
    started = time.monotonic()
    conn = sqlite3.connect(db, isolation_level=None)
    try:
        conn.execute("PRAGMA journal_mode = MEMORY")
        conn.execute("PRAGMA synchronous = OFF")
        conn.execute("BEGIN")
        conn.execute(
            "UPDATE outbound_messages SET status = 'dead', delivered_at = NULL, last_status = 422, "
            "last_error = ? WHERE id % ? = 0",
            ('permanent HTTP 422; HTTP 422: {"error": "unknown site"}', DEAD_EVERY),
        )
        conn.execute(
            "INSERT INTO message_attempts (message_id, attempt, at, outcome, http_status, "
            "duration_s, response_snippet) SELECT id, 1, COALESCE(delivered_at, updated_at), "
            "CASE status WHEN 'dead' THEN 'dead' ELSE 'delivered' END, last_status, 0.05, "
            "CASE status WHEN 'dead' THEN '{\"error\": \"unknown site\"}' ELSE '{\"ok\":true}' END "
            "FROM outbound_messages ORDER BY id"
        )
        conn.execute("COMMIT")
        counts = dict(
            conn.execute("SELECT status, COUNT(*) FROM outbound_messages GROUP BY status")
        )
        sample = conn.execute(
            "SELECT id, order_id, payment_ref FROM outbound_messages WHERE status = 'dead' "
            "ORDER BY id DESC LIMIT 1"
        ).fetchone()
    finally:
        conn.close()
    return {
        "seconds": time.monotonic() - started,
        "counts": counts,
        "dead_id": int(sample[0]),
        "dead_order_id": sample[1],  # the merchant's orderId: the same in every cloned row
        "dead_payment_ref": sample[2],  # Polar's order id: unique per row
    }


def fetch(url: str) -> tuple[int, float, int]:
    started = time.perf_counter()
    with _OPENER.open(url, timeout=30) as response:
        body = response.read()
        status = response.status
    return status, time.perf_counter() - started, len(body)


def cursor_of(url: str) -> str:
    with _OPENER.open(url, timeout=30) as response:
        data = json.loads(response.read())
    return str(data["next"])


def measure(base: str, paths: list[tuple[str, str]], requests: int) -> list[dict[str, Any]]:
    rows = []
    for name, path in paths:
        url = base + path
        for _ in range(WARMUP):
            fetch(url)
        times, size = [], 0
        for _ in range(requests):
            status, seconds, size = fetch(url)
            if status != 200:
                raise BenchError(f"{path} answered {status}")
            times.append(seconds)
        summary = summarize_ms(times)
        p95 = sorted(times)[int(0.95 * (len(times) - 1))] * 1000
        rows.append({"name": name, "path": path, "bytes": size, "p95": p95, **summary})
        verdict = "ok" if p95 < TARGET_P95_MS else "SLOW"
        print(
            f"  {name:<34} p50 {summary['p50']:7.1f}  p95 {p95:7.1f}  max {summary['max']:7.1f} ms"
            f"  {verdict}",
            flush=True,
        )
    return rows


class Reloader:
    """GET the overview once a second in a thread, as a person with the page open would."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.times: list[float] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):
                self.times.append(fetch(self.url)[1])
            self._stop.wait(1.0)

    def __enter__(self) -> Reloader:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=30)


def ack_comparison(bench: ConsoleBench, db: Path, runs: int, seconds: float) -> dict[str, Any]:
    """Open loop at ACK_RATE on the big store, with and without the overview reloading."""
    out: dict[str, list[dict[str, Any]]] = {"without": [], "with": []}
    overview = f"http://{LOOPBACK}:{bench.admin_port}/"

    def start() -> Any:
        return bench.start_relay(db, paused=False)

    for n in range(runs):
        for kind in ("without", "with"):
            service, url = start()
            try:
                bench.faurya_reset()
                if kind == "with":
                    with Reloader(overview) as reloader:
                        result = bench.load(
                            url, "open", rate=ACK_RATE, duration=seconds, watch_pid=service.pid
                        )
                    result["overview_ms"] = summarize_ms(reloader.times)
                else:
                    result = bench.load(
                        url, "open", rate=ACK_RATE, duration=seconds, watch_pid=service.pid
                    )
            finally:
                service.kill()
            p99 = result["latency_ms"]["p99"]
            print(
                f"  ack at {ACK_RATE:.0f}/s, {kind} overview reloads, run {n + 1}: p99 {p99:.1f} ms"
            )
            out[kind].append(
                {
                    "latency_ms": result["latency_ms"],
                    "accepted_per_s": result.get("accepted_per_s"),
                    "overview_ms": result.get("overview_ms"),
                }
            )
    return {
        kind: {
            "median_p99_ms": statistics.median(r["latency_ms"]["p99"] for r in results),
            "runs": results,
        }
        for kind, results in out.items()
    }


def _raise_on_sigterm(signum: int, frame: object) -> None:
    raise SystemExit(143)  # the finally below stops the relay and the fake Faurya


def main() -> int:
    signal.signal(signal.SIGTERM, _raise_on_sigterm)
    parser = argparse.ArgumentParser(description="Faurya Relay console benchmark")
    parser.add_argument("--quick", action="store_true", help="100,000 messages, no ack runs")
    parser.add_argument("--messages", type=int, default=None)
    parser.add_argument("--requests", type=int, default=100, help="per route (default 100)")
    parser.add_argument("--ack-runs", type=int, default=None)
    parser.add_argument("--ack-seconds", type=float, default=10.0)
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    args = parser.parse_args()
    messages = args.messages or (100_000 if args.quick else 1_000_000)
    ack_runs = args.ack_runs if args.ack_runs is not None else (0 if args.quick else 3)

    started_utc = datetime.now(UTC)
    workdir = Path(tempfile.mkdtemp(prefix="relay-console-bench-"))
    group = ServiceGroup()
    results: dict[str, Any] = {"messages": messages, "requests": args.requests}
    print(f"console benchmark, {messages:,} messages; work directory {workdir}", flush=True)
    bench = ConsoleBench(QUICK, workdir, group)
    bench.admin_port = free_port()
    try:
        bench.start_faurya()
        db = bench.new_db()
        template = bench.template(db)
        print(f"  {messages:,} messages written with sqlite3 ...", flush=True)
        results["prepopulated"] = prepopulate.populate(db, template, messages, delivered=True)
        results["shaped"] = shape(db)
        dead_id = results["shaped"]["dead_id"]
        order_id = results["shaped"]["dead_order_id"]
        polar_id = results["shaped"]["dead_payment_ref"]
        service, _ = bench.start_relay(db, paused=True)
        try:
            base = f"http://{LOOPBACK}:{bench.admin_port}"
            page2 = cursor_of(base + "/api/v1/messages?limit=50")
            paths = [
                ("API summary", "/api/v1/summary"),
                ("API messages (newest 50)", "/api/v1/messages"),
                ("API messages, page 2 (cursor)", f"/api/v1/messages?cursor={page2}"),
                ("API messages, dead", "/api/v1/messages?status=dead"),
                ("API messages, dead by amount", "/api/v1/messages?status=dead&sort=amount"),
                ("API messages, dead + delivered", "/api/v1/messages?status=dead,delivered"),
                ("API messages, 4xx", "/api/v1/messages?status_class=4xx"),
                ("API messages, search Polar order id", f"/api/v1/messages?q={polar_id}"),
                ("API messages, search shared orderId", f"/api/v1/messages?q={order_id}"),
                ("API messages, destination", "/api/v1/messages?destination=faurya"),
                ("API messages, route", "/api/v1/messages?route=order_paid"),
                ("API messages, last day", "/api/v1/messages?since=1d"),
                ("API messages, until 30 days ago", "/api/v1/messages?until=30d"),
                ("API message detail", f"/api/v1/messages/{dead_id}"),
                ("API dead/replay count", "/api/v1/dead/replay"),
                ("API audit", "/api/v1/audit"),
                ("API rejected", "/api/v1/rejected"),
                ("page overview", "/"),
                ("page messages", "/messages"),
                ("page dead letters by amount", "/messages?status=dead&sort=amount"),
                ("page search", f"/messages?q={polar_id}"),
                ("page message", f"/messages/{dead_id}"),
                ("page audit", "/audit"),
                ("page rejected", "/rejected"),
                ("page routes", "/routes"),
            ]
            results["routes"] = measure(base, paths, args.requests)
        finally:
            service.kill()
        if ack_runs:
            results["ack"] = ack_comparison(bench, db, ack_runs, args.ack_seconds)
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        group.close()
        if not args.keep:
            shutil.rmtree(workdir, ignore_errors=True)

    lines = [
        f"Console with {messages:,} messages ({results['shaped']['counts']}), "
        f"{args.requests} sequential requests per route, {started_utc:%Y-%m-%d %H:%M} UTC:",
        "",
        "| route | p50 ms | p95 ms | max ms | p95 < 100 ms |",
        "|---|---:|---:|---:|---|",
    ]
    for row in results["routes"]:
        ok = "yes" if row["p95"] < TARGET_P95_MS else "**no**"
        lines.append(
            f"| {row['name']} | {row['p50']:.1f} | {row['p95']:.1f} | {row['max']:.1f} | {ok} |"
        )
    if "ack" in results:
        ack = results["ack"]
        lines += [
            "",
            f"Webhook ack p99 at {ACK_RATE:.0f}/s offered on that store (median of {ack_runs}):"
            f" {ack['without']['median_p99_ms']:.1f} ms without the console, "
            f"{ack['with']['median_p99_ms']:.1f} ms with the overview reloaded every second.",
        ]
    text = "\n".join(lines)
    print()
    print(text)
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = started_utc.strftime("%Y%m%dT%H%M%SZ")
    (out_dir / f"console-{stamp}.json").write_text(json.dumps(results, indent=2, default=str))
    (out_dir / "console-latest.md").write_text(text + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
