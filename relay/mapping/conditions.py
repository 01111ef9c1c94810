"""Route conditions (`when`): comparisons on paths, combined with all / any / not.

A route with lookups evaluates its condition with the lookups in place, so `lookup.<name>.<field>`
can be compared like any other path (e.g. "only when the refund was recorded")."""

from __future__ import annotations

import operator
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from relay.mapping.paths import MISSING, Path, RuleSyntaxError, lookup, parse_path

# ---------------------------------------------------------------- conditions


@dataclass(frozen=True, slots=True)
class Condition:
    """`op` is one of eq, ne, in, not_in, exists, lt, le, gt, ge, all, any, not."""

    op: str
    path: Path = ()
    value: Any = None
    children: tuple[Condition, ...] = ()

    def reads(self) -> list[Path]:
        return [self.path] if self.path else [p for c in self.children for p in c.reads()]

    def holds(self, event: Any) -> bool:
        if self.op == "all":
            return all(c.holds(event) for c in self.children)
        if self.op == "any":
            return any(c.holds(event) for c in self.children)
        if self.op == "not":
            return not self.children[0].holds(event)
        found = lookup(event, self.path)
        if self.op == "exists":
            present = found is not MISSING and found is not None
            return present is bool(self.value)
        if found is MISSING:
            found = None
        if self.op == "eq":
            return _same(found, self.value)
        if self.op == "ne":
            return not _same(found, self.value)
        if self.op == "in":
            return any(_same(found, v) for v in self.value)
        if self.op == "not_in":
            return not any(_same(found, v) for v in self.value)
        # lt, le, gt, ge: numbers only. A missing value, null, a string or a bool is no number,
        # so the comparison does not hold (`{ path = "data.net_amount", lt = 0 }` never takes
        # an order whose amount is absent).
        if not _is_number(found):
            return False
        return bool(_ORDER[self.op](found, self.value))


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


_ORDER: dict[str, Callable[[Any, Any], bool]] = {
    "lt": operator.lt,
    "le": operator.le,
    "gt": operator.gt,
    "ge": operator.ge,
}


def _same(a: Any, b: Any) -> bool:
    """JSON equality: true is not 1, and 1 is 1.0 (Python's == says True == 1)."""
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a is b
    return bool(a == b)


COMPARISONS = ("eq", "ne", "in", "not_in", "exists", "lt", "le", "gt", "ge")


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
    if op in _ORDER and not _is_number(value):
        raise RuleSyntaxError([f"{where}.{op}: must be a number"])
    if isinstance(value, dict):
        raise RuleSyntaxError([f"{where}.{op}: compare with a scalar, not a table"])
    return Condition(op=op, path=parse_path(raw["path"], f"{where}.path"), value=value)
