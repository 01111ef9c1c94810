"""The relay's JSON codec on the hot path: orjson, with the standard library as a fallback.

Why a dependency: every webhook is parsed, and its redacted copy encoded, on the request path,
and orjson does both several times faster than the standard library (docs/performance.md,
"Measurements behind the code"). Output is compact UTF-8 with keys
in insertion order, like the standard library with separators=(",", ":") and
ensure_ascii=False.

orjson is stricter than Python's json (no NaN/Infinity, no integers beyond 64 bits, no byte
order mark, bounded nesting). Bodies it refuses go through the standard library, so the relay
accepts exactly what it accepted before, and such a body is written back the same way (NaN
stays NaN instead of becoming null).
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes) -> tuple[Any, bool]:
    """(value, fast): fast is False when only the standard library could read it.
    Raises ValueError (or RecursionError) for what is not JSON at all."""
    try:
        return orjson.loads(data), True
    except orjson.JSONDecodeError:
        return json.loads(data), False


def dumps(value: Any, fast: bool = True) -> bytes:
    if fast:
        try:
            return orjson.dumps(value)
        except TypeError:  # nesting or integers beyond what orjson writes
            pass
    text = json.dumps(value, separators=(",", ":"), ensure_ascii=False)
    try:
        return text.encode()
    except UnicodeEncodeError:
        # A lone surrogate (JSON may escape one: "\udcff") has no UTF-8 form: escape
        # everything instead, so whatever `loads` read can be written back.
        return json.dumps(value, separators=(",", ":"), ensure_ascii=True).encode()
