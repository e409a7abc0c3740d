"""Gateway metrics: Prometheus series in their own registry, and a JSON snapshot."""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..stats import StatsSnapshot
from ..types import Usage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)


class GatewayMetrics:
    """Counters the handlers update; a fresh registry per gateway so tests read exact values."""

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "minima_gateway_requests",
            "HTTP requests by route and status",
            ["route", "status"],
            registry=r,
        )
        self.cache = Counter(
            "minima_gateway_cache", "Cache outcomes of answered requests", ["result"], registry=r
        )
        self.upstream_latency = Histogram(
            "minima_gateway_upstream_latency_seconds",
            "Latency of live upstream calls",
            buckets=LATENCY_BUCKETS,
            registry=r,
        )
        self.tokens = Counter(
            "minima_gateway_tokens",
            "Tokens by kind, spent upstream or saved",
            ["kind", "source"],
            registry=r,
        )
        self.in_flight = Gauge(
            "minima_gateway_in_flight", "Requests being answered now", registry=r
        )
        self.coalesced = Counter(
            "minima_gateway_coalesced",
            "Requests answered by joining an identical one in flight",
            registry=r,
        )
        self.streams_interrupted = Counter(
            "minima_gateway_streams_interrupted", "Streams cut off before the end", registry=r
        )
        self.client_disconnects = Counter(
            "minima_gateway_client_disconnects",
            "Streaming clients gone before their stream was sent to the end",
            registry=r,
        )
        self._requests_total = 0
        self._by_status: dict[int, int] = {}
        # labels() validates and locks on every call; each labelled series is looked up once.
        self._series: dict[tuple[Any, ...], Any] = {}

    def _labelled(self, metric: Any, *labels: str) -> Any:
        key = (metric, *labels)
        series = self._series.get(key)
        if series is None:
            series = self._series[key] = metric.labels(*labels)
        return series

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request finished."""
        self._labelled(self.requests, route, str(status)).inc()
        self._requests_total += 1
        self._by_status[status] = self._by_status.get(status, 0) + 1

    def count_answer(
        self, result: str, usage: Usage, source: str, latency_s: float | None = None
    ) -> None:
        """One answer: ``result`` is hit, miss or refresh; ``source`` where its tokens were spent or saved."""
        self._labelled(self.cache, result).inc()
        if usage.prompt_tokens:
            self._labelled(self.tokens, "prompt", source).inc(usage.prompt_tokens)
        if usage.completion_tokens:
            self._labelled(self.tokens, "completion", source).inc(usage.completion_tokens)
        if source == "coalesced":
            self.coalesced.inc()
        if latency_s is not None and source == "upstream":
            self.upstream_latency.observe(latency_s)

    def exposition(self) -> bytes:
        """Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def snapshot(self, backend: StatsSnapshot) -> dict[str, Any]:
        """The JSON form served at ``/metrics``."""
        return {
            "requests": self._requests_total,
            "by_status": {str(k): v for k, v in sorted(self._by_status.items())},
            "in_flight": self._sample("minima_gateway_in_flight"),
            "cache": {
                label: self._sample("minima_gateway_cache_total", result=label)
                for label in ("hit", "miss", "refresh")
            },
            "coalesced": self._sample("minima_gateway_coalesced_total"),
            "tokens": {
                source: {
                    kind: self._sample("minima_gateway_tokens_total", kind=kind, source=source)
                    for kind in ("prompt", "completion")
                }
                for source in ("upstream", "cache", "coalesced")
            },
            "streams_interrupted": self._sample("minima_gateway_streams_interrupted_total"),
            "client_disconnects": self._sample("minima_gateway_client_disconnects_total"),
            "backend": backend.as_dict(),
        }

    def _sample(self, name: str, **labels: str) -> float:
        value = self.registry.get_sample_value(name, labels)
        return float(value or 0.0)
