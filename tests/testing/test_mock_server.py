"""The mock server over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import base64
import json
import math
import random
import struct
import time
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest

from minima_llm.testing import MockConfig, MockServer

CHAT: dict[str, Any] = {
    "model": "gpt-test",
    "temperature": 0.2,
    "messages": [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "say hello to the world"},
    ],
}


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    async with MockServer() as server:
        yield server


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


async def post(
    http: aiohttp.ClientSession, url: str, body: Any
) -> tuple[int, Any, aiohttp.ClientResponse]:
    async with http.post(url, json=body) as response:
        text = await response.text()
        try:
            return response.status, json.loads(text), response
        except ValueError:
            return response.status, text, response


async def stream_events(http: aiohttp.ClientSession, url: str, body: Any) -> list[str]:
    async with http.post(url, json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"].startswith("text/event-stream")
        text = await response.text()
    assert text.endswith("\n\n")
    return [block.removeprefix("data: ") for block in text.split("\n\n") if block]


async def test_chat_reply_is_deterministic_and_openai_shaped(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    status, first, _ = await post(http, mock.url + "/chat/completions", CHAT)
    _, second, _ = await post(http, mock.url + "/chat/completions", CHAT)
    assert status == 200
    assert first == second
    assert first["id"].startswith("chatcmpl-")
    assert first["object"] == "chat.completion"
    assert first["created"] == 1_700_000_000
    assert first["model"] == "gpt-test"
    assert first["choices"] == [
        {
            "index": 0,
            "message": {"role": "assistant", "content": "mock reply: say hello to the world"},
            "logprobs": None,
            "finish_reason": "stop",
        }
    ]
    _, other, _ = await post(http, mock.url + "/chat/completions", {**CHAT, "temperature": 1})
    assert other["id"] != first["id"]
    assert other["choices"] == first["choices"]


async def test_usage_counts_words_plus_three_per_message(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    _, reply, _ = await post(http, mock.url + "/chat/completions", CHAT)
    # "You are terse." is 3 words and the user message 5, plus 3 per message.
    assert reply["usage"] == {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}


async def test_max_tokens_truncates_words_and_reports_length(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    _, reply, _ = await post(http, mock.url + "/chat/completions", {**CHAT, "max_tokens": 3})
    assert reply["choices"][0]["message"]["content"] == "mock reply: say"
    assert reply["choices"][0]["finish_reason"] == "length"
    assert reply["usage"]["completion_tokens"] == 3


async def test_echo_prefix_replies_with_exactly_the_rest(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"messages": [{"role": "user", "content": 'ECHO:{"answer": 42}\n'}], "n": 2}
    _, reply, _ = await post(http, mock.url + "/chat/completions", body)
    assert reply["model"] == "mock-model"
    assert [c["message"]["content"] for c in reply["choices"]] == ['{"answer": 42}\n'] * 2
    assert [c["index"] for c in reply["choices"]] == [0, 1]


async def test_stream_assembles_to_the_non_stream_reply(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    _, whole, _ = await post(http, mock.url + "/chat/completions", CHAT)
    events = await stream_events(http, mock.url + "/chat/completions", {**CHAT, "stream": True})
    assert events[-1] == "[DONE]"
    chunks = [json.loads(event) for event in events[:-1]]
    assert {chunk["object"] for chunk in chunks} == {"chat.completion.chunk"}
    assert chunks[0]["choices"][0]["delta"] == {"role": "assistant", "content": ""}
    assert chunks[-1]["choices"][0] == {
        "index": 0,
        "delta": {},
        "logprobs": None,
        "finish_reason": "stop",
    }
    text = "".join(chunk["choices"][0]["delta"].get("content", "") for chunk in chunks)
    assert text == whole["choices"][0]["message"]["content"]
    assert len(chunks) == 2 + len(text.split())
    assert all("usage" not in chunk for chunk in chunks)


async def test_stream_include_usage_sends_a_final_usage_chunk(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    events = await stream_events(http, mock.url + "/chat/completions", body)
    last = json.loads(events[-2])
    assert last["choices"] == []
    assert last["usage"] == {"prompt_tokens": 14, "completion_tokens": 7, "total_tokens": 21}
    assert json.loads(events[0])["usage"] is None


async def test_completions_route_plain_and_streamed(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "text-model", "prompt": "once upon a time", "max_tokens": 4}
    status, reply, _ = await post(http, mock.url + "/completions", body)
    assert status == 200
    assert reply["id"].startswith("cmpl-")
    assert reply["object"] == "text_completion"
    assert reply["choices"] == [
        {"index": 0, "text": "mock reply: once upon", "logprobs": None, "finish_reason": "length"}
    ]
    assert reply["usage"] == {"prompt_tokens": 4, "completion_tokens": 4, "total_tokens": 8}
    events = await stream_events(http, mock.url + "/completions", {**body, "stream": True})
    chunks = [json.loads(event) for event in events[:-1]]
    assert events[-1] == "[DONE]"
    assert {chunk["object"] for chunk in chunks} == {"text_completion"}
    assert "".join(chunk["choices"][0]["text"] for chunk in chunks) == "mock reply: once upon"
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_embeddings_are_deterministic_unit_vectors(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    body = {"model": "embed", "input": ["alpha", "beta", "alpha"]}
    status, reply, _ = await post(http, mock.url + "/embeddings", body)
    assert status == 200
    assert reply["object"] == "list"
    vectors = [item["embedding"] for item in reply["data"]]
    assert [item["index"] for item in reply["data"]] == [0, 1, 2]
    assert all(len(vector) == 8 for vector in vectors)
    assert vectors[0] == vectors[2] != vectors[1]
    assert math.fsum(x * x for x in vectors[0]) == pytest.approx(1.0)
    _, encoded, _ = await post(
        http, mock.url + "/embeddings", {"input": "alpha", "encoding_format": "base64"}
    )
    decoded = struct.unpack("<8f", base64.b64decode(encoded["data"][0]["embedding"]))
    assert decoded == pytest.approx(vectors[0], abs=1e-6)


async def test_v1_prefix_is_optional_and_models_and_health_answer(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    _, with_prefix, _ = await post(http, mock.root_url + "/v1/chat/completions", CHAT)
    _, without, _ = await post(http, mock.root_url + "/chat/completions", CHAT)
    assert with_prefix == without
    for path in ("/v1/models", "/models"):
        async with http.get(mock.root_url + path) as response:
            assert (await response.json())["data"][0]["id"] == "mock-model"
    async with http.get(mock.root_url + "/health") as response:
        assert await response.json() == {"status": "ok"}


async def test_invalid_requests_get_openai_400s_and_wrong_methods_405(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(mock.url + "/chat/completions", data=b"{oops") as response:
        assert response.status == 400
        error = (await response.json())["error"]
        assert error["type"] == "invalid_request_error"
    status, reply, _ = await post(http, mock.url + "/chat/completions", {"model": "x"})
    assert (status, reply["error"]["param"]) == (400, "messages")
    async with http.get(mock.url + "/chat/completions") as response:
        assert response.status == 405


async def test_rate_limit_answers_429_after_the_burst_and_recovers(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.set_config(MockConfig(rpm=600))
    url = mock.url + "/chat/completions"
    remaining = []
    for _ in range(10):
        status, _, response = await post(http, url, CHAT)
        assert status == 200
        assert response.headers["x-ratelimit-limit-requests"] == "600"
        remaining.append(int(response.headers["x-ratelimit-remaining-requests"]))
    assert remaining[0] == 9
    assert remaining == sorted(remaining, reverse=True)
    # Refill is 10 tokens/s, so a slow machine may earn one extra request before the 429.
    for _ in range(5):
        status, body, response = await post(http, url, CHAT)
        if status == 429:
            break
    assert status == 429
    assert body["error"]["code"] == "rate_limit_exceeded"
    assert body["error"]["type"] == "requests"
    assert response.headers["x-ratelimit-remaining-requests"] == "0"
    assert response.headers["x-ratelimit-reset-requests"].endswith(("ms", "s"))
    retry_after = float(response.headers["retry-after"])
    assert 0 < retry_after <= 0.1
    assert int(response.headers["retry-after-ms"]) == math.ceil(retry_after * 1000)
    await asyncio.sleep(retry_after + 0.01)
    async with http.post(url, json={**CHAT, "stream": True}) as response:
        assert response.status == 200
        assert response.headers["x-ratelimit-limit-requests"] == "600"
        await response.read()
    assert mock.stats()["rate_limited"] >= 1


async def test_token_limit_charges_as_openai_counts_and_names_what_it_refuses(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.set_config(MockConfig(tpm=60_000))  # 1,000 a second, a bucket of one second
    url = mock.url + "/chat/completions"
    # 400 characters at four a token, and max_tokens for each of two choices.
    body = {"messages": [{"role": "user", "content": "x" * 400}], "max_tokens": 50, "n": 2}
    status, _, response = await post(http, url, body)
    assert status == 200
    assert response.headers["x-ratelimit-limit-tokens"] == "60000"
    assert 800 <= int(response.headers["x-ratelimit-remaining-tokens"]) <= 801
    assert "x-ratelimit-limit-requests" not in response.headers
    status, refused, response = await post(http, url, {**body, "max_tokens": 400})
    assert status == 429
    assert refused["error"]["type"] == "tokens"
    assert refused["error"]["message"].startswith("Rate limit reached for mock-model")
    assert 0 < float(response.headers["retry-after"]) <= 0.1  # 900 short of 1,000 at most
    status, refused, response = await post(http, url, {**body, "max_tokens": 1000})
    assert status == 429 and "retry-after" not in response.headers
    assert refused["error"]["message"].startswith("Request too large for mock-model")
    assert "bucket holds 1000 tokens at most" in refused["error"]["message"]
    assert mock.stats()["rate_limited"] == 2


async def test_max_concurrency_rejects_the_excess_with_503(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.set_config(MockConfig(max_concurrency=2, latency_s=0.2))
    results = await asyncio.gather(
        *(post(http, mock.url + "/chat/completions", CHAT) for _ in range(4))
    )
    assert sorted(status for status, _, _ in results) == [200, 200, 503, 503]
    rejected = next(body for status, body, _ in results if status == 503)
    assert rejected["error"]["code"] == "overloaded"
    stats = mock.stats()
    assert (stats["overloaded"], stats["peak_concurrency"], stats["concurrency"]) == (2, 2, 0)


async def test_latency_delays_each_answer(mock: MockServer, http: aiohttp.ClientSession) -> None:
    mock.set_config(MockConfig(latency_s=0.1, latency_jitter_s=0.05))
    started = time.monotonic()
    await post(http, mock.url + "/chat/completions", CHAT)
    assert 0.1 <= time.monotonic() - started < 0.5


async def test_failure_rate_is_reproducible_with_a_seed(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.set_config(MockConfig(failure_rate=0.5, seed=7))
    reference = random.Random(7)
    expected = [500 if reference.random() < 0.5 else 200 for _ in range(20)]
    runs = []
    for _ in range(2):
        runs.append(
            [(await post(http, mock.url + "/chat/completions", CHAT))[0] for _ in range(20)]
        )
        async with http.post(mock.root_url + "/_mock/reset") as response:
            assert response.status == 200
    assert runs == [expected, expected]
    assert 0 < expected.count(500) < 20


async def test_fail_next_status_with_headers_and_body(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    script = {"count": 2, "status": 429, "headers": {"retry-after": "3"}, "body": {"error": "slow"}}
    async with http.post(mock.root_url + "/_mock/fail_next", json=script) as response:
        assert await response.json() == {"pending": 2}
    for _ in range(2):
        status, body, response = await post(http, mock.url + "/chat/completions", CHAT)
        assert (status, body, response.headers["retry-after"]) == (429, {"error": "slow"}, "3")
    status, _, _ = await post(http, mock.url + "/chat/completions", CHAT)
    assert status == 200


@pytest.mark.parametrize("stream", [False, True])
async def test_fail_next_reset_aborts_mid_body(
    mock: MockServer, http: aiohttp.ClientSession, stream: bool
) -> None:
    mock.fail_next(mode="reset")
    with pytest.raises((aiohttp.ClientPayloadError, aiohttp.ServerDisconnectedError)):
        await post(http, mock.url + "/chat/completions", {**CHAT, "stream": stream})
    assert mock.stats()["resets"] == 1
    status, _, _ = await post(http, mock.url + "/chat/completions", CHAT)
    assert status == 200


async def test_fail_next_truncate_stream_sends_chunks_then_aborts(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.fail_next(mode="truncate_stream")
    received = []
    with pytest.raises(aiohttp.ClientPayloadError):
        async with http.post(mock.url + "/chat/completions", json={**CHAT, "stream": True}) as r:
            async for line in r.content:
                received.append(line)
    data = [line for line in received if line.startswith(b"data: ")]
    assert len(data) == 2
    assert all(b"[DONE]" not in line for line in received)


async def test_fail_next_malformed_plain_and_streamed(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.fail_next(count=2, mode="malformed")
    status, body, _ = await post(http, mock.url + "/chat/completions", CHAT)
    assert status == 200
    assert isinstance(body, str) and body.startswith('{"id":"chatcmpl-')
    events = await stream_events(http, mock.url + "/chat/completions", {**CHAT, "stream": True})
    assert events[-1] == "[DONE]"
    with pytest.raises(ValueError):
        json.loads(events[1])
    assert mock.stats()["malformed"] == 2


async def test_fail_next_timeout_stalls_and_frees_its_slot_when_the_client_leaves(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.fail_next(mode="timeout", sleep_s=5)
    with pytest.raises(asyncio.TimeoutError):
        async with http.post(
            mock.url + "/chat/completions", json=CHAT, timeout=aiohttp.ClientTimeout(total=0.1)
        ) as response:
            await response.read()
    for _ in range(50):
        if mock.stats()["concurrency"] == 0:
            break
        await asyncio.sleep(0.01)
    assert mock.stats()["concurrency"] == 0
    assert mock.stats()["timeouts"] == 1
    mock.fail_next(mode="timeout", sleep_s=0.05)
    status, _, _ = await post(http, mock.url + "/chat/completions", CHAT)
    assert status == 200


async def test_stats_count_routes_statuses_and_streams_then_reset(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    await post(http, mock.url + "/chat/completions", CHAT)
    await stream_events(http, mock.url + "/chat/completions", {**CHAT, "stream": True})
    await post(http, mock.url + "/embeddings", {"input": "x"})
    await post(http, mock.url + "/chat/completions", {})
    mock.fail_next(status=502)
    await post(http, mock.url + "/completions", {"prompt": "p"})
    async with http.get(mock.root_url + "/_mock/stats") as response:
        stats = await response.json()
    assert stats["requests"] == 5
    assert stats["by_route"] == {
        "/v1/chat/completions": 3,
        "/v1/embeddings": 1,
        "/v1/completions": 1,
    }
    assert stats["by_status"] == {"200": 3, "400": 1, "502": 1}
    assert (stats["streams"], stats["failures"], stats["peak_concurrency"]) == (1, 1, 1)
    mock.fail_next(count=3)
    async with http.post(mock.root_url + "/_mock/reset") as response:
        stats = await response.json()
    assert stats["requests"] == 0
    assert stats["by_status"] == {}
    status, _, _ = await post(http, mock.url + "/chat/completions", CHAT)
    assert status == 200


async def test_config_endpoint_changes_behaviour_at_runtime(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    async with http.post(mock.root_url + "/_mock/config", json={"rpm": 120, "model": "m2"}) as r:
        config = await r.json()
    assert (config["rpm"], config["model"], config["latency_s"]) == (120, "m2", 0.0)
    assert mock.config.rpm == 120
    _, body, response = await post(
        http, mock.url + "/chat/completions", {"messages": CHAT["messages"]}
    )
    assert body["model"] == "m2"
    assert response.headers["x-ratelimit-limit-requests"] == "120"
    async with http.post(mock.root_url + "/_mock/config", json={"failure_rate": 2}) as r:
        assert r.status == 400
        assert "failure_rate" in (await r.json())["error"]["message"]
    async with http.get(mock.root_url + "/_mock/config") as r:
        assert (await r.json())["failure_rate"] == 0.0


async def test_stream_chunk_delay_paces_chunks(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.set_config(MockConfig(stream_chunk_delay_s=0.02))
    started = time.monotonic()
    events = await stream_events(http, mock.url + "/chat/completions", {**CHAT, "stream": True})
    # Nine events with a pause after each; generous upper bound for slow CI.
    assert len(events) == 10
    assert 0.18 <= time.monotonic() - started < 2


async def test_start_twice_and_url_before_start_are_errors() -> None:
    server = MockServer()
    with pytest.raises(RuntimeError):
        _ = server.url
    async with server:
        assert server.url == f"http://127.0.0.1:{server.port}/v1"
        assert repr(server).startswith(f"<MockServer running {server.url} <MockStats requests=0")
        with pytest.raises(RuntimeError):
            await server.start()
    assert repr(server).startswith("<MockServer stopped")
