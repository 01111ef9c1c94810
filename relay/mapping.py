"""The declarative mapping language: compiled routes turn one verified event into messages.

Owns: parsing rule tables from relay.toml into frozen, compiled rules (with errors that name the
full key path), and evaluating them against an event. Pure: no I/O, no clock, no randomness, so
the same event always maps to the same bytes (every retry sends what ingest stored).

Rule forms (see README, "Mapping rules"):
  scalar                      a constant ("polar", 1, true)
  { const = any }             a constant of any TOML type
  { path = "data.id" }        a dotted path into the event; `items[0].id` indexes arrays
  { first = ["a", "b"] }      the first path whose value is neither missing, null nor ""
  { template = "x:{data.id}" }  a string with `{path}` placeholders
  options on any of those: default, type ("string"|"int"|"float"|"bool"),
  minor_to_major / major_to_minor = "<path of the currency code>" (by ISO 4217 exponent),
  transform ("upper"|"lower"|"trim"|"empty_to_null"|"iso4217", or a list of them), required
  any other table             a nested JSON object, built recursively
Conditions (`when`): { path, eq | ne | in | not_in | exists }, { all = [...] }, { any = [...] },
{ not = {...} }; a list means all of them.
Lookups: a route may name stored messages (`[routes.lookup.<name>]` with a destination and an
idempotency-key template); ingest resolves them from the store before mapping, and rules read
them as `lookup.<name>.<field>` (missing when nothing was recorded).
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any, TypeAlias

from relay import currency
from relay.errors import MappingError
from relay.models import EventStatus, OutboundDraft

PathPart: TypeAlias = str | int
Path: TypeAlias = tuple[PathPart, ...]

_MISSING: Any = object()
_SEGMENT = re.compile(r"([A-Za-z0-9_\-]+)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")
_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

SOURCE_KEYS = ("const", "path", "first", "template")
OPTION_KEYS = ("default", "type", "minor_to_major", "major_to_minor", "transform", "required")
TYPES = ("string", "int", "float", "bool")
TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "upper": lambda v: v.upper(),
    "lower": lambda v: v.lower(),
    "trim": lambda v: v.strip(),
    "empty_to_null": lambda v: None if v == "" else v,
    "iso4217": lambda v: _iso4217(v),
}


def _iso4217(value: str) -> str:
    code = value.strip().upper()
    if currency.exponent(code) is None:
        raise MappingError(f"{value!r} is not an ISO 4217 currency code")
    return code


class RuleSyntaxError(Exception):
    """Raised while compiling; carries every problem found, each prefixed with its key path."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        super().__init__("; ".join(problems))


def parse_path(text: str, where: str) -> Path:
    """`data.items[0].id` -> ("data", "items", 0, "id")."""
    if not isinstance(text, str) or not text:
        raise RuleSyntaxError([f"{where}: a path must be a non-empty string"])
    parts: list[PathPart] = []
    for segment in text.split("."):
        match = _SEGMENT.match(segment)
        if match is None:
            raise RuleSyntaxError(
                [f"{where}: bad path {text!r} (use dotted names and [index]: data.items[0].id)"]
            )
        parts.append(match.group(1))
        parts.extend(int(i) for i in _INDEX.findall(match.group(2)))
    return tuple(parts)


def format_path(path: Path) -> str:
    out = ""
    for part in path:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else part)
    return out


def lookup(event: Any, path: Path) -> Any:
    """The value at `path`, or `_MISSING`. Never raises on odd shapes."""
    value = event
    for part in path:
        if isinstance(part, int):
            if not isinstance(value, list) or part >= len(value):
                return _MISSING
            value = value[part]
        else:
            if not isinstance(value, dict) or part not in value:
                return _MISSING
            value = value[part]
    return value


