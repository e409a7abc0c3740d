"""Live requests: client throughput against a bare aiohttp client, and a latency-bound batch."""

from __future__ import annotations

import statistics
from dataclasses import dataclass
from functools import partial

from ._clients import (
    Timed,
    alternate,
    backend_config,
    bare_aiohttp,
    fastest,
    in_fresh_cache,
    make_requests,
    payloads_of,
    run_bounded,
    subject_batch,
)
from ._context import Context
from ._mock import MockProcess
from ._report import Row

WARMUP = 256
RUN_TIMEOUT_S = 120.0


@dataclass(frozen=True)
class Comparison:
    """The best reference and subject runs, and what every run said."""

    ref: Timed
    sub: Timed
    errors: int
    cpu_note: str

    def note(self, head: str) -> str:
        """The row's note: sizes, CPU per request, and any answers that were not OK."""
        parts = [head, self.cpu_note]
        if self.errors:
            parts.append(f"{self.errors} answers not OK")
        return "; ".join(parts)


def _compare(ctx: Context, mock: MockProcess, count: int, reps: int, transport: str) -> Comparison:
    """Best reference and best subject run over ``reps`` alternating pairs."""
    requests = {rep: make_requests(count, f"r{rep}") for rep in range(reps)}
    warmup = make_requests(WARMUP, "warm")

    def reference(rep: int) -> Timed:
        work = bare_aiohttp(mock.url, payloads_of(requests[rep]), payloads_of(warmup))
        return run_bounded(work, RUN_TIMEOUT_S)

    def subject(rep: int) -> Timed:
        def run(cache_dir: str) -> Timed:
            config = backend_config(mock.url, cache_dir, transport)
            return run_bounded(subject_batch(config, requests[rep], warmup), RUN_TIMEOUT_S)

        return in_fresh_cache(run)

    refs, subs = alternate(reps, reference, subject)
    ctx.log(f"  reference runs: {_runs(refs)}")
    ctx.log(f"  subject runs:   {_runs(subs)}")
    cpu_sub = statistics.median(t.cpu_us for t in subs)
    cpu_ref = statistics.median(t.cpu_us for t in refs)
    cpu_note = f"client CPU/request {cpu_sub:.0f} us vs {cpu_ref:.0f} us (median)"
    errors = sum(t.errors for t in (*refs, *subs))
    return Comparison(fastest(refs), fastest(subs), errors, cpu_note)


def _runs(runs: list[Timed]) -> str:
    return ", ".join(
        f"{t.rate:,.0f}/s ({t.elapsed_s:.2f}s, {t.cpu_us:.0f} us CPU/req)" for t in runs
    )


def throughput(ctx: Context, transport: str, floor: float) -> list[Row]:
    """Requests/s of ``run_batched`` over ``transport`` as a share of the bare client's."""
    count = 2_000 if ctx.quick else 5_000
    reps = 2 if ctx.quick else 3
    with MockProcess(cpus=ctx.mock_cpus) as mock:
        cmp = _compare(ctx, mock, count, reps, transport)
    ratio = cmp.sub.rate / cmp.ref.rate
    return [
        Row(
            f"throughput_{transport}",
            f"{cmp.sub.rate:,.0f} req/s",
            f"{cmp.ref.rate:,.0f} req/s",
            ratio,
            f"ratio >= {floor:.2f}",
            ratio >= floor and not cmp.errors,
            cmp.note(f"{count:,} requests, best of {reps}"),
        )
    ]


throughput_aiohttp = partial(throughput, transport="aiohttp", floor=0.70)
throughput_stdlib = partial(throughput, transport="stdlib", floor=0.35)
# No issue sets this one: the aiohttp transport's target, which the gateway relies on.
throughput_asyncio = partial(throughput, transport="asyncio", floor=0.70)


def latency_bound(ctx: Context) -> list[Row]:
    """Wall time of a batch against a 200 ms upstream, against the bare client's."""
    count = 640 if ctx.quick else 2_000
    reps = 1 if ctx.quick else 2
    with MockProcess("--latency-s", "0.2", cpus=ctx.mock_cpus) as mock:
        cmp = _compare(ctx, mock, count, reps, "auto")
    ratio = cmp.sub.elapsed_s / cmp.ref.elapsed_s
    return [
        Row(
            "latency_bound",
            f"{cmp.sub.elapsed_s:.2f} s",
            f"{cmp.ref.elapsed_s:.2f} s",
            ratio,
            "ratio <= 1.05",
            ratio <= 1.05 and not cmp.errors,
            cmp.note(f"{count:,} requests, 200 ms upstream, best of {reps}"),
        )
    ]
