"""Rate-limit goodput: how close to the server's advertised limits (requests, tokens) the client runs, and how politely."""

from __future__ import annotations

import time
from typing import Any

from minima_llm import MinimaLlmRequest, OpenAIMinimaLlm

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


# The token limit's run: 20,000 tokens a second from a bucket of one second, prompts
# of 25 to 1,000 tokens (the largest half the bucket), each with max_tokens.
SERVER_TPM = 1_200_000
PROMPT_CHARS = (100, 400, 1600, 4000)
MAX_TOKENS = 20


async def _batch(
    url: str, cache_dir: str, requests: list[MinimaLlmRequest]
) -> tuple[float, int, str]:
    # No warm-up: learning the limit from the first responses is part of what is measured.
    backend = OpenAIMinimaLlm(backend_config(url, cache_dir))
    try:
        timed, results = await timed_batch(backend, requests)
    finally:
        await backend.aclose()
    return timed.elapsed_s, timed.errors, first_failure(results)


def _paced_run(
    ctx: Context,
    name: str,
    mock_args: list[str],
    requests: list[MinimaLlmRequest],
    ideal: float,
    setting: str,
) -> list[Row]:
    """Wall time against ``ideal`` and the share of attempts answered 429, against one limit."""
    with MockProcess(*mock_args, cpus=ctx.mock_cpus) as mock:
        mock.reset()  # a full bucket, as a fresh server would have
        started = time.monotonic()
        elapsed, errors, failure = in_fresh_cache(
            lambda cache_dir: run_bounded(_batch(mock.url, cache_dir, requests), RUN_TIMEOUT_S)
        )
        stats: dict[str, Any] = mock.stats()
    attempts = int(stats["by_route"].get(CHAT_ROUTE, 0))
    limited = int(stats["rate_limited"])
    share = limited / attempts if attempts else 1.0
    ctx.log(
        f"  {len(requests)} requests in {elapsed:.2f}s ({time.monotonic() - started:.1f}s incl."
        f" setup), {attempts} attempts, {limited} answered 429"
    )
    failed = f"{errors} failed: {failure}" if errors else ""
    ratio = elapsed / ideal
    return [
        Row(
            f"{name}_goodput",
            f"{elapsed:.2f} s",
            f"{ideal:.2f} s (ideal)",
            ratio,
            f"ratio <= {MAX_SLOWDOWN:.2f}",
            ratio <= MAX_SLOWDOWN and not failed,
            "; ".join(filter(None, [setting, failed])),
        ),
        Row(
            f"{name}_429_share",
            f"{limited}/{attempts} = {share:.1%}",
            "0 (ideal)",
            share,
            f"share <= {MAX_429_SHARE:.0%}",
            share <= MAX_429_SHARE,
        ),
    ]


def rate_limit_goodput(ctx: Context) -> list[Row]:
    """A server limited to SERVER_RPM requests a minute, a client started with rpm=0."""
    count = 200 if ctx.quick else 400
    setting = f"{count} requests, server limit {SERVER_RPM} rpm (20/s, 1 s burst), client rpm=0"
    requests = make_requests(count, "rl")
    ideal = count / (SERVER_RPM / 60.0)
    return _paced_run(ctx, "rate_limit", ["--rpm", str(SERVER_RPM)], requests, ideal, setting)


def token_limit_goodput(ctx: Context) -> list[Row]:
    """A server limited to SERVER_TPM tokens a minute, prompts of mixed sizes, client rpm=0."""
    count = 100 if ctx.quick else 200
    requests = [
        MinimaLlmRequest(
            request_id=f"tl-{i}",
            messages=({"role": "user", "content": f"tl {i} ".ljust(size, "x")},),
            max_tokens=MAX_TOKENS,
        )
        for i, size in enumerate(PROMPT_CHARS * (count // len(PROMPT_CHARS)))
    ]
    # Charged as the mock (and OpenAI) count, less the bucket a fresh server starts with.
    charged = sum(-(-len(r.messages[0]["content"]) // 4) + MAX_TOKENS for r in requests)
    rate = SERVER_TPM / 60.0
    setting = (
        f"{len(requests)} requests of {min(PROMPT_CHARS)}-{max(PROMPT_CHARS)} characters,"
        f" {charged} tokens charged, server limit {SERVER_TPM} tpm ({rate:.0f}/s, 1 s burst),"
        " client rpm=0"
    )
    ideal = (charged - rate) / rate
    return _paced_run(ctx, "token_limit", ["--tpm", str(SERVER_TPM)], requests, ideal, setting)
