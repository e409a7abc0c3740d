"""Every route over real HTTP, with and without ``/v1``; health and both metrics formats."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from gateway_harness import MODEL, chat_body, chunks_of, eventually, serve, stream_text
from prometheus_client.parser import text_string_to_metric_families

import minima_llm
from minima_llm.proxy.settings import ProxySettings
from minima_llm.testing import MockServer

PREFIXES = ["/v1", ""]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_chat(mock: MockServer, tmp_path: Path, prefix: str) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.post(f"{prefix}/chat/completions", chat_body("hello there"))
        assert reply.status == 200, reply.text
        assert reply.headers["Content-Type"].startswith("application/json")
        assert reply.cache == "miss"
        body = reply.json()
        assert body["object"] == "chat.completion"
        assert body["choices"][0]["message"]["content"] == "mock reply: hello there"
        assert body["usage"]["completion_tokens"] == 4


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_chat_stream(mock: MockServer, tmp_path: Path, prefix: str) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.post(
            f"{prefix}/chat/completions", chat_body("stream this now", stream=True)
        )
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/event-stream")
        events = reply.events()
        assert events[-1] == "[DONE]" and events.count("[DONE]") == 1
        chunks = chunks_of(events)
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        assert stream_text(events) == "mock reply: stream this now"
        # Without stream_options.include_usage, no usage anywhere (as OpenAI does).
        assert all("usage" not in c for c in chunks)


async def test_chat_stream_include_usage(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        body = chat_body("count my tokens", stream=True, stream_options={"include_usage": True})
        chunks = chunks_of((await gw.post("/v1/chat/completions", body)).events())
        final = chunks[-1]
        assert final["choices"] == []
        assert final["usage"]["prompt_tokens"] == 6
        assert final["usage"]["completion_tokens"] == 5
        assert sum(1 for c in chunks if c.get("usage")) == 1


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_completions(mock: MockServer, tmp_path: Path, prefix: str) -> None:
    async with serve(mock.url, tmp_path) as gw:
        plain = await gw.post(f"{prefix}/completions", {"model": MODEL, "prompt": "say hi"})
        assert plain.status == 200, plain.text
        assert plain.json()["object"] == "text_completion"
        assert plain.json()["choices"][0]["text"] == "mock reply: say hi"
        streamed = await gw.post(
            f"{prefix}/completions", {"model": MODEL, "prompt": "say bye", "stream": True}
        )
        events = streamed.events()
        assert streamed.status == 200 and events[-1] == "[DONE]"
        assert stream_text(events, kind="text") == "mock reply: say bye"


async def test_an_empty_prompt_is_a_completion_but_an_empty_input_is_not(
    mock: MockServer, tmp_path: Path
) -> None:
    # OpenAI answers an empty prompt as the start of a new document.
    async with serve(mock.url, tmp_path) as gw:
        empty = await gw.post("/v1/completions", {"model": MODEL, "prompt": ""})
        assert empty.status == 200, empty.text
        missing = await gw.post("/v1/completions", {"model": MODEL})
        assert missing.status == 400
        nothing = await gw.post("/v1/embeddings", {"model": MODEL, "input": ""})
        assert nothing.status == 400


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_embeddings_and_their_cache(mock: MockServer, tmp_path: Path, prefix: str) -> None:
    async with serve(mock.url, tmp_path) as gw:
        body = {"model": MODEL, "input": ["alpha", "beta"]}
        first = await gw.post(f"{prefix}/embeddings", body)
        assert first.status == 200, first.text
        assert first.cache == "miss"
        data = first.json()["data"]
        assert [d["index"] for d in data] == [0, 1] and len(data[0]["embedding"]) > 0
        second = await gw.post(f"{prefix}/embeddings", body)
        assert second.cache == "hit"
        assert second.json() == first.json()
        assert mock.stats()["requests"] == 1


async def test_chat_and_completions_never_share_a_key(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        await gw.post("/v1/completions", {"model": MODEL, "prompt": "same"})
        chat = await gw.chat("same")
        assert chat.cache == "miss" and chat.json()["object"] == "chat.completion"


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_models(mock: MockServer, tmp_path: Path, prefix: str) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.get(f"{prefix}/models")
        assert reply.status == 200
        assert reply.json()["object"] == "list"
        assert [m["id"] for m in reply.json()["data"]] == [MODEL]


@pytest.mark.parametrize("prefix", PREFIXES)
async def test_one_model_by_id(mock: MockServer, tmp_path: Path, prefix: str) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.get(f"{prefix}/models/{MODEL}")
        assert reply.status == 200 and reply.json()["id"] == MODEL
        missing = await gw.get(f"{prefix}/models/org/unknown-model")
        assert missing.status == 404
        assert missing.json()["error"]["code"] == "model_not_found"


async def test_health(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.get("/health")
        assert reply.status == 200
        body = reply.json()
        assert body["status"] == "ok"
        assert body["upstream"]["reachable"] is True and body["upstream"]["status"] == 200
        assert body["model"] == MODEL and body["cache"].endswith("minima_llm.db")
        assert body["version"] == minima_llm.__version__


async def test_health_with_the_upstream_stopped(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        await mock.stop()
        reply = await gw.get("/health")
        assert reply.status == 200
        body = reply.json()
        assert body["status"] == "degraded"
        assert body["upstream"]["reachable"] is False
        assert body["upstream"]["error"]


async def test_health_with_an_upstream_that_never_answers(tmp_path: Path) -> None:
    # Accepts the connection and says nothing: the check must time out and report it,
    # whichever TimeoutError class the Python version raises (3.10 has two).
    held: list[asyncio.StreamWriter] = []

    async def hold(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    silent = await asyncio.start_server(hold, "127.0.0.1", 0)
    port = silent.sockets[0].getsockname()[1]
    settings = ProxySettings(port=0, health_check_timeout_s=0.2)
    try:
        async with serve(f"http://127.0.0.1:{port}/v1", tmp_path, settings) as gw:
            reply = await asyncio.wait_for(gw.get("/health"), 10)
            assert reply.status == 200
            body = reply.json()
            assert body["status"] == "degraded"
            assert body["upstream"]["reachable"] is False
            assert body["upstream"]["error"].startswith("TimeoutError")
    finally:
        for writer in held:
            writer.close()
        silent.close()
        await silent.wait_closed()


async def test_metrics_json(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        await gw.chat("one")
        await gw.chat("one")
        await gw.post("/v1/chat/completions", {"messages": "bad"})
        body = (await gw.get("/metrics")).json()
        assert body["requests"] == 3
        assert body["by_status"] == {"200": 2, "400": 1}
        assert body["cache"] == {"hit": 1.0, "miss": 1.0, "refresh": 0.0}
        assert body["in_flight"] == 1.0  # this scrape
        assert body["tokens"]["upstream"] == {"prompt": 4.0, "completion": 3.0}
        assert body["tokens"]["cache"] == {"prompt": 4.0, "completion": 3.0}
        assert body["backend"]["live_calls"] == 1 and body["backend"]["hits"] == 1


def _samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    out = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


async def test_metrics_prometheus(mock: MockServer, tmp_path: Path) -> None:
    mock.update_config(latency_s=0.2)
    async with serve(mock.url, tmp_path) as gw:
        await asyncio.gather(gw.chat("pair"), gw.chat("pair"))  # one live, one coalesced
        await gw.chat("pair")  # hit
        await gw.post("/chat/completions", {"messages": []})
        mock.update_config(latency_s=0.5)
        slow = asyncio.ensure_future(gw.chat("slow one"))
        assert await eventually(lambda: gw.backend.snapshot().in_flight == 1)
        reply = await gw.get("/metrics/prometheus")
        await slow
        assert reply.status == 200
        assert reply.headers["Content-Type"].startswith("text/plain")
        s = _samples(reply.text)

        def value(name: str, **labels: str) -> float:
            return s.get((name, tuple(sorted(labels.items()))), 0.0)

        route = "minima_gateway_requests_total"
        assert value(route, route="/v1/chat/completions", status="200") == 3
        assert value(route, route="/chat/completions", status="400") == 1
        assert value("minima_gateway_cache_total", result="miss") == 1
        assert value("minima_gateway_cache_total", result="hit") == 1
        assert value("minima_gateway_coalesced_total") == 1
        assert value("minima_gateway_tokens_total", kind="prompt", source="upstream") == 4
        assert value("minima_gateway_tokens_total", kind="completion", source="upstream") == 3
        assert value("minima_gateway_tokens_total", kind="completion", source="cache") == 3
        assert value("minima_gateway_tokens_total", kind="completion", source="coalesced") == 3
        assert value("minima_gateway_in_flight") == 2  # the slow request and this scrape
        assert value("minima_gateway_upstream_latency_seconds_count") == 1
        # The one live call took the mock's 0.2 s: counted from the 0.25 s bucket up.
        bucket = "minima_gateway_upstream_latency_seconds_bucket"
        assert value(bucket, le="0.1") == 0
        assert value(bucket, le="0.25") == value(bucket, le="+Inf") == 1
        assert 0.2 <= value("minima_gateway_upstream_latency_seconds_sum") < 0.25
        after = _samples((await gw.get("/metrics/prometheus")).text)
        assert after[("minima_gateway_in_flight", ())] == 1
        assert after[(route, (("route", "/metrics/prometheus"), ("status", "200")))] == 1
