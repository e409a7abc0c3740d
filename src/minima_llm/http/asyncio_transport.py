"""An asyncio-native HTTP/1.1 transport: keep-alive connections as ``asyncio.Protocol`` objects.

Standard library only, and lean where it counts: a response is parsed as its bytes
arrive, inside the event loop's own callback, with no stream reader, task or
timeout context between the socket and the caller. Measured against the mock, a
request costs about a third of the CPU time it costs through aiohttp's client
(docs/performance.md), which is what a gateway relaying to a local model server
spends most of its time on.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
import weakref
from collections import deque
from collections.abc import AsyncIterator, Mapping
from typing import NamedTuple
from urllib.parse import urlsplit

from .._version import USER_AGENT
from ..deadline import bounded
from ..errors import ConfigError, TransportError
from ..loopbound import LoopBound
from .base import (
    DEFAULT_MAX_RESPONSE_BYTES,
    HttpResponse,
    LowerHeaders,
    body_limit,
    decode_body,
    tls_context,
    too_large,
)
from .proxies import Proxy, ProxyRules, tunnel_refused, via
from .wire import (
    CHUNKED,
    LENGTH,
    MAX_HEAD_BYTES,
    NO_BODY,
    UNTIL_CLOSE,
    ResponseHead,
    chunk_size,
    header_block,
    malformed,
    parse_head,
)

__all__ = ["AsyncioTransport"]

_Origin = tuple[str, str, int]
_MAX_URLS = 256
# Headers the transport writes itself; a caller's copy would contradict the framing.
_OWN = frozenset({"host", "content-length", "transfer-encoding", "connection"})
# A body this large is written apart from its head rather than copied onto it.
_JOIN_BELOW = 2**16
# A stream's unread bytes past this pause the socket until the reader catches up.
_STREAM_HIGH_WATER = 2**20
# The longest line a stream yields: one SSE event may hold a whole cached answer.
_MAX_LINE = 2**24

# Where a connection is in reading its response.
_IDLE, _HEAD, _BODY, _CHUNK_SIZE, _CHUNK_DATA, _CHUNK_END, _TRAILERS, _REST, _DONE = range(9)


class _Target(NamedTuple):
    """A request URL, taken apart once: where to connect and what to put on the wire."""

    origin: _Origin
    # "POST <path> HTTP/1.1" and the Host line, ready to send.
    prefix: bytes
    proxy: Proxy | None
    # The proxy's credentials, on each request of a plain-http origin it forwards.
    proxy_block: bytes

    @classmethod
    def of(cls, url: str, rules: ProxyRules) -> _Target:
        """Parse ``url`` and decide its proxy; an unusable proxy variable is a connect error."""
        parts = urlsplit(url)
        scheme = parts.scheme.lower()
        if scheme not in ("http", "https"):
            raise TransportError("connect", f"not an http or https URL: {scheme or '(none)'}://")
        try:
            port = parts.port or (443 if scheme == "https" else 80)
        except ValueError as exc:
            raise TransportError("connect", f"a URL whose port is not a number: {exc}") from exc
        host = parts.hostname or ""
        if not host:
            raise TransportError("connect", "a URL without a host")
        try:
            wire_host = host if host.isascii() else host.encode("idna").decode("ascii")
        except UnicodeError as exc:
            raise TransportError("connect", f"a host name with no IDNA form: {exc}") from exc
        try:
            proxy = rules.for_origin(scheme, host, port) if rules else None
        except ConfigError as exc:
            raise TransportError("connect", str(exc)) from exc
        authority = f"[{wire_host}]" if ":" in wire_host else wire_host
        if parts.port:
            authority += f":{parts.port}"
        path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        if not path.isascii() or any(c <= " " or c == "\x7f" for c in path):
            # http.client refuses the same: the line would not be one request line.
            raise TransportError("connect", "a URL path with spaces, controls or non-ASCII")
        block = b""
        if proxy is not None and scheme == "http":
            # A plain-http request through a proxy names its whole URL (RFC 9112, 3.2.2).
            path = f"http://{authority}{path}"
            if proxy.authorization:
                block = f"Proxy-Authorization: {proxy.authorization}\r\n".encode("latin-1")
        prefix = f"POST {path} HTTP/1.1\r\nHost: {authority}\r\n".encode("ascii", "strict")
        return cls((scheme, host, port), prefix, proxy, block)


class _Conn(asyncio.Protocol):
    """One keep-alive connection and the response being read from it."""

    def __init__(self, pool: _Pool, origin: _Origin) -> None:
        self.pool = pool
        self.origin = origin
        self.transport: asyncio.Transport | None = None
        self.state = _IDLE
        self.alive = True
        # The response: its head, body pieces (de-chunked), and how the read ended.
        self.head: ResponseHead | None = None
        self.pieces: list[bytes] = []
        self.size = 0  # body bytes in pieces, unread
        self.received = 0  # body bytes of this response so far
        self.error: TransportError | None = None
        self.reused = False
        # Whole mode wakes the reader once, at the end; stream mode at the head and each piece.
        self.whole = True
        self.no_body = False
        self.limit = 0
        self.waiter: asyncio.Future[None] | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False
        self._buf = bytearray()
        self._left = 0  # bytes still due in this body or chunk

    # -- asyncio.Protocol ----------------------------------------------------------------

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        state = self.state
        if state == _HEAD and not self._buf:
            # The usual answer: head and whole body in one read, parsed without copies.
            end, skip = _head_end(data)
            if end >= 0:
                if not self._took_head(data[:end]):
                    return
                start = end + skip
                if self.state == _BODY and len(data) - start == self._left:
                    self._add(data[start:])
                    self._finish()
                elif start < len(data):
                    self._buf += memoryview(data)[start:]
                    self._advance()
                return
        if state in (_IDLE, _DONE):
            # Bytes nobody asked for: whatever they are, the next response would start with them.
            self._drop()
            return
        if state == _BODY and not self._buf:
            take = len(data) if len(data) <= self._left else self._left
            self._left -= take
            self._add(data if take == len(data) else data[:take])
            if self._left == 0:
                self._finish()
                if take < len(data):
                    # The answer is whole; what follows it makes the connection unfit for reuse.
                    self._drop()
            return
        self._buf += data
        self._advance()

    def eof_received(self) -> bool:
        # Closed from the other end: connection_lost follows and says how the response ended.
        return False

    def connection_lost(self, exc: Exception | None) -> None:
        self.alive = False
        self.pool.lost(self)
        state = self.state
        if state == _REST and exc is None:
            if self._buf:
                self._add(bytes(self._buf))
                self._buf.clear()
            self.head = self.head._replace(keep_alive=False)  # type: ignore[union-attr]
            self._finish()
            return
        if state in (_IDLE, _DONE):
            return
        if state == _HEAD and not self._buf and self.received == 0 and self.head is None:
            what = "connection closed by server before any answer"
            self._fail(TransportError("stale" if self.reused else "reset", what))
            return
        if self.head is None:
            self._fail(TransportError("reset", "connection closed by server mid-head"))
            return
        self._fail(
            TransportError("reset", f"connection closed mid-body ({self.received} bytes read)")
        )

    # -- the caller's side ---------------------------------------------------------------

    def begin(
        self, whole: bool, limit: int, loop: asyncio.AbstractEventLoop, no_body: bool = False
    ) -> asyncio.Future[None]:
        """Get ready for a response; the returned future is woken as ``whole`` says."""
        self.state = _HEAD
        self.head = None
        self.pieces = []
        self.size = 0
        self.received = 0
        self.error = None
        self.whole = whole
        self.no_body = no_body
        self.limit = limit
        self.waiter = waiter = loop.create_future()
        return waiter

    def expire(self, what: str, timeout_s: float) -> None:
        """The caller's deadline passed: fail the read and close the connection.

        The message is made here, not when the timer is set: nearly every timer is
        cancelled, and this one is set for every request.
        """
        self.timer = None
        if self.state not in (_IDLE, _DONE):
            self._fail(TransportError("timeout", f"no {what} within {timeout_s}s"))

    def wait(self, loop: asyncio.AbstractEventLoop) -> asyncio.Future[None]:
        """A future woken by the next piece, the end, or an error (stream mode)."""
        self.waiter = waiter = loop.create_future()
        if self.error is not None:
            waiter.set_result(None)
        elif self.paused:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        return waiter

    def take(self) -> bytes:
        """The body bytes read so far and not yet taken."""
        pieces = self.pieces
        self.pieces = []
        self.size = 0
        if self.paused:
            self.paused = False
            self.transport.resume_reading()  # type: ignore[union-attr]
        if not pieces:
            return b""
        return pieces[0] if len(pieces) == 1 else b"".join(pieces)

    @property
    def reusable(self) -> bool:
        """Whether the response was read to its end on a connection that may carry another."""
        return self.state == _DONE and self.alive and self.head is not None and self.head.keep_alive

    def abort(self) -> None:
        """Close at once, whatever is in flight."""
        self._cancel_timer()
        if self.transport is not None:
            self.transport.abort()
        self.alive = False

    # -- parsing -------------------------------------------------------------------------

    def _advance(self) -> None:
        """Parse as much of the buffer as the current state allows."""
        buf = self._buf
        while buf:
            state = self.state
            if state == _HEAD:
                end, skip = _head_end(buf)
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._fail(malformed(f"a head longer than {MAX_HEAD_BYTES} bytes"))
                    return
                head = bytes(buf[:end])
                del buf[: end + skip]
                if not self._took_head(head):
                    return
                continue
            elif state == _BODY:
                if self._take_due(buf):
                    self._finish()
            elif state in (_CHUNK_SIZE, _TRAILERS, _CHUNK_END):
                end = buf.find(b"\n")
                if end < 0:
                    if len(buf) > MAX_HEAD_BYTES:
                        self._fail(malformed("a chunk line that does not end"))
                    return
                line = bytes(buf[:end]).rstrip(b"\r")
                del buf[: end + 1]
                if state == _CHUNK_END:
                    if line:
                        self._fail(malformed("a chunk longer than its size"))
                        return
                    self.state = _CHUNK_SIZE
                elif state == _TRAILERS:
                    if not line:
                        self._finish()
                else:
                    try:
                        size = chunk_size(line)
                    except TransportError as exc:
                        self._fail(exc)
                        return
                    if size == 0:
                        self.state = _TRAILERS
                    else:
                        self._left = size
                        self.state = _CHUNK_DATA
            elif state == _CHUNK_DATA:
                if self._take_due(buf):
                    self.state = _CHUNK_END
            elif state == _REST:
                self._add(bytes(buf))
                buf.clear()
            else:
                # _DONE with bytes left over, or _IDLE: the server said more than it should.
                self._drop()
                return
            if self.error is not None:
                return

    def _take_due(self, buf: bytearray) -> bool:
        """Move what is due of the body or chunk from ``buf`` to the pieces; True once all is."""
        take = min(len(buf), self._left)
        self._left -= take
        self._add(bytes(buf[:take]))
        del buf[:take]
        return self._left == 0

    def _took_head(self, raw: bytes) -> bool:
        """Act on a response head; False if it failed the read."""
        try:
            head = parse_head(raw, self.no_body)
        except TransportError as exc:
            self._fail(exc)
            return False
        if head.status < 200:
            if head.status == 101:
                self._fail(malformed("a switch of protocols nobody asked for"))
                return False
            # 100 Continue, 103 Early Hints: the real answer follows.
            return True
        self.head = head
        framing = head.framing
        if framing == NO_BODY:
            self._finish()
            return True
        if framing == LENGTH:
            if head.length > self.limit and self.whole:
                self._fail(too_large(self.limit, f"Content-Length is {head.length}"))
                return False
            if head.length == 0:
                self._finish()
                return True
            self._left = head.length
            self.state = _BODY
        elif framing == CHUNKED:
            self.state = _CHUNK_SIZE
        else:
            assert framing == UNTIL_CLOSE
            self.state = _REST
        if not self.whole:
            self._wake()
        return True

    def _add(self, piece: bytes) -> None:
        if not piece:
            return
        self.received += len(piece)
        self.pieces.append(piece)
        self.size += len(piece)
        if self.whole:
            if self.received > self.limit:
                self._fail(too_large(self.limit, f"{self.received} bytes read, and more to come"))
            return
        if self.size > _STREAM_HIGH_WATER and not self.paused and self.transport is not None:
            self.paused = True
            self.transport.pause_reading()
        self._wake()

    def _finish(self) -> None:
        self.state = _DONE
        self._cancel_timer()
        self._wake()

    def _fail(self, error: TransportError) -> None:
        if self.error is None:
            self.error = error
        self.state = _DONE
        self.abort()
        self._wake()

    def _drop(self) -> None:
        self.abort()

    def _wake(self) -> None:
        waiter = self.waiter
        if waiter is not None:
            self.waiter = None
            if not waiter.done():
                waiter.set_result(None)

    def _cancel_timer(self) -> None:
        timer = self.timer
        if timer is not None:
            self.timer = None
            timer.cancel()


def _head_end(buf: bytes | bytearray) -> tuple[int, int]:
    """Where a head ends in ``buf`` and the length of the blank line after it; (-1, 0) if not yet.

    The blank line is the first LF followed by CRLF or LF: any line may end in LF alone.
    """
    crlf = buf.find(b"\n\r\n")
    bare = buf.find(b"\n\n", 0, crlf + 2 if crlf >= 0 else len(buf))
    if bare >= 0:
        return bare, 2
    return crlf, 3 if crlf >= 0 else 0


class _Pool:
    """One loop's connections: idle ones by origin, a bound on how many are open, FIFO waiters."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.loop = asyncio.get_running_loop()
        self.open = 0  # connections open or being opened, idle ones included
        self.idle: dict[_Origin, list[_Conn]] = {}
        # (origin, future): woken with a connection to that origin, or None for a free slot.
        self.waiters: deque[tuple[_Origin, asyncio.Future[_Conn | None]]] = deque()
        self.closed = False
        self.keeper: AsyncIterator[None] | None = None

    def checkout(self, origin: _Origin) -> _Conn | None:
        """An idle connection to ``origin``, the most recently used first."""
        idle = self.idle.get(origin)
        while idle:
            conn = idle.pop()
            if conn.alive:
                conn.reused = True
                return conn
        return None

    def reserve(self) -> bool:
        """Take a slot for a new connection, closing another origin's idle one if need be."""
        if self.open < self.limit:
            self.open += 1
            return True
        for idle in self.idle.values():
            if idle:
                # Its slot passes to us as it closes: open stays the same.
                victim = idle.pop(0)
                victim.pool = _DETACHED
                victim.abort()
                return True
        return False

    def checkin(self, conn: _Conn) -> None:
        """A connection whose response was read: kept for the next request, or closed."""
        if not conn.reusable or self.closed:
            conn.abort()
            return
        conn.state = _IDLE
        conn.waiter = None
        waiters = self.waiters
        while waiters:
            origin, fut = waiters[0]
            if fut.done():
                waiters.popleft()
                continue
            if origin == conn.origin:
                waiters.popleft()
                conn.reused = True
                fut.set_result(conn)
                return
            # Someone waits for another origin: this connection's slot serves them better.
            waiters.popleft()
            conn.pool = _DETACHED
            conn.abort()
            fut.set_result(None)
            return
        self.idle.setdefault(conn.origin, []).append(conn)

    def lost(self, conn: _Conn) -> None:
        """A connection closed: its slot goes to the first waiter, or back to the pool."""
        if conn.pool is not self:
            return
        conn.pool = _DETACHED
        idle = self.idle.get(conn.origin)
        if idle and conn in idle:
            idle.remove(conn)
        self.release_slot()

    def release_slot(self) -> None:
        """Give a slot up: to the first live waiter, or back."""
        waiters = self.waiters
        while waiters:
            _, fut = waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        self.open -= 1

    def close(self) -> None:
        """Close idle connections; ones in use close when they are checked in."""
        self.closed = True
        conns = [conn for idle in self.idle.values() for conn in idle]
        self.idle.clear()
        for conn in conns:
            conn.abort()
        while self.waiters:
            _, fut = self.waiters.popleft()
            if not fut.done():
                fut.set_exception(TransportError("closed", "the transport was closed"))


