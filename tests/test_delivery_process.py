"""relay.delivery_process: delivery attempts made by child processes, against a fake Faurya.

Everything is real: the children are `python -m relay.delivery_process FD` processes, the fake
Faurya is an aiohttp server on loopback, and kills, stops and signals are real signals. A
child's pid comes from the pool's `delivery_process_started` log event; whether it still runs
is read from /proc (a zombie has exited). Nothing sleeps to synchronise: every wait is a
condition with a deadline.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import signal
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any, Protocol

import aiohttp
import pytest
from aiohttp import web
from multidict import CIMultiDict
from prometheus_client.parser import text_string_to_metric_families
from pytest_aiohttp import AiohttpClient, AiohttpServer

from relay.app import create_app
from relay.config import DestinationConfig, Header, Secret, parse
from relay.delivery import AttemptResult, Redactor, Sender
from relay.delivery_process import NICENESS, ProcessSenders
from relay.metrics import Metrics, status_class
from relay.models import ClaimedMessage, ErrorKind
from tests import test_e2e
from tests.helpers import (
    SECRETS,
    SITE_ID,
    WRITE_KEY,
    FakeFaurya,
    LogList,
    RelayProcess,
    admin_get,
    env,
    logged,
    order_paid,
    run_command,
    shipped_config,
    sign_headers,
    wait_until,
)
from tests.test_config import problems, shipped_raw
from tests.test_delivery import closed_port
from tests.test_e2e import MakeRelay, Switchboard

# test_e2e's fixtures, made this module's by name (an import of them would read as unused).
http = test_e2e.http
make_relay = test_e2e.make_relay
switchboard = test_e2e.switchboard
pytestmark = pytest.mark.usefixtures("logs")  # every test captures its log events

EXITED = "child_gone: the delivery process exited"
NO_ANSWER = "timeout: the delivery process did not answer"
STARTED = "relay_delivery_processes_started_total"
# Tests that need a timeout use small ones: the child judged stuck after 0.5 + 0.2 s.
TIMEOUT_S = 0.5
GRACE_S = 0.2
# A body whose exact bytes must arrive: non-ASCII, no trailing newline, not re-encoded.
BODY = '{"amount": 1999, "currency": "EUR", "note": "café ☕"}'.encode()


# ---------------------------------------------------------------- helpers and fixtures


def destination(
    url: str, name: str = "faurya", *, timeout_s: float = 5.0, concurrency: int = 8
) -> DestinationConfig:
    """A destination as relay.toml makes it: the site id in clear, the write key a Secret."""
    return DestinationConfig(
        name=name,
        url=url,
        headers=(
            Header("x-faurya-site-id", SITE_ID),
            Header("x-faurya-write-key", Secret(WRITE_KEY)),
        ),
        timeout_s=timeout_s,
        concurrency=concurrency,
    )


def claimed(key: str = "polar:order:1", body: bytes = BODY, dest: str = "faurya") -> ClaimedMessage:
    now = time.time()
    return ClaimedMessage(
        id=1,
        destination=dest,
        idempotency_key=key,
        body=body,
        attempt=1,
        created_at=now,
        retry_from_at=now,
        lease_token="lease-1",
    )


def running(pid: int) -> bool:
    """The process exists and has not exited (a zombie has: it only waits to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except (FileNotFoundError, ProcessLookupError):
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def command_line(pid: int) -> list[bytes]:
    return Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")


def state(pid: int) -> str:
    """The process state letter from /proc (R, S, T for stopped, Z...), "" when gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except (FileNotFoundError, ProcessLookupError):
        return ""


async def gone(pid: int, timeout_s: float = 30.0) -> None:
    async def exited() -> bool:
        return not running(pid)

    await wait_until(exited, timeout_s)


def started_pids(logs: LogList) -> list[int]:
    return [int(entry["pid"]) for entry in logged(logs, "delivery_process_started")]


def exit_codes(pool: ProcessSenders) -> list[int | None]:
    """The exit code of each of the pool's current children (no public accessor: a child
    closed by the pool leaves its code only on its asyncio Process)."""
    return [c.process.returncode for c in pool._children if c is not None]


def started_metric(metrics: Metrics) -> float | None:
    return metrics.registry.get_sample_value(STARTED)


@pytest.fixture
def log_secrets() -> tuple[str, ...]:
    """No log event of a test here may hold one of these."""
    return SECRETS


@pytest.fixture
def metrics() -> Metrics:
    return Metrics()


class MakePool(Protocol):
    def __call__(
        self, *destinations: DestinationConfig, count: int = 1, answer_grace_s: float = 5.0
    ) -> ProcessSenders: ...


@pytest.fixture
async def make_pool(metrics: Metrics) -> AsyncIterator[MakePool]:
    """Builds pools that share `metrics`; teardown closes each (killing what does not exit)."""
    made: list[ProcessSenders] = []

    def make(
        *destinations: DestinationConfig, count: int = 1, answer_grace_s: float = 5.0
    ) -> ProcessSenders:
        pool = ProcessSenders(
            destinations,
            SECRETS,
            count,
            log_level="debug",
            log_format="json",
            metrics=metrics,
            answer_grace_s=answer_grace_s,
        )
        made.append(pool)
        return pool

    yield make
    for pool in made:
        await pool.close(timeout_s=1.0)


async def child_pid(pool: ProcessSenders, logs: LogList) -> int:
    """Start the pool's only child; its pid, from the `delivery_process_started` event."""
    await pool.start()
    [pid] = started_pids(logs)
    assert running(pid)
    return pid


