"""API keys: who may call, what stays secret, cache partitions and key pass-through."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from gateway_harness import MODEL, Reply, serve

from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockServer
from minima_llm.upstream import MAX_KEYED_LIMITS

K1, K2 = "sk-gw-alpha-7f3e21", "sk-gw-beta-91ad04"
WRONG = "sk-gw-wrong-55c0de"
KEYS = ProxySettings(port=0, api_keys=(K1, K2))


def _is_openai_error(reply: Reply, status: int, code: str) -> None:
    assert reply.status == status, reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "authentication_error" and error["code"] == code


async def test_keys_are_required(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, KEYS) as gw:
        _is_openai_error(await gw.chat("hi"), 401, "missing_api_key")
        _is_openai_error(await gw.get("/v1/models"), 401, "missing_api_key")
        _is_openai_error(await gw.get("/metrics"), 401, "missing_api_key")
        wrong = await gw.chat("hi", headers={"Authorization": f"Bearer {WRONG}"})
        _is_openai_error(wrong, 401, "invalid_api_key")
        _is_openai_error(await gw.chat("hi", headers={"x-api-key": WRONG}), 401, "invalid_api_key")
        _is_openai_error(
            await gw.chat("hi", headers={"Authorization": f"Basic {K1}"}), 401, "missing_api_key"
        )
        assert mock.stats()["requests"] == 0
        assert (await gw.chat("hi", headers={"Authorization": f"Bearer {K1}"})).status == 200
        assert (await gw.chat("hi", headers={"x-api-key": K2})).status == 200
        assert (await gw.get("/v1/models", headers={"x-api-key": K1})).status == 200
        assert (await gw.get("/health")).status == 200  # probes need no key


async def test_health_tells_an_anonymous_caller_only_the_status(
    mock: MockServer, tmp_path: Path
) -> None:
    settings = ProxySettings(port=0, api_keys=(K1,))
    async with serve(mock.url, tmp_path, settings) as gw:
        for headers in ({}, {"Authorization": f"Bearer {WRONG}"}):
            anonymous = await gw.get("/health", headers=headers)
            assert anonymous.status == 200
            assert anonymous.json() == {"status": "ok"}
        detailed = (await gw.get("/health", headers={"x-api-key": K1})).json()
        assert detailed["status"] == "ok" and detailed["upstream"]["reachable"] is True
        assert detailed["model"] and detailed["cache"]
    async with serve(mock.url, tmp_path) as gw:  # no keys: nothing to protect
        assert "upstream" in (await gw.get("/health")).json()


async def test_keys_never_leak(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    settings = ProxySettings(port=0, api_keys=(K1, K2), verbose=True, log_every=1)
    bodies: list[str] = []
    async with serve(mock.url, tmp_path, settings) as gw:
        for headers in ({}, {"Authorization": f"Bearer {WRONG}"}, {"x-api-key": K1}):
            bodies.append((await gw.chat("hi", headers=headers)).text)
            bodies.append((await gw.chat("hi", headers=headers, stream=True)).text)
        mock.fail_next(1, status=400)
        bodies.append((await gw.chat("fails", headers={"x-api-key": K2})).text)
        bodies.append((await gw.post("/v1/chat/completions", "{", {"x-api-key": K2})).text)
        bodies.append((await gw.get("/metrics", headers={"x-api-key": K1})).text)
        bodies.append((await gw.get("/health")).text)
        bodies.append(repr(gw.gateway))
    assert "hit" in caplog.text and "failed" in caplog.text  # the log did run
    for secret in (K1, K2, WRONG):
        assert secret not in caplog.text
        assert not any(secret in body for body in bodies)


async def test_cache_partitioned_by_key(mock: MockServer, tmp_path: Path) -> None:
    settings = ProxySettings(port=0, api_keys=(K1, K2), partition_cache_by_key=True)
    async with serve(mock.url, tmp_path, settings) as gw:
        one, two = {"x-api-key": K1}, {"Authorization": f"Bearer {K2}"}
        assert (await gw.chat("private", headers=one)).cache == "miss"
        assert (await gw.chat("private", headers=one)).cache == "hit"
        assert (await gw.chat("private", headers=two)).cache == "miss"
        assert (await gw.chat("private", headers=two, stream=True)).cache == "hit"
        assert mock.stats()["requests"] == 2


async def test_cache_shared_without_partitions(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, KEYS) as gw:
        assert (await gw.chat("shared", headers={"x-api-key": K1})).cache == "miss"
        assert (await gw.chat("shared", headers={"x-api-key": K2})).cache == "hit"


@asynccontextmanager
async def recording_upstream(seen: list[str | None]) -> AsyncIterator[str]:
    """A bare OpenAI-shaped upstream that records each call's Authorization header.

    The mock server does not record request headers, so pass-through is checked here.
    """

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Authorization"))
        body = await request.json()
        completion = {
            "id": "c",
            "object": "chat.completion",
            "created": 1,
            "model": MODEL,
            "choices": [
                {
                    "index": 0,
                    "message": {"role": "assistant", "content": "ok"},
                    "finish_reason": "stop",
                }
            ],
        }
        if not body.get("stream"):
            return web.json_response(completion)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        chunk = {**completion, "object": "chat.completion.chunk"}
        chunk["choices"] = [
            {"index": 0, "delta": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}
        ]
        await resp.write(b"data: " + json.dumps(chunk).encode() + b"\n\ndata: [DONE]\n\n")
        return resp

    app = web.Application()
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        yield f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    finally:
        await runner.cleanup()


@asynccontextmanager
async def gateway_over_recorder(
    tmp_path: Path, seen: list[str | None], pass_through: bool
) -> AsyncIterator[Any]:
    """A gateway (own upstream key ``sk-upstream-own``) in front of an upstream recording keys."""
    settings = ProxySettings(port=0, pass_through_client_key=pass_through)
    async with (
        recording_upstream(seen) as upstream,
        serve(upstream, tmp_path, settings, api_key="sk-upstream-own") as gw,
    ):
        yield gw


@pytest.mark.parametrize("pass_through", [True, False])
async def test_client_key_pass_through(tmp_path: Path, pass_through: bool) -> None:
    seen: list[str | None] = []
    async with gateway_over_recorder(tmp_path, seen, pass_through) as gw:
        one = await gw.chat("a", headers={"Authorization": "Bearer sk-caller-1"})
        two = await gw.chat("b", headers={"x-api-key": "sk-caller-2"}, stream=True)
        three = await gw.chat("c")
    assert [one.status, two.status, three.status] == [200, 200, 200]
    if pass_through:
        assert seen == ["Bearer sk-caller-1", "Bearer sk-caller-2", "Bearer sk-upstream-own"]
    else:
        assert seen == ["Bearer sk-upstream-own"] * 3


async def test_key_that_is_not_utf8_is_refused(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, KEYS) as gw:
        host, port = gw.url.removeprefix("http://").split(":")
        reader, writer = await asyncio.open_connection(host, int(port))
        writer.write(
            b"GET /v1/models HTTP/1.1\r\nHost: gw\r\nx-api-key: sk-\xff\xfe\r\n"
            b"Connection: close\r\n\r\n"
        )
        await writer.drain()
        raw = await reader.read()
        writer.close()
        await writer.wait_closed()
    head, _, body = raw.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 401 "), raw
    assert json.loads(body)["error"]["code"] == "invalid_api_key"


async def test_passed_through_keys_never_share_cached_answers(tmp_path: Path) -> None:
    # Without gateway keys only the upstream judges a passed-through key; a cache
    # shared across keys would answer a caller the upstream never saw.
    seen: list[str | None] = []
    async with gateway_over_recorder(tmp_path, seen, pass_through=True) as gw:
        first = await gw.chat("same", headers={"Authorization": "Bearer sk-caller-1"})
        again = await gw.chat("same", headers={"Authorization": "Bearer sk-caller-1"})
        other = await gw.chat("same", headers={"Authorization": "Bearer sk-caller-2"})
        keyless = await gw.chat("same")
    assert [first.cache, again.cache, other.cache, keyless.cache] == ["miss", "hit", "miss", "miss"]
    assert seen == ["Bearer sk-caller-1", "Bearer sk-caller-2", "Bearer sk-upstream-own"]


@pytest.mark.parametrize("stream", [False, True])
async def test_one_passed_through_keys_429_does_not_hold_back_another_key(
    mock: MockServer, tmp_path: Path, stream: bool
) -> None:
    # Each key has its own quota upstream: a caller over its limit must not stall the rest.
    settings = ProxySettings(port=0, pass_through_client_key=True)
    user_a = {"Authorization": "Bearer sk-user-a"}
    user_b = {"Authorization": "Bearer sk-user-b"}
    # Waits as long as the Retry-After says (the harness caps them at 0.05 s).
    waits = {"max_attempts": 1, "cooldown_cap_s": 10.0, "max_backoff_s": 10.0}
    async with serve(mock.url, tmp_path, settings, api_key="sk-own", **waits) as gw:
        mock.fail_next(1, status=429, headers={"retry-after": "3"})
        refused = await gw.chat("a over its limit", headers=user_a)
        assert refused.status == 429
        assert refused.headers["Retry-After"] == "3"  # a's own wait, not the gateway key's
        loop = asyncio.get_running_loop()
        started = loop.time()
        other = await gw.chat("b within its own", headers=user_b, stream=stream)
        assert other.status == 200 and loop.time() - started < 1.5
        started = loop.time()
        # a waits out its own Retry-After
        again = await gw.chat("a again", headers=user_a, stream=stream)
        assert again.status == 200 and loop.time() - started > 1.5
        upstream = gw.backend.upstream
        assert upstream.limits_for("sk-user-a") is not upstream.limits_for("sk-user-b")
        assert upstream.limits_for("sk-own") is upstream.limits_for(None) is upstream.limits
        first = upstream.limits_for("sk-user-a")
        for n in range(MAX_KEYED_LIMITS):  # the least recently used key is forgotten first
            upstream.limits_for(f"sk-many-{n}")
        assert upstream.limits_for("sk-user-a") is not first


async def test_an_overloaded_upstream_holds_back_every_passed_through_key(
    mock: MockServer, tmp_path: Path
) -> None:
    # A 503 speaks for the server, not for the key that happened to meet it.
    settings = ProxySettings(port=0, pass_through_client_key=True)
    waits = {"max_attempts": 1, "cooldown_cap_s": 10.0, "max_backoff_s": 10.0}
    async with serve(mock.url, tmp_path, settings, api_key="sk-own", **waits) as gw:
        mock.fail_next(1, status=503, headers={"retry-after": "1"})
        refused = await gw.chat("a", headers={"Authorization": "Bearer sk-user-a"})
        assert refused.status == 503
        # What any caller is told to wait, a key never seen before included.
        assert gw.backend.upstream.cooling_s("sk-user-new") > 0.5
        loop = asyncio.get_running_loop()
        started = loop.time()
        other = await gw.chat("b", headers={"Authorization": "Bearer sk-user-b"})
        assert other.status == 200 and loop.time() - started > 0.7
        assert gw.backend.upstream.overload.bumps == 1
