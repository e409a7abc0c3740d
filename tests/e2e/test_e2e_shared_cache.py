"""One cache file, several writers: a batch run, the gateway, and a second gateway process."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from pathlib import Path

import openai
from _e2e_support import API_KEY, MODEL, MockControl, Service, expected_reply, user

from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmRequest,
    MinimaLlmResponse,
    MinimaLlmResult,
    OpenAIMinimaLlm,
)

TEMPERATURE = 0.0


def _run_batch(upstream: str, cache_dir: Path, prompts: list[str]) -> list[MinimaLlmResult]:
    """``run_batched`` straight against the mock, sharing the gateway's cache directory."""
    config = MinimaLlmConfig(
        base_url=upstream,
        model=MODEL,
        api_key=API_KEY,
        cache_dir=str(cache_dir),
        rpm=0,
        batch=BatchConfig(num_workers=4, heartbeat_s=0, stall_s=0),
    )
    requests = [
        MinimaLlmRequest(request_id=f"b{i}", messages=user(p), temperature=TEMPERATURE)
        for i, p in enumerate(prompts)
    ]

    async def run() -> list[MinimaLlmResult]:
        async with OpenAIMinimaLlm(config) as backend:
            return await backend.run_batched(requests)

    return asyncio.run(run())


def _ask(client: openai.OpenAI, prompt: str) -> tuple[str, str | None]:
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), temperature=TEMPERATURE
    )
    return raw.headers["x-minima-cache"], raw.parse().choices[0].message.content


def test_batch_run_then_gateway_answers_from_cache(
    gateway: Service, mock: MockControl, client: openai.OpenAI, unique: Callable[[str], str]
) -> None:
    assert gateway.cache_dir is not None
    prompts = [unique(f"batch question {i}") for i in range(6)]
    results = _run_batch(mock.url, gateway.cache_dir, prompts)
    assert all(isinstance(r, MinimaLlmResponse) and not r.cached for r in results), results
    assert mock.requests() == len(prompts)
    answers = [_ask(client, p) for p in prompts]
    assert answers == [("hit", expected_reply(p)) for p in prompts]
    assert mock.requests() == len(prompts)


def test_gateway_then_batch_run_answers_from_cache(
    gateway: Service, mock: MockControl, client: openai.OpenAI, unique: Callable[[str], str]
) -> None:
    assert gateway.cache_dir is not None
    prompts = [unique(f"gateway question {i}") for i in range(6)]
    answers = [_ask(client, p) for p in prompts]
    assert answers == [("miss", expected_reply(p)) for p in prompts]
    results = _run_batch(mock.url, gateway.cache_dir, prompts)
    assert [(type(r), getattr(r, "cached", None)) for r in results] == [
        (MinimaLlmResponse, True)
    ] * len(prompts)
    assert [r.text for r in results if isinstance(r, MinimaLlmResponse)] == [
        expected_reply(p) for p in prompts
    ]
    assert mock.requests() == len(prompts)


def test_two_gateway_processes_share_one_cache(
    gateway: Service,
    launch_gateway: Callable[..., Service],
    mock: MockControl,
    client: openai.OpenAI,
    unique: Callable[[str], str],
) -> None:
    other = launch_gateway(cache_dir=gateway.cache_dir)
    prompt = unique("asked of two gateways")
    assert _ask(client, prompt) == ("miss", expected_reply(prompt))
    with openai.OpenAI(base_url=other.url, api_key=API_KEY, max_retries=0) as second:
        assert _ask(second, prompt) == ("hit", expected_reply(prompt))
    assert mock.requests() == 1
