"""The in-flight bound: never more than the limit, first come first served, cancellation-safe."""

from __future__ import annotations

import asyncio

import pytest

from minima_llm.resilience import Slots


async def test_free_slots_are_taken_without_waiting() -> None:
    slots = Slots(2)
    assert slots.try_take() and slots.try_take()
    assert not slots.try_take()
    assert slots.free == 0
    slots.release()
    assert slots.free == 1
    await asyncio.wait_for(slots.take(), 1)
    assert slots.free == 0


async def test_never_more_holders_than_the_limit() -> None:
    slots = Slots(3)
    holding = peak = 0

    async def worker() -> None:
        nonlocal holding, peak
        for _ in range(20):
            await slots.take()
            holding += 1
            peak = max(peak, holding)
            await asyncio.sleep(0)
            holding -= 1
            slots.release()

    await asyncio.wait_for(asyncio.gather(*(worker() for _ in range(10))), 10)
    assert peak == 3
    assert slots.free == 3 and slots.waiting == 0


async def test_waiters_are_served_in_arrival_order_and_newcomers_queue_behind() -> None:
    slots = Slots(1)
    assert slots.try_take()
    order: list[int] = []

    async def waiter(i: int) -> None:
        await slots.take()
        order.append(i)
        slots.release()

    tasks = [asyncio.create_task(waiter(i)) for i in range(5)]
    await asyncio.sleep(0)
    assert slots.waiting == 5
    slots.release()
    # The released slot went to waiter 0, not back to the pool for anyone to grab.
    assert not slots.try_take()
    await asyncio.wait_for(asyncio.gather(*tasks), 5)
    assert order == [0, 1, 2, 3, 4]
    assert slots.free == 1


async def test_a_cancelled_waiter_leaves_the_queue() -> None:
    slots = Slots(1)
    assert slots.try_take()
    gone = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    gone.cancel()
    with pytest.raises(asyncio.CancelledError):
        await gone
    assert slots.waiting == 0
    slots.release()
    assert slots.free == 1


async def test_a_slot_handed_to_a_waiter_cancelled_at_that_moment_is_passed_on() -> None:
    slots = Slots(1)
    assert slots.try_take()
    first = asyncio.create_task(slots.take())
    second = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.release()  # first is handed the slot ...
    first.cancel()  # ... and cancelled before it runs again
    with pytest.raises(asyncio.CancelledError):
        await first
    await asyncio.wait_for(second, 1)  # the slot went on to the next in line
    slots.release()
    assert slots.free == 1 and slots.waiting == 0


def test_bad_limit_and_extra_release_are_errors() -> None:
    with pytest.raises(ValueError, match="at least 1"):
        Slots(0)
    with pytest.raises(RuntimeError, match="more slots than were taken"):
        Slots(1).release()