# ---------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class Template:
    """A string with `{path}` placeholders; every placeholder must resolve to a scalar."""

    text: str
    pieces: tuple[str | Path, ...]

    def render(self, event: Any, where: str) -> str:
        out: list[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = lookup(event, piece)
            if value is _MISSING or value is None or value == "":
                raise MappingError(f"{where}: {format_path(piece)} is missing or empty")
            if isinstance(value, dict | list):
                raise MappingError(f"{where}: {format_path(piece)} is not a scalar")
            out.append(_scalar_text(value))
        return "".join(out)


def _scalar_text(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def compile_template(text: Any, where: str) -> Template:
    if not isinstance(text, str) or not text:
        raise RuleSyntaxError([f"{where}: a template must be a non-empty string"])
    pieces: list[str | Path] = []
    literal = ""
    pos = 0
    for match in _PLACEHOLDER.finditer(text):
        literal += text[pos : match.start()]
        pos = match.end()
        token = match.group(0)
        if token in ("{{", "}}"):
            literal += token[0]
        elif token in ("{", "}"):
            raise RuleSyntaxError([f"{where}: unbalanced brace in template {text!r}"])
        else:
            if literal:
                pieces.append(literal)
                literal = ""
            pieces.append(parse_path(match.group(1).strip(), where))
    literal += text[pos:]
    if literal:
        pieces.append(literal)
    return Template(text=text, pieces=tuple(pieces))


# ---------------------------------------------------------------- value rules


@dataclass(frozen=True, slots=True)
class ValueRule:
    """One output field: where its value comes from and what happens to it."""

    const: Any = _MISSING
    paths: tuple[Path, ...] = ()  # one for `path`, several for `first`
    template: Template | None = None
    default: Any = _MISSING
    type: str | None = None
    units: tuple[str, Path] | None = None  # ("minor_to_major" | "major_to_minor", currency)
    transforms: tuple[str, ...] = ()
    required: bool = False

    def evaluate(self, event: Any, where: str) -> Any:
        value = self._source(event, where)
        if value is _MISSING:
            value = None
        if value is None and self.default is not _MISSING:
            value = self.default
        if self.type is not None and value is not None:
            value = _coerce(value, self.type, where)
        if self.units is not None and value is not None:
            value = _convert_units(value, self.units, event, where)
        for name in self.transforms:
            if value is None:
                break
            if not isinstance(value, str):
                raise MappingError(
                    f"{where}: transform {name!r} needs a string, got {_type_name(value)}"
                )
            try:
                value = TRANSFORMS[name](value)
            except MappingError as exc:
                raise MappingError(f"{where}: {exc.message}") from None
        if self.required and (value is None or value == ""):
            raise MappingError(
                f"{where}: required, but {self._describe()} is missing, null or empty"
            )
        return value

    def _source(self, event: Any, where: str) -> Any:
        if self.template is not None:
            return self.template.render(event, where)
        if len(self.paths) == 1:
            return lookup(event, self.paths[0])
        if self.paths:
            for path in self.paths:
                value = lookup(event, path)
                if value is not _MISSING and value is not None and value != "":
                    return value
            return _MISSING
        return self.const

    def _describe(self) -> str:
        if self.template is not None:
            return f"template {self.template.text!r}"
        if self.paths:
            return " / ".join(format_path(p) for p in self.paths)
        return "the constant"


@dataclass(frozen=True, slots=True)
class ObjectRule:
    """A JSON object: field name -> rule, in the order written in relay.toml."""

    fields: tuple[tuple[str, ValueRule | ObjectRule], ...]

    def evaluate(self, event: Any, where: str) -> dict[str, Any]:
        return {name: rule.evaluate(event, f"{where}.{name}") for name, rule in self.fields}


def _convert_units(value: Any, units: tuple[str, Path], event: Any, where: str) -> Any:
    direction, currency_path = units
    code = lookup(event, currency_path)
    if not isinstance(code, str) or currency.exponent(code) is None:
        raise MappingError(
            f"{where}: {direction} needs an ISO 4217 code at {format_path(currency_path)}, "
            f"got {_preview(code) if code is not _MISSING else 'nothing'}"
        )
    if isinstance(value, bool) or not isinstance(value, int | float | str):
        raise MappingError(f"{where}: {direction} needs a number, got {_type_name(value)}")
    try:
        if direction == "minor_to_major":
            if isinstance(value, float) and not value.is_integer():
                raise ValueError("a minor-unit amount must be a whole number")
            major = currency.minor_to_major(int(Decimal(str(value))), code)
            # Exact decimal text -> float: the shortest repr round-trips (44.1, 1.005).
            return int(major) if major == major.to_integral_value() else float(major)
        return currency.major_to_minor(Decimal(str(value).strip()), code)
    except (ValueError, InvalidOperation) as exc:
        raise MappingError(f"{where}: {direction}: {exc}") from None


def _type_name(value: Any) -> str:
    return {dict: "object", list: "array", str: "string", bool: "bool", int: "int"}.get(
        type(value), type(value).__name__
    )


def _coerce(value: Any, kind: str, where: str) -> Any:
    bad = MappingError(f"{where}: cannot make {kind} of {_type_name(value)} {_preview(value)}")
    if kind == "string":
        if isinstance(value, dict | list):
            raise bad
        return _scalar_text(value)
    if kind == "int":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int):
            return value
        if isinstance(value, float) and value.is_integer():
            return int(value)
        if isinstance(value, str) and re.fullmatch(r"-?\d+", value.strip()):
            return int(value.strip())
        raise bad
    if kind == "float":
        if isinstance(value, bool):
            raise bad
        if isinstance(value, int | float):
            return float(value)
        if isinstance(value, str):
            try:
                return float(value.strip())
            except ValueError:
                raise bad from None
        raise bad
    # bool
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    raise bad


def _preview(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, dict | list) else ""
    return text if len(text) <= 40 else text[:37] + "..."


def compile_value(raw: Any, where: str) -> ValueRule | ObjectRule:
    """Compile one body entry; raise `RuleSyntaxError` naming `where`."""
    if isinstance(raw, str | int | float | bool):
        return ValueRule(const=raw)
    if isinstance(raw, list):
        raise RuleSyntaxError(
            [f"{where}: an array is not a rule; write {{ const = [...] }} for a constant array"]
        )
    if not isinstance(raw, dict):
        raise RuleSyntaxError([f"{where}: unsupported value of type {type(raw).__name__}"])
    sources = [k for k in SOURCE_KEYS if k in raw]
    if not sources:
        options = [k for k in OPTION_KEYS if k in raw]
        if options:
            # `{ pth = "data.x", type = "int" }` is a typo, not an object with a field "type".
            raise RuleSyntaxError(
                [
                    f"{where}: has {', '.join(options)} but no source; a rule needs one of "
                    f"{', '.join(SOURCE_KEYS)} (for an object field named {options[0]!r}, write "
                    f"{options[0]} = {{ const = ... }})"
                ]
            )
        return compile_object(raw, where)
    problems: list[str] = []
    if len(sources) > 1:
        problems.append(f"{where}: use only one of {', '.join(sources)}")
    unknown = [k for k in raw if k not in SOURCE_KEYS and k not in OPTION_KEYS]
    problems += [
        f"{where}.{k}: unknown rule key (allowed: {', '.join(SOURCE_KEYS + OPTION_KEYS)})"
        for k in unknown
    ]
    kwargs: dict[str, Any] = {}
    try:
        if "const" in raw:
            kwargs["const"] = raw["const"]
        elif "path" in raw:
            kwargs["paths"] = (parse_path(raw["path"], f"{where}.path"),)
        elif "first" in raw:
            first = raw["first"]
            if not isinstance(first, list) or not first:
                problems.append(f"{where}.first: must be a non-empty array of paths")
            else:
                kwargs["paths"] = tuple(
                    parse_path(p, f"{where}.first[{i}]") for i, p in enumerate(first)
                )
        else:
            kwargs["template"] = compile_template(raw["template"], f"{where}.template")
    except RuleSyntaxError as exc:
        problems += exc.problems
    if "default" in raw:
        kwargs["default"] = raw["default"]
    if "type" in raw:
        if raw["type"] not in TYPES:
            problems.append(
                f"{where}.type: unknown type {raw['type']!r} (allowed: {', '.join(TYPES)})"
            )
        else:
            kwargs["type"] = raw["type"]
    directions = [k for k in ("minor_to_major", "major_to_minor") if k in raw]
    if len(directions) > 1:
        problems.append(f"{where}: use only one of minor_to_major, major_to_minor")
    elif directions:
        try:
            kwargs["units"] = (
                directions[0],
                parse_path(raw[directions[0]], f"{where}.{directions[0]}"),
            )
        except RuleSyntaxError as exc:
            problems += [p + " (the path of the currency code)" for p in exc.problems]
    if "transform" in raw:
        is_list = isinstance(raw["transform"], list)
        names = raw["transform"] if is_list else [raw["transform"]]
        for i, name in enumerate(names):
            if not isinstance(name, str) or name not in TRANSFORMS:  # a list is unhashable
                at = f"{where}.transform[{i}]" if is_list else f"{where}.transform"
                problems.append(
                    f"{at}: unknown transform {name!r} (allowed: {', '.join(TRANSFORMS)})"
                )
        kwargs["transforms"] = tuple(str(n) for n in names)
    if "required" in raw:
        if not isinstance(raw["required"], bool):
            problems.append(f"{where}.required: must be true or false")
        else:
            kwargs["required"] = raw["required"]
    if problems:
        raise RuleSyntaxError(problems)
    return ValueRule(**kwargs)


def compile_object(raw: Mapping[str, Any], where: str) -> ObjectRule:
    problems: list[str] = []
    fields: list[tuple[str, ValueRule | ObjectRule]] = []
    for name, value in raw.items():
        try:
            fields.append((name, compile_value(value, f"{where}.{name}")))
        except RuleSyntaxError as exc:
            problems += exc.problems
    if problems:
        raise RuleSyntaxError(problems)
    return ObjectRule(fields=tuple(fields))


# ---------------------------------------------------------------- conditions


@dataclass(frozen=True, slots=True)
class Condition:
    """`op` is one of eq, ne, in, not_in, exists, all, any, not."""

    op: str
    path: Path = ()
    value: Any = None
    children: tuple[Condition, ...] = ()

    def holds(self, event: Any) -> bool:
        if self.op == "all":
            return all(c.holds(event) for c in self.children)
        if self.op == "any":
            return any(c.holds(event) for c in self.children)
        if self.op == "not":
            return not self.children[0].holds(event)
        found = lookup(event, self.path)
        if self.op == "exists":
            present = found is not _MISSING and found is not None
            return present is bool(self.value)
        if found is _MISSING:
            found = None
        if self.op == "eq":
            return _same(found, self.value)
        if self.op == "ne":
            return not _same(found, self.value)
        if self.op == "in":
            return any(_same(found, v) for v in self.value)
        return not any(_same(found, v) for v in self.value)  # not_in


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, and 1 is 1.0 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    return bool(a == b)


COMPARISONS = ("eq", "ne", "in", "not_in", "exists")


def compile_condition(raw: Any, where: str) -> Condition:
    if isinstance(raw, list):
        return Condition(
            op="all",
            children=tuple(compile_condition(c, f"{where}[{i}]") for i, c in enumerate(raw)),
        )
    if not isinstance(raw, dict):
        raise RuleSyntaxError([f"{where}: a condition must be a table or an array of tables"])
    for combinator in ("all", "any"):
        if combinator in raw:
            if len(raw) != 1 or not isinstance(raw[combinator], list):
                raise RuleSyntaxError(
                    [f"{where}: {{ {combinator} = [...] }} takes an array and nothing else"]
                )
            children = raw[combinator]
            return Condition(
                op=combinator,
                children=tuple(
                    compile_condition(c, f"{where}.{combinator}[{i}]")
                    for i, c in enumerate(children)
                ),
            )
    if "not" in raw:
        if len(raw) != 1:
            raise RuleSyntaxError([f"{where}: {{ not = {{...}} }} takes one condition"])
        return Condition(op="not", children=(compile_condition(raw["not"], f"{where}.not"),))
    ops = [k for k in COMPARISONS if k in raw]
    unknown = [k for k in raw if k != "path" and k not in COMPARISONS]
    problems = [
        f"{where}.{k}: unknown condition key (allowed: path, {', '.join(COMPARISONS)}, "
        "all, any, not)"
        for k in unknown
    ]
    if "path" not in raw:
        problems.append(f"{where}: a comparison needs a path")
    if len(ops) != 1:
        problems.append(f"{where}: give exactly one of {', '.join(COMPARISONS)}")
    if problems:
        raise RuleSyntaxError(problems)
    op = ops[0]
    value = raw[op]
    if op in ("in", "not_in") and not isinstance(value, list):
        raise RuleSyntaxError([f"{where}.{op}: must be an array"])
    if op == "exists" and not isinstance(value, bool):
        raise RuleSyntaxError([f"{where}.exists: must be true or false"])
    if isinstance(value, dict):
        raise RuleSyntaxError([f"{where}.{op}: compare with a scalar, not a table"])
    return Condition(op=op, path=parse_path(raw["path"], f"{where}.path"), value=value)


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
            if lookup(parent, (last,)) is not _MISSING:
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
