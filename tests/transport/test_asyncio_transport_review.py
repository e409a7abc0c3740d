"""Races and edge cases of the asyncio transport found in review, each with a raw server."""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import AsyncIterator, Iterator

import pytest

from minima_llm.errors import TransportError
from minima_llm.http import AsyncioTransport, ProxyRules

KEPT = b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"


async def _read_request(reader: asyncio.StreamReader) -> None:
    head = await reader.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    await reader.readexactly(length)


@pytest.fixture
async def closes_after_answering() -> AsyncIterator[str]:
    """Answers one request with keep-alive framing, then closes the connection at once."""

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await _read_request(reader)
            writer.write(KEPT)
            await writer.drain()
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            writer.close()

    server = await asyncio.start_server(handle, "127.0.0.1", 0)
    yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}/v1"
    server.close()
    await server.wait_closed()


async def test_a_connection_that_dies_while_handed_to_a_waiter_is_not_waited_on(
    closes_after_answering: str,
) -> None:
    t = AsyncioTransport(max_connections=1, proxies=ProxyRules.from_environ({}))

    async def one() -> tuple[str, float]:
        start = time.monotonic()
        try:
            await t.post(closes_after_answering, b"{}", {}, 3.0)
            return "ok", time.monotonic() - start
        except TransportError as exc:
            return exc.kind, time.monotonic() - start

    results = await asyncio.gather(*(one() for _ in range(4)))
    await t.aclose()
    # Unfixed, a waiter handed the closing connection wrote into it and sat out its
    # whole timeout: every answer here comes at once, an answer or a reset to retry.
    assert all(kind in ("ok", "reset") for kind, _ in results), results
    assert max(elapsed for _, elapsed in results) < 1.5, results
    assert any(kind == "ok" for kind, _ in results)


@pytest.fixture
def resets_mid_body() -> Iterator[str]:
    """Sends a head with no length and part of a body, then resets the connection."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(8)

    def serve() -> None:
        while True:
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            data = b""
            while b"\r\n\r\n" not in data:
                data += conn.recv(65536)
            conn.sendall(b'HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n{"choices": [')
            time.sleep(0.1)
            conn.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            conn.close()

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/v1"
    listener.close()


async def test_a_reset_during_a_body_that_ends_at_the_close_is_a_reset(
    resets_mid_body: str,
) -> None:
    t = AsyncioTransport(proxies=ProxyRules.from_environ({}))
    with pytest.raises(TransportError) as caught:
        await t.post(resets_mid_body, b"{}", {}, 3.0)
    await t.aclose()
    assert caught.value.kind == "reset"


@pytest.mark.parametrize("path", ["/a b", "/v1/\x01", "/v1/caf\u00e9"])
async def test_a_path_that_cannot_be_one_request_line_is_a_connect_error(path: str) -> None:
    t = AsyncioTransport(proxies=ProxyRules.from_environ({}))
    with pytest.raises(TransportError) as caught:
        await t.post(f"http://127.0.0.1:9{path}", b"{}", {}, 1.0)
    assert caught.value.kind == "connect"


async def test_a_header_outside_latin_1_is_refused_before_sending(
    closes_after_answering: str,
) -> None:
    t = AsyncioTransport(proxies=ProxyRules.from_environ({}))
    with pytest.raises(TransportError) as caught:
        await t.post(closes_after_answering, b"{}", {"Authorization": "Bearer k\u20ac"}, 1.0)
    assert caught.value.kind == "malformed"


async def test_a_host_name_the_resolver_refuses_is_a_connect_error() -> None:
    t = AsyncioTransport(proxies=ProxyRules.from_environ({}))
    with pytest.raises(TransportError) as caught:
        await t.post(f"http://{'a' * 64}.invalid/v1", b"{}", {}, 2.0)
    assert caught.value.kind == "connect"


async def test_a_stream_closed_and_read_again_is_refused(closes_after_answering: str) -> None:
    t = AsyncioTransport(proxies=ProxyRules.from_environ({}))
    stream = await t.open_stream(closes_after_answering, b"{}", {}, 2.0)
    assert await stream.read() == b"ok"
    await stream.aclose()
    with pytest.raises(TransportError) as caught:
        await stream.read()
    assert caught.value.kind == "closed"
    await t.aclose()
