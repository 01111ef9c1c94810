"""bench/run.py's "1M delivered rows" comparison for two checkouts of the relay, in pairs:

    .venv/bin/python -m bench.history_ab --a /path/to/old/checkout --b . [--rounds 5]

Each checkout's relay writes its own schema and template webhook (its own migrations), and
bench/prepopulate.py clones that into `--rows` delivered messages. Then, per round and for A
then B: the closed loop at c=64 on an empty database and on the populated one (deliveries on,
settled afterwards), as `Bench.history` runs it. Prints one JSON line per checkout and round:
accepted webhooks/s and the relay's CPU per accepted webhook on each database, and the ratio
full / empty. On a shared machine only the pairs mean anything: compare A and B round by round.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from dataclasses import replace
from pathlib import Path
from typing import Any

from bench import prepopulate
from bench.common import ServiceGroup, cpu_ms_per_accepted
from bench.orchestration import FULL, REPORT_CONCURRENCY, Bench


def _summary(result: dict[str, Any]) -> dict[str, float]:
    return {
        "per_s": round(result["accepted_per_s"], 1),
        "cpu_ms": round(cpu_ms_per_accepted(result), 4),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description="1M-row ingest comparison of two checkouts")
    parser.add_argument("--a", required=True, help="the first checkout (e.g. main)")
    parser.add_argument("--b", required=True, help="the second checkout")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--rows", type=int, default=FULL.delivered_rows)
    args = parser.parse_args()
    settings = replace(FULL, retries=0, quiet_budget_s=1.0)
    workdir = Path(tempfile.mkdtemp(prefix="relay-history-ab-"))
    group = ServiceGroup()
    try:
        benches: dict[str, Bench] = {}
        for name, src in (("a", args.a), ("b", args.b)):
            (workdir / name).mkdir()
            bench = Bench(settings, workdir / name, group)
            bench.relay_src = Path(src)
            benches[name] = bench
        benches["a"].start_faurya()
        benches["b"].faurya_url = benches["a"].faurya_url
        full: dict[str, Path] = {}
        for name, bench in benches.items():
            db = bench.new_db()
            started = time.monotonic()
            prepopulate.populate(db, bench.template(db), args.rows, delivered=True)
            print(f"  {name}: {args.rows:,} rows in {time.monotonic() - started:.0f} s", flush=True)
            full[name] = db
        for n in range(1, args.rounds + 1):
            for name, bench in benches.items():

                def fresh(bench: Bench = bench) -> Any:
                    return bench.start_relay(bench.new_db(), paused=False)

                def history(bench: Bench = bench, db: Path = full[name]) -> Any:
                    return bench.start_relay(db, paused=False)

                empty = bench.closed_once(fresh, REPORT_CONCURRENCY, None)
                filled = bench.closed_once(history, REPORT_CONCURRENCY, None, settle=True)
                line = {
                    "round": n,
                    "checkout": name,
                    "empty": _summary(empty),
                    "full": _summary(filled),
                    "ratio": round(filled["accepted_per_s"] / empty["accepted_per_s"], 3),
                }
                print(json.dumps(line), flush=True)
    finally:
        group.close()
        shutil.rmtree(workdir, ignore_errors=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
