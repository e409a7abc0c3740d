"""Rate-limit goodput: how close to the server's advertised limit the client runs, and how politely."""

from __future__ import annotations

import time
from typing import Any

from minima_llm import OpenAIMinimaLlm

from ._clients import (
    backend_config,
    first_failure,
    in_fresh_cache,
    make_requests,
    run_bounded,
    timed_batch,
)
from ._context import Context
from ._mock import MockProcess
from ._report import Row

SERVER_RPM = 1200
CHAT_ROUTE = "/v1/chat/completions"
MAX_429_SHARE = 0.03
MAX_SLOWDOWN = 1.10
RUN_TIMEOUT_S = 120.0


async def _batch(url: str, cache_dir: str, count: int) -> tuple[float, int, str]:
    # No warm-up: learning the limit from the first responses is part of what is measured.
    backend = OpenAIMinimaLlm(backend_config(url, cache_dir))
    try:
        timed, results = await timed_batch(backend, make_requests(count, "rl"))
    finally:
        await backend.aclose()
    return timed.elapsed_s, timed.errors, first_failure(results)


def rate_limit_goodput(ctx: Context) -> list[Row]:
    """Wall time against ``count / rate`` and the share of attempts answered 429."""
    count = 200 if ctx.quick else 400
    ideal = count / (SERVER_RPM / 60.0)
    with MockProcess("--rpm", str(SERVER_RPM), cpus=ctx.mock_cpus) as mock:
        mock.reset()  # a full bucket, as a fresh server would have
        started = time.monotonic()
        elapsed, errors, failure = in_fresh_cache(
            lambda cache_dir: run_bounded(_batch(mock.url, cache_dir, count), RUN_TIMEOUT_S)
        )
        stats: dict[str, Any] = mock.stats()
    attempts = int(stats["by_route"].get(CHAT_ROUTE, 0))
    limited = int(stats["rate_limited"])
    share = limited / attempts if attempts else 1.0
    ctx.log(
        f"  {count} requests in {elapsed:.2f}s ({time.monotonic() - started:.1f}s incl. setup), "
        f"{attempts} attempts, {limited} answered 429"
    )
    note = f"{errors} failed: {failure}" if errors else ""
    ratio = elapsed / ideal
    return [
        Row(
            "rate_limit_goodput",
            f"{elapsed:.2f} s",
            f"{ideal:.2f} s (ideal)",
            ratio,
            f"ratio <= {MAX_SLOWDOWN:.2f}",
            ratio <= MAX_SLOWDOWN and not note,
            (
                f"{count} requests, server limit {SERVER_RPM} rpm (20/s, 1 s burst), client rpm=0; "
                + note
            ).rstrip("; "),
        ),
        Row(
            "rate_limit_429_share",
            f"{limited}/{attempts} = {share:.1%}",
            "0 (ideal)",
            share,
            f"share <= {MAX_429_SHARE:.0%}",
            share <= MAX_429_SHARE,
        ),
    ]
