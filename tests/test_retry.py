"""relay.retry: the status table, the backoff schedule, Retry-After, and decide()."""

from __future__ import annotations

from datetime import UTC, datetime
from email.utils import format_datetime
from typing import Any

import pytest

from relay.config import RetryPolicy
from relay.models import Dead, Delivered, RetryLater
from relay.retry import Verdict, backoff_s, classify, decide, parse_retry_after

NOW = 1_787_000_000.0
POLICY = RetryPolicy(
    max_attempts=10, base_s=1.0, cap_s=600.0, max_age_s=86400.0, jitter=0.5, max_retry_after_s=3600
)


def http_date(at: float) -> str:
    return format_datetime(datetime.fromtimestamp(at, tz=UTC), usegmt=True)


@pytest.mark.parametrize(
    ("status", "verdict"),
    [
        *[(s, Verdict.DELIVERED) for s in (200, 201, 202, 204, 299, 409)],
        *[(s, Verdict.TRANSIENT) for s in (408, 425, 429, 500, 502, 503, 504, 599)],
        *[(s, Verdict.TRANSIENT) for s in (300, 301, 302, 304, 307, 308)],
        *[(s, Verdict.PERMANENT) for s in (400, 401, 403, 404, 405, 410, 413, 422, 499)],
    ],
)
def test_classification_table(status: int, verdict: Verdict) -> None:
    """2xx and 409 are delivered; 408/425/429, 5xx and 3xx transient; other 4xx permanent."""
    assert classify(status) is verdict


@pytest.mark.parametrize(
    ("attempt", "delay_s"),
    [(1, 1.0), (2, 2.0), (3, 4.0), (4, 8.0), (10, 512.0), (11, 600.0), (12, 600.0), (10**6, 600.0)],
)
def test_backoff_doubles_from_base_and_is_capped(attempt: int, delay_s: float) -> None:
    """Without jitter the delay after attempt n is base_s * 2**(n-1), at most cap_s."""
    assert backoff_s(POLICY, attempt, rand=0.0) == delay_s


@pytest.mark.parametrize("jitter", [0.0, 0.25, 0.5, 1.0])
@pytest.mark.parametrize("attempt", [1, 5, 20])
def test_jitter_keeps_the_delay_within_its_band(jitter: float, attempt: int) -> None:
    """With jitter j every delay d lies in [(1 - j) * d, d], its ends reached by rand 0 and ~1."""
    policy = RetryPolicy(base_s=2.0, cap_s=100.0, jitter=jitter)
    full = min(100.0, 2.0 * 2 ** (attempt - 1))
    low, high = backoff_s(policy, attempt, 0.999), backoff_s(policy, attempt, 0.0)
    assert high == full
    assert (1 - jitter) * full <= low <= full
    assert low == pytest.approx(full * (1 - jitter * 0.999))


@pytest.mark.parametrize(
    ("value", "seconds"),
    [
        (None, None),
        ("120", 120.0),
        (" 7 ", 7.0),
        ("0", 0.0),
        (http_date(NOW + 90), 90.0),
        (http_date(NOW - 90), 0.0),
        ("Thu, 01 Jan 1970 00:00:00 GMT", 0.0),
        ("", None),
        ("soon", None),
        ("-5", None),
        ("1.5", None),
        ("1e3", None),
        ("Wed, 99 Foo 2026 25:61:00 GMT", None),
        ("Wed, 21 Oct 2026 07:28:00 -0000", None),  # no known zone: unreadable
        ("²", None),
        ("١٢", None),
        ("1" * 400, None),
        ("9" * 5000, None),
    ],
    ids=lambda v: repr(v)[:40],
)
def test_retry_after(value: str | None, seconds: float | None) -> None:
    """Retry-After is delta-seconds or an HTTP date (past dates mean now); else None, no error."""
    assert parse_retry_after(value, NOW) == seconds


def outcome(**kwargs: Any) -> Delivered | RetryLater | Dead:
    """decide() for the first attempt of a fresh message, with overrides."""
    args: dict[str, Any] = {
        "attempt": 1,
        "retry_from_at": NOW - 10,
        "now": NOW,
        "status": 500,
        "error": None,
        "retry_after_s": None,
        "rand": 0.0,
    }
    args.update(kwargs)
    return decide(POLICY, **args)


@pytest.mark.parametrize("status", [200, 202, 204, 409])
def test_delivered(status: int) -> None:
    """2xx and 409 are Delivered, even on the last allowed attempt and past max_age_s."""
    assert outcome(status=status) == Delivered(status)
    assert outcome(status=status, attempt=10, retry_from_at=NOW - 10**6) == Delivered(status)


@pytest.mark.parametrize("status", [400, 401, 403, 404, 422])
def test_permanent_4xx_is_dead_at_once(status: int) -> None:
    """A permanent 4xx dead-letters on the first attempt, whatever Retry-After says."""
    assert outcome(status=status, retry_after_s=5.0) == Dead(
        f"HTTP {status}: permanent for this message", status
    )


