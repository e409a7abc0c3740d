"""Token pacing: estimates, the local bucket kept in step with the server's, FIFO waits, cancellation."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest

from minima_llm.clock import SYSTEM_CLOCK, FakeClock
from minima_llm.resilience import Charge, RateLimitInfo, TokenPacer, estimate_tokens
from minima_llm.resilience import tokens as tokens_module

# 60,000 a minute: 1,000 a second before the safety margin.
LIMIT = 60_000
RATE = LIMIT * tokens_module.SAFETY / 60


def limit(left: int, reset_s: float | None = None) -> RateLimitInfo:
    """The token headers of an answer: the limit, what is left, and when the bucket is full."""
    if reset_s is None:
        reset_s = (LIMIT - left) / 1000
    return RateLimitInfo(limit_tokens=LIMIT, remaining_tokens=left, reset_tokens_s=reset_s)


def learned(left: int = 0, reset_s: float | None = None) -> tuple[TokenPacer, FakeClock]:
    clock = FakeClock()
    pacer = TokenPacer(clock)
    pacer.observe(limit(left, reset_s), clock.monotonic(), None)
    return pacer, clock


@pytest.mark.parametrize(
    ("payload", "tokens"),
    [
        ({"messages": [{"role": "user", "content": "x" * 400}]}, 100),
        ({"messages": [{"role": "user", "content": "x" * 401}], "max_tokens": 50}, 151),
        ({"messages": [{"role": "user", "content": "abcd"}], "max_tokens": 10, "n": 3}, 31),
        ({"messages": [{"content": [{"type": "text", "text": "x" * 80}]}]}, 20),
        ({"messages": [{"content": "x" * 40}], "max_completion_tokens": 7, "max_tokens": 99}, 17),
        ({"prompt": ["x" * 40, "y" * 40]}, 20),
        ({"prompt": [1, 2, 3, 4, 5]}, 5),  # token ids count one each
        ({"input": "x" * 400}, 100),
        ({"messages": [{"role": "user", "content": None}]}, 0),
        ({"messages": [{"content": "abcd"}], "max_tokens": True, "n": "2"}, 1),
    ],
)
def test_estimate_counts_text_at_four_characters_a_token_plus_max_tokens(
    payload: dict[str, object], tokens: int
) -> None:
    assert estimate_tokens(payload) == tokens


async def test_nothing_is_paced_until_the_server_states_a_token_limit() -> None:
    clock = FakeClock()
    pacer = TokenPacer(clock)
    pacer.observe(RateLimitInfo(limit_requests=500, remaining_requests=3), clock.now, None)
    assert pacer.limit is None
    pacer.observe(
        RateLimitInfo(limit_tokens=LIMIT, remaining_tokens=10, reset_tokens_s=3600.0),
        clock.now,
        None,
    )
    assert pacer.limit is None  # a budget for the hour or day, not a per-minute rate


async def test_a_request_waits_for_the_tokens_it_will_be_charged() -> None:
    pacer, clock = learned(left=300)
    start = clock.now
    await pacer.acquire(200)
    assert clock.now == start  # 300 were left
    await pacer.acquire(500)  # 100 left: 400 more at RATE a second
    assert clock.now - start == pytest.approx(400 / RATE, abs=tokens_module.RECHECK_S)


async def test_the_bucket_learned_from_reset_bounds_what_idle_time_refills() -> None:
    # 500 left and full in 1.5 s at 1,000 a second: it holds 2,000, not a minute's 60,000.
    pacer, clock = learned(left=500, reset_s=1.5)
    assert pacer.capacity == pytest.approx(2000)
    clock.advance(600.0)
    assert pacer.level() == pytest.approx(2000)
    await pacer.acquire(10_000)  # more than it ever holds: sent once it is full
    assert pacer.level() == pytest.approx(0)


async def test_waits_are_first_in_first_out_so_a_large_prompt_is_not_starved() -> None:
    pacer, clock = learned(left=0)
    order: list[str] = []

    async def send(name: str, cost: int) -> None:
        await pacer.acquire(cost)
        order.append(name)

    await asyncio.gather(send("large", 1500), *(send(f"small{i}", 50) for i in range(5)))
    assert order == ["large", "small0", "small1", "small2", "small3", "small4"]
    assert clock.now - 1000.0 == pytest.approx(1750 / RATE, abs=2 * tokens_module.RECHECK_S)


async def test_an_answer_sets_the_level_less_what_was_sent_after_its_request() -> None:
    pacer, clock = learned(left=5000)
    first = await pacer.acquire(1000)
    sent_at = clock.now
    second = await pacer.acquire(1000)
    assert second == Charge(1000.0, 2000.0)
    clock.advance(0.5)
    # The first request's answer: the server counted it (left 4,000 at admission)
    # but not the second, which went after it.
    pacer.observe(limit(4000), sent_at, first)
    assert pacer.level() == pytest.approx(4000 + 0.5 * RATE - 1000)


async def test_a_refusal_teaches_what_the_server_charges_past_the_estimate() -> None:
    pacer, clock = learned(left=1000)
    charge = await pacer.acquire(1000)
    # Refused: 1,000 were left, and it would fit in 0.04 s: the server charges 1,040.
    pacer.observe(limit(1000), clock.now, charge, refused=True, retry_after=0.04)
    assert pacer.extra == pytest.approx(40)
    assert (await pacer.acquire(1000)).tokens == pytest.approx(1040)
    answered = await pacer.acquire(1)
    pacer.observe(limit(5000), clock.now, answered)
    assert pacer.extra == pytest.approx(40 * tokens_module.EXTRA_FADE)


async def test_a_refusal_when_too_little_was_left_does_not_raise_the_estimate() -> None:
    pacer, clock = learned(left=1000)
    charge = await pacer.acquire(1000)
    # Another client spent the tokens: the level was wrong, not the charge.
    pacer.observe(limit(10), clock.now, charge, refused=True, retry_after=None)
    assert pacer.extra == 0.0
    assert pacer.level() == pytest.approx(10)


async def test_a_cancelled_waiter_hands_the_turn_on() -> None:
    pacer, clock = learned(left=0)
    head = asyncio.create_task(pacer.acquire(5000))
    behind = asyncio.create_task(pacer.acquire(10))
    await asyncio.sleep(0)
    head.cancel()
    with pytest.raises(asyncio.CancelledError):
        await head
    await asyncio.wait_for(behind, 5)
    assert clock.now - 1000.0 < 1.0  # it waited for its own 10 tokens, not the 5,000
    assert repr(pacer).startswith("<TokenPacer limit=60000/min") and "queued=0" in repr(pacer)


def test_a_waiter_left_by_an_ended_loop_does_not_block_the_next_one() -> None:
    clock = FakeClock()
    pacer = TokenPacer(clock)

    async def strand() -> None:
        pacer.observe(limit(0), clock.now, None)
        asyncio.get_running_loop().create_task(pacer.acquire(10**6))
        await asyncio.sleep(0)

    loop = asyncio.new_event_loop()
    loop.run_until_complete(strand())
    loop.close()  # the waiter's task never ran its cleanup

    async def later() -> float:
        clock.advance(100.0)
        await pacer.acquire(10)
        return clock.now

    moved = clock.now
    assert asyncio.run(later()) == pytest.approx(moved + 100.0)


async def test_a_refusal_by_the_request_limit_teaches_nothing_of_the_charge() -> None:
    # OpenAI sends token headers on every 429: one for requests, with tokens to spare,
    # once set the extra to the whole bucket, and every request waited a minute.
    pacer, clock = learned(left=50_000)
    charge = await pacer.acquire(600)
    spare = RateLimitInfo(
        limit_tokens=LIMIT, remaining_tokens=49_000, reset_tokens_s=1.0, remaining_requests=0
    )
    pacer.observe(spare, clock.now, charge, refused=True, retry_after=0.12)
    assert pacer.extra == 0.0


async def test_one_refusal_raises_the_extra_by_a_tenth_of_the_bucket_at_most() -> None:
    pacer, clock = learned(left=50_000)
    charge = await pacer.acquire(600)
    # A Retry-After in whole seconds: "1" where 1 ms was meant.
    pacer.observe(limit(40_000), clock.now, charge, refused=True, retry_after=1.0)
    assert pacer.extra == pytest.approx(tokens_module.MAX_EXTRA_STEP * pacer.capacity)


def test_a_reset_of_zero_does_not_empty_the_bucket() -> None:
    pacer, clock = learned(left=500, reset_s=1.5)
    pacer.observe(limit(0, reset_s=0.0), clock.now, None)
    assert pacer.capacity == pytest.approx(2000)


async def test_a_refund_restores_the_level_up_to_the_bucket_and_keeps_the_total() -> None:
    pacer, _ = learned(left=10_000)
    charge = await pacer.acquire(4_000)
    assert pacer.level() == pytest.approx(6_000)
    pacer.refund(charge)
    assert pacer.level() == pytest.approx(10_000)
    # The total stays: answers to requests sent before it still count it, erring low.
    assert pacer.charged == pytest.approx(4_000)
    full, _ = learned(left=LIMIT)
    pacer_charge = await full.acquire(100)
    full.refund(pacer_charge)
    full.refund(pacer_charge)  # twice by mistake: never past what the bucket holds
    assert full.level() == pytest.approx(full.capacity)


def test_waiters_from_event_loops_in_several_threads_all_get_their_turn() -> None:
    # One backend serving asyncio.run() in several threads at once (DSPy's sync calls):
    # a turn handed to another loop's waiter must wake it there, and a live loop's
    # waiter is never dropped as an ended one's.
    pacer = TokenPacer(SYSTEM_CLOCK)
    pacer.observe(limit(0), SYSTEM_CLOCK.monotonic(), None)
    charged: list[int] = []

    def thread() -> None:
        async def main() -> None:
            charges = await asyncio.gather(*(pacer.acquire(40) for _ in range(5)))
            charged.append(len(charges))

        asyncio.run(main())

    threads = [threading.Thread(target=thread, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)  # 800 tokens at about 1,000 a second: a second or two
    assert not any(t.is_alive() for t in threads), "a waiter was never woken"
    assert charged == [5, 5, 5, 5]


def test_a_waiter_behind_a_closed_loops_turn_is_woken_when_that_turn_is_dropped() -> None:
    pacer = TokenPacer(SYSTEM_CLOCK)
    pacer.observe(limit(0), SYSTEM_CLOCK.monotonic(), None)
    dead = asyncio.new_event_loop()
    head = dead.create_task(pacer.acquire(50))  # first in line, waiting for tokens
    dead.run_until_complete(asyncio.sleep(0.01))
    got: dict[str, object] = {}

    def behind() -> None:
        async def main() -> None:
            got["behind"] = await asyncio.wait_for(pacer.acquire(10), 10)

        asyncio.run(main())

    thread = threading.Thread(target=behind, daemon=True)
    thread.start()
    time.sleep(0.2)
    dead.close()  # its turn never leaves the queue by itself

    async def newcomer() -> float:
        started = asyncio.get_running_loop().time()
        await asyncio.wait_for(pacer.acquire(10), 10)
        return asyncio.get_running_loop().time() - started

    waited = asyncio.run(newcomer())
    thread.join(timeout=20)
    assert isinstance(got.get("behind"), Charge)
    assert waited < 3  # not stuck behind a waiter nobody woke (10 s before)
    assert not head.done()
