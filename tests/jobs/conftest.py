"""Fixtures for the batch-mode tests: backends on the mock, and the fault proxy in front of it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
from jobs_support import Factory, Proxy, config, parasail

from minima_llm import OpenAIMinimaLlm
from minima_llm.cache.prompt import PromptCache
from minima_llm.testing import MockServer


@pytest.fixture
async def proxy(mock: MockServer) -> AsyncIterator[Proxy]:
    """The mock behind a proxy whose ``fault`` may answer any request itself."""
    async with Proxy(mock.url) as running:
        yield running


_SHARED_CACHE = object()


@pytest.fixture
async def make(mock: MockServer, tmp_path: Path) -> AsyncIterator[Factory]:
    """``make()`` is a batch-mode backend on the mock, ``make(live=True)`` a normal one.

    All share ``tmp_path/cache`` (cache and state files) unless given another
    ``cache_dir`` (None: no cache), ``base_url`` (a proxy) or ``cache`` store.
    """
    made: list[OpenAIMinimaLlm] = []

    def factory(
        *,
        live: bool = False,
        base_url: str | None = None,
        cache_dir: Any = _SHARED_CACHE,
        cache: PromptCache | None = None,
        **overrides: Any,
    ) -> OpenAIMinimaLlm:
        if not live:
            overrides.setdefault("parasail", parasail())
        directory = tmp_path / "cache" if cache_dir is _SHARED_CACHE else cache_dir
        backend = OpenAIMinimaLlm(config(base_url or mock.url, directory, **overrides), cache=cache)
        made.append(backend)
        return backend

    yield factory
    for backend in made:
        await backend.aclose()