# ---------------------------------------------------------------- delivered


async def test_a_child_posts_the_exact_body_key_and_headers(
    make_pool: MakePool, faurya: FakeFaurya, logs: LogList, metrics: Metrics
) -> None:
    """Through a pool of one, Faurya gets the stored body bytes, the idempotency key, the
    destination's headers and the relay's content type; the answer comes back as the
    in-process Sender's AttemptResult. No secret is on the child's command line."""
    pool = make_pool(destination(f"{faurya.url}/api/revenue"), count=1)
    pid = await child_pid(pool, logs)

    result = await pool.sender(destination(f"{faurya.url}/api/revenue")).send(
        claimed("polar:order:c0ffee")
    )

    assert (result.status, result.error, result.retry_after) == (200, None, None)
    assert result.snippet == '{"ok": true}'
    assert result.duration_s > 0
    [call] = faurya.received
    assert call.body == BODY
    headers = CIMultiDict(call.headers)
    assert headers["idempotency-key"] == "polar:order:c0ffee"
    assert headers["x-faurya-write-key"] == WRITE_KEY
    assert headers["x-faurya-site-id"] == SITE_ID
    assert headers["content-type"] == "application/json"
    assert headers["user-agent"].startswith("faurya-relay/")
    cmdline = command_line(pid)
    assert cmdline[1:3] == [b"-m", b"relay.delivery_process"]
    assert not any(s.encode() in b" ".join(cmdline) for s in SECRETS)
    assert pool.started == 1
    assert started_metric(metrics) == 1
    assert logged(logs, "delivery_process_exited") == []


async def test_a_child_runs_at_a_lower_cpu_priority(make_pool: MakePool, logs: LogList) -> None:
    """A child's nice value is the relay's plus NICENESS: on a contended core, the serving
    process (webhooks waiting for their 202) runs first."""
    pool = make_pool(destination("http://127.0.0.1:9/api/revenue"), count=1)
    pid = await child_pid(pool, logs)

    def nice(of: int) -> int:
        return int(Path(f"/proc/{of}/stat").read_text().rsplit(")", 1)[1].split()[16])

    assert nice(pid) == min(19, nice(os.getpid()) + NICENESS)


async def test_a_child_that_cannot_start_is_logged_and_its_sends_fail_for_a_retry(
    metrics: Metrics, logs: LogList
) -> None:
    """A child that exits before saying it is ready (here: an interpreter that is `false`)
    fails the pool's start only in the log: the relay keeps serving, and each send fails as a
    connection error (the message is retried) after trying to start a child again."""
    pool = ProcessSenders(
        [destination("http://127.0.0.1:9/api/revenue")],
        SECRETS,
        1,
        metrics=metrics,
        python="/bin/false",
    )
    try:
        await pool.start()
        [failed] = logged(logs, "delivery_process_start_failed")
        # `false` exits 1; asyncio's child watcher reports 255 when the exit outran it.
        assert failed["exit_code"] in (1, 255)

        result = await pool.sender(destination("http://127.0.0.1:9/api/revenue")).send(
            claimed("polar:order:1")
        )

        assert (result.status, result.error) == (
            None,
            "child_gone: the delivery process exited",
        )
        assert len(logged(logs, "delivery_process_start_failed")) == 2
        assert pool.started == 0
        assert started_metric(metrics) in (None, 0.0)
    finally:
        await pool.close(timeout_s=1.0)


