"""Routes: which events they select, the message each builds, lookups, and `map_event`."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from relay.errors import MappingError
from relay.mapping.conditions import Condition
from relay.mapping.paths import MISSING, Path, lookup
from relay.mapping.templates import Template
from relay.mapping.values import ObjectRule
from relay.models import EventStatus, OutboundDraft

# ---------------------------------------------------------------- routes


@dataclass(frozen=True, slots=True)
class Lookup:
    """A stored message this route reads: the body sent to `destination` under `key`."""

    name: str
    destination: str
    key: Template


@dataclass(frozen=True, slots=True)
class Route:
    """Selects events of one source and builds one message for one destination."""

    name: str
    source: str
    events: tuple[str, ...]  # exact types, or "prefix.*", or "*"
    destination: str
    idempotency_key: Template
    body: ObjectRule
    when: Condition | None = None
    lookups: tuple[Lookup, ...] = ()
    verify_order: Template | None = None  # confirm this Polar order is paid before sending

    def reads(self) -> list[Path]:
        """Every event path the route reads (to keep redaction away from them)."""
        found = self.body.reads() + self.idempotency_key.reads()
        found += self.when.reads() if self.when is not None else []
        found += self.verify_order.reads() if self.verify_order is not None else []
        found += [p for item in self.lookups for p in item.key.reads()]
        return [p for p in found if p[:1] != ("lookup",)]

    def lookup_keys(self, event: Any) -> list[tuple[str, str, str]]:
        """(name, destination, key) of each lookup whose key renders for this event."""
        keys = []
        for item in self.lookups:
            try:
                keys.append((item.name, item.destination, item.key.render(event, item.name)))
            except MappingError:
                continue  # the key's fields are absent: nothing to look up
        return keys

    def selects(self, source: str, event_type: str, event: Any) -> bool:
        if source != self.source or not any(_type_matches(p, event_type) for p in self.events):
            return False
        return self.when is None or self.when.holds(event)

    def build(self, event: Any, found: Mapping[str, Any] | None = None) -> OutboundDraft:
        """`found`: the lookups resolved by the caller, name -> stored body (absent: none)."""
        where = f"routes.{self.name}"
        if self.lookups:
            event = {**event, "lookup": dict(found or {})}
        body = self.body.evaluate(event, f"{where}.body")
        key = self.idempotency_key.render(event, f"{where}.idempotency_key")
        verify_ref = (
            None
            if self.verify_order is None
            else self.verify_order.render(event, f"{where}.verify_order")
        )
        return OutboundDraft(
            route=self.name,
            destination=self.destination,
            idempotency_key=key,
            body=encode(body),
            verify_ref=verify_ref,
        )


def _type_matches(pattern: str, event_type: str) -> bool:
    if pattern == "*":
        return True
    if pattern.endswith(".*"):
        return event_type.startswith(pattern[:-1])
    return pattern == event_type


REDACTED = "[redacted]"


def redact(event: dict[str, Any], paths: Sequence[Path]) -> dict[str, Any]:
    """A copy of `event` with the value at each path replaced by "[redacted]" (paths that are
    absent are skipped). Only the containers on those paths are copied."""
    out = dict(event)
    for path in paths:
        parent: Any = out
        for part in path[:-1]:
            child = lookup(parent, (part,))
            if not isinstance(child, dict | list):
                break
            child = dict(child) if isinstance(child, dict) else list(child)
            parent[part] = child
            parent = child
        else:
            last = path[-1]
            if lookup(parent, (last,)) is not MISSING:
                parent[last] = REDACTED
    return out


def encode(body: Any) -> bytes:
    """The one JSON encoding of outbound bodies: compact, UTF-8, key order as configured."""
    return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


@dataclass(frozen=True, slots=True)
class MapResult:
    status: EventStatus
    messages: tuple[OutboundDraft, ...] = ()
    reason: str | None = None


def select(routes: Sequence[Route], source: str, event: dict[str, Any]) -> list[Route]:
    event_type = event.get("type")
    if not isinstance(event_type, str):
        return []
    return [r for r in routes if r.selects(source, event_type, event)]


def map_event(
    routes: Sequence[Route],
    source: str,
    event: dict[str, Any],
    found: Mapping[str, Mapping[str, Any]] | None = None,
) -> MapResult:
    """Run every route on one event. All or nothing: one failing route makes it unmappable,
    so a fan-out is never half sent and `reprocess` can redo the whole event later.
    `found`: route name -> its resolved lookups (see `Route.lookup_keys`)."""
    if not isinstance(event.get("type"), str):
        return MapResult(EventStatus.UNMAPPABLE, reason="event has no string type")
    selected = select(routes, source, event)
    if not selected:
        return MapResult(EventStatus.IGNORED)
    found = found or {}
    try:
        messages = tuple(route.build(event, found.get(route.name)) for route in selected)
    except MappingError as exc:
        return MapResult(EventStatus.UNMAPPABLE, reason=exc.message)
    except (ValueError, TypeError) as exc:  # e.g. NaN in a body: never a crash
        return MapResult(EventStatus.UNMAPPABLE, reason=f"cannot encode body: {exc}")
    return MapResult(EventStatus.ROUTED, messages=messages)
