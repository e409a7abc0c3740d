"""Child process of the memory benchmark: run one batch, print peak RSS as JSON.

``python -m benchmarks._memory_child URL COUNT [--baseline]``; the baseline builds
the same requests and backend and sends only a warm-up batch, so the difference
is what running the batch costs.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import sys
import tempfile
import time

from minima_llm import MinimaLlmResponse, OpenAIMinimaLlm

from ._clients import backend_config, make_requests, quiet

WARMUP = 64


async def _run(url: str, cache_dir: str, count: int, baseline: bool) -> dict[str, float]:
    requests = make_requests(count, "mem")
    backend = OpenAIMinimaLlm(backend_config(url, cache_dir))
    try:
        with quiet():
            await backend.run_batched(make_requests(WARMUP, "mem-warm"))
            started = time.perf_counter()
            results = [] if baseline else await backend.run_batched(requests)
            elapsed = time.perf_counter() - started
    finally:
        await backend.aclose()
    ok = sum(isinstance(r, MinimaLlmResponse) for r in results)
    return {"requests": len(requests), "ok": ok, "elapsed_s": elapsed}


def main() -> None:
    """Parse arguments, run, print one JSON line."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks._memory_child")
    parser.add_argument("url")
    parser.add_argument("count", type=int)
    parser.add_argument("--baseline", action="store_true")
    parser.add_argument("--timeout", type=float, default=300.0)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="minima-bench-mem-") as cache_dir:
        work = _run(args.url, cache_dir, args.count, args.baseline)
        result = asyncio.run(asyncio.wait_for(work, args.timeout))
    # Linux reports ru_maxrss in KiB.
    result["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e6
    json.dump(result, sys.stdout)
    print(flush=True)


if __name__ == "__main__":
    main()
