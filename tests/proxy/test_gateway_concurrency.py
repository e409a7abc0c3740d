"""Many clients at once: coalescing, clients that leave mid-stream, slow readers."""

from __future__ import annotations

import asyncio
import contextlib
import time
from pathlib import Path

import aiohttp
from gateway_harness import Served, chat_body, eventually, serve, sse_data, stream_text

from minima_llm.testing import MockServer

LONG = " ".join(f"w{i}" for i in range(40))


async def test_identical_requests_reach_the_upstream_once(mock: MockServer, tmp_path: Path) -> None:
    mock.update_config(latency_s=0.3)
    async with serve(mock.url, tmp_path) as gw:
        replies = await asyncio.gather(*(gw.chat("together") for _ in range(50)))
        assert mock.stats()["requests"] == 1
        assert {r.status for r in replies} == {200}
        assert {r.json()["choices"][0]["message"]["content"] for r in replies} == {
            "mock reply: together"
        }
        assert {r.cache for r in replies} == {"miss"}
        metrics = (await gw.get("/metrics")).json()
        assert metrics["coalesced"] == 49 and metrics["cache"]["miss"] == 1


async def test_identical_streams_reach_the_upstream_once(mock: MockServer, tmp_path: Path) -> None:
    mock.update_config(stream_chunk_delay_s=0.01)
    async with serve(mock.url, tmp_path) as gw:
        replies = await asyncio.gather(*(gw.chat(LONG, stream=True) for _ in range(50)))
        assert mock.stats()["requests"] == 1
        for reply in replies:
            events = reply.events()
            assert reply.status == 200 and events[-1] == "[DONE]"
            assert stream_text(events) == f"mock reply: {LONG}"
        assert (await gw.get("/metrics")).json()["coalesced"] == 49


