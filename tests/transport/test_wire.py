"""The HTTP/1.1 wire format without I/O: response heads, their framing, chunk sizes, request headers.

Each table row is one head as a server could send it (without its blank line) and
what ``parse_head`` must make of it; RFC 9112 is the reference for every row.
"""

from __future__ import annotations

import pytest

from minima_llm.errors import TransportError
from minima_llm.http.wire import (
    CHUNKED,
    LENGTH,
    NO_BODY,
    UNTIL_CLOSE,
    ResponseHead,
    chunk_size,
    header_block,
    malformed,
    parse_head,
)


def crlf(*lines: str) -> bytes:
    """A head from its lines, each ended by CRLF except the last (the blank line is not part)."""
    return "\r\n".join(lines).encode("latin-1")


# -- the status line ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("head", "status", "reason"),
    [
        (b"HTTP/1.1 200 OK\r\nContent-Length: 0", 200, "OK"),
        (b"HTTP/1.1 404 Not Found\r\nContent-Length: 0", 404, "Not Found"),
        # The reason phrase is optional, and may hold spaces and colons.
        (b"HTTP/1.1 200\r\nContent-Length: 0", 200, ""),
        (b"HTTP/1.1 200 \r\nContent-Length: 0", 200, ""),
        (b"HTTP/1.1 503 Slow down: try again\r\nContent-Length: 0", 503, "Slow down: try again"),
        (b"HTTP/1.0 200 OK\r\nContent-Length: 0", 200, "OK"),
        # A reason is latin-1 text, never refused for its bytes.
        (b"HTTP/1.1 200 \xe9t\xe9\r\nContent-Length: 0", 200, "\xe9t\xe9"),
        (b"HTTP/1.1 599 Whatever\r\nContent-Length: 0", 599, "Whatever"),
        # A later minor version is read as the 1.1 this client speaks (RFC 9110 2.5).
        (b"HTTP/1.2 200 OK\r\nContent-Length: 0", 200, "OK"),
    ],
    ids=[
        "ok",
        "not-found",
        "no-reason",
        "empty-reason",
        "reason-with-colon",
        "http10",
        "latin1",
        "599",
        "http12",
    ],
)
def test_status_line_forms(head: bytes, status: int, reason: str) -> None:
    parsed = parse_head(head)
    assert isinstance(parsed, ResponseHead)
    assert (parsed.status, parsed.reason) == (status, reason)
    assert parsed.framing == LENGTH and parsed.length == 0


@pytest.mark.parametrize(
    "head",
    [
        b"",
        b"garbage",
        b"HTTP/2 200 OK",
        b"HTTP/2.0 200 OK",
        b"http/1.1 200 OK",  # the protocol name is case-sensitive
        b"HTTP/1.1",
        b"HTTP/1.1 ",
        b"HTTP/1.1 20 OK",
        b"HTTP/1.1 2000 OK",
        b"HTTP/1.1 2x0 OK",
        b"HTTP/1.1 -20 OK",
        b"HTTP/1.1  200 OK",  # two spaces: the code is empty
        b"HTTP/1.1 OK 200",
        b" HTTP/1.1 200 OK",
        b"ICY 200 OK",
        b"HTTP/1.1 \xd9\xa2\xd9\xa0\xd9\xa0 OK",  # Arabic-Indic digits are not a status code
        b"HTTP/1.1 099 Early",  # under 100: no status class at all
        b"HTTP/1.1 000 Nothing",
        b"HTTP/1.x 200 OK",
        b"HTTP/1.10 200 OK",
        b"HTTP/1. 200 OK",
    ],
)
def test_malformed_status_lines_are_refused(head: bytes) -> None:
    with pytest.raises(TransportError) as info:
        parse_head(head + b"\r\nContent-Length: 0")
    assert info.value.kind == "malformed"
    assert "status line" in str(info.value)


