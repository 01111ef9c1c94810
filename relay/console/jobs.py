"""Bulk replay jobs: a row in the store per job (total, done, status), run in the background
by the relay whose console started it, in keyset batches, cancellable; a job whose relay
stopped shows as interrupted and can be restarted."""

from __future__ import annotations


class Jobs:
    """Runs this relay's bulk jobs (filled in by the next commit)."""
