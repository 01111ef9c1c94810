"""Storage faults: a database locked by another process, a full disk, read-only storage.

Whatever the storage does, a webhook the relay could not commit is answered 503 (Polar retries
it), nothing of it is stored, and /readyz says not-ready while even its own one-row synced write
fails. When the fault clears the relay recovers by itself: /readyz turns 200 with no webhook
needed, and Polar's retry of the same webhook is accepted. The database stays intact throughout.

Faults are real: a second process holding SQLite's write lock, and small tmpfs filesystems
mounted for the test (we run as root; without the right to mount, those tests skip).
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import functools
import os
import signal
import sqlite3
import subprocess
import sys
import tempfile
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import web
from pytest_aiohttp import AiohttpClient

from relay.app import METRICS, create_app
from relay.config import Config, parse
from relay.errors import StorageError
from tests.helpers import (
    REPO,
    Client,
    FakeFaurya,
    LogList,
    RelayProcess,
    env,
    logged,
    metric,
    order_paid,
    process_env,
    shipped_config,
    shipped_redaction,
    sign_headers,
    stored_form,
)
from tests.test_config import problems, shipped_raw

Mount = Callable[[str], Path]


def fast_failing(config: Config, *, paused: bool = False) -> Config:
    """The shipped config with a 100 ms busy timeout (a locked database fails fast instead of
    holding the webhook for the default 5 s) and no free-space check; `paused` keeps the
    delivery workers from writing, so only ingest and the readiness probe touch the storage."""
    # min_free_bytes 0: these tests' small filesystems are under the default threshold, and
    # what they test is the store's own failure, not the readiness warning before it.
    storage = dataclasses.replace(config.storage, busy_timeout_ms=100, min_free_bytes=0)
    faurya = dataclasses.replace(config.destinations["faurya"], paused=paused)
    destinations = {**config.destinations, "faurya": faurya}
    return dataclasses.replace(config, storage=storage, destinations=destinations)


class Webhook:
    """One signed order.paid, re-sent as Polar retries it: same webhook-id, fresh timestamp."""

    def __init__(self, **metadata: Any) -> None:
        self.order_id = str(uuid.uuid4())
        self.webhook_id = f"msg_{uuid.uuid4().hex}"
        self.body = order_paid(self.order_id, **metadata)

    @property
    def key(self) -> str:
        return f"polar:order:{self.order_id}"

    async def send(self, relay: Client | Remote) -> int:
        headers = sign_headers(self.body, msg_id=self.webhook_id)
        async with relay.post("/webhooks/polar", data=self.body, headers=headers) as resp:
            await resp.read()
            return resp.status


class Remote:
    """A relay subprocess, spoken to like a TestClient (paths relative to its address)."""

    def __init__(self, http: aiohttp.ClientSession, process: RelayProcess) -> None:
        self.http = http
        self.process = process

    def post(
        self, path: str, **kwargs: Any
    ) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.http.post(self.process.url + path, **kwargs)

    def get(self, path: str) -> contextlib.AbstractAsyncContextManager[aiohttp.ClientResponse]:
        return self.http.get(self.process.url + path)


async def ready_status(relay: Client | Remote) -> int:
    async with relay.get("/readyz") as resp:
        await resp.read()
        return resp.status


def stored(db_path: Path) -> dict[str, tuple[int, list[tuple[str, int]]]]:
    """What the database file holds, read with sqlite3: webhook-id -> (raw body length,
    [(idempotency key, body length) of its messages])."""
    uri = f"file:{db_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        events = db.execute("SELECT id, webhook_id, length(body) FROM inbound_events").fetchall()
        found = {}
        for event_id, webhook_id, body_length in events:
            messages = db.execute(
                "SELECT idempotency_key, length(body) FROM outbound_messages WHERE event_id = ?",
                (event_id,),
            ).fetchall()
            found[webhook_id] = (body_length, messages)
    return found


def integrity(db_path: Path) -> str:
    uri = f"file:{db_path}?mode=ro"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("PRAGMA integrity_check").fetchall()
    return "\n".join(str(r[0]) for r in rows)


def sample(relay: Client, name: str, **labels: str) -> float:
    return relay.app[METRICS].registry.get_sample_value(name, labels) or 0.0


def storage_errors(relay: Client) -> float:
    return sample(
        relay,
        "relay_webhooks_received_total",
        source="polar",
        event_type="order.paid",
        outcome="storage_error",
    )


# ---------------------------------------------------------------- a lock held by another process


class LockHolder:
    """Another process holding SQLite's write lock on the database (BEGIN EXCLUSIVE) until
    told to let go on its stdin."""

    SCRIPT = (
        "import sqlite3, sys\n"
        "db = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "db.execute('BEGIN EXCLUSIVE')\n"
        "print('locked', flush=True)\n"
        "sys.stdin.readline()\n"
        "db.execute('ROLLBACK')\n"
        "db.close()\n"
    )

    def __init__(self) -> None:
        self.proc: asyncio.subprocess.Process | None = None

    async def lock(self, db_path: Path) -> None:
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable,
            "-c",
            self.SCRIPT,
            str(db_path),
            stdin=asyncio.subprocess.PIPE,
            stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        line = await asyncio.wait_for(self.proc.stdout.readline(), timeout=10)
        assert line == b"locked\n"

    async def release(self) -> None:
        assert self.proc is not None
        assert self.proc.stdin is not None
        self.proc.stdin.write(b"go\n")
        await self.proc.stdin.drain()
        assert await asyncio.wait_for(self.proc.wait(), timeout=10) == 0

    async def close(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.kill()
            await self.proc.wait()


@pytest.fixture
async def lock_holder() -> AsyncIterator[LockHolder]:
    holder = LockHolder()
    yield holder
    await holder.close()


async def test_a_database_locked_by_another_process_answers_503_then_recovers(
    aiohttp_client: AiohttpClient,
    config: Config,
    db_path: Path,
    faurya: FakeFaurya,
    lock_holder: LockHolder,
    logs: LogList,
) -> None:
    """While another process holds the write lock, a webhook gets 503 and nothing of it is
    stored, and /readyz is 503; once the lock is gone /readyz is 200 by itself and Polar's
    retry is accepted, stored once and delivered once."""
    relay = await aiohttp_client(create_app(fast_failing(config), poll_interval_s=30))
    assert await ready_status(relay) == 200
    webhook = Webhook()

    await lock_holder.lock(db_path)
    status = await webhook.send(relay)

    assert status == 503
    assert stored(db_path) == {}
    assert storage_errors(relay) == 1
    assert sample(relay, "relay_store_commit_failures_total") == 1
    [failed] = logged(logs, "webhook_store_failed")
    assert failed["event_type"] == "order.paid"
    assert "locked" in failed["error"]
    async with relay.get("/readyz") as resp:
        assert resp.status == 503
        assert "locked" in (await resp.json())["checks"]["store"]
    assert sample(relay, "relay_ready") == 0

    await lock_holder.release()

    assert await ready_status(relay) == 200  # no webhook needed to turn ready again
    assert sample(relay, "relay_ready") == 1
    assert await webhook.send(relay) == 202
    [(body_length, messages)] = stored(db_path).values()
    assert body_length == len(stored_form(webhook.body, shipped_redaction()))
    assert [key for key, _ in messages] == [webhook.key]
    [call] = await faurya.wait_for(1)
    assert call.headers["idempotency-key"] == webhook.key
    assert storage_errors(relay) == 1
    assert sample(relay, "relay_store_commit_failures_total") == 1
    assert integrity(db_path) == "ok"


# ---------------------------------------------------------------- filesystems of our own


@functools.cache
def mount_unavailable() -> str | None:
    """Why this process cannot mount a tmpfs (None when it can): tried once, for real."""
    if os.geteuid() != 0:
        return "mounting a tmpfs needs root (CAP_SYS_ADMIN)"
    with tempfile.TemporaryDirectory() as where:
        tried = subprocess.run(
            ["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", where],
            capture_output=True,
            text=True,
            check=False,
        )
        if tried.returncode != 0:
            return f"cannot mount a tmpfs: {tried.stderr.strip() or tried.returncode}"
        subprocess.run(["umount", where], check=True)
    return None


def run(*argv: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True, check=False)
    assert done.returncode == 0, f"{' '.join(argv)}: {done.stderr.strip()}"


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Mount]:
    """Mounts small tmpfs filesystems under tmp_path; unmounted at teardown, after the apps
    (requested later by the test) have closed their files."""
    if (reason := mount_unavailable()) is not None:
        pytest.skip(reason)
    mounted: list[Path] = []

    def mount(size: str) -> Path:
        where = tmp_path / f"fs{len(mounted)}"
        where.mkdir()
        run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
        mounted.append(where)
        return where

    yield mount
    for where in reversed(mounted):
        done = subprocess.run(["umount", str(where)], capture_output=True, check=False)
        if done.returncode != 0:  # still busy: detach now, freed when the last file closes
            subprocess.run(["umount", "-l", str(where)], check=True)


def free_bytes(where: Path) -> int:
    stats = os.statvfs(where)
    return stats.f_bavail * stats.f_frsize


# ---------------------------------------------------------------- a full disk

BIG = "x" * 200_000  # a ~200 KB webhook body, under the 256 KiB limit


async def until(attempt: Callable[[], Awaitable[int]], wanted: int, limit: int = 500) -> list[int]:
    """Repeat `attempt` until it answers `wanted`; every answer. A finite disk ends this."""
    answers: list[int] = []
    while not answers or answers[-1] != wanted:
        assert len(answers) < limit, f"never answered {wanted}: {answers[-5:]}"
        answers.append(await attempt())
    return answers


@dataclasses.dataclass
class Burst:
    """Webhooks sent into storage that runs out of room, and what each was answered."""

    big: list[int]  # the answers to the ~200 KB webhooks
    answers: dict[Webhook, int]  # every webhook sent
    ready: list[int]  # /readyz, asked until it said 503

    @property
    def accepted(self) -> dict[str, Webhook]:
        return {w.webhook_id: w for w, status in self.answers.items() if status == 202}

    @property
    def refused(self) -> list[Webhook]:
        return [w for w, status in self.answers.items() if status == 503]


async def fill_up(relay: Client | Remote) -> Burst:
    """Eight big webhooks one by one, then small ones until one is refused too, then /readyz
    until its one-row probe no longer fits either (a failed commit leaves room in the WAL that
    the next, smaller one reuses: only then is the storage full to the last byte). /readyz
    trusts a successful probe for a second, but a refused webhook voids that: each /readyz
    after one probes again."""
    big = [Webhook(pad=BIG) for _ in range(8)]
    big_answers = [await webhook.send(relay) for webhook in big]
    small: list[Webhook] = []

    async def send_small() -> int:
        small.append(Webhook())
        return await small[-1].send(relay)

    small_answers = await until(send_small, 503)
    ready_answers: list[int] = []

    async def refused_then_ready() -> int:
        small_answers.append(await send_small())
        ready_answers.append(await ready_status(relay))
        return ready_answers[-1]

    await until(refused_then_ready, 503)
    answers = dict(zip(big + small, big_answers + small_answers, strict=True))
    return Burst(big_answers, answers, ready_answers)


def assert_whole_or_absent(db_path: Path, burst: Burst) -> None:
    """Only 202s and 503s; each 202 stored whole (raw body and its message), each 503 not at
    all; /readyz stayed 200 until the storage was full."""
    assert set(burst.answers.values()) == {202, 503}, burst.answers.values()  # no 500
    assert 1 <= burst.big.count(202) < len(burst.big)
    assert set(burst.ready[:-1]) <= {200}
    contents = stored(db_path)
    assert set(contents) == set(burst.accepted)
    for webhook_id, (body_length, messages) in contents.items():
        webhook = burst.accepted[webhook_id]
        assert body_length == len(stored_form(webhook.body, shipped_redaction()))
        [(key, message_length)] = messages
        assert key == webhook.key
        assert message_length > 0


async def test_a_full_disk_answers_503_without_partial_events_then_recovers(
    tmpfs: Mount,
    aiohttp_client: AiohttpClient,
    faurya: FakeFaurya,
    logs: LogList,
) -> None:
    """On a full disk every webhook that cannot be committed gets 503 and leaves nothing,
    every 202 is stored whole, /readyz is 503 once even its one-row write fails; freeing
    space makes the relay ready and accepting again, with an intact database."""
    disk = tmpfs("4m")
    db_path = disk / "relay.db"
    config = fast_failing(shipped_config(faurya.url, db_path), paused=True)
    relay = await aiohttp_client(create_app(config, poll_interval_s=30))
    assert await ready_status(relay) == 200
    # A file of ours takes all but ~700 KB: room for two or three big webhooks.
    filler = disk / "filler"
    filler.write_bytes(b"\0" * (free_bytes(disk) - 700_000))

    burst = await fill_up(relay)

    assert_whole_or_absent(db_path, burst)
    assert burst.big[-1] == 503
    assert storage_errors(relay) == len(burst.refused)
    assert sample(relay, "relay_store_commit_failures_total") == len(burst.refused)
    failures = logged(logs, "webhook_store_failed")
    assert len(failures) == len(burst.refused)
    assert all("database or disk is full" in entry["error"] for entry in failures)
    async with relay.get("/readyz") as resp:
        assert resp.status == 503
        assert "full" in (await resp.json())["checks"]["store"]
    assert sample(relay, "relay_ready") == 0
    assert integrity(db_path) == "ok"

    filler.unlink()

    assert await ready_status(relay) == 200
    retried = burst.refused[:3]  # Polar retries what it was refused
    for webhook in retried:
        assert await webhook.send(relay) == 202
    contents = stored(db_path)
    assert set(contents) == set(burst.accepted) | {w.webhook_id for w in retried}
    assert contents[retried[0].webhook_id][0] == len(
        stored_form(retried[0].body, shipped_redaction())
    )
    assert integrity(db_path) == "ok"


# ---------------------------------------------------------------- read-only storage


async def test_read_only_storage_at_start_up_is_refused_then_served_once_writable(
    tmpfs: Mount, aiohttp_client: AiohttpClient, faurya: FakeFaurya
) -> None:
    """A relay whose storage is mounted read-only refuses to start (it could only answer
    503s while looking alive); once the filesystem is writable again it starts on the same,
    intact database, with Polar's retries accepted."""
    disk = tmpfs("8m")
    db_path = disk / "relay.db"
    config = fast_failing(shipped_config(faurya.url, db_path), paused=True)
    first, second = Webhook(), Webhook()
    relay = await aiohttp_client(create_app(config, poll_interval_s=30))
    assert await first.send(relay) == 202
    await relay.close()  # Linux refuses a read-only remount while files are open for writing
    run("mount", "-o", "remount,ro", str(disk))

    runner = web.AppRunner(create_app(config, poll_interval_s=30))
    with pytest.raises(StorageError, match="Read-only file system"):
        await runner.setup()
    await runner.cleanup()
    assert set(stored_immutable(db_path)) == {first.webhook_id}

    run("mount", "-o", "remount,rw", str(disk))

    relay = await aiohttp_client(create_app(config, poll_interval_s=30))
    assert await ready_status(relay) == 200
    assert await first.send(relay) == 202  # its retry: already stored, acknowledged
    assert await second.send(relay) == 202
    assert set(stored(db_path)) == {first.webhook_id, second.webhook_id}
    assert integrity(db_path) == "ok"


