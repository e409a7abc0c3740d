"""Gateway metrics: plain counters on the request path, Prometheus series built at scrape time."""

from __future__ import annotations

import bisect
from collections.abc import Callable, Iterator
from typing import Any

from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

from ..resilience import Breaker
from ..stats import StatsSnapshot
from ..types import Usage

LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120)
_CACHE_RESULTS = ("hit", "miss", "refresh")
_TOKEN_SOURCES = ("upstream", "cache", "coalesced")


class GatewayMetrics:
    """Counters the handlers update; a fresh registry per gateway so tests read exact values.

    Counting is a dict or int update: prometheus-client's own Counter takes a lock and
    checks its labels on every call, about 600 bytecodes a request over the eight
    series a miss touches. Its registry still renders the text, from ``_Collector``.
    The event loop is the only writer, so nothing here needs a lock.
    """

    content_type = CONTENT_TYPE_LATEST

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.requests: dict[tuple[str, int], int] = {}
        self.cache: dict[str, int] = {}
        self.tokens: dict[tuple[str, str], int] = {}
        # Read from the gateway's own record of the requests it is answering.
        self._in_flight: Callable[[], int] = lambda: 0
        self._admission: Callable[[], tuple[int, int]] = lambda: (0, 0)
        # The upstream's circuit breaker, read when scraped; None when there is none.
        self.breaker: Breaker | None = None
        self.coalesced = 0
        self.streams_interrupted = 0
        self.client_disconnects = 0
        # Per bucket, not cumulative (the last is +Inf); summed at scrape time.
        self.latency_counts = [0] * (len(LATENCY_BUCKETS) + 1)
        self.latency_sum = 0.0
        self.registry = registry or CollectorRegistry()
        self.registry.register(_Collector(self))

    def watch_in_flight(self, source: Callable[[], int]) -> None:
        """Take the number of requests in flight from ``source`` when read."""
        self._in_flight = source

    def watch_admission(self, source: Callable[[], tuple[int, int]]) -> None:
        """Take (requests waiting for an upstream turn, requests refused so far) from ``source``."""
        self._admission = source

    @property
    def in_flight(self) -> int:
        """Requests being answered now."""
        return self._in_flight()

    @property
    def admission(self) -> tuple[int, int]:
        """Requests waiting for an upstream turn now, and cache misses refused so far."""
        return self._admission()

    def count_request(self, route: str, status: int) -> None:
        """One HTTP request finished."""
        key = (route, status)
        self.requests[key] = self.requests.get(key, 0) + 1

    def count_answer(
        self, result: str, usage: Usage, source: str, latency_s: float | None = None
    ) -> None:
        """One answer: ``result`` is hit, miss or refresh; ``source`` where its tokens were spent or saved."""
        self.cache[result] = self.cache.get(result, 0) + 1
        tokens = self.tokens
        if usage.prompt_tokens:
            key = ("prompt", source)
            tokens[key] = tokens.get(key, 0) + usage.prompt_tokens
        if usage.completion_tokens:
            key = ("completion", source)
            tokens[key] = tokens.get(key, 0) + usage.completion_tokens
        if source == "coalesced":
            self.coalesced += 1
        if latency_s is not None and source == "upstream":
            self.latency_counts[bisect.bisect_left(LATENCY_BUCKETS, latency_s)] += 1
            self.latency_sum += latency_s

    def exposition(self) -> bytes:
        """Prometheus text format."""
        return bytes(generate_latest(self.registry))

    def snapshot(self, backend: StatsSnapshot) -> dict[str, Any]:
        """The JSON form served at ``/metrics``."""
        return {
            "requests": sum(self.requests.values()),
            "by_status": {str(k): v for k, v in sorted(self._by_status().items())},
            "in_flight": self.in_flight,
            "upstream_queued": self.admission[0],
            "refused": self.admission[1],
            "breaker": _breaker_dict(self.breaker),
            "cache": {label: self.cache.get(label, 0) for label in _CACHE_RESULTS},
            "coalesced": self.coalesced,
            "tokens": {
                source: {
                    kind: self.tokens.get((kind, source), 0) for kind in ("prompt", "completion")
                }
                for source in _TOKEN_SOURCES
            },
            "streams_interrupted": self.streams_interrupted,
            "client_disconnects": self.client_disconnects,
            "backend": backend.as_dict(),
        }

    def _by_status(self) -> dict[int, int]:
        counts: dict[int, int] = {}
        for (_, status), n in self.requests.items():
            counts[status] = counts.get(status, 0) + n
        return counts


