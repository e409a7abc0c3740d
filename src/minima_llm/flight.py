"""One upstream stream shared by every identical request that arrives while it runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any


class Broadcast:
    """Chunks of one stream, replayed to each follower from the first one on.

    The producer task publishes chunks and finally finishes (with or without an
    error). When the last follower leaves before the end, the producer is
    cancelled so the upstream connection and its slot are freed.
    """

    def __init__(self) -> None:
        self.chunks: list[dict[str, Any]] = []
        self.done = False
        self.error: BaseException | None = None
        self.followers = 0
        self.producer: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []

    def publish(self, chunk: dict[str, Any]) -> None:
        """Add a chunk and wake the followers."""
        self.chunks.append(chunk)
        self._wake()

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream; followers raise ``error`` after the chunks, if given."""
        if not self.done:
            self.done, self.error = True, error
            self._wake()

    async def started(self) -> None:
        """Wait until the first chunk arrives or the stream ends."""
        while not self.chunks and not self.done:
            await self._wait()

    async def follow(self) -> AsyncIterator[dict[str, Any]]:
        """Every chunk from the first, then the rest as they come."""
        self.followers += 1
        index = 0
        try:
            while True:
                while index < len(self.chunks):
                    yield self.chunks[index]
                    index += 1
                if self.done:
                    if self.error is not None:
                        raise self.error
                    return
                await self._wait()
        finally:
            self.followers -= 1
            if self.followers == 0 and not self.done and self.producer is not None:
                self.producer.cancel()

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _wake(self) -> None:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)

    def __repr__(self) -> str:
        state = "done" if self.done else "live"
        return f"<Broadcast {state} chunks={len(self.chunks)} followers={self.followers}>"