async def test_a_child_that_cannot_even_be_spawned_is_logged_and_close_still_works(
    metrics: Metrics, logs: LogList
) -> None:
    """No interpreter at the configured path: starting in the background logs it (no stray
    task error), sends fail as retryable connection errors, and closing the pool is clean."""
    pool = ProcessSenders(
        [destination("http://127.0.0.1:9/api/revenue")],
        SECRETS,
        1,
        metrics=metrics,
        python="/nonexistent/python",
    )
    pool.start_soon()

    async def logged_failure() -> bool:
        return bool(logged(logs, "delivery_process_start_failed"))

    await wait_until(logged_failure)
    assert logged(logs, "delivery_process_start_failed")[0]["error"] == "No such file or directory"
    result = await pool.sender(destination("http://127.0.0.1:9/api/revenue")).send(claimed())
    assert (result.status, result.error) == (None, "child_gone: the delivery process exited")
    await pool.close(timeout_s=1.0)
    assert pool.started == 0


async def test_two_destinations_share_one_child(
    make_pool: MakePool, faurya: FakeFaurya, aiohttp_server: AiohttpServer, logs: LogList
) -> None:
    """One child sends for two destinations with different URLs, each to its own URL."""
    other = FakeFaurya()
    other.url = str((await aiohttp_server(other.app())).make_url("")).rstrip("/")
    first = destination(f"{faurya.url}/api/revenue", "faurya")
    second = destination(f"{other.url}/api/revenue?via=second", "second")
    pool = make_pool(first, second, count=1)

    a = await pool.sender(first).send(claimed("key-a", b'{"to":"a"}'))
    b = await pool.sender(second).send(claimed("key-b", b'{"to":"b"}', dest="second"))

    assert (a.status, a.error, b.status, b.error) == (200, None, 200, None)
    assert [(c.headers["idempotency-key"], c.body) for c in faurya.received] == [
        ("key-a", b'{"to":"a"}')
    ]
    assert [(c.headers["idempotency-key"], c.body) for c in other.received] == [
        ("key-b", b'{"to":"b"}')
    ]
    assert pool.started == 1
    assert len(started_pids(logs)) == 1


async def test_concurrent_answers_reach_their_own_attempt(
    make_pool: MakePool, faurya: FakeFaurya
) -> None:
    """Twenty attempts at once through two children, answered in reverse order: each caller
    gets the answer to its own request."""
    count = 20
    arrived = asyncio.Event()

    async def answer(request: web.Request, n: int) -> web.Response:
        key = request.headers["idempotency-key"]
        if len(faurya.received) == count:
            arrived.set()
        await arrived.wait()  # all twenty are in flight at once
        await asyncio.sleep((count - int(key)) * 0.005)  # the last key answers first
        return web.Response(status=200 + int(key) % 4, text=f"answer to {key}")

    faurya.script = answer
    dest = destination(f"{faurya.url}/api/revenue", concurrency=count)
    pool = make_pool(dest, count=2)
    sender = pool.sender(dest)

    results = await asyncio.gather(*(sender.send(claimed(str(i))) for i in range(count)))

    assert [(r.status, r.snippet) for r in results] == [
        (200 + i % 4, f"answer to {i}") for i in range(count)
    ]
    assert pool.started == 2


# ---------------------------------------------------------------- Faurya's failures


