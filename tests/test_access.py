"""relay.access, table-tested: who the client is behind trusted proxies, allowlists, bearer tokens.

Pure functions on addresses and header values; no server needed.
"""

from __future__ import annotations

import pytest

from relay.access import Client, allowed, bearer_ok, parse_networks, resolve_client

PROXIES = parse_networks(["10.0.0.0/8", "::1/128"])


@pytest.mark.parametrize(
    ("peer", "forwarded_for", "forwarded_proto", "tls", "expected"),
    [
        # An untrusted peer: both headers are ignored, whatever they claim.
        ("198.51.100.9", "203.0.113.7", "https", False, Client("198.51.100.9", https=False)),
        ("198.51.100.9", "10.0.0.1", None, True, Client("198.51.100.9", https=True)),
        ("198.51.100.9", None, "http", True, Client("198.51.100.9", https=True)),
        # No peer address at all (a Unix socket) or one we cannot parse: kept as it is.
        (None, "203.0.113.7", "https", False, Client(None, https=False)),
        ("not-an-ip", "203.0.113.7", "https", False, Client("not-an-ip", https=False)),
        # A trusted peer without headers: the peer itself is the client.
        ("10.0.0.1", None, None, False, Client("10.0.0.1", https=False)),
        ("10.0.0.1", "", "", True, Client("10.0.0.1", https=True)),
        # A trusted peer: the right-most hop that is not a trusted proxy is the client.
        ("10.0.0.1", "203.0.113.7", None, False, Client("203.0.113.7", https=False)),
        ("10.0.0.1", "203.0.113.7, 10.0.0.2", None, False, Client("203.0.113.7", https=False)),
        # ... hops left of it were written by the client and could be anything.
        ("10.0.0.1", "198.51.100.1, 203.0.113.7", None, False, Client("203.0.113.7", False)),
        ("10.0.0.1", "10.9.9.9,203.0.113.7,10.0.0.3", None, False, Client("203.0.113.7", False)),
        # A chain of trusted proxies only: the left-most of them.
        ("10.0.0.1", "10.0.0.3, 10.0.0.2", None, False, Client("10.0.0.3", https=False)),
        # Garbage hops: stop at the last address we could read, never skip past it.
        ("10.0.0.1", "garbage", None, False, Client("10.0.0.1", https=False)),
        ("10.0.0.1", "203.0.113.7, garbage, 10.0.0.2", None, False, Client("10.0.0.2", False)),
        ("10.0.0.1", "203.0.113.7:4711", None, False, Client("10.0.0.1", https=False)),
        ("10.0.0.1", " , ", None, False, Client("10.0.0.1", https=False)),
        ("10.0.0.1", "unknown, 203.0.113.7", None, False, Client("203.0.113.7", https=False)),
        # IPv6: a trusted loopback proxy, a zone id, IPv4-mapped addresses.
        ("::1", "2001:db8::5", None, False, Client("2001:db8::5", https=False)),
        ("::1", "fe80::1%eth0", None, False, Client("fe80::1", https=False)),
        ("::1", "::ffff:203.0.113.7", None, False, Client("203.0.113.7", https=False)),
        ("::ffff:10.0.0.1", "203.0.113.7", None, False, Client("203.0.113.7", https=False)),
        ("::ffff:198.51.100.9", "203.0.113.7", None, False, Client("198.51.100.9", False)),
        # X-Forwarded-Proto from a trusted proxy: the last value, trimmed, any case.
        ("10.0.0.1", None, "https", False, Client("10.0.0.1", https=True)),
        ("10.0.0.1", None, " HTTPS ", False, Client("10.0.0.1", https=True)),
        ("10.0.0.1", None, "http, https", False, Client("10.0.0.1", https=True)),
        ("10.0.0.1", None, "https, http", False, Client("10.0.0.1", https=False)),
        ("10.0.0.1", None, "http", True, Client("10.0.0.1", https=False)),
        ("10.0.0.1", None, "ftp", False, Client("10.0.0.1", https=False)),
    ],
)
def test_resolve_client(
    peer: str | None,
    forwarded_for: str | None,
    forwarded_proto: str | None,
    tls: bool,
    expected: Client,
) -> None:
    """Forwarded headers count only from a trusted peer, and then the right-most untrusted
    hop is the client and the last X-Forwarded-Proto value says whether it was HTTPS."""
    got = resolve_client(peer, forwarded_for, forwarded_proto, tls=tls, trusted_proxies=PROXIES)
    assert got == expected


