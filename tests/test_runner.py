"""run_batched_callable: order, failures, abort, progress, stalls, cache-hit counting."""

from __future__ import annotations

import asyncio
import io
import logging
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from backend_support import req
from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmFailure,
    MinimaLlmResponse,
    OpenAIMinimaLlm,
    run_batched_callable,
    set_last_cached,
)
from minima_llm.testing import MockServer

QUIET = {"heartbeat_s": 0.0, "stall_s": 0.0}


def _fail(i: int) -> MinimaLlmFailure:
    return MinimaLlmFailure(
        request_id=f"item{i}",
        error_type="HTTPError",
        message="HTTP 500",
        attempts=3,
        status=500,
        timeout_s=60.0,
        attempt_timestamps=(1.0, 2.2, 4.5),
    )


async def test_results_in_input_order_despite_completion_order() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep((10 - i) * 0.002)
        return i * i

    out = await run_batched_callable(
        range(10), fn, BatchConfig(num_workers=10, **QUIET), progress=False
    )
    assert out == [i * i for i in range(10)]


async def test_workers_bound_concurrency() -> None:
    running = peak = 0

    async def fn(i: int) -> int:
        nonlocal running, peak
        running += 1
        peak = max(peak, running)
        await asyncio.sleep(0.001)
        running -= 1
        return i

    await run_batched_callable(range(50), fn, BatchConfig(num_workers=3, **QUIET), progress=False)
    assert peak == 3


async def test_exception_becomes_failure_in_its_slot() -> None:
    async def fn(i: int) -> int:
        if i == 2:
            raise ValueError("bad item")
        return i

    out = await run_batched_callable(range(4), fn, BatchConfig(**QUIET), progress=False)
    assert out[:2] == [0, 1] and out[3] == 3
    failure = out[2]
    assert isinstance(failure, MinimaLlmFailure)
    assert (
        failure.error_type == "ValueError"
        and failure.message == "bad item"
        and failure.request_id == "item-2"
    )


