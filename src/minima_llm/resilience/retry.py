"""Which outcomes to retry and how long to back off. Pure functions, no I/O."""

from __future__ import annotations

import random

# 408 timeout, 409 conflict (lock contention), 425 too early, 429 rate limit, 5xx:
# the same set OpenAI's own client treats as transient.
RETRYABLE_4XX = frozenset({408, 409, 425, 429})
# Statuses that mean the server as a whole is saturated, so every request should slow down.
OVERLOAD = frozenset({429, 503, 504})


def is_retryable_status(status: int) -> bool:
    """Whether a response with this status is worth another attempt."""
    return status in RETRYABLE_4XX or status >= 500


def is_overload_status(status: int) -> bool:
    """Whether this status should put every request into cooldown."""
    return status in OVERLOAD


def backoff_delay(
    attempt: int,
    base_s: float,
    cap_s: float,
    jitter: float,
    rng: random.Random | None = None,
) -> float:
    """Delay before retry number ``attempt`` (1-based): ``base * 2**(attempt-1)`` ±jitter, never above ``cap_s``.

    The cap is a ceiling: at the cap, jitter only shortens the wait, so workers
    that failed together still spread out without anyone waiting past it.
    """
    exp = min(attempt - 1, 62)
    delay = min(cap_s, base_s * (2.0**exp))
    if jitter > 0 and delay > 0:
        delay *= 1.0 + (rng or random).uniform(-jitter, jitter)
    return max(0.0, min(delay, cap_s))


def attempts_left(attempt: int, max_attempts: int) -> bool:
    """Whether another attempt is allowed after ``attempt`` attempts (0 = unlimited)."""
    return max_attempts == 0 or attempt < max_attempts
