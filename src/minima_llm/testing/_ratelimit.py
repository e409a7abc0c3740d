"""Request and token buckets and OpenAI-style rate-limit headers, free of I/O."""

from __future__ import annotations

import math
import time
from collections.abc import Callable


def format_duration(seconds: float) -> str:
    """Format ``seconds`` like OpenAI's ``x-ratelimit-reset-*`` headers: ``250ms``, ``6m0s``.

    The format is Go's ``time.Duration`` string, which is what OpenAI sends.
    Values are rounded *up* to the millisecond so a client that waits exactly
    this long never arrives early.
    """
    if seconds <= 0:
        return "0s"
    millis = math.ceil(seconds * 1000 - 1e-6)
    if millis < 1000:
        return f"{max(millis, 1)}ms"
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    text = f"{secs}.{millis:03d}".rstrip("0").rstrip(".") + "s"
    if hours or minutes:
        text = f"{minutes}m{text}"
    if hours:
        text = f"{hours}h{text}"
    return text


def format_retry_after(seconds: float) -> tuple[str, str]:
    """Return ``(retry-after, retry-after-ms)`` header values, never below 1 ms."""
    millis = max(1, math.ceil(seconds * 1000 - 1e-6))
    return f"{millis / 1000:.3f}".rstrip("0").rstrip("."), str(millis)


class TokenBucket:
    """A per-minute limit enforced as a bucket holding ``burst_s`` seconds of it, starting full.

    ``unit`` names what it counts in the headers: ``requests`` (one a request) or
    ``tokens`` (a request's cost). OpenAI enforces per-minute limits over shorter
    periods like this. A request bucket holds at least one request, otherwise an
    rpm below 60 could never admit one.
    """

    __slots__ = ("_clock", "_last", "_names", "_tokens", "capacity", "limit_header", "rate", "rpm")

    def __init__(
        self,
        rpm: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        unit: str = "requests",
        burst_s: float = 1.0,
    ) -> None:
        if rpm <= 0:
            name = "rpm" if unit == "requests" else "tpm"
            raise ValueError(f"{name} must be > 0, got {rpm!r}")
        self.rpm = rpm
        self.rate = rpm / 60.0
        self.capacity = max(1.0, self.rate * burst_s)
        self.limit_header = str(rpm)
        self._names = tuple(
            f"x-ratelimit-{kind}-{unit}" for kind in ("limit", "remaining", "reset")
        )
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def __repr__(self) -> str:
        unit = self._names[0].rsplit("-", 1)[1]
        return f"<TokenBucket {unit}={self.rpm}/min level={self._tokens:.2f}/{self.capacity:g}>"

    def try_acquire(self, cost: float = 1.0) -> bool:
        """Take ``cost`` if available; return whether the request is admitted."""
        now = self._clock()
        tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens >= cost:
            self._tokens = tokens - cost
            return True
        self._tokens = tokens
        return False

    @property
    def remaining(self) -> int:
        """Whole tokens left as of the last acquire."""
        return int(self._tokens)

    @property
    def seconds_until_full(self) -> float:
        """Time until the bucket is full again, as of the last acquire."""
        return (self.capacity - self._tokens) / self.rate

    @property
    def seconds_until_token(self) -> float:
        """Time until one token is available, as of the last acquire."""
        return self.seconds_until(1.0)

    def seconds_until(self, cost: float) -> float:
        """Time until ``cost`` is available, as of the last acquire."""
        return max(0.0, (cost - self._tokens) / self.rate)

    def headers(self, *, limited: bool, cost: float = 1.0) -> dict[str, str]:
        """Build the ``x-ratelimit-*`` headers, plus ``retry-after`` for ``cost`` when ``limited``."""
        limit, remaining, reset = self._names
        headers = {
            limit: self.limit_header,
            remaining: str(self.remaining),
            reset: format_duration(self.seconds_until_full),
        }
        if limited:
            seconds, millis = format_retry_after(self.seconds_until(cost))
            headers["retry-after"] = seconds
            headers["retry-after-ms"] = millis
        return headers