# -- keep-alive --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("version", "connection", "keep_alive"),
    [
        ("1.1", None, True),
        ("1.1", "keep-alive", True),
        ("1.1", "close", False),
        ("1.1", "Close", False),
        ("1.1", "CLOSE", False),
        ("1.1", "keep-alive, close", False),
        ("1.1", "upgrade , close ", False),
        ("1.1", "Upgrade", True),
        ("1.1", "closed", True),  # a token, not a substring
        ("1.0", None, False),
        ("1.0", "keep-alive", True),
        ("1.0", "Keep-Alive", True),
        ("1.0", "foo, keep-alive", True),
        ("1.0", "close", False),
        ("1.0", "keep-alive-ish", False),
    ],
)
def test_keep_alive_follows_the_version_and_the_connection_tokens(
    version: str, connection: str | None, keep_alive: bool
) -> None:
    lines = [f"HTTP/{version} 200 OK", "Content-Length: 2"]
    if connection is not None:
        lines.append(f"Connection: {connection}")
    parsed = parse_head(crlf(*lines))
    assert parsed.keep_alive is keep_alive
    assert (parsed.framing, parsed.length) == (LENGTH, 2)


def test_repeated_connection_headers_are_one_list() -> None:
    parsed = parse_head(
        crlf("HTTP/1.1 200 OK", "Connection: upgrade", "Connection: close", "Content-Length: 0")
    )
    assert parsed.headers["connection"] == "upgrade, close"
    assert parsed.keep_alive is False


# -- header fields -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("lines", "expected"),
    [
        (["X-A: 1"], {"x-a": "1"}),
        (["X-A:1"], {"x-a": "1"}),
        (["X-A: \t 1 \t "], {"x-a": "1"}),
        (["X-A:"], {"x-a": ""}),
        (["Content-TYPE: text/plain"], {"content-type": "text/plain"}),
        (["X-URL: http://h:1/p"], {"x-url": "http://h:1/p"}),
        # Repeated fields are one comma-separated list, whatever the case of their names.
        (["X-A: 1", "x-a: 2", "X-A: 3"], {"x-a": "1, 2, 3"}),
        (
            ["Set-Cookie: a=1", "Other: o", "SET-COOKIE: b=2"],
            {"set-cookie": "a=1, b=2", "other": "o"},
        ),
        # Obsolete line folding: each continuation line is one space.
        (["X-A: one", " two", "\t three"], {"x-a": "one two three"}),
        (["X-A: 1", "X-A: 2", "  more"], {"x-a": "1, 2 more"}),
        (["X-A: one", " two", "X-B: b"], {"x-a": "one two", "x-b": "b"}),
        (["X-A: caf\xe9"], {"x-a": "caf\xe9"}),
    ],
    ids=[
        "plain",
        "no-space",
        "trimmed",
        "empty-value",
        "lower-cased",
        "colon-in-value",
        "repeated",
        "repeated-interleaved",
        "folded",
        "folded-after-repeat",
        "folded-then-next",
        "latin1",
    ],
)
def test_header_fields(lines: list[str], expected: dict[str, str]) -> None:
    parsed = parse_head(crlf("HTTP/1.1 200 OK", *lines, "Content-Length: 0"))
    assert dict(parsed.headers) == {**expected, "content-length": "0"}
    assert all(name == name.lower() for name in parsed.headers)


@pytest.mark.parametrize(
    ("lines", "value"),
    [(["X-A:", " a"], "a"), (["X-A: a", " "], "a"), (["X-A:", "\t"], "")],
    ids=["fold-after-empty-value", "blank-fold", "only-folds"],
)
def test_an_unfolded_value_has_no_outer_whitespace(lines: list[str], value: str) -> None:
    parsed = parse_head(crlf("HTTP/1.1 200 OK", *lines, "Content-Length: 0"))
    assert parsed.headers["x-a"] == value


