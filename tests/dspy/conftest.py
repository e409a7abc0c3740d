"""Backends for the DSPy tests: real ones against the mock server, and a scripted fake."""

from __future__ import annotations

from collections.abc import AsyncIterator
from pathlib import Path

import pytest
from dspy_helpers import Backends, FakeBackend

from minima_llm import OpenAIMinimaLlm
from minima_llm.testing import MockServer


@pytest.fixture
async def backends(mock: MockServer, tmp_path: Path) -> AsyncIterator[Backends]:
    made = Backends(mock.url, tmp_path / "cache")
    yield made
    await made.aclose()


@pytest.fixture
def backend(backends: Backends) -> OpenAIMinimaLlm:
    return backends()


@pytest.fixture
def fake() -> FakeBackend:
    return FakeBackend()
