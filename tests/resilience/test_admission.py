"""Admission: with ``queue_limit`` set, a new request that would wait past it is refused at once."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Mapping
from typing import Any

from minima_llm import MinimaLlmConfig, MinimaLlmFailure
from minima_llm.clock import SYSTEM_CLOCK
from minima_llm.http import HttpResponse
from minima_llm.stats import LiveStats
from minima_llm.upstream import QUEUE_FULL, Completion, UpstreamCaller

BODY = json.dumps({"choices": [{"message": {"content": "ok"}}]}).encode()
URL = "http://x/v1/chat/completions"


class GatedTransport:
    """Holds every POST until ``open`` is set; answers with ``statuses`` in turn, then 200."""

    def __init__(
        self, statuses: list[int] | None = None, headers: Mapping[str, str] | None = None
    ) -> None:
        self.open = asyncio.Event()
        self.sent = 0
        self.statuses = statuses or []
        self.headers = headers or {}

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        self.sent += 1
        if self.statuses:
            status = self.statuses.pop(0)
            return HttpResponse(status, {}, b"{}")
        await self.open.wait()
        return HttpResponse(200, self.headers, BODY)

    async def open_stream(self, *args: Any) -> Any:
        raise NotImplementedError

    async def aclose(self) -> None:
        pass


def caller(transport: GatedTransport, limit: int | None, **config: Any) -> UpstreamCaller:
    config = {"rpm": 0, **config}
    cfg = MinimaLlmConfig(base_url="http://127.0.0.1:9/v1", model="m", **config)
    up = UpstreamCaller(cfg, transport, SYSTEM_CLOCK, LiveStats())
    up.queue_limit = limit
    return up


async def warmed(transport: GatedTransport, limit: int | None, **config: Any) -> UpstreamCaller:
    """A caller past its first call, which learns the server's pacing while the others wait."""
    up = caller(transport, limit, **config)
    transport.open.set()
    assert isinstance(await up.complete("warm", URL, {"model": "m"}), Completion)
    transport.open.clear()
    transport.sent = 0
    return up


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def refusal(outcome: Any) -> bool:
    return isinstance(outcome, MinimaLlmFailure) and outcome.error_type == QUEUE_FULL


async def test_past_the_limit_new_requests_are_refused_without_being_sent() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=2, max_outstanding=1)
    calls = [asyncio.ensure_future(up.complete(f"r{i}", URL, {"model": "m"})) for i in range(6)]
    await settle()
    assert (transport.sent, up.queued, up.refused) == (1, 2, 3)
    refused = [c.result() for c in calls if c.done()]
    assert len(refused) == 3
    for failure in refused:
        assert refusal(failure)
        assert failure.attempts == 0 and failure.attempt_timestamps == ()
        assert failure.status is None and "2 requests already wait" in failure.message
    transport.open.set()
    answered = await asyncio.gather(*(c for c in calls if not c.done()))
    assert len(answered) == 3 and all(isinstance(a, Completion) for a in answered)
    assert (transport.sent, up.queued, up.stats.failures) == (3, 0, 3)


async def test_a_burst_on_a_fresh_caller_is_not_refused_while_slots_stand_free() -> None:
    # All but the first wait for the first answer's rate limits: a wait, with slots to go to.
    transport = GatedTransport()
    up = caller(transport, limit=8, max_outstanding=64)
    calls = [asyncio.ensure_future(up.complete(f"r{i}", URL, {"model": "m"})) for i in range(40)]
    await settle()
    assert up.refused == 0 and up.queued == 39
    transport.open.set()
    assert all(isinstance(a, Completion) for a in await asyncio.gather(*calls))


async def test_without_a_limit_every_request_waits_its_turn() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=None, max_outstanding=1)
    calls = [asyncio.ensure_future(up.complete(f"r{i}", URL, {"model": "m"})) for i in range(50)]
    await settle()
    assert (up.queued, up.refused) == (49, 0)
    transport.open.set()
    assert all(isinstance(a, Completion) for a in await asyncio.gather(*calls))


async def test_a_retry_is_never_refused_though_the_queue_is_full() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=1, max_outstanding=1, base_backoff_s=0.01, jitter=0.0)
    transport.statuses = [500]  # retryable, and no cooldown: the retry waits for the slot
    retried = asyncio.ensure_future(up.complete("retried", URL, {"model": "m"}))
    await settle()  # sent, refused with a 500, backing off
    holder = asyncio.ensure_future(up.complete("holder", URL, {"model": "m"}))
    await settle()  # holds the only slot
    queued = asyncio.ensure_future(up.complete("queued", URL, {"model": "m"}))
    await settle()
    assert up.queued == 1  # the queue is full...
    await asyncio.sleep(0.1)
    assert up.queued == 2 and not retried.done()  # ...and the retry joined it all the same
    assert refusal(await up.complete("late", URL, {"model": "m"}))
    transport.open.set()
    outcomes = await asyncio.gather(retried, holder, queued)
    assert all(isinstance(o, Completion) for o in outcomes)
    assert (up.refused, up.stats.retries, transport.sent) == (1, 1, 4)


