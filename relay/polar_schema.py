"""The shape of Polar's webhook payloads, and the check that routes read fields that exist.

Owns: reading `polar_webhooks.json` (written by tools/polar_webhook_schema.py from Polar's own
SDK models, shipped in the package: the relay does not depend on the SDK) and checking, for
each route of a `polar` source, every event path it reads against the payloads of the event
types it takes. Used by `relay check` only: a field Polar adds later must never stop a relay
that serves. Pure apart from reading the packaged file.

Left unchecked: paths under `lookup.` (a stored message, not the event), routes of other
kinds of source, and event types the file does not know (a path may come from them).
`metadata` and other free-form objects take any key.
"""

from __future__ import annotations

import difflib
import functools
import json
from collections.abc import Iterator
from dataclasses import dataclass
from importlib import resources
from typing import Any

from relay.config import Config
from relay.mapping import ObjectRule, Path, Route, Template, ValueRule, format_path

Shape = Any  # "scalar" | "any" | {"ref": name} | {"items": shape} | {"union": [shape, ...]}


@dataclass(frozen=True, slots=True)
class Schema:
    api_version: str
    events: dict[str, Shape]
    types: dict[str, dict[str, Shape]]

    def event_types(self, patterns: tuple[str, ...]) -> tuple[list[str], bool]:
        """The known event types the patterns select, and whether an exact pattern names a
        type this schema does not know (then a path may come from that one)."""
        known: list[str] = []
        unknown = False
        for pattern in patterns:
            if pattern == "*":
                known += list(self.events)
            elif pattern.endswith(".*"):
                known += [t for t in self.events if t.startswith(pattern[:-1])]
            elif pattern in self.events:
                known.append(pattern)
            else:
                unknown = True
        return list(dict.fromkeys(known)), unknown

    def miss(self, event_type: str, path: Path) -> _Miss | None:
        """None when `path` can exist in `event_type`'s payload, else where it fails."""
        return self._walk(self.events[event_type], path, 0)

    def _walk(self, shape: Shape, path: Path, depth: int) -> _Miss | None:
        if shape == "any" or depth == len(path):
            return None
        part = path[depth]
        if shape == "scalar":
            return _Miss(depth, ())
        if "union" in shape:
            misses = [self._walk(s, path, depth) for s in shape["union"]]
            if any(m is None for m in misses):
                return None
            deepest = max(m.depth for m in misses if m is not None)
            there = {f for m in misses if m is not None and m.depth == deepest for f in m.fields}
            return _Miss(deepest, tuple(sorted(there)))
        if "items" in shape:
            if not isinstance(part, int):
                return _Miss(depth, ())
            return self._walk(shape["items"], path, depth + 1)
        fields = self.types[shape["ref"]]
        if isinstance(part, int) or part not in fields:
            return _Miss(depth, tuple(fields))
        return self._walk(fields[part], path, depth + 1)


@dataclass(frozen=True, slots=True)
class _Miss:
    depth: int  # the index in the path of the first part that cannot exist
    fields: tuple[str, ...]  # the fields that do exist there (none: not an object)


@functools.cache
def schema() -> Schema:
    text = resources.files("relay").joinpath("polar_webhooks.json").read_text(encoding="utf-8")
    doc = json.loads(text)
    return Schema(doc["api_version"], doc["events"], doc["types"])


def route_reads(index: int, route: Route) -> Iterator[tuple[str, Path]]:
    """(key path in relay.toml, event path) of every event path the route reads."""
    where = f"routes[{index}]"
    yield from ((f"{where}.idempotency_key", p) for p in route.idempotency_key.reads())
    yield from _rule_reads(route.body, f"{where}.body")
    if route.when is not None:
        yield from ((f"{where}.when", p) for p in route.when.reads())
    if route.verify_order is not None:
        yield from ((f"{where}.verify_order", p) for p in route.verify_order.reads())
    for item in route.lookups:
        yield from ((f"{where}.lookup.{item.name}.idempotency_key", p) for p in item.key.reads())


def _rule_reads(rule: ValueRule | ObjectRule, where: str) -> Iterator[tuple[str, Path]]:
    if isinstance(rule, ObjectRule):
        for name, child in rule.fields:
            yield from _rule_reads(child, f"{where}.{name}")
        return
    if rule.template is not None:
        yield from ((f"{where}.template", p) for p in rule.template.reads())
    for i, candidate in enumerate(rule.paths):
        at = f"{where}.path" if len(rule.paths) == 1 else f"{where}.first[{i}]"
        if isinstance(candidate, Template):
            yield from ((f"{at}.template", p) for p in candidate.reads())
        else:
            yield at, candidate
    yield from ((f"{where}.sum[{i}]", p) for i, p in enumerate(rule.addends))
    if rule.units is not None:
        yield f"{where}.{rule.units[0]}", rule.units[1]


def check(config: Config) -> list[str]:
    """Problems, one per path that none of its route's Polar event types has."""
    known = schema()
    problems = []
    for index, route in enumerate(config.routes):
        source = config.sources.get(route.source)
        if source is None or source.kind != "polar":
            continue
        event_types, unknown = known.event_types(route.events)
        if unknown or not event_types:
            continue
        for where, path in route_reads(index, route):
            if path[:1] == ("lookup",):
                continue
            misses = [(t, known.miss(t, path)) for t in event_types]
            if any(miss is None for _, miss in misses):
                continue
            miss = misses[0][1]
            assert miss is not None
            problems.append(f"{where}: {_describe(path, miss, event_types)}")
    return problems


def _describe(path: Path, miss: _Miss, event_types: list[str]) -> str:
    shown = ", ".join(event_types[:3]) + (", ..." if len(event_types) > 3 else "")
    parent = format_path(path[: miss.depth])
    if not miss.fields:
        return (
            f"{format_path(path)}: no such field in {shown} ({parent} is not an object with fields)"
        )
    text = f"{format_path(path)}: no such field in {shown}"
    part = path[miss.depth]
    close = difflib.get_close_matches(str(part), miss.fields, n=1)
    if close:
        text += f"; did you mean {format_path((*path[: miss.depth], close[0]))}?"
    return text
