"""Shared fixtures: the project's mock server on 127.0.0.1 and backends pointed at it."""

from __future__ import annotations

import os
import socket
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from backend_support import FAST, BackendFactory
from minima_llm import BatchConfig, MinimaLlmConfig, OpenAIMinimaLlm
from minima_llm.testing import MockConfig, MockServer


@pytest.fixture(autouse=True)
def _no_proxy_from_the_machine(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each test decides which HTTP proxy is used: a CI runner's own *_proxy settings are cleared."""
    for name in list(os.environ):
        if name.lower() in ("http_proxy", "https_proxy", "all_proxy", "no_proxy"):
            monkeypatch.delenv(name)


@pytest.fixture
async def mock() -> AsyncIterator[MockServer]:
    """A fresh mock server for one test."""
    async with MockServer(MockConfig()) as server:
        yield server


@pytest.fixture
def taken_port() -> Iterator[int]:
    """A port on 127.0.0.1 that something else is listening on for the whole test."""
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        yield taken.getsockname()[1]


@pytest.fixture(params=["aiohttp", "stdlib", "asyncio"])
def transport(request: pytest.FixtureRequest) -> str:
    """Every backend test runs over every transport."""
    return str(request.param)


@pytest.fixture
async def make_backend(
    mock: MockServer, transport: str, tmp_path: Path
) -> AsyncIterator[BackendFactory]:
    """Build backends against the mock with fast retries; closes them after the test."""
    made: list[OpenAIMinimaLlm] = []

    def factory(**overrides: Any) -> OpenAIMinimaLlm:
        fields: dict[str, Any] = {
            "base_url": mock.url,
            "model": "mock-model",
            "cache_dir": str(tmp_path / "cache"),
            "transport": transport,
            "batch": BatchConfig(num_workers=16, heartbeat_s=0, stall_s=0),
            **FAST,
        }
        fields.update(overrides)
        backend = OpenAIMinimaLlm(MinimaLlmConfig(**fields))
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()
