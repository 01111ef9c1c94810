"""The configuration's frozen dataclasses: what relay.toml says, validated. No parsing here.

Each field relay.toml sets carries its default and, in its metadata, its check (`check`: a
value check such as `between(0, 65535)`, or `read`: a reader of its own such as `networks`);
`relay.config.reader.read_fields` reads a section by them. Secrets live only in `Secret`
objects, whose repr and str are masked.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from relay.access import Network
from relay.config.reader import (
    between,
    http_url,
    listen_address,
    networks,
    non_empty,
    one_of,
    optional,
    positive,
    readable_file,
    time_zone,
    url_path,
)
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
    port: int = field(default=8080, metadata={"check": between(0, 65535)})
    max_body_bytes: int = field(
        default=DEFAULT_BODY_LIMIT_BYTES, metadata={"check": between(1024, 64 << 20)}
    )
    shutdown_grace_s: float = field(default=10.0, metadata={"check": between(0, 3600)})
    # Child processes that make the delivery HTTP requests (0: the serving process does).
    delivery_processes: int = field(default=0, metadata={"check": between(0, 16)})
    # Slow clients: a connection must deliver its request headers within keepalive_timeout_s
    # (and idle keep-alive connections close after it), and its body within body_timeout_s.
    keepalive_timeout_s: float = field(default=15.0, metadata={"check": between(1, 3600)})
    body_timeout_s: float = field(default=10.0, metadata={"check": between(0.5, 600)})
    # per header line and per field
    max_header_bytes: int = field(default=8190, metadata={"check": between(256, 65536)})
    max_headers: int = field(default=64, metadata={"check": between(8, 1000)})
    # serve HTTPS directly when both are set
    tls_cert: str = field(default="", metadata={"check": readable_file})
    tls_key: str = field(default="", metadata={"check": readable_file})
    require_https: bool = False  # behind a proxy: refuse what did not arrive over HTTPS
    # whose X-Forwarded-For/-Proto we believe
    trusted_proxies: tuple[Network, ...] = field(default=(), metadata={"read": networks})


@dataclass(frozen=True, slots=True)
class AdminConfig:
    """/metrics (and /healthz, /readyz) on a separate listener, and/or behind a token."""

    # "127.0.0.1:9090"; empty: on the main listener
    listen: str = field(default="", metadata={"check": listen_address})
    token: Secret | None = None  # required as `Authorization: Bearer` for /metrics
    # The console: `token` can act, `read_token` can only look (RELAY_ADMIN_READ_TOKEN).
    read_token: Secret | None = None
    # Host headers the console accepts besides the listener's own address (a name it is
    # reached by, "relay.internal:9090"): anything else is refused against DNS rebinding.
    hosts: tuple[str, ...] = ()

    @property
    def host_port(self) -> tuple[str, int]:
        host, _, port = self.listen.rpartition(":")
        return host.strip("[]") or "127.0.0.1", int(port)


@dataclass(frozen=True, slots=True)
class StorageConfig:
    # SQLite (one relay per file)
    path: str = field(default="relay.db", metadata={"check": non_empty})
    url: Secret | None = None  # postgresql://user:password@host/db (several relays); wins
    busy_timeout_ms: int = field(default=5000, metadata={"check": between(0, 600_000)})
    max_batch: int = field(default=256, metadata={"check": between(1, 2000)})
    # /readyz turns 503 when the SQLite database's filesystem has less free space than this
    # (0: never). The default is about an hour of webhooks at 10/s (docs/operations.md).
    min_free_bytes: int = field(default=256 * 1024 * 1024, metadata={"check": between(0, 2**62)})

    @property
    def location(self) -> str:
        """What the store opens: the PostgreSQL URL when set, else the SQLite path."""
        return self.url.value if self.url is not None else self.path


@dataclass(frozen=True, slots=True)
class RetentionConfig:
    """Delivered messages and raw bodies are pruned by age; dead ones stay until handled."""

    # Raw inbound bodies (they hold customer PII: email, billing address) once no message of
    # the event still needs them.
    bodies_s: float = field(default=30 * 24 * 3600.0, metadata={"check": positive})
    # Delivered messages (with their bodies, kept for replay and refund lookups) and finished
    # events. Their idempotency keys go with them: keep this longer than any resend window.
    rows_s: float = field(default=365 * 24 * 3600.0, metadata={"check": positive})
    # how often `relay serve` prunes
    interval_s: float = field(default=3600.0, metadata={"check": positive})


@dataclass(frozen=True, slots=True)
class LogConfig:
    level: str = field(
        default="info", metadata={"check": one_of("debug", "info", "warning", "error")}
    )
    # auto: console on a TTY, JSON otherwise
    format: str = field(default="auto", metadata={"check": one_of("auto", "json", "console")})
    # Payload fields replaced by "[redacted]" in the stored raw body (customer PII). The
    # mapping still sees them: it runs before the body is stored.
    redact: tuple[PathTuple, ...] = ()


@dataclass(frozen=True, slots=True)
class SourceConfig:
    name: str
    path: str = field(metadata={"check": url_path})  # read with the default /webhooks/<name>
    secrets: tuple[Secret, ...]
    kind: str = field(default="polar", metadata={"check": one_of("polar", "standard-webhooks")})
    tolerance_s: int = field(default=300, metadata={"check": between(1, 86400)})
    # empty: any address (the signature still rules)
    allow_ips: tuple[Network, ...] = field(default=(), metadata={"read": networks})


@dataclass(frozen=True, slots=True)
class RetryPolicy:
    """Pure data; `relay.retry` computes with it."""

    max_attempts: int = field(default=1000, metadata={"check": between(1, 1_000_000)})
    base_s: float = field(default=1.0, metadata={"check": positive})
    cap_s: float = field(default=600.0, metadata={"check": positive})
    max_age_s: float = field(default=7 * 24 * 3600.0, metadata={"check": positive})
    # each delay is drawn from [(1 - jitter) * d, d]
    jitter: float = field(default=0.5, metadata={"check": between(0, 1)})
    max_retry_after_s: float = field(default=3600.0, metadata={"check": positive})


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
    url: str = field(metadata={"check": http_url})
    headers: tuple[Header, ...] = ()
    timeout_s: float = field(default=10.0, metadata={"check": between(0.1, 300)})
    concurrency: int = field(default=8, metadata={"check": between(1, 1000)})
    # Attempts in flight while webhooks are arriving (0, or unset: `concurrency`). Lower, it
    # keeps a backlog's drain from crowding out the webhooks waiting for their 202.
    concurrency_while_receiving: int = field(default=0, metadata={"check": between(1, 1000)})
    # read with the default max(lease_s, 2 * timeout_s + 5)
    lease_s: float = field(default=60.0, metadata={"check": positive})
    paused: bool = False
    retry: RetryPolicy = RetryPolicy()


@dataclass(frozen=True, slots=True)
class PolarApiConfig:
    """Polar's API, for reconciliation, checkout creation and payment checks."""

    # sandbox: https://sandbox-api.polar.sh
    url: str = field(default="https://api.polar.sh", metadata={"check": http_url})
    token: Secret | None = None  # an organization access token (POLAR_ACCESS_TOKEN)
    # request spacing: 400/min, under Polar's 500/min
    min_interval_s: float = field(default=0.15, metadata={"check": between(0, 60)})


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

    interval_s: float = field(default=0.0, metadata={"check": between(0, 7 * 86400)})
    lookback_s: float = field(default=RECONCILE_DEFAULT_LOOKBACK_S, metadata={"check": positive})
    source: str = "polar"
    # The first run comes this soon after start (at most interval_s), so a relay that is
    # restarted more often than interval_s still reconciles.
    first_run_after_s: float = field(default=60.0, metadata={"check": between(0, 7 * 86400)})


