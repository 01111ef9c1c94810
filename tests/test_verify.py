"""relay.verify: both Polar key schemes, rotation, tolerance, and malformed headers."""

from __future__ import annotations

import base64

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st
from multidict import CIMultiDict

from relay.config import Secret
from relay.errors import SignatureInvalid
from relay.verify import MAX_SIGNATURE_HEADER_CHARS, Verifier, sign
from tests.helpers import LEGACY_SECRET, STANDARD_SECRET, FakeClock, sign_headers

NOW = 1_787_000_000
BODY = b'{"type":"order.paid","data":{"id":"ord_1","amount":4410}}'
OTHER_LEGACY = "polar_whs_0therSecretNotConfiguredHere000000"
OTHER_STANDARD = "whsec_" + base64.b64encode(b"another-32-byte-key-for-the-test").decode()
# A whsec_ key may be written with its base64 padding ("=" or "==") or without: same bytes.
KEY_31 = base64.b64encode(bytes(range(31))).decode()  # ends "=="
KEY_32 = base64.b64encode(bytes(range(32))).decode()  # ends "="
KEY_33 = base64.b64encode(bytes(range(33))).decode()  # no padding


def verifier(*secrets: str, tolerance_s: int = 300) -> Verifier:
    """A verifier whose clock stands at NOW."""
    return Verifier([Secret(s) for s in secrets], tolerance_s, FakeClock(NOW))


def headers(
    secret: str = LEGACY_SECRET, scheme: str = "legacy", timestamp: int = NOW, body: bytes = BODY
) -> dict[str, str]:
    """Headers signed by the standardwebhooks library itself."""
    return sign_headers(body, secret, scheme=scheme, msg_id="msg_1", timestamp=timestamp)


def rejection(v: Verifier, body: bytes, hdrs: dict[str, str]) -> SignatureInvalid:
    with pytest.raises(SignatureInvalid) as info:
        v.verify(body, hdrs)
    return info.value


SCHEMES = [
    (LEGACY_SECRET, "legacy"),
    (STANDARD_SECRET, "legacy"),
    (STANDARD_SECRET, "standard"),
    *[("whsec_" + key, "standard") for key in (KEY_31, KEY_32, KEY_33)],
    *[("whsec_" + key.rstrip("="), "standard") for key in (KEY_31, KEY_32)],
    ("whsec_not*base64", "legacy"),
]


@pytest.mark.parametrize(("secret", "scheme"), SCHEMES)
def test_both_polar_key_schemes_verify(secret: str, scheme: str) -> None:
    """polar_whs_ and whsec_ secrets verify as raw UTF-8 keys; whsec_ also as a base64 key."""
    assert verifier(secret).verify(BODY, headers(secret, scheme)) == "msg_1"


def test_headers_are_read_case_insensitively() -> None:
    """aiohttp's case-insensitive headers, with any capitalisation, are accepted."""
    hdrs = CIMultiDict({k.title(): v for k, v in headers().items()})
    assert verifier(LEGACY_SECRET).verify(BODY, hdrs) == "msg_1"


@pytest.mark.parametrize(
    ("secret", "scheme"), [(LEGACY_SECRET, "legacy"), (STANDARD_SECRET, "standard")]
)
def test_rotated_secret_list_accepts_old_and_new(secret: str, scheme: str) -> None:
    """With old and new secrets configured (rotation), signatures made with either verify."""
    v = verifier(LEGACY_SECRET, STANDARD_SECRET)
    assert v.verify(BODY, headers(secret, scheme)) == "msg_1"


@pytest.mark.parametrize(
    ("configured", "signer", "scheme"),
    [
        (LEGACY_SECRET, OTHER_LEGACY, "legacy"),
        (STANDARD_SECRET, OTHER_STANDARD, "standard"),
        (STANDARD_SECRET, OTHER_STANDARD, "legacy"),
        (LEGACY_SECRET, LEGACY_SECRET[:-1], "legacy"),
    ],
)
def test_wrong_secret_is_rejected(configured: str, signer: str, scheme: str) -> None:
    """A signature made with a secret that is not configured does not verify."""
    error = rejection(verifier(configured), BODY, headers(signer, scheme))
    assert (error.reason, error.stale) == ("no signature matches", False)


