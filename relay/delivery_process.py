"""Delivery attempts in child processes: aiohttp's client work off the serving event loop.

Owns: the child processes (`python -m relay.delivery_process FD`), the framed protocol over a
Unix socket pair, and `ProcessSenders`, which gives each destination worker the same
`send(msg) -> AttemptResult` as `relay.delivery.Sender`. A child only sends: it holds no
store and decides nothing, and each answer is an `AttemptResult` made by the same `Sender`
code (timeout, snippet, redaction). The serving process keeps the claims, the retry policy,
the acks, the metrics and the logs.

Why: CPython runs one process on one core, and the HTTP client is about half of the serving
loop's work per delivery. In a child it runs on another core, so a backlog drains faster and
webhooks keep the serving loop's time (docs/performance.md has the measurements).

Failure: a child that dies or stops answering fails its attempts as connection errors. They
are retried later, with the same idempotency key, and the next send starts a new child. A child
exits when its socket closes, when the relay stops. It dies with the relay at once when the
relay is killed with -9: on Linux the kernel kills it (PR_SET_PDEATHSIG), elsewhere it checks
its parent before each attempt. Either way it starts no attempt once the relay is gone (an
attempt sent then would be sent again after the restart: a duplicate Faurya must drop).
Secrets reach a child through the socket, never argv or the environment.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import itertools
import os
import pickle
import signal
import socket
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from relay import runtime
from relay.config import DestinationConfig
from relay.delivery import AttemptResult, Redactor, Sender, client_session
from relay.errors import RelayError
from relay.logs import configure, get_logger
from relay.metrics import Metrics
from relay.models import ClaimedMessage, ErrorKind

log = get_logger("relay.delivery_process")

_LENGTH = 4  # bytes of the big-endian frame length
# How long past the destination's own timeout a child may take to answer before it is
# judged stuck, killed and replaced.
ANSWER_GRACE_S = 5.0
START_TIMEOUT_S = 30.0  # for a child to import, read its setup and say it is ready
_READY = "ready"
# What a garbled or cut frame raises (besides asyncio.IncompleteReadError, an EOFError).
_BAD_FRAME = (pickle.UnpicklingError, ValueError, TypeError)
NICENESS = 10  # added to a child's nice value: the serving process wins a contended core
_PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


class ProcessGone(RelayError):
    """The child process exited (or was killed) before it answered."""


@dataclass(frozen=True, slots=True)
class _Setup:
    """The first frame a child reads: what it needs to build one Sender per destination."""

    destinations: tuple[DestinationConfig, ...]
    secret_values: tuple[str, ...]
    log_level: str
    log_format: str


def _frame(obj: Any) -> bytes:
    data = pickle.dumps(obj, protocol=pickle.HIGHEST_PROTOCOL)
    return len(data).to_bytes(_LENGTH, "big") + data


async def _read_frame(reader: asyncio.StreamReader) -> Any:
    size = int.from_bytes(await reader.readexactly(_LENGTH), "big")
    # Both ends are this package, over a socket pair only they hold: pickle is safe here.
    return pickle.loads(await reader.readexactly(size))  # noqa: S301


class _FrameWriter:
    """Frames written in the same loop iteration go out in one write."""

    def __init__(self, writer: asyncio.StreamWriter) -> None:
        self._writer = writer
        self._pending: list[bytes] = []

    def send(self, obj: Any) -> None:
        if not self._pending:
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(_frame(obj))

    def _flush(self) -> None:
        data, self._pending = b"".join(self._pending), []
        if not self._writer.is_closing():
            self._writer.write(data)


# ---------------------------------------------------------------- the serving side


class _Child:
    """One running child process and the attempts waiting for its answers."""

    def __init__(
        self,
        process: asyncio.subprocess.Process,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
    ) -> None:
        self.process = process
        self._writer = writer
        self._out = _FrameWriter(writer)
        self._waiting: dict[int, asyncio.Future[AttemptResult]] = {}
        self._seq = itertools.count()
        self._killed = False
        self._reader_task = asyncio.create_task(self._read(reader), name="delivery-process-reader")

    @property
    def alive(self) -> bool:
        # A child we killed is dead at once, before its socket's end is read: a send in
        # between must start its replacement, not fail on it.
        return not self._killed and not self._reader_task.done()

    async def send(self, destination: str, msg: ClaimedMessage) -> AttemptResult:
        if not self.alive:
            raise ProcessGone
        seq = next(self._seq)
        future: asyncio.Future[AttemptResult] = asyncio.get_running_loop().create_future()
        self._waiting[seq] = future
        try:
            self._out.send((seq, destination, msg.idempotency_key, msg.body))
            return await future
        finally:
            self._waiting.pop(seq, None)

    async def _read(self, reader: asyncio.StreamReader) -> None:
        try:
            while True:
                seq, fields = await _read_frame(reader)
                future = self._waiting.get(seq)
                if future is not None and not future.done():
                    future.set_result(AttemptResult.from_wire(fields))
        except (EOFError, ConnectionError, *_BAD_FRAME):
            pass  # gone (IncompleteReadError is an EOFError): fail what waits (below)
        finally:
            for future in self._waiting.values():
                if not future.done():
                    future.set_exception(ProcessGone())
            self._writer.close()

    async def close(self, timeout_s: float) -> int | None:
        """Close the socket (the child exits on EOF); kill it if it does not within
        `timeout_s`. Returns its exit code."""
        self._writer.close()
        try:
            async with asyncio.timeout(timeout_s):
                await self.process.wait()
        except TimeoutError:
            self.kill()
            await self.process.wait()
        self._reader_task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._reader_task
        return self.process.returncode

    def kill(self) -> None:
        self._killed = True
        with contextlib.suppress(ProcessLookupError):
            self.process.kill()


class ProcessSenders:
    """A pool of `count` children shared by every destination, started on `start()` and
    replaced on the next send after one exits."""

    def __init__(
        self,
        destinations: Sequence[DestinationConfig],
        secret_values: Sequence[str],
        count: int,
        *,
        log_level: str = "info",
        log_format: str = "json",
        metrics: Metrics | None = None,
        answer_grace_s: float = ANSWER_GRACE_S,
        python: str = sys.executable,
    ) -> None:
        self._setup = _Setup(tuple(destinations), tuple(secret_values), log_level, log_format)
        self._metrics = metrics
        self._answer_grace_s = answer_grace_s
        self._python = python  # the interpreter that runs a child (tests: one that fails)
        self._children: list[_Child | None] = [None] * count
        self._locks = [asyncio.Lock() for _ in range(count)]
        self._next = itertools.cycle(range(count))
        self._closed = False
        self._starting: asyncio.Task[None] | None = None
        self._abandoned: list[asyncio.subprocess.Process] = []  # killed mid-start
        self.started = 0  # children started so far (a rising count means they keep dying)

    async def start(self) -> None:
        """Start every child. One that fails to start is logged and tried again on the next
        send: the relay keeps taking webhooks, and their deliveries wait and retry."""
        for slot in range(len(self._children)):
            with contextlib.suppress(ProcessGone):
                await self._child(slot)

    def start_soon(self) -> None:
        """`start()` in the background: a child takes a moment to import and say it is ready,
        and the relay need not wait for that to take webhooks. A send meanwhile waits for its
        slot's child (the slot's lock is held while it starts)."""
        self._starting = asyncio.create_task(self.start(), name="delivery-processes-start")

    def pids(self) -> list[tuple[int, int]]:
        """(slot, pid) of each child now running."""
        return [
            (slot, child.process.pid)
            for slot, child in enumerate(self._children)
            if child is not None and child.alive
        ]

    def sender(self, destination: DestinationConfig) -> ProcessSender:
        return ProcessSender(self, destination)

    async def _child(self, slot: int) -> _Child:
        child = self._children[slot]
        if child is not None and child.alive:
            return child
        async with self._locks[slot]:
            child = self._children[slot]
            if child is not None and child.alive:
                return child
            if self._closed:
                raise ProcessGone
            if child is not None:
                code = await child.close(timeout_s=1.0)
                log.error("delivery_process_exited", slot=slot, exit_code=code)
            child = await self._spawn()
            self._children[slot] = child
            self.started += 1
            if self._metrics is not None:
                self._metrics.delivery_processes_started.inc()
            log.info("delivery_process_started", slot=slot, pid=child.process.pid)
            return child

    async def _spawn(self) -> _Child:
        try:
            ours, theirs = socket.socketpair(socket.AF_UNIX, socket.SOCK_STREAM)
        except OSError as exc:  # out of file descriptors: like a child that exits at once
            log.error("delivery_process_start_failed", error=exc.strerror or type(exc).__name__)
            raise ProcessGone from None
        try:
            process = await asyncio.create_subprocess_exec(
                self._python,
                "-m",
                "relay.delivery_process",
                str(theirs.fileno()),
                # The child checks its parent is still this process (see _die_with_parent).
                str(os.getpid()),
                pass_fds=(theirs.fileno(),),
                stdin=asyncio.subprocess.DEVNULL,
            )
        except OSError as exc:  # no interpreter, no fork: like a child that exits at once
            ours.close()
            log.error("delivery_process_start_failed", error=exc.strerror or type(exc).__name__)
            raise ProcessGone from None
        except BaseException:
            ours.close()
            raise
        finally:
            theirs.close()
        writer: asyncio.StreamWriter | None = None
        hello: Any = None
        try:
            reader, writer = await asyncio.open_unix_connection(sock=ours)
            writer.write(_frame(self._setup))
            # The child says it is ready once it has read the setup and can send: a child
            # that cannot start (a broken environment) is seen here, not at its first delivery.
            with contextlib.suppress(TimeoutError, EOFError, ConnectionError, *_BAD_FRAME):
                async with asyncio.timeout(START_TIMEOUT_S):
                    hello = await _read_frame(reader)
        except OSError as exc:
            # The socket failed after the child started: a failed start like any other (an
            # OSError escaping here would fail the attempt outright, and its message would
            # wait for its lease to expire).
            hello = exc
        except BaseException:  # cancelled (the relay is stopping): leave no child behind
            if writer is not None:
                writer.close()
            else:
                ours.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            self._abandoned.append(process)  # reaped by close(): a cancelled task cannot wait
            raise
        if hello != _READY:
            if writer is not None:
                writer.close()
            else:
                ours.close()
            with contextlib.suppress(ProcessLookupError):
                process.kill()
            code = await process.wait()
            fields: dict[str, Any] = {}
            if isinstance(hello, OSError):
                fields["error"] = hello.strerror or type(hello).__name__
            log.error("delivery_process_start_failed", pid=process.pid, exit_code=code, **fields)
            raise ProcessGone
        assert writer is not None
        return _Child(process, reader, writer)

    async def send(self, destination: DestinationConfig, msg: ClaimedMessage) -> AttemptResult:
        slot = next(self._next)
        started = time.perf_counter()
        child: _Child | None = None
        try:
            child = await self._child(slot)
            async with asyncio.timeout(destination.timeout_s + self._answer_grace_s):
                return await child.send(destination.name, msg)
        except ProcessGone:
            kind, detail = ErrorKind.CHILD_GONE, "the delivery process exited"
        except TimeoutError:
            # The child stopped answering (its own timeout would have answered by now).
            kind, detail = ErrorKind.TIMEOUT, "the delivery process did not answer"
            if child is not None:
                child.kill()
        return AttemptResult.failed(kind, detail, time.perf_counter() - started)

    async def close(self, timeout_s: float = 5.0) -> None:
        self._closed = True
        if self._starting is not None:
            # A child still starting is killed by _spawn on the way out (see there).
            self._starting.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._starting
        while self._abandoned:
            await self._abandoned.pop().wait()
        for slot, lock in enumerate(self._locks):
            # Under the slot's lock: a replacement being started now is closed too, and none
            # starts after this (`_child` checks `_closed` under the same lock).
            async with lock:
                child = self._children[slot]
                if child is not None:
                    await child.close(timeout_s)


class ProcessSender:
    """`Sender`'s interface for one destination, sending through the pool's children."""

    def __init__(self, pool: ProcessSenders, destination: DestinationConfig) -> None:
        self._pool = pool
        self._destination = destination

    async def send(self, msg: ClaimedMessage) -> AttemptResult:
        return await self._pool.send(self._destination, msg)


# ---------------------------------------------------------------- the child


def _die_with_parent(parent_pid: int) -> bool:
    """Ask the kernel to kill this child when its parent dies (Linux), then check the parent
    is still `parent_pid`: a parent that died before the request was made leaves no signal to
    send, and this child now has another parent. False when the parent is gone.

    PR_SET_PDEATHSIG fires when the parent's *thread* that forked the child exits: the relay
    starts its children from its event loop, which runs on its main thread for its whole life.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    return _parent_alive(parent_pid)