async def test_without_a_config_the_batch_variables_apply(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The default of 25 failures would abort this batch; BATCH_MAX_FAILURES=none says never.
    monkeypatch.setenv("BATCH_MAX_FAILURES", "none")
    monkeypatch.setenv("BATCH_HEARTBEAT_S", "0")

    async def fn(i: int) -> object:
        return _fail(i)

    results = await run_batched_callable(range(30), fn, progress=False)
    assert all(isinstance(r, MinimaLlmFailure) for r in results)


async def test_first_failures_printed_in_full() -> None:
    async def fn(i: int) -> object:
        return _fail(i) if i % 2 else i

    stream = io.StringIO()
    await run_batched_callable(
        range(10),
        fn,
        BatchConfig(print_first_failures=2, max_failures=None, **QUIET),
        progress=stream,
    )
    text = stream.getvalue()
    assert (
        "Failure 1: item1\n    HTTPError: status=500\n    attempts=3, timeout=60.0s [+0.0s, +1.2s, +3.5s]"
        in text
    )
    assert "Failure 2: item3" in text
    assert "Failure 3:" not in text
    assert "failures 5" in text  # the summary counts them all


async def test_abort_after_max_failures_lists_recent_ones() -> None:
    calls = 0

    async def fn(i: int) -> object:
        nonlocal calls
        calls += 1
        await asyncio.sleep(0)
        return _fail(i)

    with pytest.raises(RuntimeError) as info:
        await run_batched_callable(
            range(1000),
            fn,
            BatchConfig(num_workers=4, max_failures=5, keep_failure_summaries=3, **QUIET),
            progress=False,
        )
    message = str(info.value)
    assert message.startswith("Aborting batch: 6 failures (max_failures=5)")
    assert message.count("HTTPError status=500") == 3  # only the last keep_failure_summaries
    assert calls < 50  # stopped early, not after all 1000


async def test_max_failures_zero_aborts_on_first_and_none_never() -> None:
    async def fn(i: int) -> object:
        return _fail(i)

    with pytest.raises(RuntimeError, match="Aborting batch: 1 failures"):
        await run_batched_callable(
            range(5), fn, BatchConfig(max_failures=0, **QUIET), progress=False
        )
    out = await run_batched_callable(
        range(50), fn, BatchConfig(max_failures=None, **QUIET), progress=False
    )
    assert all(isinstance(r, MinimaLlmFailure) for r in out)


async def test_mutating_batch_config_like_the_reference_does() -> None:
    batch = BatchConfig(**QUIET)
    batch.max_failures = 1

    async def fn(i: int) -> object:
        return _fail(i)

    with pytest.raises(RuntimeError, match="max_failures=1"):
        await run_batched_callable(range(5), fn, batch, progress=False)


async def test_heartbeat_reports_progress_and_cache_hits_to_a_logger(
    caplog: pytest.LogCaptureFixture,
) -> None:
    async def fn(i: int) -> object:
        await asyncio.sleep(0.01)
        if i % 2:
            set_last_cached(True)  # how an adapter reports a hit it unwrapped
            return i
        return MinimaLlmResponse(request_id=str(i), text="t", cached=False)

    logger = logging.getLogger("test.batch")
    with caplog.at_level(logging.INFO, logger="test.batch"):
        await run_batched_callable(
            range(40), fn, BatchConfig(num_workers=4, heartbeat_s=0.03, stall_s=0), progress=logger
        )
    lines = [r.getMessage() for r in caplog.records]
    beats = [line for line in lines if line.startswith("[batch]") and "/40 (" in line]
    assert beats, lines
    assert "ETA" in beats[0] and "/s" in beats[0]
    final = lines[-1]
    assert final.startswith("[batch] finished 40") and "cache hits 20, live 20" in final


async def test_a_failure_after_a_cached_call_is_counted_once_as_a_failure(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # DSPy's batch: a cached answer that cannot be parsed ends as a failure, while the
    # item's context still says its last call was a hit.
    async def fn(i: int) -> object:
        set_last_cached(True)
        return _fail(i) if i == 0 else i

    logger = logging.getLogger("test.batch")
    with caplog.at_level(logging.INFO, logger="test.batch"):
        await run_batched_callable(range(20), fn, BatchConfig(**QUIET), progress=logger)
    final = caplog.records[-1].getMessage()
    assert "cache hits 19, live 0" in final and "failures 1" in final, final


async def _heartbeats(total: int, is_hit: Callable[[int], bool], live_s: float) -> io.StringIO:
    """The progress of one worker over ``total`` items: hits where ``is_hit``, else live calls."""

    async def fn(i: int) -> int:
        if is_hit(i):
            set_last_cached(True)
        else:
            await asyncio.sleep(live_s)
        return i

    stream = io.StringIO()
    config = BatchConfig(num_workers=1, heartbeat_s=0.3, stall_s=0)
    await run_batched_callable(range(total), fn, config, progress=stream)
    return stream


def _etas(stream: io.StringIO, total: int) -> list[int]:
    beats = [line for line in stream.getvalue().splitlines() if f"/{total} (" in line]
    return [int(line.split("ETA ")[1].split("s")[0]) for line in beats if "ETA ?" not in line]


async def test_eta_of_a_resumed_run_follows_the_live_calls_after_its_cache_hits() -> None:
    # 94 answers replayed from the cache in a moment, then 6 live calls of 0.4 s: a rate
    # that counts the hits promised "ETA 0s" with seconds of calls to go.
    stream = await _heartbeats(100, lambda i: i < 94, 0.4)
    beats = [line for line in stream.getvalue().splitlines() if "/100 (" in line]
    # Once two live calls are in and at least 1.2 s of them remain, no heartbeat says 0s.
    while_calls_remain = [b for b in beats if 96 <= int(b.split("/100")[0].split()[-1]) <= 97]
    assert while_calls_remain and not any("ETA 0s" in b for b in while_calls_remain), beats


async def test_eta_with_cache_hits_spread_through_the_batch() -> None:
    # Every fourth item is a live call of 40 ms: counting only the live ones would put
    # the ETA at four times what is left.
    stream = await _heartbeats(200, lambda i: i % 4 != 0, 0.04)
    etas = _etas(stream, 200)
    assert etas and max(etas) <= 3, stream.getvalue()  # about 2 s in all


async def test_answers_shared_from_a_call_in_flight_are_not_counted_as_live_calls(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # The backend marks an answer that joined an identical call in flight "inflight".
    async def fn(i: int) -> MinimaLlmResponse:
        source = "inflight" if i else None
        return MinimaLlmResponse(request_id=str(i), text="t", cached=False, cache_source=source)

    logger = logging.getLogger("test.batch.shared")
    with caplog.at_level(logging.INFO, logger="test.batch.shared"):
        await run_batched_callable(range(10), fn, BatchConfig(**QUIET), progress=logger)
    final = caplog.records[-1].getMessage()
    assert "cache hits 0, live 1, shared 9" in final, final


async def test_stall_warning() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(0.25 if i == 0 else 0)
        return i

    stream = io.StringIO()
    await run_batched_callable(
        range(3), fn, BatchConfig(num_workers=1, heartbeat_s=0, stall_s=0.1), progress=stream
    )
    assert "[batch] stalled: no result for" in stream.getvalue()


class _Timed(io.StringIO):
    """A stream that notes when each line was written, relative to its creation."""

    def __init__(self) -> None:
        super().__init__()
        self.start = time.monotonic()
        self.lines: list[tuple[float, str]] = []

    def write(self, text: str) -> int:
        if text.strip():
            self.lines.append((time.monotonic() - self.start, text.strip()))
        return super().write(text)


async def test_heartbeat_keeps_its_own_period_when_the_stall_limit_is_shorter() -> None:
    # BATCH_HEARTBEAT_S=600 beside the default 300 s stall limit printed every 300 s.
    async def fn(i: int) -> int:
        await asyncio.sleep(0.02)
        return i

    stream = _Timed()
    await run_batched_callable(
        range(40), fn, BatchConfig(num_workers=1, heartbeat_s=0.3, stall_s=0.1), progress=stream
    )
    elapsed = time.monotonic() - stream.start
    beats = [line for _, line in stream.lines if "/40 (" in line]
    assert beats and len(beats) <= elapsed / 0.3 + 1, (elapsed, beats)


async def test_stall_warning_comes_one_stall_period_after_the_last_result() -> None:
    # With the heartbeat off the watcher slept whole stall periods, so a stall that
    # began just after a wake-up was reported nearly two periods late.
    async def fn(i: int) -> int:
        await asyncio.sleep(0.1 if i == 0 else 1.0 if i == 1 else 0)
        return i

    stream = _Timed()
    await run_batched_callable(
        range(3), fn, BatchConfig(num_workers=1, heartbeat_s=0, stall_s=0.4), progress=stream
    )
    warnings = [at for at, line in stream.lines if "stalled" in line]
    assert warnings and 0.45 <= warnings[0] < 0.75, stream.lines  # it was at 0.8
    assert len(warnings) == 2  # repeated once per stall period while still stalled


class _Tty(io.StringIO):
    def isatty(self) -> bool:
        return True


async def test_terminal_gets_one_live_line() -> None:
    async def fn(i: int) -> int:
        await asyncio.sleep(0.01)
        return i

    tty = _Tty()
    await run_batched_callable(
        range(20), fn, BatchConfig(num_workers=2, heartbeat_s=0.02, stall_s=0), progress=tty
    )
    text = tty.getvalue()
    assert "\r\x1b[2K[batch]" in text
    assert text.count("\n") == 1  # status lines redraw in place; only the summary ends a line


async def test_empty_input() -> None:
    async def fn(i: int) -> int:
        return i

    assert await run_batched_callable([], fn, BatchConfig(**QUIET), progress=False) == []


async def test_cancelling_the_batch_cancels_its_workers() -> None:
    started = asyncio.Event()
    cancelled = 0

    async def fn(i: int) -> int:
        nonlocal cancelled
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            cancelled += 1
            raise
        return i

    task = asyncio.ensure_future(
        run_batched_callable(range(8), fn, BatchConfig(num_workers=4, **QUIET), progress=False)
    )
    await started.wait()
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert cancelled == 4


@pytest.mark.skipif(sys.version_info < (3, 11), reason="3.10 cannot tell whose cancellation")
async def test_an_items_own_cancelled_await_is_that_items_failure() -> None:
    # A future the item shared with another task was cancelled: the batch was not.
    async def fn(i: int) -> int:
        await asyncio.sleep(0)
        if i == 5:
            shared = asyncio.get_running_loop().create_future()
            shared.cancel()
            await shared
        return i

    batch = BatchConfig(num_workers=4, max_failures=None, **QUIET)
    results = await run_batched_callable(range(50), fn, batch, progress=False)
    failed = results[5]
    assert isinstance(failed, MinimaLlmFailure) and failed.error_type == "CancelledError"
    assert results[:5] + results[6:] == [i for i in range(50) if i != 5]


async def test_a_worker_whose_cancellation_was_lost_takes_no_more_items() -> None:
    # wait_for before Python 3.12 can drop a cancellation that arrives as its awaitable
    # finishes; such a worker used to go on sending the cancelled batch's requests.
    started = asyncio.Event()
    calls = 0

    async def fn(i: int) -> int:
        nonlocal calls
        calls += 1
        started.set()
        try:
            await asyncio.sleep(10)
        except asyncio.CancelledError:
            if i % 2:
                raise
            await asyncio.sleep(0.02)  # like a call that ended as it was cancelled
        return i

    batch = BatchConfig(num_workers=4, **QUIET)
    task = asyncio.ensure_future(run_batched_callable(range(400), fn, batch, progress=False))
    await started.wait()
    await asyncio.sleep(0.01)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    # Returned only once every worker had ended, and none took another item.
    others = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
    assert others == [] and calls == 4
    await asyncio.sleep(0.1)
    assert calls == 4


async def test_a_batch_reports_the_tokens_it_spent_not_the_backends_lifetime_total(
    mock: MockServer, tmp_path: Path
) -> None:
    # DSPy pipelines run several batches on one backend; the second one reported the
    # first one's tokens too, and a fully cached third one reported tokens it never sent.
    backend = OpenAIMinimaLlm(
        MinimaLlmConfig(base_url=mock.url, model="mock-model", cache_dir=str(tmp_path), rpm=0)
    )
    batch = BatchConfig(**QUIET)
    try:
        summaries = []
        for ids in (range(10), range(10, 20), range(20)):
            stream = io.StringIO()
            out = await run_batched_callable(
                [req(i) for i in ids],
                backend.generate,
                batch,
                progress=stream,
                stats=backend.snapshot,
            )
            spent = sum(r.usage.prompt_tokens for r in out if not r.cached)  # type: ignore[union-attr]
            summaries.append((spent, stream.getvalue().strip().splitlines()[-1]))
    finally:
        await backend.aclose()
    (first, one), (second, two), (_, three) = summaries
    assert f"tokens in {first} " in one and f"tokens in {second} " in two, two
    assert "tokens in 0 out 0" in three, three
