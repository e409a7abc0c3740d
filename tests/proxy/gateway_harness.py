"""The gateway served in-process over real HTTP on 127.0.0.1, and small client helpers.

Not a conftest: test folders have no ``__init__.py``, so a second ``conftest``
module would shadow ``tests/conftest.py`` for modules that import it by name.
"""

from __future__ import annotations

import asyncio
import json
import socket
from collections.abc import AsyncIterator, Awaitable, Callable, Mapping
from contextlib import asynccontextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from backend_support import FAST
from minima_llm import MinimaLlmConfig, OpenAIMinimaLlm
from minima_llm.clock import SYSTEM_CLOCK, Clock
from minima_llm.proxy import ProxySettings, build_app
from minima_llm.proxy.cli import GATEWAY_TRANSPORT
from minima_llm.proxy.gateway import Gateway
from minima_llm.proxy.handlers import GATEWAY
from minima_llm.proxy.log import ProxyLog
from minima_llm.streaming import ChunkAssembler

MODEL = "mock-model"


def backend_config(base_url: str, cache_dir: Path, **overrides: Any) -> MinimaLlmConfig:
    """A client config against ``base_url`` with fast retries and a cache in ``cache_dir``."""
    fields: dict[str, Any] = {
        "base_url": base_url,
        "model": MODEL,
        "cache_dir": str(cache_dir),
        # The upstream transport minimallm-proxy itself uses.
        "transport": GATEWAY_TRANSPORT,
        **FAST,
    }
    fields.update(overrides)
    return MinimaLlmConfig(**fields)


def chat_body(text: str, **extra: Any) -> dict[str, Any]:
    """A one-message chat request body."""
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


@dataclass
class Reply:
    """One HTTP answer, read whole."""

    status: int
    headers: Mapping[str, str]
    text: str

    def json(self) -> Any:
        return json.loads(self.text)

    @property
    def cache(self) -> str | None:
        return self.headers.get("x-minima-cache")

    def events(self) -> list[str]:
        """The ``data`` payloads of an SSE body, in order."""
        return sse_data(self.text)


def sse_data(text: str) -> list[str]:
    """The ``data:`` payloads of SSE text; every non-blank line must be a ``data:`` line."""
    out = []
    for line in text.split("\n"):
        if not line.strip():
            continue
        assert line.startswith("data: "), f"not an SSE data line: {line!r}"
        out.append(line[len("data: ") :])
    return out


def chunks_of(events: list[str]) -> list[dict[str, Any]]:
    """The JSON chunks of a stream, without the final ``[DONE]``."""
    return [json.loads(e) for e in events if e != "[DONE]"]


def stream_text(events: list[str], kind: str = "chat") -> str:
    """The first choice's text, assembled from a stream's chunks."""
    assembler = ChunkAssembler(kind)
    for chunk in chunks_of(events):
        assembler.add(chunk)
    return assembler.text(0)


@dataclass
class Served:
    """A running gateway and a client session to talk to it."""

    url: str
    http: aiohttp.ClientSession
    app: web.Application

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    @property
    def backend(self) -> OpenAIMinimaLlm:
        return self.gateway.backend

    async def request(
        self,
        method: str,
        path: str,
        body: Any = None,
        headers: Mapping[str, str] | None = None,
        data: bytes | None = None,
    ) -> Reply:
        kwargs: dict[str, Any] = {"headers": dict(headers or {})}
        if data is not None:
            kwargs["data"] = data
        elif body is not None:
            kwargs["json"] = body
        async with self.http.request(method, self.url + path, **kwargs) as resp:
            return Reply(resp.status, resp.headers, await resp.text())

    async def post(self, path: str, body: Any, headers: Mapping[str, str] | None = None) -> Reply:
        return await self.request("POST", path, body, headers)

    async def get(self, path: str, headers: Mapping[str, str] | None = None) -> Reply:
        return await self.request("GET", path, headers=headers)

    async def chat(
        self, text: str, headers: Mapping[str, str] | None = None, **extra: Any
    ) -> Reply:
        return await self.post("/v1/chat/completions", chat_body(text, **extra), headers)


@asynccontextmanager
async def serve(
    base_url: str,
    cache_dir: Path,
    settings: ProxySettings | None = None,
    proxy_log: ProxyLog | None = None,
    *,
    clock: Clock = SYSTEM_CLOCK,
    **config: Any,
) -> AsyncIterator[Served]:
    """Build the gateway in front of ``base_url`` and serve it on a free port of 127.0.0.1.

    ``clock`` drives the backend's timing (retries, pacing, cooldown, the breaker).
    """
    backend = OpenAIMinimaLlm(backend_config(base_url, cache_dir, **config), clock=clock)
    app = build_app(backend, settings or ProxySettings(port=0), proxy_log=proxy_log)
    # access_log=None as the CLI runs it; a short shutdown so a stuck handler fails fast.
    runner = web.AppRunner(app, access_log=None, shutdown_timeout=2.0)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = runner.addresses[0][1]
        async with aiohttp.ClientSession() as http:
            yield Served(f"http://127.0.0.1:{port}", http, app)
    finally:
        await runner.cleanup()


def closed_port_url() -> str:
    """A base URL on 127.0.0.1 where nothing listens."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}/v1"


async def eventually(check: Callable[[], bool], timeout_s: float = 3.0) -> bool:
    """Poll ``check`` until it holds or ``timeout_s`` passes; return its last value."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while not check():
        if loop.time() > deadline:
            return check()
        await asyncio.sleep(0.01)
    return True


async def gather_all(*aws: Awaitable[Any]) -> list[Any]:
    """``asyncio.gather`` typed as a list."""
    return list(await asyncio.gather(*aws))
