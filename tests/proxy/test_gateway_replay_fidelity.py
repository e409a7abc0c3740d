"""Through the gateway, a cached answer carries the original's provider fields, whole or streamed.

The upstream is a scripted aiohttp server on 127.0.0.1: the mock sends neither
Azure's ``prompt_filter_results`` nor vLLM's ``"tool_calls": []``.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from gateway_harness import chunks_of, serve

from scripted_upstream import ScriptedUpstream, assemble, serving

FILTERS = [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}]
HEAD = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 5, "model": "m"}
# Azure's stream: a first chunk of its own (no choices, blank id) with the prompt's filter results.
AZURE = [
    {
        "id": "",
        "object": "",
        "created": 0,
        "model": "",
        "choices": [],
        "prompt_filter_results": FILTERS,
    },
    {**HEAD, "choices": [{"index": 0, "delta": {"role": "assistant", "content": "hi"}}]},
    {**HEAD, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]},
]
VLLM = {
    "id": "chatcmpl-v",
    "object": "chat.completion",
    "created": 5,
    "model": "m",
    "choices": [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "hi", "tool_calls": []},
            "logprobs": None,
            "finish_reason": "stop",
            "stop_reason": None,
        }
    ],
    "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2},
    "prompt_logprobs": None,
}


@pytest.fixture
async def upstream_url() -> AsyncIterator[str]:
    # vLLM's whole answer to "plain", Azure's stream for "filtered".
    async with serving(ScriptedUpstream({"plain": VLLM}, {"filtered": AZURE})) as scripted:
        yield scripted.url


async def test_azure_filter_results_of_a_stream_survive_both_replays(
    upstream_url: str, tmp_path: Path
) -> None:
    async with serve(upstream_url, tmp_path) as gw:
        live = await gw.chat("filtered", stream=True)
        whole = await gw.chat("filtered")
        replayed = await gw.chat("filtered", stream=True)
    assert (live.cache, whole.cache, replayed.cache) == ("miss", "hit", "hit")
    assert whole.json()["prompt_filter_results"] == FILTERS
    assert (
        assemble(chunks_of(replayed.events())) == assemble(chunks_of(live.events())) == whole.json()
    )


async def test_a_vllm_answer_replayed_as_a_stream_assembles_to_itself(
    upstream_url: str, tmp_path: Path
) -> None:
    async with serve(upstream_url, tmp_path) as gw:
        whole = await gw.chat("plain")
        replayed = await gw.chat("plain", stream=True, stream_options={"include_usage": True})
    assert (whole.cache, replayed.cache) == ("miss", "hit")
    assert json.loads(whole.text) == VLLM
    assert assemble(chunks_of(replayed.events())) == VLLM
