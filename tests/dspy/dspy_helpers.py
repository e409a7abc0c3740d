"""Helpers for the DSPy tests: backends on the mock server and a fake backend.

Not a conftest.py: a second conftest module would shadow the top-level one that
other tests import with ``from backend_support import ...``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmRequest,
    MinimaLlmResponse,
    OpenAIMinimaLlm,
)


def quiet_batch() -> BatchConfig:
    """Batch settings for tests: a few workers, no heartbeat, no printed failures."""
    return BatchConfig(num_workers=8, heartbeat_s=0, stall_s=0, print_first_failures=0)


def backend_config(url: str, cache_dir: Path | None, **overrides: Any) -> MinimaLlmConfig:
    """A config for the mock: fast retries, no pacing, quiet batches."""
    fields: dict[str, Any] = {
        "base_url": url,
        "model": "mock-model",
        "cache_dir": str(cache_dir) if cache_dir is not None else None,
        "rpm": 0,
        "base_backoff_s": 0.01,
        "max_backoff_s": 0.05,
        "cooldown_cap_s": 0.05,
        "timeout_s": 5.0,
        "max_attempts": 2,
        "batch": quiet_batch(),
    }
    fields.update(overrides)
    return MinimaLlmConfig(**fields)


@dataclass
class FakeBackend:
    """Records requests and answers each from ``answer`` (a text, a result, or a callable)."""

    answer: Any = "[[ ## answer ## ]]\nok\n\n[[ ## completed ## ]]"
    requests: list[MinimaLlmRequest] = field(default_factory=list)
    refreshes: list[bool] = field(default_factory=list)
    closed: bool = False

    async def generate(self, request: MinimaLlmRequest, force_refresh: bool = False) -> Any:
        self.requests.append(request)
        self.refreshes.append(force_refresh)
        answer = self.answer(request) if callable(self.answer) else self.answer
        if isinstance(answer, str):
            return MinimaLlmResponse(request_id=request.request_id, text=answer)
        return answer

    async def run_batched(self, requests: Any) -> list[Any]:
        return [await self.generate(r) for r in requests]

    async def aclose(self) -> None:
        self.closed = True


class Backends:
    """Backends on one mock and one cache (a rerun is a new backend); ``aclose`` closes all."""

    def __init__(self, url: str, cache_dir: Path) -> None:
        self.url = url
        self.cache_dir = cache_dir
        self.made: list[OpenAIMinimaLlm] = []

    def __call__(self, **overrides: Any) -> OpenAIMinimaLlm:
        cache_dir = overrides.pop("cache_dir", self.cache_dir)  # None: no cache at all
        self.made.append(OpenAIMinimaLlm(backend_config(self.url, cache_dir, **overrides)))
        return self.made[-1]

    async def aclose(self) -> None:
        for backend in self.made:
            await backend.aclose()