async def test_requests_held_by_a_cooldown_count_past_the_free_slots() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=1, max_outstanding=1, cooldown_floor_s=0.0)
    transport.open.set()
    up.cooldown.pause(0.2)
    held = [asyncio.ensure_future(up.complete(f"held{i}", URL, {"model": "m"})) for i in range(2)]
    await settle()
    assert up.queued == 2 and transport.sent == 0  # one for the free slot, one past it
    assert refusal(await up.complete("refused", URL, {"model": "m"}))
    assert all(isinstance(h, Completion) for h in await asyncio.gather(*held))
    assert transport.sent == 2


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=1, max_outstanding=1)
    first = asyncio.ensure_future(up.complete("r1", URL, {"model": "m"}))
    waiter = asyncio.ensure_future(up.complete("r2", URL, {"model": "m"}))
    await settle()
    assert up.queued == 1
    waiter.cancel()
    await settle()
    assert up.queued == 0
    again = asyncio.ensure_future(up.complete("r3", URL, {"model": "m"}))
    await settle()
    assert up.queued == 1 and up.refused == 0
    transport.open.set()
    assert isinstance(await first, Completion) and isinstance(await again, Completion)


async def test_a_new_request_waits_for_a_slot_no_longer_than_the_queue_wait() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=10, max_outstanding=1)
    up.queue_wait_s = 0.1
    holder = asyncio.ensure_future(up.complete("holder", URL, {"model": "m"}))
    await settle()
    started = asyncio.get_running_loop().time()
    late = await up.complete("late", URL, {"model": "m"})
    waited = asyncio.get_running_loop().time() - started
    assert refusal(late) and "within 0.1s" in late.message and 0.09 <= waited < 1.0
    assert (up.queued, up.refused, transport.sent) == (0, 1, 1)
    transport.open.set()
    assert isinstance(await holder, Completion)
    # The slot the refused request waited for was not kept by it: the next call gets it.
    after = await asyncio.wait_for(up.complete("after", URL, {"model": "m"}), 2.0)
    assert isinstance(after, Completion)


# A server stating a token limit, with its bucket full: every request is paced by tokens.
TOKEN_LIMIT = {
    "x-ratelimit-limit-tokens": "60000",
    "x-ratelimit-remaining-tokens": "60000",
    "x-ratelimit-reset-tokens": "0s",
}
# Charged 5,000 tokens, far more than a second's refill (900).
LARGE = {"model": "m", "max_tokens": 5000}


async def test_a_request_refused_before_it_was_sent_gives_its_tokens_back() -> None:
    transport = GatedTransport(headers=TOKEN_LIMIT)
    up = await warmed(transport, limit=10, max_outstanding=1)
    assert up.tokens.limit == 60000
    up.queue_wait_s = 0.1
    holder = asyncio.ensure_future(up.complete("holder", URL, LARGE))
    await settle()
    before = up.tokens.level()
    late = await up.complete("late", URL, LARGE)  # charged, then no slot within 0.1 s
    assert refusal(late) and transport.sent == 1
    # Back to where it was, plus the refill while it waited; kept, it would be 5,000 short.
    assert before <= up.tokens.level() <= before + 200
    transport.open.set()
    assert isinstance(await holder, Completion)


async def test_a_request_cancelled_before_it_was_sent_gives_its_tokens_back() -> None:
    transport = GatedTransport(headers=TOKEN_LIMIT)
    up = await warmed(transport, limit=10, max_outstanding=1)
    holder = asyncio.ensure_future(up.complete("holder", URL, LARGE))
    await settle()
    before = up.tokens.level()
    waiter = asyncio.ensure_future(up.complete("waiter", URL, LARGE))
    await settle()
    assert up.tokens.level() < before - 4000  # charged while it waits for the slot
    waiter.cancel()
    await settle()
    assert before <= up.tokens.level() <= before + 200
    assert up.queued == 0 and transport.sent == 1
    transport.open.set()
    assert isinstance(await holder, Completion)


async def test_a_new_request_waits_for_tokens_no_longer_than_the_queue_wait() -> None:
    empty = {"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "60s"}
    transport = GatedTransport(headers={**TOKEN_LIMIT, **empty})
    up = await warmed(transport, limit=10)
    up.queue_wait_s = 0.1
    before = up.tokens.level()
    started = asyncio.get_running_loop().time()
    # 5,000 tokens: five seconds of refill. Bounded, so a regression fails rather than hangs.
    late = await asyncio.wait_for(up.complete("late", URL, LARGE), 3.0)
    waited = asyncio.get_running_loop().time() - started
    assert refusal(late) and "within 0.1s" in late.message and 0.09 <= waited < 1.0
    assert (up.queued, up.refused, transport.sent) == (0, 1, 0)
    # It left the token queue uncharged: the next request is not stuck behind it.
    assert up.tokens.level() >= before
    assert not up.tokens._queue


async def test_a_new_request_waits_for_its_pace_no_longer_than_the_queue_wait() -> None:
    transport = GatedTransport()
    up = await warmed(transport, limit=10, rpm=6)  # one start every ten seconds
    up.queue_wait_s = 0.1
    transport.open.set()
    started = asyncio.get_running_loop().time()
    late = await asyncio.wait_for(up.complete("late", URL, {"model": "m"}), 3.0)
    waited = asyncio.get_running_loop().time() - started
    assert refusal(late) and 0.09 <= waited < 1.0
    assert (up.queued, up.refused, transport.sent) == (0, 1, 0)
