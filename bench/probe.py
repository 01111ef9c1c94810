"""One ingest-then-drain round of the benchmark, for A/B comparisons of a change:

    .venv/bin/python -m bench.probe [--messages 10000] [--out probe.json]
    .venv/bin/python -m bench.probe --ack-seconds 6 [--out probe.json]

The relay starts with deliveries paused, takes `messages` webhooks at c=64 (closed loop),
then `relay resume` and the drain to the fake Faurya. Prints one JSON line: the relay's CPU
(process tree, from /proc) per 1,000 accepted webhooks (ingest) and per 1,000 delivered
messages (delivery), the acceptance rate and the drain rate. CPU per webhook is what an A/B
pair compares: it moves far less than the rates with the machine's other load.

With `--ack-seconds S`, it measures the acknowledgement instead: the relay (deliveries on)
takes webhooks at 1,000/s offered for S seconds (open loop, latency from each scheduled send),
and the line has the ack p50, p99 and max in ms and the relay's CPU per webhook.

To measure another checkout of the relay with the same bench code, give it with
`--relay-src /path/to/other/checkout`: the relay subprocesses get it first on PYTHONPATH.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
import tempfile
from dataclasses import replace
from pathlib import Path

from bench.common import ServiceGroup, cpu_ms_per_accepted
from bench.orchestration import ACK_RATE, QUICK, Bench


def main() -> int:
    parser = argparse.ArgumentParser(description="one ingest + drain round (A/B probes)")
    parser.add_argument("--messages", type=int, default=10_000)
    parser.add_argument("--out", help="also append the JSON line to this file")
    parser.add_argument("--relay-src", help="the relay's code from this checkout instead")
    parser.add_argument("--ack-seconds", type=float, help="measure the ack at 1,000/s instead")
    args = parser.parse_args()
    settings = replace(QUICK, drain=args.messages, retries=0)
    workdir = Path(tempfile.mkdtemp(prefix="relay-probe-"))
    group = ServiceGroup()
    try:
        bench = Bench(settings, workdir, group)
        if args.relay_src:
            bench.relay_src = Path(args.relay_src)
        bench.start_faurya()
        if args.ack_seconds:
            return _report(_ack(bench, args.ack_seconds), args.out)
        round_ = bench.drain(bench.new_db())
    finally:
        group.close()
        shutil.rmtree(workdir, ignore_errors=True)
    ingest = round_["ingest"]
    line = {
        "ingest_cpu_ms": round_["ingest_cpu_s"] / max(ingest["accepted"], 1) * 1000,
        "delivery_cpu_ms": round_["drain_cpu_s"] / max(round_["delivered"], 1) * 1000,
        "accepted_per_s": ingest["accepted_per_s"],
        "drain_per_s": round_["steady_rate"],
    }
    line["total_cpu_ms"] = line["ingest_cpu_ms"] + line["delivery_cpu_ms"]
    return _report(line, args.out)


def _ack(bench: Bench, seconds: float) -> dict[str, float]:
    """One open loop at ACK_RATE on a fresh relay with deliveries on."""
    result = bench.open_loop(
        lambda: bench.start_relay(bench.new_db(), paused=False), ACK_RATE, seconds
    )
    latency = result["latency_ms"]
    return {
        "ack_p50_ms": latency["p50"],
        "ack_p99_ms": latency["p99"],
        "ack_max_ms": latency["max"],
        "accepted_per_s": result["accepted_per_s"],
        "cpu_ms": cpu_ms_per_accepted(result),
    }


def _report(line: dict[str, float], out: str | None) -> int:
    text = json.dumps({k: round(v, 4) for k, v in line.items()})
    print(text, flush=True)
    if out:
        with open(out, "a") as out_file:
            out_file.write(text + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
