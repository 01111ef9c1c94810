"""Webhook signatures: the Standard Webhooks scheme in Polar's flavour.

Owns: header parsing, both of Polar's key schemes, several secrets (rotation), the timestamp
tolerance and the constant-time comparison. The HMAC itself comes from the standardwebhooks
library (`hmac_data` to verify, `Webhook.sign` to sign); this adapter adds what the library lacks:
the legacy key scheme tried beside the standard one, a configurable tolerance and clock, and a
clean `SignatureInvalid` for every malformed header (the library raises a bare ValueError on
some). It verifies over the raw bytes (the library's `Webhook.verify` decodes the body to
text, formats a datetime and re-encodes per key) and stops at the first key that matches:
together half of this module's cost per webhook.

Runs on the raw body bytes, before anything parses them. Reasons in `SignatureInvalid` are fixed
phrases: header values and secrets never reach an error or a log.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import re
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime

from standardwebhooks.webhooks import Webhook, hmac_data

from relay.config import Secret
from relay.errors import SignatureInvalid
from relay.models import Clock

_WEBHOOK_ID = re.compile(r"[\x21-\x7e]{1,256}")  # printable ASCII, no spaces (fullmatch)
_TIMESTAMP = re.compile(r"[0-9]{1,12}")  # ASCII digits only (fullmatch)
MAX_SIGNATURE_HEADER_CHARS = 4096


def keys_for(secret: str) -> list[Webhook]:
    """Every key a Polar secret may sign with, as standardwebhooks signers (see `key_bytes`)."""
    return [Webhook(key) for key in key_bytes(secret)]


def key_bytes(secret: str) -> list[bytes]:
    """Every key a Polar secret may sign with, like polar-sdk 1.0.2:
    (a) legacy: the UTF-8 bytes of the whole string, prefix included;
    (b) standard: base64 of the part after `whsec_` (secrets made from 2026-09-08)."""
    keys = [secret.encode("utf-8")]
    if secret.startswith("whsec_"):
        encoded = secret[len("whsec_") :]
        # Pad only what is missing: with validate=True, excess "=" after a padded key (the
        # usual 32-byte key ends in "=") is an error, which would drop the standard key.
        encoded += "=" * (-len(encoded) % 4)
        try:
            raw = base64.b64decode(encoded, validate=True)
        except (binascii.Error, ValueError):
            raw = b""
        if raw:
            keys.append(raw)
    return keys


class Verifier:
    """Verifies one source's webhooks against all of its current secrets."""

    def __init__(self, secrets: Sequence[Secret], tolerance_s: int, clock: Clock) -> None:
        # The standard scheme first: what Polar signs with today for a whsec_ secret, so a
        # genuine webhook usually costs one HMAC over its body, not one per key.
        self._keys = [key for s in secrets for key in reversed(key_bytes(s.value))]
        self._tolerance_s = tolerance_s
        self._clock = clock

    def verify(self, body: bytes, headers: Mapping[str, str]) -> str:
        """Return the `webhook-id` of a correctly signed, fresh request; raise otherwise."""
        msg_id = headers.get("webhook-id")
        timestamp = headers.get("webhook-timestamp")
        signature = headers.get("webhook-signature")
        if not msg_id or not timestamp or not signature:
            raise SignatureInvalid("missing webhook-id, webhook-timestamp or webhook-signature")
        if not _WEBHOOK_ID.fullmatch(msg_id):
            raise SignatureInvalid("malformed webhook-id")
        if not _TIMESTAMP.fullmatch(timestamp):
            raise SignatureInvalid("malformed webhook-timestamp")
        if len(signature) > MAX_SIGNATURE_HEADER_CHARS:
            raise SignatureInvalid("webhook-signature too long")
        offered = _offered_signatures(signature)
        if not offered:
            raise SignatureInvalid("no well-formed v1 signature in webhook-signature")
        try:
            body.decode("utf-8")
        except UnicodeDecodeError:
            raise SignatureInvalid("body is not UTF-8") from None
        sent_at = int(timestamp)
        try:
            datetime.fromtimestamp(sent_at, tz=UTC)
        except (ValueError, OverflowError, OSError):  # 12 digits pass the regex, past year 9999
            raise SignatureInvalid("malformed webhook-timestamp") from None
        # What `Webhook.sign` signs: "{id}.{timestamp as an integer}.{body}" in UTF-8 (the
        # integer form, so a zero-padded header signs as the library would).
        signed = b"%s.%d.%s" % (msg_id.encode("ascii"), sent_at, body)
        matched = False
        for key in self._keys:
            expected = hmac_data(key, signed)
            for candidate in offered:
                # compare_digest on every pair of a key: no timing hint about how much of a
                # forged signature is right. Stopping after a key that matched tells nothing
                # the 2xx does not.
                matched |= hmac.compare_digest(expected, candidate)
            if matched:
                break
        if not matched:
            raise SignatureInvalid("no signature matches")
        # Checked after the HMAC so that "stale" means a genuine, replayed or delayed request.
        if abs(self._clock.now() - sent_at) > self._tolerance_s:
            raise SignatureInvalid("timestamp outside the tolerance", stale=True)
        return msg_id


def _offered_signatures(header: str) -> list[bytes]:
    offered = []
    for entry in header.split(" "):
        version, sep, value = entry.partition(",")
        if not sep or version != "v1" or not value:
            continue  # another scheme, or a malformed entry: skip it, like the library
        try:
            offered.append(base64.b64decode(value, validate=True))
        except (binascii.Error, ValueError):
            continue
    return offered


def sign(secret: str, msg_id: str, timestamp: int, body: bytes, *, scheme: str = "auto") -> str:
    """A `webhook-signature` value for `body` (used by tests, `relay sign` and `relay send`).
    scheme: "legacy" (raw secret bytes), "standard" (base64 after whsec_), or "auto" (what
    Polar does today for this kind of secret: standard for whsec_, legacy otherwise)."""
    keys = keys_for(secret)
    if scheme == "legacy" or (scheme == "auto" and len(keys) == 1):
        key = keys[0]
    elif len(keys) == 2:
        key = keys[1]
    else:
        raise ValueError("the standard scheme needs a whsec_ secret with a base64 key")
    return key.sign(msg_id, datetime.fromtimestamp(timestamp, tz=UTC), body.decode("utf-8"))
