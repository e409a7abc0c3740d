"""HTTP transports behind one small protocol: standard library (threads or asyncio), or aiohttp."""

from __future__ import annotations

import importlib.util
from collections.abc import Mapping

from ..errors import ConfigError
from .asyncio_transport import AsyncioTransport
from .base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    HttpResponse,
    StreamingResponse,
    Transport,
    TransportError,
    decode_body,
    encode_body,
)
from .proxies import Proxy, ProxyRules, tunnel_refusal_in
from .stdlib_transport import StdlibTransport

__all__ = [
    "AsyncioTransport",
    "HttpResponse",
    "Proxy",
    "ProxyRules",
    "StdlibTransport",
    "StreamingResponse",
    "Transport",
    "TransportError",
    "aiohttp_available",
    "decode_body",
    "encode_body",
    "make_transport",
    "tunnel_refusal_in",
]


def aiohttp_available() -> bool:
    """Whether the aiohttp transport can be used."""
    return importlib.util.find_spec("aiohttp") is not None


def make_transport(
    kind: str,
    max_connections: int,
    default_headers: Mapping[str, str] | None = None,
    *,
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
    proxies: ProxyRules | None = None,
) -> Transport:
    """Build the transport named by config: ``auto`` prefers aiohttp when it is installed.

    ``default_headers`` are the headers most requests will carry; a transport may
    prepare them once (requests must still pass them). An answer past
    ``max_response_bytes`` (0: no cap) raises ``TransportError("too_large")``.
    ``proxies`` default to the ``*_proxy`` environment variables.
    """
    if kind == "auto":
        kind = "aiohttp" if aiohttp_available() else "stdlib"
    if kind == "asyncio":
        return AsyncioTransport(
            max_connections, default_headers, max_response_bytes=max_response_bytes, proxies=proxies
        )
    if kind == "stdlib":
        return StdlibTransport(
            max_connections, max_response_bytes=max_response_bytes, proxies=proxies
        )
    if kind == "aiohttp":
        if not aiohttp_available():
            raise ConfigError(
                "transport",
                kind,
                "auto, stdlib or asyncio (aiohttp is not installed: pip install 'minima-llm[proxy]')",
            )
        from .aiohttp_transport import AiohttpTransport

        return AiohttpTransport(
            max_connections, default_headers, max_response_bytes=max_response_bytes, proxies=proxies
        )
    raise ConfigError("transport", kind, "one of auto, stdlib, aiohttp, asyncio")
