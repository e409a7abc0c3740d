"""minima-llm: an async client for OpenAI-compatible endpoints.

A persistent SQLite prompt cache, retries with backoff and jitter, cooldown
after overload, rate limits learned from the server, and a batch runner.
The core uses the standard library only.
"""

from typing import Any

from ._version import __version__ as __version__
from .backend import OpenAIMinimaLlm
from .config import BatchConfig, MinimaLlmConfig, ParasailBatchConfig
from .context import (
    get_force_refresh,
    get_last_cached,
    reset_force_refresh,
    set_force_refresh,
    set_last_cached,
)
from .errors import CacheError, ConfigError, MinimaLlmError, TransportError
from .jobs import (
    BatchApiError,
    batch_status_overview,
    cancel_all_batches,
    cancel_all_local_batches,
    cancel_batch,
)
from .runner import run_batched_callable
from .stats import StatsSnapshot
from .types import (
    AsyncMinimaLlmBackend,
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResponse,
    MinimaLlmResult,
    Usage,
)

__all__ = [
    "AsyncMinimaLlmBackend",
    "BatchApiError",
    "BatchConfig",
    "CacheError",
    "ConfigError",
    "MinimaLlmConfig",
    "MinimaLlmError",
    "MinimaLlmFailure",
    "MinimaLlmRequest",
    "MinimaLlmResponse",
    "MinimaLlmResult",
    "OpenAIMinimaLlm",
    "ParasailBatchConfig",
    "StatsSnapshot",
    "TransportError",
    "Usage",
    "batch_status_overview",
    "cancel_all_batches",
    "cancel_all_local_batches",
    "cancel_batch",
    "get_force_refresh",
    "get_last_cached",
    "reset_force_refresh",
    "run_batched_callable",
    "set_force_refresh",
    "set_last_cached",
]

# Reference 002 imports the DSPy helpers from the package itself. They load DSPy, so
# they come from minima_llm.dspy_adapter when first asked for, which keeps a plain
# ``import minima_llm`` light; ``__all__`` leaves them out so ``import *`` does too.
_DSPY_NAMES = frozenset({"MinimaLlmDSPyLM", "TolerantChatAdapter", "run_dspy_batch"})


def __getattr__(name: str) -> Any:
    """The DSPy helpers, imported from ``minima_llm.dspy_adapter`` on first use."""
    if name in _DSPY_NAMES:
        from . import dspy_adapter

        return getattr(dspy_adapter, name)
    raise AttributeError(f"module 'minima_llm' has no attribute {name!r}")
