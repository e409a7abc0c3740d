"""Both transports against the mock server: the same behaviour behind one protocol."""

from __future__ import annotations

import asyncio
import gzip
import json
import os
import signal
import socket
import struct
import time
import warnings
from collections.abc import AsyncIterator

import pytest

from minima_llm.errors import ConfigError
from minima_llm.http import StdlibTransport, Transport, TransportError, make_transport
from minima_llm.http.stdlib_transport import _Handoff
from minima_llm.testing import MockServer, run_mock_server_in_thread

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = {"Content-Type": "application/json"}


def trickling(mock: MockServer) -> bytes:
    """A request body whose answer the mock streams a chunk every 0.1 s, for 6 s in all."""
    mock.update_config(stream_chunk_delay_s=0.1)
    words = " ".join(f"w{i}" for i in range(60))
    return json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": words}]}
    ).encode()


@pytest.fixture
async def client(transport: str) -> AsyncIterator[Transport]:
    t = make_transport(transport, 8)
    yield t
    await t.aclose()


async def test_post_returns_status_lowercase_headers_and_body(
    client: Transport, mock: MockServer
) -> None:
    resp = await client.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
    assert resp.status == 200
    assert resp.headers["content-type"].startswith("application/json")
    assert "content-length" in resp.headers and "x-absent" not in resp.headers
    assert resp.headers.get("x-absent") is None
    names = list(resp.headers)
    assert names == [n.lower() for n in names] and len(names) == len(set(names))
    assert dict(resp.headers)["content-type"] == resp.headers["content-type"]
    assert json.loads(resp.body)["choices"][0]["message"]["content"] == "mock reply: hi"


async def test_default_headers_are_sent_when_a_request_passes_them(
    transport: str, mock: MockServer
) -> None:
    # A transport may hold the usual headers itself; passing that very mapping or an
    # equal copy must send the same request either way.
    usual = {**JSON, "Authorization": "Bearer sk-usual"}
    t = make_transport(transport, 2, usual)
    try:
        for headers in (usual, dict(usual), {**usual, "Authorization": "Bearer sk-other"}):
            resp = await t.post(mock.url + "/chat/completions", BODY, headers, 5.0)
            assert resp.status == 200
            assert mock.last_headers["authorization"] == headers["Authorization"]
            assert mock.last_headers["content-type"] == "application/json"
    finally:
        await t.aclose()


async def test_a_transport_never_names_its_http_library_as_the_client(
    client: Transport, mock: MockServer
) -> None:
    resp = await client.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
    assert resp.status == 200
    agent = mock.last_headers.get("user-agent", "")
    assert "aiohttp" not in agent and "Python" not in agent


async def test_cookies_a_server_sets_are_not_sent_back(transport: str) -> None:
    # Both transports are stateless, as LLM APIs are: a load balancer's cookie must not
    # make one transport's requests differ from the other's.
    from aiohttp import web

    seen: list[str | None] = []

    async def handler(request: web.Request) -> web.Response:
        seen.append(request.headers.get("Cookie"))
        return web.json_response({}, headers={"Set-Cookie": "route=abc; Path=/"})

    app = web.Application()
    app.router.add_post("/v1/chat/completions", handler)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    t = make_transport(transport, 2)
    try:
        for _ in range(2):
            # A host name, not an IP: aiohttp's cookie jar ignores cookies from IP addresses.
            url = f"http://localhost:{port}/v1/chat/completions"
            resp = await t.post(url, BODY, JSON, 5.0)
            assert resp.status == 200 and resp.headers["set-cookie"].startswith("route=")
    finally:
        await t.aclose()
        await runner.cleanup()
    assert seen == [None, None]


async def test_error_status_is_a_response_not_an_exception(
    client: Transport, mock: MockServer
) -> None:
    mock.fail_next(1, status=503, headers={"Retry-After": "2"})
    resp = await client.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
    assert resp.status == 503 and resp.headers["retry-after"] == "2"


@pytest.mark.parametrize("status", [301, 302, 307, 308])
async def test_a_redirect_is_a_response_not_followed(
    client: Transport, mock: MockServer, status: int
) -> None:
    # Followed, a 301 or 302 turns the POST into a GET; the caller decides instead.
    elsewhere = {"Location": mock.url + "/models"}
    mock.fail_next(2, status=status, headers=elsewhere)
    resp = await client.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
    assert resp.status == status and resp.headers["location"] == elsewhere["Location"]
    stream = await client.open_stream(mock.url + "/chat/completions", BODY, JSON, 5.0)
    try:
        assert stream.status == status
    finally:
        await stream.aclose()
    assert mock.stats()["by_route"] == {"/v1/chat/completions": 2}