@dataclass(frozen=True, slots=True)
class CheckoutConfig:
    """The optional checkout endpoint: the browser posts the Faurya IDs, the relay creates
    the Polar checkout with them (and a generated orderId) in its metadata."""

    enabled: bool = False
    path: str = field(default="/checkout", metadata={"check": url_path})
    plans: tuple[tuple[str, str], ...] = ()  # plan name -> Polar product id
    allow_origins: tuple[str, ...] = ()  # CORS: the merchant's page origins
    success_url: str = field(default="", metadata={"check": optional(http_url)})
    return_url: str = field(default="", metadata={"check": optional(http_url)})
    # per client address (per /64 for IPv6)
    rate_limit_per_min: int = field(default=10, metadata={"check": between(1, 100_000)})
    # All clients together: the checkout's own Polar API budget, apart from the payment checks'
    # and reconciliation's; past it (a queue of CHECKOUT_MAX_WAIT_S) the answer is 503.
    global_rate_limit_per_min: int = field(default=60, metadata={"check": between(1, 100_000)})

    def product_for(self, plan: str) -> str | None:
        return dict(self.plans).get(plan)


@dataclass(frozen=True, slots=True)
class LedgerConfig:
    """The revenue ledger (`relay ledger`): days are cut at midnight in `timezone` (IANA)."""

    timezone: str = field(default="UTC", metadata={"check": time_zone})


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
