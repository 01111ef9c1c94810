"""Dotted paths into an event (`data.items[0].id`): parsing, printing, looking up.

`MISSING` marks a path that leads nowhere; the rules turn it into null."""

from __future__ import annotations

import re
from typing import Any, TypeAlias

PathPart: TypeAlias = str | int
Path: TypeAlias = tuple[PathPart, ...]

MISSING: Any = object()
_SEGMENT = re.compile(r"([A-Za-z0-9_\-]+)((?:\[\d+\])*)$")
_INDEX = re.compile(r"\[(\d+)\]")


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
    """The value at `path`, or `MISSING`. Never raises on odd shapes."""
    value = event
    for part in path:
        if isinstance(part, int):
            if not isinstance(value, list) or part >= len(value):
                return MISSING
            value = value[part]
        else:
            if not isinstance(value, dict) or part not in value:
                return MISSING
            value = value[part]
    return value
