"""Batch mode's side of the backend: cache misses sent as provider jobs, their answers handed out."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING

from .calls import CHAT, Call, payload_of, response_of, store_answer
from .clock import Clock
from .jobs import LineFailure, Outcome, ProviderJobs, split
from .stats import LiveStats
from .types import MinimaLlmFailure, MinimaLlmResult, Usage
from .upstream import Completion

if TYPE_CHECKING:
    from .backend import OpenAIMinimaLlm

log = logging.getLogger("minima_llm")


async def send_jobs(
    provider: ProviderJobs,
    groups: Mapping[str, Mapping[str, tuple[OpenAIMinimaLlm, Call]]],
    refresh: bool,
    report: Callable[[str], None] | None,
) -> dict[str, Outcome]:
    """Send each model's calls (key -> backend and call) as provider jobs; each key's outcome."""
    runs = [
        _run_split(provider, CHAT, model, calls, refresh, report)
        for model, calls in groups.items()
        if calls
    ]
    answered: dict[str, Outcome] = {}
    for outcomes in await asyncio.gather(*runs):
        answered.update(outcomes)
    return answered


def job_result(
    stats: LiveStats,
    clock: Clock,
    call: Call,
    outcome: Outcome,
    started: float,
    shared: bool = False,
) -> MinimaLlmResult:
    """A provider job's outcome as this call's answer (already cached) or failure.

    ``shared``: an earlier request of the batch took this answer; this one's tokens
    were not spent again.
    """
    latency = clock.monotonic() - started
    if isinstance(outcome, LineFailure):
        stats.failures += 1
        return MinimaLlmFailure(
            request_id=call.request.request_id,
            error_type=outcome.error_type,
            message=outcome.message,
            attempts=1,
            status=outcome.status,
            body_snippet=outcome.snippet,
            attempt_timestamps=(started,),
        )
    usage = Usage.from_body(outcome.body)
    if shared:
        stats.coalesced += 1
        return response_of(call, outcome, usage, latency, "inflight")
    stats.live(usage, latency)
    return response_of(call, outcome, usage, latency)


async def run_collected(
    endpoint: str,
    model: str,
    items: Mapping[str, tuple[OpenAIMinimaLlm, Call]],
    fresh: bool = False,
    report: Callable[[str], None] | None = None,
) -> dict[str, Outcome]:
    """Provider jobs over ``items`` (key -> backend and call); answers are cached before return.

    A function, not a method: the collector keeps it, and a bound method would tie
    the backend into a cycle with its own collector.
    """
    if not items:
        return {}
    jobs = next(iter(items.values()))[0].jobs
    assert jobs is not None  # only batch-mode backends make jobs
    return await _run_split(jobs, endpoint, model, items, fresh, report)


async def _run_split(
    provider: ProviderJobs,
    endpoint: str,
    model: str,
    items: Mapping[str, tuple[OpenAIMinimaLlm, Call]],
    fresh: bool,
    report: Callable[[str], None] | None,
) -> dict[str, Outcome]:
    """``items`` in as many jobs as the provider's limits on lines and bytes of one need.

    The collector counts only lines (a job of ``num_workers`` long prompts can pass
    the provider's file size limit, which refuses it whole), so the bytes are
    counted here, for ``run_batched``'s jobs and the collector's alike.
    """
    parts = [
        dict(part)
        for part in split(list(items.items()), provider.max_lines, provider.max_bytes, _line_size)
    ]
    runs = [_run_job(endpoint, model, part, fresh, report) for part in parts]
    answered: dict[str, Outcome] = {}
    for part, outcomes in zip(
        parts, await asyncio.gather(*runs, return_exceptions=True), strict=True
    ):
        if isinstance(outcomes, BaseException):
            if not isinstance(outcomes, Exception):
                raise outcomes
            # One job's trouble (a bug, a full disk) must not cost the batch its other answers.
            log.error("batch job failed: %s", outcomes, exc_info=outcomes)
            failure = LineFailure(type(outcomes).__name__, str(outcomes))
            outcomes = dict.fromkeys(part, failure)
        answered.update(outcomes)
    return answered


async def _run_job(
    endpoint: str,
    model: str,
    items: Mapping[str, tuple[OpenAIMinimaLlm, Call]],
    fresh: bool,
    report: Callable[[str], None] | None,
) -> dict[str, Outcome]:
    """One provider job over ``items``; answers are cached before return."""
    backend = next(iter(items.values()))[0]
    jobs = backend.jobs
    assert jobs is not None  # only batch-mode backends make jobs
    bodies = {
        key: call.payload or payload_of(call.request, call.model, call.endpoint)
        for key, (_, call) in items.items()
    }

    async def store(outcomes: dict[str, Outcome]) -> bool:
        # Written before anyone gets an answer, in one commit: the writes share it. Only a
        # job whose answers all reached the cache may count as collected; else a rerun
        # takes its (free) output again rather than paying for a new job.
        stored = await asyncio.gather(
            *(
                store_answer(backend.cache, backend.stats, call, outcome.text, outcome.body_text)
                for key, (_, call) in items.items()
                if isinstance(outcome := outcomes.get(key), Completion)
            )
        )
        return all(stored)

    async def cached(keys: list[str]) -> set[str]:
        try:
            rows = await backend.cache.prefetch(keys)
        except Exception:
            return set()  # unknown: the job just stays open to a later run
        return {key for key, row in rows.items() if row is not None}

    return await jobs.run(
        endpoint, model, bodies, report=report, store=store, fresh=fresh, cached=cached
    )


def _line_size(item: tuple[str, tuple[OpenAIMinimaLlm, Call]]) -> int:
    # The key's canonical JSON holds the messages the body does, plus room for the line's fields.
    return len(item[1][1].canonical) + 200
