"""A bound on one await, without a task of its own where the Python allows."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import TypeVar

T = TypeVar("T")


async def bounded(awaitable: Awaitable[T], timeout_s: float) -> T:
    """``await awaitable``, raising ``asyncio.TimeoutError`` after ``timeout_s``.

    ``asyncio.timeout`` where there is one (3.11+): it makes no task, and tells its
    own cancellation from anyone else's. Python 3.10 has only ``wait_for``.
    """
    if _TIMEOUT is None:
        return await asyncio.wait_for(awaitable, timeout_s)
    async with _TIMEOUT(timeout_s):
        return await awaitable


_TIMEOUT = getattr(asyncio, "timeout", None)  # looked up once, not on every stream