@pytest.mark.parametrize(
    "head",
    [
        b"HTTP/1.1 200 OK\nContent-Type: text/plain\nContent-Length: 3",
        b"HTTP/1.1 200 OK\r\nContent-Type: text/plain\nContent-Length: 3",
        b"HTTP/1.1 200 OK\nContent-Type: text/plain\r\nContent-Length: 3\r",
        b"HTTP/1.1 200 OK\nContent-Type: text/\n plain\nContent-Length: 3",
    ],
    ids=["bare-lf", "mixed", "mixed-trailing-cr", "bare-lf-folded"],
)
def test_bare_lf_lines_are_lines(head: bytes) -> None:
    parsed = parse_head(head)
    assert parsed.status == 200 and parsed.reason == "OK"
    assert parsed.headers["content-type"] in ("text/plain", "text/ plain")
    assert parsed.headers["content-length"] == "3"
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (LENGTH, 3, True)
    assert not any("\r" in v or "\n" in v for v in parsed.headers.values())


@pytest.mark.parametrize(
    "line",
    [
        "no colon here",
        ": no name",
        "X-A : space before the colon",
        "X-A\t: tab before the colon",
        " X-A: folded before any header",
        "\tX-A: folded before any header",
        "",  # an empty line inside the head
    ],
)
def test_malformed_header_lines_are_refused(line: str) -> None:
    with pytest.raises(TransportError) as info:
        parse_head(crlf("HTTP/1.1 200 OK", line, "Content-Length: 0"))
    assert info.value.kind == "malformed"


def test_a_fold_right_after_the_status_line_is_refused() -> None:
    with pytest.raises(TransportError) as info:
        parse_head(b"HTTP/1.1 200 OK\r\n continued\r\nContent-Length: 0")
    assert info.value.kind == "malformed"
    assert "folded" in str(info.value)


# -- framing -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "extra"),
    [
        (100, []),
        (101, ["Upgrade: websocket"]),
        (103, ["Link: </a.css>; rel=preload"]),
        (199, []),
        (204, []),
        (204, ["Content-Length: 10"]),
        (204, ["Transfer-Encoding: chunked"]),
        (304, []),
        (304, ["Content-Length: 1234"]),
        (304, ["Transfer-Encoding: chunked"]),
    ],
)
def test_informational_204_and_304_have_no_body(status: int, extra: list[str]) -> None:
    parsed = parse_head(crlf(f"HTTP/1.1 {status} X", *extra))
    assert parsed.status == status
    assert (parsed.framing, parsed.length) == (NO_BODY, 0)
    assert parsed.keep_alive is True


def test_no_body_wins_over_any_framing() -> None:
    for extra in (["Content-Length: 10"], ["Transfer-Encoding: chunked"], []):
        parsed = parse_head(crlf("HTTP/1.1 200 Connection established", *extra), no_body=True)
        assert (parsed.framing, parsed.length, parsed.keep_alive) == (NO_BODY, 0, True)
    parsed = parse_head(crlf("HTTP/1.1 200 OK", "Connection: close"), no_body=True)
    assert (parsed.framing, parsed.keep_alive) == (NO_BODY, False)
    # Without it, the same head's body ends at the close.
    assert parse_head(crlf("HTTP/1.1 200 Connection established")).framing == UNTIL_CLOSE


def test_no_body_keeps_the_connection_tokens() -> None:
    parsed = parse_head(crlf("HTTP/1.1 304 Not Modified", "Connection: close"))
    assert (parsed.framing, parsed.keep_alive) == (NO_BODY, False)
    parsed = parse_head(crlf("HTTP/1.0 204 No Content"))
    assert (parsed.framing, parsed.keep_alive) == (NO_BODY, False)


@pytest.mark.parametrize(
    ("codings", "framing", "keep_alive"),
    [
        (["chunked"], CHUNKED, True),
        (["Chunked"], CHUNKED, True),
        (["CHUNKED "], CHUNKED, True),
        (["gzip, chunked"], CHUNKED, True),
        (["gzip", "chunked"], CHUNKED, True),  # repeated: one list
        (["gzip"], UNTIL_CLOSE, False),
        (["identity"], UNTIL_CLOSE, False),
        (["chunked, gzip"], UNTIL_CLOSE, False),  # chunked not last: the body ends at the close
        (["chunked", "gzip"], UNTIL_CLOSE, False),
        (["chunkedx"], UNTIL_CLOSE, False),
        ([""], UNTIL_CLOSE, False),
    ],
)
def test_transfer_encoding(codings: list[str], framing: int, keep_alive: bool) -> None:
    lines = [f"Transfer-Encoding: {c}" for c in codings]
    parsed = parse_head(crlf("HTTP/1.1 200 OK", *lines))
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (framing, 0, keep_alive)