class _Detached(_Pool):
    """The pool of a connection no pool counts any more (its slot was passed on)."""

    def __init__(self) -> None:
        # Made at import, with no loop running; nothing here ever needs one.
        self.closed = True

    def lost(self, conn: _Conn) -> None:
        return


_DETACHED = _Detached()


def _close_pools(pools: weakref.WeakSet[_Pool]) -> None:
    """Close the idle connections of a transport nobody closed, on their own loops.

    A finalizer may run on any thread; the loop's own methods are not thread-safe.
    """
    for pool in list(pools):
        if not pool.loop.is_closed():
            with contextlib.suppress(RuntimeError):  # closed since the check
                pool.loop.call_soon_threadsafe(pool.close)


async def _close_at_loop_shutdown(pool: _Pool) -> AsyncIterator[None]:
    # asyncio.run() finalizes async generators before it closes the loop: the one hook
    # that lets a transport reused across several asyncio.run() calls close each loop's
    # sockets while that loop can still do it.
    try:
        yield
    finally:
        pool.close()


class AsyncioTransport:
    """Sends requests over keep-alive HTTP/1.1 connections driven by the event loop itself.

    At most ``max_connections`` are open per loop; a request waits (within its
    timeout) for one. An answer past ``max_response_bytes`` (0: no cap) raises
    ``TransportError("too_large")``. ``proxies`` default to the ``*_proxy`` variables.
    """

    def __init__(
        self,
        max_connections: int = 32,
        default_headers: Mapping[str, str] | None = None,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        proxies: ProxyRules | None = None,
        verify_tls: bool = True,
    ) -> None:
        if max_connections < 1:
            raise ConfigError("max_connections", max_connections, "at least 1")
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        self.proxies = ProxyRules.from_environ() if proxies is None else proxies
        self._limit = body_limit(max_response_bytes)
        self._verify_tls = verify_tls
        # Made at the first https connection: loading the CA store costs ~35 ms.
        self._ssl: ssl.SSLContext | None = None
        # The headers most requests pass, rendered once; compared by identity.
        self._default_headers = default_headers
        self._blocks: dict[bool, bytes] = {}
        if default_headers is not None:
            self._blocks = {stream: _render(default_headers, stream) for stream in (False, True)}
        self._urls: dict[str, _Target] = {}
        # Every loop's pool, for the finalizer: a backend made per item and never closed
        # (reference 002 shows one) must not keep its sockets until the loop ends.
        self._every_pool: weakref.WeakSet[_Pool] = weakref.WeakSet()
        self._pools: LoopBound[_Pool] = self._new_pools()
        self.opened = 0
        weakref.finalize(self, _close_pools, self._every_pool)

    def _new_pools(self) -> LoopBound[_Pool]:
        # Neither closure may hold the transport, or it would never be collected.
        every = self._every_pool
        limit = self.max_connections

        def made() -> _Pool:
            pool = _Pool(limit)
            every.add(pool)
            return pool

        return LoopBound(made)

    def _target(self, url: str) -> _Target:
        target = self._urls.get(url)
        if target is None:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            target = self._urls[url] = _Target.of(url, self.proxies)
        return target

    def _tls(self) -> ssl.SSLContext:
        if self._ssl is None:
            self._ssl = tls_context(self._verify_tls)
        return self._ssl

    async def _pool(self) -> _Pool:
        pool = self._pools.get()
        if pool.keeper is None:
            pool.keeper = _close_at_loop_shutdown(pool)
            await pool.keeper.__anext__()
        return pool

    def _request(
        self, target: _Target, body: bytes, headers: Mapping[str, str], stream: bool
    ) -> tuple[bytes, ...]:
        """The request's bytes: one piece, or head and body apart when the body is large."""
        block = (
            self._blocks[stream]
            if headers is self._default_headers and self._blocks
            else _render(headers, stream)
        )
        head = b"%b%b%bContent-Length: %d\r\n\r\n" % (
            target.prefix,
            block,
            target.proxy_block,
            len(body),
        )
        if len(body) < _JOIN_BELOW:
            return (head + body,)
        return (head, body)

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """POST and read the whole (decoded) response within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout_s
        target = self._urls.get(url) or self._target(url)
        pool = self._pools.get()
        if pool.keeper is None:
            pool = await self._pool()
        data = self._request(target, body, headers, stream=False)
        conn = await self._send(pool, target, data, True, deadline, timeout_s)
        head = conn.head
        assert head is not None
        body_bytes = conn.take()
        encoding = head.headers.get("content-encoding")
        if encoding is not None:
            try:
                body_bytes = decode_body(body_bytes, encoding, self.max_response_bytes)
            except TransportError:
                # Like the other transports: an answer refused is never followed on its connection.
                conn.abort()
                raise
        pool.checkin(conn)
        return HttpResponse(head.status, head.headers, body_bytes)

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> _AsyncioStream:
        """POST and return at the headers; each later wait for data is bounded by ``timeout_s``."""
        loop = asyncio.get_running_loop()
        target = self._target(url)
        pool = await self._pool()
        data = self._request(target, body, headers, stream=True)
        conn = await self._send(pool, target, data, False, loop.time() + timeout_s, timeout_s)
        return _AsyncioStream(pool, conn, timeout_s)

    async def _send(
        self,
        pool: _Pool,
        target: _Target,
        data: tuple[bytes, ...],
        whole: bool,
        deadline: float,
        timeout_s: float,
    ) -> _Conn:
        """Write the request and wait for its answer (whole) or its head (stream)."""
        loop = asyncio.get_running_loop()
        for attempt in (0, 1):
            # The retry opens a new connection: after an idle timeout or a restart of the
            # server every pooled one may be stale.
            conn = pool.checkout(target.origin) if attempt == 0 else None
            if conn is None:
                conn = await self._connect(pool, target, deadline, timeout_s)
                if not conn.alive:
                    # Handed over by a request that had just finished on it, it closed
                    # before this one ran: its slot is already free again.
                    if attempt == 0:
                        continue
                    raise via(TransportError("reset", "connection closed before use"), target.proxy)
            waiter = conn.begin(whole, self._limit, loop)
            what = "response" if whole else "headers"
            conn.timer = loop.call_at(deadline, conn.expire, what, timeout_s)
            transport = conn.transport
            assert transport is not None
            try:
                for piece in data:
                    transport.write(piece)
                await waiter
            except BaseException:
                # Cancelled: the answer will never be read, so its connection cannot be reused.
                conn.abort()
                raise
            error = conn.error
            if error is None:
                if not whole:
                    # The head has come; the body's waits are the stream's own.
                    conn._cancel_timer()
                return conn
            if error.kind == "stale" and attempt == 0:
                continue
            if error.kind == "stale":
                error = TransportError("reset", str(error))
            raise via(error, target.proxy) from None
        raise AssertionError("unreachable")

    async def _connect(
        self, pool: _Pool, target: _Target, deadline: float, timeout_s: float
    ) -> _Conn:
        """A new connection to ``target``'s origin (through its proxy), within the deadline."""
        loop = asyncio.get_running_loop()
        if pool.closed:
            raise TransportError("closed", "the transport was closed")
        if not pool.reserve():
            conn = await self._wait_for_slot(pool, target.origin, deadline, timeout_s)
            if conn is not None:
                return conn
        scheme, host, port = target.origin
        proxy = target.proxy
        conn = _Conn(pool, target.origin)
        try:
            left = deadline - loop.time()
            if left <= 0:
                raise asyncio.TimeoutError
            if proxy is None:
                tls = self._tls() if scheme == "https" else None
                await bounded(
                    loop.create_connection(
                        lambda: conn, host, port, ssl=tls, server_hostname=host if tls else None
                    ),
                    left,
                )
            else:
                await bounded(loop.create_connection(lambda: conn, proxy.host, proxy.port), left)
                if scheme == "https":
                    await self._tunnel(conn, target, deadline, timeout_s)
        except TransportError as exc:
            conn.abort()
            pool.lost(conn)
            raise via(exc, proxy) from None
        except asyncio.TimeoutError as exc:
            conn.abort()
            pool.lost(conn)
            raise via(
                TransportError("timeout", f"no connection within {timeout_s}s"), proxy
            ) from exc
        except (OSError, ValueError) as exc:
            # ValueError: the resolver's IDNA codec refusing a host name (an empty label).
            conn.abort()
            pool.lost(conn)
            error = TransportError("connect", f"{type(exc).__name__}: {exc}")
            raise via(error, proxy) from exc
        except BaseException:
            conn.abort()
            pool.lost(conn)
            raise
        self.opened += 1
        return conn

    async def _tunnel(
        self, conn: _Conn, target: _Target, deadline: float, timeout_s: float
    ) -> None:
        """CONNECT through the proxy, then TLS to the origin over the tunnel."""
        loop = asyncio.get_running_loop()
        proxy = target.proxy
        assert proxy is not None and conn.transport is not None
        _, host, port = target.origin
        wire = host if host.isascii() else host.encode("idna").decode("ascii")
        authority = f"[{wire}]:{port}" if ":" in wire else f"{wire}:{port}"
        lines = f"CONNECT {authority} HTTP/1.1\r\nHost: {authority}\r\n"
        if proxy.authorization:
            lines += f"Proxy-Authorization: {proxy.authorization}\r\n"
        waiter = conn.begin(True, self._limit, loop, no_body=True)
        conn.timer = loop.call_at(deadline, conn.expire, "CONNECT answer", timeout_s)
        conn.transport.write((lines + "\r\n").encode("latin-1"))
        await waiter
        if conn.error is not None:
            raise conn.error
        head = conn.head
        assert head is not None
        if not 200 <= head.status < 300:
            raise tunnel_refused(head.status, head.reason)
        conn.state = _IDLE
        left = deadline - loop.time()
        if left <= 0:
            raise asyncio.TimeoutError
        tls = await bounded(
            loop.start_tls(conn.transport, conn, self._tls(), server_hostname=host), left
        )
        if tls is None:
            raise TransportError("connect", "the TLS handshake through the proxy did not finish")
        conn.transport = tls

    async def _wait_for_slot(
        self, pool: _Pool, origin: _Origin, deadline: float, timeout_s: float
    ) -> _Conn | None:
        """Wait for a connection to ``origin`` or a free slot; None means the slot is ours."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[_Conn | None] = loop.create_future()
        pool.waiters.append((origin, fut))
        try:
            return await bounded(asyncio.shield(fut), max(deadline - loop.time(), 0.0))
        except BaseException as exc:
            if fut.done() and not fut.cancelled() and fut.exception() is None:
                # Handed over just as we gave up: pass it on.
                got = fut.result()
                if got is None:
                    pool.release_slot()
                else:
                    got.abort()
            else:
                fut.cancel()
            if isinstance(exc, asyncio.TimeoutError):
                raise TransportError("timeout", f"no free connection within {timeout_s}s") from None
            raise

    async def aclose(self) -> None:
        """Close the running loop's idle connections; the next request opens new ones."""
        pool = self._pools.get()
        self._pools = self._new_pools()
        keeper, pool.keeper = pool.keeper, None
        if keeper is not None:
            await keeper.aclose()  # type: ignore[attr-defined]
        else:
            pool.close()

    def __repr__(self) -> str:
        return f"<AsyncioTransport opened={self.opened} max_connections={self.max_connections}>"


