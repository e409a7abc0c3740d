"""Admission: past ``proxy.max_queued`` waiting requests, a cache miss is refused with a 503."""

from __future__ import annotations

import asyncio
from pathlib import Path

import openai
from gateway_harness import Reply, eventually, serve
from test_gateway_endpoints import _samples

from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockServer


def refused(reply: Reply) -> bool:
    """A 503 in OpenAI's shape saying the gateway is at capacity, with a Retry-After."""
    if reply.status != 503:
        return False
    error = reply.json()["error"]
    return (
        error["code"] == "queue_full"
        and error["type"] == "server_error"
        and "at capacity" in error["message"]
        and int(reply.headers["Retry-After"]) >= 1
    )


async def test_a_burst_past_the_queue_is_refused_and_hits_still_answer(
    mock: MockServer, tmp_path: Path
) -> None:
    settings = ProxySettings(port=0, max_queued=2)
    async with serve(mock.url, tmp_path, settings, max_outstanding=1) as gw:
        assert (await gw.chat("cached")).status == 200
        mock.update_config(latency_s=0.5)
        burst = [asyncio.ensure_future(gw.chat(f"burst {i}")) for i in range(6)]
        assert await eventually(lambda: gw.backend.upstream.refused == 3)
        waiting = next(i for i, call in enumerate(burst) if not call.done())
        # Meanwhile: a request identical to one waiting, a cache hit, and a stream.
        joining = asyncio.ensure_future(gw.chat(f"burst {waiting}"))
        hit, stream = await asyncio.gather(gw.chat("cached"), gw.chat("streamed", stream=True))
        metrics = (await gw.get("/metrics")).json()
        prometheus = _samples((await gw.get("/metrics/prometheus")).text)
        replies = await asyncio.gather(*burst)
        joined = await joining
    assert sum(r.status == 200 for r in replies) == 3
    assert sum(refused(r) for r in replies) == 3
    assert hit.status == 200 and hit.cache == "hit"
    assert joined.status == 200 and joined.cache == "miss"  # coalesced, not refused
    assert refused(stream) and stream.headers["Content-Type"].startswith("application/json")
    assert metrics["refused"] == 4
    assert metrics["upstream_queued"] == 2
    assert prometheus[("minima_gateway_refused_total", ())] == metrics["refused"]
    assert prometheus[("minima_gateway_upstream_queued", ())] == 2
    assert mock.stats()["requests"] == 1 + 3  # the warm-up, then only the admitted ones


async def test_the_openai_sdk_retries_a_refusal_and_gets_its_answer(
    mock: MockServer, tmp_path: Path
) -> None:
    settings = ProxySettings(port=0, max_queued=1)
    async with serve(mock.url, tmp_path, settings, max_outstanding=1) as gw:
        assert (await gw.chat("warm")).status == 200
        # Long enough for the SDK's request to find the queue full, and to retry after
        # the Retry-After second into a queue with room.
        mock.update_config(latency_s=1.0)
        busy = [asyncio.ensure_future(gw.chat(f"busy {i}")) for i in range(2)]
        assert await eventually(lambda: gw.backend.upstream.queued == 1)
        client = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=3)
        async with client:
            answer = await client.chat.completions.create(
                model="mock-model", messages=[{"role": "user", "content": "patient"}]
            )
        assert answer.choices[0].message.content == "mock reply: patient"
        assert gw.backend.upstream.refused >= 1
        assert all(r.status == 200 for r in await asyncio.gather(*busy))


async def test_a_miss_that_waits_too_long_for_a_slot_is_refused(
    mock: MockServer, tmp_path: Path
) -> None:
    settings = ProxySettings(port=0, max_queue_wait_s=0.2)
    async with serve(mock.url, tmp_path, settings, max_outstanding=1) as gw:
        assert (await gw.chat("warm")).status == 200
        mock.update_config(latency_s=1.0)
        slow = asyncio.ensure_future(gw.chat("slow"))
        assert await eventually(lambda: gw.backend.snapshot().in_flight == 1)
        waited = await gw.chat("waited")
        assert refused(waited) and "within 0.2s" in waited.json()["error"]["message"]
        assert not slow.done()
        assert (await slow).status == 200


async def test_a_miss_that_waits_too_long_for_tokens_is_refused_and_costs_none(
    mock: MockServer, tmp_path: Path
) -> None:
    # 100 tokens a second with one second of burst: each request below costs most of it.
    mock.update_config(tpm=6000)
    settings = ProxySettings(port=0, max_queue_wait_s=0.2)
    async with serve(mock.url, tmp_path, settings) as gw:
        assert (await gw.chat("warm", max_tokens=80)).status == 200
        assert gw.backend.upstream.tokens.limit == 6000  # learned from the answer
        loop = asyncio.get_running_loop()
        started = loop.time()
        waited = await gw.chat("waited", max_tokens=80)
        elapsed = loop.time() - started
        assert refused(waited) and "within 0.2s" in waited.json()["error"]["message"]
        assert elapsed < 0.6  # not the second or so the tokens would have taken
        assert mock.stats()["requests"] == 1
        # Nothing was kept for the refused request: the next one goes once the bucket refills.
        tokens = gw.backend.upstream.tokens
        assert await eventually(lambda: tokens.level() >= 90, timeout_s=5.0)
        later = await asyncio.wait_for(gw.chat("later", max_tokens=80), 10.0)
        assert later.status == 200
    assert mock.stats()["rate_limited"] == 0
