"""The configuration's frozen dataclasses: what relay.toml says, validated. No parsing here.

Secrets live only in `Secret` objects, whose repr and str are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.access import Network
from relay.mapping import Path as PathTuple
from relay.mapping import (
    Route,
)

DEFAULT_BODY_LIMIT_BYTES = 256 * 1024


@dataclass(frozen=True, slots=True)
class Secret:
    """A secret string; its repr and str are masked so it cannot leak by accident."""

    value: str = field(repr=False)

    def __repr__(self) -> str:
        return "Secret('***')"

    def __str__(self) -> str:
        return "***"


@dataclass(frozen=True, slots=True)
class ServerConfig:
    host: str = "0.0.0.0"  # noqa: S104 - a sidecar listens on all interfaces by design
    port: int = 8080
    max_body_bytes: int = DEFAULT_BODY_LIMIT_BYTES
    shutdown_grace_s: float = 10.0
    # Child processes that make the delivery HTTP requests (0: the serving process does).
    delivery_processes: int = 0
    # Slow clients: a connection must deliver its request headers within keepalive_timeout_s
    # (and idle keep-alive connections close after it), and its body within body_timeout_s.
    keepalive_timeout_s: float = 15.0
    body_timeout_s: float = 10.0
    max_header_bytes: int = 8190  # per header line and per field
    max_headers: int = 64
    tls_cert: str = ""  # serve HTTPS directly when both are set
    tls_key: str = ""
    require_https: bool = False  # behind a proxy: refuse what did not arrive over HTTPS
    trusted_proxies: tuple[Network, ...] = ()  # whose X-Forwarded-For/-Proto we believe


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """/metrics (and /healthz, /readyz) on a separate listener, and/or behind a token."""

    listen: str = ""  # "127.0.0.1:9090"; empty: on the main listener
    token: Secret | None = None  # required as `Authorization: Bearer` for /metrics

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    path: str = "relay.db"  # SQLite (one relay per file)
    url: Secret | None = None  # postgresql://user:password@host/db (several relays); wins
    busy_timeout_ms: int = 5000
    max_batch: int = 256
    # /readyz turns 503 when the SQLite database's filesystem has less free space than this
    # (0: never). The default is about an hour of webhooks at 10/s (docs/operations.md).
    min_free_bytes: int = 256 * 1024 * 1024

    @property
    def location(self) -> str:
        """What the store opens: the PostgreSQL URL when set, else the SQLite path."""
        return self.url.value if self.url is not None else self.path


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """Delivered messages and raw bodies are pruned by age; dead ones stay until handled."""

    # Raw inbound bodies (they hold customer PII: email, billing address) once no message of
    # the event still needs them.
    bodies_s: float = 30 * 24 * 3600.0
    # Delivered messages (with their bodies, kept for replay and refund lookups) and finished
    # events. Their idempotency keys go with them: keep this longer than any resend window.
    rows_s: float = 365 * 24 * 3600.0
    interval_s: float = 3600.0  # how often `relay serve` prunes


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = "info"
    format: str = "auto"  # auto: console on a TTY, JSON otherwise
    # Payload fields replaced by "[redacted]" in the stored raw body (customer PII). The
    # mapping still sees them: it runs before the body is stored.
    redact: tuple[PathTuple, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    path: str
    secrets: tuple[Secret, ...]
    kind: str = "polar"
    tolerance_s: int = 300
    allow_ips: tuple[Network, ...] = ()  # empty: any address (the signature still rules)


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Pure data; `relay.retry` computes with it."""

    max_attempts: int = 1000
    base_s: float = 1.0
    cap_s: float = 600.0
    max_age_s: float = 7 * 24 * 3600.0
    jitter: float = 0.5  # each delay is drawn from [(1 - jitter) * d, d]
    max_retry_after_s: float = 3600.0


@dataclass(frozen=True, slots=True)
class Header:
    name: str
    value: Secret | str

    @property
    def text(self) -> str:
        return self.value.value if isinstance(self.value, Secret) else self.value

    def shown(self) -> str:
        return "***" if isinstance(self.value, Secret) else self.value


