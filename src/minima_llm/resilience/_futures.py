"""Waking a waiter that may belong to another event loop, in another thread.

One backend serves every loop that uses it, and loops run at once in threads (DSPy's
sync calls, ``dspy.Parallel``): a waiter handed its turn by another thread's request
must be woken through its own loop, never by setting its future from outside.
"""

from __future__ import annotations

import asyncio
import contextlib


def wake(fut: asyncio.Future[None]) -> bool:
    """Resolve ``fut`` on its own loop; False if that loop has closed (nobody to wake)."""
    loop = fut.get_loop()
    if loop.is_closed():
        return False
    running = None
    with contextlib.suppress(RuntimeError):
        running = asyncio.get_running_loop()
    if loop is running:
        _resolve(fut)
        return True
    try:
        loop.call_soon_threadsafe(_resolve, fut)
    except RuntimeError:  # it closed just now, in its own thread
        return False
    return True


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
