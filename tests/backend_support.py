"""Helpers for tests that talk to the mock server through a backend (imported by test modules)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from minima_llm import MinimaLlmRequest, OpenAIMinimaLlm

# Fast retry settings so fault tests take milliseconds, not the production seconds.
FAST = {
    "base_backoff_s": 0.01,
    "max_backoff_s": 0.05,
    "cooldown_floor_s": 0.0,
    "cooldown_cap_s": 0.05,
    "cooldown_halflife_s": 1.0,
    "timeout_s": 5.0,
    "rpm": 0,
}

BackendFactory = Callable[..., OpenAIMinimaLlm]


def req(i: int | str = 0, text: str | None = None, **kwargs: Any) -> MinimaLlmRequest:
    """A one-message request."""
    return MinimaLlmRequest(
        request_id=f"r{i}",
        messages=[{"role": "user", "content": text if text is not None else f"question {i}"}],
        **kwargs,
    )
