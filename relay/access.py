"""Who may talk to the relay: client addresses behind trusted proxies, source-IP allowlists,
the HTTPS requirement, and the admin bearer token. Pure: takes addresses and header values.

X-Forwarded-For and X-Forwarded-Proto are believed only when the TCP peer is a configured
trusted proxy; otherwise anyone could claim any address. The client is the right-most address
in X-Forwarded-For that is not itself a trusted proxy.
"""

from __future__ import annotations

import hmac
import ipaddress
from collections.abc import Sequence
from dataclasses import dataclass

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_networks(values: Sequence[str]) -> tuple[Network, ...]:
    """CIDRs or single addresses; raises ValueError naming the bad one."""
    networks = []
    for value in values:
        try:
            networks.append(ipaddress.ip_network(value.strip(), strict=False))
        except ValueError:
            raise ValueError(f"{value!r} is not an IP address or CIDR network") from None
    return tuple(networks)


def _address(text: str | None) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    if not text:
        return None
    try:
        address = ipaddress.ip_address(text.strip().split("%", 1)[0])
    except ValueError:
        return None
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        return address.ipv4_mapped
    return address


def _within(address: object, networks: Sequence[Network]) -> bool:
    return any(address in network for network in networks)


@dataclass(frozen=True, slots=True)
class Client:
    """Where a request comes from, after trusted proxies are accounted for."""

    ip: str | None
    https: bool


def header_list(lines: str | Sequence[str] | None) -> str:
    """Every line of a repeated header as one comma-separated list, in order: a proxy that
    appends its own line (HAProxy's `option forwardfor`) must not leave a client's forged
    first line to decide."""
    if lines is None:
        return ""
    if isinstance(lines, str):
        return lines
    return ",".join(lines)


def resolve_client(
    peer: str | None,
    forwarded_for: str | Sequence[str] | None,
    forwarded_proto: str | Sequence[str] | None,
    *,
    tls: bool,
    trusted_proxies: Sequence[Network],
) -> Client:
    """`forwarded_for`/`forwarded_proto`: every line of the header (`headers.getall`), or one
    value."""
    forwarded_for = header_list(forwarded_for)
    forwarded_proto = header_list(forwarded_proto)
    peer_address = _address(peer)
    if peer_address is None or not _within(peer_address, trusted_proxies):
        return Client(ip=str(peer_address) if peer_address else peer, https=tls)
    ip: str | None = str(peer_address)
    if forwarded_for:
        for hop in reversed(forwarded_for.split(",")):
            hop_address = _address(hop)
            if hop_address is None:
                break  # garbage: stop at the last address we could trust
            ip = str(hop_address)
            if not _within(hop_address, trusted_proxies):
                break
    https = tls
    if forwarded_proto:
        https = forwarded_proto.split(",")[-1].strip().lower() == "https"
    return Client(ip=ip, https=https)


def is_loopback_host(host: str) -> bool:
    """An address only this machine can reach: localhost, 127.0.0.0/8, ::1. A host name other
    than localhost may resolve to anything, so it is not."""
    host = host.strip().strip("[]").lower()
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


def allowed(ip: str | None, allowlist: Sequence[Network]) -> bool:
    """An empty allowlist allows everyone; otherwise the address must fall in it."""
    if not allowlist:
        return True
    address = _address(ip)
    return address is not None and _within(address, allowlist)


def equal_text(offered: str, expected: str) -> bool:
    """Constant-time equality of two header or form values; any text (a cookie or field can
    carry non-ASCII, and aiohttp hands undecodable bytes over as surrogates)."""
    return hmac.compare_digest(
        offered.encode("utf-8", "surrogateescape"), expected.encode("utf-8", "surrogateescape")
    )


def bearer_ok(authorization: str | None, token: str) -> bool:
    """Constant-time check of `Authorization: Bearer <token>` (the scheme in any case)."""
    scheme, _, offered = (authorization or "").partition(" ")
    if scheme.lower() != "bearer" or not offered:
        return False
    return equal_text(offered, token)
