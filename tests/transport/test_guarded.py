"""GuardedTransport: which outcomes count against the upstream, and what an open breaker does."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

import pytest

from minima_llm.clock import FakeClock
from minima_llm.errors import TransportError
from minima_llm.http import GuardedTransport, HttpResponse
from minima_llm.resilience import CLOSED, OPEN, Breaker

URL = "http://upstream.example:8000/v1/chat/completions"


class Scripted:
    """Answers each call with the next scripted outcome: a status, or an exception to raise."""

    def __init__(self, *outcomes: int | BaseException) -> None:
        self.outcomes = list(outcomes)
        self.calls = 0

    async def _next(self) -> HttpResponse:
        self.calls += 1
        outcome = self.outcomes.pop(0)
        if isinstance(outcome, BaseException):
            raise outcome
        return HttpResponse(outcome, {}, b"{}")

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        return await self._next()

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> Any:
        return await self._next()

    async def aclose(self) -> None:
        self.outcomes.clear()


def guarded(*outcomes: int | BaseException, failures: int = 2) -> GuardedTransport:
    return GuardedTransport(Scripted(*outcomes), Breaker(failures, 5.0, FakeClock()))


async def outcomes_of(transport: GuardedTransport, n: int, stream: bool = False) -> list[Any]:
    """What each of ``n`` calls gave: a status, or the kind of the TransportError raised."""
    send = transport.open_stream if stream else transport.post
    out: list[Any] = []
    for _ in range(n):
        try:
            out.append((await send(URL, b"{}", {}, 10.0)).status)
        except TransportError as exc:
            out.append(exc.kind)
    return out


@pytest.mark.parametrize("stream", [False, True])
@pytest.mark.parametrize(
    "down",
    [
        TransportError("connect", "refused"),
        TransportError("reset", "dropped"),
        TransportError("timeout", "silent"),
        502,
        504,
    ],
    ids=["connect", "reset", "timeout", "502", "504"],
)
async def test_what_says_the_upstream_is_down_opens_it(
    down: int | TransportError, stream: bool
) -> None:
    transport = guarded(down, down, 200)
    first = down if isinstance(down, int) else down.kind
    assert await outcomes_of(transport, 3, stream) == [first, first, "unavailable"]
    assert transport.breaker.state == OPEN
    assert isinstance(transport.inner, Scripted) and transport.inner.calls == 2


@pytest.mark.parametrize(
    "unhappy",
    [503, 429, 500, 400, TransportError("malformed", "bad gzip"), TransportError("closed", "x")],
    ids=["503", "429", "500", "400", "malformed", "closed"],
)
async def test_overload_and_refusals_of_one_request_do_not(unhappy: int | TransportError) -> None:
    transport = guarded(*[unhappy] * 4)
    await outcomes_of(transport, 4)
    assert transport.breaker.state == CLOSED


async def test_an_answer_between_failures_keeps_it_closed() -> None:
    down = TransportError("connect", "refused")
    transport = guarded(down, 400, down, 200, down)
    await outcomes_of(transport, 5)
    assert transport.breaker.state == CLOSED and transport.breaker.streak == 1


async def test_the_refusal_says_why_and_for_how_long() -> None:
    transport = guarded(TransportError("connect", "Connect call failed"), failures=1)
    await outcomes_of(transport, 1)
    with pytest.raises(TransportError) as refused:
        await transport.post(URL, b"{}", {}, 10.0)
    assert refused.value.kind == "unavailable"
    assert str(refused.value) == (
        "the upstream failed 1 call in a row (last: Connect call failed);"
        " nothing is sent to it for 5.0s"
    )


async def test_a_cancelled_probe_frees_the_way_for_the_next() -> None:
    clock = FakeClock()
    breaker = Breaker(1, 5.0, clock)
    transport = GuardedTransport(
        Scripted(TransportError("connect", "x"), asyncio.CancelledError(), 200), breaker
    )
    await outcomes_of(transport, 1)
    clock.advance(5.0)
    with pytest.raises(asyncio.CancelledError):
        await transport.post(URL, b"{}", {}, 10.0)
    assert await outcomes_of(transport, 1) == [200]
    assert breaker.state == CLOSED


async def test_it_logs_the_trip_and_the_recovery_once_each(
    caplog: pytest.LogCaptureFixture,
) -> None:
    clock = FakeClock()
    breaker = Breaker(2, 5.0, clock)
    down = TransportError("connect", "refused")
    transport = GuardedTransport(Scripted(down, down, down, 200, 200), breaker)
    with caplog.at_level(logging.INFO, logger="minima_llm"):
        await outcomes_of(transport, 3)
        clock.advance(5.0)
        await outcomes_of(transport, 1)  # a failed probe: no second warning
        clock.advance(10.0)
        await outcomes_of(transport, 2)
    lines = [(r.levelname, r.getMessage()) for r in caplog.records]
    assert lines == [
        (
            "WARNING",
            "upstream http://upstream.example:8000 failed 2 calls in a row (last: refused):"
            " failing calls at once, probing it again in 5s",
        ),
        ("INFO", "upstream http://upstream.example:8000 answers again: sending to it again"),
    ]


async def test_close_closes_the_inner_transport() -> None:
    transport = guarded(200, 200)
    await transport.aclose()
    assert isinstance(transport.inner, Scripted) and transport.inner.outcomes == []
