"""Reading TOML tables with checks: interpolation of `${VAR}` / `${VAR:-default}`, a table
reader that records every problem under its full key path and flags unknown keys, and the
small value checks the sections share. Never quotes a secret's value in a message.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Mapping
from dataclasses import MISSING, Field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import urlsplit

from relay.access import Network, parse_networks
from relay.errors import MissingEnvVar

if TYPE_CHECKING:
    from _typeshed import DataclassInstance

T = TypeVar("T")
D = TypeVar("D", bound="DataclassInstance")
_VAR = re.compile(r"\$\$|\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")
_REQUIRED: Any = object()

# ---------------------------------------------------------------- interpolation


# What an unset variable reads as in an offline load (`relay check`, `relay map`): shown where
# its value would be, accepted by every check that would judge the value.
UNSET = "<unset: {}>"
UNSET_MARK = re.compile(r"<unset: ([A-Za-z_][A-Za-z0-9_]*)>")


def interpolate(
    raw: Any,
    env: Mapping[str, str],
    where: str,
    missing: list[MissingEnvVar],
    *,
    placeholders: bool = False,
) -> Any:
    """Replace `${VAR}` and `${VAR:-default}` in every string; `$$` is a literal `$`. A
    required variable that is unset is recorded in `missing`; with `placeholders` it reads as
    `<unset: VAR>`, else as ""."""
    if isinstance(raw, dict):
        return {
            k: interpolate(v, env, _join(where, k), missing, placeholders=placeholders)
            for k, v in raw.items()
        }
    if isinstance(raw, list):
        return [
            interpolate(v, env, f"{where}[{i}]", missing, placeholders=placeholders)
            for i, v in enumerate(raw)
        ]
    if not isinstance(raw, str):
        return raw

    def substitute(match: re.Match[str]) -> str:
        if match.group(0) == "$$":
            return "$"
        name, default = match.group(1), match.group(2)
        value = env.get(name)
        if value is None or value == "":
            if default is not None:
                return default
            # Set but empty is as good as missing: an empty write key or secret is a mistake.
            missing.append(MissingEnvVar(name, where))
            return UNSET.format(name) if placeholders else ""
        return value

    return _VAR.sub(substitute, raw)


_BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")


def _join(where: str, key: str) -> str:
    # A key that TOML would need quotes for is shown quoted, escapes and all: an error stays
    # one line whatever a key holds (a newline, a dot).
    shown = key if _BARE_KEY.fullmatch(key) else json.dumps(key)
    return f"{where}.{shown}" if where else shown


# ---------------------------------------------------------------- a checked reader


class Table:
    """Reads one TOML table, recording problems with full key paths; flags unknown keys."""

    def __init__(self, raw: Any, where: str, problems: list[str]) -> None:
        self.where = where
        self.problems = problems
        self.seen: set[str] = set()
        if not isinstance(raw, dict):
            problems.append(f"{where}: must be a table")
            raw = {}
        self.raw: dict[str, Any] = raw

    def path(self, key: str) -> str:
        return _join(self.where, key)

    def get(
        self,
        key: str,
        kind: type[T] | tuple[type, ...],
        default: Any = _REQUIRED,
        check: Callable[[Any], str | None] | None = None,
    ) -> Any:
        self.seen.add(key)
        if key not in self.raw:
            if default is _REQUIRED:
                self.problems.append(f"{self.path(key)}: required")
            return None if default is _REQUIRED else default
        value = self.raw[key]
        kinds = kind if isinstance(kind, tuple) else (kind,)
        if isinstance(value, str) and UNSET_MARK.search(value):
            # An offline load: the value is not known, so neither is whether it is valid.
            return value if str in kinds else (None if default is _REQUIRED else default)
        if isinstance(value, str) and str not in kinds:
            # "${RELAY_PORT:-8080}": interpolation yields strings; read numbers from them.
            value = _number_from_text(value, int in kinds)
        if float in kinds and isinstance(value, int) and not isinstance(value, bool):
            value = float(value)
        if (isinstance(value, bool) and bool not in kinds) or not isinstance(value, kinds):
            names = " or ".join(_KIND_NAMES.get(k, k.__name__) for k in kinds)
            self.problems.append(f"{self.path(key)}: must be {names}")
            return None if default is _REQUIRED else default
        if check is not None and (message := _checked(check, value)) is not None:
            self.problems.append(f"{self.path(key)}: {message}")
            return None if default is _REQUIRED else default
        return value

    def sub(self, key: str) -> Table:
        self.seen.add(key)
        return Table(self.raw.get(key, {}), self.path(key), self.problems)

    def done(self, allowed_extra: tuple[str, ...] = ()) -> None:
        for key in self.raw:
            if key not in self.seen and key not in allowed_extra:
                allowed = ", ".join(sorted(self.seen)) or "none"
                self.problems.append(f"{self.path(key)}: unknown key (allowed: {allowed})")


# ---------------------------------------------------------------- sections from their dataclass

_PLAIN_KINDS: dict[str, type] = {"str": str, "int": int, "float": float, "bool": bool}
_FIELD_DEFAULT: Any = object()


def read_fields(
    t: Table,
    cls: type[D],
    *,
    given: Mapping[str, Any] | None = None,
    defaults: Mapping[str, Any] | None = None,
) -> D:
    """One section's dataclass from its table, field by field in declaration order: each field
    from the key of its name, as its annotated plain type, with the field's default (or the one
    in `defaults`) and the checks in its metadata (see `read_field`). `given` supplies the
    fields the section reads itself (secrets, nested tables, names). Problems are recorded in
    `t`; a value that fails its check reads as the default, so the instance can still be built.
    """
    given = given or {}
    defaults = defaults or {}
    values = {
        f.name: given[f.name]
        if f.name in given
        else _read(t, f, defaults.get(f.name, _FIELD_DEFAULT))
        for f in fields(cls)
        if f.init
    }
    return cls(**values)


def read_field(
    t: Table, cls: type[DataclassInstance], name: str, default: Any = _FIELD_DEFAULT
) -> Any:
    """One field of `cls` from the key of its name, by the field's metadata: `check`, a value
    check (`between(0, 65535)`) applied to a str/int/float/bool field; or `read`, a reader of
    its own, called as `read(t, name)` (`networks`). Without `default`, the field's own; a field
    without one is required."""
    [f] = [f for f in fields(cls) if f.name == name]
    return _read(t, f, default)


def _read(t: Table, f: Field[Any], default: Any) -> Any:
    if "read" in f.metadata:
        return f.metadata["read"](t, f.name)
    kind = _PLAIN_KINDS.get(f.type) if isinstance(f.type, str) else f.type
    if not isinstance(kind, type):  # a mistake in this package, not in relay.toml
        raise TypeError(f"{f.name}: a field of type {f.type} must be given or have a reader")
    if default is _FIELD_DEFAULT:
        default = _REQUIRED if f.default is MISSING else f.default
    return t.get(f.name, kind, default, f.metadata.get("check"))


def _checked(check: Callable[[Any], str | None], value: Any) -> str | None:
    """A check's verdict. A check that trips over a malformed value (a URL parser's
    ValueError, a file name the OS refuses) has found a bad value, not a bug to crash on; the
    exception's text is not quoted: the value may be a secret."""
    try:
        return check(value)
    except (ValueError, OSError):
        return "not a valid value"


