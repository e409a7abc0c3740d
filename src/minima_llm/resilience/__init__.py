"""Retry decisions, backoff, cooldown, request and token pacing, and a breaker: small objects driven by a clock."""

from .breaker import CLOSED, DOWN_KINDS, DOWN_STATUS, HALF_OPEN, OPEN, Breaker
from .cooldown import Cooldown
from .headers import (
    NO_RATE_LIMITS,
    RateLimitInfo,
    lower_headers,
    parse_duration,
    parse_rate_limits,
    parse_retry_after,
    server_says_retry,
)
from .pacer import RpmPacer
from .retry import attempts_left, backoff_delay, is_overload_status, is_retryable_status
from .slots import Slots
from .tokens import Charge, TokenPacer, estimate_tokens

__all__ = [
    "CLOSED",
    "DOWN_KINDS",
    "DOWN_STATUS",
    "HALF_OPEN",
    "NO_RATE_LIMITS",
    "OPEN",
    "Breaker",
    "Charge",
    "Cooldown",
    "RateLimitInfo",
    "RpmPacer",
    "Slots",
    "TokenPacer",
    "attempts_left",
    "backoff_delay",
    "estimate_tokens",
    "is_overload_status",
    "is_retryable_status",
    "lower_headers",
    "parse_duration",
    "parse_rate_limits",
    "parse_retry_after",
    "server_says_retry",
]
