"""The two sides of every comparison: a bare aiohttp client and the minima-llm backend."""

from __future__ import annotations

import asyncio
import contextlib
import io
import tempfile
import time
from collections.abc import Callable, Coroutine, Iterator, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import aiohttp

from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResponse,
    OpenAIMinimaLlm,
)

MODEL = "mock-model"
CONCURRENCY = 64
REQUEST_TIMEOUT_S = 30.0
T = TypeVar("T")


def make_requests(count: int, tag: str) -> list[MinimaLlmRequest]:
    """``count`` distinct chat requests (distinct content, so every one is a cache miss)."""
    return [
        MinimaLlmRequest(
            request_id=f"{tag}-{i}",
            messages=({"role": "user", "content": f"benchmark {tag} request {i}: say hello"},),
        )
        for i in range(count)
    ]


def payloads_of(requests: Sequence[MinimaLlmRequest]) -> list[dict[str, Any]]:
    """The JSON bodies the reference client posts for the same requests."""
    return [{"model": MODEL, "messages": list(r.messages)} for r in requests]


def run_bounded(coro: Coroutine[Any, Any, T], timeout_s: float) -> T:
    """``asyncio.run`` on a fresh loop, giving up after ``timeout_s``."""
    return asyncio.run(asyncio.wait_for(coro, timeout_s))


@dataclass(frozen=True)
class Timed:
    """One timed run: wall time, client CPU time (all threads), answers, answers not OK."""

    elapsed_s: float
    cpu_s: float
    count: int
    errors: int

    @property
    def rate(self) -> float:
        """Answers per second."""
        return self.count / self.elapsed_s

    @property
    def cpu_us(self) -> float:
        """Client CPU microseconds per answer: robust to other load on the machine."""
        return self.cpu_s / self.count * 1e6


# --- reference: the ceiling a client could reach ---------------------------------------


async def bare_aiohttp(
    base_url: str,
    payloads: Sequence[dict[str, Any]],
    warmup: Sequence[dict[str, Any]],
    around: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> Timed:
    """One ``ClientSession``, ``CONCURRENCY`` tasks each POSTing and reading ``resp.json()``.

    ``around`` wraps the timed pass (a profiler, say), not the warm-up.
    """
    url = base_url + "/chat/completions"
    connector = aiohttp.TCPConnector(limit=CONCURRENCY)
    timeout = aiohttp.ClientTimeout(total=REQUEST_TIMEOUT_S)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await _drive(session, url, warmup)
        cpu, started = time.process_time(), time.perf_counter()
        with around():
            errors = await _drive(session, url, payloads)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    return Timed(elapsed, cpu, len(payloads), errors)


async def _drive(
    session: aiohttp.ClientSession, url: str, payloads: Sequence[dict[str, Any]]
) -> int:
    feed = iter(payloads)
    errors = 0

    async def worker() -> None:
        nonlocal errors
        for payload in feed:
            async with session.post(url, json=payload) as resp:
                await resp.json()
                errors += resp.status != 200

    await asyncio.gather(*(worker() for _ in range(CONCURRENCY)))
    return errors


# --- subject: the library ---------------------------------------------------------------


def backend_config(
    base_url: str, cache_dir: str | None, transport: str = "auto"
) -> MinimaLlmConfig:
    """The subject's config: no client-side RPM, 64 in flight, 64 workers, no heartbeat."""
    return MinimaLlmConfig(
        base_url=base_url,
        model=MODEL,
        cache_dir=cache_dir,
        rpm=0,
        max_outstanding=CONCURRENCY,
        transport=transport,
        batch=BatchConfig(
            num_workers=CONCURRENCY, heartbeat_s=3600.0, stall_s=3600.0, max_failures=None
        ),
    )


@contextlib.contextmanager
def quiet() -> Iterator[io.StringIO]:
    """Swallow the batch runner's summary line (it goes to stderr)."""
    sink = io.StringIO()
    with contextlib.redirect_stderr(sink):
        yield sink


async def timed_batch(
    backend: OpenAIMinimaLlm, requests: Sequence[MinimaLlmRequest]
) -> tuple[Timed, list[Any]]:
    """Time one whole ``run_batched`` call; count answers that are not responses."""
    with quiet():
        cpu, started = time.process_time(), time.perf_counter()
        results = await backend.run_batched(requests)
        elapsed, cpu = time.perf_counter() - started, time.process_time() - cpu
    errors = sum(not isinstance(r, MinimaLlmResponse) for r in results)
    return Timed(elapsed, cpu, len(results), errors), results


async def subject_batch(
    config: MinimaLlmConfig,
    requests: Sequence[MinimaLlmRequest],
    warmup: Sequence[MinimaLlmRequest],
) -> Timed:
    """A new backend warms its connections with ``warmup``, then runs ``requests`` timed."""
    backend = OpenAIMinimaLlm(config)
    try:
        if warmup:
            with quiet():
                await backend.run_batched(warmup)
        timed, _ = await timed_batch(backend, requests)
    finally:
        await backend.aclose()
    return timed


def in_fresh_cache(run: Callable[[str], T]) -> T:
    """Call ``run(cache_dir)`` with a new temporary cache directory, removed afterwards."""
    with tempfile.TemporaryDirectory(prefix="minima-bench-") as cache_dir:
        return run(cache_dir)


def first_failure(results: Sequence[Any]) -> str:
    """A short description of the first failure among results, for notes."""
    for r in results:
        if isinstance(r, MinimaLlmFailure):
            return f"{r.error_type} status={r.status}: {r.message}"
    return ""


def alternate(
    reps: int, reference: Callable[[int], Timed], subject: Callable[[int], Timed]
) -> tuple[list[Timed], list[Timed]]:
    """Run reference and subject turn about, ``reps`` times each, so drift hits both alike."""
    refs: list[Timed] = []
    subs: list[Timed] = []
    for rep in range(reps):
        refs.append(reference(rep))
        subs.append(subject(rep))
    return refs, subs


def fastest(runs: Sequence[Timed]) -> Timed:
    """The run with the shortest wall time."""
    return min(runs, key=lambda t: t.elapsed_s)
