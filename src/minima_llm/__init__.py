"""minima-llm: an async client for OpenAI-compatible endpoints.

A persistent SQLite prompt cache, retries with backoff and jitter, cooldown
after overload, rate limits learned from the server, and a batch runner.
The core uses the standard library only.
"""

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

__version__ = "0.3.0.dev0"

__all__ = [
    "AsyncMinimaLlmBackend",
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
    "get_force_refresh",
    "get_last_cached",
    "reset_force_refresh",
    "run_batched_callable",
    "set_force_refresh",
    "set_last_cached",
]
