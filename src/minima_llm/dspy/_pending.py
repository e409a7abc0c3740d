"""The provider-batch seam: placeholders a collecting backend returns instead of answers.

In a collection pass the backend queues each request for a provider batch job
and returns a placeholder at once. The LM turns a placeholder into
:class:`PendingCall`, which unwinds DSPy before it tries to parse text that does
not exist yet; ``run_dspy_batch`` catches it and reports the item as pending.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

from ..errors import MinimaLlmError


@runtime_checkable
class PendingResult(Protocol):
    """What ``generate`` returns for a request queued for later: ``pending`` is True."""

    request_id: str
    pending: bool


@dataclass(frozen=True, slots=True)
class Pending:
    """A ready-made :class:`PendingResult`."""

    request_id: str
    pending: bool = True


def is_pending(result: Any) -> bool:
    """Whether ``result`` is a placeholder rather than a response or a failure."""
    return getattr(result, "pending", False) is True


class PendingCall(MinimaLlmError):
    """An LM call was queued for a provider batch; ``result`` is the placeholder."""

    def __init__(self, result: PendingResult) -> None:
        super().__init__(f"{result.request_id}: queued for a provider batch, no answer yet")
        self.result = result
