"""AsyncioTransport against a raw HTTP/1.1 server on 127.0.0.1 whose every byte a test writes.

The server numbers its connections and the requests on each, counts how many are
open at once, and notes when a client hangs up, so a test can tell whether a
connection was reused, replaced, or held past its answer.
"""

from __future__ import annotations

import asyncio
import contextlib
import gzip
import itertools
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field

import pytest

from local_server import Listener, read_request
from minima_llm.errors import ConfigError, TransportError
from minima_llm.http.asyncio_transport import AsyncioTransport
from minima_llm.http.proxies import ProxyRules

BODY = b'{"model": "m", "messages": []}'
JSON = {"Content-Type": "application/json"}
OK = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\nContent-Type: text/plain\r\n\r\nok"
# Bounds for what must happen "at once": generous, so a loaded machine does not fail them.
PROMPT_S = 2.0
SLACK_S = 1.0

Route = Callable[["Exchange"], Awaitable[None]]


def chunk(data: bytes, ext: bytes = b"") -> bytes:
    return b"%x%b\r\n%b\r\n" % (len(data), ext, data)


@dataclass
class Exchange:
    """One request as the server read it, and the means to answer it byte by byte."""

    server: RawServer
    number: int  # the connection, from 1
    nth: int  # the request on that connection, from 1
    path: str
    headers: dict[str, str]
    body: bytes
    reader: asyncio.StreamReader
    writer: asyncio.StreamWriter

    async def send(self, *pieces: bytes) -> None:
        for piece in pieces:
            self.writer.write(piece)
            await self.writer.drain()

    async def deliver(self, data: bytes, style: str = "whole") -> None:
        """Write ``data`` in one go, or split: a byte or a few bytes per write, yielding between."""
        if style == "whole":
            await self.send(data)
            return
        step = {"bytes": 1, "pieces": 7}[style]
        for start in range(0, len(data), step):
            self.writer.write(data[start : start + step])
            await self.writer.drain()
            await asyncio.sleep(0)

    async def hold(self) -> None:
        """Answer nothing more until the client hangs up (or the server shuts down)."""
        with contextlib.suppress(ConnectionError):
            while await self.reader.read(2**16):
                pass
        self.server.left.append(self.number)

    def close(self) -> None:
        self.writer.close()

    def reset(self) -> None:
        self.writer.transport.abort()


@dataclass
class RawServer:
    """A keep-alive HTTP/1.1 server answering each path with a route written by hand."""

    routes: dict[str, Route] = field(default_factory=dict)
    requests: list[Exchange] = field(default_factory=list)
    connections: int = 0
    open_now: int = 0
    max_open: int = 0
    left: list[int] = field(default_factory=list)  # connections the client hung up during hold()
    closed: list[int] = field(default_factory=list)  # connections gone, by either side
    errors: list[BaseException] = field(default_factory=list)
    port: int = 0
    _numbers: itertools.count[int] = field(default_factory=lambda: itertools.count(1))
    _listener: Listener | None = None

    async def __aenter__(self) -> RawServer:
        self._listener = Listener(self._serve)
        self.port = await self._listener.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._listener is not None
        await self._listener.stop(timeout=2.0)
        if self.errors and exc[0] is None:
            raise AssertionError(f"the server's routes failed: {self.errors!r}")

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def seen(self) -> list[tuple[int, int, str]]:
        """(connection, request on it, path) of each request so far."""
        return [(ex.number, ex.nth, ex.path) for ex in self.requests]

    async def until(self, check: Callable[[], bool], timeout: float = PROMPT_S) -> None:
        """Wait for ``check`` to hold; fail after ``timeout``."""
        stop = time.monotonic() + timeout
        while not check():
            assert time.monotonic() < stop, "the server never got there"
            await asyncio.sleep(0.005)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        number = next(self._numbers)
        self.connections += 1
        self.open_now += 1
        self.max_open = max(self.max_open, self.open_now)
        try:
            for nth in itertools.count(1):
                request = await read_request(reader)
                if request is None:
                    return
                first, headers, body = request
                method, path, version = first.split(" ")
                assert (method, version) == ("POST", "HTTP/1.1"), first
                exchange = Exchange(self, number, nth, path, headers, body, reader, writer)
                self.requests.append(exchange)
                try:
                    await self.routes[path.split("?", 1)[0]](exchange)
                except ConnectionError:
                    return
                if writer.is_closing():
                    return
        except Exception as exc:  # a route's own failure: reported at the end of the test
            self.errors.append(exc)
        finally:
            self.open_now -= 1
            self.closed.append(number)
            writer.close()


def reply(raw: bytes, style: str = "whole", close: bool = False) -> Route:
    """A route answering ``raw`` (in the given write style), then closing when ``close``."""

    async def route(ex: Exchange) -> None:
        await ex.deliver(raw, style)
        if close:
            ex.close()

    return route


async def hold(ex: Exchange) -> None:
    await ex.hold()


@pytest.fixture
async def server() -> AsyncIterator[RawServer]:
    async with RawServer() as up:
        up.routes["/ok"] = reply(OK)
        up.routes["/hold"] = hold
        yield up


