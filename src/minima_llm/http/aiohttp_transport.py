"""An aiohttp transport: one pooled ``ClientSession`` per event loop."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Mapping
from typing import Any

from ..errors import TransportError
from ..loopbound import LoopBound
from .base import HttpResponse

try:
    import aiohttp
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the aiohttp transport needs aiohttp: pip install 'minima-llm[proxy]'"
    ) from exc


class _LoopSession:
    """A session and the async generator that closes it when its loop shuts down."""

    def __init__(self, max_connections: int) -> None:
        connector = aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=max_connections, enable_cleanup_closed=True
        )
        self.session = aiohttp.ClientSession(
            connector=connector, auto_decompress=True, skip_auto_headers=("User-Agent",)
        )
        self.keeper: AsyncIterator[None] | None = None


async def _close_at_loop_shutdown(session: aiohttp.ClientSession) -> AsyncIterator[None]:
    # asyncio.run() calls loop.shutdown_asyncgens() before closing the loop, which
    # runs this finally block while the loop still runs: the one hook that lets a
    # backend reused across several asyncio.run() calls close each loop's session.
    try:
        yield
    finally:
        await session.close()


class AiohttpTransport:
    """Sends requests with aiohttp over keep-alive connections, one session per loop."""

    def __init__(self, max_connections: int = 32) -> None:
        self.max_connections = max_connections
        self._sessions: LoopBound[_LoopSession] = LoopBound(lambda: _LoopSession(max_connections))
        self._closed = False

    async def _session(self) -> aiohttp.ClientSession:
        entry = self._sessions.get()
        if entry.keeper is None:
            entry.keeper = _close_at_loop_shutdown(entry.session)
            await entry.keeper.__anext__()
        return entry.session

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """POST and read the whole body within ``timeout_s``."""
        if self._closed:
            raise TransportError("closed", "transport is closed")
        session = await self._session()
        timeout = aiohttp.ClientTimeout(total=timeout_s)
        try:
            async with session.post(url, data=body, headers=headers, timeout=timeout) as resp:
                data = await resp.read()
                return HttpResponse(resp.status, _lower(resp.headers), data)
        except asyncio.TimeoutError as exc:
            raise TransportError("timeout", f"timed out after {timeout_s}s") from exc
        except aiohttp.ClientPayloadError as exc:
            raise TransportError("reset", f"connection closed mid-body: {exc}") from exc
        except aiohttp.ServerDisconnectedError as exc:
            raise TransportError("reset", f"server disconnected: {exc}") from exc
        except aiohttp.ClientError as exc:
            raise TransportError("connect", f"{type(exc).__name__}: {exc}") from exc

    async def aclose(self) -> None:
        """Close the running loop's session."""
        entry = self._sessions.get()
        if entry.keeper is not None:
            keeper, entry.keeper = entry.keeper, None
            await keeper.aclose()  # type: ignore[attr-defined]
        elif not entry.session.closed:
            await entry.session.close()
        self._sessions = LoopBound(lambda: _LoopSession(self.max_connections))

    def __repr__(self) -> str:
        return f"<AiohttpTransport max_connections={self.max_connections}>"


def _lower(headers: Any) -> dict[str, str]:
    return {k.lower(): v for k, v in headers.items()}