async def test_a_secret_echoed_by_faurya_is_masked_in_the_snippet(
    make_pool: MakePool, faurya: FakeFaurya
) -> None:
    """A 500 whose body echoes the write key comes back with the key replaced by ***: the
    child redacts with the secret values it was given over the socket."""

    async def echo(request: web.Request, n: int) -> web.Response:
        return web.Response(status=500, text=f"bad key {request.headers['x-faurya-write-key']}!")

    faurya.script = echo
    dest = destination(f"{faurya.url}/api/revenue")
    pool = make_pool(dest)

    result = await pool.sender(dest).send(claimed())

    assert (result.status, result.error) == (500, None)
    assert result.snippet == "bad key ***!"
    assert WRITE_KEY not in result.snippet


async def in_process(dest: DestinationConfig, msg: ClaimedMessage) -> AttemptResult:
    """The same attempt made by the in-process Sender, for comparison."""
    async with aiohttp.ClientSession() as session:
        return await Sender(session, dest, Redactor(SECRETS)).send(msg)


async def test_a_failure_inside_the_child_is_answered_not_left_hanging(
    make_pool: MakePool, faurya: FakeFaurya, logs: LogList
) -> None:
    """An attempt that fails inside the child for a reason of the child's own (here: a
    destination it was not set up with) is answered at once as a connection error, to be
    retried; the slot is not held until the answer deadline, and the child lives on."""
    pool = make_pool(destination(f"{faurya.url}/api/revenue"), count=1, answer_grace_s=30.0)
    await child_pid(pool, logs)
    unknown = destination(f"{faurya.url}/api/revenue", "elsewhere", timeout_s=30.0)

    started = time.monotonic()
    result = await pool.send(unknown, claimed())

    assert time.monotonic() - started < 10  # far inside timeout_s + answer_grace_s (60 s)
    assert (result.status, result.error) == (
        None,
        "child_error: delivery process failed (KeyError)",
    )
    ok = await pool.sender(destination(f"{faurya.url}/api/revenue")).send(claimed())
    assert ok.status == 200
    assert pool.started == 1
    assert len(faurya.received) == 1  # only the good one reached Faurya


async def test_a_closed_port_is_a_connection_error_like_in_process(
    make_pool: MakePool, logs: LogList, metrics: Metrics
) -> None:
    """Connection refused: no status, and the same "connect: ..." text the in-process
    Sender gives. The child lives on."""
    dest = destination(f"http://127.0.0.1:{closed_port()}/api/revenue")
    pool = make_pool(dest)

    result = await pool.sender(dest).send(claimed())
    expected = await in_process(dest, claimed())

    assert result.status is None
    assert result.error is not None
    assert result.error.startswith("connect: ClientConnectorError")
    assert (result.status, result.error, result.snippet) == (
        expected.status,
        expected.error,
        expected.snippet,
    )
    assert pool.started == 1
    assert started_metric(metrics) == 1
    assert logged(logs, "delivery_process_exited") == []


async def test_a_hanging_faurya_is_a_timeout_like_in_process(
    make_pool: MakePool, faurya: FakeFaurya, switchboard: Switchboard
) -> None:
    """Faurya holds the request past the destination's timeout: the child's own timeout
    answers "timeout" (not the pool's did-not-answer), after about timeout_s."""
    switchboard.holding = True
    dest = destination(f"{faurya.url}/api/revenue", timeout_s=TIMEOUT_S)
    pool = make_pool(dest, answer_grace_s=2.0)
    await pool.start()

    started = time.perf_counter()
    result = await pool.sender(dest).send(claimed())
    took = time.perf_counter() - started
    expected = await in_process(dest, claimed())

    assert (result.status, result.error, result.snippet) == (None, "timeout", "")
    assert (expected.status, expected.error) == (None, "timeout")
    assert TIMEOUT_S <= took < TIMEOUT_S + 2.0
    assert pool.started == 1


# ---------------------------------------------------------------- a child's failures