@pytest.fixture
async def client() -> AsyncIterator[AsyncioTransport]:
    t = AsyncioTransport(8, proxies=ProxyRules())
    yield t
    await t.aclose()


async def post_ok(t: AsyncioTransport, server: RawServer, timeout_s: float = 5.0) -> None:
    resp = await t.post(server.url("/ok"), BODY, JSON, timeout_s)
    assert (resp.status, resp.body) == (200, b"ok")


async def failure(awaitable: Awaitable[object], kind: str) -> TransportError:
    with pytest.raises(TransportError) as info:
        await awaitable
    assert info.value.kind == kind, info.value
    return info.value


# -- the request -------------------------------------------------------------------------


async def test_the_request_on_the_wire(client: AsyncioTransport, server: RawServer) -> None:
    headers = {**JSON, "Authorization": "Bearer sk-1", "Connection": "close", "Host": "evil"}
    resp = await client.post(server.url("/ok?x=1"), BODY, headers, 5.0)
    assert resp.status == 200
    ex = server.requests[0]
    assert ex.path == "/ok?x=1"
    assert ex.body == BODY
    assert ex.headers["content-length"] == str(len(BODY))
    assert ex.headers["host"] == f"127.0.0.1:{server.port}"
    assert ex.headers["authorization"] == "Bearer sk-1"
    assert ex.headers["content-type"] == "application/json"
    # The transport writes its own framing headers; the caller's copies are dropped.
    assert "connection" not in ex.headers
    assert ex.headers["accept-encoding"] == "gzip"
    assert "python" not in ex.headers.get("user-agent", "").lower()


async def test_a_large_request_body_arrives_whole(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def echo_size(ex: Exchange) -> None:
        size = b"%d" % len(ex.body)
        await ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(size), size))

    server.routes["/size"] = echo_size
    for body in (b"x" * (2**16 - 1), b"y" * 2**16, bytes(range(256)) * 1000):
        resp = await client.post(server.url("/size"), body, JSON, 5.0)
        assert resp.body == b"%d" % len(body)
        assert server.requests[-1].body == body
    assert client.opened == 1


async def test_aclose_closes_idle_connections_and_the_next_request_opens_one(
    client: AsyncioTransport, server: RawServer
) -> None:
    await post_ok(client, server)
    await client.aclose()
    await server.until(lambda: server.closed == [1])
    await post_ok(client, server)
    assert client.opened == 2
    assert server.seen() == [(1, 1, "/ok"), (2, 1, "/ok")]


# -- framing -----------------------------------------------------------------------------

CHUNKED_BODY = b"Wikipedia in\r\n\r\nchunks."
CHUNKED = (
    b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nX-Check: yes\r\n\r\n"
    + chunk(b"Wiki", b";ext=1")
    + chunk(b"pedia")
    + chunk(b" in\r\n\r\nchunks.", b';a;b="c;d"')
    + b"0;last=1\r\nX-Trailer: yes\r\nX-Other: 2\r\n\r\n"
)


@pytest.mark.parametrize("style", ["whole", "pieces", "bytes"])
async def test_a_chunked_body_with_extensions_and_trailers_is_read_whole_on_one_connection(
    client: AsyncioTransport, server: RawServer, style: str
) -> None:
    server.routes["/chunked"] = reply(CHUNKED, style)
    for _ in range(2):
        resp = await client.post(server.url("/chunked"), BODY, JSON, 5.0)
        assert resp.status == 200 and resp.body == CHUNKED_BODY
        assert resp.headers["x-check"] == "yes"
        assert "x-trailer" not in resp.headers  # trailers are read past, not merged
    assert client.opened == 1
    assert server.seen() == [(1, 1, "/chunked"), (1, 2, "/chunked")]


# Each answer as a server may write it, and whether its connection may carry the next request.
# The server never closes: a connection not reused is one the client gave up itself.
ANSWERS = {
    "length": (b"HTTP/1.1 200 OK\r\nX-Check: a\r\nContent-Length: 11\r\n\r\nhello world", True),
    "length-body-with-blank-lines": (
        b"HTTP/1.1 200 OK\r\nX-Check: a\r\nContent-Length: 12\r\n\r\nhe\n\nl\r\n\r\nrld",
        True,
    ),
    "empty-length": (b"HTTP/1.1 200 OK\r\nX-Check: a\r\nContent-Length: 0\r\n\r\n", True),
    "chunked": (
        b"HTTP/1.1 200 OK\r\nX-Check: a\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"hello")
        + chunk(b" world")
        + b"0\r\n\r\n",
        True,
    ),
    "folded-header": (
        b"HTTP/1.1 200 OK\r\nX-Check: a\r\nX-Fold: one\r\n\ttwo\r\nContent-Length: 11\r\n\r\n"
        b"hello world",
        True,
    ),
    "repeated-length": (
        b"HTTP/1.1 200 OK\r\nContent-Length: 11\r\nX-Check: a\r\nContent-Length: 11\r\n\r\n"
        b"hello world",
        True,
    ),
    "bare-lf-length": (b"HTTP/1.1 200 OK\nX-Check: a\nContent-Length: 11\n\nhello world", True),
    "bare-lf-body-with-crlfcrlf": (
        b"HTTP/1.1 200 OK\nX-Check: a\nContent-Length: 12\n\nhe\r\n\r\nl\n\nrld",
        True,
    ),
    "bare-lf-chunked": (
        b"HTTP/1.1 200 OK\nX-Check: a\nTransfer-Encoding: chunked\n\n"
        b"5\nhello\n6;x\n world\n0\nX-T: 1\n\n",
        True,
    ),
    "crlf-then-bare-lf-end": (
        b"HTTP/1.1 200 OK\r\nX-Check: a\r\nContent-Length: 11\r\n\nhello world",
        True,
    ),
    "connection-close": (
        b"HTTP/1.1 200 OK\r\nX-Check: a\r\nConnection: close\r\nContent-Length: 11\r\n\r\n"
        b"hello world",
        False,
    ),
    "http10": (b"HTTP/1.0 200 OK\r\nX-Check: a\r\nContent-Length: 11\r\n\r\nhello world", False),
    "http10-keep-alive": (
        b"HTTP/1.0 200 OK\r\nX-Check: a\r\nConnection: keep-alive\r\nContent-Length: 11\r\n\r\n"
        b"hello world",
        True,
    ),
    "length-and-chunked": (
        b"HTTP/1.1 200 OK\r\nX-Check: a\r\nContent-Length: 3\r\nTransfer-Encoding: chunked\r\n\r\n"
        + chunk(b"hello world")
        + b"0\r\n\r\n",
        False,
    ),
}


