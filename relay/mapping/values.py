"""Value rules: where a body field comes from and what happens to it (coercion, units,
transforms, required), and nested objects of them."""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from decimal import Decimal, InvalidOperation
from typing import Any

from relay import currency
from relay.errors import MappingError
from relay.mapping.paths import MISSING, Path, RuleSyntaxError, format_path, lookup, parse_path
from relay.mapping.templates import Template, compile_template, scalar_text

SOURCE_KEYS = ("const", "path", "first", "template", "sum")
OPTION_KEYS = ("default", "type", "minor_to_major", "major_to_minor", "transform", "required")
TYPES = ("string", "int", "float", "bool")
TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "upper": lambda v: v.upper(),
    "lower": lambda v: v.lower(),
    "trim": lambda v: v.strip(),
    "empty_to_null": lambda v: None if v == "" else v,
    "iso4217": lambda v: _iso4217(v),
}
# Transforms of numbers: a negative Polar amount (a proration credit) becomes the positive
# amount of a refund-like call.
NUMBER_TRANSFORMS: dict[str, Callable[[Any], Any]] = {
    "negate": lambda v: -v,
    "abs": abs,
}
ALL_TRANSFORMS = (*TRANSFORMS, *NUMBER_TRANSFORMS)


def _iso4217(value: str) -> str:
    code = value.strip().upper()
    if currency.exponent(code) is None:
        raise MappingError(f"{value!r} is not an ISO 4217 currency code")
    return code


# ---------------------------------------------------------------- value rules


@dataclass(frozen=True, slots=True)
class ValueRule:
    """One output field: where its value comes from and what happens to it."""

    const: Any = MISSING
    paths: tuple[Path | Template, ...] = ()  # one for `path`, several for `first`
    template: Template | None = None
    addends: tuple[Path, ...] = ()  # `sum`
    default: Any = MISSING
    type: str | None = None
    units: tuple[str, Path] | None = None  # ("minor_to_major" | "major_to_minor", currency)
    transforms: tuple[str, ...] = ()
    required: bool = False

    def evaluate(self, event: Any, where: str) -> Any:
        value = self._source(event, where)
        if value is MISSING:
            value = None
        if value is None and self.default is not MISSING:
            value = self.default
        if self.type is not None and value is not None:
            value = _coerce(value, self.type, where)
        if self.units is not None and value is not None:
            value = _convert_units(value, self.units, event, where)
        for name in self.transforms:
            if value is None:
                break
            if name in NUMBER_TRANSFORMS:
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise MappingError(
                        f"{where}: transform {name!r} needs a number, got {_type_name(value)}"
                    )
                value = NUMBER_TRANSFORMS[name](value)
                continue
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
        if len(self.paths) == 1 and not isinstance(self.paths[0], Template):
            return lookup(event, self.paths[0])
        if self.paths:
            for candidate in self.paths:
                value = _candidate(event, candidate, where)
                if value is not MISSING and value is not None and value != "":
                    return value
            return MISSING
        if self.addends:
            return _sum(event, self.addends, where)
        return self.const

    def reads(self) -> list[Path]:
        """Every event path this rule reads."""
        found: list[Path] = list(self.addends)
        for candidate in self.paths:
            found += candidate.reads() if isinstance(candidate, Template) else [candidate]
        if self.template is not None:
            found += self.template.reads()
        if self.units is not None:
            found.append(self.units[1])
        return found

    def source_text(self) -> str:
        """Where the value comes from, as `relay check` shows it."""
        if self.template is not None:
            return f"template {self.template.text!r}"
        if len(self.paths) == 1:
            return f"path {_describe_candidate(self.paths[0])}"
        if self.paths:
            return "first of " + ", ".join(_describe_candidate(p) for p in self.paths)
        if self.addends:
            return "sum of " + " + ".join(format_path(p) for p in self.addends)
        return json.dumps(self.const, default=str)

    def _describe(self) -> str:
        if self.template is not None:
            return f"template {self.template.text!r}"
        if self.paths:
            return " / ".join(_describe_candidate(p) for p in self.paths)
        if self.addends:
            return "sum of " + " + ".join(format_path(p) for p in self.addends)
        return "the constant"


def _describe_candidate(candidate: Path | Template) -> str:
    if isinstance(candidate, Template):
        return f"template {candidate.text!r}"
    return format_path(candidate)


def _candidate(event: Any, candidate: Path | Template, where: str) -> Any:
    """One entry of `first`: a path's value, or a template rendered; a template with a missing
    field counts as missing, so the next entry is tried."""
    if not isinstance(candidate, Template):
        return lookup(event, candidate)
    try:
        return candidate.render(event, where)
    except MappingError:
        return MISSING


def _sum(event: Any, addends: tuple[Path, ...], where: str) -> Any:
    """The sum of numbers at `addends`; missing when any is missing or null (so `required`
    says which), a mapping error when one is not a number."""
    total: int | float = 0
    for path in addends:
        value = lookup(event, path)
        if value is MISSING or value is None:
            return MISSING
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise MappingError(
                f"{where}: sum needs numbers, got {_type_name(value)} at {format_path(path)}"
            )
        total += value
    return total


