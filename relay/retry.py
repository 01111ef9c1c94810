"""The retry policy: which answers mean what, and when to try again. Pure.

Owns the one table that classifies a destination's answer (see faurya-api.md):
  2xx, 409                     delivered (409: already recorded, idempotency at work)
  408, 425, 429, 5xx, 3xx,
  timeouts, connection errors  retry later (backoff with jitter, honouring Retry-After)
  any other 4xx                dead: permanent for this message, an operator must act
3xx counts as transient: redirects are not followed, and a fixed URL should not need a replay.
"""

from __future__ import annotations

import email.utils
import math
from enum import StrEnum

from relay.config import RetryPolicy
from relay.models import Dead, Delivered, Outcome, RetryLater

TRANSIENT_4XX = frozenset({408, 425, 429})
THROTTLE_STATUSES = frozenset({429, 503})


class Verdict(StrEnum):
    DELIVERED = "delivered"
    TRANSIENT = "transient"
    PERMANENT = "permanent"


def classify(status: int) -> Verdict:
    if 200 <= status < 300 or status == 409:
        return Verdict.DELIVERED
    if 400 <= status < 500 and status not in TRANSIENT_4XX:
        return Verdict.PERMANENT
    return Verdict.TRANSIENT


def parse_retry_after(value: str | None, now: float) -> float | None:
    """Seconds to wait, from delta-seconds or an HTTP date; None when absent or unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isascii() and value.isdigit():
        # HTTP's DIGIT is ASCII (str.isdigit() alone accepts "²", which int() refuses). float(),
        # not int(): int() refuses over 4300 digits and float(int(...)) overflows. A value
        # too large for a float is as unreadable as "soon".
        seconds = float(value)
        return seconds if math.isfinite(seconds) else None
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError, IndexError):
        return None
    if when.tzinfo is None:
        return None
    return max(0.0, when.timestamp() - now)


def backoff_s(policy: RetryPolicy, attempt: int, rand: float) -> float:
    """Delay after failed attempt number `attempt` (1-based): base * 2^(attempt-1), capped,
    then scaled into [(1 - jitter), 1] by `rand` in [0, 1)."""
    exponent = min(attempt - 1, 64)  # 2**64 * base is past any cap; avoid float overflow
    delay = min(policy.cap_s, policy.base_s * math.pow(2, exponent))
    return delay * (1 - policy.jitter * rand)


def decide(
    policy: RetryPolicy,
    *,
    attempt: int,
    retry_from_at: float,
    now: float,
    status: int | None,
    error: str | None,
    retry_after_s: float | None,
    rand: float,
) -> Outcome:
    """What one attempt means. `status` is None when no HTTP answer came (then `error` says
    why: timeout, connection refused, ...)."""
    if status is not None:
        verdict = classify(status)
        if verdict is Verdict.DELIVERED:
            return Delivered(status)
        if verdict is Verdict.PERMANENT:
            return Dead(f"HTTP {status}: permanent for this message", status)
        reason = f"HTTP {status}"
    else:
        reason = error or "no answer"
    throttled = status in THROTTLE_STATUSES and retry_after_s is not None
    if now - retry_from_at >= policy.max_age_s:
        return Dead(f"gave up after {policy.max_age_s:g} s (max_age_s); last: {reason}", status)
    if not throttled and attempt >= policy.max_attempts:
        return Dead(f"gave up after {attempt} attempts (max_attempts); last: {reason}", status)
    if retry_after_s is not None:
        # The receiver said when; at least a tenth of a second so "0" cannot spin us.
        delay = min(max(retry_after_s, 0.1), policy.max_retry_after_s)
    else:
        delay = backoff_s(policy, attempt, rand)
    return RetryLater(
        at=now + delay,
        reason=reason,
        status=status,
        counts_attempt=not throttled,
        retry_after_s=retry_after_s,
    )