class _AsyncioStream:
    """A response read line by line as it arrives."""

    def __init__(self, pool: _Pool, conn: _Conn, timeout_s: float) -> None:
        self._pool = pool
        self._conn = conn
        self._timeout_s = timeout_s
        head = conn.head
        assert head is not None
        self.status = head.status
        self.headers: LowerHeaders = head.headers
        self._closed = False

    async def _more(self) -> bool:
        """Wait for body bytes or the end; False at the end. Raises a read's error."""
        conn = self._conn
        if self._closed:
            # Its connection may be carrying another request by now.
            raise TransportError("closed", "the stream was closed")
        if conn.error is not None:
            raise conn.error
        if conn.pieces:
            return True
        if conn.state == _DONE:
            return False
        loop = asyncio.get_running_loop()
        waiter = conn.wait(loop)
        timer = loop.call_later(self._timeout_s, conn.expire, "data", self._timeout_s)
        try:
            await waiter
        except BaseException:
            conn.abort()
            raise
        finally:
            timer.cancel()
        if conn.error is not None:
            raise conn.error
        return bool(conn.pieces) or conn.state != _DONE

    async def lines(self) -> AsyncIterator[bytes]:
        """Body lines as they arrive, with their endings; past the cap, ``too_large``."""
        conn = self._conn
        limit = conn.limit
        seen = 0
        pending = b""
        while await self._more():
            chunk = conn.take()
            if not chunk:
                continue
            data = pending + chunk if pending else chunk
            start = 0
            while True:
                end = data.find(b"\n", start)
                if end < 0:
                    break
                line = data[start : end + 1]
                seen += len(line)
                if seen > limit:
                    conn.abort()
                    raise too_large(limit, f"the stream passed {limit} bytes")
                if len(line) > _MAX_LINE:
                    # It may have come whole in one read: its length is checked all the same.
                    conn.abort()
                    raise malformed(f"a stream line over {_MAX_LINE} bytes")
                yield line
                start = end + 1
            pending = data[start:] if start else data
            if seen + len(pending) > limit:
                conn.abort()
                raise too_large(limit, f"the stream passed {limit} bytes")
            if len(pending) > _MAX_LINE:
                conn.abort()
                raise malformed(f"a stream line over {_MAX_LINE} bytes")
        if pending:
            yield pending

    async def read(self) -> bytes:
        """The rest of the body (decoded), refused past the cap."""
        conn = self._conn
        limit = conn.limit
        pieces: list[bytes] = []
        size = 0
        while await self._more():
            piece = conn.take()
            size += len(piece)
            if size > limit:
                conn.abort()
                raise too_large(limit, f"{size} bytes read, and more to come")
            pieces.append(piece)
        data = b"".join(pieces)
        encoding = self.headers.get("content-encoding")
        if encoding is not None:
            try:
                data = decode_body(data, encoding, limit)
            except TransportError:
                conn.abort()
                raise
        return data

    async def aclose(self) -> None:
        """Pool the connection if the body was read to the end, else close it."""
        if self._closed:
            return
        self._closed = True
        conn = self._conn
        if conn.reusable and not conn.pieces:
            self._pool.checkin(conn)
        else:
            conn.abort()


def _render(headers: Mapping[str, str], stream: bool) -> bytes:
    """A caller's headers as lines, with the transport's own defaults where the caller has none."""
    given = {name.lower() for name in headers}
    own = {}
    if "user-agent" not in given:
        own["User-Agent"] = USER_AGENT
    if "accept-encoding" not in given:
        # Streams are read line by line as they come: a compressed one could not be.
        own["Accept-Encoding"] = "identity" if stream else "gzip"
    kept = {name: value for name, value in headers.items() if name.lower() not in _OWN}
    try:
        return header_block({**own, **kept}).encode("latin-1")
    except UnicodeEncodeError:
        raise TransportError("malformed", "a request header outside Latin-1") from None