@dataclass(frozen=True, slots=True)
class ObjectRule:
    """A JSON object: field name -> rule, in the order written in relay.toml."""

    fields: tuple[tuple[str, ValueRule | ObjectRule], ...]

    def reads(self) -> list[Path]:
        return [p for _, rule in self.fields for p in rule.reads()]

    def evaluate(self, event: Any, where: str) -> dict[str, Any]:
        return {name: rule.evaluate(event, f"{where}.{name}") for name, rule in self.fields}


def _convert_units(value: Any, units: tuple[str, Path], event: Any, where: str) -> Any:
    direction, currency_path = units
    code = lookup(event, currency_path)
    if not isinstance(code, str) or currency.exponent(code) is None:
        raise MappingError(
            f"{where}: {direction} needs an ISO 4217 code at {format_path(currency_path)}, "
            f"got {_preview(code) if code is not MISSING else 'nothing'}"
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
    coerced = _COERCIONS[kind](value)
    if coerced is _CANNOT:
        # Built only on failure: this runs for every typed field of every webhook.
        raise MappingError(f"{where}: cannot make {kind} of {_type_name(value)} {_preview(value)}")
    return coerced


_CANNOT: Any = object()
_INT_TEXT = re.compile(r"-?\d+")


def _to_string(value: Any) -> Any:
    return _CANNOT if isinstance(value, dict | list) else scalar_text(value)


def _to_int(value: Any) -> Any:
    if isinstance(value, bool):
        return _CANNOT
    if isinstance(value, int):
        return value
    if isinstance(value, float) and value.is_integer():
        return int(value)
    if isinstance(value, str) and _INT_TEXT.fullmatch(value.strip()):
        return int(value.strip())
    return _CANNOT


def _to_float(value: Any) -> Any:
    if isinstance(value, bool):
        return _CANNOT
    if isinstance(value, int | float):
        return float(value)
    if isinstance(value, str):
        try:
            return float(value.strip())
        except ValueError:
            return _CANNOT
    return _CANNOT


def _to_bool(value: Any) -> Any:
    if isinstance(value, bool):
        return value
    if isinstance(value, str) and value.strip().lower() in ("true", "false"):
        return value.strip().lower() == "true"
    return _CANNOT


_COERCIONS: dict[str, Callable[[Any], Any]] = {
    "string": _to_string,
    "int": _to_int,
    "float": _to_float,
    "bool": _to_bool,
}


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
    _compile_source(raw, where, kwargs, problems)
    _compile_options(raw, where, kwargs, problems)
    if problems:
        raise RuleSyntaxError(problems)
    return ValueRule(**kwargs)


def _compile_source(
    raw: dict[str, Any], where: str, kwargs: dict[str, Any], problems: list[str]
) -> None:
    """The rule's one source (const, path, first, sum or template) into `kwargs`."""
    try:
        if "const" in raw:
            kwargs["const"] = raw["const"]
        elif "path" in raw:
            kwargs["paths"] = (parse_path(raw["path"], f"{where}.path"),)
        elif "first" in raw:
            entries = _non_empty_array(raw["first"], f"{where}.first", problems)
            kwargs["paths"] = tuple(
                _compile_candidate(p, f"{where}.first[{i}]") for i, p in enumerate(entries)
            )
        elif "sum" in raw:
            entries = _non_empty_array(raw["sum"], f"{where}.sum", problems)
            kwargs["addends"] = tuple(
                parse_path(p, f"{where}.sum[{i}]") for i, p in enumerate(entries)
            )
        else:
            kwargs["template"] = compile_template(raw["template"], f"{where}.template")
    except RuleSyntaxError as exc:
        problems += exc.problems


def _non_empty_array(value: Any, where: str, problems: list[str]) -> list[Any]:
    if not isinstance(value, list) or not value:
        problems.append(f"{where}: must be a non-empty array of paths")
        return []
    return value


def _compile_options(
    raw: dict[str, Any], where: str, kwargs: dict[str, Any], problems: list[str]
) -> None:
    """default, type, units, transform and required into `kwargs`."""
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
        kwargs["transforms"] = _compile_transforms(raw["transform"], where, problems)
    if "required" in raw:
        if not isinstance(raw["required"], bool):
            problems.append(f"{where}.required: must be true or false")
        else:
            kwargs["required"] = raw["required"]


def _compile_transforms(raw: Any, where: str, problems: list[str]) -> tuple[str, ...]:
    is_list = isinstance(raw, list)
    names = raw if is_list else [raw]
    for i, name in enumerate(names):
        if not isinstance(name, str) or name not in ALL_TRANSFORMS:  # a list is unhashable
            at = f"{where}.transform[{i}]" if is_list else f"{where}.transform"
            problems.append(
                f"{at}: unknown transform {name!r} (allowed: {', '.join(ALL_TRANSFORMS)})"
            )
    return tuple(str(n) for n in names)


def _compile_candidate(raw: Any, where: str) -> Path | Template:
    """An entry of `first`: a path, or `{ template = "..." }`."""
    if isinstance(raw, dict):
        if set(raw) != {"template"}:
            raise RuleSyntaxError(
                [f'{where}: an entry of first is a path or {{ template = "..." }}']
            )
        return compile_template(raw["template"], f"{where}.template")
    return parse_path(raw, where)


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
