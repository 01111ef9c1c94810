"""The `relay` command as an operator runs it: the installed console script, as a subprocess.

`check` and `serve` read the shipped relay.toml configured by environment variables; the
`outbox` commands read a database seeded through `relay.store.Store` and need no secrets.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import socket
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from relay import __version__
from relay.models import (
    Dead,
    EventStatus,
    InboundDraft,
    MessageStatus,
    OutboundDraft,
    RetryLater,
)
from relay.store import Store
from tests.helpers import (
    LEGACY_SECRET,
    REPO,
    STANDARD_SECRET,
    WRITE_KEY,
    FakeFaurya,
    RelayProcess,
    Run,
    configured,
    process_env,
    run_command,
    run_relay,
    wait_until,
)

pytestmark = pytest.mark.e2e

CONFIG = REPO / "relay.toml"


async def run(*argv: str, environ: dict[str, str] | None = None, timeout_s: float = 60) -> Run:
    return await run_command(*argv, environ=environ, timeout_s=timeout_s)


relay = run_relay


def without(name: str) -> dict[str, str]:
    environ = configured()
    del environ[name]
    return environ


# ---------------------------------------------------------------- check, config errors


async def test_check_prints_the_route_and_masks_the_write_key() -> None:
    """`relay check` accepts the shipped config, prints its route, and shows the write key
    only as ***."""
    result = await relay("check", "--config", str(CONFIG), environ=configured())

    assert result.code == 0, result.err
    assert "route polar-order-paid: polar order.paid (with conditions) -> faurya" in result.out
    assert "idempotency key: polar:order:{data.id}" in result.out
    assert "x-faurya-write-key: ***" in result.out
    for secret in (WRITE_KEY, LEGACY_SECRET, STANDARD_SECRET):
        assert secret not in result.out + result.err


@pytest.mark.parametrize(
    ("command", "variable"),
    [
        ("serve", "FAURYA_WRITE_KEY"),
        ("check --strict", "FAURYA_WRITE_KEY"),
        ("serve", "POLAR_WEBHOOK_SECRET"),
    ],
)
async def test_a_missing_variable_is_one_line_and_exit_2(
    command: str, variable: str, tmp_path: Path
) -> None:
    """`serve` and `check --strict` without a variable the config needs exit 2 with one line
    on stderr naming it, and create no database."""
    db = tmp_path / "relay.db"
    args = ["--config", str(CONFIG)]
    if command == "serve":
        args += ["--db", str(db), "--host", "127.0.0.1", "--port", "0"]

    result = await relay(*command.split(), *args, environ=without(variable))

    assert result.code == 2
    [line] = result.err.splitlines()
    assert line.startswith("relay: config error: ")
    assert f"environment variable {variable} is not set" in line
    assert result.out == ""
    assert not db.exists()


UNSET_NOTE = (
    "relay: note: not set, shown as <unset: NAME>: POLAR_WEBHOOK_SECRET, FAURYA_URL, "
    "FAURYA_SITE_ID, FAURYA_WRITE_KEY (relay serve needs them; relay check --strict fails on them)"
)


async def test_check_works_offline_and_shows_unset_variables() -> None:
    """`relay check` with none of the four variables set validates the config (exit 0), shows
    `<unset: NAME>` where a value would be, and says so once on stderr."""
    result = await relay("check", "--config", str(CONFIG), environ=process_env())

    assert result.code == 0, result.err
    assert "destination faurya: POST <unset: FAURYA_URL>/api/revenue" in result.out
    assert "x-faurya-site-id: <unset: FAURYA_SITE_ID>" in result.out
    assert result.err.splitlines() == [UNSET_NOTE]


async def test_map_works_offline_with_unset_secrets() -> None:
    """`relay map --event FILE` with no variable set prints the request it would send, with
    `<unset: NAME>` in place of the URL and site id, and the note once."""
    result = await relay(
        "map", "--config", str(CONFIG), "--event",
        str(REPO / "tests/fixtures/polar/order.paid.purchase.json"), environ=process_env(),
    )  # fmt: skip

    assert result.code == 0, result.err
    assert "POST <unset: FAURYA_URL>/api/revenue" in result.out
    assert "x-faurya-site-id: <unset: FAURYA_SITE_ID>" in result.out
    assert '"amount": 4410' in result.out
    assert result.err.splitlines() == [UNSET_NOTE]


async def test_send_without_a_secret_says_which_it_needs() -> None:
    """`relay send --url URL FILE` without --secret and without POLAR_WEBHOOK_SECRET says it
    needs that secret (not the whole config) and sends nothing."""
    result = await relay(
        "send", "--config", str(CONFIG), "--url", "http://127.0.0.1:9/webhooks/polar",
        str(REPO / "tests/fixtures/polar/order.paid.purchase.json"), environ=process_env(),
    )  # fmt: skip

    assert result.code == 1
    assert result.err.splitlines()[-1] == (
        "relay: error: signing needs the webhook secret of source 'polar': give --secret, "
        "or set POLAR_WEBHOOK_SECRET (sources.polar.secrets)"
    )


async def test_config_errors_name_their_full_key_paths(tmp_path: Path) -> None:
    """A broken copy of relay.toml (an unknown key, a misspelt transform) exits 2 and lists
    every problem under its full key path, quoting no secret."""
    shipped = CONFIG.read_text()
    broken = shipped.replace('transform = "iso4217"', 'transform = "iso4271"', 1).replace(
        "max_attempts = 1000", "max_attempt = 1000"
    )
    assert broken.count("iso4271") == 1
    assert "max_attempt =" in broken
    config = tmp_path / "relay.toml"
    config.write_text(broken)

    result = await relay("check", "--config", str(config), environ=configured())

    assert result.code == 2
    assert result.out == ""
    header, *problems = result.err.splitlines()
    assert header == "relay: 2 config errors:"
    assert len(problems) == 2
    assert any(
        p.strip().startswith("destinations.faurya.retry.max_attempt: unknown key") for p in problems
    ), problems
    assert any(
        re.match(r"routes\[0\]\.body\.currency\.transform: unknown transform 'iso4271'", p.strip())
        for p in problems
    ), problems
    assert WRITE_KEY not in result.err


@pytest.mark.parametrize("command", ["serve", "check"])
async def test_a_missing_config_file_is_a_clear_error(command: str, tmp_path: Path) -> None:
    """A config path that does not exist exits 2 with one line naming the file."""
    missing = tmp_path / "nope.toml"

    result = await relay(command, "--config", str(missing), environ=configured())

    assert result.code == 2
    [line] = result.err.splitlines()
    assert line == (
        f"relay: config error: {missing}: no such config file (use --config or RELAY_CONFIG)"
    )


async def test_version_from_the_module_and_the_script() -> None:
    """`python -m relay --version` and `relay --version` print the installed version."""
    by_module, by_script = await asyncio.gather(
        run(sys.executable, "-m", "relay", "--version"), relay("--version")
    )

    assert (by_module.code, by_module.out) == (0, f"faurya-relay {__version__}\n")
    assert (by_script.code, by_script.out) == (0, f"faurya-relay {__version__}\n")


# ---------------------------------------------------------------- outbox


@dataclass(frozen=True)
class Seeded:
    """Message ids of a seeded outbox, by state."""

    dead: tuple[int, int]
    delivered: int
    pending: int
    body: dict[str, object]

    def with_dead(self, first: MessageStatus, second: MessageStatus) -> dict[int, MessageStatus]:
        """Every message's status once the two dead ones became `first` and `second`: the
        delivered and the pending one are left as they were."""
        return {
            self.dead[0]: first,
            self.dead[1]: second,
            self.delivered: MessageStatus.DELIVERED,
            self.pending: MessageStatus.PENDING,
        }


def _draft(order: str, body: bytes) -> InboundDraft:
    return InboundDraft(
        source="polar",
        webhook_id=f"msg_{order}",
        event_type="order.paid",
        received_at=time.time(),
        headers={"webhook-id": f"msg_{order}"},
        body=b"{}",
        status=EventStatus.ROUTED,
        messages=(OutboundDraft("polar-order-paid", "faurya", f"polar:order:{order}", body),),
    )


@pytest.fixture
async def seeded(db_path: Path) -> Seeded:
    """Four messages: two dead (Faurya said 422), one delivered, one waiting for a retry."""
    body = {"event": "purchase", "amount": 4410, "currency": "USD", "provider": "polar"}
    store = await Store.open(str(db_path))
    try:
        await store.enqueue_now(
            [_draft(o, json.dumps(body).encode()) for o in ("a", "b", "c", "d")]
        )
        a, b, c, d = await store.claim("faurya", 10, lease_s=60)
        for msg in (a, b):
            await store.mark_dead(msg, Dead("HTTP 422: permanent", 422), "HTTP 422: bad amount")
        await store.mark_delivered(c, 200)
        retry = RetryLater(at=time.time() + 3600, reason="HTTP 503", status=503)
        await store.mark_retry(d, retry, "HTTP 503")
    finally:
        await store.close()
    return Seeded(dead=(a.id, b.id), delivered=c.id, pending=d.id, body=body)


async def statuses(db_path: Path) -> dict[int, MessageStatus]:
    store = await Store.open(str(db_path))
    try:
        return {m.id: m.status for m in await store.list_messages()}
    finally:
        await store.close()


def json_lines(text: str) -> list[dict[str, object]]:
    return [json.loads(line) for line in text.splitlines()]


async def test_outbox_list_prints_a_table_without_any_secret_set(
    seeded: Seeded, db_path: Path
) -> None:
    """`outbox list --db` works with no relay variable in the environment and prints one
    table row per message, newest first."""
    result = await relay("outbox", "list", "--db", str(db_path))

    assert result.code == 0, result.err
    header, *rows, footer = result.out.splitlines()
    assert header.split()[:3] == ["ID", "STATUS", "ATTEMPTS"]
    assert header.split()[-1] == "KEY"
    assert footer == "(4 shown)"
    assert [row.split()[:2] for row in rows] == [
        [str(seeded.pending), "pending"],
        [str(seeded.delivered), "delivered"],
        [str(seeded.dead[1]), "dead"],
        [str(seeded.dead[0]), "dead"],
    ]
    assert rows[0].split()[-1] == "polar:order:d"


async def test_outbox_list_json_and_status_filter(seeded: Seeded, db_path: Path) -> None:
    """`outbox list --json` prints one JSON object per message, without bodies, and
    `--status dead` keeps only the dead ones."""
    everything, dead = await asyncio.gather(
        relay("outbox", "list", "--db", str(db_path), "--json"),
        relay("outbox", "list", "--db", str(db_path), "--json", "--status", "dead"),
    )

    assert everything.code == 0, everything.err
    records = json_lines(everything.out)
    assert {r["id"]: r["status"] for r in records} == {
        seeded.dead[0]: "dead",
        seeded.dead[1]: "dead",
        seeded.delivered: "delivered",
        seeded.pending: "pending",
    }
    assert all("body" not in r for r in records)
    assert dead.code == 0, dead.err
    assert sorted(int(str(r["id"])) for r in json_lines(dead.out)) == sorted(seeded.dead)


async def test_outbox_show_prints_the_message_with_its_body(seeded: Seeded, db_path: Path) -> None:
    """`outbox show ID` prints the message as JSON, its stored body decoded as JSON."""
    result = await relay("outbox", "show", str(seeded.dead[0]), "--db", str(db_path))

    assert result.code == 0, result.err
    shown = json.loads(result.out)
    assert shown["body"] == seeded.body
    assert shown["status"] == "dead"
    assert shown["idempotency_key"] == "polar:order:a"
    assert shown["last_status"] == 422
    assert "HTTP 422: bad amount" in shown["last_error"]


async def test_outbox_discard_needs_a_reason_and_gives_up_on_dead_messages_only(
    seeded: Seeded, db_path: Path
) -> None:
    """`outbox discard` without --reason is a usage error; with one, the dead message becomes
    `discarded` (reason and time kept, shown, counted by stats), while an id that is not dead
    is left alone and reported with exit 1."""
    no_reason = await relay("outbox", "discard", str(seeded.dead[0]), "--db", str(db_path))
    assert no_reason.code == 2
    assert "--reason" in no_reason.err
    no_selection = await relay("outbox", "discard", "--reason", "x", "--db", str(db_path))
    assert no_selection.code == 2
    assert no_selection.err.startswith("relay: give message ids or a filter")

    before = time.time()
    result = await relay(
        "outbox",
        "discard",
        str(seeded.dead[0]),
        str(seeded.delivered),
        "--reason",
        "test order, refunded by hand",
        "--db",
        str(db_path),
    )

    assert result.code == 1
    assert result.out == f"1 message(s) discarded (kept, never sent): {seeded.dead[0]}\n"
    assert result.err.splitlines() == [
        f"relay: not discarded (not dead): {seeded.delivered}; only dead messages can be discarded"
    ]
    assert await statuses(db_path) == seeded.with_dead(MessageStatus.DISCARDED, MessageStatus.DEAD)
    shown = json.loads(
        (await relay("outbox", "show", str(seeded.dead[0]), "--db", str(db_path))).out
    )
    assert shown["status"] == "discarded"
    assert shown["discard_reason"] == "test order, refunded by hand"
    assert before <= shown["discarded_at"] <= time.time()
    stats = (await relay("outbox", "stats", "--db", str(db_path))).out.splitlines()
    header, row = stats[0].split(), stats[1].split()
    assert dict(zip(header[1:6], row[1:6], strict=True)) == {
        "pending": "1",
        "inflight": "0",
        "delivered": "1",
        "dead": "1",
        "discarded": "1",
    }


async def test_outbox_show_of_a_missing_id_exits_1(seeded: Seeded, db_path: Path) -> None:
    """`outbox show` of an id that does not exist exits 1 with one line saying so."""
    result = await relay("outbox", "show", "999", "--db", str(db_path))

    assert result.code == 1
    assert result.out == ""
    assert result.err.splitlines() == ["relay: no message with id 999"]


async def test_outbox_retry_one_makes_it_pending(seeded: Seeded, db_path: Path) -> None:
    """`outbox retry ID` prints the count and makes that dead message pending, due now, with
    a fresh attempt budget; nothing else changes."""
    before = time.time()
    result = await relay("outbox", "retry", str(seeded.dead[0]), "--db", str(db_path))

    assert result.code == 0, result.err
    assert result.out == "1 message(s) scheduled for delivery now\n"
    assert await statuses(db_path) == seeded.with_dead(MessageStatus.PENDING, MessageStatus.DEAD)
    store = await Store.open(str(db_path))
    try:
        record = await store.get_message(seeded.dead[0])
    finally:
        await store.close()
    assert record is not None
    assert record.attempts == 0
    assert before - 1 <= record.next_attempt_at <= time.time()


async def test_outbox_retry_all_dead(seeded: Seeded, db_path: Path) -> None:
    """`outbox retry --all-dead` prints how many it rescheduled and leaves delivered ones
    alone."""
    result = await relay("outbox", "retry", "--all-dead", "--db", str(db_path))

    assert result.code == 0, result.err
    assert result.out == "2 message(s) scheduled for delivery now\n"
    assert await statuses(db_path) == seeded.with_dead(MessageStatus.PENDING, MessageStatus.PENDING)


async def test_outbox_retry_without_ids_is_a_usage_error(seeded: Seeded, db_path: Path) -> None:
    """`outbox retry` with neither ids nor --all-dead exits 2 and changes nothing."""
    before = await statuses(db_path)

    result = await relay("outbox", "retry", "--db", str(db_path))

    assert result.code == 2
    assert result.err.splitlines() == ["relay: give message ids or --all-dead"]
    assert await statuses(db_path) == before


async def test_outbox_finds_the_database_through_the_config_without_secrets(
    seeded: Seeded, db_path: Path
) -> None:
    """Without --db, `outbox list` takes storage.path from relay.toml (RELAY_DB) and still
    needs none of the secret variables."""
    environ = process_env(RELAY_DB=str(db_path))

    result = await relay("outbox", "list", "--json", "--config", str(CONFIG), environ=environ)

    assert result.code == 0, result.err
    assert len(json_lines(result.out)) == 4


async def test_outbox_commands_work_while_the_relay_serves(
    seeded: Seeded, db_path: Path, faurya: FakeFaurya
) -> None:
    """While `relay serve` holds the database, `outbox list` reads it and `outbox retry
    --all-dead` reschedules the dead messages, which the running relay then delivers."""
    serving = RelayProcess(CONFIG, db_path, configured(FAURYA_URL=faurya.url))
    try:
        await serving.start()

        listed = await relay("outbox", "list", "--json", "--db", str(db_path))
        assert listed.code == 0, listed.err
        assert len(json_lines(listed.out)) == 4

        retried = await relay("outbox", "retry", "--all-dead", "--db", str(db_path))
        assert retried.code == 0, retried.err
        assert retried.out == "2 message(s) scheduled for delivery now\n"

        calls = await faurya.wait_for(2)
        assert sorted(c.headers["idempotency-key"] for c in calls) == [
            "polar:order:a",
            "polar:order:b",
        ]

        async def recorded() -> bool:
            return list((await statuses(db_path)).values()).count(MessageStatus.DELIVERED) == 3

        await wait_until(recorded)
        assert await serving.signal(signal.SIGTERM) == 0
    finally:
        await serving.close()
    assert len(faurya.received) == 2  # the pending message waits for its retry time


# ---------------------------------------------------------------- a busy port


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A loopback port another process (this one) is listening on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield int(sock.getsockname()[1])


def one_line(err: str) -> str:
    lines = err.strip().splitlines()
    assert "Traceback" not in err
    return lines[-1]


async def test_serve_on_a_busy_port_says_so_in_one_line_and_exits_2(
    busy_port: int, db_path: Path
) -> None:
    """`relay serve --port P` while P is taken: exit 2 and one line naming the address, that it
    is in use and what changes it; no traceback."""
    result = await relay(
        "serve", "--host", "127.0.0.1", "--port", str(busy_port), "--db", str(db_path),
        environ=configured(),
    )  # fmt: skip

    assert result.code == 2
    assert one_line(result.err) == (
        f"relay: config error: server.port: 127.0.0.1:{busy_port} is already in use (another "
        "process listens there); change it with --port, --host or RELAY_PORT"
    )


async def test_a_busy_admin_port_says_so_in_one_line_and_exits_2(
    busy_port: int, db_path: Path, tmp_path: Path
) -> None:
    """An admin.listen address that is taken: exit 2 and one line naming admin.listen."""
    config = tmp_path / "relay.toml"
    minimal = (REPO / "config" / "relay.minimal.toml").read_text()
    config.write_text(
        minimal.replace(
            'listen = "${RELAY_ADMIN_LISTEN:-127.0.0.1:9090}"', f'listen = "127.0.0.1:{busy_port}"'
        )
    )

    result = await relay(
        "serve", "--config", str(config), "--host", "127.0.0.1", "--port", "0",
        "--db", str(db_path), environ=configured(),
    )  # fmt: skip

    assert result.code == 2
    assert one_line(result.err) == (
        f"relay: config error: admin.listen: 127.0.0.1:{busy_port} is already in use (another "
        "process listens there); change it with RELAY_ADMIN_LISTEN (admin.listen)"
    )


async def test_dev_on_a_busy_port_says_so_in_one_line_and_exits_2(busy_port: int) -> None:
    """`relay dev --port P` while P is taken: exit 2, one line, no traceback."""
    result = await relay(
        "dev", "--config", str(CONFIG), "--port", str(busy_port), environ=process_env()
    )

    assert result.code == 2
    assert one_line(result.err) == (
        f"relay: config error: --port: 127.0.0.1:{busy_port} is already in use (another "
        "process listens there); change it with --port or --host"
    )
