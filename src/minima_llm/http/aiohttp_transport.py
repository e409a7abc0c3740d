"""An aiohttp transport: one pooled ``ClientSession`` per event loop."""

from __future__ import annotations

import asyncio
import functools
import io
from collections.abc import AsyncIterator, Iterator, Mapping
from typing import Any, NamedTuple, NoReturn

from .._version import USER_AGENT
from ..errors import ConfigError, TransportError
from ..loopbound import LoopBound
from .base import DEFAULT_MAX_RESPONSE_BYTES, HttpResponse, body_limit, too_large
from .proxies import Proxy, ProxyRules, tunnel_refused, via

try:
    import aiohttp
    import yarl
except ImportError as exc:  # pragma: no cover - exercised only without the extra
    raise ImportError(
        "the aiohttp transport needs aiohttp: pip install 'minima-llm[proxy]'"
    ) from exc


_MAX_URLS = 256
_WHOLE_BODY_BYTES = 2**20  # aiohttp's own limit for a body of raw bytes
# aiohttp refuses a line longer than twice a response's read buffer (128 KiB by
# default). One SSE event can be far longer: a whole answer sent as a single chunk, as
# a cache replays it. Streams get a buffer that admits 16 MiB lines; past that, a
# stream is malformed.
_STREAM_BUFSIZE = 2**23


class _Target(NamedTuple):
    """A request URL, parsed, with the proxy it goes through (None: direct)."""

    url: yarl.URL
    proxy: yarl.URL | None
    # The proxy's credentials: in the CONNECT of an https request (aiohttp sends these
    # there only), or on each plain-http request, which the proxy itself answers.
    connect_headers: dict[str, str] | None
    request_headers: dict[str, str] | None
    route: Proxy | None

    @classmethod
    def of(cls, url: str, rules: ProxyRules) -> _Target:
        """Parse ``url`` and decide its proxy; an unusable proxy variable is a connect error."""
        parsed = yarl.URL(url)
        if not rules:
            return cls(parsed, None, None, None, None)
        try:
            proxy = rules.for_origin(parsed.scheme, parsed.host or "", parsed.port or 0)
        except ConfigError as exc:
            raise TransportError("connect", str(exc)) from exc
        if proxy is None:
            return cls(parsed, None, None, None, None)
        tunnelled = parsed.scheme == "https"
        return cls(
            parsed,
            yarl.URL(proxy.url),
            proxy.headers if tunnelled else None,
            None if tunnelled else proxy.headers,
            proxy,
        )

    def headers(self, given: Mapping[str, str] | None) -> Mapping[str, str] | None:
        """A request's own headers, with the proxy's credentials if it carries them."""
        if self.request_headers is None:
            return given
        return {**(given or {}), **self.request_headers}


