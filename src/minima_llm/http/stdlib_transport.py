"""A standard-library transport: pooled keep-alive ``http.client`` connections on worker threads."""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import socket
import ssl
import threading
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import TypeVar
from urllib.parse import urlsplit

from .. import afterfork
from ..deadline import bounded
from ..errors import ConfigError, TransportError
from .base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    HttpResponse,
    LowerHeaders,
    body_limit,
    decode_body,
    tls_context,
    too_large,
)
from .proxies import Proxy, ProxyRules, tunnel_refusal_in, via

_Origin = tuple[str, str, int]
T = TypeVar("T")
# A connection the server closed while it sat idle fails like this on reuse; one
# immediate retry on a fresh connection is what every keep-alive client does.
_STALE = (
    http.client.RemoteDisconnected,
    BrokenPipeError,
    ConnectionResetError,
    http.client.BadStatusLine,
    # A proxy closing an idle tunnel cannot send TLS's close_notify: its end is a bare EOF.
    ssl.SSLEOFError,
)
# A body without a Content-Length is read in pieces of this size, so one past the cap
# is refused after at most this much more than the cap.
_PIECE = 2**18


class StdlibTransport:
    """Sends each request from a worker thread over a pooled ``http.client`` connection.

    ``aclose`` closes the pool; the next request opens a new one, so a backend
    reused after ``aclose`` (across ``asyncio.run()`` calls) keeps working.
    An answer past ``max_response_bytes`` (0: no cap) raises ``TransportError("too_large")``.
    """

    def __init__(
        self,
        max_connections: int = 32,
        verify_tls: bool = True,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        proxies: ProxyRules | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.proxies = ProxyRules.from_environ() if proxies is None else proxies
        # Each origin's proxy (None: direct), decided at its first request.
        self._routes: dict[_Origin, Proxy | None] = {}
        self.max_response_bytes = max_response_bytes
        self._limit = body_limit(max_response_bytes)
        # None while closed; made again by the next request.
        self._executor: ThreadPoolExecutor | None = None
        self._idle: dict[_Origin, list[http.client.HTTPConnection]] = {}
        self._lock = threading.Lock()
        self._verify_tls = verify_tls
        # Made at the first https connection: loading the CA store takes ~35 ms, paid by
        # every backend otherwise, including the many that only talk plain http.
        self._ssl: ssl.SSLContext | None = None
        self.opened = 0
        # A transport dropped unclosed would leave its idle sockets to the GC (ResourceWarning);
        # its pool threads end by themselves once the executor is collected. No lock: it
        # runs once nothing else holds the transport.
        weakref.finalize(self, _close_idle, self._idle)
        afterfork.register(self)

    def after_fork_in_child(self) -> None:
        """In a forked child: the parent's pool threads, lock holders and sockets are not ours."""
        # A thread that held the lock at the fork does not exist here to release it, and a
        # job handed to the inherited executor would wait forever for a thread to run it.
        self._lock = threading.Lock()
        self._executor = None
        # Closing a socket's inherited descriptor leaves the parent's connection open.
        _close_idle(self._idle)

    def _tls(self) -> ssl.SSLContext:
        """The TLS context, made once (racing threads may both make one; either is fine)."""
        if self._ssl is None:
            self._ssl = tls_context(self._verify_tls)
        return self._ssl

    def _pool(self) -> ThreadPoolExecutor:
        """The pool, made on first use and again after ``aclose``; callers try ``_executor`` first."""
        with self._lock:
            if self._executor is None:
                self._executor = ThreadPoolExecutor(
                    max_workers=self.max_connections, thread_name_prefix="minima-http"
                )
            return self._executor

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """POST from a worker thread; the socket timeout and an outer deadline bound the wait."""
        return await self._on_thread(self._send, url, body, headers, timeout_s, "complete response")

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> _StdlibStream:
        """POST from a worker thread and return at the headers; lines are read on threads too."""
        started = await self._on_thread(
            self._start, url, body, headers, timeout_s, "response headers"
        )
        return _StdlibStream(self, *started, timeout_s, self._limit)

    async def _on_thread(
        self,
        work: Callable[[str, bytes, dict[str, str], float, _Handoff], T],
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
        awaited: str,
    ) -> T:
        """``work`` on a pool thread, bounded; a caller who gives up frees the thread."""
        loop = asyncio.get_running_loop()
        handoff = _Handoff()
        job = loop.run_in_executor(
            self._executor or self._pool(), work, url, body, dict(headers), timeout_s, handoff
        )
        try:
            # The socket timeout applies per read; this bound is on the whole call, as the
            # other transports' is: a server trickling bytes gets timeout_s, not twice it.
            return await bounded(job, timeout_s)
        except asyncio.TimeoutError as exc:
            handoff.abort()
            raise TransportError("timeout", f"no {awaited} within {timeout_s}s") from exc
        except asyncio.CancelledError:
            handoff.abort()
            raise

    def _start(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float,
        handoff: _Handoff,
    ) -> tuple[_Origin, http.client.HTTPConnection, http.client.HTTPResponse]:
        """Send on a pooled connection (a new one when retrying), its socket held by ``handoff``."""
        origin, path = _split(url)
        proxy = self._route(origin)
        if proxy is not None and origin[0] == "http":
            # A plain-http request through a proxy names its whole URL (RFC 9112, 3.2.2).
            path = _absolute_form(url)
            if proxy.authorization:
                headers["Proxy-Authorization"] = proxy.authorization
        for attempt in range(2):
            # The retry opens a new connection: after an idle timeout or a server restart
            # every pooled connection is stale, and the next one would fail the same way.
            conn, reused = self._checkout(origin, timeout_s, proxy, pooled=attempt == 0)
            try:
                if conn.sock is None:
                    conn.connect()  # here, so a caller who leaves mid-upload can stop it
                handoff.hold(conn.sock)
                conn.request("POST", path, body=body, headers=headers)
                return origin, conn, conn.getresponse()
            except _STALE as exc:
                conn.close()
                if reused and attempt == 0:
                    continue
                error = TransportError("reset", f"connection closed by server: {exc!r}")
                raise via(error, proxy) from exc
            except Exception as exc:
                conn.close()
                raise via(_translate(exc, timeout_s), proxy) from exc
        raise AssertionError("unreachable")

    def _route(self, origin: _Origin) -> Proxy | None:
        """The proxy requests to ``origin`` go through (None: direct), decided once per origin."""
        try:
            return self._routes[origin]
        except KeyError:
            pass
        try:
            proxy = self.proxies.for_origin(*origin)
        except ConfigError as exc:
            raise TransportError("connect", str(exc)) from exc
        self._routes[origin] = proxy
        return proxy

    def _send(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        timeout_s: float,
        handoff: _Handoff,
    ) -> HttpResponse:
        headers.setdefault("Accept-Encoding", "gzip")
        origin, conn, resp = self._start(url, body, headers, timeout_s, handoff)
        resp_headers = LowerHeaders.of(resp.getheaders())
        try:
            data = _read_capped(resp, self._limit)
            data = decode_body(data, resp_headers.get("content-encoding"), self._limit)
        except TransportError:
            # Unread body bytes may be left on it: the next response would start mid-body.
            conn.close()
            raise
        except Exception as exc:
            conn.close()
            raise _translate(exc, timeout_s) from exc
        # Released before it is pooled: from then on the socket is the pool's, and a
        # caller giving up late must not shut it under the next request to use it.
        caller_waits = handoff.release()
        if resp.will_close or not caller_waits:
            conn.close()
        else:
            self._checkin(origin, conn)
        return HttpResponse(resp.status, resp_headers, data)

    def _checkout(
        self, origin: _Origin, timeout_s: float, proxy: Proxy | None = None, pooled: bool = True
    ) -> tuple[http.client.HTTPConnection, bool]:
        with self._lock:
            idle = self._idle.get(origin) if pooled else None
            if idle:
                conn = idle.pop()
                conn.timeout = timeout_s
                if conn.sock is not None:
                    conn.sock.settimeout(timeout_s)
                return conn, True
        scheme, host, port = origin
        self.opened += 1
        if proxy is None:
            if scheme == "https":
                return http.client.HTTPSConnection(
                    host, port, timeout=timeout_s, context=self._tls()
                ), False
            return http.client.HTTPConnection(host, port, timeout=timeout_s), False
        if scheme != "https":
            return http.client.HTTPConnection(proxy.host, proxy.port, timeout=timeout_s), False
        # CONNECT through the proxy, then TLS to the origin: http.client checks the
        # certificate against the tunnelled host, not the proxy.
        tunnel = http.client.HTTPSConnection(
            proxy.host, proxy.port, timeout=timeout_s, context=self._tls()
        )
        tunnel.set_tunnel(_idna(host), port, headers=proxy.headers)
        return tunnel, False

    def _checkin(self, origin: _Origin, conn: http.client.HTTPConnection) -> None:
        with self._lock:
            if self._executor is None:  # closed while this request ran
                conn.close()
                return
            idle = self._idle.setdefault(origin, [])
            if len(idle) < self.max_connections:
                idle.append(conn)
                return
        conn.close()

    async def aclose(self) -> None:
        """Close idle connections and the pool; threads finish their current request."""
        self.close()

    def close(self) -> None:
        """Synchronous ``aclose``."""
        with self._lock:
            executor, self._executor = self._executor, None
        _close_idle(self._idle, self._lock)
        if executor is not None:
            executor.shutdown(wait=False)

    def __repr__(self) -> str:
        idle = sum(len(v) for v in self._idle.values())
        return f"<StdlibTransport idle={idle} opened={self.opened} max={self.max_connections}>"


class _StdlibStream:
    """An ``http.client`` response read line by line from worker threads."""

    def __init__(
        self,
        owner: StdlibTransport,
        origin: _Origin,
        conn: http.client.HTTPConnection,
        resp: http.client.HTTPResponse,
        timeout_s: float,
        limit: int,
    ) -> None:
        self._owner = owner
        self._origin = origin
        self._conn = conn
        self._resp = resp
        self._timeout_s = timeout_s
        self._limit = limit
        self._eof = False
        # getresponse() may detach the socket from the connection; keep it to abort a stream.
        self._sock = conn.sock
        self.status = resp.status
        self.headers = LowerHeaders.of(resp.getheaders())

    async def lines(self) -> AsyncIterator[bytes]:
        """Body lines as they arrive; past the cap, ``TransportError("too_large")``."""
        loop = asyncio.get_running_loop()
        limit = self._limit
        seen = 0
        while True:
            try:
                # One byte past the room left, so a line with no end in sight stops there.
                line = await loop.run_in_executor(
                    self._owner._executor or self._owner._pool(),
                    self._resp.readline,
                    limit - seen + 1,
                )
            except Exception as exc:
                raise _translate(exc, self._timeout_s) from exc
            if not line:
                self._eof = True
                return
            seen += len(line)
            if seen > limit:
                self._drop()
                raise too_large(limit, f"the stream passed {limit} bytes")
            yield line

    async def read(self) -> bytes:
        """The rest of the body."""
        loop = asyncio.get_running_loop()
        try:
            data = await loop.run_in_executor(
                self._owner._executor or self._owner._pool(), _read_capped, self._resp, self._limit
            )
        except TransportError:
            self._drop()
            raise
        except Exception as exc:
            raise _translate(exc, self._timeout_s) from exc
        try:
            data = decode_body(data, self.headers.get("content-encoding"), self._limit)
        except TransportError:
            self._drop()
            raise
        self._eof = True
        return data

    async def aclose(self) -> None:
        """Pool the connection if the body was read to the end, else close it."""
        if self._eof and not self._resp.will_close:
            self._owner._checkin(self._origin, self._conn)
            return
        self._drop()

    def _drop(self) -> None:
        """Close the connection, waking a worker thread blocked reading it."""
        if self._sock is not None:
            # close() alone does not wake a worker thread blocked reading this socket;
            # shutdown() does, so an abandoned stream frees its thread at once.
            with contextlib.suppress(OSError):
                self._sock.shutdown(socket.SHUT_RDWR)
        self._conn.close()
        self._resp.close()


def _read_capped(resp: http.client.HTTPResponse, limit: int) -> bytes:
    """The body, refused by its Content-Length or, without one, once the bytes read pass ``limit``."""
    length = resp.length  # None when chunked or read until close
    if length is not None:
        if length > limit:
            raise too_large(limit, f"Content-Length is {length}")
        return resp.read()
    pieces: list[bytes] = []
    size = 0
    while piece := resp.read(_PIECE):
        size += len(piece)
        if size > limit:
            raise too_large(limit, f"{size} bytes read, and more to come")
        pieces.append(piece)
    return b"".join(pieces)


class _Handoff:
    """One request's socket, between its worker thread and a caller who may give up.

    Each read has the socket timeout, but a server trickling bytes never trips it:
    without ``abort`` the thread would read on, holding a pool thread and a
    connection, for as long as the server keeps going. ``shutdown`` makes its
    blocked read fail at once. The lock orders ``abort`` against ``release``, so a
    socket already handed back to the pool is never shut.
    """

    __slots__ = ("_lock", "_sock", "aborted")

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._sock: socket.socket | None = None
        self.aborted = False

    def hold(self, sock: socket.socket | None) -> None:
        """The worker sends on ``sock``; raises if the caller has already left."""
        with self._lock:
            if self.aborted:
                raise TransportError("reset", "the caller stopped waiting")
            self._sock = sock

    def release(self) -> bool:
        """The worker is done with the socket; False if the caller left (do not pool it)."""
        with self._lock:
            self._sock = None
            return not self.aborted

    def abort(self) -> None:
        """The caller has gone: fail the worker's blocked read, if there is one."""
        with self._lock:
            self.aborted = True
            sock, self._sock = self._sock, None
        if sock is not None:
            with contextlib.suppress(OSError):
                sock.shutdown(socket.SHUT_RDWR)


def _close_idle(
    idle: dict[_Origin, list[http.client.HTTPConnection]], lock: threading.Lock | None = None
) -> None:
    with lock or contextlib.nullcontext():
        conns = [c for pooled in idle.values() for c in pooled]
        idle.clear()
    for conn in conns:
        conn.close()


def _split(url: str) -> tuple[_Origin, str]:
    parts = urlsplit(url)
    scheme = parts.scheme
    host = parts.hostname or "localhost"
    port = parts.port or (443 if scheme == "https" else 80)
    path = parts.path + (f"?{parts.query}" if parts.query else "")
    return (scheme, host, port), path


def _idna(host: str) -> str:
    """``host`` as it goes on the wire: IDNA for a name outside ASCII (http.client sends ASCII)."""
    return host if host.isascii() else host.encode("idna").decode("ascii")


def _absolute_form(url: str) -> str:
    """``url`` with its host in IDNA, for the request line of a request through a proxy."""
    parts = urlsplit(url)
    host = parts.hostname or ""
    if host.isascii():
        return url
    netloc = _idna(host) + (f":{parts.port}" if parts.port else "")
    return parts._replace(netloc=netloc).geturl()


def _translate(exc: BaseException, timeout_s: float) -> BaseException:
    """``http.client`` and socket errors as the transport's own."""
    if isinstance(exc, TransportError):
        return exc
    if isinstance(exc, TimeoutError):
        return TransportError("timeout", f"timed out after {timeout_s}s")
    if isinstance(exc, http.client.IncompleteRead):
        return TransportError(
            "reset", f"connection closed mid-body ({len(exc.partial)} bytes read)"
        )
    if isinstance(exc, _STALE):
        return TransportError("reset", f"connection closed by server: {exc!r}")
    refused = tunnel_refusal_in(exc)
    if refused is not None:
        return refused
    # A host name with no IDNA form (or a URL that cannot be sent as ASCII).
    if isinstance(exc, (OSError, http.client.HTTPException, UnicodeError)):
        return TransportError("connect", f"{type(exc).__name__}: {exc}")
    return exc
