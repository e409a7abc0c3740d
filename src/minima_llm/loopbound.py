"""Async primitives created lazily for whichever event loop is running.

One backend outlives several ``asyncio.run()`` calls; a semaphore or future made
under the first loop cannot be awaited under the second, so each loop gets its own.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class LoopBound(Generic[T]):
    """One ``T`` per running event loop, made by ``factory`` on first use."""

    def __init__(self, factory: Callable[[], T]) -> None:
        self._factory = factory
        self._per_loop: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, T] = (
            weakref.WeakKeyDictionary()
        )
        self._last: tuple[asyncio.AbstractEventLoop, T] | None = None

    def get(self) -> T:
        """The instance for the running loop (must be called from a coroutine)."""
        loop = asyncio.get_running_loop()
        last = self._last
        if last is not None and last[0] is loop:
            return last[1]
        value = self._per_loop.get(loop)
        if value is None:
            value = self._factory()
            self._per_loop[loop] = value
        # Holding the loop strongly here is fine: it is dropped when another loop asks.
        self._last = (loop, value)
        return value
