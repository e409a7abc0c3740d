"""Cached replay: a new backend answers a whole batch from the cache the first run filled."""

from __future__ import annotations

import statistics
import tempfile

from minima_llm import MinimaLlmResponse, OpenAIMinimaLlm

from ._clients import (
    Timed,
    backend_config,
    fastest,
    first_failure,
    make_requests,
    run_bounded,
    timed_batch,
)
from ._context import Context
from ._mock import MockProcess
from ._report import Row

TARGET_RATE = 25_000.0
CHAT_ROUTE = "/v1/chat/completions"
RUN_TIMEOUT_S = 120.0


async def _one_pass(cache_dir: str, url: str, count: int, expect_cached: bool) -> tuple[Timed, str]:
    backend = OpenAIMinimaLlm(backend_config(url, cache_dir))
    try:
        timed, results = await timed_batch(backend, make_requests(count, "replay"))
    finally:
        await backend.aclose()
    wrong = sum(
        not (isinstance(r, MinimaLlmResponse) and r.cached == expect_cached) for r in results
    )
    problem = f"{wrong} answers not {'cached' if expect_cached else 'live'}" if wrong else ""
    return timed, problem or first_failure(results)


def _run(t: Timed) -> str:
    return f"{t.rate:,.0f}/s ({t.elapsed_s:.2f}s, {t.cpu_us:.1f} us CPU/resp)"


def cached_replay(ctx: Context) -> list[Row]:
    """Responses/s of a replay from a warm cache; the cold (live) pass is the reference."""
    count = 5_000 if ctx.quick else 20_000
    reps = 2 if ctx.quick else 7
    problems: list[str] = []
    with tempfile.TemporaryDirectory(prefix="minima-bench-") as cache_dir:
        with MockProcess(cpus=ctx.mock_cpus) as mock:
            cold, problem = run_bounded(_one_pass(cache_dir, mock.url, count, False), RUN_TIMEOUT_S)
            problems.append(problem)
            ctx.log(f"  cold pass: {_run(cold)}")
            # The mock stays up but must not be asked: a replay that goes live fails the check.
            replays: list[Timed] = []
            for _ in range(reps):
                timed, problem = run_bounded(
                    _one_pass(cache_dir, mock.url, count, True), RUN_TIMEOUT_S
                )
                replays.append(timed)
                problems.append(problem)
            asked = mock.stats()["by_route"].get(CHAT_ROUTE, 0)
        ctx.log("  replays: " + ", ".join(_run(t) for t in replays))
    best = fastest(replays)
    cpu = statistics.median(t.cpu_us for t in replays)
    note = "; ".join(p for p in problems if p)
    if asked != count:
        note = f"mock saw {asked} requests, expected {count} (replay went live); {note}"
    return [
        Row(
            "cached_replay",
            f"{best.rate:,.0f} resp/s",
            f"{cold.rate:,.0f} resp/s (cold)",
            best.rate / cold.rate,
            f">= {TARGET_RATE:,.0f} resp/s",
            best.rate >= TARGET_RATE and not note,
            (
                f"{count:,} requests, new backend per replay, best of {reps}; "
                f"client CPU/response {cpu:.1f} us (median), i.e. {1e6 / cpu:,.0f}/s if CPU-bound; "
                + note
            ).rstrip("; "),
        )
    ]