async def test_a_killed_child_fails_its_attempt_and_is_replaced(
    make_pool: MakePool,
    faurya: FakeFaurya,
    switchboard: Switchboard,
    logs: LogList,
    metrics: Metrics,
) -> None:
    """SIGKILL while Faurya holds the child's request: the waiting send returns the
    exited error at once; the next send starts a new child and is delivered."""
    switchboard.holding = True
    dest = destination(f"{faurya.url}/api/revenue")
    pool = make_pool(dest)
    pid = await child_pid(pool, logs)
    sender = pool.sender(dest)

    pending = asyncio.create_task(sender.send(claimed("held")))
    await faurya.wait_for(1)
    os.kill(pid, signal.SIGKILL)
    async with asyncio.timeout(15):  # not Faurya's answer: it holds the request until teardown
        result = await pending

    assert (result.status, result.error, result.retry_after, result.snippet) == (
        None,
        EXITED,
        None,
        "",
    )
    switchboard.holding = False
    again = await sender.send(claimed("held"))

    assert (again.status, again.error) == (200, None)
    assert [c.headers["idempotency-key"] for c in faurya.received] == ["held", "held"]
    assert pool.started == 2
    assert started_metric(metrics) == 2
    [exited] = logged(logs, "delivery_process_exited")
    assert (exited["slot"], exited["exit_code"], exited["log_level"]) == (0, -9, "error")
    first, second = started_pids(logs)
    assert first == pid
    assert second != pid
    assert running(second)
    assert not running(pid)


async def test_a_stopped_child_times_out_is_killed_and_replaced(
    make_pool: MakePool, faurya: FakeFaurya, logs: LogList, metrics: Metrics
) -> None:
    """A child that stops answering (SIGSTOP) fails the attempt with the did-not-answer
    timeout after timeout_s + answer_grace_s, is killed, and the next send works."""
    dest = destination(f"{faurya.url}/api/revenue", timeout_s=TIMEOUT_S)
    pool = make_pool(dest, answer_grace_s=GRACE_S)
    pid = await child_pid(pool, logs)
    sender = pool.sender(dest)
    os.kill(pid, signal.SIGSTOP)

    async def stopped() -> bool:
        return state(pid) == "T"

    await wait_until(stopped)
    started = time.perf_counter()
    result = await sender.send(claimed("stuck"))
    took = time.perf_counter() - started

    assert (result.status, result.error, result.snippet) == (None, NO_ANSWER, "")
    # A timeout like any other: the metric says so (it said "error").
    assert (result.kind, status_class(result.status, result.kind)) == (ErrorKind.TIMEOUT, "timeout")
    # Not before the deadline; the upper bound leaves a loaded machine time to fire the timer
    # and kill the child, and still fails a deadline counted twice or a wait for the child.
    assert TIMEOUT_S + GRACE_S <= took < TIMEOUT_S + GRACE_S + 2.0
    assert TIMEOUT_S + GRACE_S <= result.duration_s < TIMEOUT_S + GRACE_S + 2.0
    assert faurya.received == []  # the stopped child never sent it
    await gone(pid)

    again = await sender.send(claimed("stuck"))

    assert (again.status, again.error) == (200, None)
    assert [c.headers["idempotency-key"] for c in faurya.received] == ["stuck"]
    assert pool.started == 2
    assert started_metric(metrics) == 2
    [exited] = logged(logs, "delivery_process_exited")
    assert exited["exit_code"] == -signal.SIGKILL
    assert len(started_pids(logs)) == 2


async def test_the_next_send_right_after_a_timeout_gets_a_new_child(
    make_pool: MakePool, faurya: FakeFaurya, logs: LogList, metrics: Metrics
) -> None:
    """The send right after a did-not-answer timeout, without waiting for anything, goes to a
    new child: the killed one is not used again."""
    dest = destination(f"{faurya.url}/api/revenue", timeout_s=TIMEOUT_S)
    pool = make_pool(dest, answer_grace_s=GRACE_S)
    pid = await child_pid(pool, logs)
    sender = pool.sender(dest)
    os.kill(pid, signal.SIGSTOP)

    first = await sender.send(claimed("stuck"))
    again = await sender.send(claimed("stuck"))

    assert first.error == NO_ANSWER
    assert (again.status, again.error) == (200, None)
    assert pool.started == 2
    assert started_metric(metrics) == 2
    await gone(pid)


# ---------------------------------------------------------------- stopping


