"""`relay reconcile`: find what Polar has and the relay has no record of, once, now."""

from __future__ import annotations

import argparse
import asyncio
import sys
from typing import TYPE_CHECKING

from relay.cli.options import common, load_config, with_db
from relay.config import Config
from relay.errors import ConfigError

if TYPE_CHECKING:
    from relay.cli.options import Subparsers


def add_reconcile_parser(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "reconcile",
        parents=[common(), with_db()],
        help="find paid orders and succeeded refunds in Polar that the relay has no record of, "
        "and enqueue them (same routes and keys: never double-counts)",
    )
    p.add_argument(
        "--since", help="ISO date/time or an age like 7d (default: reconcile.lookback_s, 3 days)"
    )
    p.add_argument("--until", help="ISO date/time or an age")
    p.add_argument("--dry-run", action="store_true", help="list what would be enqueued")
    p.set_defaults(func=cmd_reconcile)


def cmd_reconcile(args: argparse.Namespace) -> int:
    config = load_config(args)
    if config.polar_api.token is None:
        raise ConfigError(
            "environment variable POLAR_ACCESS_TOKEN is not set or empty (needed by "
            "polar_api.token for relay reconcile)"
        )
    return asyncio.run(_reconcile(args, config))


async def _reconcile(args: argparse.Namespace, config: Config) -> int:
    import aiohttp

    from relay.models import SystemClock
    from relay.outbox_commands import parse_time
    from relay.polar_api import PolarApi
    from relay.reconcile import Reconciler
    from relay.store import open_store

    clock = SystemClock()
    now = clock.now()
    since = parse_time(args.since, now) if args.since else now - config.reconcile.lookback_s
    until = parse_time(args.until, now)
    tty = sys.stderr.isatty()

    def progress(line: str) -> None:
        if tty:
            print(f"\r\033[K{line}", end="", file=sys.stderr, flush=True)

    store = await open_store(
        config.storage.location, busy_timeout_ms=config.storage.busy_timeout_ms
    )
    try:
        assert config.polar_api.token is not None
        async with aiohttp.ClientSession() as session:
            api = PolarApi(
                session,
                config.polar_api.url,
                config.polar_api.token.value,
                min_interval_s=config.polar_api.min_interval_s,
            )
            summary = await Reconciler(
                store, config, api, clock, dry_run=args.dry_run, progress=progress
            ).run(since, until)
    finally:
        await store.close()
    if tty:
        print(file=sys.stderr)
    for detail in summary.details:
        print(detail)
    print(("dry run: " if args.dry_run else "") + summary.line())
    return 0
