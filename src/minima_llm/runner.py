"""``run_batched_callable``: a worker pool with progress, stall warnings, failure records and abort."""

from __future__ import annotations

import asyncio
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from typing import Any, TypeVar

from .config import BatchConfig
from .context import get_last_cached, set_last_cached
from .gcpolicy import batch_gc
from .progress import ProgressSink, ProgressTarget
from .stats import StatsSnapshot
from .types import MinimaLlmFailure, MinimaLlmResponse

T = TypeVar("T")
R = TypeVar("R")

# Workers whose calls finish without suspending (cache hits) yield this often so
# the heartbeat and other tasks still run during a long cached replay.
_YIELD_EVERY = 256
# Heartbeat intervals the ETA's rate spans: long enough to smooth a burst of hits,
# short enough to follow a batch whose mix of hits and live calls changes.
_ETA_BEATS = 3


class _Tally:
    """What the batch has done so far."""

    def __init__(
        self,
        total: int | None,
        batch: BatchConfig,
        sink: ProgressSink,
        base: StatsSnapshot | None = None,
    ) -> None:
        self.total = total
        # The backend's token counters run for its whole life; a batch reports its own share.
        self.base_tokens = _tokens(base) if base is not None else (0, 0, 0)
        self.batch = batch
        self.sink = sink
        self.done = 0
        self.hits = 0
        # Answers shared from an identical call in flight: neither a hit nor a call of their own.
        self.joined = 0
        self.failures = 0
        self.tokens_in = 0
        self.tokens_out = 0
        self.started = time.monotonic()
        self.last_progress = self.started
        self.recent: deque[str] = deque(maxlen=max(1, batch.keep_failure_summaries))
        # Where the ETA's rate is measured from: a resumed run's cache hits come first,
        # thousands a second, so the window restarts at its first live answer.
        self._beats: deque[tuple[float, int]] = deque([(self.started, 0)], maxlen=_ETA_BEATS)
        self.aborted: RuntimeError | None = None

    def record(self, result: Any, cached: bool) -> None:
        self.done += 1
        self.last_progress = time.monotonic()
        if isinstance(result, MinimaLlmFailure):
            # A failure is never a hit, whatever the item's last call left in the context
            # (a cached answer that could not be parsed, say): counted as both, the
            # heartbeat's live calls (done - hits - failures) went below zero.
            cached = False
        if isinstance(result, MinimaLlmResponse):
            cached = result.cached
            if result.cache_source == "inflight":
                self.joined += 1
            elif not cached:
                self.tokens_in += result.usage.prompt_tokens
                self.tokens_out += result.usage.completion_tokens
        if cached:
            self.hits += 1
        elif self.done - self.hits == 1:  # the first answer that was not a cache hit
            self._beats = deque([(self.last_progress, self.done)], maxlen=_ETA_BEATS)
        if isinstance(result, MinimaLlmFailure):
            self.fail(result)

    def fail(self, failure: MinimaLlmFailure) -> None:
        self.failures += 1
        if self.failures <= self.batch.print_first_failures:
            self.sink.report(failure.format_report(self.failures), logging.WARNING)
        if self.batch.keep_failure_summaries:
            self.recent.append(
                f"{failure.request_id}: {failure.error_type} status={failure.status} {failure.message}"
            )
        limit = self.batch.max_failures
        if limit is not None and self.failures > limit and self.aborted is None:
            listing = "\n".join(f"  {line}" for line in self.recent)
            self.aborted = RuntimeError(
                f"Aborting batch: {self.failures} failures (max_failures={limit}). Recent failures:\n{listing}"
            )

    def line(self, stats: StatsSnapshot | None) -> str:
        """The heartbeat line; each call is a heartbeat, and the ETA's rate spans the last few."""
        now = time.monotonic()
        rate = self.done / max(1e-9, now - self.started)
        then, done_then = self._beats[0]
        self._beats.append((now, self.done))
        if self.total:
            left = self.total - self.done
            # Hits spread through a batch stay in this rate, as they will in the rest.
            recent = (self.done - done_then) / (now - then) if now > then else 0.0
            eta = f"{left / recent:.0f}s" if recent > 0 else "?"
            head = f"{self.done}/{self.total} ({100.0 * self.done / self.total:.1f}%) {rate:.1f}/s ETA {eta}"
        else:
            head = f"{self.done} done {rate:.1f}/s"
        return f"[batch] {head} | {self.counts(stats)}"

    def counts(self, stats: StatsSnapshot | None) -> str:
        live = self.done - self.hits - self.failures - self.joined
        shared = f", shared {self.joined}" if self.joined else ""
        text = f"cache hits {self.hits}, live {live}{shared} | failures {self.failures}"
        if stats is not None:
            spent_in, spent_out, saved = (
                now - then for now, then in zip(_tokens(stats), self.base_tokens, strict=True)
            )
            text += f" | tokens in {spent_in} out {spent_out}, saved by cache {saved}"
            return text + f" | paced at {stats.pace}" if stats.pace else text
        return text + f" | tokens in {self.tokens_in} out {self.tokens_out}"


