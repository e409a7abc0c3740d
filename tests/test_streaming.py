"""Streaming: SSE decoding and chunk assembly tables, and the backend's streams against the mock."""

from __future__ import annotations

import asyncio
import contextlib

import pytest
from aiohttp import web

from backend_support import BackendFactory, req
from minima_llm import MinimaLlmFailure, MinimaLlmResponse
from minima_llm.backend import ChunkStream, StreamError
from minima_llm.streaming import ChunkAssembler, SseDecoder, encode_event, replay_chunks
from minima_llm.testing import MockServer
from minima_llm.upstream import StreamInterrupted


@pytest.mark.parametrize(
    ("lines", "events"),
    [
        ([b"data: {}\n", b"\n"], ["{}"]),
        ([b"data: a\r\n", b"data: b\r\n", b"\r\n"], ["a\nb"]),
        ([b": keep-alive\n", b"\n", b"data:x\n", b"\n"], ["x"]),
        ([b"event: message\n", b"id: 3\n", b"data: [DONE]\n", b"\n"], ["[DONE]"]),
        ([b"data: tail-without-blank-line\n"], ["tail-without-blank-line"]),
        ([b"\n", b"\n"], []),
    ],
)
def test_sse_decoder(lines: list[bytes], events: list[str]) -> None:
    decoder = SseDecoder()
    got = [e for e in (decoder.feed(line) for line in lines) if e is not None]
    tail = decoder.close()
    assert [*got, *([tail] if tail is not None else [])] == events


def test_encode_event() -> None:
    assert encode_event("[DONE]") == b"data: [DONE]\n\n"
    assert encode_event({"a": 1}) == b'data: {"a":1}\n\n'


def test_assembler_and_replay_round_trip() -> None:
    completion = {
        "id": "c1",
        "object": "chat.completion",
        "created": 5,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "message": {"role": "assistant", "content": "hello there world"},
                "finish_reason": "stop",
            },
            {
                "index": 1,
                "message": {"role": "assistant", "content": "second"},
                "finish_reason": "length",
            },
        ],
        "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7},
    }
    chunks = list(replay_chunks(completion, piece_chars=4))
    assert chunks[-1]["choices"] == [] and chunks[-1]["usage"]["total_tokens"] == 7
    assembler = ChunkAssembler()
    for chunk in chunks:
        assert chunk["object"] == "chat.completion.chunk"
        assembler.add(chunk)
    assert assembler.finished
    assert assembler.completion() == completion


def test_text_completion_kind() -> None:
    completion = {
        "id": "t",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "abc", "finish_reason": "stop"}],
    }
    assembler = ChunkAssembler(kind="text")
    for chunk in replay_chunks(completion, kind="text", include_usage=False, piece_chars=1):
        assembler.add(chunk)
    assert assembler.completion() == completion


async def _collect(stream: ChunkStream | MinimaLlmFailure) -> str:
    assert isinstance(stream, ChunkStream), stream
    assembler = ChunkAssembler()
    async for chunk in stream:
        assembler.add(chunk)
    return assembler.text()


