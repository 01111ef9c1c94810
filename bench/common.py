"""Shared pieces of the benchmark: payloads, percentiles, /proc readings and the
subprocess handling of `bench/run.py`.

Every process of the benchmark measures time with `time.monotonic()`: on Linux that is
CLOCK_MONOTONIC, one clock for the whole machine, so a send time taken by the load generator
and an arrival time taken by the fake Faurya (two processes) can be subtracted.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))

from tests.helpers import LEGACY_SECRET, fixture_body, sign_headers  # noqa: E402

SECRET = LEGACY_SECRET  # a fake polar_whs_ secret; the relay and the inline server both get it
SITE_ID = "site_bench"
WRITE_KEY = "wk_bench_write_key"
WEBHOOK_PATH = "/webhooks/polar"
LOOPBACK = "127.0.0.1"


# ---------------------------------------------------------------- payloads


@dataclass(frozen=True, slots=True)
class Payload:
    """One signed order.paid webhook, ready to send."""

    order_id: str
    body: bytes
    headers: dict[str, str]

    @property
    def idempotency_key(self) -> str:
        """The key the relay (and the inline handler) sends to Faurya for this order."""
        return f"polar:order:{self.order_id}"


_PLACEHOLDER = "bench-order-id-placeholder"
_TEMPLATE: bytes | None = None


def order_paid_body(order_id: str) -> bytes:
    """The order.paid fixture with a new order id (`data.id`), compact JSON, like
    tests.helpers.order_paid but without parsing the fixture again for every payload."""
    global _TEMPLATE
    if _TEMPLATE is None:
        event = json.loads(fixture_body("order.paid.purchase.json"))
        event["data"]["id"] = _PLACEHOLDER
        _TEMPLATE = json.dumps(event).encode()
        assert _TEMPLATE.count(_PLACEHOLDER.encode()) == 1
    return _TEMPLATE.replace(_PLACEHOLDER.encode(), order_id.encode())


def make_payloads(count: int, prefix: str) -> list[Payload]:
    """`count` distinct, freshly signed webhooks (distinct webhook-id and order id)."""
    payloads = []
    for i in range(count):
        order_id = f"{prefix}-{i:08d}"
        body = order_paid_body(order_id)
        payloads.append(Payload(order_id, body, sign_headers(body, SECRET)))
    return payloads


# ---------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100) of an already sorted sequence; NaN when empty."""
    if not sorted_values:
        return math.nan
    rank = max(1, math.ceil(q / 100 * len(sorted_values)))
    return sorted_values[min(rank, len(sorted_values)) - 1]


def summarize_ms(values_s: Sequence[float]) -> dict[str, float]:
    """p50/p90/p99/max/mean in milliseconds of latencies given in seconds."""
    ordered = sorted(values_s)
    if not ordered:
        nan = math.nan
        return {"p50": nan, "p90": nan, "p99": nan, "max": nan, "mean": nan, "n": 0}
    return {
        "p50": percentile(ordered, 50) * 1000,
        "p90": percentile(ordered, 90) * 1000,
        "p99": percentile(ordered, 99) * 1000,
        "max": ordered[-1] * 1000,
        "mean": sum(ordered) / len(ordered) * 1000,
        "n": len(ordered),
    }


# ---------------------------------------------------------------- /proc

CLOCK_TICKS = os.sysconf("SC_CLK_TCK")


def process_tree(pid: int) -> list[int]:
    """`pid` and its descendants: a server under test is all of its processes (the relay's
    delivery processes do part of its work)."""
    found, todo = [], [pid]
    while todo:
        current = todo.pop()
        found.append(current)
        with contextlib.suppress(OSError):
            for task in Path(f"/proc/{current}/task").iterdir():
                todo += [int(c) for c in (task / "children").read_text().split()]
    return found


def _own_cpu_seconds(pid: int) -> float:
    text = Path(f"/proc/{pid}/stat").read_text()
    fields = text[text.rindex(")") + 2 :].split()  # fields[0] is field 3 (state)
    return (int(fields[11]) + int(fields[12])) / CLOCK_TICKS


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process and its descendants (all threads), from
    /proc/<pid>/stat. A descendant that exits between two readings takes its time with it."""
    total = 0.0
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            total += _own_cpu_seconds(member)
    return total


def cpu_ms_per_accepted(load: dict[str, Any]) -> float:
    """The server's CPU ms per accepted webhook in one bench.load result (`--watch-pid`)."""
    return float(load["server_cpu_s"]) * 1000 / max(int(load["accepted"]), 1)


def memory_kb(pid: int) -> dict[str, int]:
    """VmRSS (resident now) and VmHWM (peak resident) in KiB, from /proc/<pid>/status, summed
    over the process and its descendants."""
    found = {"VmRSS": 0, "VmHWM": 0}
    for member in process_tree(pid):
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{member}/status").read_text().splitlines():
                name, _, value = line.partition(":")
                if name in found:
                    found[name] += int(value.split()[0])
    return found