async def run_batched_callable(
    items: Iterable[T],
    fn: Callable[[T], Awaitable[R]],
    batch_config: BatchConfig | None = None,
    *,
    progress: ProgressTarget = None,
    stats: Callable[[], StatsSnapshot] | None = None,
) -> list[R | MinimaLlmFailure]:
    """Run ``fn`` over ``items`` with ``num_workers`` workers; results in input order.

    ``batch_config`` defaults to ``BatchConfig.from_env()``. An exception from ``fn``
    becomes a ``MinimaLlmFailure`` in that item's slot.
    More than ``max_failures`` failures abort the batch with a ``RuntimeError``
    listing the most recent ones.
    """
    # Without a config, the BATCH_* variables apply, as they do to a backend's own batches.
    batch = batch_config or BatchConfig.from_env()
    pending = list(items)
    results: list[Any] = [None] * len(pending)
    sink = ProgressSink(progress)
    tally = _Tally(len(pending), batch, sink, stats() if stats else None)
    feed = iter(enumerate(pending))
    abort = asyncio.Event()
    ended = False

    async def worker() -> None:
        for count, (index, item) in enumerate(feed, 1):
            # A cancellation can be lost (wait_for before 3.12 drops one that arrives as
            # its awaitable finishes), and a worker that lost it would go on sending the
            # cancelled batch's requests: so each also looks whether the batch has ended.
            if ended:
                return
            set_last_cached(False)
            try:
                result: Any = await fn(item)
            except asyncio.CancelledError as exc:
                if ended or _cancel_requested():
                    raise
                # Not this worker being cancelled: the item's own work met a cancelled
                # future (one it shared with another task, say). A failure of that item.
                result = _failure_from(item, index, exc)
            except Exception as exc:
                result = _failure_from(item, index, exc)
            results[index] = result
            tally.record(result, get_last_cached())
            if tally.aborted is not None:
                abort.set()
                return
            if count % _YIELD_EVERY == 0:
                await asyncio.sleep(0)

    with batch_gc():
        workers = [
            asyncio.ensure_future(worker())
            for _ in range(min(batch.num_workers, max(1, len(pending))))
        ]
        watcher = asyncio.ensure_future(_watch(tally, batch, sink, stats, workers))
        aborter: asyncio.Future[Any] = asyncio.ensure_future(abort.wait())
        finished: asyncio.Future[Any] = asyncio.gather(*workers)
        try:
            await asyncio.wait([finished, aborter], return_when=asyncio.FIRST_COMPLETED)
        finally:
            ended = True
            for task in (*workers, watcher, aborter):
                task.cancel()
            # Each worker awaited, not ``finished``: that gather ends at the first
            # cancelled worker, and the batch would return while others still ran.
            await asyncio.gather(finished, *workers, watcher, aborter, return_exceptions=True)
            sink.close()
    if tally.aborted is not None:
        sink.report(str(tally.aborted), logging.ERROR)
        raise tally.aborted
    if finished.done() and not finished.cancelled() and finished.exception() is not None:
        raise finished.exception()  # type: ignore[misc]
    if tally.done:
        sink.report(_summary(tally, stats() if stats else None))
    return results


async def _watch(
    tally: _Tally,
    batch: BatchConfig,
    sink: ProgressSink,
    stats: Callable[[], StatsSnapshot] | None,
    workers: Sequence[asyncio.Future[Any]],
) -> None:
    """Heartbeat every ``heartbeat_s``; warn once per stall period when nothing finishes."""
    beat, stall = batch.heartbeat_s, batch.stall_s
    if beat <= 0 and stall <= 0:
        return
    next_beat = tally.started + beat if beat > 0 else math.inf
    warned_at = -math.inf
    while True:
        # Wake for whichever is due first, so neither waits on the other's period:
        # a 600 s heartbeat beside a 300 s stall limit, or a stall warning that
        # would come up to two stall periods late with the heartbeat off.
        due = next_beat
        if stall > 0:
            due = min(due, max(tally.last_progress, warned_at) + stall)
        await asyncio.sleep(max(0.0, due - time.monotonic()))
        now = time.monotonic()
        if now >= next_beat:
            sink.status(tally.line(stats() if stats else None))
            next_beat = now + beat
        quiet = now - tally.last_progress
        if stall > 0 and quiet >= stall and now - warned_at >= stall:
            warned_at = now
            busy = sum(1 for w in workers if not w.done())
            sink.report(
                f"[batch] stalled: no result for {quiet:.0f}s ({tally.done}/{tally.total} done, {busy} workers waiting)",
                logging.WARNING,
            )


def _tokens(snap: StatsSnapshot) -> tuple[int, int, int]:
    """Tokens sent, received, and saved by the cache, so far."""
    return snap.tokens_in, snap.tokens_out, snap.tokens_saved_in + snap.tokens_saved_out


def _summary(tally: _Tally, stats: StatsSnapshot | None) -> str:
    elapsed = time.monotonic() - tally.started
    rate = tally.done / elapsed if elapsed > 0 else 0.0
    return f"[batch] finished {tally.done} in {elapsed:.2f}s ({rate:.0f}/s) | {tally.counts(stats)}"


def _cancel_requested() -> bool:
    """Whether the current task has a cancellation pending.

    Always True before 3.11, which cannot tell: a worker that swallowed a real
    cancellation (asyncio.run cancelling every task at an interrupt) would go on
    sending the batch's requests, so there an item's stray one still ends the batch.
    """
    task = asyncio.current_task()
    cancelling = getattr(task, "cancelling", None)
    return bool(cancelling()) if cancelling is not None else True


def _failure_from(item: Any, index: int, exc: BaseException) -> MinimaLlmFailure:
    request_id = getattr(item, "request_id", None) or f"item-{index}"
    return MinimaLlmFailure(
        request_id=str(request_id),
        error_type=type(exc).__name__,
        message=str(exc) or repr(exc),
        attempts=1,
        body_snippet=None,
    )
