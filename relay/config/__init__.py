"""relay.toml -> validated, frozen configuration objects.

Owns: TOML parsing, `${VAR}` / `${VAR:-default}` interpolation, every validation rule, and the
error messages that name the full key path of each problem. Pure apart from reading the file and
the environment mapping it is given; imports no I/O library. Secrets live only in `Secret`
objects whose repr is masked, and no error message quotes a secret's value.

`model` (the dataclasses; each field carries its default and its check), `reader`
(interpolation, the checked table reader, value checks, `read_fields`: a section read by its
dataclass's fields), `sections` (one function per section, for what is not a plain field),
`loader` (`load`, `parse`, `load_offline`).
"""

from relay.config.loader import load, load_offline, parse, read_toml, storage_path
from relay.config.model import (
    DEFAULT_BODY_LIMIT_BYTES,
    AdminConfig,
    CheckoutConfig,
    Config,
    DestinationConfig,
    Header,
    LedgerConfig,
    LogConfig,
    OfflineConfig,
    PolarApiConfig,
    ReconcileConfig,
    RetentionConfig,
    RetryPolicy,
    Secret,
    ServerConfig,
    SourceConfig,
    StorageConfig,
)
from relay.config.reader import UNSET_MARK, interpolate
from relay.models import is_postgres_url

__all__ = [
    "DEFAULT_BODY_LIMIT_BYTES",
    "UNSET_MARK",
    "AdminConfig",
    "CheckoutConfig",
    "Config",
    "DestinationConfig",
    "Header",
    "LedgerConfig",
    "LogConfig",
    "OfflineConfig",
    "PolarApiConfig",
    "ReconcileConfig",
    "RetentionConfig",
    "RetryPolicy",
    "Secret",
    "ServerConfig",
    "SourceConfig",
    "StorageConfig",
    "interpolate",
    "is_postgres_url",
    "load",
    "load_offline",
    "parse",
    "read_toml",
    "storage_path",
]