def stored_immutable(db_path: Path) -> dict[str, int]:
    """webhook-id -> body length, read from a database on a read-only filesystem."""
    uri = f"file:{db_path}?immutable=1"
    with contextlib.closing(sqlite3.connect(uri, uri=True)) as db:
        rows = db.execute("SELECT webhook_id, length(body) FROM inbound_events").fetchall()
    return dict(rows)


# ---------------------------------------------------------------- a file size limit

# Runs `relay serve` with a per-file size limit: writes past it fail with EFBIG (SIGXFSZ, which
# would kill the process, is ignored; both survive the exec). A wrapper, not preexec_fn: that is
# unsafe in a parent with threads, and ours has aiosqlite's.
LIMITED = (
    "import os, resource, signal, sys\n"
    "limit = int(sys.argv[1])\n"
    "resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))\n"
    "signal.signal(signal.SIGXFSZ, signal.SIG_IGN)\n"
    "os.execv(sys.argv[2], sys.argv[2:])\n"
)


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession() as session:
        yield session


@pytest.fixture
async def processes() -> AsyncIterator[list[RelayProcess]]:
    """Relay processes to kill and reap at teardown."""
    made: list[RelayProcess] = []
    yield made
    for process in made:
        await process.close()


@pytest.mark.e2e
async def test_a_file_size_limit_answers_503_and_a_restart_serves_the_intact_database(
    tmp_path: Path,
    faurya: FakeFaurya,
    http: aiohttp.ClientSession,
    processes: list[RelayProcess],
) -> None:
    """`relay serve` whose files cannot grow past 1 MiB (no mount needed) answers 503 to what
    it cannot commit, stores every 202 whole and nothing of a 503, and turns not-ready; after
    a restart without the limit, Polar's retries are accepted and the database is intact."""
    db_path = tmp_path / "relay.db"
    config = tmp_path / "relay.toml"
    shipped = (REPO / "relay.toml").read_text()
    # Deliveries paused: only ingest and the readiness probe write.
    marker = "[destinations.faurya]\n"
    config.write_text(shipped.replace(marker, marker + "paused = true\n"))
    assert "paused = true" in config.read_text()
    environ = process_env(**env(FAURYA_URL=faurya.url))
    limited = RelayProcess(config, db_path, environ)
    limited.args = [sys.executable, "-c", LIMITED, str(1 << 20), *limited.args]
    processes.append(limited)
    await limited.start()
    relay = Remote(http, limited)
    assert await ready_status(relay) == 200

    burst = await fill_up(relay)

    assert_whole_or_absent(db_path, burst)
    async with http.get(f"{limited.admin_url}/metrics") as resp:
        exposition = await resp.text()
    failed = {"source": "polar", "event_type": "order.paid", "outcome": "storage_error"}
    assert metric(exposition, "relay_webhooks_received_total", failed) == len(burst.refused)
    assert metric(exposition, "relay_store_commit_failures_total") == len(burst.refused)
    assert metric(exposition, "relay_ready") == 0
    assert len(limited.logged("webhook_store_failed")) == len(burst.refused)
    assert integrity(db_path) == "ok"

    assert await limited.signal(signal.SIGTERM) == 0
    unlimited = RelayProcess(config, db_path, environ)
    processes.append(unlimited)
    await unlimited.start()
    relay = Remote(http, unlimited)

    assert await ready_status(relay) == 200
    retried = burst.refused[:3]
    for webhook in retried:
        assert await webhook.send(relay) == 202
    assert set(stored(db_path)) == set(burst.accepted) | {w.webhook_id for w in retried}
    assert integrity(db_path) == "ok"


