"""String templates with `{path}` placeholders (idempotency keys, ids)."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from relay.errors import MappingError
from relay.mapping.paths import MISSING, Path, RuleSyntaxError, format_path, lookup, parse_path

_PLACEHOLDER = re.compile(r"\{\{|\}\}|\{([^{}]*)\}|[{}]")

# ---------------------------------------------------------------- templates


@dataclass(frozen=True, slots=True)
class Template:
    """A string with `{path}` placeholders; every placeholder must resolve to a scalar."""

    text: str
    pieces: tuple[str | Path, ...]

    def reads(self) -> list[Path]:
        return [piece for piece in self.pieces if not isinstance(piece, str)]

    def render(self, event: Any, where: str) -> str:
        out: list[str] = []
        for piece in self.pieces:
            if isinstance(piece, str):
                out.append(piece)
                continue
            value = lookup(event, piece)
            if value is MISSING or value is None or value == "":
                raise MappingError(f"{where}: {format_path(piece)} is missing or empty")
            if isinstance(value, dict | list):
                raise MappingError(f"{where}: {format_path(piece)} is not a scalar")
            out.append(scalar_text(value))
        return "".join(out)


def scalar_text(value: Any) -> str:
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
