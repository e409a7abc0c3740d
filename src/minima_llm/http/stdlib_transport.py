"""A standard-library transport: pooled keep-alive ``http.client`` connections on worker threads."""

from __future__ import annotations

import asyncio
import http.client
import ssl
import threading
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
from urllib.parse import urlsplit

from ..errors import TransportError
from .base import HttpResponse, decode_body

_Origin = tuple[str, str, int]
# A connection the server closed while it sat idle fails like this on reuse; one
# immediate retry on a fresh connection is what every keep-alive client does.
_STALE = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    http.client.BadStatusLine,
)


class StdlibTransport:
    """Sends each request from a worker thread over a pooled ``http.client`` connection."""

    def __init__(self, max_connections: int = 32, verify_tls: bool = True) -> None:
        self.max_connections = max_connections
        self._executor = ThreadPoolExecutor(
            max_workers=max_connections, thread_name_prefix="minima-http"
        )
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._ssl = ssl.create_default_context() if verify_tls else ssl._create_unverified_context()
        self._closed = False
        self.opened = 0

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """POST from a worker thread; the socket timeout and an outer deadline bound the wait."""
        if self._closed:
            raise TransportError("closed", "transport is closed")
        loop = asyncio.get_running_loop()
        job = loop.run_in_executor(self._executor, self._send, url, body, dict(headers), timeout_s)
        try:
            # The socket timeout applies per read; the outer bound caps a server that trickles bytes.
            return await asyncio.wait_for(job, timeout_s * 2 + 1.0)
        except asyncio.TimeoutError as exc:
            raise TransportError("timeout", f"no complete response within {timeout_s}s") from exc

    def _send(
        self, url: str, body: bytes, headers: dict[str, str], timeout_s: float
    ) -> HttpResponse:
        parts = urlsplit(url)
        scheme = parts.scheme
        host = parts.hostname or "localhost"
        port = parts.port or (443 if scheme == "https" else 80)
        path = parts.path + (f"?{parts.query}" if parts.query else "")
        origin = (scheme, host, port)
        headers.setdefault("Accept-Encoding", "gzip")
        for attempt in range(2):
            conn, reused = self._checkout(origin, timeout_s)
            try:
                conn.request("POST", path, body=body, headers=headers)
                resp = conn.getresponse()
                data = resp.read()
            except _STALE as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                raise TransportError("reset", f"connection closed by server: {exc!r}") from exc
            except TimeoutError as exc:
                conn.close()
                raise TransportError("timeout", f"timed out after {timeout_s}s") from exc
            except http.client.IncompleteRead as exc:
                conn.close()
                raise TransportError(
                    "reset", f"connection closed mid-body ({len(exc.partial)} bytes read)"
                ) from exc
            except (OSError, http.client.HTTPException) as exc:
                conn.close()
                raise TransportError("connect", f"{type(exc).__name__}: {exc}") from exc
            resp_headers = {k.lower(): v for k, v in resp.getheaders()}
            if resp.will_close:
                conn.close()
            else:
                self._checkin(origin, conn)
            return HttpResponse(
                resp.status, resp_headers, decode_body(data, resp_headers.get("content-encoding"))
            )
        raise AssertionError("unreachable")

    def _checkout(
        self, origin: _Origin, timeout_s: float
    ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(origin)
            if idle:
                conn = idle.pop()
                conn.timeout = timeout_s
                if conn.sock is not None:
                    conn.sock.settimeout(timeout_s)
                return conn, True
        scheme, host, port = origin
        self.opened += 1
        if scheme == "https":
            return http.client.HTTPSConnection(
                host, port, timeout=timeout_s, context=self._ssl
            ), False
        return http.client.HTTPConnection(host, port, timeout=timeout_s), False

    def _checkin(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if self._closed:
                conn.close()
                return
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.max_connections:
                idle.append(conn)
                return
        conn.close()

    async def aclose(self) -> None:
        """Close idle connections; threads finish their current request."""
        self.close()

    def close(self) -> None:
        """Synchronous ``aclose``."""
        with self._lock:
            self._closed = True
            conns = [c for idle in self._idle.values() for c in idle]
            self._idle.clear()
        for conn in conns:
            conn.close()
        self._executor.shutdown(wait=False)

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"<StdlibTransport idle={idle} opened={self.opened} max={self.max_connections}>"
