"""Whole requests and streams sharing one upstream call: nobody's leaving or failure breaks the others."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from backend_support import BackendFactory, req
from minima_llm import MinimaLlmConfig, MinimaLlmFailure, MinimaLlmResponse, OpenAIMinimaLlm
from minima_llm.flight import JOINABLE_CHUNKS, Broadcast, Follower
from minima_llm.http import HttpResponse, StreamingResponse, Transport, make_transport
from minima_llm.testing import MockConfig, MockServer


class _SlowFirstLine:
    """A streaming response whose first line comes ``delay_s`` late: a model's time to first token."""

    def __init__(self, resp: StreamingResponse, delay_s: float) -> None:
        self._resp = resp
        self._delay_s = delay_s
        self.status = resp.status
        self.headers = resp.headers

    async def lines(self) -> AsyncIterator[bytes]:
        await asyncio.sleep(self._delay_s)
        async for line in self._resp.lines():
            yield line

    async def read(self) -> bytes:
        return await self._resp.read()

    async def aclose(self) -> None:
        await self._resp.aclose()


class SlowFirstToken:
    """A transport whose streams start ``delay_s`` after their headers (the mock answers at once)."""

    def __init__(self, inner: Transport, delay_s: float) -> None:
        self.inner = inner
        self.delay_s = delay_s

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        return await self.inner.post(url, body, headers, timeout_s)

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Any:
        return _SlowFirstLine(
            await self.inner.open_stream(url, body, headers, timeout_s), self.delay_s
        )

    async def aclose(self) -> None:
        await self.inner.aclose()


def backend(mock: MockServer, delay_s: float = 0.0) -> OpenAIMinimaLlm:
    config = MinimaLlmConfig(base_url=mock.url, model="mock-model", rpm=0, timeout_s=5.0)
    transport = SlowFirstToken(make_transport("aiohttp", 8), delay_s)
    return OpenAIMinimaLlm(config, transport=transport)


async def _read(opened: Any) -> int:
    count = 0
    async for _ in opened:
        count += 1
    return count


async def test_a_whole_request_leaving_before_the_first_token_does_not_cut_the_stream() -> None:
    async with MockServer(MockConfig()) as mock:
        be = backend(mock, delay_s=0.3)
        try:
            streaming = asyncio.ensure_future(be.open_stream(req(1, text="same question")))
            await asyncio.sleep(0.05)  # the stream is open, its first token not yet come
            whole = asyncio.ensure_future(be.call(req(2, text="same question")))
            await asyncio.sleep(0.05)  # the whole request follows the stream
            whole.cancel()  # and its own caller goes away
            await asyncio.gather(whole, return_exceptions=True)
            opened = await asyncio.wait_for(streaming, 5)
            assert await asyncio.wait_for(_read(opened), 5) > 0
            assert mock.stats()["requests"] == 1
        finally:
            await be.aclose()


async def test_a_whole_request_following_a_stream_that_fails_gets_its_own_answer() -> None:
    async with MockServer(MockConfig(latency_s=0.2)) as mock:
        be = backend(mock)
        try:
            mock.fail_next(1, status=400)  # the stream's open is refused
            streaming = asyncio.ensure_future(be.open_stream(req(1, text="asked twice")))
            await asyncio.sleep(0.05)
            whole = await asyncio.wait_for(be.call(req(2, text="asked twice")), 5)
            assert isinstance(await streaming, MinimaLlmFailure)
            # The refusal was the stream's: the whole request asked for itself and got an answer.
            assert isinstance(whole, MinimaLlmResponse)
        finally:
            await be.aclose()


async def test_streams_waiting_on_a_whole_call_whose_owner_left_share_one_stream() -> None:
    async with MockServer(MockConfig(latency_s=0.2, stream_chunk_delay_s=0.01)) as mock:
        be = backend(mock)
        try:
            owner = asyncio.ensure_future(be.call(req(1, text="same")))
            await asyncio.sleep(0.02)
            streams = [asyncio.ensure_future(be.open_stream(req(i, text="same"))) for i in (2, 3)]
            await asyncio.sleep(0.02)
            owner.cancel()
            await asyncio.gather(owner, return_exceptions=True)
            for opened in streams:
                assert await asyncio.wait_for(_read(await opened), 5) > 0
            assert mock.stats()["requests"] == 2  # the cancelled whole call, then one stream
            # Nothing left behind: a later whole request goes straight to the upstream.
            later = await asyncio.wait_for(be.call(req(4, text="something else")), 5)
            assert isinstance(later, MinimaLlmResponse)
        finally:
            await be.aclose()


