"""Free space on the SQLite database's filesystem, for readiness: `/readyz` turns 503 while it
is under `storage.min_free_bytes`, before a commit fails on a full disk.

Owns the reading (statvfs of the database's directory: the space an unprivileged process may
still use) and its cache: a reading is at most `max_age_s` old, so a probe every few hundred
milliseconds does not cost a syscall each. Says nothing about PostgreSQL (its disk is the
server's), and changes nothing: it only reports.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class DiskReading:
    free_bytes: int | None  # None: the filesystem could not be read
    min_free_bytes: int
    error: str | None = None

    @property
    def ok(self) -> bool:
        return self.free_bytes is not None and self.free_bytes >= self.min_free_bytes

    def describe(self) -> str:
        """ "ok", or one line saying why not (the /readyz check)."""
        if self.free_bytes is None:
            return f"cannot read free disk space: {self.error}"
        if self.ok:
            return "ok"
        return (
            f"{self.free_bytes} bytes free on the database's filesystem, under "
            f"storage.min_free_bytes = {self.min_free_bytes}"
        )


class DiskSpace:
    """Free space under the directory of `db_path`, read at most once per `max_age_s`."""

    def __init__(
        self,
        db_path: str,
        min_free_bytes: int,
        *,
        max_age_s: float = 1.0,
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        self.directory = os.path.dirname(os.path.abspath(db_path))
        self.min_free_bytes = min_free_bytes
        self._max_age_s = max_age_s
        self._monotonic = monotonic
        self._read_at = -1e18
        self._last = DiskReading(None, min_free_bytes, "not read yet")

    def reading(self) -> DiskReading:
        now = self._monotonic()
        if now - self._read_at >= self._max_age_s:
            self._read_at = now
            try:
                stat = os.statvfs(self.directory)
            except OSError as exc:
                self._last = DiskReading(None, self.min_free_bytes, exc.strerror or str(exc))
            else:
                self._last = DiskReading(stat.f_bavail * stat.f_frsize, self.min_free_bytes)
        return self._last