@dataclass(frozen=True, slots=True)
class DestinationConfig:
    name: str
    url: str
    headers: tuple[Header, ...] = ()
    timeout_s: float = 10.0
    concurrency: int = 8
    # Attempts in flight while webhooks are arriving (0: `concurrency`). Lower, it keeps a
    # backlog's drain from crowding out the webhooks waiting for their 202.
    concurrency_while_receiving: int = 0
    lease_s: float = 60.0
    paused: bool = False
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True, slots=True)
class PolarApiConfig:
    """Polar's API, for reconciliation, checkout creation and payment checks."""

    url: str = "https://api.polar.sh"  # sandbox: https://sandbox-api.polar.sh
    token: Secret | None = None  # an organization access token (POLAR_ACCESS_TOKEN)
    min_interval_s: float = 0.15  # request spacing: 400/min, under Polar's 500/min


# Reconciliation is on by default whenever a Polar token is set: webhooks alone lose revenue
# (Polar gives up after ~30 minutes, sends nothing while an endpoint is disabled, and lost
# disputes never send one). Hourly, over 30 days: Polar's dunning can pay a renewal up to 21 days
# after its order was created, and orders can only be listed by creation time.
RECONCILE_DEFAULT_INTERVAL_S = 3600.0
RECONCILE_DEFAULT_LOOKBACK_S = 30 * 24 * 3600.0


@dataclass(frozen=True, slots=True)
class ReconcileConfig:
    """`relay serve` reconciles every `interval_s` (0: never) over the last `lookback_s`.
    Unset, `interval_s` is `RECONCILE_DEFAULT_INTERVAL_S` with a Polar token and 0 without."""

    interval_s: float = 0.0
    lookback_s: float = RECONCILE_DEFAULT_LOOKBACK_S
    source: str = "polar"
    # The first run comes this soon after start (at most interval_s), so a relay that is
    # restarted more often than interval_s still reconciles.
    first_run_after_s: float = 60.0


@dataclass(frozen=True, slots=True)
class CheckoutConfig:
    """The optional checkout endpoint: the browser posts the Faurya IDs, the relay creates
    the Polar checkout with them (and a generated orderId) in its metadata."""

    enabled: bool = False
    path: str = "/checkout"
    plans: tuple[tuple[str, str], ...] = ()  # plan name -> Polar product id
    allow_origins: tuple[str, ...] = ()  # CORS: the merchant's page origins
    success_url: str = ""
    return_url: str = ""
    rate_limit_per_min: int = 10  # per client address (per /64 for IPv6)
    # All clients together: the checkout's own Polar API budget, apart from the payment checks'
    # and reconciliation's; past it (a queue of CHECKOUT_MAX_WAIT_S) the answer is 503.
    global_rate_limit_per_min: int = 60

    def product_for(self, plan: str) -> str | None:
        return dict(self.plans).get(plan)


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """The revenue ledger (`relay ledger`): days are cut at midnight in `timezone` (IANA)."""

    timezone: str = "UTC"


@dataclass(frozen=True, slots=True)
class Config:
    server: ServerConfig
    storage: StorageConfig
    log: LogConfig
    sources: dict[str, SourceConfig]
    destinations: dict[str, DestinationConfig]
    routes: tuple[Route, ...]
    retention: RetentionConfig = RetentionConfig()
    admin: AdminConfig = AdminConfig()
    polar_api: PolarApiConfig = PolarApiConfig()
    reconcile: ReconcileConfig = ReconcileConfig()
    checkout: CheckoutConfig = CheckoutConfig()
    # Variables that were not set, in an offline load only (they read as "<unset: NAME>").
    unset_variables: tuple[str, ...] = ()
    ledger: LedgerConfig = LedgerConfig()


@dataclass(frozen=True, slots=True)
class OfflineConfig:
    """The sections operator commands need: no secrets, so none are required in the env."""

    storage: StorageConfig
    retention: RetentionConfig
