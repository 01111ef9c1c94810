"""What a delivered Faurya revenue call says, for metrics and warnings. Pure.

Reads the body the relay sent (the Faurya shape: event, amount in minor units, currency,
attribution) and reports its revenue facts. Bodies of any other shape give None: the relay can
relay to other receivers too, and only revenue calls are counted as revenue.
"""

from __future__ import annotations

from dataclasses import dataclass

from relay import codec
from relay.currency import exponent

TROUBLESHOOTING = "README.md#revenue-shows-as-unattributed"


@dataclass(frozen=True, slots=True)
class RevenueFacts:
    event: str  # "purchase", "refund", or "credit" (a negative purchase, counted positive)
    amount_minor: int
    currency: str  # an ISO 4217 code, or "other"
    attributed: bool  # a session id or an attribution token reached Faurya


def facts(body: bytes) -> RevenueFacts | None:
    try:
        payload, _ = codec.loads(body)
    except ValueError:
        return None
    if not isinstance(payload, dict) or payload.get("event") not in ("purchase", "refund"):
        return None
    amount = payload.get("amount")
    if isinstance(amount, bool) or not isinstance(amount, int):
        return None
    event = str(payload["event"])
    if amount < 0:
        # Counters only go up: a negative amount (a proration credit sent as a "purchase" by a
        # config that does not turn it into a refund) is counted as a "credit" of its size,
        # so net revenue = purchase - refund - credit still holds.
        event, amount = "credit", -amount
    code = payload.get("currency")
    currency = code.upper() if isinstance(code, str) and exponent(code) is not None else "other"
    attribution = payload.get("attribution")
    attributed = isinstance(attribution, dict) and bool(
        attribution.get("faSessionId") or attribution.get("faAttributionToken")
    )
    return RevenueFacts(event, amount, currency, attributed)
