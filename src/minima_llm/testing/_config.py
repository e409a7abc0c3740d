"""The mock server's configuration: one frozen, validated value."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

_RATES = ("failure_rate", "reset_rate", "malformed_rate")
_DURATIONS = (
    "latency_s",
    "latency_jitter_s",
    "stream_chunk_delay_s",
    "batch_delay_s",
    "tpm_burst_s",
)
_COUNTS = ("rpm", "tpm", "max_concurrency")


@dataclass(frozen=True, slots=True)
class MockConfig:
    """How the mock server behaves: latency, limits and injected faults.

    Every field can be changed at runtime through ``POST /_mock/config``.
    The three fault rates share one random draw per request, so their sum
    must not exceed 1. ``batch_delay_s`` is how long a provider batch stays
    ``in_progress`` after creation; batches read it when polled, so changing it
    also moves batches already running.
    """

    latency_s: float = 0.0
    latency_jitter_s: float = 0.0
    rpm: int = 0
    # 1: 429s and answers carry x-ratelimit-* and retry-after; 0: none (Azure without
    # limit headers, most gateways), so a client must learn the rate from refusals.
    rate_limit_headers: int = 1
    # Tokens per minute, charged as OpenAI's limiter counts them (see Reply.charged_tokens)
    # from a bucket holding tpm_burst_s seconds of the limit; a request costing more
    # than the bucket holds is refused as too large, as OpenAI refuses it.
    tpm: int = 0
    tpm_burst_s: float = 1.0
    max_concurrency: int = 0
    failure_rate: float = 0.0
    reset_rate: float = 0.0
    malformed_rate: float = 0.0
    seed: int = 0
    model: str = "mock-model"
    stream_chunk_delay_s: float = 0.0
    batch_delay_s: float = 0.0

    def __post_init__(self) -> None:
        for name in (*_DURATIONS, *_RATES):
            value = _as_float(name, getattr(self, name))
            if value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
            object.__setattr__(self, name, value)
        for name in _RATES:
            if getattr(self, name) > 1:
                raise ValueError(f"{name} must be <= 1, got {getattr(self, name)!r}")
        if sum(getattr(self, name) for name in _RATES) > 1 + 1e-9:
            raise ValueError("failure_rate + reset_rate + malformed_rate must be <= 1")
        for name in (*_COUNTS, "seed"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool):
                raise ValueError(f"{name} must be an int, got {value!r}")
            if name != "seed" and value < 0:
                raise ValueError(f"{name} must be >= 0, got {value!r}")
        if self.rate_limit_headers not in (0, 1) or isinstance(self.rate_limit_headers, bool):
            raise ValueError(f"rate_limit_headers must be 0 or 1, got {self.rate_limit_headers!r}")
        if self.tpm and self.tpm_burst_s <= 0:
            raise ValueError(f"tpm_burst_s must be > 0, got {self.tpm_burst_s!r}")
        if not isinstance(self.model, str) or not self.model:
            raise ValueError(f"model must be a non-empty string, got {self.model!r}")

    @property
    def has_random_faults(self) -> bool:
        """Whether any fault rate is non-zero (lets the hot path skip the draw)."""
        return self.failure_rate + self.reset_rate + self.malformed_rate > 0

    def replace(self, **changes: Any) -> MockConfig:
        """Return a copy with ``changes`` applied and validated."""
        return self.merge(changes)

    def merge(self, changes: Mapping[str, Any]) -> MockConfig:
        """Return a copy with the fields in ``changes`` replaced; unknown keys are errors."""
        known = {field.name for field in dataclasses.fields(self)}
        unknown = sorted(set(changes) - known)
        if unknown:
            raise ValueError(f"unknown MockConfig field(s): {', '.join(unknown)}")
        return dataclasses.replace(self, **changes)

    def to_dict(self) -> dict[str, Any]:
        """Return the fields as a JSON-ready dict."""
        return dataclasses.asdict(self)


def _as_float(name: str, value: object) -> float:
    # JSON has no int/float distinction, so ``{"latency_s": 1}`` must be accepted.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value!r}")
    return float(value)
