"""The benchmark, in one command:

    .venv/bin/python bench/run.py            # full run, 5.5-7.5 minutes on 2 cores
    .venv/bin/python bench/run.py --quick    # smaller counts, about 2 minutes
    .venv/bin/python bench/run.py --faurya-concurrency 32   # another delivery concurrency

Three servers under test, each a subprocess on 127.0.0.1:
  (a) trivial  bench/servers/trivial.py: an aiohttp handler that answers 202 (the ceiling);
  (b) inline   bench/servers/inline.py: the guide's approach, verify and call Faurya inline;
  (c) relay    the real `relay serve` with the shipped relay.toml (WAL, synchronous=FULL).
Load comes from bench/load.py (another subprocess) with pre-signed order.paid webhooks;
deliveries go to bench/faurya.py (a third), which records when each idempotency key arrived.

Prints one table (metrics x servers, the relay/trivial and relay/inline ratios, the target,
pass/fail) and writes bench/results/<UTC timestamp>.json (everything measured),
bench/results/latest.md (the table) and, for a full run, bench/RESULTS.md (the table, kept in git).
See docs/performance.md for what each row measures.

This module is the command: `bench/orchestration.py` runs the servers and the measurements,
`bench/accounting.py` watches the machine's other load, `bench/report.py` builds the table
and writes the files.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import asdict
from datetime import UTC, datetime
from pathlib import Path
from types import FrameType
from typing import Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from bench.accounting import speed_check  # noqa: E402
from bench.common import BenchError, ServiceGroup  # noqa: E402
from bench.orchestration import FULL, QUICK, Bench  # noqa: E402
from bench.report import build_table, environment, markdown, write_results  # noqa: E402


def _raise_on_sigterm(signum: int, frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def main() -> int:
    parser = argparse.ArgumentParser(description="Faurya Relay benchmark")
    parser.add_argument("--quick", action="store_true", help="smaller counts, ~1-2 minutes")
    parser.add_argument("--keep", action="store_true", help="keep the work directory")
    parser.add_argument(
        "--faurya-concurrency",
        type=int,
        metavar="N",
        help="deliveries in flight (destinations.faurya.concurrency; default: as shipped)",
    )
    args = parser.parse_args()
    settings = QUICK if args.quick else FULL
    signal.signal(signal.SIGTERM, _raise_on_sigterm)

    started_utc = datetime.now(UTC)
    stamp = started_utc.strftime("%Y%m%dT%H%M%SZ")
    started = time.monotonic()
    workdir = Path(tempfile.mkdtemp(prefix="relay-bench-"))
    group = ServiceGroup()
    results: dict[str, Any] = {}
    print(f"Faurya Relay benchmark, {settings.mode} run; work directory {workdir}", flush=True)
    bench = Bench(settings, workdir, group, args.faurya_concurrency)
    speed: dict[str, float] = {"start": speed_check()}
    try:
        bench.start_faurya()
        results["trivial"] = bench.baseline("trivial")
        speed["after (a)"] = speed_check()
        results["inline"] = bench.baseline("inline")
        speed["after (b)"] = speed_check()
        results["relay"] = bench.relay()
        speed["after (c)"] = speed_check()
    except BenchError as exc:
        print(f"benchmark failed: {exc}", file=sys.stderr)
        return 1
    finally:
        group.close()
        if args.keep:
            print(f"work directory kept: {workdir}")
        else:
            shutil.rmtree(workdir, ignore_errors=True)

    meta = {
        "started_utc": started_utc.isoformat(timespec="seconds"),
        "seconds": time.monotonic() - started,
        "settings": asdict(settings),
        "faurya_concurrency": args.faurya_concurrency,
        "environment": environment(),
        "speed_check_us": speed,
        "workdir_kept": str(workdir) if args.keep else None,
    }
    rows, checks = build_table(results)
    text = markdown(rows, meta, checks, bench.acct)
    print()
    print(text)

    written = write_results(
        stamp,
        text,
        meta=meta,
        phases=bench.acct.phases,
        checks=checks,
        rows=rows,
        results=results,
        shipped=settings.mode == "full" and args.faurya_concurrency is None,
    )
    print("written: " + ", ".join(str(p.relative_to(REPO)) for p in written))
    return 0


if __name__ == "__main__":
    sys.exit(main())