async def test_stream_matches_generate_and_is_cached_whole(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend()
    opened = await backend.open_stream(req(1, text="stream me please"))
    assert isinstance(opened, ChunkStream) and not opened.cached
    assert await _collect(opened) == "mock reply: stream me please"
    again = await backend.generate(req(1, text="stream me please"))
    assert isinstance(again, MinimaLlmResponse) and again.cached
    assert again.text == "mock reply: stream me please"
    assert again.usage.completion_tokens > 0  # usage from the stream's final chunk
    assert mock.stats()["requests"] == 1


async def test_cached_answer_replays_as_a_stream(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend()
    await backend.generate(req(2))
    replay = await backend.open_stream(req(2))
    assert isinstance(replay, ChunkStream) and replay.cached and replay.cache_source == "primary"
    assert await _collect(replay) == "mock reply: question 2"
    assert mock.stats()["requests"] == 1


async def test_stream_helper_yields_chunks(make_backend: BackendFactory) -> None:
    backend = make_backend()
    pieces = [
        c["choices"][0]["delta"].get("content", "")
        async for c in backend.stream(req(3))
        if c["choices"]
    ]
    assert "".join(pieces) == "mock reply: question 3"


async def test_retry_before_first_byte(make_backend: BackendFactory, mock: MockServer) -> None:
    mock.fail_next(2, status=503)
    backend = make_backend()
    assert await _collect(await backend.open_stream(req(4))) == "mock reply: question 4"
    assert backend.snapshot().retries == 2


async def test_open_failure_is_returned_and_stream_helper_raises(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend(max_attempts=1)
    mock.fail_next(1, status=400)
    failure = await backend.open_stream(req(5))
    assert isinstance(failure, MinimaLlmFailure) and failure.status == 400
    mock.fail_next(1, status=400)
    with pytest.raises(StreamError) as info:
        async for _ in backend.stream(req(5)):
            pass
    assert info.value.failure.status == 400


async def test_truncated_stream_is_reported_and_not_cached(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend()
    mock.fail_next(1, mode="truncate_stream")
    opened = await backend.open_stream(req(6, text="one two three four five six"))
    with pytest.raises(StreamInterrupted):
        await _collect(opened)
    assert backend.snapshot().failures == 1
    fresh = await backend.generate(req(6, text="one two three four five six"))
    assert isinstance(fresh, MinimaLlmResponse) and not fresh.cached


async def test_identical_streams_share_one_upstream_call(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(stream_chunk_delay_s=0.01)
    backend = make_backend()
    opened = await asyncio.gather(
        *(backend.open_stream(req(i, text="shared stream")) for i in range(20))
    )
    texts = await asyncio.gather(*(_collect(o) for o in opened))
    assert set(texts) == {"mock reply: shared stream"}
    assert mock.stats()["requests"] == 1
    assert sum(isinstance(o, ChunkStream) and o.coalesced for o in opened) == 19


async def test_reader_leaving_cancels_the_upstream_stream(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(stream_chunk_delay_s=0.05)
    backend = make_backend()
    opened = await backend.open_stream(req(7, text=" ".join(["word"] * 60)))
    assert isinstance(opened, ChunkStream)
    async for _ in opened:
        break
    await opened.aclose()
    for _ in range(100):
        if backend.snapshot().in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert backend.snapshot().in_flight == 0
    assert backend.snapshot().live_calls == 0  # not completed, so not cached
    with contextlib.suppress(Exception):
        await opened.aclose()
    again = await backend.generate(req(7, text=" ".join(["word"] * 60)))
    assert isinstance(again, MinimaLlmResponse) and not again.cached


async def test_a_stream_that_only_drips_keep_alives_gives_up_in_time(
    make_backend: BackendFactory,
) -> None:
    # Each read gets bytes (an SSE comment) well within the timeout, but no chunk ever
    # comes: the wait for the first one has a bound of its own, and holds no slot after.
    async def dripping(request: web.Request) -> web.StreamResponse:
        await request.read()
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        with contextlib.suppress(ConnectionError):
            for _ in range(500):
                await resp.write(b": still thinking\n\n")
                await asyncio.sleep(0.02)
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", dripping)
    runner = web.AppRunner(app, shutdown_timeout=0.5)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
        # Reads get bytes every 20 ms, far inside the timeout even on a busy machine.
        backend = make_backend(base_url=url, timeout_s=1.0, max_attempts=2)
        started = asyncio.get_running_loop().time()
        opened = await asyncio.wait_for(backend.open_stream(req(1)), 10)
        assert isinstance(opened, MinimaLlmFailure) and opened.error_type == "TimeoutError"
        assert opened.attempts == 2
        assert asyncio.get_running_loop().time() - started < 8
        assert backend.upstream.in_flight_limit == backend.cfg.max_outstanding
        assert backend.stats.in_flight == 0
    finally:
        await runner.cleanup()
