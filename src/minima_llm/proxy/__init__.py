"""``minimallm-proxy``: an OpenAI-compatible gateway that puts minima-llm's cache and resilience in front of any app.

Needs the ``[proxy]`` extra (aiohttp, prometheus-client).
"""

from __future__ import annotations

try:
    import aiohttp  # noqa: F401
    import prometheus_client  # noqa: F401
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError("the gateway needs the proxy extra: pip install 'minima-llm[proxy]'") from exc

from .app import build_app
from .gateway import Gateway
from .metrics import GatewayMetrics
from .settings import ProxySettings

__all__ = ["Gateway", "GatewayMetrics", "ProxySettings", "build_app"]