async def test_a_stream_whose_opener_left_before_the_first_byte_opens_again_for_its_followers(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    be = make_backend()
    mock.update_config(latency_s=0.3)  # the upstream takes its time to answer the open
    opener = asyncio.ensure_future(be.open_stream(req(1, text="asked twice")))
    await asyncio.sleep(0.05)
    follower = asyncio.ensure_future(be.open_stream(req(2, text="asked twice")))
    await asyncio.sleep(0.05)
    opener.cancel()  # its client went away while the stream was still opening
    await asyncio.gather(opener, return_exceptions=True)
    opened = await asyncio.wait_for(follower, 5)
    # The follower was not cancelled: its own stream opens and is read to the end.
    assert not isinstance(opened, MinimaLlmFailure) and not opened.coalesced
    assert await asyncio.wait_for(_read(opened), 5) > 0
    assert mock.stats()["requests"] == 2
    assert be.stats.coalesced == 0


async def test_a_whole_request_on_a_stream_whose_opener_left_shares_the_next_call(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    be = make_backend()
    mock.update_config(latency_s=0.3)
    opener = asyncio.ensure_future(be.open_stream(req(1, text="asked thrice")))
    await asyncio.sleep(0.05)
    streamed = asyncio.ensure_future(be.open_stream(req(2, text="asked thrice")))
    whole = asyncio.ensure_future(be.call(req(3, text="asked thrice")))
    await asyncio.sleep(0.05)
    opener.cancel()  # both others were following its stream when it went away
    await asyncio.gather(opener, return_exceptions=True)
    opened = await asyncio.wait_for(streamed, 5)
    assert not isinstance(opened, MinimaLlmFailure)
    assert await asyncio.wait_for(_read(opened), 5) > 0
    answer = await asyncio.wait_for(whole, 5)
    assert isinstance(answer, MinimaLlmResponse) and answer.cache_source == "inflight"
    # The cancelled open, then one call that the stream and the whole request shared.
    assert mock.stats()["requests"] == 2


class _Burst:
    """A streaming response whose lines all arrive at once: read ahead, then handed out without a wait."""

    def __init__(self, resp: StreamingResponse) -> None:
        self._resp = resp
        self.status = resp.status
        self.headers = resp.headers
        self.total = 0
        self.handed = 0

    async def lines(self) -> AsyncIterator[bytes]:
        buffered = [line async for line in self._resp.lines()]
        self.total = len(buffered)
        for line in buffered:
            self.handed += 1
            yield line

    async def read(self) -> bytes:
        return await self._resp.read()

    async def aclose(self) -> None:
        await self._resp.aclose()


class BurstTransport(SlowFirstToken):
    """A transport whose streams come in one burst; ``last`` is the latest one opened."""

    last: _Burst | None = None

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Any:
        self.last = _Burst(await self.inner.open_stream(url, body, headers, timeout_s))
        return self.last


async def test_a_burst_of_chunks_reaches_the_reader_from_the_first_not_after_the_last() -> None:
    async with MockServer(MockConfig()) as mock:
        config = MinimaLlmConfig(base_url=mock.url, model="mock-model", rpm=0, timeout_s=5.0)
        transport = BurstTransport(make_transport("aiohttp", 8), 0.0)
        be = OpenAIMinimaLlm(config, transport=transport)
        try:
            opened = await be.open_stream(req(1, text="a question with a long answer"))
            assert not isinstance(opened, MinimaLlmFailure)
            first = await anext(aiter(opened))
            burst = transport.last
            assert burst is not None and burst.total >= 10, burst and burst.total
            # The first chunk went out before the producer read on through the burst.
            assert burst.handed <= 3, (burst.handed, burst.total)
            assert first and await asyncio.wait_for(_read(opened), 5) > 0
            assert burst.handed == burst.total
        finally:
            await be.aclose()


def _content(chunk: dict[str, Any]) -> str:
    choices = chunk.get("choices") or [{}]
    return str(choices[0].get("delta", {}).get("content") or "")


async def test_a_long_stream_keeps_only_what_its_reader_has_still_to_read(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # A reasoning model's 30,000-token answer used to stay in memory, chunk by chunk,
    # until its stream ended, in case an identical request joined it late.
    be = make_backend()
    words = [f"w{i}" for i in range(JOINABLE_CHUNKS + 3_000)]
    opened = await be.open_stream(req(1, text="ECHO:" + " ".join(words)))
    assert not isinstance(opened, MinimaLlmFailure) and isinstance(opened.chunks, Follower)
    reader, flight = opened.chunks, opened.chunks.flight
    text = []
    async for chunk in opened:
        text.append(_content(chunk))
        if not flight.joinable:
            # Held: what the reader has not read yet, and what came since the last trim.
            assert len(flight.chunks) <= flight.published - reader.position + 257
    assert "".join(text).split() == words
    assert flight.base > JOINABLE_CHUNKS - 256 and not flight.joinable
    # Still cached whole: the answer was assembled as it came, not from the held chunks.
    again = await be.call(req(2, text="ECHO:" + " ".join(words)))
    assert isinstance(again, MinimaLlmResponse) and again.cached
    assert again.text.split() == words


class _HeldLines(_SlowFirstLine):
    """A streaming response that stops after ``count`` lines until ``go`` is set."""

    def __init__(self, resp: StreamingResponse, count: int, go: asyncio.Event) -> None:
        super().__init__(resp, 0.0)
        self._count = count
        self._go = go

    async def lines(self) -> AsyncIterator[bytes]:
        async for line in self._resp.lines():
            self._count -= 1
            if self._count == 0:
                await self._go.wait()
            yield line


class HoldFirstStream(SlowFirstToken):
    """A transport whose first stream stops after ``count`` lines until ``go`` is set."""

    def __init__(self, inner: Transport, count: int) -> None:
        super().__init__(inner, 0.0)
        self.count = count
        self.go = asyncio.Event()
        self.opened = 0

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Any:
        resp = await self.inner.open_stream(url, body, headers, timeout_s)
        self.opened += 1
        return _HeldLines(resp, self.count, self.go) if self.opened == 1 else resp


async def test_a_request_for_a_stream_past_its_joinable_length_makes_its_own_call(
    mock: MockServer, tmp_path: Path
) -> None:
    words = [f"w{i}" for i in range(JOINABLE_CHUNKS + 500)]
    question = "ECHO:" + " ".join(words)
    config = MinimaLlmConfig(
        base_url=mock.url, model="mock-model", rpm=0, timeout_s=5.0, cache_dir=str(tmp_path)
    )
    # Two lines an event: its data line and the blank line that ends it.
    transport = HoldFirstStream(make_transport("aiohttp", 8), 2 * (JOINABLE_CHUNKS + 200))
    be = OpenAIMinimaLlm(config, transport=transport)
    try:
        first = await be.open_stream(req(1, text=question))
        assert not isinstance(first, MinimaLlmFailure)
        iterator = aiter(first)
        for _ in range(JOINABLE_CHUNKS + 100):  # past the length a newcomer may join at
            await anext(iterator)
        second = await be.open_stream(req(2, text=question))
        assert not isinstance(second, MinimaLlmFailure) and not second.coalesced
        # The newcomer reads its own stream from the first word; the first reader goes on.
        late = "".join([_content(chunk) async for chunk in second]).split()
        assert late == words and transport.opened == 2
        transport.go.set()
        rest = "".join([_content(chunk) async for chunk in first]).split()
        assert rest == words[JOINABLE_CHUNKS + 99 :]  # the role chunk came first, empty
        assert be.streams.live == 0  # both forgotten once ended, neither counted twice
        answer = await be.call(req(3, text=question))
        assert isinstance(answer, MinimaLlmResponse) and answer.cached
    finally:
        await be.aclose()


async def _take(reader: Follower, count: int) -> None:
    for _ in range(count):
        await anext(reader)


async def test_a_broadcast_drops_only_what_every_reader_has_read() -> None:
    flight = Broadcast(joinable_chunks=300)
    fast, slow = flight.follow(), flight.follow()
    for i in range(300):
        flight.publish({"i": i})
    await _take(fast, 300)
    await _take(slow, 100)
    flight.reserve()  # a reader about to follow holds every chunk from the first, so
    flight.publish({"i": 300})  # one past the joinable length: joinable no more,
    assert not flight.joinable and flight.base == 0  # but nothing dropped for it yet
    late = flight.follow(reserved=True)
    for i in range(301, 512):
        flight.publish({"i": i})
    assert flight.base == 0  # the late reader has read nothing
    await _take(late, 250)
    await _take(slow, 200)
    for i in range(512, 768):
        flight.publish({"i": i})
    assert flight.base == 250  # the late reader's place, the least of the three
    assert flight.chunks[0] == {"i": 250} and flight.published == 768
    with pytest.raises(RuntimeError):
        flight.follow()  # a newcomer would miss the first 250 chunks
    slow.close()
    await _take(fast, 300)
    await _take(late, 350)
    for i in range(768, 1024):
        flight.publish({"i": i})
    assert flight.base == 600  # the fast reader's place now, with the slow one gone
    assert await anext(late) == {"i": 600}
