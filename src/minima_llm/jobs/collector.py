"""Single calls made close together, gathered into one provider job.

``generate`` under batch mode (DSPy, ``run_batched_callable``) hands requests over
one worker at a time; a job per request would mean a poll interval per request.
One collector serves one event loop: its futures may only be resolved there.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Generic, TypeVar

from ..clock import SYSTEM_CLOCK, Clock
from .lines import LineFailure, Outcome

log = logging.getLogger("minima_llm.jobs")

# Calls that arrive within this long of each other share one job, and a job waits
# at most MAX_COLLECT_S for calls that keep coming.
COLLECT_S = 0.5
MAX_COLLECT_S = 10.0
T = TypeVar("T")


@dataclass
class _Waiting(Generic[T]):
    key: str
    item: T
    future: asyncio.Future[Outcome]


Group = tuple[str, str, bool]  # endpoint, model, fresh (force refresh)


class JobCollector(Generic[T]):
    """Gathers calls into one job per endpoint and model, of at most ``max_lines`` each.

    ``run(endpoint, model, items, fresh)`` runs the job over ``items`` (cache key ->
    whatever the caller needs to build and store the request) and returns each key's
    outcome; calls that force a refresh make jobs of their own (``fresh``). A key
    already waiting or in a running job is not sent again: its call shares that outcome.
    Only lines are counted here: ``run`` splits a group too big in bytes for one job.
    """

    def __init__(
        self,
        run: Callable[[str, str, dict[str, T], bool], Awaitable[dict[str, Outcome]]],
        max_lines: int,
        collect_s: float = COLLECT_S,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self._run = run
        self.max_lines = max_lines
        self.collect_s = collect_s
        self._clock = clock
        self._pending: dict[Group, list[_Waiting[T]]] = {}
        self._flushers: set[asyncio.Task[None]] = set()
        # Every key waiting or in a running job, with the future its outcome goes to.
        self._keys: dict[tuple[Group, str], asyncio.Future[Outcome]] = {}

    async def submit(
        self, endpoint: str, model: str, key: str, item: T, fresh: bool = False
    ) -> Outcome:
        """The outcome of this request, once the job it joins has ended."""
        group_key = (endpoint, model, fresh)
        known = self._keys.get((group_key, key))
        if known is not None:
            # Its first caller left (a cancelled owner, say): the line is still on its way.
            return await asyncio.shield(known)
        loop = asyncio.get_running_loop()
        waiting = _Waiting(key, item, loop.create_future())
        self._keys[(group_key, key)] = waiting.future
        waiting.future.add_done_callback(lambda _: self._keys.pop((group_key, key), None))
        group = self._pending.setdefault(group_key, [])
        group.append(waiting)
        if len(group) >= self.max_lines:
            # Full: its flusher sends it now, and the next call starts another.
            del self._pending[group_key]
        if len(group) == 1:
            task = loop.create_task(self._flush_later(group_key, group))
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await asyncio.shield(waiting.future)

    async def _flush_later(self, group_key: Group, group: list[_Waiting[T]]) -> None:
        try:
            # Wait while calls keep coming, within a bound, and no longer than a job can hold.
            deadline = self._clock.monotonic() + MAX_COLLECT_S
            seen = -1
            while (
                seen != len(group)
                and len(group) < self.max_lines
                and self._clock.monotonic() < deadline
            ):
                seen = len(group)
                await self._clock.sleep(self.collect_s)
            if self._pending.get(group_key) is group:
                del self._pending[group_key]
            items = {w.key: w.item for w in group}
            try:
                endpoint, model, fresh = group_key
                outcomes = await self._run(endpoint, model, items, fresh)
            except Exception as exc:
                log.error("batch job failed: %s", exc, exc_info=exc)
                outcomes = {k: LineFailure(type(exc).__name__, str(exc)) for k in items}
            for w in group:
                if not w.future.done():
                    w.future.set_result(outcomes[w.key])
        finally:
            # Cancelled (its loop closing, say): no waiter may be left on a group nobody flushes.
            if self._pending.get(group_key) is group:
                del self._pending[group_key]
            for w in group:
                if not w.future.done():
                    w.future.cancel()
