"""The in-flight bound: at most ``limit`` requests hold a slot at once, first come first served."""

from __future__ import annotations

import asyncio
import collections


class Slots:
    """A counting semaphore for one event loop whose free path is a plain call.

    ``asyncio.Semaphore`` does the same job, but every acquire is a coroutine and
    scans the waiters even when a slot is free; every upstream request takes one.
    A released slot passes straight to the longest waiter, so newcomers never jump
    the queue.
    """

    __slots__ = ("_waiters", "free", "limit")

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"Slots: limit must be at least 1, got {limit}")
        self.limit = limit
        self.free = limit
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()

    @property
    def waiting(self) -> int:
        """Tasks queued for a slot."""
        return sum(not f.done() for f in self._waiters)

    def try_take(self) -> bool:
        """Take a slot if one is free now (and nobody queued first); no waiting."""
        if self.free > 0 and not self._waiters:
            self.free -= 1
            return True
        return False

    async def take(self) -> None:
        """Wait for a slot, in arrival order."""
        if self.try_take():
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut
        except asyncio.CancelledError:
            if fut.cancelled():
                self._waiters.remove(fut)
            else:
                # The slot was handed over as the cancellation arrived: pass it on.
                self.release()
            raise

    def release(self) -> None:
        """Give a slot back: to the longest waiter, else to the pool."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)
                return
        if self.free >= self.limit:
            raise RuntimeError("Slots: released more slots than were taken")
        self.free += 1

    def __repr__(self) -> str:
        return f"<Slots free={self.free}/{self.limit} waiting={self.waiting}>"
