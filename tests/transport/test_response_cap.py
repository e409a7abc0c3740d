"""max_response_bytes: both transports refuse an answer past the cap, early and with bounded memory.

The upstream is a raw HTTP/1.1 server on 127.0.0.1 whose answers the tests write byte
by byte: a Content-Length with no body behind it, a chunked body that never ends, a
gzip bomb. It numbers its connections, so a test can tell whether one was reused.
"""

from __future__ import annotations

import asyncio
import functools
import gzip
import itertools
import json
import time
import tracemalloc
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import pytest

from local_server import Listener, read_request
from minima_llm.http import Transport, TransportError, decode_body, make_transport

CAP = 2**20
BODY = b'{"model": "m", "messages": []}'
JSON = {"Content-Type": "application/json"}
OK = b'{"ok": true}'
# Each stream line is 1 KiB, so CAP bytes are exactly 1024 lines.
LINE = b"data: " + b"x" * 1017 + b"\n"
# A body "that never ends" stops here, so a transport that reads on is a failure, not a hang.
ENDLESS = 64 * 2**20
PIECE = 2**16
GZIP = {"Content-Encoding": "gzip"}

Writer = asyncio.StreamWriter
Route = Callable[["RawUpstream", int, asyncio.StreamReader, Writer], Awaitable[None]]


@functools.cache
def bomb() -> bytes:
    """50 MB of zeros, gzipped to about 50 KB."""
    return gzip.compress(bytes(50 * 10**6), 9)


def head(length: int | None, extra: dict[str, str] | None = None) -> bytes:
    """A 200's status line and headers: a Content-Length, or chunked when ``length`` is None."""
    fields = {"Content-Type": "application/json", **(extra or {})}
    if length is None:
        fields["Transfer-Encoding"] = "chunked"
    else:
        fields["Content-Length"] = str(length)
    lines = "".join(f"{name}: {value}\r\n" for name, value in fields.items())
    return f"HTTP/1.1 200 OK\r\n{lines}\r\n".encode()


def chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


class RawUpstream:
    """A keep-alive HTTP/1.1 server answering each path with a route written by hand."""

    def __init__(self, routes: dict[str, Route]) -> None:
        self.routes = {"/v1/ok": _ok, **routes}
        self.requests: list[tuple[int, str]] = []  # (connection number, path)
        self.sent: dict[int, int] = {}  # body bytes a route got onto a connection
        self.gave_up: list[int] = []  # connections the client closed mid-answer
        self._numbers = itertools.count(1)
        self._listener = Listener(self._serve)

    async def __aenter__(self) -> RawUpstream:
        self.port = await self._listener.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._listener.stop()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}/v1/{path}"

    def connection_of(self, index: int) -> int:
        return self.requests[index][0]

    async def _serve(self, reader: asyncio.StreamReader, writer: Writer) -> None:
        number = next(self._numbers)
        while (request := await read_request(reader)) is not None:
            path = request[0].split()[1]
            self.requests.append((number, path))
            try:
                await self.routes[path](self, number, reader, writer)
            except ConnectionError:
                self.gave_up.append(number)
                return


async def _ok(up: RawUpstream, number: int, reader: asyncio.StreamReader, w: Writer) -> None:
    w.write(head(len(OK)) + OK)
    await w.drain()


def length_route(size: int, encoding: str | None = None) -> Route:
    """A body of ``size`` bytes (gzipped when asked) behind a Content-Length."""
    body = bytes(size)
    if encoding == "gzip":
        body = gzip.compress(body)

    async def route(up: RawUpstream, number: int, reader: asyncio.StreamReader, w: Writer) -> None:
        w.write(head(len(body), GZIP if encoding else None) + body)
        await w.drain()

    return route


def chunked_route(
    pieces: Callable[[], Iterable[bytes]], extra: dict[str, str] | None = None
) -> Route:
    """A chunked body of ``pieces()``, counting what gets onto the connection."""

    async def route(up: RawUpstream, number: int, reader: asyncio.StreamReader, w: Writer) -> None:
        w.write(head(None, extra))
        up.sent[number] = 0
        for piece in pieces():
            w.write(chunk(piece))
            await w.drain()
            up.sent[number] += len(piece)
        w.write(b"0\r\n\r\n")
        await w.drain()

    return route


def zeros(total: int) -> Iterable[bytes]:
    for start in range(0, total, PIECE):
        yield bytes(min(PIECE, total - start))


