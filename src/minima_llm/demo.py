"""``minima-llm demo``: a batch against the embedded mock endpoint, then its cached replay."""

from __future__ import annotations

import asyncio
import shutil
import signal
import tempfile
import time
from collections.abc import Awaitable
from dataclasses import dataclass
from typing import TextIO, TypeVar

from .backend import OpenAIMinimaLlm
from .config import BatchConfig, MinimaLlmConfig
from .errors import MinimaLlmError
from .types import MinimaLlmFailure, MinimaLlmRequest

T = TypeVar("T")


class DemoAborted(MinimaLlmError):
    """A pass stopped early: more failures than the batch allows (``--failure-rate`` near 1)."""


@dataclass(frozen=True)
class DemoOptions:
    """What the demo runs."""

    requests: int = 3000
    cache_dir: str | None = None
    transport: str = "auto"
    latency_s: float = 0.005
    failure_rate: float = 0.01
    workers: int = 64


@dataclass(frozen=True)
class PassResult:
    """One pass over the batch."""

    name: str
    wall_s: float
    hits: int
    live: int
    failures: int
    upstream_requests: int


def run_demo(options: DemoOptions, out: TextIO) -> list[PassResult]:
    """Start the mock server, run the batch cold, replay it warm, print a summary."""
    from .testing import MockConfig, run_mock_server_in_thread

    mock = MockConfig(latency_s=options.latency_s, failure_rate=options.failure_rate, seed=7)
    # Made after the options are checked, and removed whenever it was made here.
    temporary = not options.cache_dir
    cache_dir = options.cache_dir or tempfile.mkdtemp(prefix="minima-llm-demo-")
    results: list[PassResult] = []
    try:
        with run_mock_server_in_thread(mock) as server:
            config = MinimaLlmConfig(
                base_url=server.url,
                model="mock-model",
                cache_dir=cache_dir,
                rpm=0,
                max_outstanding=options.workers,
                transport=options.transport,
                base_backoff_s=0.05,
                max_backoff_s=1.0,
                batch=BatchConfig(num_workers=options.workers, heartbeat_s=1.0),
            )
            out.write(
                f"mock endpoint {server.url} (latency {options.latency_s * 1000:.0f} ms, {options.failure_rate:.0%} injected 500s)\n"
            )
            out.write(f"SQLite cache  {config.cache_path}\n\n")
            requests = _requests(options.requests)
            for name in ("cold run", "cached replay"):
                before = server.stats()["requests"]
                results.append(asyncio.run(_terminable(_one_pass(name, config, requests, out))))
                results[-1] = _with_upstream(results[-1], server.stats()["requests"] - before)
    finally:
        if temporary:
            shutil.rmtree(cache_dir, ignore_errors=True)
    _print_summary(results, options.requests, out)
    return results


def _requests(n: int) -> list[MinimaLlmRequest]:
    topics = ("rivers", "prime numbers", "volcanoes", "sorting", "tides", "bees", "glaciers")
    return [
        MinimaLlmRequest(
            request_id=f"q{i}",
            messages=[
                {
                    "role": "user",
                    "content": f"Question {i}: one fact about {topics[i % len(topics)]}",
                }
            ],
            temperature=0.0,
        )
        for i in range(n)
    ]


async def _terminable(work: Awaitable[T]) -> T:
    """``work``, with SIGTERM cancelling it as ``asyncio.run`` does for Ctrl-C.

    The CLI's own SIGTERM handler raises SystemExit wherever the main thread is, which
    on a running loop is inside some task of aiohttp's: that task ended with it, and
    its exception was printed as never retrieved. Cancelled here, the batch unwinds
    through its awaits, and SystemExit(143) is raised from this one task.
    """
    loop = asyncio.get_running_loop()
    task = asyncio.current_task()
    terminated = False

    def on_sigterm() -> None:
        nonlocal terminated
        terminated = True
        if task is not None:
            task.cancel()

    previous = signal.getsignal(signal.SIGTERM)
    try:
        loop.add_signal_handler(signal.SIGTERM, on_sigterm)
    except (NotImplementedError, RuntimeError, ValueError):  # Windows, or not the main thread
        return await work
    try:
        return await work
    except asyncio.CancelledError:
        if terminated:
            raise SystemExit(128 + signal.SIGTERM) from None
        raise
    finally:
        loop.remove_signal_handler(signal.SIGTERM)
        # remove_signal_handler leaves SIG_DFL behind; the CLI's handler goes back.
        signal.signal(signal.SIGTERM, previous)


async def _one_pass(
    name: str, config: MinimaLlmConfig, requests: list[MinimaLlmRequest], out: TextIO
) -> PassResult:
    out.write(f"== {name}: {len(requests)} requests\n")
    out.flush()
    backend = OpenAIMinimaLlm(config)
    started = time.perf_counter()
    try:
        results = await backend.run_batched(requests)
    except RuntimeError as exc:
        # How the runner stops a batch past max_failures (as minima-llm 0.2.x does); it has
        # already printed the recent failures, so the first line is enough here.
        first_line = str(exc).splitlines()[0].removesuffix(" Recent failures:")
        raise DemoAborted(first_line) from exc
    finally:
        await backend.aclose()
    wall = time.perf_counter() - started
    snap = backend.snapshot()
    failures = sum(isinstance(r, MinimaLlmFailure) for r in results)
    out.write(
        f"   {wall:.2f}s, {snap.hits} cache hits, {snap.live_calls} live calls, {snap.retries} retries, {failures} failures\n\n"
    )
    return PassResult(name, wall, snap.hits, snap.live_calls, failures, 0)


def _with_upstream(result: PassResult, upstream: int) -> PassResult:
    return PassResult(
        result.name, result.wall_s, result.hits, result.live, result.failures, upstream
    )


def _print_summary(results: list[PassResult], n: int, out: TextIO) -> None:
    out.write(
        f"{'pass':<14} {'requests':>8} {'live':>6} {'hits':>6} {'failed':>6} {'upstream':>8} {'wall s':>7} {'req/s':>8}\n"
    )
    for r in results:
        rate = n / r.wall_s if r.wall_s else 0.0
        out.write(
            f"{r.name:<14} {n:>8} {r.live:>6} {r.hits:>6} {r.failures:>6} {r.upstream_requests:>8} {r.wall_s:>7.2f} {rate:>8.0f}\n"
        )
    out.flush()