def test_chunked_over_http10_is_not_kept_alive() -> None:
    parsed = parse_head(crlf("HTTP/1.0 200 OK", "Transfer-Encoding: chunked"))
    assert (parsed.framing, parsed.keep_alive) == (CHUNKED, False)
    # Not even when it asks: HTTP/1.0 with Transfer-Encoding is faulty framing (RFC 9112 6.1).
    asked = parse_head(
        crlf("HTTP/1.0 200 OK", "Transfer-Encoding: chunked", "Connection: keep-alive")
    )
    assert (asked.framing, asked.keep_alive) == (CHUNKED, False)


@pytest.mark.parametrize(
    "lines",
    [
        ["Transfer-Encoding: chunked", "Content-Length: 10"],
        ["Content-Length: 10", "Transfer-Encoding: chunked"],
        ["Content-Length: 10", "Transfer-Encoding: chunked", "Connection: keep-alive"],
        # Even a Content-Length that would be malformed on its own: chunked wins.
        ["Content-Length: ten", "Transfer-Encoding: chunked"],
    ],
)
def test_transfer_encoding_and_content_length_is_chunked_and_not_kept_alive(
    lines: list[str],
) -> None:
    parsed = parse_head(crlf("HTTP/1.1 200 OK", *lines))
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (CHUNKED, 0, False)


def test_transfer_encoding_other_than_chunked_beats_content_length() -> None:
    parsed = parse_head(crlf("HTTP/1.1 200 OK", "Transfer-Encoding: gzip", "Content-Length: 10"))
    assert (parsed.framing, parsed.keep_alive) == (UNTIL_CLOSE, False)


@pytest.mark.parametrize(
    ("values", "length"),
    [
        (["0"], 0),
        (["17"], 17),
        (["007"], 7),
        ([" 42 "], 42),
        (["5", "5"], 5),
        (["5, 5"], 5),
        (["5,5", "5"], 5),
        ([str(2**40)], 2**40),
    ],
)
def test_content_length(values: list[str], length: int) -> None:
    lines = [f"Content-Length: {v}" for v in values]
    parsed = parse_head(crlf("HTTP/1.1 200 OK", *lines))
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (LENGTH, length, True)


@pytest.mark.parametrize(
    "raw",
    [
        [b"5", b"6"],
        [b"5, 6"],
        [b"5, 5, 6"],
        [b""],
        [b"5,"],
        [b"ten"],
        [b"-1"],
        [b"+5"],
        [b"0x10"],
        [b"1.5"],
        [b"1 0"],
        [b"1", b" 0"],  # folded: "1 0"
        [b"\xb2"],  # latin-1 superscript two: str.isdigit() but not a digit
        [b"1\xb9"],
        [b"\xd9\xa5"],  # UTF-8 Arabic-Indic five, read as latin-1
    ],
)
def test_content_length_that_is_not_one_number_is_malformed(raw: list[bytes]) -> None:
    head = b"HTTP/1.1 200 OK\r\nContent-Length: " + raw[0]
    for more in raw[1:]:
        head += b"\r\n" + (more if more.startswith(b" ") else b"Content-Length: " + more)
    with pytest.raises(TransportError) as info:
        parse_head(head)
    assert info.value.kind == "malformed"
    assert "Content-Length" in str(info.value)