def answer_body(name: str) -> bytes:
    if name == "empty-length":
        return b""
    if "blank-lines" in name:
        return b"he\n\nl\r\n\r\nrld"
    if "crlfcrlf" in name:
        return b"he\r\n\r\nl\n\nrld"
    return b"hello world"


@pytest.mark.parametrize("style", ["whole", "pieces", "bytes"])
@pytest.mark.parametrize("name", list(ANSWERS))
async def test_each_framing_reads_the_same_however_the_bytes_are_split(
    client: AsyncioTransport, server: RawServer, name: str, style: str
) -> None:
    raw, reusable = ANSWERS[name]
    server.routes["/a"] = reply(raw, style)
    for _ in range(2):
        resp = await client.post(server.url("/a"), BODY, JSON, 5.0)
        assert resp.status == 200
        assert resp.body == answer_body(name)
        assert resp.headers["x-check"] == "a"
        assert resp.headers.get("x-fold", "one two") == "one two"
    assert client.opened == (1 if reusable else 2)
    assert [number for number, _, _ in server.seen()] == ([1, 1] if reusable else [1, 2])


async def test_a_bare_lf_field_line_followed_by_a_crlf_blank_line(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/a"] = reply(b"HTTP/1.1 200 OK\r\nContent-Length: 2\n\r\nok")
    resp = await client.post(server.url("/a"), BODY, JSON, 0.5)
    assert resp.body == b"ok"


@pytest.mark.parametrize(
    ("raw", "reusable"),
    [
        (b"HTTP/1.1 204 No Content\r\nX-Check: a\r\n\r\n", True),
        (b"HTTP/1.1 304 Not Modified\r\nX-Check: a\r\nContent-Length: 99\r\n\r\n", True),
        (b"HTTP/1.1 204 No Content\r\nX-Check: a\r\nConnection: close\r\n\r\n", False),
    ],
    ids=["204", "304-with-length", "204-close"],
)
async def test_a_response_without_a_body_ends_at_its_head(
    client: AsyncioTransport, server: RawServer, raw: bytes, reusable: bool
) -> None:
    server.routes["/a"] = reply(raw)  # the server keeps the connection open either way
    started = time.monotonic()
    for _ in range(2):
        resp = await client.post(server.url("/a"), BODY, JSON, 5.0)
        assert resp.body == b"" and resp.headers["x-check"] == "a"
    assert time.monotonic() - started < PROMPT_S
    assert client.opened == (1 if reusable else 2)


@pytest.mark.parametrize("style", ["whole", "pieces", "bytes"])
async def test_informational_heads_come_before_the_answer(
    client: AsyncioTransport, server: RawServer, style: str
) -> None:
    raw = (
        b"HTTP/1.1 100 Continue\r\n\r\n"
        b"HTTP/1.1 103 Early Hints\r\nLink: </style.css>; rel=preload\r\n\r\n"
        b"HTTP/1.1 200 OK\r\nX-Final: 1\r\nContent-Length: 2\r\n\r\nok"
    )
    server.routes["/a"] = reply(raw, style)
    for _ in range(2):
        resp = await client.post(server.url("/a"), BODY, JSON, 5.0)
        assert (resp.status, resp.body) == (200, b"ok")
        assert resp.headers["x-final"] == "1" and "link" not in resp.headers
    stream = await client.open_stream(server.url("/a"), BODY, JSON, 5.0)
    assert stream.status == 200 and "link" not in stream.headers
    assert await stream.read() == b"ok"
    await stream.aclose()
    assert client.opened == 1


async def test_informational_heads_sent_apart_from_the_answer(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(b"HTTP/1.1 100 Continue\r\n\r\n")
        await asyncio.sleep(0.02)
        await ex.send(b"HTTP/1.1 103 Early Hints\nLink: </a>\n\n")
        await asyncio.sleep(0.02)
        await ex.send(b"HTTP/1.1 201 Created\r\nContent-Length: 2\r\n\r\nok")

    server.routes["/a"] = route
    resp = await client.post(server.url("/a"), BODY, JSON, 5.0)
    assert (resp.status, resp.body) == (201, b"ok")


async def test_a_switch_of_protocols_is_malformed(
    client: AsyncioTransport, server: RawServer
) -> None:
    raw = b"HTTP/1.1 101 Switching Protocols\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n\r\n"
    server.routes["/a"] = reply(raw)
    started = time.monotonic()
    await failure(client.post(server.url("/a"), BODY, JSON, 5.0), "malformed")
    await failure(client.open_stream(server.url("/a"), BODY, JSON, 5.0), "malformed")
    assert time.monotonic() - started < PROMPT_S
    # Refused answers never leave their connection in the pool.
    await post_ok(client, server)
    assert [number for number, _, _ in server.seen()] == [1, 2, 3]


async def test_a_body_delimited_by_the_close_is_read_whole_and_the_connection_not_reused(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        # "keep-alive" cannot keep a connection whose body only its close ends.
        await ex.send(
            b"HTTP/1.1 200 OK\r\nConnection: keep-alive\r\nContent-Type: text/plain\r\n\r\n"
        )
        for piece in (b"part one, ", b"part two, ", b"\r\n\r\n", b"end"):
            await ex.send(piece)
            await asyncio.sleep(0.01)
        ex.close()

    server.routes["/close"] = route
    for _ in range(2):
        resp = await client.post(server.url("/close"), BODY, JSON, 5.0)
        assert resp.status == 200
        assert resp.body == b"part one, part two, \r\n\r\nend"
    await post_ok(client, server)
    assert client.opened == 3
    assert server.seen() == [(1, 1, "/close"), (2, 1, "/close"), (3, 1, "/ok")]


async def test_an_empty_body_delimited_by_the_close(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/a"] = reply(b"HTTP/1.1 200 OK\r\n\r\n", close=True)
    resp = await client.post(server.url("/a"), BODY, JSON, 5.0)
    assert (resp.status, resp.body) == (200, b"")


async def test_extra_bytes_after_a_whole_answer_retire_its_connection(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/length"] = reply(
        b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nokHTTP/1.1 200 OK\r\nContent-Length: 4\r\n\r\njunk"
    )
    server.routes["/chunked"] = reply(
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"ok") + b"0\r\n\r\nJUNK"
    )
    server.routes["/204"] = reply(b"HTTP/1.1 204 No Content\r\n\r\nJUNK")

    async def later(ex: Exchange) -> None:
        await ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok")
        await ex.send(b"JUNK")

    server.routes["/later"] = later
    for path, body in (("/length", b"ok"), ("/chunked", b"ok"), ("/204", b""), ("/later", b"ok")):
        resp = await client.post(server.url(path), BODY, JSON, 5.0)
        assert (resp.status, resp.body) == (200 if path != "/204" else 204, body)
        await asyncio.sleep(0.05)  # the junk comes while the connection is idle
    await post_ok(client, server)
    # Each answer's junk retired its connection: every request came on a new one.
    assert [number for number, _, _ in server.seen()] == [1, 2, 3, 4, 5]
    assert client.opened == 5


# -- gzip --------------------------------------------------------------------------------


@pytest.mark.parametrize("framing", ["length", "chunked"])
async def test_a_gzip_answer_is_decoded(
    client: AsyncioTransport, server: RawServer, framing: str
) -> None:
    plain = b'{"choices": []}' * 200
    packed = gzip.compress(plain)
    if framing == "length":
        raw = b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%b" % (
            len(packed),
            packed,
        )
    else:
        half = len(packed) // 2
        raw = (
            b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nTransfer-Encoding: chunked\r\n\r\n"
            + chunk(packed[:half])
            + chunk(packed[half:])
            + b"0\r\n\r\n"
        )
    server.routes["/gz"] = reply(raw)
    resp = await client.post(server.url("/gz"), BODY, JSON, 5.0)
    assert resp.status == 200 and resp.body == plain
    assert server.requests[0].headers["accept-encoding"] == "gzip"
    await post_ok(client, server)
    assert client.opened == 1


async def test_a_broken_gzip_answer_is_malformed_and_its_connection_retired(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/gz"] = reply(
        b"HTTP/1.1 200 OK\r\nContent-Encoding: gzip\r\nContent-Length: 8\r\n\r\nnot gzip"
    )
    await failure(client.post(server.url("/gz"), BODY, JSON, 5.0), "malformed")
    await post_ok(client, server)
    assert client.opened == 2


# -- broken answers ----------------------------------------------------------------------

MALFORMED = {
    "garbage": b"garbage\r\n\r\n",
    "garbage-bare-lf": b"this is not http\n\n",
    "http2": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "bad-status": b"HTTP/1.1 2x0 OK\r\nContent-Length: 0\r\n\r\n",
    "bad-header": b"HTTP/1.1 200 OK\r\nno colon\r\nContent-Length: 0\r\n\r\n",
    "space-before-colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "two-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\nxy",
    "length-not-a-number": b"HTTP/1.1 200 OK\r\nContent-Length: 2a\r\n\r\nxy",
    "bad-chunk-size": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\nxy\r\n0\r\n\r\n",
    "chunk-longer-than-its-size": (
        b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n2\r\nxyz\r\n0\r\n\r\n"
    ),
}


@pytest.mark.parametrize("style", ["whole", "bytes"])
@pytest.mark.parametrize("name", list(MALFORMED))
async def test_a_malformed_answer_is_malformed_at_once(
    client: AsyncioTransport, server: RawServer, name: str, style: str
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.deliver(MALFORMED[name], style)
        await ex.hold()  # no close to end it: the transport must see the fault itself

    server.routes["/bad"] = route
    started = time.monotonic()
    await failure(client.post(server.url("/bad"), BODY, JSON, 5.0), "malformed")
    assert time.monotonic() - started < PROMPT_S
    await server.until(lambda: server.closed == [1])  # the client hung up
    await post_ok(client, server)
    assert client.opened == 2


@pytest.mark.parametrize("what", ["head", "chunk-line"])
async def test_a_head_or_chunk_line_that_never_ends_is_malformed(
    client: AsyncioTransport, server: RawServer, what: str
) -> None:
    async def route(ex: Exchange) -> None:
        if what == "head":
            await ex.send(b"HTTP/1.1 200 OK\r\n")
            for n in range(5000):
                await ex.send(b"X-Filler-%05d: %b\r\n" % (n, b"f" * 40))
        else:
            await ex.send(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5;")
            for _ in range(5000):
                await ex.send(b"e" * 50)
        await ex.hold()

    server.routes["/long"] = route
    started = time.monotonic()
    error = await failure(client.post(server.url("/long"), BODY, JSON, 5.0), "malformed")
    assert time.monotonic() - started < PROMPT_S
    assert "X-Filler" not in str(error)


RESETS = {
    "before-any-answer": b"",
    "mid-head": b"HTTP/1.1 200 OK\r\nContent-Le",
    "mid-length-body": b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789",
    "mid-chunk": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\na\r\n01234",
    "between-chunks": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n5\r\n01234\r\n",
    "in-trailers": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n0\r\nX-T: 1\r\n",
}


@pytest.mark.parametrize("how", ["close", "abort"])
@pytest.mark.parametrize("name", list(RESETS))
async def test_a_connection_lost_before_the_answer_ends_is_a_reset(
    client: AsyncioTransport, server: RawServer, name: str, how: str
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(RESETS[name])
        await asyncio.sleep(0.01)
        ex.close() if how == "close" else ex.reset()

    server.routes["/cut"] = route
    started = time.monotonic()
    await failure(client.post(server.url("/cut"), BODY, JSON, 5.0), "reset")
    assert time.monotonic() - started < PROMPT_S
    # A fresh connection is not retried: the server saw the request once.
    assert len(server.requests) == 1
    await post_ok(client, server)


async def test_a_stream_cut_mid_body_is_a_reset(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(
            b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n" + chunk(b"data: 1\n")
        )
        await asyncio.sleep(0.02)
        ex.reset()

    server.routes["/cut"] = route
    stream = await client.open_stream(server.url("/cut"), BODY, JSON, 5.0)
    got: list[bytes] = []
    with pytest.raises(TransportError) as info:
        async for line in stream.lines():
            got.append(line)
    await stream.aclose()
    assert info.value.kind == "reset" and got == [b"data: 1\n"]


# -- stale connections -------------------------------------------------------------------


async def test_a_kept_connection_the_server_closed_while_idle_is_replaced(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/once"] = reply(OK, close=True)  # says nothing of the close: an idle timeout
    resp = await client.post(server.url("/once"), BODY, JSON, 5.0)
    assert resp.body == b"ok"
    await server.until(lambda: server.closed == [1])
    await asyncio.sleep(0.02)
    await post_ok(client, server)
    assert client.opened == 2
    assert server.seen() == [(1, 1, "/once"), (2, 1, "/ok")]


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_kept_connection_closed_as_the_next_request_comes_is_retried_once(
    client: AsyncioTransport, server: RawServer, how: str
) -> None:
    async def route(ex: Exchange) -> None:
        if ex.nth == 1:
            await ex.send(OK)
        else:  # the server had timed the connection out just as the request came
            ex.close() if how == "close" else ex.reset()

    server.routes["/a"] = route
    for _ in range(2):
        resp = await client.post(server.url("/a"), BODY, JSON, 5.0)
        assert resp.body == b"ok"
    assert server.seen() == [(1, 1, "/a"), (1, 2, "/a"), (2, 1, "/a")]
    assert client.opened == 2


@pytest.mark.parametrize("how", ["close", "abort"])
async def test_a_server_that_closes_every_connection_unanswered_is_a_reset_after_one_retry(
    client: AsyncioTransport, server: RawServer, how: str
) -> None:
    answered = 0

    async def route(ex: Exchange) -> None:
        nonlocal answered
        if answered == 0:
            answered += 1
            await ex.send(OK)
        else:
            ex.close() if how == "close" else ex.reset()

    server.routes["/a"] = route
    assert (await client.post(server.url("/a"), BODY, JSON, 5.0)).body == b"ok"
    started = time.monotonic()
    await failure(client.post(server.url("/a"), BODY, JSON, 5.0), "reset")
    assert time.monotonic() - started < PROMPT_S
    # The kept connection, then exactly one new one: no more.
    assert server.seen() == [(1, 1, "/a"), (1, 2, "/a"), (2, 1, "/a")]
    assert client.opened == 2
    # A fresh connection closed unanswered is not retried at all.
    await failure(client.post(server.url("/a"), BODY, JSON, 5.0), "reset")
    assert len(server.requests) == 4


async def test_a_stream_on_a_stale_connection_is_retried(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        if ex.nth == 1:
            await ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\n\r\ndata: 1\n")
        else:
            ex.close()

    server.routes["/a"] = route
    assert (await client.post(server.url("/a"), BODY, JSON, 5.0)).body == b"data: 1\n"
    stream = await client.open_stream(server.url("/a"), BODY, JSON, 5.0)
    assert [line async for line in stream.lines()] == [b"data: 1\n"]
    await stream.aclose()
    assert server.seen() == [(1, 1, "/a"), (1, 2, "/a"), (2, 1, "/a")]


# -- timeouts ----------------------------------------------------------------------------


async def test_a_server_that_never_answers_is_a_timeout(
    client: AsyncioTransport, server: RawServer
) -> None:
    started = time.monotonic()
    error = await failure(client.post(server.url("/hold"), BODY, JSON, 0.3), "timeout")
    elapsed = time.monotonic() - started
    assert 0.2 <= elapsed < 0.3 + SLACK_S
    assert "0.3" in str(error)
    # The connection is given up: the server sees the client leave, and the next request is new.
    await server.until(lambda: server.left == [1])
    await post_ok(client, server)
    assert client.opened == 2


@pytest.mark.parametrize("shape", ["head-only", "trickle"])
async def test_the_timeout_of_a_post_bounds_the_whole_answer(
    client: AsyncioTransport, server: RawServer, shape: str
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 1000\r\n\r\n")
        if shape == "trickle":  # bytes keep coming, never the whole body in time
            for _ in range(200):
                await ex.send(b"x")
                await asyncio.sleep(0.02)
        await ex.hold()

    server.routes["/slow"] = route
    started = time.monotonic()
    await failure(client.post(server.url("/slow"), BODY, JSON, 0.4), "timeout")
    elapsed = time.monotonic() - started
    assert 0.3 <= elapsed < 0.4 + SLACK_S


async def test_a_stream_whose_head_never_comes_is_a_timeout(
    client: AsyncioTransport, server: RawServer
) -> None:
    started = time.monotonic()
    await failure(client.open_stream(server.url("/hold"), BODY, JSON, 0.3), "timeout")
    assert time.monotonic() - started < 0.3 + SLACK_S


# -- the pool ----------------------------------------------------------------------------


async def test_max_connections_bounds_the_open_connections(server: RawServer) -> None:
    async def slow(ex: Exchange) -> None:
        await asyncio.sleep(0.1)
        await ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%b" % (len(ex.body), ex.body))

    server.routes["/slow"] = slow
    t = AsyncioTransport(2, proxies=ProxyRules())
    try:
        bodies = [b"request %d" % n for n in range(6)]
        started = time.monotonic()
        resps = await asyncio.gather(
            *(t.post(server.url("/slow"), body, JSON, 5.0) for body in bodies)
        )
        elapsed = time.monotonic() - started
    finally:
        await t.aclose()
    # Each answer is its own request's, even though the six shared two connections.
    assert [(r.status, r.body) for r in resps] == [(200, body) for body in bodies]
    assert server.max_open == 2 and server.connections == 2 and t.opened == 2
    assert len(server.requests) == 6 and {n for n, _, _ in server.seen()} == {1, 2}
    assert elapsed >= 0.25  # three rounds of 0.1 s, not one
    assert elapsed < 0.3 + SLACK_S


async def test_a_request_that_times_out_waiting_for_a_slot_gives_it_back(
    server: RawServer,
) -> None:
    async def slow_close(ex: Exchange) -> None:
        await asyncio.sleep(0.4)
        await ex.send(b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 2\r\n\r\nok")

    server.routes["/slow"] = slow_close
    t = AsyncioTransport(1, proxies=ProxyRules())
    try:
        holder = asyncio.create_task(t.post(server.url("/slow"), BODY, JSON, 5.0))
        await server.until(lambda: len(server.requests) == 1)
        started = time.monotonic()
        error = await failure(t.post(server.url("/ok"), BODY, JSON, 0.1), "timeout")
        assert time.monotonic() - started < 0.1 + SLACK_S
        assert "connection" in str(error)
        assert (await holder).body == b"ok"
        # The holder's connection closed: the next request needs the one slot, and gets it.
        await post_ok(t, server, timeout_s=2.0)
        await post_ok(t, server, timeout_s=2.0)
    finally:
        await t.aclose()
    assert server.seen() == [(1, 1, "/slow"), (2, 1, "/ok"), (2, 2, "/ok")]
    assert t.opened == 2


@pytest.mark.parametrize("when", ["before-the-head", "mid-body", "waiting-for-a-slot"])
async def test_a_cancelled_request_gives_its_slot_back(server: RawServer, when: str) -> None:
    sent = asyncio.Event()

    async def half(ex: Exchange) -> None:
        if when == "mid-body":
            await ex.send(b"HTTP/1.1 200 OK\r\nContent-Length: 100\r\n\r\n0123456789")
            await asyncio.sleep(0.02)
        sent.set()
        await ex.hold()

    server.routes["/half"] = half
    t = AsyncioTransport(1, proxies=ProxyRules())
    try:
        task = asyncio.create_task(t.post(server.url("/half"), BODY, JSON, 5.0))
        await asyncio.wait_for(sent.wait(), PROMPT_S)
        if when == "waiting-for-a-slot":
            waiter = asyncio.create_task(t.post(server.url("/ok"), BODY, JSON, 5.0))
            await asyncio.sleep(0.05)
            waiter.cancel()
            with pytest.raises(asyncio.CancelledError):
                await waiter
            # The waiter is gone; the first request still holds its connection.
            assert server.left == [] and not task.done()
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await server.until(lambda: server.left == [1])
        await post_ok(t, server, timeout_s=2.0)
        await post_ok(t, server, timeout_s=2.0)
    finally:
        await t.aclose()
    assert server.seen() == [(1, 1, "/half"), (2, 1, "/ok"), (2, 2, "/ok")]
    assert t.opened == 2


async def test_a_full_pool_hands_a_finished_connection_to_the_next_waiter(
    server: RawServer,
) -> None:
    gate = asyncio.Event()

    async def gated(ex: Exchange) -> None:
        await asyncio.wait_for(gate.wait(), PROMPT_S)
        await ex.send(OK)

    server.routes["/gated"] = gated
    t = AsyncioTransport(1, proxies=ProxyRules())
    try:
        first = asyncio.create_task(t.post(server.url("/gated"), BODY, JSON, 5.0))
        await server.until(lambda: len(server.requests) == 1)
        second = asyncio.create_task(t.post(server.url("/ok"), BODY, JSON, 5.0))
        await asyncio.sleep(0.05)
        assert not second.done() and len(server.requests) == 1
        gate.set()
        assert (await first).body == b"ok" and (await second).body == b"ok"
    finally:
        await t.aclose()
    assert server.seen() == [(1, 1, "/gated"), (1, 2, "/ok")]
    assert t.opened == 1


@pytest.mark.parametrize("limit", [0, -1])
def test_max_connections_below_one_is_a_config_error(limit: int) -> None:
    with pytest.raises(ConfigError) as info:
        AsyncioTransport(limit)
    assert info.value.field == "max_connections"


# -- streams -----------------------------------------------------------------------------

STREAM_HEADS = {
    "chunked": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n\r\n",
    "until-close": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\n\r\n",
    "length": b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nContent-Length: 16\r\n\r\n",
}


@pytest.mark.parametrize("framing", list(STREAM_HEADS))
async def test_stream_lines_come_as_the_server_writes_them(
    client: AsyncioTransport, server: RawServer, framing: str
) -> None:
    go_on = asyncio.Event()
    second_sent = False

    def piece(data: bytes) -> bytes:
        return chunk(data) if framing == "chunked" else data

    async def route(ex: Exchange) -> None:
        nonlocal second_sent
        await ex.send(STREAM_HEADS[framing] + piece(b"data: 1\n"))
        await asyncio.wait_for(go_on.wait(), PROMPT_S)
        second_sent = True
        await ex.send(piece(b"data: 2\n"))
        if framing == "chunked":
            await ex.send(b"0\r\n\r\n")
        elif framing == "until-close":
            ex.close()

    server.routes["/s"] = route
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
    try:
        assert stream.status == 200
        assert stream.headers["content-type"] == "text/event-stream"
        assert server.requests[0].headers["accept-encoding"] == "identity"
        lines = stream.lines()
        first = await asyncio.wait_for(lines.__anext__(), PROMPT_S)
        assert first == b"data: 1\n" and not second_sent
        go_on.set()
        rest = [line async for line in lines]
        assert rest == [b"data: 2\n"] and second_sent
    finally:
        await stream.aclose()


async def test_a_stream_over_chunks_that_split_its_lines(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(STREAM_HEADS["chunked"])
        for data in (b"da", b"ta: 1\nda", b"ta: 2\n\n", b"data: 3\r\n", b"tail"):
            await ex.send(chunk(data, b";n=1"))
            await asyncio.sleep(0.005)
        await ex.send(b"0\r\nX-T: 1\r\n\r\n")

    server.routes["/s"] = route
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
    lines = [line async for line in stream.lines()]
    await stream.aclose()
    assert lines == [b"data: 1\n", b"data: 2\n", b"\n", b"data: 3\r\n", b"tail"]
    await post_ok(client, server)
    assert client.opened == 1


async def test_a_stream_of_bytes_one_at_a_time(client: AsyncioTransport, server: RawServer) -> None:
    raw = (
        STREAM_HEADS["chunked"] + chunk(b"data: 1\ndata: 2\n") + chunk(b"data: 3\n") + b"0\r\n\r\n"
    )
    server.routes["/s"] = reply(raw, "bytes")
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
    assert [line async for line in stream.lines()] == [b"data: 1\n", b"data: 2\n", b"data: 3\n"]
    await stream.aclose()


async def test_a_stream_wait_past_its_timeout_is_a_timeout(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(STREAM_HEADS["chunked"] + chunk(b"data: 1\n"))
        await ex.hold()

    server.routes["/s"] = route
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 0.3)
    lines = stream.lines()
    try:
        assert await lines.__anext__() == b"data: 1\n"
        started = time.monotonic()
        with pytest.raises(TransportError) as info:
            await lines.__anext__()
        elapsed = time.monotonic() - started
    finally:
        await lines.aclose()
        await stream.aclose()
    assert info.value.kind == "timeout"
    assert 0.2 <= elapsed < 0.3 + SLACK_S
    await server.until(lambda: server.left == [1])


async def test_a_stream_timeout_bounds_each_wait_not_the_whole_stream(
    client: AsyncioTransport, server: RawServer
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(STREAM_HEADS["chunked"])
        for n in range(6):  # 0.6 s in all, never 0.3 s without a byte
            await asyncio.sleep(0.1)
            await ex.send(chunk(b"data: %d\n" % n))
        await ex.send(b"0\r\n\r\n")

    server.routes["/s"] = route
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 0.3)
    lines = [line async for line in stream.lines()]
    await stream.aclose()
    assert lines == [b"data: %d\n" % n for n in range(6)]


async def test_a_stream_read_to_its_end_puts_its_connection_back(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/s"] = reply(STREAM_HEADS["chunked"] + chunk(b"data: 1\n") + b"0\r\n\r\n")
    for _ in range(2):
        stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
        assert [line async for line in stream.lines()] == [b"data: 1\n"]
        await stream.aclose()
        await stream.aclose()  # twice is once
    await post_ok(client, server)
    assert client.opened == 1
    assert server.seen() == [(1, 1, "/s"), (1, 2, "/s"), (1, 3, "/ok")]


async def test_a_stream_read_whole_with_read_puts_its_connection_back(
    client: AsyncioTransport, server: RawServer
) -> None:
    server.routes["/s"] = reply(
        b'HTTP/1.1 400 Bad Request\r\nContent-Length: 13\r\n\r\n{"error": ""}'
    )
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
    assert stream.status == 400
    assert await stream.read() == b'{"error": ""}'
    await stream.aclose()
    await post_ok(client, server)
    assert client.opened == 1


async def test_a_stream_read_whole_undoes_a_gzip_encoding(
    client: AsyncioTransport, server: RawServer
) -> None:
    # The stream asked for identity; a server that gzips anyway is still understood by read().
    packed = gzip.compress(b'{"error": "x"}')
    server.routes["/s"] = reply(
        b"HTTP/1.1 500 Oops\r\nContent-Encoding: gzip\r\nContent-Length: %d\r\n\r\n%b"
        % (len(packed), packed)
    )
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
    assert stream.status == 500
    assert await stream.read() == b'{"error": "x"}'
    await stream.aclose()


@pytest.mark.parametrize("framing", ["chunked", "length"])
async def test_a_stream_closed_half_read_closes_its_connection(
    client: AsyncioTransport, server: RawServer, framing: str
) -> None:
    async def route(ex: Exchange) -> None:
        await ex.send(
            STREAM_HEADS[framing] + (chunk(b"data: 1\n") if framing == "chunked" else b"data: 1\n")
        )
        await ex.hold()

    server.routes["/s"] = route
    stream = await client.open_stream(server.url("/s"), BODY, JSON, 5.0)
    lines = stream.lines()
    assert await lines.__anext__() == b"data: 1\n"
    await lines.aclose()
    await stream.aclose()
    await server.until(lambda: server.left == [1])
    await post_ok(client, server)
    assert client.opened == 2
    assert server.seen() == [(1, 1, "/s"), (2, 1, "/ok")]


# -- event loops -------------------------------------------------------------------------


class ThreadedServer:
    """A RawServer on its own event loop in a thread, outliving the test's loops."""

    def __init__(self) -> None:
        self.raw = RawServer()
        self.raw.routes["/ok"] = reply(OK)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)

    def __enter__(self) -> RawServer:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self.raw.__aenter__(), self._loop).result(5)
        return self.raw

    def __exit__(self, *exc: object) -> None:
        try:
            asyncio.run_coroutine_threadsafe(
                self.raw.__aexit__(None, None, None), self._loop
            ).result(5)
        finally:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(5)
            self._loop.close()


def test_one_transport_serves_two_asyncio_runs_in_turn() -> None:
    t = AsyncioTransport(2, proxies=ProxyRules())

    async def session(server: RawServer) -> None:
        for _ in range(2):
            await post_ok(t, server)

    with ThreadedServer() as server:
        asyncio.run(session(server))
        assert t.opened == 1
        # The first loop's connection closed with the loop, not left for the next one.
        stop = time.monotonic() + PROMPT_S
        while server.closed != [1]:
            assert time.monotonic() < stop, "the first loop's connection stayed open"
            time.sleep(0.005)
        asyncio.run(session(server))
        assert t.opened == 2
        assert server.seen() == [(1, 1, "/ok"), (1, 2, "/ok"), (2, 1, "/ok"), (2, 2, "/ok")]