# ---------------------------------------------------------------- free disk space


def with_min_free(config: Config, min_free_bytes: int) -> Config:
    storage = dataclasses.replace(config.storage, min_free_bytes=min_free_bytes)
    return dataclasses.replace(config, storage=storage)


async def test_readyz_turns_503_when_free_space_falls_under_min_free_bytes(
    aiohttp_client: AiohttpClient, config: Config, db_path: Path
) -> None:
    """A threshold above the disk's real free space (a disk cannot be filled cheaply): /readyz
    answers 503 naming the disk, the gauges give the free space and the threshold (what the
    alert compares), and webhooks are still stored: readiness warns before writes fail."""
    threshold = 2**62
    relay = await aiohttp_client(create_app(with_min_free(config, threshold)))
    stat = os.statvfs(db_path.parent)

    async with relay.get("/readyz") as resp:
        assert resp.status == 503
        checks = (await resp.json())["checks"]
    assert checks["store"] == checks["workers"] == "ok"
    free = int(checks["disk"].split()[0])
    assert checks["disk"] == (
        f"{free} bytes free on the database's filesystem, under "
        f"storage.min_free_bytes = {threshold}"
    )
    assert abs(free - stat.f_bavail * stat.f_frsize) < 1 << 30
    assert sample(relay, "relay_store_free_bytes") == free
    assert sample(relay, "relay_store_min_free_bytes") == threshold
    assert sample(relay, "relay_ready") == 0
    assert await Webhook().send(relay) == 202


