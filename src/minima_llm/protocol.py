"""The backend protocol and the request/response types, where the reference documents place them.

Reference 000 and 001 show ``minima_llm/protocol.py`` in their module map, so
programs may import these names from here; they live in :mod:`minima_llm.types`.
"""

from .types import (
    AsyncMinimaLlmBackend,
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResponse,
    MinimaLlmResult,
    Usage,
)

# Reference 002 calls the union of a response and a failure ``Result``.
Result = MinimaLlmResult

__all__ = [
    "AsyncMinimaLlmBackend",
    "MinimaLlmFailure",
    "MinimaLlmRequest",
    "MinimaLlmResponse",
    "MinimaLlmResult",
    "Result",
    "Usage",
]
