"""The operator commands: `relay outbox list|show|retry|discard|stats|events`, `replay`,
`reprocess`, `pause`, `resume`, `prune`, `backfill` and `migrate`.

Owns their arguments and what each opens: the commands that only need the database open it
without the config's secrets; `reprocess`, which runs the mapping again, loads the whole
config. What they select and print is relay/outbox_commands.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import os
from collections.abc import Callable
from typing import TYPE_CHECKING

from relay import outbox_commands as commands
from relay.cli.options import (
    add_statuses,
    add_time_range,
    common,
    config_path,
    db_path,
    load_config,
    with_db,
)
from relay.config import RetentionConfig, is_postgres_url, load_offline
from relay.errors import ConfigError
from relay.models import EventStatus, MessageStatus

if TYPE_CHECKING:
    from relay.cli.options import Subparsers

MESSAGE_STATUSES = [s.value for s in MessageStatus]
EVENT_STATUSES = [s.value for s in EventStatus]


def on_store(
    command: commands.Command, *, retention: bool = False, full_config: bool = False
) -> Callable[[argparse.Namespace], int]:
    """`command` as a CLI function: open the outbox, run it, close. `retention`: it needs the
    config's retention even with --db; `full_config`: it needs the whole config (secrets
    included: the routes' lookups)."""

    def run(args: argparse.Namespace) -> int:
        if full_config:
            config = load_config(args)
            ctx = commands.Context(config.retention, config)
            return asyncio.run(commands.run(command, args, config.storage.location, ctx))
        kept = RetentionConfig()
        if not args.db or retention:
            kept = load_offline(config_path(args), os.environ).retention
        ctx = commands.Context(kept, None)
        return asyncio.run(commands.run(command, args, db_path(args), ctx))

    return run


def add_outbox_parsers(subparsers: Subparsers) -> None:
    p = subparsers.add_parser("outbox", help="inspect and retry outbound messages")
    outbox = p.add_subparsers(dest="outbox_command", required=True)
    q = outbox.add_parser("list", parents=[common(), with_db()], help="list messages, newest first")
    _add_selection(q)
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=on_store(commands.list_messages))
    q = outbox.add_parser("show", parents=[common(), with_db()], help="one message with its body")
    q.add_argument("id", type=int)
    q.set_defaults(func=on_store(commands.show))
    q = outbox.add_parser(
        "retry",
        parents=[common(), with_db()],
        help="make dead (or waiting) messages due now, with fresh attempts",
    )
    q.add_argument("ids", type=int, nargs="*")
    q.add_argument("--all-dead", action="store_true")
    q.set_defaults(func=on_store(commands.retry))
    q = outbox.add_parser(
        "discard",
        parents=[common(), with_db()],
        help="give up on dead messages: kept and listed as discarded, never sent, no longer "
        "counted as dead (clears the dead-letter alert)",
    )
    q.add_argument("ids", type=int, nargs="*", help="message ids (else: the filters)")
    q.add_argument("--reason", required=True, help="why (kept with each message)")
    q.add_argument("--destination")
    q.add_argument("--event-type")
    add_time_range(q)
    q.add_argument("--dry-run", action="store_true", help="only list what would be discarded")
    q.set_defaults(func=on_store(commands.discard))
    q = outbox.add_parser(
        "stats",
        parents=[common(), with_db()],
        help="messages by destination and status, and pause states",
    )
    q.set_defaults(func=on_store(commands.stats))
    q = outbox.add_parser(
        "events",
        parents=[common(), with_db()],
        help="inbound webhooks, newest first, with what happened to each (e.g. --status "
        "unmappable shows the reason nothing was sent)",
    )
    add_statuses(q, EVENT_STATUSES)
    q.add_argument("--event-type")
    add_time_range(q)
    q.add_argument("--limit", type=int, default=100)
    q.add_argument("--json", action="store_true", help="one JSON object per line")
    q.set_defaults(func=on_store(commands.events))

    p = subparsers.add_parser(
        "replay",
        parents=[common(), with_db()],
        help="send messages again (dead by default; any status with --status)",
    )
    p.add_argument("ids", type=int, nargs="*", help="message ids (else: the filters)")
    _add_selection(p)
    p.add_argument("--dry-run", action="store_true", help="only count what would be replayed")
    p.set_defaults(func=on_store(commands.replay))

    p = subparsers.add_parser(
        "reprocess",
        parents=[common(), with_db()],
        help="run the current mapping again on stored inbound events "
        "(unmappable ones by default); keys already sent are not sent again",
    )
    p.add_argument("ids", type=int, nargs="*", help="event ids (else: the filters)")
    add_statuses(p, EVENT_STATUSES)
    p.add_argument("--event-type")
    add_time_range(p)
    p.add_argument("--dry-run", action="store_true", help="show what the mapping gives now")
    p.set_defaults(func=on_store(commands.reprocess, full_config=True))

    p = subparsers.add_parser(
        "pause",
        parents=[common(), with_db()],
        help="stop deliveries to a destination (messages wait)",
    )
    p.add_argument("destination")
    p.set_defaults(func=on_store(commands.pause))
    p = subparsers.add_parser(
        "resume", parents=[common(), with_db()], help="resume deliveries to a destination"
    )
    p.add_argument("destination")
    p.set_defaults(func=on_store(commands.resume))

    p = subparsers.add_parser(
        "prune",
        parents=[common(), with_db()],
        help="apply retention now (relay serve also does it periodically)",
    )
    p.set_defaults(func=on_store(commands.prune, retention=True))

    p = subparsers.add_parser(
        "backfill",
        parents=[common(), with_db()],
        help="fill the console's search and revenue columns of messages stored before they "
        "existed (PostgreSQL outboxes from before the console; safe while relays serve)",
    )
    p.set_defaults(func=on_store(commands.backfill))

    p = subparsers.add_parser(
        "migrate",
        parents=[common(), with_db()],
        help="create or upgrade the outbox schema (SQLite or PostgreSQL); with --from-sqlite, "
        "copy a stopped SQLite relay's outbox into an empty PostgreSQL one",
    )
    p.add_argument("--from-sqlite", metavar="PATH", help="the SQLite database to copy")
    p.set_defaults(func=cmd_migrate)


def _add_selection(parser: argparse.ArgumentParser) -> None:
    """Which messages: by status, destination, event type and time (list, replay)."""
    add_statuses(parser, MESSAGE_STATUSES, help="repeat for several")
    parser.add_argument("--destination")
    parser.add_argument("--event-type")
    add_time_range(parser)


def cmd_migrate(args: argparse.Namespace) -> int:
    return asyncio.run(_migrate(args))


async def _migrate(args: argparse.Namespace) -> int:
    from relay.store import open_store

    location = db_path(args)
    if args.from_sqlite:
        from relay.store.transfer import copy_sqlite_to_postgres

        if not is_postgres_url(location):
            raise ConfigError(
                "--from-sqlite copies INTO PostgreSQL: give --db postgresql://... "
                "or set storage.url"
            )
        result = await copy_sqlite_to_postgres(args.from_sqlite, location)
        print(
            f"copied {result.events} events and {result.messages} messages "
            f"({result.pending} still to deliver, {result.dead} dead) into PostgreSQL; "
            "now start the relays with storage.url"
        )
        return 0
    store = await open_store(location)
    try:
        print(f"schema at version {await store.schema_version()} ({store.path})")
    finally:
        await store.close()
    return 0
