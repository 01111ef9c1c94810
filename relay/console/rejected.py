"""Requests this relay process refused before trusting them (bad signature, stale timestamp,
refused address, too large, unknown path), kept in a bounded in-memory ring buffer for the
console's "rejected" view.

Deliberately NOT in the store: a request that fails verification changes nothing but a counter
and a log line (README, invariants), so it cannot fill the disk or be replayed. Each serving
process keeps its own last `capacity`; a restart forgets them. Never an unverified body: only
time, client address, reason, path, and the webhook-id header as the sender claimed it.
"""

from __future__ import annotations

from collections import deque

from relay.console.service import Rejected

DEFAULT_CAPACITY = 1000
# A claimed webhook-id is untrusted text: keep it short.
MAX_ID_CHARS = 128


class RejectedLog:
    """The last `capacity` refused requests, oldest dropped first."""

    def __init__(self, capacity: int = DEFAULT_CAPACITY) -> None:
        self._items: deque[Rejected] = deque(maxlen=capacity)
        self.capacity = capacity
        self.total = 0  # refused since start, kept or not

    def add(
        self,
        at: float,
        address: str,
        reason: str,
        path: str,
        webhook_id: str | None = None,
        source: str | None = None,
    ) -> None:
        if webhook_id is not None:
            webhook_id = webhook_id[:MAX_ID_CHARS]
        self._items.append(Rejected(at, address, reason, path[:200], webhook_id, source))
        self.total += 1

    def recent(self, limit: int = 200) -> tuple[Rejected, ...]:
        """Newest first."""
        out: list[Rejected] = []
        for item in reversed(self._items):
            if len(out) >= limit:
                break
            out.append(item)
        return tuple(out)
