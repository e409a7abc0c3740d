"""The in-flight bound: never more than the limit, first come first served, cancellation-safe."""

from __future__ import annotations

import asyncio
import threading
import time

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


def test_a_burst_of_overload_refusals_halves_the_limit_once() -> None:
    slots = Slots(64)
    sent = 10.0
    for _ in range(60):
        assert slots.overloaded(sent_at=sent, now=10.5)
    assert (slots.limit, slots.shrinks) == (32, 1)
    # Sent after the halving and still refused: news, halve again.
    assert slots.overloaded(sent_at=11.0, now=11.2)
    assert slots.limit == 16


def test_the_limit_grows_back_by_one_per_window_of_successes() -> None:
    slots = Slots(8)
    slots.overloaded(sent_at=0.0, now=0.0)
    assert slots.limit == 4
    for _ in range(4):
        slots.succeeded()
    assert slots.limit == 5
    for _ in range(100):
        slots.succeeded()
    assert slots.limit == 8  # never past the configured bound


def test_at_one_in_flight_there_is_nothing_left_to_shrink() -> None:
    slots = Slots(2)
    assert slots.overloaded(sent_at=0.0, now=1.0)
    assert slots.limit == 1
    assert not slots.overloaded(sent_at=2.0, now=3.0)
    assert slots.limit == 1


async def test_a_lower_limit_holds_back_waiters_until_enough_slots_are_returned() -> None:
    slots = Slots(4)
    for _ in range(4):
        assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.overloaded(sent_at=0.0, now=1.0)  # limit 2 while 4 are held
    slots.release()
    slots.release()
    await asyncio.sleep(0)
    assert not waiter.done()  # still 2 held: at the new limit
    slots.release()
    await asyncio.wait_for(waiter, 1)
    assert slots.held == 2


async def test_growing_the_limit_wakes_a_waiter() -> None:
    slots = Slots(2)
    slots.overloaded(sent_at=0.0, now=1.0)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    slots.succeeded()  # one success at limit 1 is a full window: limit 2
    await asyncio.wait_for(waiter, 1)
    assert slots.held == 2


async def test_a_waiter_cancelled_as_a_release_passes_it_over_raises_cancelled() -> None:
    slots = Slots(1)
    assert slots.try_take()
    waiter = asyncio.create_task(slots.take())
    await asyncio.sleep(0)
    waiter.cancel()  # its future is cancelled now, its except block runs later
    slots.release()  # pops the cancelled future and skips it, in the same loop pass
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.held == 0 and slots.waiting == 0


async def test_a_wait_that_runs_out_of_time_leaves_the_queue_and_says_so() -> None:
    slots = Slots(1)
    await slots.take()
    late = asyncio.ensure_future(slots.take(timeout_s=0.05))
    patient = asyncio.ensure_future(slots.take())
    assert await late is False
    assert slots.waiting == 1 and slots.held == 1
    slots.release()
    assert await patient is True and slots.held == 1  # the slot went past the expired waiter


async def test_a_slot_in_time_cancels_the_timer() -> None:
    slots = Slots(1)
    await slots.take()
    waiter = asyncio.ensure_future(slots.take(timeout_s=0.05))
    await asyncio.sleep(0)
    slots.release()
    assert await waiter is True
    await asyncio.sleep(0.1)  # the timer, had it stayed, would fire on a done future now
    assert slots.held == 1 and slots.waiting == 0


async def test_a_cancelled_timed_waiter_is_cancelled_not_timed_out() -> None:
    slots = Slots(1)
    await slots.take()
    waiter = asyncio.ensure_future(slots.take(timeout_s=5.0))
    await asyncio.sleep(0)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    assert slots.waiting == 0 and slots.held == 1


def test_one_bound_for_event_loops_running_at_once_in_threads() -> None:
    # DSPy's sync calls run asyncio.run() in each thread, all on one backend.
    slots = Slots(2)
    lock = threading.Lock()
    holding = peak = 0
    done: list[int] = []

    def thread() -> None:
        async def one() -> None:
            nonlocal holding, peak
            assert await slots.take(10)
            with lock:
                holding += 1
                peak = max(peak, holding)
            await asyncio.sleep(0.002)
            with lock:
                holding -= 1
            slots.release()

        async def main() -> None:
            await asyncio.gather(*(one() for _ in range(10)))
            done.append(1)

        asyncio.run(main())

    threads = [threading.Thread(target=thread, daemon=True) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=20)
    assert not any(t.is_alive() for t in threads), "a waiter was never handed its slot"
    assert done == [1, 1, 1, 1] and peak == 2
    assert slots.free == 2 and slots.waiting == 0 and slots.held == 0