async def test_a_body_past_a_mebibyte_is_sent_whole(client: Transport, mock: MockServer) -> None:
    # aiohttp warns of raw bytes past 1 MiB (an error under this suite's warning filter).
    content = "x " * 700_000
    body = json.dumps({"model": "m", "messages": [{"role": "user", "content": content}]})
    resp = await client.post(mock.url + "/chat/completions", body.encode(), JSON, 30.0)
    assert resp.status == 200
    assert json.loads(resp.body)["choices"][0]["message"]["content"].startswith("mock reply: x x")
    stream = await client.open_stream(mock.url + "/chat/completions", body.encode(), JSON, 30.0)
    try:
        assert stream.status == 200
    finally:
        await stream.aclose()


async def test_a_stream_event_of_megabytes_is_one_line(client: Transport, mock: MockServer) -> None:
    # A whole answer sent as one chunk (as a cache replays it) makes one long line;
    # aiohttp refused lines past 128 KiB, and the gateway answered a 500 for it.
    event = "data: " + json.dumps({"choices": [{"delta": {"content": "y" * 3_000_000}}]})
    sse = {"Content-Type": "text/event-stream"}
    mock.fail_next(1, status=200, body=event + "\n\ndata: [DONE]\n\n", headers=sse)
    stream = await client.open_stream(mock.url + "/chat/completions", BODY, JSON, 5.0)
    try:
        lines = [line async for line in stream.lines()]
    finally:
        await stream.aclose()
    assert lines[0].rstrip(b"\r\n") == event.encode()


async def test_gzip_request_body_is_accepted(client: Transport, mock: MockServer) -> None:
    headers = {**JSON, "Content-Encoding": "gzip"}
    resp = await client.post(mock.url + "/chat/completions", gzip.compress(BODY), headers, 5.0)
    assert resp.status == 200


async def test_timeout_raises_transport_error(client: Transport, mock: MockServer) -> None:
    mock.fail_next(1, mode="timeout", sleep_s=3.0)
    with pytest.raises(TransportError) as info:
        await client.post(mock.url + "/chat/completions", BODY, JSON, 0.2)
    assert info.value.kind == "timeout"


async def test_a_server_trickling_bytes_gets_timeout_s_on_every_transport(
    client: Transport, mock: MockServer
) -> None:
    # A chunk every 0.1 s: no read waits long, so only a bound on the whole call ends it.
    # The stdlib transport's bound was twice timeout_s plus a second.
    slow = trickling(mock)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TransportError) as info:
        await client.post(mock.url + "/chat/completions", slow, JSON, 1.0)
    assert info.value.kind == "timeout"
    assert loop.time() - started < 2.2  # the old bound would be 3 s: room for a busy machine


async def test_reset_mid_body_raises_transport_error(client: Transport, mock: MockServer) -> None:
    mock.fail_next(1, mode="reset")
    with pytest.raises(TransportError) as info:
        await client.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
    assert info.value.kind == "reset"


