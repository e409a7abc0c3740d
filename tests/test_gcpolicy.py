"""The young-generation GC threshold while batches run: raised, shared, and given back."""

from __future__ import annotations

import asyncio
import gc
from collections.abc import Iterator

import pytest

from minima_llm import BatchConfig, run_batched_callable
from minima_llm.gcpolicy import YOUNG_THRESHOLD, batch_gc, raise_for_process

QUIET = BatchConfig(num_workers=4, heartbeat_s=0.0, stall_s=0.0, max_failures=None)


@pytest.fixture(autouse=True)
def default_threshold() -> Iterator[tuple[int, ...]]:
    """Each test starts from the interpreter's usual threshold and leaves it so."""
    before = gc.get_threshold()
    gc.set_threshold(700, 10, 10)
    try:
        yield gc.get_threshold()
    finally:
        gc.set_threshold(*before)


async def _seen_thresholds(count: int) -> list[int]:
    seen: list[int] = []

    async def fn(i: int) -> int:
        await asyncio.sleep(0)
        seen.append(gc.get_threshold()[0])
        return i

    assert await run_batched_callable(range(count), fn, QUIET) == list(range(count))
    return seen


async def test_a_batch_runs_with_the_raised_threshold_and_gives_it_back() -> None:
    seen = await _seen_thresholds(10)
    assert seen == [YOUNG_THRESHOLD] * 10
    assert gc.get_threshold() == (700, 10, 10)


async def test_a_higher_threshold_of_the_callers_own_is_kept() -> None:
    gc.set_threshold(50_000, 20, 30)
    assert set(await _seen_thresholds(5)) == {50_000}
    assert gc.get_threshold() == (50_000, 20, 30)


async def test_a_disabled_collector_stays_disabled() -> None:
    gc.set_threshold(0)
    assert set(await _seen_thresholds(5)) == {0}
    assert gc.get_threshold()[0] == 0


async def test_overlapping_batches_give_it_back_when_the_last_one_ends() -> None:
    first_done = asyncio.Event()
    seen_after_first: list[int] = []

    async def quick(i: int) -> int:
        return i

    async def slow(i: int) -> int:
        await first_done.wait()
        seen_after_first.append(gc.get_threshold()[0])
        return i

    async def first() -> None:
        await run_batched_callable(range(3), quick, QUIET)
        first_done.set()

    await asyncio.gather(first(), run_batched_callable(range(3), slow, QUIET))
    # The quick batch ended while the slow one ran: the slow one kept the raised threshold.
    assert seen_after_first == [YOUNG_THRESHOLD] * 3
    assert gc.get_threshold() == (700, 10, 10)


async def test_an_aborted_batch_gives_it_back() -> None:
    async def boom(i: int) -> int:
        raise ValueError(f"item {i}")

    config = BatchConfig(num_workers=2, heartbeat_s=0.0, stall_s=0.0, max_failures=1)
    with pytest.raises(RuntimeError):
        await run_batched_callable(range(10), boom, config, progress=False)
    assert gc.get_threshold() == (700, 10, 10)


@pytest.mark.parametrize("theirs", [(1234, 10, 10), (YOUNG_THRESHOLD, 50, 50)])
def test_thresholds_changed_during_the_batch_are_not_overwritten(theirs: tuple[int, ...]) -> None:
    with batch_gc():
        assert gc.get_threshold()[0] == YOUNG_THRESHOLD
        gc.set_threshold(*theirs)
    assert gc.get_threshold() == theirs


def test_a_collector_switched_off_is_left_alone() -> None:
    gc.disable()
    try:
        with batch_gc():
            assert gc.get_threshold() == (700, 10, 10)
    finally:
        gc.enable()


async def test_a_cancelled_batch_gives_it_back() -> None:
    started = asyncio.Event()

    async def forever(i: int) -> int:
        started.set()
        await asyncio.Event().wait()
        return i

    batch = asyncio.ensure_future(run_batched_callable(range(3), forever, QUIET))
    await asyncio.wait_for(started.wait(), 5)
    assert gc.get_threshold()[0] == YOUNG_THRESHOLD
    batch.cancel()
    with pytest.raises(asyncio.CancelledError):
        await batch
    assert gc.get_threshold() == (700, 10, 10)


def test_a_serving_process_keeps_the_raised_threshold() -> None:
    raise_for_process()
    assert gc.get_threshold() == (YOUNG_THRESHOLD, 10, 10)
    gc.set_threshold(50_000, 10, 10)
    raise_for_process()  # never lowers one set higher
    assert gc.get_threshold() == (50_000, 10, 10)
