"""HTTP/1.1 on the wire without I/O: a response head and its framing, a request head.

RFC 9112 is the reference: section 4 for the status line, 5 for header fields
(obsolete line folding is unfolded, as 5.2 asks of a user agent), 6.3 for how the
length of a response body is decided, and 7.1 for chunked bodies.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import NamedTuple

from ..errors import TransportError
from .base import LowerHeaders

__all__ = [
    "CHUNKED",
    "LENGTH",
    "MAX_HEAD_BYTES",
    "NO_BODY",
    "UNTIL_CLOSE",
    "ResponseHead",
    "chunk_size",
    "header_block",
    "malformed",
    "parse_head",
]

# How a response's body ends (RFC 9112, 6.3).
NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE = range(4)
# A head this long without its blank line is not an LLM API answering: http.client stops
# at 100 header lines of 64 KiB, aiohttp at lines of 8 KiB.
MAX_HEAD_BYTES = 2**16
_HEX = frozenset(b"0123456789abcdefABCDEF")


class ResponseHead(NamedTuple):
    """A response's status line and headers, how its body ends, and whether the connection stays."""

    status: int
    reason: str
    headers: LowerHeaders
    framing: int
    length: int
    keep_alive: bool


def malformed(what: str) -> TransportError:
    """The error for an answer that is not HTTP/1.1; ``what`` never quotes the upstream's bytes."""
    return TransportError("malformed", f"unreadable response: {what}")


def parse_head(head: bytes, no_body: bool = False) -> ResponseHead:
    """The status line and header fields of ``head`` (without its blank line).

    ``no_body`` is for an answer that has none whatever it says (the response to
    CONNECT). Lines may end in CRLF or, as RFC 9112 lets a recipient accept, LF alone.
    """
    lines = head.split(b"\n")
    version, _, rest = lines[0].rstrip(b"\r").partition(b" ")
    code, _, reason = rest.partition(b" ")
    # HTTP/1.x with x one digit (a later minor version is read as 1.1, RFC 9110 2.5),
    # and a status of 100 to 599 (RFC 9110 15): a code under 100 is no status at all.
    if (
        len(version) != 8
        or version[:7] != b"HTTP/1."
        or not version[7:].isdigit()
        or len(code) != 3
        or not code.isdigit()
        or code[:1] == b"0"
    ):
        raise malformed("no HTTP/1.x status line")
    headers = LowerHeaders()
    name = ""
    for line in lines[1:]:
        line = line.rstrip(b"\r")
        if line[:1] in (b" ", b"\t"):
            if not name:
                raise malformed("a folded line before any header")
            # One space for the fold; the value's own ends are trimmed as any value's are.
            joined = headers[name] + " " + line.strip(b" \t").decode("latin-1")
            headers[name] = joined.strip(" \t")
            continue
        field, sep, value = line.partition(b":")
        if not sep or not field or field[-1:] in (b" ", b"\t"):
            raise malformed("a header line without a name and a colon")
        name = field.decode("latin-1").lower()
        text = value.strip(b" \t").decode("latin-1")
        # Repeated fields are one comma-separated list (RFC 9110, 5.3).
        headers[name] = headers[name] + ", " + text if name in headers else text
    status = int(code)
    return _framed(status, reason.decode("latin-1"), headers, version == b"HTTP/1.0", no_body)


def _framed(
    status: int, reason: str, headers: LowerHeaders, http10: bool, no_body: bool
) -> ResponseHead:
    """Decide how the body ends and whether the connection can carry another request."""
    connection = headers.get("connection")
    if connection is None:
        keep_alive = not http10
    else:
        tokens = {t.strip() for t in connection.lower().split(",")}
        keep_alive = "keep-alive" in tokens if http10 else "close" not in tokens
    if no_body or status < 200 or status in (204, 304):
        return ResponseHead(status, reason, headers, NO_BODY, 0, keep_alive)
    coding = headers.get("transfer-encoding")
    if coding is not None:
        if coding.rsplit(",", 1)[-1].strip().lower() != "chunked":
            return ResponseHead(status, reason, headers, UNTIL_CLOSE, 0, False)
        # With both, Transfer-Encoding wins, and the connection may not be trusted after;
        # nor after HTTP/1.0 with Transfer-Encoding, whose framing RFC 9112 6.1 calls faulty.
        keep_alive = keep_alive and not http10 and "content-length" not in headers
        return ResponseHead(status, reason, headers, CHUNKED, 0, keep_alive)
    length = headers.get("content-length")
    if length is None:
        return ResponseHead(status, reason, headers, UNTIL_CLOSE, 0, False)
    values = {v.strip() for v in length.split(",")}
    first = values.pop()
    if values or not first.isdigit() or not first.isascii():
        raise malformed("a Content-Length that is not one number")
    return ResponseHead(status, reason, headers, LENGTH, int(first), keep_alive)


def chunk_size(line: bytes) -> int:
    """The size on a chunk's first line, extensions after ``;`` ignored."""
    digits = line.split(b";", 1)[0].strip(b" \t\r")
    if not digits or len(digits) > 16 or not _HEX.issuperset(digits):
        raise malformed("a chunk size that is not hexadecimal")
    return int(digits, 16)


def header_block(headers: Mapping[str, str]) -> str:
    """``Name: value`` lines, each ending CRLF; refuses a name or value that would split a line."""
    lines = [f"{name}: {value}\r\n" for name, value in headers.items()]
    block = "".join(lines)
    # Each line holds exactly one CRLF, its own: any other CR or LF came from a header.
    if block.count("\r") != len(lines) or block.count("\n") != len(lines):
        raise TransportError("malformed", "a request header holds a line break")
    return block
