"""The one exception tree of the relay.

Every error the relay raises on purpose is a `RelayError`. A subclass's docstring is its
default message, so `raise StorageUnavailable()` already says something useful. Messages must
never contain a secret: callers pass names and key paths, never values of secret fields.
"""

from __future__ import annotations


class RelayError(Exception):
    """Faurya Relay failed."""

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or (self.__doc__ or type(self).__name__).strip())

    @property
    def message(self) -> str:
        return str(self.args[0])


class ConfigError(RelayError):
    """The configuration is invalid."""

    def __init__(self, problems: list[str] | str) -> None:
        self.problems = [problems] if isinstance(problems, str) else list(problems)
        super().__init__("; ".join(self.problems))


class MissingEnvVar(ConfigError):
    """A required environment variable is not set."""

    def __init__(self, name: str, key_path: str) -> None:
        self.var_name = name
        super().__init__(f"environment variable {name} is not set or empty (needed by {key_path})")


class SignatureInvalid(RelayError):
    """The webhook signature did not verify."""

    def __init__(self, reason: str, *, stale: bool = False) -> None:
        # reason is a short, fixed phrase (never header contents): it ends up in logs.
        self.reason = reason
        self.stale = stale
        super().__init__(f"signature rejected: {reason}")


class MappingError(RelayError):
    """The event could not be mapped to an outbound message."""


class StorageError(RelayError):
    """The outbox store failed."""


class StorageUnavailable(StorageError):
    """The outbox could not commit the event; nothing of it was stored."""


class StoreLocked(StorageError):
    """Another relay process is already serving this database."""
