"""Clients that misbehave on the wire: slow senders, slow readers, odd bytes, early exits.

Raw sockets, so each test controls exactly what reaches the gateway and when.
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import socket
from pathlib import Path

import pytest
from gateway_harness import Served, chat_body, eventually, serve

from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockServer

HOLD_S = 0.5  # the client timeout these tests give the gateway
JSON = {"Content-Type": "application/json"}


def head(path: str, length: int, extra: str = "") -> bytes:
    """A request line and headers announcing ``length`` body bytes."""
    return (
        f"POST {path} HTTP/1.1\r\nHost: gw\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n{extra}\r\n"
    ).encode("latin-1")


async def connect(gw: Served) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    host, port = gw.url.removeprefix("http://").split(":")
    return await asyncio.open_connection(host, int(port))


async def answer_of(reader: asyncio.StreamReader) -> tuple[int, dict[str, str], bytes]:
    """Status, headers and body of one HTTP/1.1 answer with a Content-Length."""
    status_line = await asyncio.wait_for(reader.readline(), 10)
    status = int(status_line.split()[1])
    headers: dict[str, str] = {}
    while (line := await reader.readline()) not in (b"\r\n", b""):
        name, _, value = line.decode("latin-1").partition(":")
        headers[name.strip().lower()] = value.strip()
    body = await reader.readexactly(int(headers.get("content-length", "0")))
    return status, headers, body


def error_code_of(body: bytes) -> object:
    error = json.loads(body)["error"]
    assert set(error) == {"message", "type", "param", "code"}
    return error["code"]


def settings(**changes: object) -> ProxySettings:
    return ProxySettings(port=0, client_timeout_s=HOLD_S, **changes)  # type: ignore[arg-type]


async def metrics(gw: Served) -> dict[str, object]:
    return (await gw.get("/metrics")).json()  # type: ignore[no-any-return]


async def test_a_body_that_stops_arriving_gets_a_408(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, settings()) as gw:
        reader, writer = await connect(gw)
        writer.write(head("/v1/chat/completions", 100) + b'{"mess')
        await writer.drain()
        started = asyncio.get_running_loop().time()
        status, headers, body = await answer_of(reader)
        waited = asyncio.get_running_loop().time() - started
        assert status == 408 and error_code_of(body) == "request_timeout"
        assert "6 bytes in " in json.loads(body)["error"]["message"]
        assert HOLD_S * 0.8 < waited < HOLD_S + 5
        assert headers.get("connection", "").lower() == "close"
        assert not gw.gateway.answering  # aiohttp still lingers, bounded, over the rest
        writer.close()
    assert mock.stats()["requests"] == 0


async def test_a_slow_but_steady_body_is_read_however_long_it_takes(
    mock: MockServer, tmp_path: Path
) -> None:
    # Sent over 4 x HOLD_S in pieces each well inside HOLD_S, at about 4 KB/s (a slow
    # link, above the least average the gateway accepts): never stalled, never refused.
    body = json.dumps(chat_body("sent slowly" + " and steadily" * 600)).encode()
    pieces = [body[i : i + len(body) // 8 + 1] for i in range(0, len(body), len(body) // 8 + 1)]
    async with serve(mock.url, tmp_path, settings()) as gw:
        reader, writer = await connect(gw)
        writer.write(head("/v1/chat/completions", len(body)))
        started = asyncio.get_running_loop().time()
        for piece in pieces:
            writer.write(piece)
            await writer.drain()
            await asyncio.sleep(HOLD_S / 2)
        status, _, answer = await answer_of(reader)
        assert asyncio.get_running_loop().time() - started > 2 * HOLD_S
        assert status == 200, answer
        assert json.loads(answer)["choices"][0]["message"]["content"]
        writer.close()
    assert mock.stats()["requests"] == 1


async def test_a_body_dripping_a_byte_at_a_time_is_refused_for_its_rate(
    mock: MockServer, tmp_path: Path
) -> None:
    # Each byte comes inside HOLD_S of the last, so no wait stalls; only the average
    # (far under MIN_BODY_RATE) tells this sender from a slow link.
    async with serve(mock.url, tmp_path, settings()) as gw:
        reader, writer = await connect(gw)
        writer.write(head("/v1/chat/completions", 100))
        await writer.drain()
        started = asyncio.get_running_loop().time()
        answer = asyncio.ensure_future(answer_of(reader))
        for _ in range(20):  # 8 s of drip if nothing stopped it
            if answer.done():
                break
            writer.write(b" ")
            await writer.drain()
            await asyncio.sleep(HOLD_S * 0.8)
        status, headers, body = await asyncio.wait_for(answer, 10)
        waited = asyncio.get_running_loop().time() - started
        assert status == 408 and error_code_of(body) == "request_timeout"
        assert "bytes/s" in json.loads(body)["error"]["message"]
        assert waited < 4 * HOLD_S
        assert headers.get("connection", "").lower() == "close"
        writer.close()
    assert mock.stats()["requests"] == 0


async def test_a_chunked_body_over_the_limit_sent_slowly_gets_a_413(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path, settings(max_body_bytes=4096)) as gw:
        reader, writer = await connect(gw)
        writer.write(
            b"POST /v1/chat/completions HTTP/1.1\r\nHost: gw\r\n"
            b"Content-Type: application/json\r\nTransfer-Encoding: chunked\r\n\r\n"
        )
        for _ in range(6):  # 6 KiB in 1 KiB chunks, a pause between: the slow path
            writer.write(b"400\r\n" + b" " * 1024 + b"\r\n")
            await writer.drain()
            await asyncio.sleep(0.05)
        status, headers, body = await answer_of(reader)
        assert status == 413 and "over the limit of 4096 bytes" in body.decode()
        assert headers.get("connection", "").lower() == "close"
        writer.close()
    assert mock.stats()["requests"] == 0


async def test_a_declared_body_over_the_limit_is_refused_before_it_is_sent(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path, settings(max_body_bytes=4096)) as gw:
        reader, writer = await connect(gw)
        writer.write(head("/v1/chat/completions", 99_999_999_999))
        await writer.drain()
        status, headers, body = await answer_of(reader)  # no body was sent at all
        assert status == 413 and "over the limit of 4096 bytes" in body.decode()
        assert headers.get("connection", "").lower() == "close"
        writer.close()


async def test_a_client_that_leaves_mid_body_is_no_server_error(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(mock.url, tmp_path, settings()) as gw:
        _, writer = await connect(gw)
        writer.write(head("/v1/chat/completions", 100) + b'{"messages": [')
        await writer.drain()
        await asyncio.sleep(0.05)
        writer.close()
        await writer.wait_closed()
        assert await eventually(lambda: gw.gateway.metrics.client_disconnects == 1)
        counted = await metrics(gw)
        assert "500" not in counted["by_status"]  # type: ignore[operator]
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR]


async def test_a_stream_reader_that_stops_reading_is_dropped(
    mock: MockServer, tmp_path: Path
) -> None:
    # A long answer to a client whose socket buffer is tiny and who never reads it.
    words = "w " * 150_000
    body = json.dumps(chat_body("ECHO:" + words, stream=True)).encode()
    async with serve(mock.url, tmp_path, settings()) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        await asyncio.get_running_loop().sock_connect(sock, (host, int(port)))
        try:
            await asyncio.get_running_loop().sock_sendall(
                sock, head("/v1/chat/completions", len(body)) + body
            )
            assert await eventually(lambda: len(gw.gateway.answering) == 1)
            # Dropped within the client timeout of its last write, not when it hangs up.
            assert await eventually(lambda: not gw.gateway.answering, timeout_s=HOLD_S + 10)
            assert gw.gateway.metrics.client_disconnects == 1
        finally:
            sock.close()
        # Its upstream stream was cancelled with it (nobody else read it); the next works.
        assert (await gw.chat("after the slow one")).status == 200


async def test_a_fast_stream_reader_is_never_dropped(mock: MockServer, tmp_path: Path) -> None:
    # The same long answer, read as it comes: the timer must not cut a client that keeps up.
    async with serve(mock.url, tmp_path, settings()) as gw:
        reply = await gw.chat("ECHO:" + "w " * 20_000, stream=True)
        assert reply.status == 200 and reply.events()[-1] == "[DONE]"
        assert gw.gateway.metrics.client_disconnects == 0


@pytest.mark.parametrize("key", [b"caf\xe9", b"\xff\xfe"])
async def test_a_key_that_is_not_utf8_is_refused_as_json(
    mock: MockServer, tmp_path: Path, key: bytes
) -> None:
    keyed = settings(api_keys=("sekrit-k1",), partition_cache_by_key=True)
    async with serve(mock.url, tmp_path, keyed) as gw:
        for method, path in (("GET", "/health"), ("POST", "/v1/chat/completions")):
            reader, writer = await connect(gw)
            body = json.dumps(chat_body("hi")).encode() if method == "POST" else b""
            writer.write(
                f"{method} {path} HTTP/1.1\r\nHost: gw\r\nContent-Length: {len(body)}\r\n".encode()
                + b"Authorization: Bearer "
                + key
                + b"\r\n\r\n"
                + body
            )
            await writer.drain()
            status, _, answer = await answer_of(reader)
            writer.close()
            if path == "/health":
                assert status == 200 and json.loads(answer) == {"status": "ok"}
            else:
                assert status == 401 and error_code_of(answer) == "invalid_api_key"
    assert "/v1/chat/completions" not in mock.stats()["by_route"]


async def test_a_malformed_request_is_logged_without_its_bytes(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    secret = "sk-" + "Z" * 9000  # past aiohttp's 8,190-byte line limit
    async with serve(mock.url, tmp_path, settings()) as gw:
        reader, writer = await connect(gw)
        writer.write(
            f"GET /v1/models HTTP/1.1\r\nHost: gw\r\nAuthorization: Bearer {secret}\r\n\r\n".encode()
        )
        await writer.drain()
        assert (await asyncio.wait_for(reader.readline(), 10)).split()[1] == b"400"
        writer.close()
        assert await eventually(lambda: "malformed request" in caplog.text)
    assert "ZZZZ" not in caplog.text and "Traceback" not in caplog.text


@pytest.mark.parametrize("encoding", ["gzip", "deflate"])
async def test_a_body_that_does_not_decode_is_a_400_without_a_traceback(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, encoding: str
) -> None:
    caplog.set_level(logging.DEBUG, logger="aiohttp.server")
    async with serve(mock.url, tmp_path, settings()) as gw:
        reply = await gw.request(
            "POST",
            "/v1/chat/completions",
            data=b"not compressed at all" * 20,
            headers={"Content-Encoding": encoding, "Content-Type": "application/json"},
        )
        assert reply.status == 400
        assert "could not be read" in reply.json()["error"]["message"]
        assert await eventually(lambda: "could not be drained" in caplog.text)
    assert "Traceback" not in caplog.text and "Unhandled exception" not in caplog.text
    assert not [r for r in caplog.records if r.levelno >= logging.WARNING]


async def test_a_passed_through_key_no_header_can_carry_is_refused(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path, settings(pass_through_client_key=True)) as gw:
        reader, writer = await connect(gw)
        body = json.dumps(chat_body("hi")).encode()
        key = "Authorization: Bearer sk-caf\u2019\r\n".encode()  # UTF-8, not ASCII
        writer.write(head("/v1/chat/completions", len(body))[:-2] + key + b"\r\n" + body)
        await writer.drain()
        status, _, answer = await answer_of(reader)
        writer.close()
        assert status == 401 and error_code_of(answer) == "invalid_api_key"
    assert "/v1/chat/completions" not in mock.stats()["by_route"]


async def test_a_client_that_does_not_read_a_large_answer_is_dropped(
    mock: MockServer, tmp_path: Path
) -> None:
    _, body = large_echo()
    async with serve(mock.url, tmp_path, settings(max_body_bytes=2**31 - 1)) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.setblocking(False)
        loop = asyncio.get_running_loop()
        await loop.sock_connect(sock, (host, int(port)))
        try:
            await loop.sock_sendall(sock, head("/v1/chat/completions", len(body)) + body)
            metrics = gw.gateway.metrics
            assert await eventually(lambda: metrics.client_disconnects == 1, timeout_s=HOLD_S + 15)
        finally:
            sock.close()
        # The answer had come whole: it is cached, and the gateway goes on serving.
        url = gw.url + "/v1/chat/completions"
        async with gw.http.post(url, data=io.BytesIO(body), headers=JSON) as again:
            assert again.status == 200 and again.headers["x-minima-cache"] == "hit"


def large_echo() -> tuple[str, bytes]:
    """An answer three times what the kernel may buffer for a socket, and the body asking it."""
    try:
        with open("/proc/sys/net/ipv4/tcp_wmem") as f:
            most = int(f.read().split()[2])
    except (OSError, ValueError, IndexError):
        most = 4 * 2**20
    words = "w " * (3 * most // 2)
    return words, json.dumps(chat_body("ECHO:" + words)).encode()


async def test_a_client_that_reads_a_large_answer_slowly_gets_all_of_it(
    mock: MockServer, tmp_path: Path
) -> None:
    # Steady but slow: the bound is on a wait for progress, never on the whole transfer.
    # Read at about 12 MB/s, it takes over a second, against a client timeout of half that.
    words, body = large_echo()
    async with serve(mock.url, tmp_path, settings(max_body_bytes=2**31 - 1)) as gw:
        reader, writer = await connect(gw)
        writer.write(head("/v1/chat/completions", len(body)) + body)
        await writer.drain()
        status_line = await asyncio.wait_for(reader.readline(), 10)
        assert status_line.split()[1] == b"200"
        length = 0
        while (line := await reader.readline()) != b"\r\n":
            name, _, value = line.decode("latin-1").partition(":")
            if name.lower() == "content-length":
                length = int(value)
        received = b""
        while len(received) < length:
            piece = await asyncio.wait_for(reader.read(262_144), 10)
            assert piece, f"cut after {len(received)} of {length} bytes"
            received += piece
            await asyncio.sleep(0.02)
        writer.close()
        answer = json.loads(received)
        assert answer["choices"][0]["message"]["content"] == words
        assert gw.gateway.metrics.client_disconnects == 0
