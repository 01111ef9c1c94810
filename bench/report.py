"""The benchmark's report: the table (metrics x servers, the relay/trivial and relay/inline
ratios, the target, pass/fail), the run's environment, the Markdown text printed and kept, and
the files written (bench/results/<stamp>.json, bench/results/latest.md and, for a full run,
bench/RESULTS.md).
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import platform
import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench.accounting import NOISE_LIMIT, Accounting
from bench.common import cpu_ms_per_accepted
from bench.orchestration import (
    ACK_RATE,
    CONCURRENCIES,
    DRAIN_RSS_S,
    E2E_RATE,
    OPEN_ACK_RUNS,
    REPO,
    REPORT_CONCURRENCY,
)

SLOWDOWN_FLOOR = 0.9  # "no slowdown": at least 90% of the empty database's figure

Row = tuple[str, str, str, str, str, str, str, str, str]


def fmt(value: float | None, digits: int = 0) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return f"{value:,.{digits}f}"


def verdict(ok: bool, disturbed: bool) -> str:
    """A failure measured while other processes took CPU is marked: not conclusive."""
    return "pass" if ok else ("FAIL*" if disturbed else "FAIL")


def _ratio(num: float | None, den: float | None) -> str:
    if not den or num is None or math.isnan(den) or math.isnan(num):
        return ""
    return f"{num / den:.2f}"


def build_table(r: dict[str, Any]) -> tuple[list[Row], dict[str, bool]]:
    trivial, inline, relay = r["trivial"], r["inline"], r["relay"]
    rounds = len(relay["history"]["empty_drains"])
    rows: list[Row] = []
    checks: dict[str, bool] = {}

    def add(
        label: str,
        a: float | None,
        b: float | None,
        c: float | None,
        digits: int,
        target: str = "",
        ok: bool | None = None,
        noise: str | float | None = None,
    ) -> None:
        if isinstance(noise, str):  # "empty / full"
            disturbed = any(float(v) > NOISE_LIMIT for v in noise.split(" / "))
        else:
            disturbed = noise is not None and noise > NOISE_LIMIT
        rows.append(
            (
                label,
                fmt(a, digits),
                fmt(b, digits),
                fmt(c, digits),
                _ratio(c, a),
                _ratio(c, b),
                target,
                "" if ok is None else verdict(ok, disturbed),
                noise if isinstance(noise, str) else ("" if noise is None else fmt(noise, 2)),
            )
        )
        if ok is not None:
            checks[label] = ok

    servers = (trivial, inline, relay)
    for c in CONCURRENCIES:
        k = str(c)
        a, b, x = (s["closed"][k]["accepted_per_s"] for s in servers)
        noise = relay["closed"][k]["other_processes_cores"]
        add(
            f"accepted webhooks/s, closed loop, c={c}",
            a,
            b,
            x,
            0,
            ">= 1.0 x inline",
            x >= b,
            noise,
        )
    for c in CONCURRENCIES:
        k = str(c)
        noise = relay["closed"][k]["other_processes_cores"]
        for q in ("p50", "p99", "max"):
            a, b, x = (s["closed"][k]["latency_ms"][q] for s in servers)
            add(f"ack latency {q} ms, c={c}", a, b, x, 1, noise=noise)
    rate = f"{ACK_RATE:.0f}/s"
    noise = relay["open_ack"]["other_processes_cores"]
    a, b, x = (s["open_ack"]["accepted_per_s"] for s in servers)
    median = f"median of {OPEN_ACK_RUNS} runs" if OPEN_ACK_RUNS > 1 else "one run"
    add(f"answered 202/s at {rate} offered (open loop, {median})", a, b, x, 0, noise=noise)
    for q in ("p50", "p99", "max"):
        a, b, x = (s["open_ack"]["latency_ms"][q] for s in servers)
        target, ok = ("<= 10 ms", x <= 10.0) if q == "p99" else ("", None)
        add(f"ack latency {q} ms at {rate} offered", a, b, x, 1, target, ok, noise)
    a, b, x = (max(r["latency_ms"]["p99"] for r in s["open_ack"]["runs"]) for s in servers)
    add(f"ack latency p99 ms at {rate} offered, worst run", a, b, x, 1, noise=noise)
    e2e_rate = f"{E2E_RATE:.0f}/s"
    ie, re_ = inline["open_e2e"]["e2e"], relay["open_e2e"]["e2e"]
    noise = relay["open_e2e"]["other_processes_cores"]
    for q in ("p50", "p99", "max"):
        target, ok = ("<= 10 ms", re_["from_send_ms"][q] <= 10.0) if q == "p50" else ("", None)
        add(
            f"end-to-end {q} ms at {e2e_rate} (sent -> Faurya got it)",
            None,
            ie["from_send_ms"][q],
            re_["from_send_ms"][q],
            1,
            target,
            ok,
            noise,
        )
    add(
        f"end-to-end p50 ms at {e2e_rate} (202 received -> Faurya got it)",
        None,
        None,
        re_["from_ack_ms"]["p50"],
        1,
        noise=noise,
    )
    add(
        f"ack latency p99 ms at {e2e_rate}",
        None,
        inline["open_e2e"]["latency_ms"]["p99"],
        relay["open_e2e"]["latency_ms"]["p99"],
        1,
        noise=noise,
    )
    drain = relay["drain"]
    noise = drain["other_processes_cores"]
    add(
        f"drain of {drain['ingested']:,} backlog, messages/s (best of {rounds})",
        None,
        None,
        drain["steady_rate"],
        0,
        ">= 3,000",
        drain["steady_rate"] >= 3000,
        noise,
    )
    add(
        "drain, messages/s counted from `relay resume`",
        None,
        None,
        drain["rate_from_resume"],
        0,
        noise=noise,
    )
    add(
        f"accepted webhooks/s, deliveries paused, c={REPORT_CONCURRENCY} (same round)",
        None,
        None,
        drain["ingest"]["accepted_per_s"],
        0,
        noise=noise,
    )
    rss = relay["rss"]
    pending = rss["prepopulated"]["rows"]
    for label, key in (
        ("idle", "idle_kb"),
        (f"after {DRAIN_RSS_S:.0f} s of draining", "draining_kb"),
    ):
        mb = rss[key]["VmRSS"] / 1024
        add(f"RSS MB, {pending:,} pending, {label}", None, None, mb, 1, "<= 120", mb <= 120)
    k = str(REPORT_CONCURRENCY)
    a, b, x = (s["closed"][k]["server_memory_after_kb"]["VmRSS"] / 1024 for s in servers)
    add(f"RSS MB after the c={REPORT_CONCURRENCY} run", a, b, x, 1)
    # CPU per webhook: the baselines from the closed loop at c=REPORT_CONCURRENCY, the relay's
    # ingest from the same closed loop with deliveries paused and its delivery from the drain
    # that follows it (the same round), so that the two halves are counted apart.
    a, b = (cpu_ms_per_accepted(s["closed"][k]) for s in servers[:2])
    x_ingest = drain["ingest_cpu_s"] / max(drain["ingest"]["accepted"], 1) * 1000
    x_delivery = drain["drain_cpu_s"] / max(drain["delivered"], 1) * 1000
    add(
        "CPU s per 1,000 delivered webhooks (relay: ingest + delivery)",
        a,
        b,
        x_ingest + x_delivery,
        3,
        "<= 1.0 x inline",
        x_ingest + x_delivery <= b,
    )
    add(
        "CPU s per 1,000 accepted webhooks, relay ingest only",
        a,
        None,
        x_ingest,
        3,
        "<= 2.5 x trivial",
        x_ingest <= 2.5 * a,
    )
    add("CPU s per 1,000 webhooks, relay delivery only", None, None, x_delivery, 3)

    hist = relay["history"]
    rows_n = hist["prepopulated"]["rows"]
    label = f"{rows_n / 1e6:g}M" if rows_n >= 1_000_000 else f"{rows_n / 1e3:g}k"

    def best(
        runs: list[dict[str, Any]], value: Callable[[dict[str, Any]], float]
    ) -> dict[str, Any]:
        return max(runs, key=value)

    comparisons: list[tuple[str, str, Callable[[dict[str, Any]], float]]] = [
        (f"accepted webhooks/s, c={REPORT_CONCURRENCY}", "closed", lambda d: d["accepted_per_s"]),
        (
            "accepted webhooks/s, paused",
            "drains",
            lambda d: float(d["ingest"]["accepted_per_s"]),
        ),
        ("drain messages/s", "drains", lambda d: float(d["steady_rate"])),
    ]
    for name, kind, value in comparisons:
        empty = best(hist[f"empty_{kind}"], value)
        full = best(hist[f"full_{kind}"], value)
        add(
            f"{name}, {label} delivered rows (best of {rounds})",
            None,
            None,
            value(full),
            0,
            f">= {SLOWDOWN_FLOOR:.0%} of empty DB ({value(empty):,.0f})",
            value(full) >= SLOWDOWN_FLOOR * value(empty),
            f"{empty['other_processes_cores']:.2f} / {full['other_processes_cores']:.2f}",
        )
    return rows, checks


def render(rows: list[Row]) -> str:
    header = (
        "metric",
        "(a) trivial",
        "(b) inline",
        "(c) relay",
        "relay/trivial",
        "relay/inline",
        "target",
        "",
        "others",
    )
    widths = [max(len(row[i]) for row in [header, *rows]) for i in range(len(header))]

    def line(cells: tuple[str, ...]) -> str:
        parts = [
            cell.ljust(widths[i]) if i in (0, 6, 7) else cell.rjust(widths[i])
            for i, cell in enumerate(cells)
        ]
        return "| " + " | ".join(parts) + " |"

    rule = "|" + "|".join(
        "-" * (w + 1) + ":" if i not in (0, 6, 7) else "-" * (w + 2) for i, w in enumerate(widths)
    )
    return "\n".join([line(header), rule + "|", *(line(row) for row in rows)])


def source_digest() -> str:
    """One hash of the relay's code, migrations and shipped config: which relay was measured,
    even when it has uncommitted changes."""
    digest = hashlib.sha256()
    files = sorted((REPO / "relay").rglob("*.py")) + sorted((REPO / "relay").rglob("*.sql"))
    for path in [*files, REPO / "relay.toml"]:
        digest.update(str(path.relative_to(REPO)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()[:16]


def environment() -> dict[str, Any]:
    def git(*args: str) -> str:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            done = subprocess.run(
                ["git", *args], cwd=REPO, capture_output=True, text=True, timeout=10, check=False
            )
            return done.stdout.strip()
        return ""

    cpu = ""
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    import aiohttp

    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "aiohttp": aiohttp.__version__,
        "sqlite": __import__("sqlite3").sqlite_version,
        "kernel": platform.release(),
        "git_commit": git("rev-parse", "--short", "HEAD"),
        "git_dirty_relay": bool(git("status", "--porcelain", "--", "relay", "relay.toml")),
        "relay_source_sha256": source_digest(),
        "loadavg_at_start": Path("/proc/loadavg").read_text().split()[:3],
    }


def markdown(
    rows: list[Row], meta: dict[str, Any], checks: dict[str, bool], acct: Accounting
) -> str:
    passed = sum(checks.values())
    kept = [p for p in acct.phases if p["kept"]]
    busiest = max((p["other_processes_cores"] for p in kept), default=0.0)
    retried = sum(1 for p in acct.phases if not p["kept"])
    noisy = acct.noisy()
    env = meta["environment"]
    dirty = " (with uncommitted changes in relay/)" if env["git_dirty_relay"] else ""
    changed = meta["faurya_concurrency"]
    config = (
        "the shipped relay.toml"
        if changed is None
        else f"relay.toml, except destinations.faurya.concurrency = {changed}"
    )
    lines = [
        f"Benchmark run {meta['started_utc']} ({meta['settings']['mode']} run, "
        f"{meta['seconds']:.0f} s), `bench/run.py`.",
        f"Machine: {env['cpu']}, {env['cores']} cores; Python {env['python']}, "
        f"aiohttp {env['aiohttp']}, SQLite {env['sqlite']}; relay at git "
        f"{env['git_commit']}{dirty}, source digest {env['relay_source_sha256']}.",
        f"The relay ran with {config}: WAL, synchronous=FULL, every 202 after an fsync. "
        "The load generator and the fake Faurya ran on the same 2 cores.",
        "Speed check (µs per fixed unit of Python work, lower is faster; see "
        "docs/performance.md): "
        + ", ".join(f"{k} {v:.0f}" for k, v in meta["speed_check_us"].items())
        + ".",
        f"Other processes on the machine used up to {busiest:.2f} cores during a kept "
        f"measurement; {retried} disturbed measurement(s) were taken again "
        "(`phases` in the JSON).",
        "",
        render(rows),
        "",
        f"Targets met: {passed} of {len(checks)}. FAIL* marks a failure measured while other "
        f"processes used more than {NOISE_LIMIT} cores: not conclusive, run again on a quiet "
        "machine.",
    ]
    if noisy:
        lines.append(
            f"{len(noisy)} of {len(kept)} kept measurements were disturbed by other processes "
            f"using more than {NOISE_LIMIT} cores (column `others`: cores used by other "
            "processes during the relay's measurement; for the 1M rows: empty / full)."
        )
    return "\n".join(lines) + "\n"


def write_results(
    stamp: str,
    text: str,
    *,
    meta: dict[str, Any],
    phases: list[dict[str, Any]],
    checks: dict[str, bool],
    rows: list[Row],
    results: dict[str, Any],
    shipped: bool,
) -> list[Path]:
    """Everything measured to bench/results/<stamp>.json, the table to bench/results/latest.md
    and, for a full run of the shipped configuration (`shipped`), to bench/RESULTS.md (kept in
    git); the paths written."""
    out_dir = REPO / "bench" / "results"
    out_dir.mkdir(parents=True, exist_ok=True)
    document = {
        "meta": meta,
        "phases": phases,
        "checks": checks,
        "table": [
            dict(
                zip(
                    (
                        "metric",
                        "trivial",
                        "inline",
                        "relay",
                        "ratio_trivial",
                        "ratio_inline",
                        "target",
                        "result",
                        "other_processes_cores",
                    ),
                    row,
                    strict=True,
                )
            )
            for row in rows
        ],
        "results": results,
    }
    (out_dir / f"{stamp}.json").write_text(json.dumps(document, indent=1, default=str) + "\n")
    (out_dir / "latest.md").write_text(text)
    written = [out_dir / f"{stamp}.json", out_dir / "latest.md"]
    if shipped:
        (REPO / "bench" / "RESULTS.md").write_text("# Benchmark results\n\n" + text)
        written.append(REPO / "bench" / "RESULTS.md")
    return written
