"""A cached answer replayed (whole or as a stream) carries what the original answer carried.

Against a scripted upstream on 127.0.0.1 that sends provider-shaped answers the mock
does not: vLLM's ``"tool_calls": []`` and top-level ``prompt_logprobs``, Azure's
``prompt_filter_results``, a stream that never names a finish reason, and an emoji
whose two UTF-16 halves arrive in two chunks.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
from openai.lib.streaming.chat import ChatCompletionStreamState
from openai.types.chat import ChatCompletionChunk

from backend_support import BackendFactory, req
from minima_llm import MinimaLlmResponse
from minima_llm.backend import ChunkStream
from minima_llm.streaming import replay_chunks
from scripted_upstream import ScriptedUpstream, assemble, read_chunks, serving

FILTERS = [{"prompt_index": 0, "content_filter_results": {"hate": {"filtered": False}}}]
PROMPT_LOGPROBS = [None, {"1": {"logprob": -0.5, "rank": 1, "decoded_token": "x"}}]


def _whole(message: dict[str, Any], finish: str | None = "stop", **top: Any) -> dict[str, Any]:
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return {
        "id": "chatcmpl-r",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [choice],
        **top,
    }


def _chunk(delta: dict[str, Any] | None, finish: str | None = None, **top: Any) -> str:
    """One SSE ``data`` payload; ``delta=None`` makes a chunk with no choices."""
    choices = [] if delta is None else [{"index": 0, "delta": delta, "finish_reason": finish}]
    body = {"id": "chatcmpl-r", "object": "chat.completion.chunk", "created": 5, "model": "m"}
    return json.dumps({**body, "choices": choices, **top})


# Whole answers, by prompt.
BODIES = {
    "vllm": _whole(
        {"role": "assistant", "content": "hi", "tool_calls": []},
        prompt_logprobs=PROMPT_LOGPROBS,
        kv_transfer_params=None,
        system_fingerprint=None,
    ),
}
# Streams, by prompt: the data payloads before [DONE], as the servers send them.
STREAMS = {
    "azure": [
        # Azure's own first chunk: no choices, blank id and model, the prompt's filter results.
        json.dumps(
            {
                "id": "",
                "object": "",
                "created": 0,
                "model": "",
                "choices": [],
                "prompt_filter_results": FILTERS,
            }
        ),
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "hi"}),
        _chunk({}, "stop"),
    ],
    "no finish reason": [_chunk({"role": "assistant", "content": "hi"})],
    # A server cutting text by UTF-16 units: "wave \U0001f44b!" with the emoji in two halves.
    "surrogates": [
        _chunk({"role": "assistant", "content": ""}),
        _chunk({"content": "wave \ud83d"}),
        _chunk({"content": "\udc4b!"}),
        _chunk({}, "stop"),
    ],
}


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with serving(ScriptedUpstream(BODIES, STREAMS)) as scripted:
        yield scripted


async def test_a_whole_answer_replayed_as_a_stream_keeps_every_field(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    # The stream replay dropped "tool_calls": [], the null system_fingerprint and the
    # top-level fields a whole answer may carry beyond OpenAI's own (prompt_logprobs).
    backend = make_backend(base_url=upstream.url)
    whole = await backend.generate(req(1, text="vllm"))
    assert isinstance(whole, MinimaLlmResponse) and not whole.cached
    replayed = await backend.open_stream(req(1, text="vllm"))
    assert isinstance(replayed, ChunkStream) and replayed.cached
    assert assemble(await read_chunks(replayed)) == BODIES["vllm"]
    assert upstream.requests == {"vllm": 1}


async def test_a_streamed_answer_keeps_its_top_level_fields_whole_and_replayed(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    # Azure's prompt_filter_results came in a chunk of its own and was lost from the cache.
    backend = make_backend(base_url=upstream.url)
    live = assemble(await read_chunks(await backend.open_stream(req(2, text="azure"))))
    assert live["prompt_filter_results"] == FILTERS and live["id"] == "chatcmpl-r"
    whole = await backend.generate(req(2, text="azure"))
    assert isinstance(whole, MinimaLlmResponse) and whole.cached
    assert whole.raw == live
    assert assemble(await read_chunks(await backend.open_stream(req(2, text="azure")))) == live
    assert upstream.requests == {"azure": 1}


async def test_a_null_finish_reason_stays_null_in_every_replay(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    # The stream replay said "stop" where the whole replay of the same row said null.
    backend = make_backend(base_url=upstream.url)
    live = await read_chunks(await backend.open_stream(req(3, text="no finish reason")))
    assert assemble(live)["choices"][0]["finish_reason"] is None
    whole = await backend.generate(req(3, text="no finish reason"))
    assert isinstance(whole, MinimaLlmResponse) and whole.cached and whole.raw is not None
    assert whole.raw["choices"][0]["finish_reason"] is None
    replayed = await read_chunks(await backend.open_stream(req(3, text="no finish reason")))
    assert [c["choices"][0]["finish_reason"] for c in replayed if c["choices"]][-1] is None
    assert assemble(replayed) == whole.raw


async def test_an_emoji_split_into_surrogate_halves_is_cached_as_the_emoji(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    # Joined as two lone surrogates, the text could not be stored: a hit read "wave \ufffd\ufffd!".
    backend = make_backend(base_url=upstream.url)
    live = await read_chunks(await backend.open_stream(req(4, text="surrogates")))
    assert assemble(live)["choices"][0]["message"]["content"] == "wave \U0001f44b!"
    hit = await backend.generate(req(4, text="surrogates"))
    assert isinstance(hit, MinimaLlmResponse) and hit.cached
    assert hit.text == "wave \U0001f44b!"
    assert hit.raw is not None and hit.raw["choices"][0]["message"]["content"] == hit.text


def test_the_openai_sdk_stream_helper_keeps_a_replayed_choices_own_fields() -> None:
    # The SDK keeps choice-level fields from a choice's first chunk only; on a hit it
    # showed none of vLLM's stop_reason or Azure's content_filter_results.
    filters = {"hate": {"filtered": False, "severity": "safe"}}
    choice = {
        "index": 0,
        "message": {"role": "assistant", "content": "hello there"},
        "finish_reason": "stop",
        "stop_reason": 128009,
        "content_filter_results": filters,
    }
    whole = {
        "id": "c",
        "object": "chat.completion",
        "created": 1,
        "model": "m",
        "choices": [choice],
    }
    state = ChatCompletionStreamState()
    chunks = list(replay_chunks(whole, "chat"))
    for chunk in chunks:
        state.handle_chunk(ChatCompletionChunk.model_validate(chunk))
    final = state.get_final_completion().choices[0].model_dump()
    assert (final["stop_reason"], final["content_filter_results"]) == (128009, filters)
    assert assemble(chunks)["choices"] == [choice]
