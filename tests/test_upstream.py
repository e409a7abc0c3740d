"""UpstreamCaller through the transport seam: the headers each call sends."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

import pytest

from minima_llm import MinimaLlmConfig, MinimaLlmFailure
from minima_llm.clock import FakeClock
from minima_llm.http import HttpResponse, StdlibTransport
from minima_llm.stats import LiveStats
from minima_llm.testing import MockServer
from minima_llm.types import Usage
from minima_llm.upstream import Completion, UpstreamCaller, parse_completion

BODY = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()


class RecordingTransport:
    """Answers every POST with one completion and keeps a copy of the headers it was given."""

    def __init__(self, statuses: list[int] | None = None) -> None:
        self.sent: list[dict[str, str]] = []
        self.statuses = statuses or []

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        self.sent.append(dict(headers))
        status = self.statuses.pop(0) if self.statuses else 200
        return HttpResponse(status, {}, BODY if status == 200 else b"{}")

    async def open_stream(self, *args: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def caller(transport: RecordingTransport, **config: Any) -> UpstreamCaller:
    cfg = MinimaLlmConfig(base_url="http://127.0.0.1:9/v1", model="m", rpm=0, **config)
    return UpstreamCaller(cfg, transport, FakeClock(), LiveStats())


async def test_a_per_call_key_does_not_leak_into_later_calls() -> None:
    transport = RecordingTransport()
    up = caller(transport, api_key="sk-configured")
    await up.complete("r1", "http://x/v1/chat/completions", {"model": "m"}, api_key="sk-caller")
    await up.complete("r2", "http://x/v1/chat/completions", {"model": "m"})
    assert [h["Authorization"] for h in transport.sent] == [
        "Bearer sk-caller",
        "Bearer sk-configured",
    ]


async def test_gzip_marks_only_the_compressed_call() -> None:
    transport = RecordingTransport()
    up = caller(transport, compress_gzip=True)
    await up.complete("r1", "http://x/v1/chat/completions", {"model": "m"})
    assert transport.sent[0]["Content-Encoding"] == "gzip"
    assert "Content-Encoding" not in up.headers


async def test_a_retry_after_a_first_failure_counts_both_attempts() -> None:
    transport = RecordingTransport(statuses=[503, 200])
    up = caller(transport, max_attempts=3, base_backoff_s=0.01, cooldown_floor_s=0.0)
    outcome = await up.complete("r1", "http://x/v1/chat/completions", {"model": "m"})
    assert isinstance(outcome, Completion) and outcome.text == "ok"
    assert len(transport.sent) == 2 and up.stats.retries == 1


async def test_attempts_and_timestamps_count_the_inline_first_attempt() -> None:
    transport = RecordingTransport(statuses=[503, 503, 503])
    up = caller(transport, max_attempts=2, base_backoff_s=0.01, cooldown_floor_s=0.0)
    failure = await up.complete("r1", "http://x/v1/chat/completions", {"model": "m"})
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.attempts == 2 and len(failure.attempt_timestamps) == 2
    assert failure.status == 503 and len(transport.sent) == 2
    permanent = await caller(RecordingTransport(statuses=[400])).complete(
        "r2", "http://x/v1/chat/completions", {"model": "m"}
    )
    assert isinstance(permanent, MinimaLlmFailure) and permanent.attempts == 1


def test_content_sent_as_parts_is_read_as_their_text() -> None:
    body = {
        "choices": [
            {
                "index": 0,
                "message": {
                    "role": "assistant",
                    "content": [{"type": "text", "text": "Bon"}, {"type": "text", "text": "jour"}],
                },
                "finish_reason": "stop",
            }
        ]
    }
    completion = parse_completion(HttpResponse(200, {}, json.dumps(body).encode()))
    assert completion.text == "Bonjour"


def test_a_pretty_printed_error_body_is_kept_whole_in_the_snippet() -> None:
    from minima_llm.upstream import SNIPPET, _error_parts

    error = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens. However, your "
            "messages resulted in 9000 tokens. Please reduce the length of the messages now.",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    body = json.dumps(error, indent=4).encode()
    assert len(body) > SNIPPET  # as api.openai.com sends it
    snippet, whole = _error_parts(body)
    assert json.loads(snippet) == error and whole == error["error"]
    html = b"<html>" + b"x" * 1000
    assert _error_parts(html) == (("<html>" + "x" * 1000)[:SNIPPET], None)


async def test_a_long_retry_after_waits_no_longer_than_the_wait_bound(mock: MockServer) -> None:
    # A 429 after a spent quota says "Retry-After: 3600"; the backoff was capped but
    # the pacer then held every request for the rest of the hour.
    mock.fail_next(1, status=429, headers={"Retry-After": "3600"})
    clock = FakeClock()
    cfg = MinimaLlmConfig(
        base_url=mock.url, model="m", rpm=0, max_backoff_s=5.0, cooldown_cap_s=7.0
    )
    transport = StdlibTransport(2)
    try:
        up = UpstreamCaller(cfg, transport, clock, LiveStats())
        payload = {"model": "m", "messages": [{"role": "user", "content": "hi"}]}
        outcome = await up.complete("r1", mock.url + "/chat/completions", payload)
    finally:
        await transport.aclose()
    assert isinstance(outcome, Completion)
    assert sum(clock.sleeps) <= 7.0, clock.sleeps


USAGE = '{"prompt_tokens": 11, "completion_tokens": 5}'
NESTED = '{"prompt_tokens": 999, "completion_tokens": 999}'


@pytest.mark.parametrize(
    "raw",
    [
        '{"id": "x", "choices": [], "usage": ' + USAGE + "}",
        # OpenAI's own order: usage, then plain values.
        '{"id": "x", "usage": '
        + USAGE
        + ', "service_tier": "default", "system_fingerprint": "fp"}',
        # A "usage" nested after the body's own must not stand in for it.
        '{"id": "x", "usage": ' + USAGE + ', "choices": [{"usage": ' + NESTED + "}]}",
        '{"id": "x", "choices": [{"usage": ' + NESTED + '}], "usage": ' + USAGE + "}",
        '{"usage": ' + USAGE + ', "note": "a } in a string"}',
    ],
)
def test_a_stored_bodys_usage_is_its_own(raw: str) -> None:
    from minima_llm.calls import usage_of

    assert json.loads(raw)["usage"] == json.loads(USAGE)  # the table is what it says
    assert usage_of(raw) == Usage(prompt_tokens=11, completion_tokens=5)


async def test_a_503_arriving_while_a_429_is_waited_out_holds_the_request_too() -> None:
    clock = FakeClock()
    sent_at: list[float] = []

    class Stamping(RecordingTransport):
        async def post(
            self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
        ) -> HttpResponse:
            sent_at.append(clock.now)
            return await super().post(url, body, headers, timeout_s)

    cfg = MinimaLlmConfig(base_url="http://127.0.0.1:9/v1", model="m", rpm=0, cooldown_cap_s=10.0)
    up = UpstreamCaller(cfg, Stamping(), clock, LiveStats())
    start = clock.now
    up.cooldown.bump(1.0)  # this key's 429: a second
    waiting = asyncio.ensure_future(
        up.complete("r", "http://x/v1/chat/completions", {"model": "m"})
    )
    await asyncio.sleep(0)  # into the wait: the fake clock's sleep yields once
    assert not sent_at
    up.overload.bump(3.0, clock.now)  # the server, overloaded, says 3 s more
    assert isinstance(await waiting, Completion)
    assert sent_at[0] >= start + 1.0 + 3.0 - 1e-9


def test_the_wait_a_caller_is_told_counts_its_own_429s_and_everyones_503s() -> None:
    up = caller(RecordingTransport(), api_key="sk-own", cooldown_cap_s=10.0)
    up.cooldown.bump(2.0)  # the configured key's 429
    assert up.cooling_s() == pytest.approx(2.0)
    assert up.cooling_s("sk-unseen") == 0.0  # not this key's quota
    up.limits_for("sk-other").cooldown.bump(5.0)
    assert up.cooling_s("sk-other") == pytest.approx(5.0)
    up.overload.bump(3.0)
    assert up.cooling_s("sk-unseen") == pytest.approx(3.0)
    assert up.cooling_s("sk-other") == pytest.approx(5.0)
