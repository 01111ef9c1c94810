"""`relay ledger`: the revenue ledger as a table, JSON or CSV, on stdout.

Owns the command's time arguments (dates are days in the ledger's time zone) and the three
renderings; `to_json` is the plain data the console's API serves too. JSON and CSV carry minor
units (with each currency's exponent, Polar's); the table shows major units by Polar's
exponent. Reads the store and the config only: never Polar's API.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import re
from datetime import UTC, date, datetime, timedelta
from typing import Any
from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

from relay.config import Config
from relay.currency import polar_exponent, polar_major_text
from relay.errors import ConfigError
from relay.ledger import Ledger, Tally, day_start
from relay.ledger_differences import Difference
from relay.outbox_commands import BadTime, parse_time

FORMATS = ("table", "json", "csv")
_DATE = re.compile(r"^\d{4}-\d{2}-\d{2}$")
# The times a ledger can show in any zone: from the epoch to a day before datetime's end
# (10000-01-01), so that the window's ends are dates in every offset.
MAX_TIME = 253_402_300_800.0 - 2 * 86400
TALLIES = ("polar", "received", "delivered", "pending", "dead", "discarded")
TALLY_FIELDS = ("purchases", "purchase_minor", "refunds", "refund_minor", "net_minor")
DAY_COLUMNS = (
    "day",
    "currency",
    "exponent",
    *(f"{t}_{f}" for t in TALLIES for f in TALLY_FIELDS),
    "difference_minor",
)
DIFFERENCE_COLUMNS = (
    "kind",
    "why",
    "day",
    "currency",
    "amount_minor",
    "at",
    "polar_kind",
    "polar_id",
    "idempotency_key",
    "message_id",
    "event_id",
    "settled",
    "detail",
    "fix",
)


def major(amount_minor: int, currency: str) -> str:
    """Minor units as a major-unit string by Polar's exponent ("44.10", "4410" for JPY)."""
    return polar_major_text(amount_minor, currency)


def tally_json(tally: Tally) -> dict[str, int]:
    return {
        "purchases": tally.purchases,
        "purchase_minor": tally.purchase_minor,
        "refunds": tally.refunds,
        "refund_minor": tally.refund_minor,
        "net_minor": tally.net_minor,
    }


def difference_json(d: Difference) -> dict[str, Any]:
    return {
        "kind": d.kind.value,
        "why": d.why.value,
        "day": d.day.isoformat(),
        "currency": d.currency,
        "amount_minor": d.amount_minor,
        "at": datetime.fromtimestamp(d.at, UTC).isoformat(),
        "polar_kind": None if d.polar_kind is None else d.polar_kind.value,
        "polar_id": d.polar_id,
        "idempotency_key": d.idempotency_key,
        "message_id": d.message_id,
        "event_id": d.event_id,
        "settled": d.settled,
        "detail": d.detail,
        "fix": d.fix,
    }


def to_json(ledger: Ledger) -> dict[str, Any]:
    """The ledger as plain JSON data (the CLI's --format json, the console's API)."""
    tz = ZoneInfo(ledger.timezone)
    coverage = ledger.coverage
    return {
        "timezone": ledger.timezone,
        "since": datetime.fromtimestamp(ledger.since, tz).isoformat(),
        "until": datetime.fromtimestamp(ledger.until, tz).isoformat(),
        "polar": {
            "available": coverage is not None,
            "note": ledger.note,
            "covers_since": None
            if coverage is None
            else datetime.fromtimestamp(coverage.since, tz).isoformat(),
            "read_at": None
            if coverage is None
            else datetime.fromtimestamp(coverage.fetched_at, tz).isoformat(),
            "kinds": [] if coverage is None else [k.value for k in coverage.kinds],
        },
        "days": [
            {
                "day": row.day.isoformat(),
                "currency": row.currency,
                "exponent": polar_exponent(row.currency),
                "polar": None if row.polar is None else tally_json(row.polar),
                "received": tally_json(row.received),
                "delivered": tally_json(row.delivered),
                "pending": tally_json(row.pending),
                "dead": tally_json(row.dead),
                "discarded": tally_json(row.discarded),
                "difference_minor": row.difference_minor,
            }
            for row in ledger.rows
        ],
        "differences": [difference_json(d) for d in ledger.differences],
    }


def zone(name: str) -> ZoneInfo:
    try:
        return ZoneInfo(name)
    except (ZoneInfoNotFoundError, ValueError):
        raise ConfigError(
            f"--timezone: unknown time zone {name!r} (an IANA name such as UTC or Europe/Berlin)"
        ) from None


def parse_bound(text: str | None, tz: ZoneInfo, now: float, *, end: bool) -> float | None:
    """A bare date is a day in the ledger's time zone: `--since` from its start, `--until`
    through its end. Anything else as the other commands read times (ISO, UTC unless an
    offset is given; or an age such as 7d). A time the ledger cannot show is a `BadTime`."""
    if text is None:
        return None
    at: float | None
    if _DATE.match(text.strip()):
        try:
            day = date.fromisoformat(text.strip())
            at = day_start(day + timedelta(days=1) if end else day, tz)
        except (ValueError, OverflowError) as exc:  # 2026-13-40, or the day after 9999-12-31
            raise BadTime(f"cannot read time {text!r}: {exc}") from None
    else:
        at = parse_time(text, now)
    # An age of a million years, or a date beyond 9999, is no time a datetime can show.
    if at is None or not 0 <= at < MAX_TIME:
        raise BadTime(f"{text!r} is out of range")
    return at


