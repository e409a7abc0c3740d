"""Streamed tool calls survive the gateway's cache, and a malformed chunk never hangs a client.

The upstream here is a scripted aiohttp server on 127.0.0.1 in a thread of the
test process: the mock cannot stream tool calls or broken chunks.
"""

from __future__ import annotations

import asyncio
import collections
import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import openai
import pytest
from _e2e_support import API_KEY, MODEL, Service, user
from aiohttp import web

from minima_llm.streaming import encode_event

TOOLS = [
    {
        "type": "function",
        "function": {
            "name": name,
            "parameters": {"type": "object", "properties": {key: {"type": "string"}}},
        },
    }
    for name, key in (("get_weather", "city"), ("get_time", "tz"))
]
CALLS = [
    ("call_a", "get_weather", '{"city": "Paris"}'),
    ("call_b", "get_time", '{"tz": "Europe/Paris"}'),
]
# A client that waited this long for an answer the gateway already had was left hanging.
PROMPT_ANSWER_S = 5.0


def _chunk(*choices: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-e2e",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": list(choices),
    }


def _delta(finish: str | None = None, **delta: Any) -> dict[str, Any]:
    return {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}


def _tool_call_stream() -> list[dict[str, Any]]:
    """Two parallel calls as OpenAI streams them: id, type and name first, then arguments."""
    chunks = [_chunk(_delta(role="assistant", content=None, refusal=None))]
    for index, (call_id, name, arguments) in enumerate(CALLS):
        head = {"index": index, "id": call_id, "type": "function"}
        function = {"name": name, "arguments": ""}
        chunks.append(_chunk(_delta(tool_calls=[{**head, "function": function}])))
        for start in range(0, len(arguments), 5):
            fragment = {"index": index, "function": {"arguments": arguments[start : start + 5]}}
            chunks.append(_chunk(_delta(tool_calls=[fragment])))
    return [*chunks, _chunk(_delta(finish="tool_calls"))]


SCRIPTS = {
    "tools": _tool_call_stream(),
    "broken": [_chunk(_delta(role="assistant", content="partial ")), _chunk(None)],
}


class ScriptedUpstream:
    """Streams the script named by the prompt's first word, in a thread of its own."""

    def __init__(self) -> None:
        self.requests: collections.Counter[str] = collections.Counter()
        self.url = ""
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True)
        self._runner: web.AppRunner | None = None

    def start(self) -> None:
        self._thread.start()
        asyncio.run_coroutine_threadsafe(self._serve(), self._loop).result(10)

    def stop(self) -> None:
        if self._runner is not None:
            asyncio.run_coroutine_threadsafe(self._runner.cleanup(), self._loop).result(10)
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(10)
        self._loop.close()

    async def _serve(self) -> None:
        app = web.Application()
        app.router.add_post("/v1/chat/completions", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        payload = await request.json()
        prompt = payload["messages"][-1]["content"]
        self.requests[prompt] += 1
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for chunk in SCRIPTS[prompt.split()[0]]:
            await resp.write(encode_event(chunk))
        await resp.write(encode_event("[DONE]"))
        return resp


@pytest.fixture(scope="module")
def scripted() -> Iterator[ScriptedUpstream]:
    upstream = ScriptedUpstream()
    upstream.start()
    yield upstream
    upstream.stop()


@pytest.fixture
def sdk(
    scripted: ScriptedUpstream, launch_gateway: Callable[..., Service]
) -> Iterator[openai.OpenAI]:
    gw = launch_gateway(upstream=scripted.url)
    with openai.OpenAI(base_url=gw.url, api_key=API_KEY, max_retries=0, timeout=15.0) as client:
        yield client


def _streamed_calls(client: openai.OpenAI, prompt: str) -> tuple[str, list[tuple[str, str, str]]]:
    """The cache label and the tool calls of one streamed answer, merged as SDK users do."""
    raw = client.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), tools=TOOLS, stream=True
    )
    calls: dict[int, list[str]] = {}
    with raw.parse() as stream:
        for chunk in stream:
            for call in (chunk.choices[0].delta.tool_calls or []) if chunk.choices else []:
                merged = calls.setdefault(call.index, ["", "", ""])
                merged[0] = merged[0] or call.id or ""
                if call.function is not None:
                    merged[1] = merged[1] or call.function.name or ""
                    merged[2] += call.function.arguments or ""
    return raw.headers["x-minima-cache"], [(c[0], c[1], c[2]) for _, c in sorted(calls.items())]


def test_streamed_tool_calls_are_served_whole_and_replayed_from_the_cache(
    sdk: openai.OpenAI, scripted: ScriptedUpstream, unique: Callable[[str], str]
) -> None:
    prompt = unique("tools")
    assert _streamed_calls(sdk, prompt) == ("miss", CALLS)

    raw = sdk.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), tools=TOOLS
    )
    assert raw.headers["x-minima-cache"] == "hit"
    choice = raw.parse().choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    calls = choice.message.tool_calls or []
    assert [(c.id, c.function.name, c.function.arguments) for c in calls] == CALLS

    assert _streamed_calls(sdk, prompt) == ("hit", CALLS)
    assert scripted.requests[prompt] == 1


def test_malformed_chunk_is_an_error_event_promptly_and_not_cached(
    sdk: openai.OpenAI, scripted: ScriptedUpstream, unique: Callable[[str], str]
) -> None:
    prompt = unique("broken")
    for attempt in (1, 2):
        started = time.monotonic()
        with (
            pytest.raises(openai.APIError) as caught,
            sdk.chat.completions.create(model=MODEL, messages=user(prompt), stream=True) as stream,
        ):
            for _ in stream:
                pass
        assert time.monotonic() - started < PROMPT_ANSWER_S
        assert "interrupted" in caught.value.message and "malformed" in caught.value.message
        assert scripted.requests[prompt] == attempt  # not cached: the retry asks upstream again
