"""Operator commands on the outbox: list, show, retry, discard, stats, events, replay,
reprocess, pause, resume, prune, backfill. (Named for what it holds: `relay/operator.py`
shadowed the standard library's `operator`.)

Owns what these commands select and print; relay/cli/outbox.py parses their arguments and
opens the store for them (`run`). They open the store without the serve lock, so they
are safe while `relay serve` runs on the same database: every change is one short transaction,
and every serving relay acts on it at once (the store tells them: relay/store/sqlite.py
`_watch_operations` on SQLite, NOTIFY on PostgreSQL), not at its workers' next poll.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import re
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any

from relay.config import Config, RetentionConfig
from relay.errors import RelayError
from relay.mapping import map_event
from relay.models import (
    EventFilter,
    EventStatus,
    MessageFilter,
    MessageRecord,
    MessageStatus,
    SystemClock,
)

if TYPE_CHECKING:
    # The store (and relay.ingest) import the database drivers and aiohttp: loaded by `run`,
    # so that building the `relay` command's parser, which names these commands, stays cheap.
    from relay.store import Store

_AGE = re.compile(r"^(\d+(?:\.\d+)?)\s*([smhd])$")
_UNIT_S = {"s": 1, "m": 60, "h": 3600, "d": 86400}


class BadTime(RelayError):
    """A time filter could not be read."""


def parse_time(text: str | None, now: float) -> float | None:
    """`2026-11-26`, `2026-11-26T10:00:00` (UTC unless an offset is given), or an age such as
    `30m`, `6h`, `7d` meaning that long before now."""
    if text is None:
        return None
    if match := _AGE.match(text.strip()):
        return now - float(match.group(1)) * _UNIT_S[match.group(2)]
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadTime(f"cannot read time {text!r}: use ISO 8601 or an age like 6h, 7d") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=UTC)
    return when.timestamp()


def _when(ts: float | None) -> str:
    if ts is None:
        return "-"
    return datetime.fromtimestamp(ts, tz=UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def record_dict(r: MessageRecord, *, body: bool) -> dict[str, Any]:
    out = {f.name: getattr(r, f.name) for f in dataclasses.fields(r) if f.name != "body"}
    out["status"] = r.status.value
    if body:
        try:
            out["body"] = json.loads(r.body)
        except ValueError:
            out["body"] = r.body.decode("utf-8", errors="replace")
    return out


def message_filter(
    args: argparse.Namespace, now: float, *, default_status: tuple[MessageStatus, ...] = ()
) -> MessageFilter:
    ids = tuple(getattr(args, "ids", ()) or ())
    statuses = tuple(MessageStatus(s) for s in (args.status or ()))
    if not statuses and not ids:
        statuses = default_status
    return MessageFilter(
        ids=ids,
        statuses=statuses,
        destination=args.destination,
        event_type=args.event_type,
        since=parse_time(args.since, now),
        until=parse_time(args.until, now),
    )


@dataclasses.dataclass(frozen=True, slots=True)
class Context:
    retention: RetentionConfig
    config: Config | None  # the full config: only `reprocess` needs it (the routes)


Command = Callable[["Store", argparse.Namespace, Context], Awaitable[int]]


async def run(command: Command, args: argparse.Namespace, location: str, ctx: Context) -> int:
    """Run one command on the outbox at `location` (a path or a postgresql:// URL)."""
    from relay.store import open_store

    store = await open_store(location)
    try:
        return await command(store, args, ctx)
    finally:
        await store.close()


async def list_messages(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    records = await store.list_messages(message_filter(args, SystemClock().now()), limit=args.limit)
    if args.json:
        for r in records:
            print(json.dumps(record_dict(r, body=False)))
        return 0
    print(
        f"{'ID':>6}  {'STATUS':<9}  {'ATTEMPTS':>8}  {'DEST':<10}  {'EVENT':<16}  "
        f"{'CREATED':<20}  {'LAST':<5}  KEY"
    )
    for r in records:
        print(
            f"{r.id:>6}  {r.status.value:<9}  {r.attempts:>8}  {r.destination:<10}  "
            f"{r.event_type:<16}  {_when(r.created_at):<20}  {r.last_status or '-'!s:<5}  "
            f"{r.idempotency_key}"
        )
    print(f"({len(records)} shown)")
    return 0


async def show(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    record = await store.get_message(args.id)
    if record is None:
        print(f"relay: no message with id {args.id}", file=sys.stderr)
        return 1
    print(json.dumps(record_dict(record, body=True), indent=2))
    return 0


async def retry(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    if not args.ids and not args.all_dead:
        print("relay: give message ids or --all-dead", file=sys.stderr)
        return 2
    count = await store.retry_messages(args.ids, all_dead=args.all_dead)
    print(f"{count} message(s) scheduled for delivery now")
    return 0


async def discard(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    reason = args.reason.strip()
    if not reason:
        print("relay: --reason must say why these messages are given up", file=sys.stderr)
        return 2
    ids = tuple(args.ids or ())
    if not ids and not any((args.destination, args.event_type, args.since, args.until)):
        print(
            "relay: give message ids or a filter (--destination, --event-type, --since, "
            "--until), e.g. --destination NAME for every dead message of a destination",
            file=sys.stderr,
        )
        return 2
    now = SystemClock().now()
    selection = MessageFilter(
        ids=ids,
        statuses=(MessageStatus.DEAD,),  # only dead messages can be discarded
        destination=args.destination,
        event_type=args.event_type,
        since=parse_time(args.since, now),
        until=parse_time(args.until, now),
    )
    if args.dry_run:
        chosen = await store.list_messages(selection, limit=1_000_000)
        print(f"{len(chosen)} dead message(s) would be discarded (dry run; nothing changed)")
        for r in chosen:
            print(f"{r.id:>6}  {r.destination:<10}  {r.event_type:<16}  {r.idempotency_key}")
        return 0
    discarded = await store.discard(selection, reason[:1000])
    shown = ", ".join(str(i) for i in discarded)
    print(f"{len(discarded)} message(s) discarded (kept, never sent){': ' if shown else ''}{shown}")
    left = [i for i in ids if i not in set(discarded)]
    if left:
        print(
            f"relay: not discarded (not dead): {', '.join(str(i) for i in left)}; only dead "
            "messages can be discarded",
            file=sys.stderr,
        )
        return 1
    return 0


async def stats(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    overrides = await store.paused_overrides()
    destinations = sorted(set(await store.destinations()) | set(overrides))
    now = SystemClock().now()
    print(
        f"{'DESTINATION':<14}"
        + "".join(f"{s.value:>11}" for s in MessageStatus)
        + "  OLDEST-PENDING  PAUSED"
    )
    for name in destinations:
        stats = await store.stats(name)
        oldest = stats.oldest_pending_created_at
        age = "-" if oldest is None else f"{now - oldest:.0f} s"
        paused = {True: "yes", False: "no"}.get(overrides.get(name, False))
        print(
            f"{name:<14}"
            + "".join(f"{stats.counts[s]:>11}" for s in MessageStatus)
            + f"  {age:>14}  {paused}"
        )
    return 0


async def replay(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    selection = message_filter(args, SystemClock().now(), default_status=(MessageStatus.DEAD,))
    count = await store.replay(selection, dry_run=args.dry_run)
    if args.dry_run:
        print(f"{count} message(s) would be replayed (dry run; nothing changed)")
    else:
        print(f"{count} message(s) replayed: due now, same idempotency keys and bodies")
    return 0


async def reprocess(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    from relay.ingest import resolve_lookups

    config = ctx.config
    assert config is not None
    now = SystemClock().now()
    statuses = tuple(EventStatus(s) for s in (args.status or ()))
    if not statuses and not args.ids:
        statuses = (EventStatus.UNMAPPABLE,)
    events = await store.list_events(
        EventFilter(
            ids=tuple(args.ids),
            statuses=statuses,
            event_type=args.event_type,
            since=parse_time(args.since, now),
            until=parse_time(args.until, now),
        )
    )
    counts = {
        "events": 0,
        "new_messages": 0,
        "already_sent": 0,
        "still_unmappable": 0,
        "ignored": 0,
        "no_body": 0,
    }
    for event in events:
        counts["events"] += 1
        if event.body is None:
            counts["no_body"] += 1  # retention cleared it
            continue
        try:
            payload = json.loads(event.body)
        except ValueError:
            payload = None
        if not isinstance(payload, dict):
            counts["still_unmappable"] += 1
            continue
        found = await resolve_lookups(store, config.routes, event.source, payload)
        mapped = map_event(config.routes, event.source, payload, found)
        if mapped.status is EventStatus.UNMAPPABLE:
            counts["still_unmappable"] += 1
            print(f"event {event.id} ({event.event_type}): still unmappable: {mapped.reason}")
        elif mapped.status is EventStatus.IGNORED:
            counts["ignored"] += 1
        if args.dry_run:
            for m in mapped.messages:
                print(
                    f"event {event.id}: would enqueue {m.route} -> {m.destination} "
                    f"key {m.idempotency_key}"
                )
            continue
        result = await store.remap_event(event.id, mapped.status, mapped.reason, mapped.messages)
        counts["new_messages"] += len(result.message_ids)
        counts["already_sent"] += len(result.duplicate_keys)
    summary = ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in counts.items())
    print(("dry run: " if args.dry_run else "") + summary)
    return 0


async def events(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    now = SystemClock().now()
    events = await store.list_events(
        EventFilter(
            statuses=tuple(EventStatus(s) for s in (args.status or ())),
            event_type=args.event_type,
            since=parse_time(args.since, now),
            until=parse_time(args.until, now),
        ),
        limit=args.limit,
        newest_first=True,
    )
    if args.json:
        for e in events:
            print(
                json.dumps(
                    {
                        "id": e.id,
                        "source": e.source,
                        "webhook_id": e.webhook_id,
                        "event_type": e.event_type,
                        "received_at": e.received_at,
                        "status": e.status.value,
                        "reason": e.reason,
                    }
                )
            )
        return 0
    print(f"{'ID':>6}  {'STATUS':<10}  {'EVENT':<16}  {'RECEIVED':<20}  WEBHOOK-ID / REASON")
    for e in events:
        print(
            f"{e.id:>6}  {e.status.value:<10}  {e.event_type:<16}  "
            f"{_when(e.received_at):<20}  {e.webhook_id}"
        )
        if e.reason:
            print(f"{'':>6}  {e.reason}")
    print(f"({len(events)} shown)")
    return 0


async def pause(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    await store.set_paused(args.destination, True)
    print(f"destination {args.destination} paused: messages wait in the outbox")
    return 0


async def resume(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    await store.set_paused(args.destination, False)
    print(f"destination {args.destination} resumed")
    return 0


async def prune(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    retention = ctx.retention
    now = SystemClock().now()
    result = await store.prune(
        bodies_before=now - retention.bodies_s, rows_before=now - retention.rows_s
    )
    print(", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in dataclasses.asdict(result).items()))
    return 0


async def backfill(store: Store, args: argparse.Namespace, ctx: Context) -> int:
    filled = await store.backfill_facts()
    print(
        f"filled the search and revenue columns of {filled} messages"
        if filled
        else "no message left to fill"
    )
    return 0
