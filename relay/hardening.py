"""Security posture of a configuration: which addresses are loopback, which database URLs
verify their server, and the warnings `relay check` (and `relay serve`, in its log) gives about
unsafe settings a user keeps on purpose. Reads a Config (and the modes of the database
files), never refuses one (refusals are config errors, in relay/config); docs/security.md lists
every setting named here.
"""

from __future__ import annotations

import os
import stat
from urllib.parse import parse_qs, urlsplit

from relay.access import is_loopback_host
from relay.config import Config

_OPEN_NETWORKS = ("0.0.0.0/0", "::/0")
# Below this a token can be guessed: the console's rate limit (5 wrong a minute per client)
# slows one client, not many. `openssl rand -hex 32` gives 64 characters.
MIN_TOKEN_CHARS = 20


def postgres_verifies_server(url: str) -> bool:
    """Whether a PostgreSQL URL has libpq/asyncpg check the server's certificate and name
    (`sslmode=verify-full`), or talks over a local socket or loopback where nobody is between."""
    parts = urlsplit(url)
    query = {k.lower(): v[-1] for k, v in parse_qs(parts.query).items()}
    if query.get("sslmode", "").lower() == "verify-full":
        return True
    host = query.get("host", "") or (parts.hostname or "")
    # No host, or a socket directory: a Unix socket on this machine.
    return not host or host.startswith("/") or is_loopback_host(host)


def file_warnings(db_path: str) -> list[str]:
    """The SQLite files, when others may read them (created by an older relay, or by hand; the
    relay creates them 0600)."""
    found = []
    for path in (db_path, f"{db_path}-wal", f"{db_path}-shm"):
        try:
            mode = stat.S_IMODE(os.stat(path).st_mode)
        except OSError:
            continue  # absent: nothing to say
        if mode & 0o077:
            found.append(
                f"storage.path: {path} is readable by other users (mode {mode:04o}); it holds "
                "raw webhook bodies: chmod 600 it"
            )
    return found


def warnings(config: Config) -> list[str]:
    """One line per unsafe setting the config keeps (each names its key and the safe choice)."""
    found: list[str] = []
    admin = config.admin
    if admin.listen and admin.token is not None and not is_loopback_host(admin.host_port[0]):
        found.append(
            f"admin.listen: {admin.listen} is reachable from other machines and has no TLS: "
            "the admin token travels in clear text; keep the port on a private network or "
            "behind a TLS proxy"
        )
    for key, token in (("token", admin.token), ("read_token", admin.read_token)):
        if token is not None and len(token.value) < MIN_TOKEN_CHARS:
            found.append(
                f"admin.{key}: {len(token.value)} characters can be guessed; use at least "
                f"{MIN_TOKEN_CHARS} random ones (openssl rand -hex 32)"
            )
    for network in config.server.trusted_proxies:
        if str(network) in _OPEN_NETWORKS:
            found.append(
                f"server.trusted_proxies: {network} trusts every address, so any client can "
                "choose its X-Forwarded-For address (and pass allow_ips); list your proxies only"
            )
    url = config.storage.url
    if url is not None and not postgres_verifies_server(url.value):
        found.append(
            "storage.url: the PostgreSQL server is not on loopback and its certificate is not "
            "verified (add sslmode=verify-full, see docs/postgres.md): anyone between can read "
            "or change the outbox"
        )
    for source in config.sources.values():
        if source.tolerance_s > 600:
            found.append(
                f"sources.{source.name}.tolerance_s: {source.tolerance_s} s lets a captured "
                "webhook be replayed that long after it was signed (Polar signs fresh on each "
                "attempt; 300 is the default)"
            )
    return found
