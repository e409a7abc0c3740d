"""A bare aiohttp load generator: the same client drives the mock directly and the gateway."""

from __future__ import annotations

import asyncio
import statistics
import time
import uuid
from dataclasses import dataclass
from typing import Any

import aiohttp

REQUEST_TIMEOUT_S = 60.0


@dataclass(frozen=True)
class Load:
    """One run of the generator."""

    elapsed_s: float
    latencies_s: list[float]
    errors: int
    first_token_s: list[float]

    @property
    def rate(self) -> float:
        """Answers per second."""
        return len(self.latencies_s) / self.elapsed_s

    def percentile(self, q: float, ttft: bool = False) -> float:
        """The q-th percentile (0-100) of latency or of time to first token, in seconds."""
        values = sorted(self.first_token_s if ttft else self.latencies_s)
        if not values:
            return float("nan")
        return values[min(len(values) - 1, int(len(values) * q / 100))]

    @property
    def median_ttft_s(self) -> float:
        """Median time to first token."""
        return statistics.median(self.first_token_s)


def payloads(count: int, tag: str | None = None, stream: bool = False) -> list[dict[str, Any]]:
    """``count`` distinct chat bodies (a fresh tag makes them cache misses)."""
    tag = tag or uuid.uuid4().hex[:8]
    return [
        {
            "model": "mock-model",
            "messages": [{"role": "user", "content": f"gateway bench {tag} {i}: say hello"}],
            "stream": stream,
        }
        for i in range(count)
    ]


async def drive(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> Load:
    """POST every body with ``concurrency`` workers; streams are read to the end."""
    url = base_url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=concurrency)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    latencies: list[float] = []
    ttft: list[float] = []
    errors = 0
    feed = iter(bodies)

    async def worker(session: aiohttp.ClientSession) -> None:
        nonlocal errors
        for body in feed:
            started = time.perf_counter()
            async with session.post(url, json=body) as resp:
                if body.get("stream"):
                    first = None
                    async for line in resp.content:
                        if first is None and line.startswith(b"data: {") and b'"content"' in line:
                            first = time.perf_counter() - started
                    if first is not None:
                        ttft.append(first)
                else:
                    await resp.read()
                if resp.status != 200:
                    errors += 1
            latencies.append(time.perf_counter() - started)

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return Load(elapsed, latencies, errors, ttft)


def run(base_url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float) -> Load:
    """``drive`` on a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(drive(base_url, bodies, concurrency), timeout_s))
