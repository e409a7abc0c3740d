"""An HTTP forward proxy on 127.0.0.1 for tests: ``CONNECT`` tunnels and absolute-form requests.

``hosts`` maps the names clients ask for to where those servers really listen, so a
client reaches ``upstream.test`` only through the proxy (the name resolves nowhere).
Every request the proxy is asked is recorded in ``seen``; with ``credentials`` set,
one without the matching ``Proxy-Authorization`` gets a 407.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import gc
import sys
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import urlsplit

from local_server import Listener


@dataclass(frozen=True)
class Seen:
    """One request as the proxy received it."""

    method: str
    target: str
    proxy_authorization: str | None


@dataclass
class ForwardProxy:
    """A small forward proxy; ``async with`` starts and stops it."""

    hosts: dict[str, tuple[str, int]] = field(default_factory=dict)
    credentials: str | None = None  # "user:password"
    seen: list[Seen] = field(default_factory=list)
    connections: int = 0
    _listener: Listener = field(init=False)

    def __post_init__(self) -> None:
        self._listener = Listener(self._serve)

    @property
    def url(self) -> str:
        """``http://127.0.0.1:port``."""
        assert self._listener.port, "the proxy has not started"
        return f"http://127.0.0.1:{self._listener.port}"

    async def __aenter__(self) -> ForwardProxy:
        await self._listener.start()
        return self

    async def __aexit__(self, *exc: object) -> None:
        # Closing the sockets ends every relay (the upstream sides are tracked too).
        stuck = await self._listener.stop()
        assert not stuck, f"{stuck} relays were still running after their sockets closed"

    def drop_connections(self) -> None:
        """Close every connection now, as a proxy does with idle ones (no TLS goodbye inside)."""
        self._listener.drop_connections()

    def _expected(self) -> str | None:
        if self.credentials is None:
            return None
        return "Basic " + base64.b64encode(self.credentials.encode()).decode()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self._relay(reader, writer)
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass  # either side went away
        finally:
            await _closed(writer)

    async def _relay(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        method, target, lines, auth = self._parse(head)
        if not self._admitted(auth, writer):
            return
        if method == "CONNECT":
            host, _, port = target.rpartition(":")
            upstream = await self._open(host, int(port), writer)
            if upstream is None:
                return
            writer.write(b"HTTP/1.1 200 Connection established\r\n\r\n")
            await _pipe_both(reader, writer, *upstream)
            return
        parts = urlsplit(target)
        upstream = await self._open(parts.hostname or "", parts.port or 80, writer)
        if upstream is None:
            return
        up_reader, up_writer = upstream
        back = asyncio.ensure_future(_pipe(up_reader, writer))
        try:
            # Request by request: each is recorded and sent on in origin form, without
            # the proxy's own headers, as a real proxy does.
            while True:
                up_writer.write(_origin_form(method, target, lines))
                length = _content_length(lines)
                if length:
                    up_writer.write(await reader.readexactly(length))
                await up_writer.drain()
                head = await reader.readuntil(b"\r\n\r\n")
                method, target, lines, auth = self._parse(head)
                if not self._admitted(auth, writer):
                    return
        finally:
            back.cancel()
            with contextlib.suppress(asyncio.CancelledError, OSError):
                await back
            self._listener.writers.discard(up_writer)
            await _closed(up_writer)

    def _parse(self, head: bytes) -> tuple[str, str, list[str], str | None]:
        first, *lines = head.decode("latin-1").split("\r\n")
        method, target, _ = first.split(" ", 2)
        lines = [line for line in lines if line]
        auth = next(
            (
                v.strip()
                for k, _, v in (x.partition(":") for x in lines)
                if k.strip().lower() == "proxy-authorization"
            ),
            None,
        )
        self.seen.append(Seen(method, target, auth))
        return method, target, lines, auth

    def _admitted(self, auth: str | None, writer: asyncio.StreamWriter) -> bool:
        expected = self._expected()
        if expected is None or auth == expected:
            return True
        writer.write(
            b"HTTP/1.1 407 Proxy Authentication Required\r\n"
            b'Proxy-Authenticate: Basic realm="test"\r\nContent-Length: 0\r\nConnection: close\r\n\r\n'
        )
        return False

    async def _open(
        self, host: str, port: int, writer: asyncio.StreamWriter
    ) -> tuple[asyncio.StreamReader, asyncio.StreamWriter] | None:
        where = self.hosts.get(host.lower(), (host, port))
        try:
            upstream = await asyncio.open_connection(*where)
        except OSError:
            writer.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
            )
            return None
        self._listener.writers.add(upstream[1])
        return upstream


def _origin_form(method: str, target: str, lines: list[str]) -> bytes:
    parts = urlsplit(target)
    path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
    kept = [line for line in lines if not line.lower().startswith("proxy-")]
    return f"{method} {path} HTTP/1.1\r\n{''.join(k + chr(13) + chr(10) for k in kept)}\r\n".encode(
        "latin-1"
    )


def _content_length(lines: list[str]) -> int:
    for line in lines:
        name, _, value = line.partition(":")
        if name.strip().lower() == "content-length":
            return int(value)
    return 0


async def _closed(writer: asyncio.StreamWriter) -> None:
    """Close and wait until closed: a socket left to a loop that ends is a ResourceWarning."""
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(65536):
        writer.write(data)
        await writer.drain()


async def _pipe_both(
    reader: asyncio.StreamReader,
    writer: asyncio.StreamWriter,
    up_reader: asyncio.StreamReader,
    up_writer: asyncio.StreamWriter,
) -> None:
    ways = [
        asyncio.ensure_future(_pipe(reader, up_writer)),
        asyncio.ensure_future(_pipe(up_reader, writer)),
    ]
    try:
        await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for way in ways:
            way.cancel()
        await asyncio.gather(*ways, return_exceptions=True)
        await _closed(up_writer)


def free_refused_tunnels() -> None:
    """Collect the sockets http.client before 3.11 leaves open after a refused CONNECT.

    Its ``_tunnel`` does not close the response that reads the proxy's answer (3.11
    does, in a finally): the socket is freed only when collected, with a ResourceWarning.
    """
    if sys.version_info < (3, 11):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ResourceWarning)
            gc.collect()


@contextlib.contextmanager
def in_a_thread(proxy: ForwardProxy) -> Iterator[ForwardProxy]:
    """Serve ``proxy`` from an event loop of its own, for tests that are not async."""
    loop = asyncio.new_event_loop()
    thread = threading.Thread(target=loop.run_forever, name="forward-proxy", daemon=True)
    thread.start()
    try:
        asyncio.run_coroutine_threadsafe(proxy.__aenter__(), loop).result(10)
        try:
            yield proxy
        finally:
            asyncio.run_coroutine_threadsafe(proxy.__aexit__(), loop).result(10)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        thread.join(10)
        loop.close()
