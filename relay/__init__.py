"""Faurya Relay: verified Polar webhooks become Faurya revenue calls, through a durable outbox."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("faurya-relay")
except PackageNotFoundError:  # running from a source tree that was never installed
    __version__ = "0.0.0"

__all__ = ["__version__"]
