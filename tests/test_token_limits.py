"""A server with a per-minute token limit (OpenAI's TPM): paced by tokens, large prompts included."""

from __future__ import annotations

import asyncio
import io
import random

from backend_support import BackendFactory, req
from minima_llm import BatchConfig, MinimaLlmFailure, MinimaLlmResponse
from minima_llm.testing import MockServer


def mixed_prompts(n: int, seed: int = 7) -> list[str]:
    """Prompts of 50 to 1,600 tokens, the largest most of what the mock's bucket holds."""
    rng = random.Random(seed)
    return [f"q{i} " + "word " * (rng.choice([40, 160, 640, 1280]) * 5 // 4) for i in range(n)]


async def test_a_token_limit_paces_a_batch_of_mixed_prompts_without_refusals(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # 20,000 tokens a second, a bucket of one second: before, every request went at once,
    # the small ones took each refill and the largest were refused again and again.
    mock.update_config(tpm=1_200_000)
    backend = make_backend(max_outstanding=64, rpm=0)
    prompts = mixed_prompts(80)
    requests = [req(i, text, max_tokens=20 if i % 2 else None) for i, text in enumerate(prompts)]
    results = await asyncio.gather(*(backend.generate(r) for r in requests))
    assert all(isinstance(r, MinimaLlmResponse) for r in results)
    stats = mock.stats()
    # The first wave goes before any answer states the limit; what follows is paced.
    assert stats["rate_limited"] <= 0.1 * stats["requests"], stats
    tokens = backend.upstream.tokens
    assert tokens.limit == 1_200_000 and tokens.waits > 0
    assert (
        backend.upstream.pacer.learned_rpm is None
    )  # token refusals say nothing of a request rate


async def test_a_request_larger_than_the_token_limit_fails_at_once(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # OpenAI answers 429 "Request too large ... on tokens per min": no wait would admit it.
    mock.update_config(tpm=6000)  # a bucket of 100 tokens
    backend = make_backend(max_attempts=5)
    result = await backend.generate(req(1, "word " * 400))
    assert isinstance(result, MinimaLlmFailure), result
    assert result.status == 429 and result.attempts == 1
    assert result.upstream_error is not None
    assert str(result.upstream_error["message"]).startswith("Request too large for mock-model")
    assert mock.stats()["requests"] == 1


async def test_the_heartbeat_and_the_snapshot_say_which_limit_paces_the_batch(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # Without it a batch slowed by the server's limit looked like a slow server.
    mock.update_config(tpm=600_000, rpm=6000)
    batch = BatchConfig(num_workers=8, heartbeat_s=0.05, stall_s=0)
    backend = make_backend(batch=batch)
    assert backend.snapshot().pace is None  # nothing stated yet
    stream = io.StringIO()
    prompts = [req(i, "word " * 2000, max_tokens=10) for i in range(20)]  # 2,510 tokens each
    results = await backend.run_batched(prompts, progress=stream)
    assert all(isinstance(r, MinimaLlmResponse) for r in results)
    pace = "6000 requests/min (server), 600000 tokens/min (server)"
    assert backend.snapshot().pace == pace
    assert backend.snapshot().as_dict()["pace"] == pace
    assert f"| paced at {pace}" in stream.getvalue()


async def test_streams_are_paced_and_token_refusals_never_escalate_the_cooldown(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # Streams wait for their tokens like whole answers; a token 429 is retried at its
    # paced turn, not behind a doubled pause shared by every request.
    mock.update_config(tpm=1_200_000)
    backend = make_backend(max_outstanding=64, rpm=0)

    async def streamed(i: int, text: str) -> str:
        pieces = [c async for c in backend.stream(req(i, text, max_tokens=20))]
        return "".join(
            (choice.get("delta") or {}).get("content") or ""
            for chunk in pieces
            for choice in chunk.get("choices", ())
        )

    texts = await asyncio.gather(*(streamed(i, t) for i, t in enumerate(mixed_prompts(60))))
    assert all(text.startswith("mock reply:") for text in texts)
    stats = mock.stats()
    assert stats["rate_limited"] <= 0.1 * stats["requests"], stats
    upstream = backend.upstream
    assert upstream.tokens.waits > 0 and upstream.cooldown.bumps == 0
