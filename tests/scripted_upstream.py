"""A chat endpoint on 127.0.0.1 that answers fixed bodies and streams, for replay-fidelity tests."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

from aiohttp import web

from minima_llm.backend import ChunkStream
from minima_llm.streaming import ChunkAssembler, encode_event

BOUND_S = 5.0


class ScriptedUpstream:
    """Answers whole from ``bodies`` and streams ``streams``, by the last user message.

    ``whole`` builds the body for a prompt ``bodies`` lacks (None: every prompt has one).
    """

    def __init__(
        self,
        bodies: Mapping[str, Any],
        streams: Mapping[str, Sequence[Mapping[str, Any] | str]],
        whole: Callable[[str], Any] | None = None,
    ) -> None:
        self.bodies, self.streams, self.whole = bodies, streams, whole
        self.requests: dict[str, int] = {}
        self.url = ""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        """Count the request by its prompt, and answer it whole or as its scripted stream."""
        payload = await request.json()
        prompt = payload["messages"][-1]["content"]
        self.requests[prompt] = self.requests.get(prompt, 0) + 1
        if not payload.get("stream"):
            body = self.bodies.get(prompt)
            if body is None and self.whole is not None:
                body = self.whole(prompt)
            return web.json_response(body)
        resp = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await resp.prepare(request)
        for data in self.streams[prompt]:
            await resp.write(encode_event(data))
        await resp.write(encode_event("[DONE]"))
        return resp


@asynccontextmanager
async def serving(scripted: ScriptedUpstream) -> AsyncIterator[ScriptedUpstream]:
    """Serve ``scripted`` on a free port for the block; ``scripted.url`` is its ``/v1`` base."""
    app = web.Application()
    app.router.add_post("/v1/chat/completions", scripted.handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    scripted.url = f"http://127.0.0.1:{runner.addresses[0][1]}/v1"
    try:
        yield scripted
    finally:
        await runner.cleanup()


def assemble(chunks: Sequence[Mapping[str, Any]], kind: str = "chat") -> dict[str, Any]:
    """The completion the chunks add up to."""
    assembler = ChunkAssembler(kind)
    for chunk in chunks:
        assembler.add(chunk)
    return assembler.completion()


async def read_chunks(stream: Any) -> list[dict[str, Any]]:
    """Every chunk of an opened stream, within BOUND_S."""
    assert isinstance(stream, ChunkStream), stream

    async def read() -> list[dict[str, Any]]:
        return [chunk async for chunk in stream]

    return await asyncio.wait_for(read(), BOUND_S)
