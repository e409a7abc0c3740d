"""Gateway overhead: the same bare load generator straight to the mock and through the gateway."""

from __future__ import annotations

import functools
import os
from collections.abc import Callable

from ._context import Context
from ._gateway_proc import GatewayProcess, RelayProcess
from ._loadgen import Load, payloads, run, run_alternating
from ._mock import MockProcess, process_cpu_s
from ._report import Row

TIMEOUT_S = 180.0
# The load generator, the gateway and the mock share two cores here, so none is pinned:
# each benchmark runs unpinned, as do the servers it starts.
# Each also measures a bare aiohttp relay (benchmarks._relay) the same way, so the notes
# show what the HTTP stack alone costs on this machine in this run.


def _best(loads: list[Load]) -> Load:
    return max(loads, key=lambda load: load.rate)


def _cpu_us(pids: dict[str, int], run_once: Callable[[], Load], count: int) -> tuple[Load, str]:
    """One run, and the CPU per request each of ``pids`` spent on it."""
    before = {name: process_cpu_s(pid) for name, pid in pids.items()}
    load = run_once()
    spent = ", ".join(
        f"{name} {(process_cpu_s(pid) - before[name]) / count * 1e6:.0f}"
        for name, pid in pids.items()
    )
    return load, spent


def gateway_throughput(ctx: Context) -> list[Row]:
    """Cache misses at concurrency 64 through the gateway, as a share of straight to the mock."""
    count, reps = (1_500, 2) if ctx.quick else (4_000, 3)
    direct: list[Load] = []
    through: list[Load] = []
    relayed: list[Load] = []
    spent: dict[str, list[str]] = {"direct": [], "gateway": [], "relay": []}
    with (
        ctx.unpinned(),
        MockProcess() as mock,
        GatewayProcess(mock.url) as gateway,
        RelayProcess(mock.url) as relay,
    ):
        for url in (mock.url, gateway.url, relay.url):
            run(url, payloads(256), 64, TIMEOUT_S)

        ends = {"mock": mock.pid, "load generator": os.getpid()}
        for _ in range(reps):
            for name, url, loads, pids in (
                ("direct", mock.url, direct, ends),
                ("gateway", gateway.url, through, {"gateway": gateway.pid, **ends}),
                ("relay", relay.url, relayed, {"relay": relay.pid, **ends}),
            ):
                load, cpu = _cpu_us(
                    pids, functools.partial(run, url, payloads(count), 64, TIMEOUT_S), count
                )
                loads.append(load)
                spent[name].append(cpu)
    ref, sub, floor = _best(direct), _best(through), _best(relayed)
    ctx.log(
        f"  direct {[round(d.rate) for d in direct]}/s, gateway {[round(t.rate) for t in through]}/s, "
        f"relay {[round(r.rate) for r in relayed]}/s"
    )
    # CPU per request of each process in the fastest run of each kind: where the time goes.
    cpu_note = (
        f"CPU us/request through the gateway: {spent['gateway'][through.index(sub)]}; "
        f"direct: {spent['direct'][direct.index(ref)]}; "
        f"through the relay: {spent['relay'][relayed.index(floor)]}"
    )
    ratio = sub.rate / ref.rate
    errors = sum(x.errors for x in (*direct, *through, *relayed))
    return [
        Row(
            "gateway_throughput",
            f"{sub.rate:,.0f} req/s",
            f"{ref.rate:,.0f} req/s (direct)",
            ratio,
            "ratio >= 0.45",
            ratio >= 0.45 and not errors,
            f"{count:,} distinct requests, concurrency 64, best of {reps}; {errors} errors; "
            f"a bare aiohttp relay: {floor.rate:,.0f} req/s, ratio {floor.rate / ref.rate:.3f}; "
            + cpu_note,
        )
    ]


def gateway_cache_hits(ctx: Context) -> list[Row]:
    """Requests per second answered from the gateway's cache."""
    count, reps = (2_000, 2) if ctx.quick else (5_000, 3)
    bodies = payloads(count)
    with ctx.unpinned(), MockProcess() as mock, GatewayProcess(mock.url) as gateway:
        run(gateway.url, bodies, 64, TIMEOUT_S)  # fills the cache
        before = mock.stats()["requests"]
        loads = [run(gateway.url, bodies, 64, TIMEOUT_S) for _ in range(reps)]
        upstream = mock.stats()["requests"] - before
    best = _best(loads)
    errors = sum(x.errors for x in loads)
    return [
        Row(
            "gateway_cache_hits",
            f"{best.rate:,.0f} req/s",
            "-",
            None,
            ">= 3,000 req/s",
            best.rate >= 3_000 and not errors and upstream == 0,
            f"{count:,} cached requests, concurrency 64, best of {reps}; "
            f"{upstream} upstream calls during replay; {errors} errors",
        )
    ]


