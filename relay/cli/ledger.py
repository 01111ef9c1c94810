"""`relay ledger`: the revenue ledger, Polar's side (as reconciliation last read it) against
what Faurya got, per day and currency, and each difference with its fix. Rendering and time
arguments are in relay/ledger_report.py; this module owns only the parser."""

from __future__ import annotations

import argparse
import asyncio
from typing import TYPE_CHECKING

from relay.cli.options import common, load_config, with_db

if TYPE_CHECKING:
    from relay.cli.options import Subparsers


def add_ledger_parser(subparsers: Subparsers) -> None:
    p = subparsers.add_parser(
        "ledger",
        parents=[common(), with_db()],
        help="the revenue ledger: Polar's paid orders and refunds against what Faurya got, "
        "per day and currency, and each difference with its fix (Polar's side as the last "
        "reconciliation read it)",
    )
    p.add_argument(
        "--since",
        help="a day (in the ledger's time zone), ISO time or an age like 7d "
        "(default: the window reconciliation read)",
    )
    p.add_argument("--until", help="a day (included), ISO time or an age (default: now)")
    p.add_argument("--currency", help="only this currency (ISO 4217, e.g. USD)")
    p.add_argument("--format", choices=["table", "json", "csv"], default="table")
    p.add_argument("--timezone", help="cut days in this IANA time zone (default: ledger.timezone)")
    p.add_argument(
        "--differences", action="store_true", help="only the differences (CSV: one per row)"
    )
    p.set_defaults(func=cmd_ledger)


def cmd_ledger(args: argparse.Namespace) -> int:
    from relay import ledger_report

    # Offline: the ledger maps with the routes but sends nothing, so no secret is needed.
    config = load_config(args, offline=True)
    return asyncio.run(ledger_report.run(args, config))