async def run(args: argparse.Namespace, config: Config) -> int:
    from relay.ledger_source import read_ledger
    from relay.models import SystemClock
    from relay.store import open_store

    timezone = args.timezone or config.ledger.timezone
    tz = zone(timezone)
    now = SystemClock().now()
    since = parse_bound(args.since, tz, now, end=False)
    until = parse_bound(args.until, tz, now, end=True)
    store = await open_store(
        config.storage.location, busy_timeout_ms=config.storage.busy_timeout_ms
    )
    try:
        ledger = await read_ledger(
            store,
            config,
            now=now,
            since=since,
            until=until,
            timezone=timezone,
            currency=args.currency,
        )
    finally:
        await store.close()
    print(render(ledger, args.format, differences_only=args.differences), end="")
    return 0


def render(ledger: Ledger, fmt: str, *, differences_only: bool = False) -> str:
    if fmt == "json":
        data = to_json(ledger)
        if differences_only:
            data = {"differences": data["differences"]}
        return json.dumps(data, indent=2) + "\n"
    if fmt == "csv":
        return differences_csv(ledger) if differences_only else days_csv(ledger)
    return table(ledger, differences_only=differences_only)


def days_csv(ledger: Ledger) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, DAY_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for row in to_json(ledger)["days"]:
        flat: dict[str, Any] = {
            "day": row["day"],
            "currency": row["currency"],
            "exponent": row["exponent"],
            "difference_minor": row["difference_minor"],
        }
        for name in TALLIES:
            for key in TALLY_FIELDS:
                # Polar's side unknown for the day: empty cells, not zeros.
                flat[f"{name}_{key}"] = "" if row[name] is None else row[name][key]
        writer.writerow(flat)
    return out.getvalue()


def differences_csv(ledger: Ledger) -> str:
    out = io.StringIO()
    writer = csv.DictWriter(out, DIFFERENCE_COLUMNS, lineterminator="\n")
    writer.writeheader()
    for d in ledger.differences:
        writer.writerow({k: "" if v is None else v for k, v in difference_json(d).items()})
    return out.getvalue()


def _when(ts: float, tz: ZoneInfo) -> str:
    return datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M")


def _net(tally: Tally | None, currency: str) -> str:
    return "-" if tally is None else major(tally.net_minor, currency)


def table(ledger: Ledger, *, differences_only: bool = False) -> str:
    tz = ZoneInfo(ledger.timezone)
    lines = [
        f"Revenue ledger {_when(ledger.since, tz)} to {_when(ledger.until, tz)} "
        f"(days in {ledger.timezone}; amounts in major units, net = purchases - refunds; "
        "difference = Polar - Faurya)"
    ]
    coverage = ledger.coverage
    if coverage is not None:
        lines.append(
            f"Polar's side: objects created since {_when(coverage.since, tz)}, as read by "
            f"reconciliation at {_when(coverage.fetched_at, tz)}"
        )
    if ledger.note:
        lines.append(f"note: {ledger.note}")
    if not differences_only:
        header = (
            "day",
            "currency",
            "polar n",
            "polar net",
            "delivered n",
            "delivered net",
            "pending",
            "dead",
            "discarded",
            "difference",
        )
        body = [
            (
                row.day.isoformat(),
                row.currency,
                "-" if row.polar is None else str(row.polar.purchases + row.polar.refunds),
                _net(row.polar, row.currency),
                str(row.delivered.purchases + row.delivered.refunds),
                _net(row.delivered, row.currency),
                _net(row.pending, row.currency),
                _net(row.dead, row.currency),
                _net(row.discarded, row.currency),
                major(row.difference_minor, row.currency),
            )
            for row in ledger.rows
        ]
        widths = [max(len(r[i]) for r in [header, *body]) for i in range(len(header))]
        for r in [header, *body]:
            lines.append(
                "  ".join(
                    cell.ljust(w) if i < 2 else cell.rjust(w)
                    for i, (cell, w) in enumerate(zip(r, widths, strict=True))
                ).rstrip()
            )
        if not body:
            lines.append("(no revenue in this window)")
    lines.append(f"differences: {len(ledger.differences)}")
    for d in ledger.differences:
        sign = "+" if d.amount_minor > 0 else ""
        lines.append(
            f"  {d.day.isoformat()} {d.currency} {sign}{major(d.amount_minor, d.currency)} "
            f"{d.kind.value} ({d.why.value}): {d.detail}"
        )
        where = f"message {d.message_id}: " if d.message_id is not None else ""
        lines.append(f"      {where}fix: {d.fix}")
    return "\n".join(lines) + "\n"