@pytest.mark.parametrize(
    "head",
    [
        crlf("HTTP/1.1 200 OK"),
        crlf("HTTP/1.1 200 OK", "Content-Type: text/plain"),
        crlf("HTTP/1.1 200 OK", "Connection: keep-alive"),
        crlf("HTTP/1.0 200 OK", "Connection: keep-alive"),
        crlf("HTTP/1.1 500 Internal Server Error"),
    ],
)
def test_no_length_means_until_close_and_not_kept_alive(head: bytes) -> None:
    parsed = parse_head(head)
    assert (parsed.framing, parsed.length, parsed.keep_alive) == (UNTIL_CLOSE, 0, False)


def test_framing_constants_are_distinct() -> None:
    assert len({NO_BODY, LENGTH, CHUNKED, UNTIL_CLOSE}) == 4


def test_malformed_is_a_transport_error_that_does_not_quote() -> None:
    error = malformed("a thing")
    assert isinstance(error, TransportError)
    assert error.kind == "malformed"
    assert "a thing" in str(error)


def test_malformed_messages_never_quote_the_upstream_bytes() -> None:
    secret = "sk-SECRET-1234"
    for head in (
        f"{secret} 200 OK".encode(),
        f"HTTP/1.1 200 OK\r\n{secret}".encode(),
        f"HTTP/1.1 200 OK\r\nContent-Length: {secret}".encode(),
    ):
        with pytest.raises(TransportError) as info:
            parse_head(head)
        assert secret not in str(info.value)


# -- chunk sizes -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "size"),
    [
        (b"0", 0),
        (b"000", 0),
        (b"5", 5),
        (b"a", 10),
        (b"A", 10),
        (b"1f", 31),
        (b"1F", 31),
        (b"deadBEEF", 0xDEADBEEF),
        (b"ffffffffffffffff", 2**64 - 1),  # sixteen digits: the most accepted
        (b"5;name=value", 5),
        (b"5;a;b=c", 5),
        (b'5; name="quoted;value"', 5),
        (b"5 ;ext", 5),
        (b"5\t;ext", 5),
        (b" 5", 5),
        (b"5 ", 5),
        (b"\t1a\t", 26),
        (b"5\r", 5),
        (b"5;ext\r", 5),
    ],
)
def test_chunk_size(line: bytes, size: int) -> None:
    assert chunk_size(line) == size


@pytest.mark.parametrize(
    "line",
    [
        b"",
        b" ",
        b"\r",
        b";ext",
        b" ;ext",
        b"g",
        b"5g",
        b"0x5",
        b"-1",
        b"+1",
        b"5 5",
        b"1_0",
        b"\xd9\xa5",
        b"1" * 17,
        b"0" * 17,  # too long even if it says zero
    ],
)
def test_chunk_size_that_is_not_hexadecimal_is_malformed(line: bytes) -> None:
    with pytest.raises(TransportError) as info:
        chunk_size(line)
    assert info.value.kind == "malformed"


# -- request header blocks ---------------------------------------------------------------


@pytest.mark.parametrize(
    ("headers", "block"),
    [
        ({}, ""),
        ({"A": "b"}, "A: b\r\n"),
        (
            {"Content-Type": "application/json", "X-Y": ""},
            "Content-Type: application/json\r\nX-Y: \r\n",
        ),
        ({"Authorization": "Bearer sk-1:2"}, "Authorization: Bearer sk-1:2\r\n"),
        ({"X-Latin": "caf\xe9"}, "X-Latin: caf\xe9\r\n"),
    ],
)
def test_header_block(headers: dict[str, str], block: str) -> None:
    assert header_block(headers) == block


@pytest.mark.parametrize(
    "headers",
    [
        {"A": "b\r\nInjected: yes"},
        {"A": "b\nInjected: yes"},
        {"A": "b\rInjected: yes"},
        {"A": "b\r"},
        {"A": "\n"},
        {"A\r\nInjected": "yes"},
        {"A\n": "b"},
        {"\rA": "b"},
        {"Good": "ok", "Bad": "x\r\n"},
        {"Bad": "x\n", "Good": "ok"},
    ],
)
def test_header_block_refuses_a_line_break_inside_a_name_or_value(headers: dict[str, str]) -> None:
    with pytest.raises(TransportError) as info:
        header_block(headers)
    assert info.value.kind == "malformed"