async def test_close_ends_the_children_and_later_sends_fail(
    make_pool: MakePool, faurya: FakeFaurya, logs: LogList, metrics: Metrics
) -> None:
    """close() closes each child's socket: the children exit 0 by themselves. A send after
    close fails with the exited error and starts no new child."""
    dest = destination(f"{faurya.url}/api/revenue")
    pool = make_pool(dest, count=2)
    await pool.start()
    pids = started_pids(logs)
    assert len(pids) == 2
    assert all(running(pid) for pid in pids)
    assert (await pool.sender(dest).send(claimed())).status == 200

    async with asyncio.timeout(15):
        await pool.close()

    assert exit_codes(pool) == [0, 0]
    for pid in pids:
        await gone(pid)
    after = await pool.sender(dest).send(claimed("after-close"))
    assert (after.status, after.error) == (None, EXITED)
    assert pool.started == 2
    assert started_metric(metrics) == 2
    assert len(started_pids(logs)) == 2
    assert logged(logs, "delivery_process_exited") == []
    assert [c.headers["idempotency-key"] for c in faurya.received] == ["polar:order:1"]


def our_children() -> Iterator[tuple[int, str, bytes]]:
    """(pid, state, argv) of each child of this test process, from /proc."""
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            argv = (entry / "cmdline").read_bytes()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == os.getpid():
            yield int(entry.name), fields[0], argv


def starting_children() -> list[int]:
    """Live children of ours running relay.delivery_process."""
    return [
        pid for pid, _, argv in our_children() if b"relay.delivery_process" in argv and running(pid)
    ]


def zombie_children() -> list[int]:
    """Our children that exited and were never waited for."""
    return [pid for pid, state, _ in our_children() if state == "Z"]


async def test_closing_while_a_child_starts_leaves_no_child_behind(
    metrics: Metrics, logs: LogList
) -> None:
    """The relay starts its children in the background (start_soon) and may stop before
    one said it was ready: closing then kills the half-started child."""
    pool = ProcessSenders(
        [destination("http://127.0.0.1:9/api/revenue")], SECRETS, 1, metrics=metrics
    )
    pool.start_soon()

    async def spawned() -> bool:
        return bool(starting_children())

    await wait_until(spawned)
    await pool.close(timeout_s=1.0)

    async def none_left() -> bool:
        return not starting_children() and not zombie_children()

    await wait_until(none_left)  # killed and reaped: no zombie left behind


async def test_close_does_not_wait_for_a_held_request(
    make_pool: MakePool, faurya: FakeFaurya, switchboard: Switchboard, logs: LogList
) -> None:
    """An attempt still waiting for Faurya when the pool closes fails with the exited error
    (it is retried later under the same key); the child exits 0 without Faurya's answer."""
    switchboard.holding = True
    dest = destination(f"{faurya.url}/api/revenue")
    pool = make_pool(dest)
    pid = await child_pid(pool, logs)
    pending = asyncio.create_task(pool.sender(dest).send(claimed("held")))
    await faurya.wait_for(1)

    async with asyncio.timeout(15):  # Faurya holds the request until teardown
        await pool.close()
        result = await pending

    assert (result.status, result.error) == (None, EXITED)
    assert exit_codes(pool) == [0]
    await gone(pid)


async def test_a_child_ignores_sigint_and_sigterm(
    make_pool: MakePool, faurya: FakeFaurya, logs: LogList, metrics: Metrics
) -> None:
    """SIGINT and SIGTERM (a Ctrl-C or a `kill` of the whole process group) leave the child
    running and answering; it exits 0 once the pool closes its socket."""
    dest = destination(f"{faurya.url}/api/revenue")
    pool = make_pool(dest)
    pid = await child_pid(pool, logs)
    sender = pool.sender(dest)
    assert (await sender.send(claimed("before"))).status == 200  # its handlers are set

    os.kill(pid, signal.SIGINT)
    os.kill(pid, signal.SIGTERM)
    # Pending signals are delivered before the child returns from its next read of the
    # socket: had they killed it, this send would fail with the exited error.
    after = await sender.send(claimed("after"))

    assert (after.status, after.error) == (200, None)
    assert running(pid)
    assert pool.started == 1
    assert started_metric(metrics) == 1
    assert logged(logs, "delivery_process_exited") == []
    async with asyncio.timeout(15):
        await pool.close()
    assert exit_codes(pool) == [0]
    await gone(pid)


