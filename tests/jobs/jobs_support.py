"""A proxy in front of the mock that lets a test answer batch-API requests itself.

The mock's own fault injection covers the live inference routes only; batch-mode
tests need late, cut, refused or rewritten answers on the Files and Batches routes.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Awaitable, Callable, Iterable
from pathlib import Path
from typing import Any

import aiohttp
from aiohttp import web

from backend_support import FAST
from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmRequest,
    MinimaLlmResponse,
    MinimaLlmResult,
    OpenAIMinimaLlm,
    ParasailBatchConfig,
)
from minima_llm.jobs import JobState
from minima_llm.jobs.state import list_states
from minima_llm.testing import MockServer

Fault = Callable[[web.Request, bytes], Awaitable[web.StreamResponse | None]]


class Proxy:
    """Forwards to the mock; ``fault(request, body)`` may answer a request itself (None: forward)."""

    def __init__(self, target: str) -> None:
        self.target = target.rstrip("/").removesuffix("/v1")
        self.fault: Fault | None = None
        self.seen: list[str] = []  # "METHOD /path" of every request, in order
        self.url = ""
        self._runner = web.AppRunner(web.Application(), shutdown_timeout=1.0)
        self._runner.app.router.add_route("*", "/{tail:.*}", self._handle)
        self._session: aiohttp.ClientSession | None = None

    def count(self, method: str, path: str) -> int:
        """Requests seen so far whose method and path (a regex) match."""
        return sum(1 for seen in self.seen if re.fullmatch(f"{method} {path}", seen))

    async def forward(self, request: web.Request, body: bytes) -> web.Response:
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() == "content-type"}
        url = self.target + request.path_qs
        async with self._session.request(request.method, url, data=body, headers=headers) as resp:
            data = await resp.read()
            kind = resp.headers.get("Content-Type", "application/json")
            return web.Response(body=data, status=resp.status, headers={"Content-Type": kind})

    async def _handle(self, request: web.Request) -> web.StreamResponse:
        body = await request.read()
        self.seen.append(f"{request.method} {request.path}")
        answer = await self.fault(request, body) if self.fault is not None else None
        return answer if answer is not None else await self.forward(request, body)

    async def __aenter__(self) -> Proxy:
        self._session = aiohttp.ClientSession()
        await self._runner.setup()
        site = web.TCPSite(self._runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self._runner.addresses[0][1]}/v1"
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()


BAD = "[mock:batch-error]"  # a line the mock fails with a 500
SLOW = 60.0  # batch_delay_s that keeps a batch in_progress for the whole test
GIVE_UP = 0.0001  # max_poll_hours: a run gives up after 0.36 s and leaves its job
FILES = "/v1/files"
BATCHES = "/v1/batches"
POLL = r"/v1/batches/batch_\w+"
CONTENT = r"/v1/files/[\w-]+/content"
LIVE = "/v1/chat/completions"
Factory = Callable[..., OpenAIMinimaLlm]


def parasail(**overrides: Any) -> ParasailBatchConfig:
    """Batch mode with prefix ``p`` and a fast poll."""
    return ParasailBatchConfig(**{"llm_batch_prefix": "p", "poll_interval_s": 0.05, **overrides})


def config(base_url: str, cache_dir: Path | None, **overrides: Any) -> MinimaLlmConfig:
    """A config on ``base_url`` with fast retries and a quiet batch runner."""
    fields: dict[str, Any] = {
        "base_url": base_url,
        "model": "mock-model",
        "cache_dir": None if cache_dir is None else str(cache_dir),
        "batch": BatchConfig(num_workers=16, heartbeat_s=0, stall_s=0),
        **FAST,
        **overrides,
    }
    return MinimaLlmConfig(**fields)


def questions(*numbers: int) -> list[MinimaLlmRequest]:
    """One request per number, each with its own request id (numbers may repeat)."""
    return [
        MinimaLlmRequest(f"q{n}-{at}", [{"role": "user", "content": f"question {n}"}])
        for at, n in enumerate(numbers)
    ]


def replies(numbers: Iterable[int]) -> list[str]:
    """The mock's answers to ``questions(*numbers)``."""
    return [f"mock reply: question {n}" for n in numbers]


def answers(results: list[Any]) -> list[MinimaLlmResponse]:
    """``results``, checked to be answers all."""
    assert all(isinstance(r, MinimaLlmResponse) for r in results), results
    return results


def texts(results: Iterable[MinimaLlmResult]) -> list[str]:
    """The answers' texts, all results checked to be answers."""
    return [r.text for r in answers(list(results))]


def error_types(results: Iterable[MinimaLlmResult]) -> set[str | None]:
    """The error types among ``results`` (None for answers)."""
    return {getattr(r, "error_type", None) for r in results}


def route(mock: MockServer, name: str) -> int:
    """How many requests the mock counted on a route."""
    return int(mock.stats()["by_route"].get(name, 0))


async def assert_split_by_bytes(cache_dir: Path, jobs: Any, count: int) -> list[JobState]:
    """Several jobs held the ``count`` requests, each input file within ``jobs.max_bytes``."""
    states = list_states(cache_dir)
    assert len(states) > 1 and sum(s.request_count for s in states) == count
    for state in states:
        assert state.input_file_id is not None
        assert len(await jobs.api.acontent(state.input_file_id)) <= jobs.max_bytes
    return states


async def quietly(
    backend: OpenAIMinimaLlm, requests: list[MinimaLlmRequest], progress: Any = False
) -> list[Any]:
    """``run_batched`` without progress output, bounded so a hang fails the test."""
    return await asyncio.wait_for(backend.run_batched(requests, progress=progress), 10)