@pytest.mark.parametrize("index", [0, len(BODY) // 2, len(BODY) - 1])
def test_body_tampered_by_one_byte_is_rejected(index: int) -> None:
    """Changing any single byte of the body breaks the signature."""
    tampered = bytearray(BODY)
    tampered[index] ^= 0x01
    error = rejection(verifier(LEGACY_SECRET), bytes(tampered), headers())
    assert (error.reason, error.stale) == ("no signature matches", False)


@pytest.mark.parametrize(
    ("name", "value"), [("webhook-id", "msg_2"), ("webhook-timestamp", str(NOW + 1))]
)
def test_signed_headers_cannot_be_swapped(name: str, value: str) -> None:
    """The id and the timestamp are signed too: changing either breaks the signature."""
    hdrs = {**headers(), name: value}
    assert rejection(verifier(LEGACY_SECRET), BODY, hdrs).reason == "no signature matches"


@pytest.mark.parametrize(
    ("offset_s", "tolerance_s", "accepted"),
    [
        (0, 300, True),
        (-300, 300, True),
        (300, 300, True),
        (-301, 300, False),
        (301, 300, False),
        (-86400, 300, False),
        (86400, 300, False),
        (10, 10, True),
        (-11, 10, False),
        (11, 10, False),
        (3600, 7200, True),
    ],
)
def test_timestamp_tolerance(offset_s: int, tolerance_s: int, accepted: bool) -> None:
    """A genuine signature older or newer than the tolerance is rejected as stale."""
    v = verifier(LEGACY_SECRET, tolerance_s=tolerance_s)
    hdrs = headers(timestamp=NOW + offset_s)
    if accepted:
        assert v.verify(BODY, hdrs) == "msg_1"
    else:
        error = rejection(v, BODY, hdrs)
        assert (error.reason, error.stale) == ("timestamp outside the tolerance", True)


def test_clock_moves_a_request_out_of_tolerance() -> None:
    """The verifier reads its clock at each call: the same request goes stale as time passes."""
    clock = FakeClock(NOW)
    v = Verifier([Secret(LEGACY_SECRET)], 300, clock)
    assert v.verify(BODY, headers()) == "msg_1"
    clock.advance(301)
    assert rejection(v, BODY, headers()).stale


def test_forged_stale_request_is_not_called_stale() -> None:
    """Stale means genuine but late: a bad signature with an old timestamp is just invalid."""
    error = rejection(verifier(LEGACY_SECRET), BODY, headers(OTHER_LEGACY, timestamp=NOW - 3600))
    assert (error.reason, error.stale) == ("no signature matches", False)


@pytest.mark.parametrize(
    "template",
    [
        "{good}",
        "v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA= {good}",
        "{good} v1,AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
        "v2,xyz {good}",
        "v1a,{sig} {good}",
        "v1 {good}",
        "v1, {good}",
        "v1,!!! {good}",
        "nonsense {good} v1,AAAA",
    ],
)
def test_one_matching_signature_among_several_is_enough(template: str) -> None:
    """A space-separated list verifies if one v1 entry matches; other entries are skipped."""
    good = headers()["webhook-signature"]
    value = template.format(good=good, sig=good.split(",", 1)[1])
    assert verifier(LEGACY_SECRET).verify(BODY, {**headers(), "webhook-signature": value})


@pytest.mark.parametrize("version", ["v2", "v1a", "V1", "v0", ""])
def test_non_v1_entries_are_skipped(version: str) -> None:
    """The right signature under another version label does not count."""
    sig = headers()["webhook-signature"].split(",", 1)[1]
    error = rejection(
        verifier(LEGACY_SECRET), BODY, {**headers(), "webhook-signature": f"{version},{sig}"}
    )
    assert error.reason == "no well-formed v1 signature in webhook-signature"


MISSING = "missing webhook-id, webhook-timestamp or webhook-signature"
NO_V1 = "no well-formed v1 signature in webhook-signature"
BAD_TS = "malformed webhook-timestamp"
BAD_ID = "malformed webhook-id"


@pytest.mark.parametrize(
    ("name", "value", "reason"),
    [
        ("webhook-id", None, MISSING),
        ("webhook-timestamp", None, MISSING),
        ("webhook-signature", None, MISSING),
        ("webhook-id", "", MISSING),
        ("webhook-timestamp", "", MISSING),
        ("webhook-signature", "", MISSING),
        ("webhook-signature", "v1", NO_V1),
        ("webhook-signature", "v1,", NO_V1),
        ("webhook-signature", " ", NO_V1),
        ("webhook-signature", "v1,!!!not-base64!!!", NO_V1),
        ("webhook-signature", "v1,abc", NO_V1),
        ("webhook-signature", "v1,é+/=", NO_V1),
        ("webhook-signature", "v1,AAAA" + " v1,AAAA" * 700, "webhook-signature too long"),
        ("webhook-timestamp", "soon", BAD_TS),
        ("webhook-timestamp", "-5", BAD_TS),
        ("webhook-timestamp", "1.787e9", BAD_TS),
        ("webhook-timestamp", "1787000000.5", BAD_TS),
        ("webhook-timestamp", " 1787000000", BAD_TS),
        ("webhook-timestamp", "0x6a8b5c80", BAD_TS),
        ("webhook-timestamp", "9" * 13, BAD_TS),
        ("webhook-timestamp", "9" * 12, BAD_TS),
        ("webhook-timestamp", "253402300800", BAD_TS),
        ("webhook-id", "msg with spaces", BAD_ID),
        ("webhook-id", "msg\t1", BAD_ID),
        ("webhook-id", "msg_é", BAD_ID),
        ("webhook-id", "m" * 257, BAD_ID),
    ],
    ids=lambda v: repr(v)[:30],
)
def test_malformed_headers_give_signature_invalid(
    name: str, value: str | None, reason: str
) -> None:
    """Every malformed header is a SignatureInvalid with a fixed reason, never another error."""
    hdrs: dict[str, str] = headers()
    if value is None:
        del hdrs[name]
    else:
        hdrs[name] = value
    error = rejection(verifier(LEGACY_SECRET), BODY, hdrs)
    # The message is the fixed phrase alone: no header value reaches logs.
    assert (str(error), error.reason, error.stale) == (
        f"signature rejected: {reason}",
        reason,
        False,
    )


def test_signature_header_limit_is_inclusive() -> None:
    """A signature header of exactly MAX_SIGNATURE_HEADER_CHARS is still read."""
    good = headers()["webhook-signature"]
    value = "v2," + "x" * (MAX_SIGNATURE_HEADER_CHARS - len(good) - 4) + " " + good
    assert len(value) == MAX_SIGNATURE_HEADER_CHARS
    assert verifier(LEGACY_SECRET).verify(BODY, {**headers(), "webhook-signature": value})
    error = rejection(
        verifier(LEGACY_SECRET), BODY, {**headers(), "webhook-signature": "x" + value}
    )
    assert error.reason == "webhook-signature too long"


@pytest.mark.parametrize("body", [b"\xff\xfe{}", b'{"a":"\xc3"}', b"\xed\xa0\x80"])
def test_non_utf8_body_gives_signature_invalid(body: bytes) -> None:
    """A body that is not UTF-8 cannot have been signed by Polar: a clean rejection."""
    error = rejection(verifier(LEGACY_SECRET), body, headers())
    assert error.reason == "body is not UTF-8"


signature_entries = st.one_of(
    st.text(max_size=60),
    st.builds(
        lambda version, raw: f"{version},{base64.b64encode(raw).decode()}",
        st.sampled_from(["v1", "v1", "v2", ""]),
        st.binary(max_size=40),
    ),
)


# Each header is well-formed or random, so that some examples get past every early check.
@settings(max_examples=150, database=None, deadline=None)
@example(msg_id="msg_1", timestamp="999999999999", signature="v1,AAAA", body=BODY, dropped=None)
@given(
    msg_id=st.one_of(
        st.from_regex(r"[\x21-\x7e]{1,30}", fullmatch=True), st.text(min_size=1, max_size=300)
    ),
    timestamp=st.one_of(
        st.integers(10**11, 10**12 - 1).map(str),  # the longest the header pattern lets through
        st.integers(NOW - 600, NOW + 600).map(str),
        st.integers(-(10**13), 10**13).map(str),
        st.text(min_size=1, max_size=20),
    ),
    signature=st.one_of(
        st.lists(signature_entries, min_size=1, max_size=8).map(" ".join),
        st.text(min_size=1, max_size=200),
        st.integers(4000, 5000).map(lambda n: "v1," + "A" * n),
    ),
    body=st.one_of(st.just(BODY), st.binary(max_size=200)),
    dropped=st.sampled_from(
        [None, None, None, "webhook-id", "webhook-timestamp", "webhook-signature"]
    ),
)
def test_random_headers_only_ever_raise_signature_invalid(
    msg_id: str, timestamp: str, signature: str, body: bytes, dropped: str | None
) -> None:
    """Whatever the headers and body, verification fails only with SignatureInvalid."""
    hdrs = {"webhook-id": msg_id, "webhook-timestamp": timestamp, "webhook-signature": signature}
    if dropped is not None:
        del hdrs[dropped]
    v = verifier(LEGACY_SECRET, STANDARD_SECRET)
    with pytest.raises(SignatureInvalid):
        v.verify(body, hdrs)


@pytest.mark.parametrize(
    ("secret", "scheme", "library_scheme"),
    [
        (LEGACY_SECRET, "legacy", "legacy"),
        (LEGACY_SECRET, "auto", "legacy"),
        (STANDARD_SECRET, "legacy", "legacy"),
        (STANDARD_SECRET, "standard", "standard"),
        (STANDARD_SECRET, "auto", "standard"),
        ("whsec_" + KEY_31.rstrip("="), "auto", "standard"),
        ("whsec_not*base64", "auto", "legacy"),
    ],
)
def test_sign_round_trips(secret: str, scheme: str, library_scheme: str) -> None:
    """relay.verify.sign matches the library's signature for that scheme, and verifies."""
    signature = sign(secret, "msg_1", NOW, BODY, scheme=scheme)
    assert signature == headers(secret, library_scheme)["webhook-signature"]
    hdrs = {"webhook-id": "msg_1", "webhook-timestamp": str(NOW), "webhook-signature": signature}
    assert verifier(secret).verify(BODY, hdrs) == "msg_1"


@pytest.mark.parametrize("secret", [LEGACY_SECRET, "whsec_not*base64"])
def test_sign_standard_needs_a_base64_whsec_secret(secret: str) -> None:
    """Asking for the standard scheme with a secret that has no base64 key is an error."""
    with pytest.raises(ValueError, match="needs a whsec_ secret"):
        sign(secret, "msg_1", NOW, BODY, scheme="standard")


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("webhook-timestamp", f"{NOW}\n"),
        ("webhook-id", "msg_1\n"),
        ("webhook-timestamp", "\uff11\uff12"),
    ],
)
def test_header_patterns_match_the_whole_value(name: str, value: str) -> None:
    """A trailing newline or non-ASCII digits are malformed, not quietly accepted."""
    hdrs = headers()
    hdrs[name] = value
    assert "malformed" in rejection(verifier(LEGACY_SECRET), BODY, hdrs).reason


def test_zero_padded_timestamp_verifies_as_the_library_signs_it() -> None:
    """The library signs the timestamp as an integer; a zero-padded header still verifies
    (the signed text is rebuilt from the number, not copied from the header)."""
    hdrs = headers() | {"webhook-timestamp": f"00{NOW}"}
    assert verifier(LEGACY_SECRET).verify(BODY, hdrs) == "msg_1"


@pytest.mark.parametrize("first", ["standard", "legacy"])
def test_the_second_scheme_of_a_secret_is_tried_when_the_first_fails(first: str) -> None:
    """A whsec_ secret tries its standard key first (what Polar signs with today), then the
    legacy one; the order is a speed-up only: both schemes verify, with either listed first."""
    v = (
        verifier(STANDARD_SECRET, OTHER_STANDARD)
        if first == "standard"
        else verifier(OTHER_STANDARD, STANDARD_SECRET)
    )
    for scheme in ("standard", "legacy"):
        assert v.verify(BODY, headers(STANDARD_SECRET, scheme)) == "msg_1"