async def test_the_child_command_without_a_socket_is_a_usage_error() -> None:
    """`python -m relay.delivery_process` is started by relay serve with a socket fd; by hand,
    without one, it says so and exits 2."""
    run = await run_command(sys.executable, "-m", "relay.delivery_process", timeout_s=10)

    assert run.code == 2
    assert "usage: python -m relay.delivery_process FD" in run.err


async def test_a_child_whose_parent_is_not_the_given_pid_exits_without_serving() -> None:
    """A child told its relay is a pid that is not its parent (the relay died while it
    started, and it was adopted) exits 1 at once instead of waiting for work."""
    ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
    with ours, theirs:
        child = await asyncio.create_subprocess_exec(
            sys.executable,
            "-m",
            "relay.delivery_process",
            str(theirs.fileno()),
            str(os.getpid() + 5_000_000),  # never a pid: pid_max is at most 4194304
            pass_fds=(theirs.fileno(),),
            stdin=asyncio.subprocess.DEVNULL,
        )
        async with asyncio.timeout(10):
            assert await child.wait() == 1


async def test_an_os_error_after_the_child_started_is_a_failed_start_not_a_stray_error(
    metrics: Metrics, logs: LogList, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The child is running when its socket fails (an OSError where the pool connects to
    it): the send still answers with the exited error (so the worker records a retry now,
    instead of the message waiting out its lease), the child is killed and reaped, and the
    failure is logged as a failed start."""

    async def refuse(**_: Any) -> Any:
        raise OSError(errno.EMFILE, "Too many open files")

    # The one place a real OSError cannot be provoked on demand: the connection to a socket
    # pair the pool itself holds. asyncio's call is replaced, not ours.
    monkeypatch.setattr(asyncio, "open_unix_connection", refuse)
    dest = destination("http://127.0.0.1:9/api/revenue")
    pool = ProcessSenders([dest], SECRETS, 1, metrics=metrics)
    try:
        result = await pool.sender(dest).send(claimed())
        assert (result.status, result.error) == (None, EXITED)
        [failed] = logged(logs, "delivery_process_start_failed")
        assert failed["error"] == "Too many open files"
        assert failed["exit_code"] == -signal.SIGKILL
        assert not running(int(failed["pid"]))
        assert pool.started == 0
    finally:
        await pool.close(timeout_s=1.0)


# ---------------------------------------------------------------- relay serve


async def serving_child(relay: RelayProcess) -> int:
    """The pid of the relay's child. It starts beside the relay's own start-up (so webhooks
    are taken at once), and may report after relay_listening."""
    started = await relay.wait_log("delivery_process_started")
    assert len(relay.logged("delivery_process_started")) == 1
    pid = int(started["pid"])
    assert running(pid)
    return pid


@pytest.mark.e2e
async def test_relay_serve_delivers_through_its_child_and_leaves_no_orphan(
    make_relay: MakeRelay, faurya: FakeFaurya, http: aiohttp.ClientSession
) -> None:
    """The shipped relay.toml (delivery_processes = 1): a signed order.paid reaches Faurya
    through the child. SIGKILL of the relay: the child exits on its own (its socket closed).
    SIGTERM: the relay exits 0 and its child is gone."""
    relay = await make_relay().start()
    pid = await serving_child(relay)
    order = str(uuid.uuid4())
    body = order_paid(order)

    async with http.post(
        f"{relay.url}/webhooks/polar", data=body, headers=sign_headers(body)
    ) as resp:
        assert resp.status == 202
    [call] = await faurya.wait_for(1)
    assert call.headers["idempotency-key"] == f"polar:order:{order}"
    await relay.wait_log("delivery_succeeded")
    assert running(pid)

    # The child holds the relay's stderr too: the relay's output ends only when both exited.
    assert await relay.signal(signal.SIGKILL, timeout_s=10) == -signal.SIGKILL
    await gone(pid)

    restarted = await make_relay().start()
    second = await serving_child(restarted)
    assert second != pid
    assert await restarted.signal(signal.SIGTERM, timeout_s=10) == 0
    assert restarted.logged("relay_stopped")
    await gone(second)


async def test_metrics_show_each_childs_cpu_and_memory(
    aiohttp_client: AiohttpClient, faurya: FakeFaurya, db_path: Path
) -> None:
    """/metrics of a relay with a delivery child has the child's CPU time and resident
    memory, by slot, read from /proc at scrape time (process_* is the serving process's)."""
    client = await aiohttp_client(create_app(shipped_config(faurya.url, db_path)))
    samples: dict[str, float] = {}

    async def child_measured() -> bool:
        text = (await admin_get(client)).text
        samples.clear()
        for family in text_string_to_metric_families(text):
            for sample in family.samples:
                if sample.name.startswith("relay_delivery_process_") and sample.labels == {
                    "slot": "0"
                }:
                    samples[sample.name] = sample.value
        return len(samples) == 2

    await wait_until(child_measured)
    assert samples["relay_delivery_process_resident_memory_bytes"] > 5 * 1024 * 1024
    assert samples["relay_delivery_process_cpu_seconds_total"] > 0


# ---------------------------------------------------------------- configuration


def test_delivery_processes_defaults_to_none() -> None:
    """Without the key the serving process makes the requests itself (0 children)."""
    raw = shipped_raw()
    del raw["server"]["delivery_processes"]
    assert parse(raw, env()).server.delivery_processes == 0


@pytest.mark.parametrize(
    ("value", "problem"),
    [
        (17, "must be between 0 and 16"),
        (-1, "must be between 0 and 16"),
        (1.5, "must be an integer"),
        (True, "must be an integer"),
    ],
)
def test_bad_delivery_processes_is_a_config_error(value: Any, problem: str) -> None:
    raw = shipped_raw((("server", "delivery_processes"), value))
    assert problems(raw) == [f"server.delivery_processes: {problem}"]


def test_zero_delivery_processes_is_accepted() -> None:
    raw = shipped_raw((("server", "delivery_processes"), 0))
    assert parse(raw, env()).server.delivery_processes == 0


@pytest.mark.e2e
async def test_a_child_dies_with_its_killed_relay_and_sends_nothing_after(
    make_relay: MakeRelay,
    aiohttp_server: AiohttpServer,
    http: aiohttp.ClientSession,
    db_path: Path,
) -> None:
    """kill -9 of `relay serve` with attempts queued in its child (stopped, so they wait in
    its socket): the child dies with the relay, before it could run again, and Faurya sees no
    request start after the kill (each would be a duplicate after the restart)."""
    calls: list[str] = []

    async def record(request: web.Request) -> web.Response:
        calls.append(request.headers["idempotency-key"])
        await request.read()
        return web.json_response({"ok": True})

    app = web.Application()
    app.router.add_post("/api/revenue", record)
    server = await aiohttp_server(app)
    fake = FakeFaurya(url=str(server.make_url("")).rstrip("/"))
    relay = make_relay()
    relay.env["FAURYA_URL"] = fake.url
    await relay.start()
    pid = await serving_child(relay)
    # Deliveries first, so the child holds open connections to Faurya: with them, an attempt
    # it starts reaches Faurya at once.
    assert await test_e2e.send_orders(http, relay, test_e2e.new_orders(16)) == [202] * 16

    async def delivered() -> bool:
        return test_e2e.message_counts(db_path) == {"delivered": 16}

    await wait_until(delivered)
    os.kill(pid, signal.SIGSTOP)
    try:
        assert await test_e2e.send_orders(http, relay, test_e2e.new_orders(8)) == [202] * 8

        async def queued() -> bool:
            return test_e2e.message_counts(db_path).get("inflight") == 8

        await wait_until(queued)
        before = list(calls)

        relay.proc.send_signal(signal.SIGKILL)
        # Not relay.wait(): that also awaits the end of its stderr, which a child holds.
        await gone(relay.proc.pid)
        # Still stopped: only the kernel can end it now, and it must, at once.
        died_with_relay = True
        try:
            await gone(pid, timeout_s=10.0)
        except TimeoutError:
            died_with_relay = False
    finally:
        # A child that outlived its relay runs again here: what it then sends is the bug.
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGCONT)
    await gone(pid)

    async def disconnected() -> bool:
        # The child's connections closed and everything it wrote was read: nothing in flight.
        return not server.runner.server.connections  # type: ignore[union-attr]

    await wait_until(disconnected)
    assert len(before) == 16
    assert calls == before
    assert died_with_relay