class _Collector:
    """The Prometheus series of one ``GatewayMetrics``, read when scraped."""

    def __init__(self, metrics: GatewayMetrics) -> None:
        self._m = metrics

    def describe(self) -> list[Metric]:
        """The families by name, so a registry refuses a second gateway's series."""
        return list(self.collect())

    def collect(self) -> Iterator[Metric]:
        """Every series, from the counters as they stand."""
        m = self._m
        requests = CounterMetricFamily(
            "minima_gateway_requests",
            "HTTP requests by route and status",
            labels=["route", "status"],
        )
        for (route, status), n in sorted(m.requests.items()):
            requests.add_metric([route, str(status)], n)
        yield requests
        cache = CounterMetricFamily(
            "minima_gateway_cache", "Cache outcomes of answered requests", labels=["result"]
        )
        for result, n in sorted(m.cache.items()):
            cache.add_metric([result], n)
        yield cache
        buckets, cumulative = [], 0
        for bound, n in zip((*LATENCY_BUCKETS, float("inf")), m.latency_counts, strict=True):
            cumulative += n
            buckets.append((_bound(bound), cumulative))
        yield HistogramMetricFamily(
            "minima_gateway_upstream_latency_seconds",
            "Latency of live upstream calls",
            buckets=buckets,
            sum_value=m.latency_sum,
        )
        tokens = CounterMetricFamily(
            "minima_gateway_tokens",
            "Tokens by kind, spent upstream or saved",
            labels=["kind", "source"],
        )
        for (kind, source), n in sorted(m.tokens.items()):
            tokens.add_metric([kind, source], n)
        yield tokens
        yield GaugeMetricFamily(
            "minima_gateway_in_flight", "Requests being answered now", value=m.in_flight
        )
        queued, refused = m.admission
        yield GaugeMetricFamily(
            "minima_gateway_upstream_queued",
            "Requests waiting for an upstream turn (cooldown, pacing or an in-flight slot)",
            value=queued,
        )
        for name, doc, value in (
            (
                "minima_gateway_coalesced",
                "Requests answered by joining an identical one in flight",
                m.coalesced,
            ),
            (
                "minima_gateway_streams_interrupted",
                "Streams cut off before the end",
                m.streams_interrupted,
            ),
            (
                "minima_gateway_client_disconnects",
                "Streaming clients gone before their stream was sent to the end",
                m.client_disconnects,
            ),
            (
                "minima_gateway_refused",
                "Cache misses refused with 503 because proxy.max_queued requests were waiting",
                refused,
            ),
        ):
            yield CounterMetricFamily(name, doc, value=value)
        breaker = m.breaker
        if breaker is not None:
            yield GaugeMetricFamily(
                "minima_gateway_upstream_breaker_open",
                "1 while the upstream's breaker fails cache misses at once (open, or"
                " half-open with its probe out)",
                value=int(breaker.refusing),
            )
            yield CounterMetricFamily(
                "minima_gateway_breaker_opened",
                "Times the upstream's breaker opened after calls in a row found it down",
                value=breaker.opened,
            )
            yield CounterMetricFamily(
                "minima_gateway_breaker_rejected",
                "Upstream calls the open breaker refused to send",
                value=breaker.rejected,
            )


def _breaker_dict(breaker: Breaker | None) -> dict[str, Any] | None:
    if breaker is None:
        return None
    return {"state": breaker.state, "opened": breaker.opened, "rejected": breaker.rejected}


def _bound(bound: float) -> str:
    """A bucket's ``le`` label as prometheus-client writes it (``0.005``, ``1.0``, ``+Inf``)."""
    return "+Inf" if bound == float("inf") else repr(float(bound))
