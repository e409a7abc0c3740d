"""An OpenAI-compatible mock server with fault injection, for tests, benchmarks and demos.

API routes, each with or without the ``/v1`` prefix: ``POST /chat/completions``,
``POST /completions``, ``POST /embeddings``, ``GET /models``; the Files and Batches
API (``POST /files``, ``GET /files/{id}[/content]``, ``POST /batches``, ``GET /batches``,
``GET /batches/{id}``, ``POST /batches/{id}/cancel``); and ``GET /health``.

Control routes: ``GET /_mock/stats``; ``POST /_mock/reset`` (zero counters, drop
scripted faults, refill the rate bucket, reseed); ``GET``/``POST /_mock/config``
(change any :class:`MockConfig` field); ``POST /_mock/fail_next`` with
``{"count", "mode", "status", "headers", "body", "sleep_s"}`` (see :class:`Fault`).

Needs aiohttp (``pip install 'minima-llm[proxy]'``); ``import minima_llm`` never
imports this subpackage.
"""

from __future__ import annotations

try:
    import aiohttp  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("minima_llm.testing needs aiohttp: pip install 'minima-llm[proxy]'") from exc

from ._config import MockConfig
from ._faults import Fault, FaultMode
from ._ratelimit import TokenBucket, format_duration
from ._runner import ThreadedMockServer, run_mock_server_in_thread, serve
from .mock_server import MockServer

__all__ = [
    "Fault",
    "FaultMode",
    "MockConfig",
    "MockServer",
    "ThreadedMockServer",
    "TokenBucket",
    "format_duration",
    "run_mock_server_in_thread",
    "serve",
]