def _parent_alive(parent_pid: int | None) -> bool:
    """Our parent is still the relay that started us (an orphan is adopted by another)."""
    return parent_pid is None or os.getppid() == parent_pid


async def _serve(fd: int, parent_pid: int | None = None) -> None:
    reader, writer = await asyncio.open_unix_connection(sock=socket.socket(fileno=fd))
    try:
        setup: _Setup = await _read_frame(reader)
    except (asyncio.IncompleteReadError, ConnectionError):
        return
    configure(setup.log_level, setup.log_format, cache=True)
    redact = Redactor(setup.secret_values)
    out = _FrameWriter(writer)
    tasks: set[asyncio.Task[None]] = set()
    limit = sum(d.concurrency for d in setup.destinations)
    async with client_session(limit) as session:
        senders = {d.name: Sender(session, d, redact) for d in setup.destinations}
        writer.write(_frame(_READY))
        runtime.settle()

        async def attempt(seq: int, destination: str, key: str, body: bytes) -> None:
            if not _parent_alive(parent_pid):
                # The relay is gone (killed with -9): nobody takes the answer, and the message
                # is sent again after the restart. Sending it now would be a duplicate.
                return
            started = time.perf_counter()
            try:
                r = await senders[destination].post(key, body)
            except Exception as exc:  # a bug here must cost a retry, not a stuck slot
                detail = f"delivery process failed ({type(exc).__name__})"
                r = AttemptResult.failed(
                    ErrorKind.CHILD_ERROR, detail, time.perf_counter() - started
                )
            out.send((seq, r.to_wire()))

        while True:
            try:
                seq, destination, key, body = await _read_frame(reader)
            except (asyncio.IncompleteReadError, ConnectionError):
                break  # the relay closed the socket, or is gone
            if not _parent_alive(parent_pid):
                break  # what is left in the socket was meant for a relay that is gone
            task = asyncio.create_task(attempt(seq, destination, key, body))
            tasks.add(task)
            task.add_done_callback(tasks.discard)
        # Nobody is left to take the answers: the relay released these messages (or lost
        # them with a -9), and they are sent again under the same idempotency key.
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


def main(argv: Sequence[str]) -> int:
    # The relay stops its children by closing their socket, after its own graceful stop: a
    # Ctrl-C or a SIGTERM sent to the whole process group must not cut attempts short first.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # When the cores are busy, webhooks waiting for their 202 go first: a delivery can wait a
    # few milliseconds, an acknowledgement that Polar times out on cannot.
    with contextlib.suppress(OSError):
        os.nice(NICENESS)
    if not 1 <= len(argv) <= 2 or not all(arg.isdigit() for arg in argv):
        print(
            "usage: python -m relay.delivery_process FD [PARENT_PID] (started by relay serve)",
            file=sys.stderr,
        )
        return 2
    parent_pid = int(argv[1]) if len(argv) == 2 else None
    if parent_pid is not None and not _die_with_parent(parent_pid):
        return 1  # the relay died while this child started: nothing to do
    runtime.run(_serve(int(argv[0]), parent_pid))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
