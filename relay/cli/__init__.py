"""The `relay` command.

Commands, by group (each group's parser and functions in its module):

- serving (relay/cli/serving.py): `serve` runs the relay (relay/serve.py `run`); `dev` runs it
  with a generated secret and a local Faurya sink that prints every revenue call.
- the config and trying it out (relay/cli/tools.py): `check` validates the config and prints
  the routes; `map` prints the requests an event would give; `sign` prints Standard Webhooks
  headers for a body; `send` signs a body and POSTs it to a relay.
- the outbox (relay/cli/outbox.py, with relay/outbox_commands.py):
  `outbox list`, `outbox show`, `outbox retry`, `outbox discard`, `outbox stats` and
  `outbox events` inspect and change messages and inbound events; `replay` sends messages
  again; `reprocess` runs the mapping again on stored events; `pause` and `resume` a
  destination; `prune` applies retention now; `backfill` fills the console's search and
  revenue columns of messages stored before they existed; `migrate` creates or upgrades the
  schema, or copies a SQLite outbox into PostgreSQL.
- Polar's API (relay/cli/reconcile.py): `reconcile` enqueues what Polar has and the relay
  has no record of.
- the revenue ledger (relay/cli/ledger.py, with relay/ledger_report.py): `ledger` puts
  Polar's revenue (as reconciliation last read it) beside what Faurya got, per day and
  currency, with each difference and its fix.

Owns argument parsing and turning errors into one short line and an exit code: 2 for
configuration and usage errors, 1 for run-time failures. No traceback unless `--debug`. Each
command's parser sets `func`, the function that runs it.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

from relay import __version__
from relay.cli.ledger import add_ledger_parser
from relay.cli.outbox import add_outbox_parsers
from relay.cli.reconcile import add_reconcile_parser
from relay.cli.serving import add_serving_parsers
from relay.cli.tools import add_tool_parsers
from relay.errors import ConfigError, RelayError

__all__ = ["build_parser", "main"]


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="relay",
        description="Faurya Relay: Polar webhooks "
        "to Faurya revenue calls, through a durable outbox.",
    )
    parser.add_argument("--version", action="version", version=f"faurya-relay {__version__}")
    subparsers = parser.add_subparsers(dest="command", required=True)
    add_serving_parsers(subparsers)
    add_tool_parsers(subparsers)
    add_outbox_parsers(subparsers)
    add_reconcile_parser(subparsers)
    add_ledger_parser(subparsers)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.func(args))
    except ConfigError as exc:
        if len(exc.problems) == 1:
            print(f"relay: config error: {exc.problems[0]}", file=sys.stderr)
        else:
            print(f"relay: {len(exc.problems)} config errors:", file=sys.stderr)
            for problem in exc.problems:
                print(f"  {problem}", file=sys.stderr)
        return 2
    except RelayError as exc:
        if args.debug:
            raise
        print(f"relay: error: {exc.message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # `relay outbox list | head`: the reader left; stop quietly, as Unix tools do.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