def _number_from_text(text: str, integer: bool) -> Any:
    text = text.strip()
    try:
        return int(text) if integer and re.fullmatch(r"-?\d+", text) else float(text)
    except ValueError:
        return text  # left as a string: the type check below reports it


_KIND_NAMES = {
    str: "a string",
    int: "an integer",
    float: "a number",
    bool: "true or false",
    list: "an array",
    dict: "a table",
}


def positive(value: float) -> str | None:
    if value == math.inf:  # it would reach the store as a lease or a due time
        return "must be a finite number"
    return None if value > 0 else "must be greater than 0"  # NaN fails `> 0` too


def between(low: float, high: float) -> Callable[[float], str | None]:
    def check(value: float) -> str | None:
        return None if low <= value <= high else f"must be between {low:g} and {high:g}"

    return check


def one_of(*choices: str) -> Callable[[str], str | None]:
    def check(value: str) -> str | None:
        return None if value in choices else f"must be one of {', '.join(choices)}"

    return check


def non_empty(value: str) -> str | None:
    return None if value else "must not be empty"


def optional(check: Callable[[str], str | None]) -> Callable[[str], str | None]:
    """`check`, except that an empty string (the setting left blank) passes."""

    def check_unless_empty(value: str) -> str | None:
        return None if not value else check(value)

    return check_unless_empty


def http_url(value: str) -> str | None:
    try:
        parts = urlsplit(value)
    except ValueError:  # "http://[::1": an unclosed IPv6 bracket
        return "must be an http:// or https:// URL with a host"
    if parts.scheme not in ("http", "https") or not parts.hostname:
        return "must be an http:// or https:// URL with a host"
    return None


def time_zone(value: str) -> str | None:
    """An IANA time zone name this system knows."""
    from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

    try:
        ZoneInfo(value)
    except (ZoneInfoNotFoundError, ValueError):
        return f"unknown time zone {value!r} (an IANA name such as UTC or Europe/Berlin)"
    return None


def url_path(value: str) -> str | None:
    return None if value.startswith("/") else "must start with /"


def readable_file(value: str) -> str | None:
    try:
        if value and not Path(value).is_file():
            return "no such file"
    except (OSError, ValueError) as exc:  # a name too long, a NUL byte
        return f"cannot use this file name: {getattr(exc, 'strerror', None) or exc}"
    return None


def networks(t: Table, key: str) -> tuple[Network, ...]:
    values = t.get(key, list, [])
    if not all(isinstance(v, str) for v in values):
        t.problems.append(f"{t.path(key)}: must be an array of addresses or CIDR networks")
        return ()
    try:
        return parse_networks(values)
    except ValueError as exc:
        t.problems.append(f"{t.path(key)}: {exc}")
        return ()


def listen_address(value: str) -> str | None:
    if not value:
        return None
    _, sep, port = value.rpartition(":")
    if not sep or not port.isdigit() or not 0 <= int(port) <= 65535:
        return "must be host:port, like 127.0.0.1:9090"
    return None
