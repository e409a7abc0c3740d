"""``python -m benchmarks [--only NAME] [--quick]``: run the suite, print the table, write the doc."""

from __future__ import annotations

import argparse
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path

from ._context import Context
from ._mock import pin_cores
from ._report import Row, error_row, machine, notes, text_table, write_markdown
from .dspy_rows import dspy_batch
from .gateway import (
    gateway_cache_hits,
    gateway_latency,
    gateway_streams,
    gateway_throughput,
    gateway_ttft,
)
from .live import latency_bound, throughput_aiohttp, throughput_asyncio, throughput_stdlib
from .memory import memory_100k
from .ratelimit import rate_limit_goodput, token_limit_goodput
from .replay import cached_replay

Benchmark = Callable[[Context], list[Row]]

BENCHMARKS: dict[str, Benchmark] = {
    "throughput_aiohttp": throughput_aiohttp,
    "throughput_stdlib": throughput_stdlib,
    "throughput_asyncio": throughput_asyncio,
    "latency_bound": latency_bound,
    "cached_replay": cached_replay,
    "rate_limit_goodput": rate_limit_goodput,
    "token_limit_goodput": token_limit_goodput,
    "memory_100k": memory_100k,
    "gateway_throughput": gateway_throughput,
    "gateway_cache_hits": gateway_cache_hits,
    "gateway_latency": gateway_latency,
    "gateway_ttft": gateway_ttft,
    "gateway_streams": gateway_streams,
    "dspy_batch": dspy_batch,
}
DOC = Path(__file__).resolve().parent.parent / "docs" / "benchmarks.md"

METHOD = """
- The mock server (`python -m minima_llm.testing --port 0 ...`) runs in a separate
  process, a new one per benchmark. With two or more CPUs it is pinned to the last
  one and the benchmark process (client, its threads, the memory child) to the
  others, so client and server never compete for a core (`--no-pin` turns this off).
- Every ratio compares against a reference measured in the same run, on the same mock:
  a bare aiohttp client (one `ClientSession`, 64 tasks each POSTing and reading
  `await resp.json()`) for throughput and latency; the cold, live pass for cached
  replay (its target is absolute); `count / server rate` for rate-limit goodput (the
  server also allows a 1 s burst, so a perfect client can beat the ideal by ~5%);
  the tokens charged, less the 1 s bucket a fresh server starts with, over the token
  rate for token-limit goodput; a
  child process that builds the same requests and backend but does not run the batch
  for memory (its target is absolute).
- Gateway latency and time to first token send one request at a time, taking turns
  between the mock and the gateway, so both sides see the same moment of the machine.
- Reference and subject runs alternate and the fastest of each is reported. Both warm
  their connections (256 requests, untimed) before the timed run, except the rate- and
  token-limit runs, where learning the server's limit is part of what is measured.
- The subject is `OpenAIMinimaLlm(MinimaLlmConfig(rpm=0, max_outstanding=64,
  batch=BatchConfig(num_workers=64)))` with a fresh temporary `cache_dir` for every
  run; the timed region is one whole `await backend.run_batched(requests)` (cache keys,
  prefetch, workers, cache writes). Requests are distinct, so live runs are cache misses.
  `auto` transport resolves to aiohttp (installed); the gateway's `auto` to asyncio.
- "client CPU/request" (in the notes) is the benchmark process's CPU time, all threads,
  over the timed region divided by requests: it moves much less than wall-clock rates
  when other work shares the machine. When the client, not the mock, is the
  bottleneck, the throughput ratio tends towards the inverse of the CPU ratio.
- Wall-clock numbers move with whatever else runs on the machine (see the load average
  above): a busy machine starves the mock as much as the client and pushes throughput
  ratios towards 1. Compare CPU/request across runs, and re-run before trusting a
  small change in a ratio.
- Every run and wait is bounded by a timeout, and the mock process is terminated (then
  killed) when a benchmark ends, whatever happened.
"""


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    """Command-line options."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description=__doc__)
    parser.add_argument(
        "--only",
        action="append",
        choices=sorted(BENCHMARKS),
        metavar="NAME",
        help=f"run only this benchmark (repeatable): {', '.join(BENCHMARKS)}",
    )
    parser.add_argument(
        "--quick", action="store_true", help="smaller batches and fewer repetitions"
    )
    parser.add_argument(
        "--output",
        type=Path,
        default=None,
        help="where to write the Markdown report (default: docs/benchmarks.md for a full run; "
        "a partial run with --only or --quick writes nothing unless this is given)",
    )
    parser.add_argument(
        "--no-pin", action="store_true", help="do not pin client and mock to separate CPUs"
    )
    return parser.parse_args(argv)


def run(names: Sequence[str], ctx: Context) -> list[Row]:
    """Run the named benchmarks in order; one that raises becomes an ERROR row."""
    rows: list[Row] = []
    for name in names:
        ctx.log(f"{name} ...")
        started = time.monotonic()
        try:
            got = BENCHMARKS[name](ctx)
        except Exception as exc:
            got = [error_row(name, exc)]
        for row in got:
            ctx.log(f"  {row.name}: {row.measured} vs {row.reference} -> {row.verdict}")
        ctx.log(f"  ({time.monotonic() - started:.1f}s)")
        rows += got
    return rows


def _loadavg() -> str:
    # Other work on the machine shows up in every number; say how busy it was.
    try:
        return f"{os.getloadavg()[0]:.2f}"
    except OSError:
        return "?"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the suite; exit status 1 when any target fails or errors."""
    args = parse_args(argv)
    names = [n for n in BENCHMARKS if not args.only or n in args.only]
    ctx = Context(quick=args.quick)
    info = machine()  # before pinning, so it shows what the machine has
    load_before = _loadavg()
    split = None if args.no_pin else pin_cores()
    if split is not None:
        client_cpus, ctx.mock_cpus = split
        ctx.all_cpus = client_cpus | ctx.mock_cpus
        os.sched_setaffinity(0, client_cpus)
    rows = run(names, ctx)
    print()
    print(text_table(rows))
    for line in notes(rows):
        print(f"  {line}")
    output = args.output or (None if (args.only or args.quick) else DOC)
    if output is not None:
        command = shlex.join(["python", "-m", "benchmarks", *sys.argv[1:]])
        info["pinning"] = (
            f"client on CPUs {sorted(split[0])}, mock on CPUs {sorted(split[1])}"
            if split
            else "none"
        )
        info["suite wall time"] = f"{time.monotonic() - ctx.started:.0f} s"
        info["load average (1 min) before / after"] = f"{load_before} / {_loadavg()}"
        write_markdown(output, rows, command, info, METHOD)
        print(f"\nwrote {output}")
    return 0 if all(row.passed for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