@pytest.mark.parametrize(
    ("kwargs", "expected"),
    [
        (
            {"status": 500},
            RetryLater(at=NOW + 1, reason="HTTP 500", status=500),
        ),
        (
            {"status": 502, "attempt": 4, "rand": 0.5},
            RetryLater(at=NOW + 8 * 0.75, reason="HTTP 502", status=502),
        ),
        (
            {"status": 302},
            RetryLater(at=NOW + 1, reason="HTTP 302", status=302),
        ),
        (
            {"status": 429},
            RetryLater(at=NOW + 1, reason="HTTP 429", status=429),
        ),
        (
            {"status": 500, "retry_after_s": 30.0},
            RetryLater(at=NOW + 30, reason="HTTP 500", status=500, retry_after_s=30.0),
        ),
        (
            {"status": 429, "retry_after_s": 30.0},
            RetryLater(
                at=NOW + 30, reason="HTTP 429", status=429, counts_attempt=False, retry_after_s=30.0
            ),
        ),
        (
            {"status": 503, "retry_after_s": 99999.0},
            RetryLater(
                at=NOW + 3600,
                reason="HTTP 503",
                status=503,
                counts_attempt=False,
                retry_after_s=99999.0,
            ),
        ),
        (
            {"status": 503, "retry_after_s": 0.0},
            RetryLater(
                at=NOW + 0.1, reason="HTTP 503", status=503, counts_attempt=False, retry_after_s=0.0
            ),
        ),
        (
            {"status": None, "error": "timeout", "attempt": 3},
            RetryLater(at=NOW + 4, reason="timeout", status=None),
        ),
        (
            {"status": None, "error": "connection error: ClientConnectorError"},
            RetryLater(at=NOW + 1, reason="connection error: ClientConnectorError", status=None),
        ),
        (
            {"status": None},
            RetryLater(at=NOW + 1, reason="no answer", status=None),
        ),
    ],
    ids=[
        "500",
        "502 jittered",
        "3xx",
        "429 without Retry-After",
        "500 honours Retry-After",
        "429 throttled",
        "503 clamped to max_retry_after_s",
        "503 Retry-After 0",
        "timeout",
        "connection error",
        "no answer",
    ],
)
def test_retry_later(kwargs: dict[str, Any], expected: RetryLater) -> None:
    """Transient answers retry after the backoff, or after Retry-After clamped to its bounds."""
    assert outcome(**kwargs) == expected


@pytest.mark.parametrize("status", [429, 503])
def test_throttling_does_not_use_up_attempts(status: int) -> None:
    """429/503 with Retry-After do not count as attempts, so max_attempts cannot kill them."""
    result = outcome(status=status, attempt=10, retry_after_s=60.0)
    assert result == RetryLater(
        at=NOW + 60, reason=f"HTTP {status}", status=status, counts_attempt=False, retry_after_s=60
    )
    assert outcome(status=status, attempt=500, retry_after_s=60.0) == result


@pytest.mark.parametrize(
    ("kwargs", "reason", "status"),
    [
        ({"status": 500}, "gave up after 10 attempts (max_attempts); last: HTTP 500", 500),
        ({"status": 429}, "gave up after 10 attempts (max_attempts); last: HTTP 429", 429),
        (
            {"status": 500, "retry_after_s": 5.0},
            "gave up after 10 attempts (max_attempts); last: HTTP 500",
            500,
        ),
        (
            {"status": None, "error": "timeout"},
            "gave up after 10 attempts (max_attempts); last: timeout",
            None,
        ),
    ],
)
def test_dead_after_max_attempts(kwargs: dict[str, Any], reason: str, status: int | None) -> None:
    """A transient failure on attempt max_attempts dead-letters, unless it was throttling."""
    before_last = outcome(attempt=9, **kwargs)
    assert isinstance(before_last, RetryLater)
    assert before_last.counts_attempt
    assert outcome(attempt=10, **kwargs) == Dead(reason, status)


@pytest.mark.parametrize(
    ("kwargs", "status"),
    [
        ({"status": 500}, 500),
        ({"status": 503, "retry_after_s": 60.0}, 503),
        ({"status": None, "error": "timeout"}, None),
    ],
)
def test_dead_after_max_age(kwargs: dict[str, Any], status: int | None) -> None:
    """Once max_age_s has passed since retry_from_at, any transient failure dead-letters."""
    assert isinstance(outcome(retry_from_at=NOW - 86399.9, **kwargs), RetryLater)
    dead = outcome(retry_from_at=NOW - 86400, **kwargs)
    assert isinstance(dead, Dead)
    assert dead.status == status
    assert dead.reason.startswith("gave up after 86400 s (max_age_s); last: ")
