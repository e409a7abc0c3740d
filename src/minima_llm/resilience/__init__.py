"""Retry decisions, backoff, cooldown, pacing and a breaker: small objects driven by a clock."""

from .breaker import CLOSED, DOWN_KINDS, DOWN_STATUS, HALF_OPEN, OPEN, Breaker
from .cooldown import Cooldown
from .headers import (
    RateLimitInfo,
    lower_headers,
    parse_duration,
    parse_rate_limits,
    parse_retry_after,
)
from .pacer import RpmPacer
from .retry import attempts_left, backoff_delay, is_overload_status, is_retryable_status
from .slots import Slots

__all__ = [
    "CLOSED",
    "DOWN_KINDS",
    "DOWN_STATUS",
    "HALF_OPEN",
    "OPEN",
    "Breaker",
    "Cooldown",
    "RateLimitInfo",
    "RpmPacer",
    "Slots",
    "attempts_left",
    "backoff_delay",
    "is_overload_status",
    "is_retryable_status",
    "lower_headers",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
]
