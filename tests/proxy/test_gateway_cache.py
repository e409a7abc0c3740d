"""The prompt cache through the gateway: hits, directives, stream/whole crossover, the key contract."""

from __future__ import annotations

import json
import sqlite3
import time
from pathlib import Path

import pytest
from gateway_harness import MODEL, backend_config, chunks_of, serve, stream_text

from minima_llm import MinimaLlmRequest, MinimaLlmResponse, OpenAIMinimaLlm
from minima_llm.cache import cache_key
from minima_llm.testing import MockServer


async def test_miss_then_hit_with_the_original_usage(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        first = await gw.chat("cache me")
        second = await gw.chat("cache me")
        assert (first.cache, second.cache) == ("miss", "hit")
        assert second.json() == first.json()
        assert second.json()["usage"] == {
            "prompt_tokens": 5,
            "completion_tokens": 4,
            "total_tokens": 9,
        }
        assert mock.stats()["requests"] == 1


async def test_streamed_answer_is_later_served_whole(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        streamed = await gw.chat("first streamed", stream=True)
        assert streamed.cache == "miss"
        whole = await gw.chat("first streamed")
        assert whole.cache == "hit"
        body = whole.json()
        assert body["choices"][0]["message"] == {
            "role": "assistant",
            "content": "mock reply: first streamed",
        }
        assert body["choices"][0]["finish_reason"] == "stop"
        assert body["usage"]["completion_tokens"] == 4  # the stream's usage was kept
        assert mock.stats()["requests"] == 1


async def test_whole_answer_is_later_served_as_a_stream(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        whole = await gw.chat("first whole")
        streamed = await gw.chat("first whole", stream=True, stream_options={"include_usage": True})
        assert streamed.cache == "hit"
        events = streamed.events()
        assert events[-1] == "[DONE]"
        assert stream_text(events) == "mock reply: first whole"
        assert chunks_of(events)[-1]["usage"] == whole.json()["usage"]
        plain = await gw.chat("first whole", stream=True)  # no include_usage: no usage
        assert plain.cache == "hit" and all("usage" not in c for c in chunks_of(plain.events()))
        assert mock.stats()["requests"] == 1


async def test_completions_stream_and_whole_share_the_cache(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        body = {"model": MODEL, "prompt": "legacy words"}
        streamed = await gw.post("/v1/completions", {**body, "stream": True})
        whole = await gw.post("/v1/completions", body)
        assert (streamed.cache, whole.cache) == ("miss", "hit")
        assert whole.json()["object"] == "text_completion"
        assert whole.json()["choices"][0]["text"] == "mock reply: legacy words"
        again = await gw.post("/v1/completions", {**body, "stream": True})
        assert again.cache == "hit"
        assert stream_text(again.events(), kind="text") == "mock reply: legacy words"
        assert mock.stats()["requests"] == 1


async def test_no_cache_refreshes(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        await gw.chat("refresh me")
        again = await gw.chat("refresh me", headers={"Cache-Control": "no-cache"})
        assert again.cache == "refresh"
        assert mock.stats()["requests"] == 2
        body = await gw.chat("refresh me", cache={"no-cache": True})
        assert body.cache == "refresh"
        assert mock.stats()["requests"] == 3
        streamed = await gw.chat("refresh me", stream=True, headers={"Cache-Control": "no-cache"})
        assert streamed.cache == "refresh" and streamed.events()[-1] == "[DONE]"
        assert mock.stats()["requests"] == 4
        assert (await gw.chat("refresh me")).cache == "hit"


@pytest.mark.parametrize("stream", [False, True])
async def test_no_store_leaves_the_cache_alone(
    mock: MockServer, tmp_path: Path, stream: bool
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        first = await gw.chat("keep out", stream=stream, headers={"Cache-Control": "no-store"})
        assert first.status == 200 and first.cache == "miss"
        second = await gw.chat("keep out", stream=stream)
        assert second.cache == "miss"
        third = await gw.chat("keep out", stream=stream, cache={"no-store": True})
        assert third.cache == "hit"  # the second one stored it
        assert mock.stats()["requests"] == 2


async def test_client_library_answer_is_a_gateway_hit(mock: MockServer, tmp_path: Path) -> None:
    request = MinimaLlmRequest(
        "lib-1", [{"role": "user", "content": "shared question"}], temperature=0.0
    )
    async with OpenAIMinimaLlm(backend_config(mock.url, tmp_path)) as client:
        answer = await client.generate(request)
        assert isinstance(answer, MinimaLlmResponse) and not answer.cached
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat("shared question", temperature=0.0)
        assert reply.cache == "hit"
        assert reply.json()["choices"][0]["message"]["content"] == answer.text
        assert reply.json()["usage"] == json.loads(answer.raw_text or "")["usage"]
    assert mock.stats()["requests"] == 1


# JSON clients write temperature 0; the client library has 0.0. Both are one key.
@pytest.mark.parametrize("temperature", [0.0, 0])
async def test_gateway_answer_is_a_client_library_hit(
    mock: MockServer, tmp_path: Path, temperature: float
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat("asked at the gateway", temperature=temperature, user="someone")
        assert reply.cache == "miss"
    request = MinimaLlmRequest(
        "lib-2", [{"role": "user", "content": "asked at the gateway"}], temperature=0.0
    )
    async with OpenAIMinimaLlm(backend_config(mock.url, tmp_path)) as client:
        answer = await client.generate(request)
    assert isinstance(answer, MinimaLlmResponse) and answer.cached
    assert answer.text == "mock reply: asked at the gateway"
    assert mock.stats()["requests"] == 1


async def test_cut_stream_is_an_error_event_and_not_cached(
    mock: MockServer, tmp_path: Path
) -> None:
    text = "one two three four five six seven"
    async with serve(mock.url, tmp_path) as gw:
        mock.fail_next(1, mode="truncate_stream")
        cut = await gw.chat(text, stream=True)
        assert cut.status == 200  # the headers went out before the cut
        events = cut.events()
        assert "[DONE]" not in events
        error = json.loads(events[-1])["error"]
        assert error["type"] == "upstream_error" and "interrupted" in error["message"]
        assert "Traceback" not in cut.text
        whole = await gw.chat(text)
        assert whole.cache == "miss"
        assert whole.json()["choices"][0]["message"]["content"] == f"mock reply: {text}"
        assert mock.stats()["requests"] == 2
        metrics = (await gw.get("/metrics")).json()
        assert metrics["streams_interrupted"] == 1


# The table of ARCHITECTURE.md's cache contract; older minima-llm rows may lack response_raw.
_SCHEMA = (
    "CREATE TABLE cache(key TEXT PRIMARY KEY, response_text TEXT NOT NULL, "
    "response_raw TEXT, created_at REAL NOT NULL, model TEXT, canonical TEXT)"
)


# A raw body that is not a JSON object (cut short, or some other tool's) must not reach
# the client as the answer: it is rebuilt from the text, as for a row with none.
@pytest.mark.parametrize("raw", [None, "", "{not json", "[1, 2]", '"just text"'])
async def test_row_without_raw_body_is_served_in_openai_shape(
    mock: MockServer, tmp_path: Path, raw: str | None
) -> None:
    messages = [{"role": "user", "content": "asked long ago"}]
    key, canonical = cache_key(MODEL, messages)
    with sqlite3.connect(tmp_path / "minima_llm.db") as db:
        db.execute(_SCHEMA)
        db.execute(
            "INSERT INTO cache VALUES (?, ?, ?, ?, ?, ?)",
            (key, "the old answer", raw, time.time(), MODEL, canonical),
        )
    db.close()
    async with serve(mock.url, tmp_path) as gw:
        whole = await gw.chat("asked long ago")
        assert whole.cache == "hit"
        body = whole.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"] == {"role": "assistant", "content": "the old answer"}
        assert body["choices"][0]["finish_reason"] == "stop"
        streamed = await gw.chat("asked long ago", stream=True)
        assert streamed.cache == "hit" and stream_text(streamed.events()) == "the old answer"
    assert mock.stats()["requests"] == 0


async def test_legacy_logprobs_zero_is_not_the_default(mock: MockServer, tmp_path: Path) -> None:
    # "logprobs": 0 returns the sampled tokens' logprobs; leaving it out returns none.
    async with serve(mock.url, tmp_path) as gw:
        body = {"model": MODEL, "prompt": "how sure are you"}
        plain = await gw.post("/v1/completions", body)
        zero = await gw.post("/v1/completions", {**body, "logprobs": 0})
        unset = await gw.post("/v1/completions", {**body, "logprobs": False})
        assert (plain.cache, zero.cache, unset.cache) == ("miss", "miss", "hit")
        assert mock.stats()["requests"] == 2