async def test_a_whole_request_joins_an_identical_stream_in_flight(
    mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(stream_chunk_delay_s=0.02)
    async with serve(mock.url, tmp_path) as gw:
        streamed = asyncio.create_task(gw.chat(LONG, stream=True))
        await asyncio.sleep(0.2)  # the stream is under way
        whole = await gw.chat(LONG)
        assert stream_text((await streamed).events()) == f"mock reply: {LONG}"
        assert whole.status == 200
        body = whole.json()
        assert body["choices"][0]["message"]["content"] == f"mock reply: {LONG}"
        assert body["usage"]["completion_tokens"] > 0  # the stream asked for usage
        assert mock.stats()["requests"] == 1
        assert (await gw.get("/metrics")).json()["coalesced"] == 1


async def test_a_stream_joins_an_identical_whole_request_in_flight(
    mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(latency_s=0.3)
    async with serve(mock.url, tmp_path) as gw:
        whole = asyncio.create_task(gw.chat("asked both ways"))
        await asyncio.sleep(0.1)
        streamed = await gw.chat(
            "asked both ways", stream=True, stream_options={"include_usage": True}
        )
        assert (await whole).status == 200
        events = streamed.events()
        assert streamed.status == 200 and events[-1] == "[DONE]"
        assert stream_text(events) == "mock reply: asked both ways"
        assert mock.stats()["requests"] == 1
        assert (await gw.get("/metrics")).json()["coalesced"] == 1


async def _first_event(resp: aiohttp.ClientResponse) -> str:
    while True:
        line = (await resp.content.readline()).decode()
        if line.startswith("data: "):
            return line


async def test_client_leaving_mid_stream_frees_the_upstream(
    mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(stream_chunk_delay_s=0.05)
    async with serve(mock.url, tmp_path) as gw:
        backend = gw.backend
        async with gw.http.post(
            gw.url + "/v1/chat/completions", json=chat_body(LONG, stream=True)
        ) as resp:
            assert resp.status == 200
            await _first_event(resp)
            assert backend.snapshot().in_flight == 1
            resp.close()  # drop the connection, as a client killed mid-answer does
        assert await eventually(lambda: backend.snapshot().in_flight == 0)
        assert await eventually(
            lambda: gw.gateway.metrics.snapshot(backend.snapshot())["client_disconnects"] == 1
        )
        assert backend.snapshot().live_calls == 0
        again = await gw.chat(LONG)
        assert again.cache == "miss"  # the cut answer was not cached
        assert mock.stats()["requests"] == 2


async def test_one_coalesced_client_leaving_does_not_cut_the_other(
    mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(stream_chunk_delay_s=0.01)
    async with serve(mock.url, tmp_path) as gw:
        url = gw.url + "/v1/chat/completions"
        leaver = await gw.http.post(url, json=chat_body(LONG, stream=True))
        await _first_event(leaver)
        async with gw.http.post(url, json=chat_body(LONG, stream=True)) as stayer:
            first = await _first_event(stayer)
            leaver.close()
            rest = (await stayer.read()).decode()
        events = sse_data(first + rest)
        assert events[-1] == "[DONE]"
        assert stream_text(events) == f"mock reply: {LONG}"
        assert mock.stats()["requests"] == 1
        assert (await gw.chat(LONG)).cache == "hit"  # the survivor finished it, so it was stored


async def _slow_reader(gw: Served, lines_read: list[int], stop: asyncio.Event) -> None:
    body = chat_body("ECHO:" + "slow " * 3000, stream=True)
    async with gw.http.post(gw.url + "/v1/chat/completions", json=body) as resp:
        while not stop.is_set():
            if not await resp.content.readline():
                break
            lines_read[0] += 1
            await asyncio.sleep(0.02)
        resp.close()


async def test_a_slow_reader_does_not_stall_the_others(mock: MockServer, tmp_path: Path) -> None:
    # One upstream slot: if a slow reader held it, every other request would wait behind it.
    async with serve(mock.url, tmp_path, max_outstanding=1) as gw:
        lines_read, stop = [0], asyncio.Event()
        slow = asyncio.ensure_future(_slow_reader(gw, lines_read, stop))
        assert await eventually(lambda: lines_read[0] > 0)
        started = time.monotonic()
        replies = await asyncio.gather(
            *(gw.chat(f"quick {i}", stream=i % 2 == 0) for i in range(20))
        )
        elapsed = time.monotonic() - started
        assert {r.status for r in replies} == {200}
        assert all(r.events()[-1] == "[DONE]" for r in replies[::2])
        assert elapsed < 3.0
        assert not slow.done() and lines_read[0] < 1000  # still far from the end of its answer
        stop.set()
        await slow


async def test_client_leaving_before_the_first_chunk_frees_the_upstream(
    mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(latency_s=0.1, stream_chunk_delay_s=0.05)
    text = " ".join(f"w{i}" for i in range(12))  # about 0.7 s of stream
    async with serve(mock.url, tmp_path) as gw:
        backend, metrics = gw.backend, gw.gateway.metrics
        request = asyncio.ensure_future(
            gw.http.post(gw.url + "/v1/chat/completions", json=chat_body(text, stream=True))
        )
        await asyncio.sleep(0.05)
        request.cancel()  # gone while the gateway waits for the upstream's first chunk
        with contextlib.suppress(asyncio.CancelledError):
            await request
        assert await eventually(
            lambda: metrics.snapshot(backend.snapshot())["client_disconnects"] == 1
        )
        freed = await eventually(lambda: backend.snapshot().in_flight == 0, timeout_s=0.3)
        uncached = backend.snapshot().live_calls == 0
        # Let the stream end before closing, so no task is left pending at teardown.
        await eventually(lambda: backend.snapshot().in_flight == 0)
    assert freed, "the upstream stream kept its slot after its only client left"
    assert uncached


async def test_a_stream_whose_opener_left_still_counts_its_upstream_tokens(
    mock: MockServer, tmp_path: Path
) -> None:
    # The opener's client leaves, a coalesced reader follows the stream to its end: the
    # upstream answered in full (and it was cached), so its tokens were spent and count.
    mock.update_config(stream_chunk_delay_s=0.01)
    async with serve(mock.url, tmp_path) as gw:
        backend, metrics = gw.backend, gw.gateway.metrics
        url = gw.url + "/v1/chat/completions"
        opener = await gw.http.post(url, json=chat_body(LONG, stream=True))
        await _first_event(opener)
        async with gw.http.post(url, json=chat_body(LONG, stream=True)) as follower:
            await _first_event(follower)
            opener.close()
            assert (await follower.read()).decode().rstrip().endswith("[DONE]")
        # Both counted once the handlers are done, which is just after the last byte left.
        assert await eventually(lambda: metrics.client_disconnects == 1 and metrics.coalesced == 1)
        spent = backend.snapshot()
        snap = metrics.snapshot(spent)
        assert mock.stats()["requests"] == 1 and spent.live_calls == 1 and spent.tokens_out > 0
        assert snap["cache"]["miss"] == 1 and snap["coalesced"] == 1
        assert snap["tokens"]["upstream"] == {
            "prompt": spent.tokens_in,
            "completion": spent.tokens_out,
        }


async def test_a_stream_whose_client_left_while_the_upstream_hangs_frees_its_slot(
    mock: MockServer, tmp_path: Path
) -> None:
    # The upstream sends nothing for seconds (a stalled server); the client gives up. With
    # one slot, the stream nobody reads must not keep it until the upstream answers.
    mock.fail_next(mode="timeout", sleep_s=4.0)
    async with serve(mock.url, tmp_path, max_outstanding=1) as gw:
        backend, metrics = gw.backend, gw.gateway.metrics
        with contextlib.suppress(asyncio.TimeoutError):
            await gw.http.post(
                gw.url + "/v1/chat/completions",
                json=chat_body("nobody waits for this", stream=True),
                timeout=aiohttp.ClientTimeout(total=0.2),
            )
        started = time.monotonic()
        fresh = await gw.chat("a fresh question", stream=True)
        waited = time.monotonic() - started
        assert fresh.status == 200 and fresh.events()[-1] == "[DONE]"
        assert waited < 1.5, f"the fresh stream waited {waited:.1f}s for the abandoned one's slot"
        assert await eventually(
            lambda: metrics.snapshot(backend.snapshot())["client_disconnects"] == 1
        )
        assert await eventually(lambda: mock.stats()["concurrency"] == 0)
