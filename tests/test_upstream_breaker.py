"""UpstreamCaller with a breaker: what counts against the upstream, and what an open breaker does."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from minima_llm import MinimaLlmConfig, MinimaLlmFailure
from minima_llm.clock import FakeClock
from minima_llm.errors import TransportError
from minima_llm.http import HttpResponse
from minima_llm.resilience import CLOSED, OPEN, Breaker
from minima_llm.stats import LiveStats
from minima_llm.upstream import UPSTREAM_DOWN, Completion, UpstreamCaller, UpstreamStream

URL = "http://127.0.0.1:9/v1/chat/completions"
BODY = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
CHUNK = b'data: {"choices":[{"index":0,"delta":{"content":"ok"}}]}\n'
Outcome = int | BaseException


class Streamed:
    """A streaming answer: its status, and a body of one chunk (or an error body).

    ``silent``: headers, then nothing, as from a server whose engine hangs.
    """

    def __init__(self, status: int, silent: bool = False, read_timeout: bool = False) -> None:
        self.status = status
        self.headers: dict[str, str] = {}
        self.silent = silent
        self.read_timeout = read_timeout

    async def lines(self) -> Any:
        if self.silent:
            await asyncio.Event().wait()
        if self.read_timeout:  # the transport's own per-read timeout, before any line
            raise TransportError("timeout", "timed out after 0.05s")
        for line in (CHUNK, b"\n", b"data: [DONE]\n"):
            yield line

    async def read(self) -> bytes:
        return b"{}"

    async def aclose(self) -> None:
        pass


class Scripted:
    """Answers each call with the next outcome: a status, or an exception to raise.

    ``hold`` makes the next call wait for it first, so a test can cancel a call mid-send.
    """

    def __init__(
        self, *outcomes: Outcome, silent_streams: bool = False, read_timeouts: bool = False
    ) -> None:
        self.outcomes = list(outcomes)
        self.silent_streams = silent_streams
        self.read_timeouts = read_timeouts
        self.calls = 0
        self.hold: asyncio.Event | None = None
        self.held = asyncio.Event()  # set once a call waits on ``hold``

    async def _next(self) -> int:
        self.calls += 1
        if self.hold is not None:
            self.held.set()
            await self.hold.wait()
        outcome = self.outcomes.pop(0) if self.outcomes else 200
        if isinstance(outcome, BaseException):
            raise outcome
        return outcome

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        status = await self._next()
        return HttpResponse(status, {}, BODY if status == 200 else b"{}")

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Streamed:
        return Streamed(await self._next(), self.silent_streams, self.read_timeouts)

    async def aclose(self) -> None:
        pass


def caller(
    transport: Scripted, threshold: int = 2, **config: Any
) -> tuple[UpstreamCaller, Breaker, FakeClock]:
    """A caller with the default pacing (600 RPM) and a breaker on a fake clock."""
    fields: dict[str, Any] = {"max_attempts": 1, "base_backoff_s": 0.01, **config}
    cfg = MinimaLlmConfig(base_url="http://127.0.0.1:9/v1", model="m", **fields)
    clock = FakeClock()
    up = UpstreamCaller(cfg, transport, clock, LiveStats())
    return up, up.use_breaker(threshold, 5.0), clock


async def tripped() -> tuple[UpstreamCaller, Breaker, FakeClock, Scripted]:
    """A caller whose breaker two refused connections have just opened."""
    transport = Scripted(DOWN["connect"], DOWN["connect"])
    up, breaker, clock = caller(transport)
    await call(up)
    await call(up)
    assert breaker.state == OPEN
    return up, breaker, clock, transport


async def call(up: UpstreamCaller, stream: bool = False) -> Any:
    """One request: the status or error type it ended with."""
    if stream:
        opened = await up.open_stream("r", URL, {"model": "m"})
        if isinstance(opened, UpstreamStream):
            await opened.aclose()
            return 200
        return opened.status or opened.error_type
    result = await up.complete("r", URL, {"model": "m"})
    if isinstance(result, Completion):
        return 200
    return result.status or result.error_type


DOWN = {
    "connect": TransportError("connect", "refused"),
    "timeout": TransportError("timeout", "silent"),
    "502": 502,
}
NOT_DOWN = {
    "503": 503,
    "429": 429,
    "504": 504,
    "500": 500,
    "400": 400,
    "malformed": TransportError("malformed", "bad gzip"),
    "too_large": TransportError("too_large", "huge"),
    "closed": TransportError("closed", "closed"),
    # A live server cuts answers halfway too.
    "reset": TransportError("reset", "dropped"),
}


@pytest.mark.parametrize("stream", [False, True], ids=["whole", "stream"])
@pytest.mark.parametrize("down", DOWN.values(), ids=DOWN.keys())
async def test_what_says_the_upstream_is_down_opens_it(down: Outcome, stream: bool) -> None:
    transport = Scripted(down, down)
    up, breaker, _ = caller(transport)
    results = [await call(up, stream) for _ in range(3)]
    assert results[2] == UPSTREAM_DOWN and breaker.state == OPEN
    assert transport.calls == 2


@pytest.mark.parametrize("unhappy", NOT_DOWN.values(), ids=NOT_DOWN.keys())
async def test_overload_and_refusals_of_one_request_do_not(unhappy: Outcome) -> None:
    up, breaker, _ = caller(Scripted(*[unhappy] * 4))
    assert UPSTREAM_DOWN not in [await call(up) for _ in range(4)]
    assert breaker.state == CLOSED


async def test_an_answer_between_failures_starts_the_count_again() -> None:
    down = DOWN["connect"]
    up, breaker, _ = caller(Scripted(down, 400, down, TransportError("too_large", "x"), down))
    await asyncio.gather(*(call(up) for _ in range(5)))
    assert breaker.state == CLOSED and breaker.streak == 1


async def test_a_refused_call_waits_for_nothing_and_sends_nothing() -> None:
    # The default 600 RPM: a refusal that first waited its turn would pace 30 refusals
    # over three seconds, and each would spend a pacing slot of a real call.
    up, breaker, clock, transport = await tripped()
    before, waited = clock.now, list(clock.sleeps)
    failures = await asyncio.gather(*(up.complete("r", URL, {"model": "m"}) for _ in range(30)))
    assert all(isinstance(f, MinimaLlmFailure) for f in failures)
    failure = failures[0]
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.error_type == UPSTREAM_DOWN and failure.status is None
    assert failure.attempts == 0 and failure.attempt_timestamps == ()
    assert failure.message.startswith("the upstream is down (last failure: refused);")
    assert clock.now == before and clock.sleeps == waited
    assert transport.calls == 2 and up.stats.in_flight == 0 and up.queued == 0
    assert up.in_flight_limit == up.cfg.max_outstanding
    assert breaker.rejected == 30


async def test_retries_under_way_are_cut_short() -> None:
    transport = Scripted(*[DOWN["connect"]] * 10)
    up, _, clock = caller(transport, threshold=3, max_attempts=10)
    failure = await up.complete("r", URL, {"model": "m"})
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.error_type == UPSTREAM_DOWN and failure.attempts == 3
    assert len(failure.attempt_timestamps) == 3 and transport.calls == 3
    # No backoff after the third attempt, which tripped it: the clock stands where it went out.
    assert clock.now == failure.attempt_timestamps[-1]


async def test_streams_are_judged_at_their_first_chunk_not_their_headers() -> None:
    # 200 and SSE headers, then nothing: a hung engine behind a live HTTP front.
    transport = Scripted(silent_streams=True)
    up, breaker, clock = caller(transport, timeout_s=0.05)
    assert [await call(up, stream=True) for _ in range(3)] == [408, 408, UPSTREAM_DOWN]
    clock.advance(5.0)
    assert await call(up, stream=True) == 408  # the probe: headers, no chunk
    assert breaker.state == OPEN and transport.calls == 3
    transport.silent_streams = False
    clock.advance(breaker.retry_in())
    assert await call(up, stream=True) == 200 and breaker.state == CLOSED


async def test_a_read_timeout_before_the_first_chunk_is_a_timeout_not_an_answer() -> None:
    # The transport's per-read timeout can fire before the first-chunk bound does: it
    # reached the caller as a 502 "stream broke" and closed the breaker as an answer.
    transport = Scripted(read_timeouts=True)
    up, breaker, clock = caller(transport, timeout_s=5.0)
    assert [await call(up, stream=True) for _ in range(3)] == [408, 408, UPSTREAM_DOWN]
    clock.advance(5.0)
    assert await call(up, stream=True) == 408  # the probe
    assert breaker.state == OPEN


class LongAndShort(Scripted):
    """Calls marked long wait for ``release`` and then time out; the others answer at once."""

    def __init__(self, long_ones: int) -> None:
        super().__init__()
        self.release = asyncio.Event()
        self.long_ones = long_ones
        self.all_waiting = asyncio.Event()

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        self.calls += 1
        if self.calls <= self.long_ones:
            if self.calls == self.long_ones:
                self.all_waiting.set()
            await self.release.wait()
            raise TransportError("timeout", "timed out")
        return HttpResponse(200, {}, BODY)


async def test_long_generations_timing_out_beside_quick_answers_do_not_trip_it() -> None:
    transport = LongAndShort(4)
    up, breaker, clock = caller(transport, rpm=0)
    long_calls = [asyncio.ensure_future(call(up)) for _ in range(4)]
    await asyncio.wait_for(transport.all_waiting.wait(), 5)
    clock.advance(1.0)
    assert await call(up) == 200  # sent after them, answered before them
    transport.release.set()
    assert await asyncio.gather(*long_calls) == [408] * 4
    assert breaker.state == CLOSED and breaker.streak == 0


async def test_a_probe_cancelled_mid_send_lets_the_next_call_probe() -> None:
    up, breaker, clock, transport = await tripped()
    clock.advance(5.0)
    transport.hold = asyncio.Event()
    probe = asyncio.ensure_future(call(up))
    await asyncio.wait_for(transport.held.wait(), 5)
    refused = await up.complete("r", URL, {"model": "m"})
    assert isinstance(refused, MinimaLlmFailure) and breaker.retry_in() == 1.0
    assert refused.message.endswith("one call is probing it now")  # the probe is out
    probe.cancel()
    with pytest.raises(asyncio.CancelledError):
        await probe
    transport.hold = None
    assert await call(up) == 200  # the next probe
    assert breaker.state == CLOSED and up.stats.in_flight == 0


async def test_it_logs_the_trip_and_the_recovery_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    down = DOWN["connect"]
    up, _, clock = caller(Scripted(down, down, down))
    with caplog.at_level(logging.INFO, logger="minima_llm"):
        for _ in range(3):
            await call(up)
        clock.advance(5.0)
        assert await call(up) == "ConnectionError"  # a failed probe: no second warning
        clock.advance(10.0)
        assert [await call(up), await call(up)] == [200, 200]
    lines = [(r.levelname, r.getMessage()) for r in caplog.records if r.name == "minima_llm"]
    assert lines == [
        (
            "WARNING",
            "upstream http://127.0.0.1:9/v1 failed 2 calls in a row (last: refused):"
            " failing calls at once, probing it again in 5s",
        ),
        ("INFO", "upstream http://127.0.0.1:9/v1 answers again: sending to it again"),
    ]


async def test_the_breaker_runs_on_the_callers_clock() -> None:
    up, breaker, clock = caller(Scripted())
    assert breaker.clock is clock
    assert up.use_breaker(3, 1.0) is up.breaker and up.breaker is not breaker