async def test_a_reset_before_the_headers_is_a_reset_not_a_refused_connection(
    client: Transport,
) -> None:
    # The connection was made: both transports must say so alike (the gateway's breaker
    # counts "connect" as the upstream down, and a reset as saying nothing).
    async def reset(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readuntil(b"\r\n\r\n")
        sock = writer.get_extra_info("socket")
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        writer.transport.abort()

    server = await asyncio.start_server(reset, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    try:
        with pytest.raises(TransportError) as info:
            await client.post(f"http://127.0.0.1:{port}/v1/chat/completions", BODY, JSON, 5.0)
    finally:
        server.close()
        await server.wait_closed()
    assert info.value.kind == "reset"


async def test_refused_connection_raises_transport_error(client: Transport) -> None:
    with pytest.raises(TransportError) as info:
        await client.post("http://127.0.0.1:9/v1/chat/completions", BODY, JSON, 2.0)
    assert info.value.kind == "connect"


async def test_closed_transport_reopens(transport: str, mock: MockServer) -> None:
    # minima-llm 0.2.x: a backend can be reused after aclose.
    t = make_transport(transport, 2)
    await t.aclose()
    try:
        resp = await t.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
        assert resp.status == 200
        await t.aclose()
        resp = await t.post(mock.url + "/chat/completions", BODY, JSON, 5.0)
        assert resp.status == 200
    finally:
        await t.aclose()


async def test_stdlib_keeps_connections_alive(mock: MockServer) -> None:
    t = StdlibTransport(max_connections=4)
    try:
        for _ in range(3):
            await asyncio.gather(
                *(t.post(mock.url + "/chat/completions", BODY, JSON, 5.0) for _ in range(4))
            )
    finally:
        await t.aclose()
    assert t.opened <= 4  # 12 requests, at most one connection per worker thread


async def test_stdlib_retries_a_stale_connection_on_a_new_one_not_the_next_stale_one() -> None:
    # A server restart (or an idle timeout: uvicorn's is 5 s) leaves every pooled
    # connection stale; the one retry must not pick another stale one from the pool.
    first = await MockServer().start()
    port = first.port
    t = StdlibTransport(max_connections=4)
    try:
        await asyncio.gather(
            *(t.post(first.url + "/chat/completions", BODY, JSON, 5.0) for _ in range(4))
        )
        await first.stop()
        second = await MockServer().start(port=port)
        try:
            for _ in range(4):
                resp = await t.post(second.url + "/chat/completions", BODY, JSON, 5.0)
                assert resp.status == 200
        finally:
            await second.stop()
    finally:
        await t.aclose()


async def test_stdlib_frees_the_thread_of_a_request_whose_server_trickles_bytes(
    mock: MockServer,
) -> None:
    # A streamed answer read whole, a chunk every 0.1 s: no single read times out, so
    # the one worker thread read on for seconds after the caller had given up.
    slow = trickling(mock)
    t = StdlibTransport(max_connections=1)
    try:
        with pytest.raises(TransportError, match="no complete response"):
            await t.post(mock.url + "/chat/completions", slow, JSON, 0.3)
        resp = await t.post(mock.url + "/chat/completions", BODY, JSON, 0.3)
        assert resp.status == 200
    finally:
        await t.aclose()


async def test_stdlib_frees_the_thread_of_a_cancelled_request(mock: MockServer) -> None:
    mock.update_config(latency_s=5.0)
    t = StdlibTransport(max_connections=1)
    try:
        sending = asyncio.ensure_future(t.post(mock.url + "/chat/completions", BODY, JSON, 10.0))
        for _ in range(500):  # until the mock holds it (at most 5 s)
            if mock.stats()["concurrency"]:
                break
            await asyncio.sleep(0.01)
        sending.cancel()
        with pytest.raises(asyncio.CancelledError):
            await sending
        mock.update_config(latency_s=0.0)
        resp = await t.post(mock.url + "/chat/completions", BODY, JSON, 0.5)
        assert resp.status == 200
    finally:
        await t.aclose()


async def test_stdlib_frees_the_thread_of_a_request_cancelled_while_uploading(
    mock: MockServer,
) -> None:
    # A server that accepts and never reads: the upload blocks once the socket buffers
    # fill, before any response, where the thread was not yet reachable to stop.
    with socket.create_server(("127.0.0.1", 0)) as deaf:
        url = f"http://127.0.0.1:{deaf.getsockname()[1]}/v1/chat/completions"
        t = StdlibTransport(max_connections=1)
        try:
            sending = asyncio.ensure_future(t.post(url, b"x" * 32_000_000, JSON, 30.0))
            await asyncio.sleep(0.3)
            sending.cancel()
            with pytest.raises(asyncio.CancelledError):
                await sending
            resp = await t.post(mock.url + "/chat/completions", BODY, JSON, 0.5)
            assert resp.status == 200
        finally:
            await t.aclose()


def test_a_late_abort_never_shuts_a_socket_already_handed_back() -> None:
    # The worker releases the socket before pooling it; a caller giving up after that
    # must leave it alone, or the next request on that pooled connection breaks.
    ours, theirs = socket.socketpair()
    with ours, theirs:
        handoff = _Handoff()
        handoff.hold(ours)
        assert handoff.release() is True
        handoff.abort()
        theirs.sendall(b"still open")
        assert ours.recv(10) == b"still open"
        early = _Handoff()
        early.hold(ours)
        early.abort()
        assert ours.recv(10) == b""  # shut: a blocked read returns at once
        assert early.release() is False  # so the worker closes it instead of pooling it
        with pytest.raises(TransportError):
            early.hold(ours)


def test_unknown_transport_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match="transport"):
        make_transport("curl", 1)


@pytest.mark.skipif(not hasattr(os, "fork"), reason="no fork on this platform")
def test_a_forked_child_sends_with_a_transport_its_parent_used(transport: str) -> None:
    # multiprocessing forks by default on Linux before 3.14; the stdlib transport's
    # child used to hand every request to pool threads that exist only in the parent.
    with run_mock_server_in_thread() as mock:
        client = make_transport(transport, 8)
        url = mock.url + "/chat/completions"
        assert asyncio.run(client.post(url, BODY, JSON, 5.0)).status == 200
        with warnings.catch_warnings():
            # 3.12+ warns that forking a threaded process may deadlock: the case at hand.
            warnings.simplefilter("ignore", DeprecationWarning)
            pid = os.fork()
        if pid == 0:  # pragma: no cover - the child reports through its exit status
            try:
                resp = asyncio.run(asyncio.wait_for(client.post(url, BODY, JSON, 2.0), 5.0))
                os._exit(0 if resp.status == 200 else 1)
            except BaseException:
                os._exit(2)
        assert _exit_status(pid, 10.0) == 0
        # The parent's own pool and connections are untouched by the child.
        assert asyncio.run(client.post(url, BODY, JSON, 5.0)).status == 200
        asyncio.run(client.aclose())


def _exit_status(pid: int, timeout_s: float) -> int:
    """The child's exit status, killing it if it has not ended within ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        done, status = os.waitpid(pid, os.WNOHANG)
        if done:
            return os.waitstatus_to_exitcode(status)
        time.sleep(0.02)
    os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return -1