async def test_readyz_is_ready_with_the_default_min_free_bytes(
    aiohttp_client: AiohttpClient, config: Config, tmp_path: Path
) -> None:
    """With the default threshold (256 MiB) on a disk with room, the disk check is ok, and a
    threshold of 0 turns the check off."""
    assert config.storage.min_free_bytes == 256 * 1024 * 1024
    relay = await aiohttp_client(create_app(config))
    async with relay.get("/readyz") as resp:
        assert resp.status == 200
        assert (await resp.json())["checks"]["disk"] == "ok"
    assert sample(relay, "relay_store_free_bytes") >= 256 * 1024 * 1024

    other = str(tmp_path / "other.db")
    unchecked = await aiohttp_client(create_app(with_min_free(config, 0), db_path=other))
    async with unchecked.get("/readyz") as resp:
        assert resp.status == 200
        assert "disk" not in (await resp.json())["checks"]


def test_min_free_bytes_is_read_from_relay_toml_and_checked() -> None:
    """`storage.min_free_bytes` is read from relay.toml; a negative value is a config error
    naming its key."""
    raw = shipped_raw((("storage", "min_free_bytes"), 1024))
    assert parse(raw, env()).storage.min_free_bytes == 1024
    assert problems(shipped_raw((("storage", "min_free_bytes"), -1))) == [
        "storage.min_free_bytes: must be between 0 and 4.61169e+18"
    ]
