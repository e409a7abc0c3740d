"""A bare aiohttp load generator: the same client drives the mock directly and the gateway."""

from __future__ import annotations

import asyncio
import contextlib
import statistics
import time
import uuid
from collections.abc import Sequence
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


async def _one(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any]
) -> tuple[float, float | None, bool]:
    """POST one body (a stream is read to its end): latency, time to first content, OK."""
    started = time.perf_counter()
    first = None
    async with session.post(url, json=body) as resp:
        if body.get("stream"):
            async for line in resp.content:
                if first is None and line.startswith(b"data: {") and b'"content"' in line:
                    first = time.perf_counter() - started
        else:
            await resp.read()
        ok = resp.status == 200
    return time.perf_counter() - started, first, ok


def _session(concurrency: int) -> aiohttp.ClientSession:
    connector = aiohttp.TCPConnector(limit=concurrency)
    return aiohttp.ClientSession(
        connector=connector, timeout=aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    )


class _Recorder:
    """Latencies, first-token times and errors of one side, as they come."""

    def __init__(self) -> None:
        self.latencies: list[float] = []
        self.ttft: list[float] = []
        self.errors = 0

    def add(self, outcome: tuple[float, float | None, bool]) -> None:
        latency, first, ok = outcome
        self.latencies.append(latency)
        if first is not None:
            self.ttft.append(first)
        self.errors += not ok

    def load(self, elapsed_s: float) -> Load:
        return Load(elapsed_s, self.latencies, self.errors, self.ttft)


async def drive(base_url: str, bodies: list[dict[str, Any]], concurrency: int) -> Load:
    """POST every body with ``concurrency`` workers; streams are read to the end."""
    url = base_url + "/chat/completions"
    seen = _Recorder()
    feed = iter(bodies)

    async def worker(session: aiohttp.ClientSession) -> None:
        for body in feed:
            seen.add(await _one(session, url, body))

    async with _session(concurrency) as session:
        started = time.perf_counter()
        await asyncio.gather(*(worker(session) for _ in range(concurrency)))
        elapsed = time.perf_counter() - started
    return seen.load(elapsed)


async def drive_alternating(
    base_urls: Sequence[str], bodies: Sequence[list[dict[str, Any]]]
) -> list[Load]:
    """One request at a time, taking turns between servers: all see the same machine.

    Run one after the other, a change in the machine's load between the runs would
    show up as a difference between the servers.
    """
    urls = [url + "/chat/completions" for url in base_urls]
    seen = [_Recorder() for _ in urls]
    spent = [0.0 for _ in urls]
    async with contextlib.AsyncExitStack() as stack:
        sessions = [await stack.enter_async_context(_session(1)) for _ in urls]
        for turn in zip(*bodies, strict=True):
            for side, body in enumerate(turn):
                started = time.perf_counter()
                seen[side].add(await _one(sessions[side], urls[side], body))
                spent[side] += time.perf_counter() - started
    return [recorder.load(elapsed) for recorder, elapsed in zip(seen, spent, strict=True)]


def run(base_url: str, bodies: list[dict[str, Any]], concurrency: int, timeout_s: float) -> Load:
    """``drive`` on a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(drive(base_url, bodies, concurrency), timeout_s))


def run_alternating(
    base_urls: Sequence[str], bodies: Sequence[list[dict[str, Any]]], timeout_s: float
) -> list[Load]:
    """``drive_alternating`` on a fresh loop, bounded."""
    return asyncio.run(asyncio.wait_for(drive_alternating(base_urls, bodies), timeout_s))
