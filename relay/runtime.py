"""How the relay's long-running processes run: the event loop and the garbage collector.

Owns two process-wide choices, for `relay serve` and its delivery children:
- The event loop: uvloop when it is installed (it is a dependency), asyncio's own when
  `RELAY_EVENT_LOOP=asyncio` asks for it or uvloop is missing. uvloop (libuv, in C) runs the
  same aiohttp code with a cheaper selector, transports and callbacks.
- The garbage collector, once start-up is over (`settle`): what exists then (modules, the
  app, the config, the metrics registry) lives as long as the process, so it is moved out of
  the collector's sight (`gc.freeze`), and young collections run less often. A webhook
  allocates a few hundred short-lived containers; at the default threshold of 700 the
  collector ran every few requests and walked the whole heap every few hundred.
"""

from __future__ import annotations

import asyncio
import gc
import os
from collections.abc import Callable, Coroutine
from typing import Any, TypeVar

T = TypeVar("T")

# Young collections every 10,000 net container allocations instead of 700: cycles (aiohttp's
# request/handler pairs, exceptions with tracebacks) are still found within a few dozen
# webhooks, and memory stays bounded by the same generational rules.
GC_THRESHOLDS = (10_000, 20, 20)


def loop_factory() -> Callable[[], asyncio.AbstractEventLoop] | None:
    """uvloop's loop constructor, or None for asyncio's default loop."""
    if os.environ.get("RELAY_EVENT_LOOP", "").strip().lower() == "asyncio":
        return None
    try:
        import uvloop
    except ImportError:
        return None
    return uvloop.new_event_loop


def loop_name() -> str:
    """ "uvloop" or "asyncio": the running loop's kind, for the start-up log lines."""
    return (
        "uvloop" if type(asyncio.get_running_loop()).__module__.startswith("uvloop") else "asyncio"
    )


def run(main: Coroutine[Any, Any, T]) -> T:
    """`asyncio.run(main)` on the loop `loop_factory` picks."""
    with asyncio.Runner(loop_factory=loop_factory()) as runner:
        return runner.run(main)


def settle() -> None:
    """Start-up is over: freeze what exists into the permanent generation and collect young
    objects less often (see the module docstring). Safe to call more than once."""
    if os.environ.get("RELAY_GC", "").strip().lower() == "default":
        return
    gc.collect()
    gc.freeze()
    gc.set_threshold(*GC_THRESHOLDS)
