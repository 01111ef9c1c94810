"""What the `relay` commands share: the parent parsers (`--config`, `--debug`, `--db`), the
time-range and selection options, and loading the config a command asks for.

Imports nothing heavy (no aiohttp, no database driver): `relay check` and the operator
commands start in a fraction of the time `relay serve` takes.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence
from typing import TYPE_CHECKING

from relay import hardening
from relay.config import Config, Secret, is_postgres_url, load, storage_path

if TYPE_CHECKING:
    # What `add_subparsers()` returns, which each command group's `add_*_parsers` fills.
    Subparsers = argparse._SubParsersAction[argparse.ArgumentParser]

DB_HELP = "SQLite database path or postgresql:// URL (overrides storage.path / storage.url)"
AGE_HELP = "ISO date/time (UTC) or an age like 30m, 6h, 7d"


def common() -> argparse.ArgumentParser:
    """The options of every command: --config and --debug."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument(
        "--config", help="relay.toml to use (default: $RELAY_CONFIG or ./relay.toml)"
    )
    parent.add_argument("--debug", action="store_true", help="show tracebacks")
    return parent


def with_db() -> argparse.ArgumentParser:
    """--db, for the commands that open the outbox."""
    parent = argparse.ArgumentParser(add_help=False)
    parent.add_argument("--db", help=DB_HELP)
    return parent


def add_time_range(parser: argparse.ArgumentParser) -> None:
    """--since and --until, as every selection reads them."""
    parser.add_argument("--since", help=AGE_HELP)
    parser.add_argument("--until", help=AGE_HELP)


def add_statuses(
    parser: argparse.ArgumentParser, statuses: Sequence[str], help: str | None = None
) -> None:
    """--status, repeatable, one of `statuses`."""
    parser.add_argument("--status", action="append", choices=list(statuses), help=help)


def config_path(args: argparse.Namespace) -> str:
    return str(args.config or os.environ.get("RELAY_CONFIG") or "relay.toml")


def load_config(args: argparse.Namespace, *, offline: bool = False) -> Config:
    """offline: for commands that serve nothing; unset variables read as `<unset: NAME>`
    (and `note_unset` says so once)."""
    config = load(config_path(args), os.environ, offline=offline)
    server = config.server
    if getattr(args, "host", None):
        server = dataclasses.replace(server, host=args.host)
    if getattr(args, "port", None) is not None:
        server = dataclasses.replace(server, port=args.port)
    storage = config.storage
    if getattr(args, "db", None):
        if is_postgres_url(args.db):
            storage = dataclasses.replace(storage, url=Secret(args.db))
        else:
            storage = dataclasses.replace(storage, path=args.db, url=None)
    return dataclasses.replace(config, server=server, storage=storage)


def note_unset(config: Config) -> None:
    """Say once which variables were not set (on stderr: stdout is the command's output)."""
    if config.unset_variables:
        names = ", ".join(config.unset_variables)
        print(
            f"relay: note: not set, shown as <unset: NAME>: {names} "
            "(relay serve needs them; relay check --strict fails on them)",
            file=sys.stderr,
        )


def db_path(args: argparse.Namespace) -> str:
    if args.db:
        return str(args.db)
    return storage_path(config_path(args), os.environ)


def file_warnings(config: Config) -> list[str]:
    return [] if config.storage.url is not None else hardening.file_warnings(config.storage.path)
