"""The in-flight bound: at most ``limit`` requests hold a slot at once, first come first served.

The limit adapts to the server: it halves when the server refuses for overload
(a 503 from a server whose concurrency is smaller than ours) and grows back by one
per window of successes, up to the configured ``max_outstanding``. Without that,
every worker released by a cooldown hits a small server at once, most are refused,
and the cooldown doubles again: a storm that never ends.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import math
import threading


class Slots:
    """A counting semaphore whose free path is a plain call, shared by every event loop.

    ``asyncio.Semaphore`` does the same job, but every acquire is a coroutine and
    scans the waiters even when a slot is free; every upstream request takes one.
    A released slot passes straight to the longest waiter, so newcomers never jump
    the queue. One backend may serve loops running at once in threads (DSPy's sync
    calls): the count is kept under a lock, and a slot passed to another loop's
    waiter is handed over on that loop.
    """

    __slots__ = (
        "_credit",
        "_held_by",
        "_lock",
        "_shrunk_at",
        "_waiters",
        "held",
        "limit",
        "max",
        "shrinks",
    )

    def __init__(self, limit: int) -> None:
        if limit < 1:
            raise ValueError(f"Slots: limit must be at least 1, got {limit}")
        self.max = limit
        self.limit = limit
        self.held = 0
        self.shrinks = 0
        self._credit = 0.0
        self._shrunk_at = -math.inf
        self._waiters: collections.deque[asyncio.Future[None]] = collections.deque()
        self._lock = threading.Lock()
        # Slots held per event loop: a loop closed with requests still holding some
        # (its tasks never finished) must not shrink the bound for every later loop.
        self._held_by: dict[asyncio.AbstractEventLoop, int] = {}

    @property
    def free(self) -> int:
        """Slots that may be taken now."""
        return max(0, self.limit - self.held)

    @property
    def waiting(self) -> int:
        """Tasks queued for a slot."""
        return sum(not f.done() for f in self._waiters)

    def try_take(self) -> bool:
        """Take a slot if one is free now (and nobody queued first); no waiting."""
        with self._lock:
            if self.held < self.limit and not self._waiters:
                self.held += 1
                # _count(loop, 1) inline: every request passes here.
                held_by, loop = self._held_by, asyncio.get_running_loop()
                held_by[loop] = held_by.get(loop, 0) + 1
                return True
            return False

    def _count(self, loop: asyncio.AbstractEventLoop, change: int) -> None:
        """Slots ``loop`` holds go up or down by ``change`` (lock held)."""
        held_by = self._held_by
        left = held_by.get(loop, 0) + change
        if left > 0:
            held_by[loop] = left
        else:
            held_by.pop(loop, None)

    def _reclaim(self) -> None:
        """Free what loops that closed still held or waited for (lock held)."""
        for loop in [loop for loop in self._held_by if loop.is_closed()]:
            self.held -= self._held_by.pop(loop)
        # A closed loop's waiter never leaves: at the head it would keep every newcomer
        # queued (ones further back are skipped when their turn comes, by _pass_to).
        waiters = self._waiters
        while waiters and (waiters[0].done() or waiters[0].get_loop().is_closed()):
            waiters.popleft()
        # What was freed goes to those already waiting, first come first served.
        while self.held < self.limit and waiters:
            if self._pass_to(waiters.popleft()):
                self.held += 1

    async def take(self, timeout_s: float | None = None) -> bool:
        """Wait for a slot, in arrival order; False if none came within ``timeout_s``."""
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[None] = loop.create_future()
        with self._lock:
            if self.held >= self.limit or self._waiters:
                self._reclaim()  # before waiting: the slots or the queue may be a dead loop's
            if self.held < self.limit and not self._waiters:
                self.held += 1
                self._count(loop, 1)
                return True
            self._waiters.append(fut)
        # The timer fails the waiter's future rather than cancelling it, so a timeout
        # is never mistaken for (or swallows) a cancellation of the waiting task.
        timer = loop.call_later(timeout_s, _expire, fut) if timeout_s is not None else None
        try:
            await fut
        except _Expired:
            self._forget(fut)
            return False
        except asyncio.CancelledError:
            if fut.cancelled():
                # A release may have popped it already: then the hand-over, finding it
                # cancelled, passes the slot on.
                self._forget(fut)
            else:
                # The slot was handed over as the cancellation arrived: pass it on.
                self.release()
            raise
        finally:
            if timer is not None:
                timer.cancel()
        return True

    def _forget(self, fut: asyncio.Future[None]) -> None:
        with self._lock, contextlib.suppress(ValueError):
            self._waiters.remove(fut)

    def release(self, took_on: asyncio.AbstractEventLoop | None = None) -> None:
        """Give a slot back: to the longest waiter if the limit allows, else to the pool.

        ``took_on`` is the loop the slot was taken on, for a holder that may let go
        elsewhere (a stream closed from another thread); the running loop by default.
        """
        with self._lock:
            if self.held <= 0:
                raise RuntimeError("Slots: released more slots than were taken")
            held_by, loop = self._held_by, took_on or _running_loop()
            if loop is not None and (left := held_by.get(loop, 0) - 1) >= 0:
                if left:  # _count(loop, -1) inline, as in try_take
                    held_by[loop] = left
                else:
                    del held_by[loop]
            elif held_by:
                # Given back outside the loop that took it (another thread, or none): some
                # loop's count still drops, so the counts keep adding up to ``held`` and a
                # reclaim never frees a slot twice.
                self._count(next(iter(held_by)), -1)
            if self.held <= self.limit:
                while self._waiters:
                    if self._pass_to(self._waiters.popleft()):
                        return  # the slot passes on: held stays the same
            self.held -= 1

    def _pass_to(self, fut: asyncio.Future[None]) -> bool:
        """Hand a slot to a popped waiter (lock held); False if nobody is there to take it."""
        if fut.done():
            return False  # expired or cancelled: its task has let go already
        loop = fut.get_loop()
        if loop is _running_loop():
            fut.set_result(None)
            self._count(loop, 1)
            return True
        if loop.is_closed():
            return False
        try:
            loop.call_soon_threadsafe(self._hand_over, fut)
        except RuntimeError:  # it closed just now, in its own thread
            return False
        # Counted as the waiter's loop's now: if that loop closes before the hand-over
        # runs, the reclaim frees the slot.
        self._count(loop, 1)
        return True

    def _hand_over(self, fut: asyncio.Future[None]) -> None:
        """On the waiter's own loop: its slot, or, if it stopped waiting meanwhile, the next one's."""
        if fut.done():
            self.release()
        else:
            fut.set_result(None)

    def overloaded(self, sent_at: float, now: float) -> bool:
        """The server refused a request sent at ``sent_at`` for overload: halve the limit.

        Refusals of requests sent before the last halving were already on the wire
        when it happened, so one burst of refusals halves the limit once. Returns
        whether the limit had room to shrink (False once one at a time is refused too).
        """
        with self._lock:
            if sent_at < self._shrunk_at:
                return True
            if self.limit == 1:
                return False
            self.limit = max(1, self.limit // 2)
            self._credit = 0.0
            self._shrunk_at = now
            self.shrinks += 1
            return True

    def succeeded(self) -> None:
        """One request went through: grow the limit by one per ``limit`` successes."""
        if self.limit >= self.max:
            return  # the common case, without the lock; checked again under it
        with self._lock:
            if self.limit >= self.max:
                return
            self._credit += 1.0 / self.limit
            if self._credit >= 1.0:
                self._credit = 0.0
                self.limit += 1
                while self.held < self.limit and self._waiters:
                    if self._pass_to(self._waiters.popleft()):
                        self.held += 1

    def __repr__(self) -> str:
        return (
            f"<Slots held={self.held} limit={self.limit}/{self.max} "
            f"waiting={self.waiting} shrinks={self.shrinks}>"
        )


class _Expired(Exception):
    """A wait for a slot that ran out of time."""


def _running_loop() -> asyncio.AbstractEventLoop | None:
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def _expire(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_exception(_Expired())
