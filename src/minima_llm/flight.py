"""One upstream stream shared by every identical request that arrives while it runs."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

# Chunks a stream keeps for readers who join late. Each parsed chunk holds about 1.7 KB,
# so a 30,000-token answer from a reasoning model would hold some 50 MB while it runs.
# Past this many, the stream takes no new readers and drops what its readers have read.
JOINABLE_CHUNKS = 4_096
# How often (in chunks) a stream past that point drops what its readers are done with.
_TRIM_EVERY = 256


class Broadcast:
    """Chunks of one stream, replayed to each follower from the first one on.

    The producer task publishes chunks and finally finishes (with or without an
    error). When the last follower leaves before the end, the producer is
    cancelled so the upstream connection and its slot are freed. Past
    ``joinable_chunks`` chunks it takes no new followers (``joinable`` turns false)
    and keeps only the chunks some follower has still to read.
    """

    def __init__(self, joinable_chunks: int = JOINABLE_CHUNKS) -> None:
        # The chunks still held; ``base`` is the index of the first in the whole stream.
        self.chunks: list[dict[str, Any]] = []
        self.base = 0
        self._joinable_chunks = joinable_chunks
        self._readers: set[Follower] = set()
        self.done = False
        self.error: BaseException | None = None
        # When the upstream stream ended: a reader's own pace must not count as the upstream's.
        self.finished_at: float | None = None
        self.followers = 0
        self.producer: asyncio.Task[None] | None = None
        self._waiters: list[asyncio.Future[None]] = []
        self._on_finish: list[Callable[[Broadcast], None]] = []

    def publish(self, chunk: dict[str, Any]) -> bool:
        """Add a chunk and wake the followers; whether any was waiting for it."""
        self.chunks.append(chunk)
        past = self.published - self._joinable_chunks
        if past > 0 and (past == 1 or past % _TRIM_EVERY == 0):
            self._trim()
        return self._wake()

    @property
    def published(self) -> int:
        """Chunks published so far, including those already dropped."""
        return self.base + len(self.chunks)

    @property
    def joinable(self) -> bool:
        """Whether a new reader may still join from the first chunk."""
        return self.published <= self._joinable_chunks

    def _trim(self) -> None:
        # A reservation has no position yet (its reader follows from the first chunk
        # once the stream starts), so nothing is dropped while one is outstanding.
        if self.followers != len(self._readers):
            return
        read = min((r.position for r in self._readers), default=self.published)
        # The newest chunk stays: the gateway reads a finished stream's usage from its tail.
        drop = min(read, self.published - 1) - self.base
        if drop > 0:
            del self.chunks[:drop]
            self.base += drop

    def finish(self, error: BaseException | None = None) -> None:
        """End the stream; followers raise ``error`` after the chunks, if given."""
        if not self.done:
            self.done, self.error = True, error
            self.finished_at = time.monotonic()
            self._wake()
            callbacks, self._on_finish = self._on_finish, []
            for callback in callbacks:
                callback(self)

    def when_finished(self, callback: Callable[[Broadcast], None]) -> None:
        """Call ``callback(self)`` once the stream ends (at once if it has ended)."""
        if self.done:
            callback(self)
        else:
            self._on_finish.append(callback)

    async def started(self) -> None:
        """Wait until the first chunk arrives or the stream ends."""
        while not self.published and not self.done:
            await self._wait()

    def reserve(self) -> None:
        """Count a reader who will follow once the stream starts.

        Between asking for the stream and its first chunk a reader does not follow
        yet; without the reservation, another reader leaving in that window would
        find no followers and cancel the stream under it.
        """
        self.followers += 1

    def follow(self, reserved: bool = False) -> Follower:
        """A reader of every chunk from the first (``reserved``: counted already by ``reserve``)."""
        # Never so for a reserved reader: nothing is dropped while a reservation waits.
        if self.base:
            raise RuntimeError("a stream past its joinable length has dropped its first chunks")
        return Follower(self, reserved)

    def leave(self) -> None:
        """A follower stopped reading; the last one to leave cancels an unfinished producer."""
        self.followers -= 1
        if self.followers == 0 and not self.done and self.producer is not None:
            self.producer.cancel()

    async def _wait(self) -> None:
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        await fut

    def _wake(self) -> bool:
        waiters, self._waiters = self._waiters, []
        for fut in waiters:
            if not fut.done():
                fut.set_result(None)
        return bool(waiters)

    def __repr__(self) -> str:
        state = "done" if self.done else "live"
        held = f" held={len(self.chunks)}" if self.base else ""
        return f"<Broadcast {state} chunks={self.published}{held} followers={self.followers}>"


class Follower:
    """One reader of a ``Broadcast``.

    A class rather than an async generator: a generator that was never started
    runs no cleanup on ``aclose()``, so a client that left before the first chunk
    would keep the upstream stream (and its slot) alive to the end.
    """

    def __init__(self, flight: Broadcast, reserved: bool = False) -> None:
        self._flight = flight
        self._index = 0
        self._left = False
        if not reserved:
            flight.followers += 1
        flight._readers.add(self)

    @property
    def position(self) -> int:
        """How many chunks this reader has taken."""
        return self._index

    @property
    def flight(self) -> Broadcast:
        """The stream this reader follows."""
        return self._flight

    def __aiter__(self) -> Follower:
        return self

    async def __anext__(self) -> dict[str, Any]:
        flight = self._flight
        while True:
            if self._left:
                raise StopAsyncIteration
            at = self._index - flight.base
            if at < len(flight.chunks):
                self._index += 1
                return flight.chunks[at]
            if flight.done:
                self.close()
                if flight.error is not None:
                    raise flight.error
                raise StopAsyncIteration
            try:
                await flight._wait()
            except BaseException:
                self.close()
                raise

    def close(self) -> None:
        """Stop following (idempotent)."""
        if not self._left:
            self._left = True
            self._flight._readers.discard(self)
            self._flight.leave()

    async def aclose(self) -> None:
        """Stop following (idempotent)."""
        self.close()
