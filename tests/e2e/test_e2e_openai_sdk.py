"""The OpenAI Python SDK against the gateway: every endpoint, streaming, cache headers, errors."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import openai
import pytest
from _e2e_support import GATEWAY_ATTEMPTS, MODEL, MockControl, expected_reply, user


def _joined(chunks: list[Any]) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def test_sync_chat_completion(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("hello there")
    resp = client.chat.completions.create(model=MODEL, messages=user(prompt))
    choice = resp.choices[0]
    assert choice.message.content == expected_reply(prompt)
    assert choice.message.role == "assistant"
    assert choice.finish_reason == "stop"
    assert resp.model == MODEL
    assert resp.usage is not None and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + resp.usage.completion_tokens
    assert mock.requests() == 1


async def test_async_chat_completion(
    aclient: openai.AsyncOpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("async hello")
    resp = await aclient.chat.completions.create(model=MODEL, messages=user(prompt))
    assert resp.choices[0].message.content == expected_reply(prompt)
    stream = await aclient.chat.completions.create(model=MODEL, messages=user(prompt), stream=True)
    chunks = [chunk async for chunk in stream]
    assert _joined(chunks) == expected_reply(prompt)
    assert mock.requests() == 1  # the stream was answered from the cache


def test_cache_header_miss_then_hit(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("cache me")
    first = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), temperature=0.0
    )
    second = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), temperature=0.0
    )
    assert first.headers["x-minima-cache"] == "miss"
    assert second.headers["x-minima-cache"] == "hit"
    assert first.parse().choices[0].message.content == expected_reply(prompt)
    assert second.parse().model_dump() == first.parse().model_dump()
    assert mock.requests() == 1


@pytest.mark.parametrize("include_usage", [False, True], ids=["no-usage", "include-usage"])
def test_streaming_live_then_replayed(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str], include_usage: bool
) -> None:
    prompt = unique("stream these few words")
    options: dict[str, Any] = {"stream_options": {"include_usage": True}} if include_usage else {}
    runs = []
    for want in ("miss", "hit"):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=user(prompt), stream=True, **options
        )
        assert raw.headers["x-minima-cache"] == want
        assert raw.headers["content-type"].startswith("text/event-stream")
        with raw.parse() as stream:
            runs.append(list(stream))
    assert mock.requests() == 1
    for chunks in runs:
        assert _joined(chunks) == expected_reply(prompt)
        finishes = [c.choices[0].finish_reason for c in chunks if c.choices]
        assert finishes[-1] == "stop"
        usage_chunks = [c for c in chunks if c.usage is not None]
        if include_usage:
            # OpenAI's contract: one final chunk with empty choices carrying the usage.
            assert len(usage_chunks) == 1 and usage_chunks[0] is chunks[-1]
            assert chunks[-1].choices == []
            assert usage_chunks[0].usage is not None
            assert usage_chunks[0].usage.prompt_tokens > 0
        else:
            assert usage_chunks == []
    # The streamed answer was stored whole: a plain request is answered from it.
    plain = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(prompt))
    assert plain.headers["x-minima-cache"] == "hit"
    assert plain.parse().choices[0].message.content == expected_reply(prompt)
    if include_usage:
        live, replayed = (chunks[-1].usage for chunks in runs)
        assert live == replayed
        assert plain.parse().usage == live
    assert mock.requests() == 1


def test_cache_key_ignores_transport_fields_and_defaults(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("same question, dressed differently")
    client.chat.completions.create(model=MODEL, messages=user(prompt))
    dressed = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), user="alice", n=1, top_p=1, presence_penalty=0
    )
    assert dressed.headers["x-minima-cache"] == "hit"
    different = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), top_p=0.5
    )
    assert different.headers["x-minima-cache"] == "miss"
    assert mock.requests() == 2


def test_cache_control_directives(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("directives")

    def label(**options: Any) -> str:
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=user(prompt), **options
        )
        assert raw.parse().choices[0].message.content == expected_reply(prompt)
        return raw.headers["x-minima-cache"]

    no_store = {"extra_headers": {"Cache-Control": "no-store"}}
    no_cache = {"extra_headers": {"Cache-Control": "no-cache"}}
    assert [label(**no_store), label(**no_store), label()] == ["miss", "miss", "miss"]
    assert [label(), label(**no_cache), label()] == ["hit", "refresh", "hit"]
    assert label(extra_body={"cache": {"no-cache": True}}) == "refresh"
    assert mock.requests() == 5


def test_legacy_completions(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("complete this")
    first = client.completions.with_raw_response.create(model=MODEL, prompt=prompt)
    second = client.completions.with_raw_response.create(model=MODEL, prompt=prompt)
    assert first.parse().choices[0].text == expected_reply(prompt)
    assert first.parse().object == "text_completion"
    assert (first.headers["x-minima-cache"], second.headers["x-minima-cache"]) == ("miss", "hit")
    assert second.parse().choices[0].text == expected_reply(prompt)
    # The same text as a chat message is a different question: its own upstream call.
    chat = client.chat.completions.with_raw_response.create(model=MODEL, messages=user(prompt))
    assert chat.headers["x-minima-cache"] == "miss"
    assert mock.requests() == 2


def test_embeddings(client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]) -> None:
    texts = [unique("first text"), unique("second text")]
    # The SDK asks for base64 unless told otherwise and decodes it to floats itself.
    first = client.embeddings.with_raw_response.create(model=MODEL, input=texts)
    second = client.embeddings.with_raw_response.create(model=MODEL, input=texts)
    floats = client.embeddings.create(model=MODEL, input=texts, encoding_format="float")
    assert (first.headers["x-minima-cache"], second.headers["x-minima-cache"]) == ("miss", "hit")
    vectors = [d.embedding for d in first.parse().data]
    assert [d.index for d in first.parse().data] == [0, 1]
    assert len(vectors) == 2 and vectors[0] != vectors[1]
    assert [d.embedding for d in second.parse().data] == vectors
    for vector, as_float in zip(vectors, floats.data, strict=True):
        assert math.isclose(math.fsum(x * x for x in vector), 1.0, rel_tol=1e-4)
        assert as_float.embedding == pytest.approx(vector, abs=1e-6)
    assert mock.requests() == 2  # base64 and float are separate questions


def test_models_list(client: openai.OpenAI) -> None:
    ids = [m.id for m in client.models.list()]
    assert MODEL in ids


def test_models_retrieve(client: openai.OpenAI) -> None:
    assert client.models.retrieve("mock-model").id == "mock-model"
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")


@pytest.mark.parametrize(
    ("upstream_status", "gateway_status", "error_class"),
    [
        (503, 503, openai.InternalServerError),
        (500, 502, openai.InternalServerError),
        (400, 400, openai.BadRequestError),
    ],
)
def test_upstream_failure_is_the_sdk_exception(
    client: openai.OpenAI,
    mock: MockControl,
    unique: Callable[[str], str],
    upstream_status: int,
    gateway_status: int,
    error_class: type[openai.APIStatusError],
) -> None:
    mock.fail_next(count=GATEWAY_ATTEMPTS, status=upstream_status)
    with pytest.raises(error_class) as caught:
        client.chat.completions.create(model=MODEL, messages=user(unique("doomed")))
    assert caught.value.status_code == gateway_status
    # The upstream's own code comes through; a failure after retries is typed as the upstream's.
    assert caught.value.code == "injected_fault", caught.value.body
    if upstream_status >= 500:
        assert caught.value.type == "upstream_error"
    # 4xx is the caller's problem and not retried; 5xx is retried until attempts run out.
    assert mock.requests() == (1 if upstream_status < 500 else GATEWAY_ATTEMPTS)
