"""Clients that leave before their answer: the gateway stops working for them.

Real HTTP on 127.0.0.1 throughout: the project's mock server, or a small aiohttp
upstream here where the mock cannot misbehave the way a test needs.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
from aiohttp import web
from gateway_harness import chat_body, eventually, serve

from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockServer

CHAT_URL = "/v1/chat/completions"


@dataclass
class Upstream:
    """A small upstream: streams that send one chunk and then only SSE comments."""

    url: str = ""
    open_streams: int = 0
    models_calls: int = 0
    # Set to let a hanging ``GET /models`` answer.
    release: asyncio.Event = field(default_factory=asyncio.Event)


def _chunk(text: str) -> bytes:
    body = {
        "id": "x",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": "mock-model",
        "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}],
    }
    return b"data: " + json.dumps(body).encode() + b"\n\n"


@asynccontextmanager
async def upstream() -> AsyncIterator[Upstream]:
    """Serve the small upstream on a free port of 127.0.0.1."""
    state = Upstream()

    async def chat(request: web.Request) -> web.StreamResponse:
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        state.open_streams += 1
        try:
            await resp.write(_chunk("first "))
            # Keep-alive comments for as long as anyone reads: each resets the reader's
            # per-read timeout, and none of them is an event to pass on to a client.
            for _ in range(400):  # 20 s at most, so the test's upstream itself is bounded
                await resp.write(b": keep-alive\n\n")
                await asyncio.sleep(0.05)
        except ConnectionResetError:
            pass  # the gateway closed the stream: what the test waits for
        finally:
            state.open_streams -= 1
        return resp

    async def models(request: web.Request) -> web.Response:
        state.models_calls += 1
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(state.release.wait(), 10.0)
        return web.json_response({"object": "list", "data": []})

    app = web.Application()
    app.router.add_post(CHAT_URL, chat)
    app.router.add_get("/v1/models", models)
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        yield state
    finally:
        state.release.set()
        await runner.cleanup()


async def test_a_client_leaving_a_stream_of_keep_alive_comments_frees_its_slot(
    tmp_path: Path,
) -> None:
    # Nothing is written to the client while the upstream sends only comments, so no
    # write can fail: the gateway must notice the client gone some other way.
    async with upstream() as up, serve(up.url, tmp_path, max_outstanding=1) as gw:
        backend, metrics = gw.backend, gw.gateway.metrics
        async with gw.http.post(gw.url + CHAT_URL, json=chat_body("drip", stream=True)) as resp:
            assert (await resp.content.readline()).startswith(b"data: ")
            assert await eventually(lambda: up.open_streams == 1)
            resp.close()  # the client leaves mid-stream
        freed = await eventually(lambda: up.open_streams == 0, timeout_s=3.0)
        assert freed, "the upstream stream outlived its only client"
        assert await eventually(lambda: backend.snapshot().in_flight == 0)
        assert await eventually(lambda: metrics.client_disconnects == 1)


async def _give_up(gw_url: str, text: str, after_s: float) -> str:
    """Ask, and leave after ``after_s`` as a client with a timeout does."""
    async with aiohttp.ClientSession() as http:
        try:
            async with http.post(
                gw_url + CHAT_URL,
                json=chat_body(text),
                timeout=aiohttp.ClientTimeout(total=after_s),
            ) as resp:
                await resp.read()
                return "answered"
        except asyncio.TimeoutError:
            return "gave up"


async def test_whole_requests_whose_clients_left_are_not_sent_upstream(
    mock: MockServer, tmp_path: Path
) -> None:
    # One slot and a slow upstream: five clients give up while the first one's call runs.
    mock.update_config(latency_s=1.5)
    async with serve(mock.url, tmp_path, max_outstanding=1) as gw:
        backend, metrics = gw.backend, gw.gateway.metrics
        left = await asyncio.gather(*(_give_up(gw.url, f"q{i}", 0.2) for i in range(5)))
        assert left == ["gave up"] * 5
        # Each is cancelled within a second or so; without that, the second would be sent
        # as soon as the first call returned, 1.5 s in.
        assert await eventually(lambda: metrics.client_disconnects == 5, timeout_s=3.0)
        assert await eventually(lambda: backend.snapshot().in_flight == 0, timeout_s=3.0)
        await asyncio.sleep(1.6)  # past the first call's answer: nothing else may follow it
        assert mock.stats()["requests"] == 1
        snap = metrics.snapshot(backend.snapshot())
        assert snap["cache"]["miss"] == 0 and snap["by_status"] == {"499": 5}


async def test_a_request_whose_client_left_still_answers_the_identical_ones_sharing_it(
    mock: MockServer, tmp_path: Path
) -> None:
    # The owner's client leaves at 0.2 s; the sweep sees it by 1 s, well before the answer.
    mock.update_config(latency_s=1.6)
    async with serve(mock.url, tmp_path) as gw:
        metrics = gw.gateway.metrics
        owner = asyncio.ensure_future(_give_up(gw.url, "shared", 0.2))
        await asyncio.sleep(0.05)  # the owner's call is on the wire
        stayer = await gw.chat("shared")  # joins the owner's call
        assert await owner == "gave up"
        assert stayer.status == 200 and stayer.cache == "miss"
        assert mock.stats()["requests"] == 1  # the owner's call was kept, not sent again
        assert metrics.client_disconnects == 1 and metrics.coalesced == 1


async def test_concurrent_health_polls_share_one_probe(tmp_path: Path) -> None:
    settings = ProxySettings(port=0, health_check_timeout_s=0.5)
    async with upstream() as up, serve(up.url, tmp_path, settings) as gw:
        replies = await asyncio.wait_for(
            asyncio.gather(*(gw.get("/health") for _ in range(30))), 5.0
        )
        assert {r.json()["status"] for r in replies} == {"degraded"}  # the probe timed out
        assert up.models_calls == 1