def test_resolve_client_without_trusted_proxies_believes_no_header() -> None:
    """With no trusted proxies configured, even a loopback peer's headers are ignored."""
    got = resolve_client("127.0.0.1", "203.0.113.7", "https", tls=False, trusted_proxies=())
    assert got == Client("127.0.0.1", https=False)


@pytest.mark.parametrize(
    ("ip", "allowlist", "expected"),
    [
        # An empty list allows everyone, even an address we cannot read.
        ("203.0.113.7", [], True),
        (None, [], True),
        ("garbage", [], True),
        # CIDR networks and single addresses.
        ("10.1.2.3", ["10.0.0.0/8"], True),
        ("11.0.0.1", ["10.0.0.0/8"], False),
        ("203.0.113.7", ["198.51.100.0/24", "203.0.113.7"], True),
        ("203.0.113.8", ["198.51.100.0/24", "203.0.113.7"], False),
        ("2001:db8::1", ["2001:db8::/32"], True),
        ("2001:db9::1", ["2001:db8::/32"], False),
        # IPv4-mapped IPv6 is the IPv4 address; IPv4 never matches an IPv6 network.
        ("::ffff:10.0.0.1", ["10.0.0.0/8"], True),
        ("10.0.0.1", ["::ffff:0:0/96"], False),
        # With a non-empty list, an unknown or unreadable address is refused.
        (None, ["0.0.0.0/0"], False),
        ("", ["0.0.0.0/0"], False),
        ("garbage", ["0.0.0.0/0"], False),
        ("10.0.0.1/8", ["0.0.0.0/0"], False),
    ],
)
def test_allowed(ip: str | None, allowlist: list[str], expected: bool) -> None:
    """An address passes an allowlist when the list is empty or one of its networks holds it;
    an address that cannot be parsed never passes a non-empty list."""
    assert allowed(ip, parse_networks(allowlist)) is expected


TOKEN = "adm_5cK9q2Lr8vXw"


@pytest.mark.parametrize(
    ("authorization", "expected"),
    [
        (f"Bearer {TOKEN}", True),
        (None, False),
        ("", False),
        (TOKEN, False),
        (f"Basic {TOKEN}", False),
        (f"Bearer  {TOKEN}", False),
        (f"Bearer {TOKEN} ", False),
        (f"Bearer {TOKEN}x", False),
        (f"Bearer {TOKEN[:-1]}", False),
        ("Bearer ", False),
        ("Bearer tökén", False),
    ],
)
def test_bearer_ok(authorization: str | None, expected: bool) -> None:
    """Only `Authorization: Bearer <token>` with exactly the token passes."""
    assert bearer_ok(authorization, TOKEN) is expected


def test_parse_networks_accepts_cidrs_and_single_addresses() -> None:
    """CIDRs, single addresses (as /32 or /128), host bits set and surrounding spaces are fine."""
    got = parse_networks(["10.0.0.0/8", " 192.168.1.1 ", "2001:db8::/32", "10.1.2.3/8", "::1"])
    assert [str(n) for n in got] == [
        "10.0.0.0/8",
        "192.168.1.1/32",
        "2001:db8::/32",
        "10.0.0.0/8",
        "::1/128",
    ]


@pytest.mark.parametrize("bad", ["nope", "10.0.0.0/33", "", "1.2.3.4/abc", "300.1.1.1", "::g"])
def test_parse_networks_names_the_bad_value(bad: str) -> None:
    """A value that is neither an address nor a network is a ValueError quoting that value."""
    with pytest.raises(ValueError, match="is not an IP address or CIDR network") as info:
        parse_networks(["10.0.0.0/8", bad])
    assert str(info.value).startswith(repr(bad))


@pytest.mark.parametrize("scheme", ["Bearer", "bearer", "BEARER"])
def test_bearer_scheme_is_case_insensitive(scheme: str) -> None:
    """RFC 7235: the auth scheme is case-insensitive; the token itself is not."""
    assert bearer_ok(f"{scheme} tok-123", "tok-123")
    assert not bearer_ok(f"{scheme} TOK-123", "tok-123")


def test_resolve_client_reads_every_header_line_in_order() -> None:
    """Header lines as `headers.getall` gives them are one list: a forged first line cannot
    name the client when the trusted proxy appended the real address on a line of its own."""
    got = resolve_client(
        "127.0.0.1",
        ["10.1.1.1", "203.0.113.9"],
        ["https", "http"],
        tls=False,
        trusted_proxies=parse_networks(["127.0.0.1/32"]),
    )
    assert got == Client("203.0.113.9", https=False)
