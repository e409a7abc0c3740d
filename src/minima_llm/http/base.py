"""The transport seam: send one JSON POST, get status, headers and body."""

from __future__ import annotations

import gzip
from collections.abc import AsyncIterator, Mapping
from typing import Any, NamedTuple, Protocol

from ..errors import TransportError

__all__ = [
    "HttpResponse",
    "LowerHeaders",
    "StreamingResponse",
    "Transport",
    "TransportError",
    "decode_body",
    "encode_body",
]


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


def decode_body(body: bytes, content_encoding: str | None) -> bytes:
    """Undo a gzip ``Content-Encoding`` on a response body."""
    if content_encoding and content_encoding.strip().lower() == "gzip":
        try:
            return gzip.decompress(body)
        except (OSError, EOFError) as exc:
            raise TransportError("malformed", f"bad gzip response body: {exc}") from exc
    return body
