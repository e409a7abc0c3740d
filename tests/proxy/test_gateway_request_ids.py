"""Request ids: every answer names its request, and the gateway's log line names it too."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from pathlib import Path

import openai
import pytest
from gateway_harness import MODEL, Reply, serve
from test_gateway_errors import _completion

from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockServer

LOGGER = "minima_llm.proxy"
OURS = re.compile(r"^mgw-[0-9a-f]{8}-[0-9a-f]+$")


def ids(reply: Reply) -> tuple[str, str]:
    """The answer's (x-request-id, x-minima-request-id)."""
    return reply.headers["x-request-id"], reply.headers["x-minima-request-id"]


def logged(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


async def test_every_kind_of_answer_carries_the_gateways_id(
    mock: MockServer, tmp_path: Path
) -> None:
    settings = ProxySettings(port=0, api_keys=("sk-gw",))
    auth = {"Authorization": "Bearer sk-gw"}
    async with serve(mock.url, tmp_path, settings) as gw:
        replies = [
            await gw.chat("first", auth),  # a miss from the mock, which sends no id of its own
            await gw.chat("first", auth),  # a hit
            await gw.chat("streamed", auth, stream=True),
            await gw.post("/v1/chat/completions", {"messages": "nope"}, auth),  # 400
            await gw.chat("no key"),  # 401
            await gw.get("/v1/nowhere", auth),  # 404
            await gw.request("DELETE", "/v1/chat/completions", headers=auth),  # 405
            await gw.get("/health"),
            await gw.get("/metrics", auth),
        ]
        other = await gw.chat("first", auth)
    statuses = [r.status for r in replies]
    assert statuses == [200, 200, 200, 400, 401, 404, 405, 200, 200]
    seen = set()
    for reply in replies:
        upstream_id, ours = ids(reply)
        assert OURS.match(ours) and upstream_id == ours, reply
        seen.add(ours)
    assert len(seen) == len(replies)  # one id per request
    assert {i.rsplit("-", 1)[0] for i in seen} == {ids(other)[1].rsplit("-", 1)[0]}


async def test_two_gateways_never_hand_out_the_same_id(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path / "a") as one, serve(mock.url, tmp_path / "b") as two:
        first, second = ids(await one.chat("x"))[1], ids(await two.chat("x"))[1]
    assert first.rsplit("-", 1)[0] != second.rsplit("-", 1)[0]


async def test_a_live_answer_keeps_the_providers_id_and_logs_both(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    headers = {"x-request-id": "req_provider1"}
    mock.fail_next(1, status=200, body=_completion("chatcmpl-1", "hi"), headers=headers)
    async with serve(mock.url, tmp_path) as gw:
        live = await gw.chat("quoted")
    upstream_id, ours = ids(live)
    assert upstream_id == "req_provider1" and OURS.match(ours)
    [line] = [m for m in logged(caplog) if " miss 200 " in m]
    assert f"id={ours}" in line and "upstream_id=req_provider1" in line


async def test_a_callers_own_id_is_used_and_logged(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    mock.fail_next(1, status=500)
    async with serve(mock.url, tmp_path, max_attempts=1) as gw:
        failed = await gw.chat("trace me", {"X-Request-Id": "app-trace-42"})
        unusable = [
            await gw.chat("long", {"X-Request-Id": "x" * 129}),
            await gw.chat("spaces", {"X-Request-Id": "two\twords"}),
            await gw.chat("forged", {"X-Request-Id": "x model=gpt-4o hit 200 0ms"}),
        ]
    assert failed.status == 502 and ids(failed) == ("app-trace-42", "app-trace-42")
    [line] = [m for m in logged(caplog) if " failed " in m]
    assert "id=app-trace-42" in line
    for reply in unusable:
        assert OURS.match(ids(reply)[1])


async def test_the_openai_sdk_reads_the_id_of_a_cached_answer(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused")
        async with client:
            messages = [{"role": "user", "content": "cached"}]
            await client.chat.completions.create(model=MODEL, messages=messages)  # type: ignore[arg-type]
            hit = await client.chat.completions.with_raw_response.create(
                model=MODEL,
                messages=messages,  # type: ignore[arg-type]
            )
    assert hit.headers["x-minima-cache"] == "hit"
    assert OURS.match(hit.parse()._request_id or "")
    assert hit.parse()._request_id == hit.headers["x-minima-request-id"]


async def test_a_live_stream_keeps_the_providers_id_and_logs_both(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    chunk = {
        "id": "chatcmpl-s",
        "object": "chat.completion.chunk",
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"content": "streamed"}, "finish_reason": "stop"}],
    }
    sse = f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    headers = {"Content-Type": "text/event-stream", "x-request-id": "req_stream1"}
    mock.fail_next(1, status=200, body=sse, headers=headers)
    async with serve(mock.url, tmp_path) as gw:
        live = await gw.chat("a stream", stream=True)
        replayed = await gw.chat("a stream", stream=True)
    assert live.events()[-1] == "[DONE]" and replayed.cache == "hit"
    upstream_id, ours = ids(live)
    assert upstream_id == "req_stream1" and OURS.match(ours)
    assert ids(replayed)[0] == ids(replayed)[1]  # a replay names only the gateway's request
    [line] = [m for m in logged(caplog) if " miss 200 " in m]
    assert f"id={ours}" in line and "upstream_id=req_stream1" in line


async def test_a_failed_call_keeps_the_providers_id(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    error = {"error": {"message": "bad", "type": "invalid_request_error", "code": None}}
    mock.fail_next(1, status=400, body=error, headers={"x-request-id": "req_prov400"})
    async with serve(mock.url, tmp_path) as gw:
        failed = await gw.chat("refused upstream")
    upstream_id, ours = ids(failed)
    assert failed.status == 400 and upstream_id == "req_prov400" and OURS.match(ours)
    [line] = [m for m in logged(caplog) if " failed " in m]
    assert f"id={ours}" in line and "upstream_id=req_prov400" in line


async def test_a_request_that_joined_a_call_is_named_by_the_gateway_alone(
    mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(latency_s=0.3)
    headers = {"x-request-id": "req_shared"}
    mock.fail_next(1, status=200, body=_completion("chatcmpl-1", "hi"), headers=headers)
    async with serve(mock.url, tmp_path) as gw:
        first, second = await asyncio.gather(gw.chat("together"), gw.chat("together"))
    assert mock.stats()["requests"] == 1
    named = sorted(ids(r)[0] for r in (first, second))
    assert named[1] == "req_shared" and OURS.match(named[0])
