"""Routes: which events they select, the message each builds, lookups, and `map_event`."""

from __future__ import annotations

import functools
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeAlias

import orjson

from relay.errors import MappingError
from relay.mapping.conditions import Condition
from relay.mapping.paths import Path, PathPart
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

    def selects(
        self, source: str, event_type: str, event: Any, found: Mapping[str, Any] | None = None
    ) -> bool:
        """Whether this route takes the event; a route with lookups sees them as `lookup.*`
        in its condition (`found`: its resolved lookups, as for `build`)."""
        if source != self.source or not self.takes(event_type):
            return False
        if self.when is None:
            return True
        if self.lookups:
            event = {**event, "lookup": dict(found or {})}
        return self.when.holds(event)

    def wants_lookups(self, source: str, event_type: str) -> bool:
        """Whether the store must be asked before this route can decide: its condition may read
        the lookups, so they are resolved for every event of its source and types."""
        return bool(self.lookups) and source == self.source and self.takes(event_type)

    def takes(self, event_type: str) -> bool:
        """Whether `events` names this type (the part of `selects` that needs no event)."""
        return any(_type_matches(p, event_type) for p in self.events)

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
    absent are skipped). Only the containers on those paths are copied, each once."""
    out: dict[str, Any] = _redacted(event, _tree(tuple(paths)))
    return out


_Tree: TypeAlias = dict[PathPart, "_Tree | None"]  # None: redact the value here


@functools.lru_cache(maxsize=16)
def _tree(paths: tuple[Path, ...]) -> _Tree:
    """The paths as one tree, so a webhook walks each container once (the config's paths are
    the same for every webhook: built once)."""
    root: _Tree = {}
    for path in paths:
        node = root
        for part in path[:-1]:
            child = node.setdefault(part, {})
            if child is None:  # a shorter path redacts this whole value already
                break
            node = child
        else:
            node[path[-1]] = None  # the whole value, whatever longer paths asked for inside
    return root


def _redacted(value: Any, tree: _Tree) -> Any:
    if isinstance(value, dict):
        out: Any = dict(value)
        present: list[PathPart] = [k for k in tree if isinstance(k, str) and k in out]
    elif isinstance(value, list):
        out = list(value)
        present = [k for k in tree if isinstance(k, int) and k < len(out)]
    else:
        return value
    for key in present:
        sub = tree[key]
        out[key] = REDACTED if sub is None else _redacted(out[key], sub)
    return out


def encode(body: Any) -> bytes:
    """The one JSON encoding of outbound bodies: compact, UTF-8, key order as configured.
    Only JSON's own types: NaN and infinities raise ValueError, anything else JSON has no type
    for (a TOML datetime in a `const`) raises TypeError; map_event makes either UNMAPPABLE."""
    if not _finite(body):
        raise ValueError("Out of range float values are not JSON compliant")
    try:
        # orjson: an outbound body is encoded per message, on the hot path (relay/codec.py
        # says why it is a dependency). It would write NaN as null (hence the check above) and
        # datetimes as text (hence the passthrough options, which make them a TypeError here).
        return orjson.dumps(body, option=_JSON_TYPES_ONLY)
    except TypeError:  # integers beyond 64 bits, or a type JSON does not have
        return json.dumps(body, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode()


_JSON_TYPES_ONLY = (
    orjson.OPT_PASSTHROUGH_DATETIME
    | orjson.OPT_PASSTHROUGH_DATACLASS
    | orjson.OPT_PASSTHROUGH_SUBCLASS
)


def _finite(value: Any) -> bool:
    if isinstance(value, float):
        return math.isfinite(value)
    if isinstance(value, dict):
        return all(_finite(v) for v in value.values())
    if isinstance(value, list):
        return all(_finite(v) for v in value)
    return True


@dataclass(frozen=True, slots=True)
class MapResult:
    status: EventStatus
    messages: tuple[OutboundDraft, ...] = ()
    reason: str | None = None


def select(
    routes: Sequence[Route],
    source: str,
    event: dict[str, Any],
    found: Mapping[str, Mapping[str, Any]] | None = None,
) -> list[Route]:
    """The routes that take `event`; `found`: route name -> its resolved lookups."""
    event_type = event.get("type")
    if not isinstance(event_type, str):
        return []
    found = found or {}
    return [r for r in routes if r.selects(source, event_type, event, found.get(r.name))]


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
    found = found or {}
    selected = select(routes, source, event, found)
    if not selected:
        return MapResult(EventStatus.IGNORED)
    try:
        messages = tuple(route.build(event, found.get(route.name)) for route in selected)
    except MappingError as exc:
        return MapResult(EventStatus.UNMAPPABLE, reason=exc.message)
    except (ValueError, TypeError) as exc:  # e.g. NaN in a body: never a crash
        return MapResult(EventStatus.UNMAPPABLE, reason=f"cannot encode body: {exc}")
    return MapResult(EventStatus.ROUTED, messages=messages)