# ---------------------------------------------------------------- HTTP control (stdlib)

# No proxy, whatever the environment says: every request of the benchmark stays on loopback.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def http_json(url: str, *, method: str = "GET", timeout_s: float = 10.0) -> Any:
    """A small JSON request to one of our own loopback services."""
    assert url.startswith(f"http://{LOOPBACK}:"), url
    data = b"" if method == "POST" else None
    request = urllib.request.Request(url, method=method, data=data)  # noqa: S310 - http, loopback
    with _OPENER.open(request, timeout=timeout_s) as response:
        return json.loads(response.read())


# ---------------------------------------------------------------- subprocesses


class BenchError(RuntimeError):
    """A step of the benchmark could not be carried out (reported, then everything stops)."""


class Service:
    """A long-running subprocess (a server under test, the fake Faurya). Its stdout and stderr
    go to files in the run's work directory: nothing has to read a pipe while we measure."""

    def __init__(
        self, name: str, args: Sequence[str], workdir: Path, env: dict[str, str] | None = None
    ) -> None:
        self.name = name
        self.args = list(args)
        self.env = env
        self.stdout_path = workdir / f"{name}.out"
        self.stderr_path = workdir / f"{name}.err"
        self._proc: subprocess.Popen[bytes] | None = None
        self._files: list[IO[bytes]] = []

    @property
    def pid(self) -> int:
        assert self._proc is not None, f"{self.name} not started"
        return self._proc.pid

    @property
    def running(self) -> bool:
        return self._proc is not None and self._proc.poll() is None

    def start(self) -> Service:
        out = open(self.stdout_path, "ab")  # noqa: SIM115 - closed in stop()
        err = open(self.stderr_path, "ab")  # noqa: SIM115 - closed in stop()
        self._files = [out, err]
        self._proc = subprocess.Popen(
            self.args, stdin=subprocess.DEVNULL, stdout=out, stderr=err, env=self.env, cwd=REPO
        )
        return self

    def wait_json_line(
        self, predicate: Callable[[dict[str, Any]], bool], *, stderr: bool, timeout_s: float
    ) -> dict[str, Any]:
        """The first JSON line of the process's stdout (or stderr) that satisfies `predicate`.
        Polls the file until the deadline; fails at once if the process exits."""
        path = self.stderr_path if stderr else self.stdout_path
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            with contextlib.suppress(FileNotFoundError):
                for line in path.read_text(errors="replace").splitlines():
                    try:
                        record = json.loads(line)
                    except ValueError:
                        continue
                    if isinstance(record, dict) and predicate(record):
                        return record
            if not self.running:
                raise BenchError(f"{self.name} exited early:\n{self.tail()}")
            time.sleep(0.02)
        raise BenchError(f"{self.name}: no expected line within {timeout_s} s:\n{self.tail()}")

    def tail(self, lines: int = 20) -> str:
        chunks = []
        for path in (self.stdout_path, self.stderr_path):
            with contextlib.suppress(FileNotFoundError):
                chunks += path.read_text(errors="replace").splitlines()[-lines:]
        return "\n".join(chunks)

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after `timeout_s`; always reaps the process."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.send_signal(signal.SIGTERM)
            try:
                proc.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self.kill()
        self._close_files()

    def kill(self) -> None:
        """SIGKILL and reap (teardown, and relays whose database is thrown away anyway)."""
        proc = self._proc
        if proc is not None and proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                proc.kill()
            proc.wait(timeout=10)
        self._close_files()

    def _close_files(self) -> None:
        for handle in self._files:
            handle.close()
        self._files = []


class ServiceGroup:
    """Every service started in a run; `close()` (in a finally) stops whatever still runs."""

    def __init__(self) -> None:
        self.services: list[Service] = []

    def add(self, service: Service) -> Service:
        self.services.append(service)
        return service

    def close(self) -> None:
        for service in reversed(self.services):
            with contextlib.suppress(Exception):
                service.kill()
        self.services.clear()


def run_child(args: Sequence[str], timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run a short-lived subprocess to completion (killed at the deadline); its stdout."""
    try:
        done = subprocess.run(
            list(args),
            cwd=REPO,
            env=env,
            stdin=subprocess.DEVNULL,
            capture_output=True,
            timeout=timeout_s,
            check=False,
        )
    except subprocess.TimeoutExpired as exc:  # subprocess.run has killed it already
        raise BenchError(f"{args[:4]}... did not finish within {timeout_s} s") from exc
    if done.returncode != 0:
        raise BenchError(
            f"{args[:4]}... exited {done.returncode}:\n{done.stderr.decode(errors='replace')}"
        )
    return done.stdout.decode()
