"""A request token bucket and OpenAI-style rate-limit headers, free of I/O."""

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
    """Requests-per-minute limiter holding one second of burst, starting full.

    Capacity is ``rpm / 60`` tokens but at least one, otherwise an rpm below
    60 could never admit a request.
    """

    __slots__ = ("_clock", "_last", "_tokens", "capacity", "limit_header", "rate", "rpm")

    def __init__(self, rpm: int, clock: Callable[[], float] = time.monotonic) -> None:
        if rpm <= 0:
            raise ValueError(f"rpm must be > 0, got {rpm!r}")
        self.rpm = rpm
        self.rate = rpm / 60.0
        self.capacity = max(1.0, self.rate)
        self.limit_header = str(rpm)
        self._clock = clock
        self._tokens = self.capacity
        self._last = clock()

    def __repr__(self) -> str:
        return f"<TokenBucket rpm={self.rpm} tokens={self._tokens:.2f}/{self.capacity:g}>"

    def try_acquire(self) -> bool:
        """Take one token if available; return whether the request is admitted."""
        now = self._clock()
        tokens = min(self.capacity, self._tokens + (now - self._last) * self.rate)
        self._last = now
        if tokens >= 1.0:
            self._tokens = tokens - 1.0
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
        return max(0.0, (1.0 - self._tokens) / self.rate)

    def headers(self, *, limited: bool) -> dict[str, str]:
        """Build the ``x-ratelimit-*-requests`` headers, plus ``retry-after`` when ``limited``."""
        headers = {
            "x-ratelimit-limit-requests": self.limit_header,
            "x-ratelimit-remaining-requests": str(self.remaining),
            "x-ratelimit-reset-requests": format_duration(self.seconds_until_full),
        }
        if limited:
            seconds, millis = format_retry_after(self.seconds_until_token)
            headers["retry-after"] = seconds
            headers["retry-after-ms"] = millis
        return headers