class _LoopSession:
    """A session and the async generator that closes it when its loop shuts down."""

    def __init__(self, max_connections: int, headers: Mapping[str, str] | None) -> None:
        connector = aiohttp.TCPConnector(
            limit=max_connections, limit_per_host=max_connections, enable_cleanup_closed=True
        )
        # Ours unless the caller names one, so aiohttp never adds its own; that beats
        # skip_auto_headers, which rebuilds a header multidict on every request.
        defaults = {"User-Agent": USER_AGENT, **(headers or {})}
        self.session = aiohttp.ClientSession(
            connector=connector,
            auto_decompress=True,
            # No cookies, like the stdlib transport: LLM APIs are stateless, and aiohttp's
            # jar would filter and update cookies on every request.
            cookie_jar=aiohttp.DummyCookieJar(),
            headers=defaults,
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
    """Sends requests with aiohttp over keep-alive connections, one session per loop.

    An answer past ``max_response_bytes`` (0: no cap) raises ``TransportError("too_large")``.
    """

    def __init__(
        self,
        max_connections: int = 32,
        default_headers: Mapping[str, str] | None = None,
        *,
        max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES,
        proxies: ProxyRules | None = None,
    ) -> None:
        self.max_connections = max_connections
        self.max_response_bytes = max_response_bytes
        # Our own rules, not aiohttp's trust_env: the same as the stdlib transport's, and
        # decided once per URL rather than read from the environment on every request.
        self.proxies = ProxyRules.from_environ() if proxies is None else proxies
        self._limit = body_limit(max_response_bytes)
        # The session sends these itself; a request passing this very mapping sends
        # nothing extra, saving aiohttp a merge of header dicts on every request.
        self._default_headers = default_headers
        # Per loop, so the transport works across asyncio.run() calls and again after aclose.
        self._sessions: LoopBound[_LoopSession] = self._new_sessions()
        # One immutable timeout object per value, not one per request on the hot path.
        self._timeouts: dict[float, aiohttp.ClientTimeout] = {}
        # Parsed once, with the proxy each goes through: aiohttp parses a string URL on
        # every request otherwise.
        self._urls: dict[str, _Target] = {}

    def _new_sessions(self) -> LoopBound[_LoopSession]:
        # Not a bound method: a transport in a reference cycle is freed only by the cyclic GC,
        # which finalizes its session alongside the generator that would close it, so
        # aiohttp warns "Unclosed client session" for every backend dropped unclosed.
        return LoopBound(
            functools.partial(_LoopSession, self.max_connections, self._default_headers)
        )

    def _target(self, url: str) -> _Target:
        target = self._urls.get(url)
        if target is None:
            if len(self._urls) >= _MAX_URLS:
                self._urls.clear()
            target = self._urls[url] = _Target.of(url, self.proxies)
        return target

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
        session = await self._session()
        timeout = self._timeouts.get(timeout_s)
        if timeout is None:
            timeout = self._timeouts[timeout_s] = aiohttp.ClientTimeout(total=timeout_s)
        target = self._urls.get(url) or self._target(url)
        try:
            extra = None if headers is self._default_headers else headers
            if target.request_headers is not None:
                extra = target.headers(extra)
            # Past 1 MiB aiohttp warns that raw bytes are written in one go; a file-like
            # body is sent in pieces, with the same Content-Length.
            data: bytes | io.BytesIO = body if len(body) <= _WHOLE_BODY_BYTES else io.BytesIO(body)
            # Redirects come back as responses, as from the stdlib transport: followed,
            # a 301 or 302 would turn the POST into a GET at the new address.
            async with session.post(
                target.url,
                data=data,
                headers=extra,
                timeout=timeout,
                allow_redirects=False,
                proxy=target.proxy,
                proxy_headers=target.connect_headers,
            ) as resp:
                # The usual answer, its length known and within the cap, is read whole in
                # one call. Without a length, or compressed (aiohttp decompresses it, and
                # its length is the compressed one), it is read in pieces and counted.
                # The header, not resp.content_length: that property parses it again.
                headers = resp.headers
                length = headers.get("Content-Length")
                if length is None or _ENCODED in headers or int(length) > self._limit:
                    data = await _read_capped(resp, self._limit)
                else:
                    data = await resp.read()
                return HttpResponse(resp.status, _Headers(headers), data)
        except TransportError:
            raise
        except Exception as exc:
            _raise_translated(exc, timeout_s, target.route)

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> _AiohttpStream:
        """POST and return at the headers; each later read waits at most ``timeout_s``."""
        session = await self._session()
        timeout = aiohttp.ClientTimeout(total=None, sock_connect=timeout_s, sock_read=timeout_s)
        target = self._target(url)
        try:
            data: bytes | io.BytesIO = body if len(body) <= _WHOLE_BODY_BYTES else io.BytesIO(body)
            resp = await session.post(
                target.url,
                data=data,
                headers=target.headers(headers),
                timeout=timeout,
                allow_redirects=False,
                read_bufsize=_STREAM_BUFSIZE,
                proxy=target.proxy,
                proxy_headers=target.connect_headers,
            )
        except TransportError:
            raise
        except Exception as exc:
            _raise_translated(exc, timeout_s, target.route)
        return _AiohttpStream(resp, timeout_s, self._limit)

    async def aclose(self) -> None:
        """Close the running loop's session; the next request opens a new one."""
        entry = self._sessions.get()
        # Replaced before the close is awaited: a request retried meanwhile (its
        # connection cut by this close) must get the new session, not the closing one.
        self._sessions = self._new_sessions()
        if entry.keeper is not None:
            keeper, entry.keeper = entry.keeper, None
            await keeper.aclose()  # type: ignore[attr-defined]
        elif not entry.session.closed:
            await entry.session.close()

    def __repr__(self) -> str:
        return f"<AiohttpTransport max_connections={self.max_connections}>"


class _AiohttpStream:
    """An aiohttp response read line by line."""

    def __init__(self, resp: aiohttp.ClientResponse, timeout_s: float, limit: int) -> None:
        self._resp = resp
        self._timeout_s = timeout_s
        self._limit = limit
        self.status = resp.status
        self.headers = _Headers(resp.headers)

    async def lines(self) -> AsyncIterator[bytes]:
        """Body lines as they arrive; past the cap, ``TransportError("too_large")``."""
        limit = self._limit
        seen = 0
        try:
            async for line in self._resp.content:
                seen += len(line)
                if seen > limit:
                    self._resp.close()
                    raise too_large(limit, f"the stream passed {limit} bytes")
                yield line
        except TransportError:
            raise
        except Exception as exc:
            raise _translate(exc, self._timeout_s) from exc

    async def read(self) -> bytes:
        """The rest of the body, refused past the cap."""
        try:
            return await _read_capped(self._resp, self._limit)
        except TransportError:
            raise
        except Exception as exc:
            raise _translate(exc, self._timeout_s) from exc

    async def aclose(self) -> None:
        """Return the connection to the pool, or drop it if the body was cut short."""
        if self._resp.content.at_eof():
            self._resp.release()
        else:
            self._resp.close()


_ENCODED = "Content-Encoding"


async def _read_capped(resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The body, refused by its Content-Length or once the (decompressed) bytes pass ``limit``.

    Not ``resp.read()``: that lifts the bound on how much aiohttp decompresses at once,
    so a gzip bomb would expand whole before a byte of it could be counted.
    """
    length = resp.content_length
    if length is not None and length > limit:
        # Closed at once: no byte of the unread body may reach this connection's next request.
        resp.close()
        raise too_large(limit, f"Content-Length is {length}")
    content = resp.content
    pieces: list[bytes] = []
    size = 0
    while piece := await content.readany():
        size += len(piece)
        if size > limit:
            resp.close()
            raise too_large(limit, f"{size} bytes read, and more to come")
        pieces.append(piece)
    return b"".join(pieces)


def _raise_translated(exc: Exception, timeout_s: float, route: Proxy | None) -> NoReturn:
    """Raise ``exc`` as the transport's own error, naming the proxy the request went through."""
    error = via(_translate(exc, timeout_s), route)
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        # Not chained: its repr holds the CONNECT's headers, the proxy's password among them.
        raise error from None
    raise error from exc


def _translate(exc: Exception, timeout_s: float) -> Exception:
    """aiohttp's exceptions as the transport's own; anything else is passed through."""
    if isinstance(exc, asyncio.TimeoutError):
        return TransportError("timeout", f"timed out after {timeout_s}s")
    if isinstance(exc, aiohttp.ClientPayloadError):
        return TransportError("reset", f"connection closed mid-body: {exc}")
    if isinstance(exc, aiohttp.ClientHttpProxyError):
        return tunnel_refused(exc.status, exc.message)
    if isinstance(exc, aiohttp.ServerDisconnectedError):
        return TransportError("reset", f"server disconnected: {exc}")
    if isinstance(exc, aiohttp.ClientOSError) and not isinstance(exc, aiohttp.ClientConnectorError):
        # A socket error on a connection that was made (reset, broken pipe): what the
        # stdlib transport calls a reset too, not a server that cannot be reached.
        return TransportError("reset", f"connection reset: {exc}")
    if isinstance(exc, aiohttp.ClientError):
        return TransportError("connect", f"{type(exc).__name__}: {exc}")
    if isinstance(exc, RuntimeError) and "Session is closed" in str(exc):
        return TransportError("closed", "the transport was closed")
    # LineTooLong, or ValueError("Chunk too big") from older aiohttp. Their messages are
    # not quoted: LineTooLong's holds the upstream's bytes.
    if isinstance(exc, aiohttp.http_exceptions.LineTooLong) or (
        isinstance(exc, ValueError) and "too big" in str(exc)
    ):
        return TransportError("malformed", f"a stream line over {2 * _STREAM_BUFSIZE} bytes")
    if isinstance(exc, aiohttp.http_exceptions.HttpProcessingError):
        return TransportError("malformed", f"unreadable response ({type(exc).__name__})")
    return exc


class _Headers(Mapping[str, str]):
    """aiohttp's case-insensitive response headers under the transport's lower-case contract.

    A view, not a copy: lookups go to aiohttp's multidict, which ignores case
    already; iteration gives each name once, lower-cased.
    """

    lowercase = True
    __slots__ = ("_headers",)

    def __init__(self, headers: Any) -> None:
        self._headers = headers

    def __getitem__(self, name: str) -> str:
        value: str = self._headers[name]
        return value

    def get(self, name: str, default: Any = None) -> Any:
        """The header's (first) value, or ``default``."""
        return self._headers.get(name, default)

    def __contains__(self, name: object) -> bool:
        return name in self._headers

    def __iter__(self) -> Iterator[str]:
        return iter(dict.fromkeys(name.lower() for name in self._headers))

    def __len__(self) -> int:
        return len(dict.fromkeys(name.lower() for name in self._headers))

    def __repr__(self) -> str:
        return f"<headers {dict(self.items())!r}>"
