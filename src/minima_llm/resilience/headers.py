"""What rate-limit and retry headers mean. Pure functions, no I/O."""

from __future__ import annotations

import email.utils
import re
import time
from collections.abc import Mapping
from dataclasses import dataclass

# OpenAI's x-ratelimit-reset-* values are Go-style durations ("1s", "6m0s",
# "20ms", "1h2m3.5s"); other servers send plain seconds. Accept both.
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|us|µs|ns|h|m|s)")
_UNIT_S = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 1e-3, "us": 1e-6, "µs": 1e-6, "ns": 1e-9}
# Some servers send the moment a limit resets as a Unix timestamp rather than the wait.
# No wait is 30 years long: a value past 1e9 (September 2001) is a moment in seconds,
# past 1e12 the same in milliseconds.
_EPOCH_S = 1e9
_EPOCH_MS = 1e12


def parse_duration(text: str | None) -> float | None:
    """Seconds from ``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1h2m3.5s"`` or ``"0.5"``; None if unreadable."""
    if text is None:
        return None
    text = text.strip().lower()
    if not text:
        return None
    try:
        value = float(text)
    except ValueError:
        pass
    else:
        return value if value >= 0 and value == value and value != float("inf") else None
    pos, total = 0, 0.0
    for match in _DURATION_PART.finditer(text):
        if match.start() != pos:
            return None
        total += float(match.group(1)) * _UNIT_S[match.group(2)]
        pos = match.end()
    return total if pos == len(text) and pos > 0 else None


def seconds_until(value: float | None, now: float | None = None) -> float | None:
    """A reset value as seconds to wait: itself, or the time left until it if it is a Unix timestamp."""
    if value is None or value < _EPOCH_S:
        return value
    moment = value / 1000.0 if value >= _EPOCH_MS else value
    return max(0.0, moment - (time.time() if now is None else now))


def parse_retry_after(headers: Mapping[str, str], now: float | None = None) -> float | None:
    """Seconds to wait from ``retry-after-ms`` or ``retry-after`` (seconds or an HTTP date)."""
    ms = _get(headers, "retry-after-ms")
    if ms is not None:
        try:
            value = float(ms) / 1000.0
        except ValueError:
            value = -1.0
        if 0 <= value < float("inf"):
            return value
    text = _get(headers, "retry-after")
    if text is None:
        return None
    seconds = parse_duration(text)
    if seconds is not None:
        return seconds
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError):
        return None
    if when is None:
        return None
    now = time.time() if now is None else now
    return max(0.0, when.timestamp() - now)


@dataclass(frozen=True)
class RateLimitInfo:
    """What the server said about its request and token limits in one response."""

    limit_requests: int | None = None
    remaining_requests: int | None = None
    reset_requests_s: float | None = None
    limit_tokens: int | None = None
    remaining_tokens: int | None = None
    reset_tokens_s: float | None = None

    @property
    def empty(self) -> bool:
        """No rate-limit header was present."""
        return self == NO_RATE_LIMITS


# What parse_rate_limits returns for a response without rate-limit headers (always this object).
NO_RATE_LIMITS = RateLimitInfo()


def parse_rate_limits(headers: Mapping[str, str], now: float | None = None) -> RateLimitInfo:
    """Read the ``x-ratelimit-*`` headers; absent or unreadable ones are None.

    ``now`` (Unix time) is only read for a reset sent as a timestamp.
    """
    if (
        getattr(headers, "lowercase", False)
        and "x-ratelimit-limit-requests" not in headers
        and "x-ratelimit-limit-tokens" not in headers
        and "x-ratelimit-remaining-requests" not in headers
    ):
        return NO_RATE_LIMITS  # most servers send none of them: answer without the scans below
    if (
        _get(headers, "x-ratelimit-limit-requests") is None
        and _get(headers, "x-ratelimit-limit-tokens") is None
    ) and _get(headers, "x-ratelimit-remaining-requests") is None:
        return NO_RATE_LIMITS
    return RateLimitInfo(
        limit_requests=_int(_get(headers, "x-ratelimit-limit-requests")),
        remaining_requests=_int(_get(headers, "x-ratelimit-remaining-requests")),
        reset_requests_s=seconds_until(
            parse_duration(_get(headers, "x-ratelimit-reset-requests")), now
        ),
        limit_tokens=_int(_get(headers, "x-ratelimit-limit-tokens")),
        remaining_tokens=_int(_get(headers, "x-ratelimit-remaining-tokens")),
        reset_tokens_s=seconds_until(
            parse_duration(_get(headers, "x-ratelimit-reset-tokens")), now
        ),
    )


def server_says_retry(headers: Mapping[str, str]) -> bool | None:
    """The server's own word on retrying, from ``x-should-retry`` (OpenAI's); None if unsaid."""
    value = _get(headers, "x-should-retry")
    if value is None:
        return None
    value = value.strip().lower()
    return True if value == "true" else False if value == "false" else None


def _get(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    # Transports hand over lower-cased names (marked ``lowercase``): no scan needed.
    if value is None and not getattr(headers, "lowercase", False):
        for key, val in headers.items():
            if key.lower() == name:
                return val
    return value


class _CaseInsensitive(dict[str, str]):
    """Marker: a dict whose keys are already lower-case."""

    lowercase = True


def lower_headers(items: object) -> dict[str, str]:
    """Header pairs (a mapping or an iterable of pairs) as a dict with lower-case names."""
    pairs = items.items() if isinstance(items, Mapping) else items
    out = _CaseInsensitive()
    for key, value in pairs:  # type: ignore[attr-defined]
        out[str(key).lower()] = str(value)
    return out


def _int(text: str | None) -> int | None:
    if text is None:
        return None
    try:
        value = int(float(text.strip()))
    except (ValueError, OverflowError):
        return None
    return value if value >= 0 else None
