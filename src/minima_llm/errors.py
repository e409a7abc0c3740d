"""The package's exception tree.

Upstream trouble never raises from ``generate``: it comes back as a
``MinimaLlmFailure``. Exceptions are for programming and configuration errors.
"""

from __future__ import annotations

from typing import Any


class MinimaLlmError(Exception):
    """Base class of every exception this package raises on purpose."""


class ConfigError(MinimaLlmError, ValueError):
    """A configuration value is invalid; the message names field, value and what is allowed."""

    def __init__(self, field: str, value: Any, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}={value!r}: {allowed}")


class CacheError(MinimaLlmError):
    """The cache store could not be opened or written."""


class TransportError(MinimaLlmError):
    """A request did not produce an HTTP response (connect, reset, timeout, bad body)."""

    def __init__(self, kind: str, message: str) -> None:
        self.kind = kind
        super().__init__(message)
