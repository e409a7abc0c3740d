"""The transport seam: send one JSON POST, get status, headers and body."""

from __future__ import annotations

import gzip
import ssl
import zlib
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple, Protocol

from ..config import DEFAULT_MAX_RESPONSE_BYTES
from ..errors import TransportError

__all__ = [
    "DEFAULT_MAX_RESPONSE_BYTES",
    "HttpResponse",
    "LowerHeaders",
    "StreamingResponse",
    "Transport",
    "TransportError",
    "body_limit",
    "decode_body",
    "encode_body",
    "tls_context",
    "too_large",
]

# What "no cap" compares against: more than any body, and still room for the + 1 of a
# bounded read (sys.maxsize + 1 would overflow a C size).
_UNCAPPED = 2**62


class LowerHeaders(dict[str, str]):
    """Response headers whose names are already lower-case, so lookups need no scan."""

    lowercase = True

    @classmethod
    def of(cls, pairs: Any) -> LowerHeaders:
        """Lower-case the names of a mapping or an iterable of pairs."""
        items = pairs.items() if hasattr(pairs, "items") else pairs
        return cls((str(k).lower(), v) for k, v in items)


class HttpResponse(NamedTuple):
    """An HTTP response: status, lower-cased header names, and the (decoded) body."""

    # A named tuple, not a frozen dataclass: one is built per request, and a frozen
    # dataclass sets each field through object.__setattr__.

    status: int
    headers: Mapping[str, str]
    body: bytes


class StreamingResponse(Protocol):
    """A response whose body is read line by line as it arrives."""

    @property
    def status(self) -> int:
        """The HTTP status."""
        ...

    @property
    def headers(self) -> Mapping[str, str]:
        """Response headers with lower-case names."""
        ...

    def lines(self) -> AsyncIterator[bytes]:
        """Body lines as they arrive; raises ``TransportError`` if the stream breaks."""
        ...

    async def read(self) -> bytes:
        """The whole (remaining) body, for error responses."""
        ...

    async def aclose(self) -> None:
        """Release the connection (closing it if the body was not read to the end)."""
        ...


class Transport(Protocol):
    """Sends requests; raises ``TransportError`` when no complete response arrives."""

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """POST ``body`` to ``url`` and read the whole response within ``timeout_s``."""
        ...

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> StreamingResponse:
        """POST and return once headers arrive; ``timeout_s`` bounds each wait for data."""
        ...

    async def aclose(self) -> None:
        """Close pooled connections."""
        ...


def encode_body(body: bytes, headers: dict[str, str], compress_gzip: bool) -> bytes:
    """Gzip the request body when asked, setting ``Content-Encoding``."""
    if not compress_gzip:
        return body
    headers["Content-Encoding"] = "gzip"
    return gzip.compress(body, compresslevel=5)


def tls_context(verify: bool) -> ssl.SSLContext:
    """The context for https upstreams: the system's CA store, or no checks at all."""
    return ssl.create_default_context() if verify else ssl._create_unverified_context()


def body_limit(max_response_bytes: int) -> int:
    """The cap as a byte count to compare against: 0 (no cap) becomes one no body reaches."""
    return max_response_bytes or _UNCAPPED


def too_large(limit: int, what: str) -> TransportError:
    """The error for an answer over ``limit`` bytes; ``what`` says how it was found out."""
    return TransportError("too_large", f"response body over max_response_bytes={limit}: {what}")


def decode_body(
    body: bytes, content_encoding: str | None, max_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
) -> bytes:
    """Undo a gzip ``Content-Encoding`` on a response body, refusing one past ``max_bytes``.

    ``max_bytes`` bounds the decompressed size (0: no bound); a gzip bomb is refused
    once that much has come out, never expanded whole.
    """
    if content_encoding and content_encoding.strip().lower() == "gzip":
        try:
            return _gunzip(body, body_limit(max_bytes))
        except zlib.error as exc:
            raise TransportError("malformed", f"bad gzip response body: {exc}") from exc
    return body


def _gunzip(data: bytes, limit: int) -> bytes:
    # Member by member, as gzip.decompress reads them (with the zero padding some
    # servers leave between members); wbits=31 checks each member's CRC and length.
    members: list[bytes] = []
    size = 0
    while data:
        member = zlib.decompressobj(wbits=31)
        # One byte past the room left: getting it proves the body is over the cap.
        out = member.decompress(data, limit - size + 1)
        size += len(out)
        if size > limit:
            raise too_large(limit, f"gzip decompresses to more than {limit} bytes")
        if not member.eof:
            raise TransportError("malformed", "bad gzip response body: truncated")
        members.append(out)
        data = member.unused_data.lstrip(b"\x00")
    return members[0] if len(members) == 1 else b"".join(members)