def hold_one_on(loop: asyncio.AbstractEventLoop, slots: Slots) -> None:
    """Take a free slot from a task of ``loop``, and leave it held."""

    async def hold() -> None:
        assert slots.try_take()

    loop.run_until_complete(hold())


def a_new_loop_gets_a_slot(slots: Slots) -> bool:
    """Whether a task of a fresh loop gets a slot within a second."""

    async def later() -> bool:
        return await slots.take(1.0)

    return asyncio.run(later())


def test_slots_held_by_a_loop_that_closed_are_freed_for_the_next() -> None:
    # A loop closed with requests still holding slots (never cancelled, never finished):
    # with one bound for every loop, the next loop must not wait for them for ever.
    slots = Slots(2)
    abandoned = asyncio.new_event_loop()

    async def hold() -> None:
        assert slots.try_take() and await slots.take(1)

    abandoned.run_until_complete(hold())
    abandoned.close()
    assert slots.free == 0

    async def later() -> bool:
        return await slots.take(1) and await slots.take(1)

    assert asyncio.run(later())
    assert slots.held == 2


def test_a_closed_loops_waiter_does_not_keep_the_next_loop_queued() -> None:
    slots = Slots(1)
    dead = asyncio.new_event_loop()

    hold_one_on(dead, slots)
    left = dead.create_task(slots.take())  # queued behind the holder, never finished
    dead.run_until_complete(asyncio.sleep(0))
    dead.close()

    assert a_new_loop_gets_a_slot(slots)
    assert not left.done()  # its loop closed under it


def test_a_slot_handed_to_a_loop_that_closed_before_taking_it_is_freed() -> None:
    slots = Slots(1)
    holder, waiting = asyncio.new_event_loop(), asyncio.new_event_loop()

    async def release() -> None:
        slots.release()  # to the other loop's waiter, through that loop

    hold_one_on(holder, slots)
    left = waiting.create_task(slots.take())
    waiting.run_until_complete(asyncio.sleep(0))
    holder.run_until_complete(release())
    holder.close()
    waiting.close()  # the hand-over never ran

    assert a_new_loop_gets_a_slot(slots)
    assert not left.done()  # its loop closed under it


def test_slots_reclaimed_from_a_closed_loop_go_to_the_waiters_already_queued() -> None:
    slots = Slots(1)
    dead = asyncio.new_event_loop()

    hold_one_on(dead, slots)
    got: dict[str, bool] = {}

    def other_thread() -> None:
        async def main() -> None:
            queued = asyncio.ensure_future(slots.take(5.0))  # waits on the dead loop's slot
            await asyncio.sleep(0.3)  # the holder's loop closes meanwhile
            got["late"] = await slots.take(0.2)  # reclaims it: it must go to the first one
            got["queued"] = await queued

        asyncio.run(main())

    thread = threading.Thread(target=other_thread, daemon=True)
    thread.start()
    time.sleep(0.1)
    dead.close()
    thread.join(timeout=20)
    assert got == {"late": False, "queued": True}  # one slot: the first waiter's


def test_a_slot_given_back_outside_its_loop_is_not_freed_again_when_that_loop_closes() -> None:
    slots = Slots(2)
    taker = asyncio.new_event_loop()

    hold_one_on(taker, slots)
    slots.release()  # from no loop at all, as a close from a finalizer or a thread may
    taker.close()

    async def later() -> tuple[bool, bool, bool]:
        return slots.try_take(), slots.try_take(), await slots.take(0.05)

    assert asyncio.run(later()) == (True, True, False)  # two slots, never a third
    assert slots.held == 2


def test_a_slot_given_back_on_another_loop_names_the_loop_it_was_taken_on() -> None:
    # A stream taken on A and closed by code running on B, which holds a slot of its
    # own: B's count must not drop, or A's close would free A's slot a second time.
    slots = Slots(2)
    a, b = asyncio.new_event_loop(), asyncio.new_event_loop()
    hold_one_on(a, slots)
    hold_one_on(b, slots)

    async def close_as_streams_do() -> None:
        slots.release(a)

    b.run_until_complete(close_as_streams_do())
    a.close()

    async def later() -> tuple[bool, bool]:
        return slots.try_take(), await slots.take(0.05)

    assert asyncio.run(later()) == (True, False)  # b's slot is still out: one free, not two
    b.close()
