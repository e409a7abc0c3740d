"""Tables for what rate-limit and Retry-After headers mean."""

from __future__ import annotations

import email.utils

import pytest

from minima_llm.resilience import (
    RateLimitInfo,
    lower_headers,
    parse_duration,
    parse_rate_limits,
    parse_retry_after,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1h2m3.5s", 3723.5),
        ("0.5", 0.5),
        ("250ms", 0.25),
        ("1m", 60.0),
        ("1.5m30s", 120.0),
        ("2h", 7200.0),
        (".5s", 0.5),
        ("0s", 0.0),
        ("0", 0.0),
        ("30", 30.0),
        (" 2s ", 2.0),
        ("1S", 1.0),
        ("500us", 0.0005),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    assert parse_duration(text) == pytest.approx(seconds)


@pytest.mark.parametrize(
    "text",
    [None, "", "   ", "garbage", "-1", "-1s", "1m-1s", "s", "1x", "1h 2m", "nan", "inf", "1s2"],
)
def test_parse_duration_rejects(text: str | None) -> None:
    assert parse_duration(text) is None


NOW = email.utils.parsedate_to_datetime("Wed, 21 Oct 2015 07:28:00 GMT").timestamp()


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({"retry-after": "3"}, 3.0),
        ({"retry-after": "0"}, 0.0),
        ({"retry-after": "1.5"}, 1.5),
        ({"Retry-After": "7"}, 7.0),
        ({"RETRY-AFTER": "2.25"}, 2.25),
        ({"retry-after": "Wed, 21 Oct 2015 07:28:30 GMT"}, 30.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:30:00 GMT"}, 120.0),
        ({"retry-after": "Wed, 21 Oct 2015 07:27:00 GMT"}, 0.0),  # in the past
        ({"retry-after-ms": "250"}, 0.25),
        ({"Retry-After-Ms": "1500", "Retry-After": "9"}, 1.5),
        ({"retry-after-ms": "soon", "retry-after": "4"}, 4.0),
        ({"retry-after-ms": "-5", "retry-after": "4"}, 4.0),
        ({"retry-after": "garbage"}, None),
        ({"retry-after": "-3"}, None),
        ({"retry-after": ""}, None),
        ({"content-type": "application/json"}, None),
        ({}, None),
    ],
)
def test_parse_retry_after(headers: dict[str, str], seconds: float | None) -> None:
    result = parse_retry_after(headers, now=NOW)
    if seconds is None:
        assert result is None
    else:
        assert result == pytest.approx(seconds)


def test_parse_retry_after_accepts_lowered_headers() -> None:
    headers = lower_headers([("Retry-After-MS", "100"), ("X-Other", "1")])
    assert headers == {"retry-after-ms": "100", "x-other": "1"}
    assert parse_retry_after(headers) == pytest.approx(0.1)


OPENAI_HEADERS = {
    "X-RateLimit-Limit-Requests": "60",
    "x-ratelimit-remaining-requests": "59",
    "x-ratelimit-reset-requests": "1s",
    "x-ratelimit-limit-tokens": "150000",
    "X-Ratelimit-Remaining-Tokens": "149984",
    "x-ratelimit-reset-tokens": "6m0s",
}


def test_parse_rate_limits_openai_headers() -> None:
    info = parse_rate_limits(OPENAI_HEADERS)
    assert info == RateLimitInfo(
        limit_requests=60,
        remaining_requests=59,
        reset_requests_s=1.0,
        limit_tokens=150000,
        remaining_tokens=149984,
        reset_tokens_s=360.0,
    )
    assert not info.empty
    assert parse_rate_limits(lower_headers(OPENAI_HEADERS)) == info


@pytest.mark.parametrize("headers", [{}, {"content-type": "application/json", "retry-after": "1"}])
def test_parse_rate_limits_without_headers(headers: dict[str, str]) -> None:
    info = parse_rate_limits(headers)
    assert info.empty
    assert info == RateLimitInfo()


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ({"x-ratelimit-remaining-requests": "0"}, RateLimitInfo(remaining_requests=0)),
        (
            {"x-ratelimit-limit-requests": "abc", "x-ratelimit-remaining-requests": "-1"},
            RateLimitInfo(),
        ),
        (
            {"x-ratelimit-limit-requests": "100", "x-ratelimit-reset-requests": "soon"},
            RateLimitInfo(limit_requests=100),
        ),
        (
            {"x-ratelimit-limit-tokens": "1000", "x-ratelimit-reset-tokens": "20ms"},
            RateLimitInfo(limit_tokens=1000, reset_tokens_s=0.02),
        ),
    ],
)
def test_parse_rate_limits_partial_or_unreadable(
    headers: dict[str, str], expected: RateLimitInfo
) -> None:
    assert parse_rate_limits(headers) == expected


EPOCH_NOW = 1_750_000_000.0


@pytest.mark.parametrize(
    ("reset", "seconds"),
    [
        (str(int(EPOCH_NOW) + 3), 3.0),  # a Unix timestamp in seconds
        (str(int(EPOCH_NOW * 1000) + 2500), 2.5),  # in milliseconds
        (str(int(EPOCH_NOW) - 60), 0.0),  # already past
        ("86400", 86400.0),  # a long wait is still a wait
        ("2m59.56s", 179.56),
    ],
)
def test_reset_sent_as_a_timestamp_is_read_as_the_time_left(reset: str, seconds: float) -> None:
    headers = {
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": reset,
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-reset-tokens": reset,
    }
    info = parse_rate_limits(headers, now=EPOCH_NOW)
    assert info.reset_requests_s == pytest.approx(seconds)
    assert info.reset_tokens_s == pytest.approx(seconds)