def lines(count: int) -> Callable[[], Iterable[bytes]]:
    return lambda: (LINE * 64 for _ in range(count // 64))


async def declared_only(
    up: RawUpstream, number: int, reader: asyncio.StreamReader, w: Writer
) -> None:
    """Headers promising ten caps of body, then nothing until the client hangs up."""
    w.write(head(10 * CAP))
    await w.drain()
    up.sent[number] = 0
    if not await reader.read(1):
        up.gave_up.append(number)


ROUTES: dict[str, Route] = {
    "/v1/declared": declared_only,
    "/v1/length-over": length_route(CAP + 1),
    "/v1/length-exact": length_route(CAP),
    "/v1/length-double": length_route(2 * CAP),
    "/v1/chunked-endless": chunked_route(lambda: zeros(ENDLESS)),
    "/v1/chunked-over": chunked_route(lambda: zeros(CAP + 1)),
    "/v1/chunked-exact": chunked_route(lambda: zeros(CAP)),
    "/v1/chunked-double": chunked_route(lambda: zeros(2 * CAP)),
    "/v1/gzip-over": length_route(CAP + 1, "gzip"),
    "/v1/gzip-exact": length_route(CAP, "gzip"),
    "/v1/gzip-double": length_route(2 * CAP, "gzip"),
    "/v1/stream-endless": chunked_route(lines(ENDLESS // len(LINE))),
    "/v1/stream-exact": chunked_route(lines(CAP // len(LINE))),
    "/v1/stream-double": chunked_route(lines(2 * CAP // len(LINE))),
    "/v1/stream-one-line": chunked_route(lambda: itertools.chain(zeros(4 * CAP), [b"\n"])),
}


@pytest.fixture
async def upstream() -> AsyncIterator[RawUpstream]:
    async with RawUpstream(dict(ROUTES)) as up:
        yield up


@pytest.fixture
async def capped(transport: str) -> AsyncIterator[Transport]:
    # One connection: a refused one put back in the pool would be the next request's.
    t = make_transport(transport, 1, max_response_bytes=CAP)
    yield t
    await t.aclose()


async def refused(t: Transport, url: str) -> TransportError:
    with pytest.raises(TransportError) as info:
        await t.post(url, BODY, JSON, 5.0)
    assert info.value.kind == "too_large"
    assert f"max_response_bytes={CAP}" in str(info.value)
    return info.value


async def read_stream(t: Transport, url: str, got: list[bytes]) -> None:
    stream = await t.open_stream(url, BODY, JSON, 5.0)
    try:
        async for line in stream.lines():
            got.append(line)
    finally:
        await stream.aclose()


async def assert_next_request_works(t: Transport, up: RawUpstream, *, new: bool = True) -> None:
    """The next request gets its own answer, on a new connection when ``new``."""
    refused_on = up.connection_of(-1)
    resp = await t.post(up.url("ok"), BODY, JSON, 5.0)
    assert (resp.status, resp.body) == (200, OK)
    if new:
        assert up.connection_of(-1) != refused_on


async def test_a_content_length_over_the_cap_is_refused_before_the_body(
    capped: Transport, upstream: RawUpstream
) -> None:
    # The server sends no byte of the body it announces: a transport that waited for
    # it would time out after 5 s instead.
    started = time.monotonic()
    error = await refused(capped, upstream.url("declared"))
    assert time.monotonic() - started < 2.0
    assert f"Content-Length is {10 * CAP}" in str(error)
    await assert_next_request_works(capped, upstream)
    assert upstream.gave_up == [upstream.connection_of(0)]


@pytest.mark.parametrize("path", ["length-over", "chunked-over", "gzip-over"])
async def test_one_byte_over_the_cap_is_refused(
    capped: Transport, upstream: RawUpstream, transport: str, path: str
) -> None:
    await refused(capped, upstream.url(path))
    # aiohttp pools a connection as soon as the whole answer has arrived, before the
    # transport has counted it: then the connection it reuses holds nothing of it.
    await assert_next_request_works(capped, upstream, new=transport != "aiohttp")


@pytest.mark.parametrize("path", ["length-exact", "chunked-exact", "gzip-exact"])
async def test_an_answer_exactly_at_the_cap_is_accepted(
    capped: Transport, upstream: RawUpstream, path: str
) -> None:
    resp = await capped.post(upstream.url(path), BODY, JSON, 5.0)
    assert resp.status == 200 and resp.body == bytes(CAP)
    # Read to its end, the connection is as good as any: it is kept.
    resp = await capped.post(upstream.url("ok"), BODY, JSON, 5.0)
    assert resp.body == OK
    assert upstream.connection_of(-1) == upstream.connection_of(-2)


async def test_a_chunked_body_is_refused_once_the_bytes_read_pass_the_cap(
    capped: Transport, upstream: RawUpstream
) -> None:
    tracemalloc.start()
    try:
        await refused(capped, upstream.url("chunked-endless"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    # Socket buffers hold a few MiB more than the transport read; never the whole body.
    number = upstream.connection_of(0)
    for _ in range(200):
        if number in upstream.gave_up:
            break
        await asyncio.sleep(0.01)
    assert number in upstream.gave_up
    assert upstream.sent[number] < ENDLESS // 4
    assert peak < 8 * CAP
    await assert_next_request_works(capped, upstream)


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_gzip_bomb_is_refused_without_expanding_it(
    capped: Transport, upstream: RawUpstream, framing: str
) -> None:
    data = bomb()
    if framing == "length":

        async def route(up: RawUpstream, n: int, r: asyncio.StreamReader, w: Writer) -> None:
            w.write(head(len(data), GZIP) + data)
            await w.drain()

        upstream.routes["/v1/bomb"] = route
    else:
        upstream.routes["/v1/bomb"] = chunked_route(lambda: [data], GZIP)
    tracemalloc.start()
    try:
        await refused(capped, upstream.url("bomb"))
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 * CAP  # the bomb holds 50 MB
    await assert_next_request_works(capped, upstream)


@pytest.mark.parametrize("path", ["length-double", "chunked-double", "gzip-double"])
async def test_a_cap_of_zero_means_no_cap(transport: str, upstream: RawUpstream, path: str) -> None:
    t = make_transport(transport, 1, max_response_bytes=0)
    try:
        resp = await t.post(upstream.url(path), BODY, JSON, 5.0)
    finally:
        await t.aclose()
    assert resp.body == bytes(2 * CAP)


async def test_the_default_cap_takes_an_ordinary_answer(
    transport: str, upstream: RawUpstream
) -> None:
    t = make_transport(transport, 1)
    try:
        resp = await t.post(upstream.url("chunked-double"), BODY, JSON, 5.0)
    finally:
        await t.aclose()
    assert resp.body == bytes(2 * CAP)


async def test_a_stream_past_the_cap_raises_from_lines(
    capped: Transport, upstream: RawUpstream
) -> None:
    got: list[bytes] = []
    with pytest.raises(TransportError) as info:
        await read_stream(capped, upstream.url("stream-endless"), got)
    assert info.value.kind == "too_large"
    assert f"max_response_bytes={CAP}" in str(info.value)
    assert sum(map(len, got)) == CAP  # every line within the cap, then the refusal
    await assert_next_request_works(capped, upstream)


async def test_a_stream_line_longer_than_the_cap_is_refused(
    capped: Transport, upstream: RawUpstream, transport: str
) -> None:
    got: list[bytes] = []
    tracemalloc.start()
    try:
        with pytest.raises(TransportError) as info:
            await read_stream(capped, upstream.url("stream-one-line"), got)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert info.value.kind == "too_large" and got == []
    if transport != "aiohttp":
        # Read at most to the cap. aiohttp gathers a line whole (up to its 16 MiB line
        # limit) before the transport sees it.
        assert peak < 3 * CAP
    await assert_next_request_works(capped, upstream, new=transport != "aiohttp")


async def test_a_stream_exactly_at_the_cap_is_read_whole(
    capped: Transport, upstream: RawUpstream
) -> None:
    got: list[bytes] = []
    await read_stream(capped, upstream.url("stream-exact"), got)
    assert sum(map(len, got)) == CAP and set(got) == {LINE}


async def test_a_stream_with_a_cap_of_zero_is_not_capped(
    transport: str, upstream: RawUpstream
) -> None:
    t = make_transport(transport, 1, max_response_bytes=0)
    got: list[bytes] = []
    try:
        await read_stream(t, upstream.url("stream-double"), got)
    finally:
        await t.aclose()
    assert sum(map(len, got)) == 2 * CAP


async def test_a_streamed_error_body_past_the_cap_is_refused(
    capped: Transport, upstream: RawUpstream
) -> None:
    # An upstream answering a stream with one JSON body: the caller reads it whole.
    stream = await capped.open_stream(upstream.url("length-double"), BODY, JSON, 5.0)
    try:
        with pytest.raises(TransportError) as info:
            await stream.read()
    finally:
        await stream.aclose()
    assert info.value.kind == "too_large"
    await assert_next_request_works(capped, upstream)


@pytest.mark.parametrize(
    ("body", "cap", "expected"),
    [
        (gzip.compress(b"abc"), 3, b"abc"),
        (gzip.compress(b"ab") + b"\0\0" + gzip.compress(b"c"), 3, b"abc"),
        (gzip.compress(b"ab") + gzip.compress(b"c"), 0, b"abc"),
        (b"", 3, b""),
    ],
    ids=["at the cap", "padded members", "no cap", "empty"],
)
def test_decode_body_within_the_cap(body: bytes, cap: int, expected: bytes) -> None:
    assert decode_body(body, "gzip", cap) == expected


@pytest.mark.parametrize(
    "body",
    [gzip.compress(b"abcd"), gzip.compress(b"ab") + gzip.compress(b"cd"), bomb()],
    ids=["one member", "two members", "bomb"],
)
def test_decode_body_past_the_cap(body: bytes) -> None:
    with pytest.raises(TransportError) as info:
        decode_body(body, "gzip", 3)
    assert info.value.kind == "too_large"


@pytest.mark.parametrize(
    "body",
    [gzip.compress(b"abcd")[:-3], b"not gzip", gzip.compress(b"x") + b"junk"],
    ids=["truncated", "not gzip", "trailing junk"],
)
def test_decode_body_of_a_broken_gzip_is_malformed(body: bytes) -> None:
    with pytest.raises(TransportError) as info:
        decode_body(body, "gzip", 100)
    assert info.value.kind == "malformed"


@pytest.mark.parametrize("kind", ["stdlib", "aiohttp", "asyncio"])
async def test_the_backend_reports_an_answer_past_its_configured_cap_and_does_not_retry(
    kind: str, tmp_path: Path
) -> None:
    from backend_support import FAST
    from minima_llm import MinimaLlmConfig, MinimaLlmFailure, MinimaLlmRequest, OpenAIMinimaLlm
    from minima_llm.testing import MockServer

    message = {"role": "assistant", "content": "long " * 400}
    answer = {
        "id": "c1",
        "object": "chat.completion",
        "choices": [{"index": 0, "message": message}],
    }
    async with MockServer() as mock:
        mock.fail_next(1, status=200, body=answer)  # about 2 KB, then the mock's own short ones
        config = MinimaLlmConfig(
            base_url=mock.url,
            model="mock-model",
            cache_dir=str(tmp_path),
            transport=kind,
            max_response_bytes=1024,
            max_attempts=3,
            **FAST,
        )
        async with OpenAIMinimaLlm(config) as backend:
            failure = await backend.generate(
                MinimaLlmRequest("r1", [{"role": "user", "content": "a"}])
            )
            small = await backend.generate(
                MinimaLlmRequest("r2", [{"role": "user", "content": "b"}])
            )
        assert isinstance(failure, MinimaLlmFailure), failure
        assert failure.error_type == "ResponseTooLarge" and failure.attempts == 1
        assert "max_response_bytes=1024" in failure.message
        assert not isinstance(small, MinimaLlmFailure)
        assert mock.stats()["requests"] == 2


def _capped_config(url: str, kind: str, cache_dir: Path) -> Any:
    from backend_support import FAST
    from minima_llm import MinimaLlmConfig

    return MinimaLlmConfig(
        base_url=url,
        model="mock-model",
        cache_dir=str(cache_dir),
        transport=kind,
        max_response_bytes=1024,
        max_attempts=3,
        **FAST,
    )


@pytest.mark.parametrize("kind", ["stdlib", "aiohttp", "asyncio"])
@pytest.mark.parametrize("shape", ["json", "sse"])
async def test_a_stream_past_the_cap_is_a_failure_and_not_retried(
    kind: str, shape: str, tmp_path: Path
) -> None:
    # "json": a server that ignores "stream" and answers whole; "sse": one long event.
    from minima_llm import MinimaLlmFailure, MinimaLlmRequest, OpenAIMinimaLlm
    from minima_llm.testing import MockServer

    message = {"role": "assistant", "content": "long " * 400}
    whole = {"id": "c1", "object": "chat.completion", "choices": [{"index": 0, "message": message}]}
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "choices": [{"index": 0, "delta": message}],
    }
    body: Any = whole if shape == "json" else f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n"
    headers = {} if shape == "json" else {"Content-Type": "text/event-stream"}
    async with MockServer() as mock:
        mock.fail_next(3, status=200, body=body, headers=headers)
        async with OpenAIMinimaLlm(_capped_config(mock.url, kind, tmp_path)) as backend:
            opened = await backend.open_stream(
                MinimaLlmRequest("r1", [{"role": "user", "content": "a"}])
            )
        assert isinstance(opened, MinimaLlmFailure), opened
        assert opened.error_type == "ResponseTooLarge" and opened.attempts == 1
        assert mock.stats()["requests"] == 1