def _taking_turns(ctx: Context, count: int, warmup: int, stream: bool) -> list[Load]:
    """``count`` requests one at a time to the mock, the gateway and the relay, taking turns."""
    with (
        ctx.unpinned(),
        MockProcess() as mock,
        GatewayProcess(mock.url) as gateway,
        RelayProcess(mock.url) as relay,
    ):
        urls = (mock.url, gateway.url, relay.url)
        for url in urls:
            run(url, payloads(warmup, stream=stream), 1, TIMEOUT_S)
        bodies = [payloads(count, stream=stream) for _ in urls]
        return run_alternating(urls, bodies, TIMEOUT_S)


def gateway_latency(ctx: Context) -> list[Row]:
    """Latency added by the gateway at concurrency 1 (cache misses), p50 and p99."""
    count = 500 if ctx.quick else 2_000
    direct, through, relayed = _taking_turns(ctx, count, warmup=100, stream=False)
    rows = []
    for q, limit_ms in ((50, 1.0), (99, 3.0)):
        added = (through.percentile(q) - direct.percentile(q)) * 1000
        floor = (relayed.percentile(q) - direct.percentile(q)) * 1000
        rows.append(
            Row(
                f"gateway_added_p{q}",
                f"{added:.2f} ms",
                f"{direct.percentile(q) * 1000:.2f} ms (direct p{q})",
                None,
                f"< {limit_ms:.0f} ms",
                added < limit_ms,
                f"{count:,} requests each way, one at a time, taking turns; through p{q} "
                f"{through.percentile(q) * 1000:.2f} ms; a bare aiohttp relay adds {floor:.2f} ms",
            )
        )
    return rows


def gateway_ttft(ctx: Context) -> list[Row]:
    """Time to the first content chunk of a stream, through the gateway minus direct."""
    count = 200 if ctx.quick else 1_000
    direct, through, relayed = _taking_turns(ctx, count, warmup=50, stream=True)
    added = (through.median_ttft_s - direct.median_ttft_s) * 1000
    floor = (relayed.median_ttft_s - direct.median_ttft_s) * 1000
    return [
        Row(
            "gateway_ttft",
            f"+{added:.2f} ms",
            f"{direct.median_ttft_s * 1000:.2f} ms (direct median)",
            None,
            "<= 1 ms added",
            added <= 1.0 and len(through.first_token_s) == count,
            f"{count:,} streams each way, one at a time, taking turns (median time to first "
            f"content chunk); a bare aiohttp relay adds {floor:.2f} ms",
        )
    ]


def gateway_streams(ctx: Context) -> list[Row]:
    """1,000 streaming connections open at once through the gateway: no errors, bounded memory."""
    count = 300 if ctx.quick else 1_000
    # 40 chunks 50 ms apart: every stream stays open about two seconds, so they overlap.
    with (
        ctx.unpinned(),
        MockProcess("--stream-chunk-delay-s", "0.05") as mock,
        GatewayProcess(mock.url, max_outstanding=count + 24) as gateway,
    ):
        bodies = payloads(count, stream=True)
        for body in bodies:
            body["messages"][0]["content"] += " " + " ".join(["word"] * 36)
        load = run(gateway.url, bodies, count, TIMEOUT_S)
        peak = mock.stats()["peak_concurrency"]
        rss = gateway.peak_rss_mb()
    ok = load.errors == 0 and len(load.first_token_s) == count and rss < 250
    return [
        Row(
            "gateway_streams_1000",
            f"{rss:.0f} MB peak RSS",
            f"{peak} streams open upstream at once",
            None,
            f"{count:,} streams, 0 errors, < 250 MB",
            ok,
            f"{count:,} concurrent streams of ~2 s; {load.errors} errors; "
            f"{len(load.first_token_s)} streams delivered content; wall {load.elapsed_s:.1f} s",
        )
    ]
