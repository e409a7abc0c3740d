"""Live counters of what a backend has done; the heartbeat, demo and metrics all read them."""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

from .types import Usage


@dataclass(frozen=True)
class StatsSnapshot:
    """A consistent copy of the counters at one moment."""

    requests: int
    cache_hits: dict[str, int]
    live_calls: int
    coalesced: int
    retries: int
    rate_limited: int
    failures: int
    in_flight: int
    tokens_in: int
    tokens_out: int
    tokens_saved_in: int
    tokens_saved_out: int
    latency_min_s: float | None
    latency_avg_s: float | None
    latency_max_s: float | None
    cache_errors: int
    # The limits the server set on live calls now, when it stated or taught one
    # ("120000 tokens/min (server)"): why a batch runs slower than its workers could.
    pace: str | None = None

    @property
    def hits(self) -> int:
        """Cache hits from every source."""
        return sum(self.cache_hits.values())

    def as_dict(self) -> dict[str, Any]:
        """Plain-dict form, for JSON."""
        out = asdict(self)
        out["hits"] = self.hits
        return out


@dataclass
class LiveStats:
    """Mutable counters, updated on the event loop by the backend."""

    requests: int = 0
    cache_hits: dict[str, int] = field(default_factory=dict)
    live_calls: int = 0
    coalesced: int = 0
    retries: int = 0
    rate_limited: int = 0
    failures: int = 0
    in_flight: int = 0
    tokens_in: int = 0
    tokens_out: int = 0
    tokens_saved_in: int = 0
    tokens_saved_out: int = 0
    cache_errors: int = 0
    _latency_sum: float = 0.0
    _latency_n: int = 0
    # Infinite until the first call, so ``live`` compares without a None check.
    _latency_min: float = math.inf
    _latency_max: float = -math.inf

    def hit(self, source: str, usage: Usage) -> None:
        """A request answered from a cache: its tokens were saved, not spent."""
        self.cache_hits[source] = self.cache_hits.get(source, 0) + 1
        self.tokens_saved_in += usage.prompt_tokens
        self.tokens_saved_out += usage.completion_tokens

    def live(self, usage: Usage, latency_s: float) -> None:
        """A completed upstream call."""
        self.live_calls += 1
        self.tokens_in += usage.prompt_tokens
        self.tokens_out += usage.completion_tokens
        self._latency_sum += latency_s
        self._latency_n += 1
        if latency_s < self._latency_min:
            self._latency_min = latency_s
        if latency_s > self._latency_max:
            self._latency_max = latency_s

    def snapshot(self) -> StatsSnapshot:
        """Copy the counters."""
        n = self._latency_n
        avg = self._latency_sum / n if n else None
        return StatsSnapshot(
            requests=self.requests,
            cache_hits=dict(self.cache_hits),
            live_calls=self.live_calls,
            coalesced=self.coalesced,
            retries=self.retries,
            rate_limited=self.rate_limited,
            failures=self.failures,
            in_flight=self.in_flight,
            tokens_in=self.tokens_in,
            tokens_out=self.tokens_out,
            tokens_saved_in=self.tokens_saved_in,
            tokens_saved_out=self.tokens_saved_out,
            latency_min_s=self._latency_min if n else None,
            latency_avg_s=avg,
            latency_max_s=self._latency_max if n else None,
            cache_errors=self.cache_errors,
        )

    def __repr__(self) -> str:
        s = self.snapshot()
        return (
            f"<LiveStats requests={s.requests} hits={s.hits} live={s.live_calls} "
            f"failures={s.failures} in_flight={s.in_flight} retries={s.retries} 429s={s.rate_limited}>"
        )
