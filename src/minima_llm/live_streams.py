"""Streams on the wire: started once, joined by identical requests, cached when they end whole.

One ``LiveStreams`` per backend keeps each event loop's streams by cache key. A
request for a stream already on the wire follows it from its first chunk; one for
an answer being fetched whole waits for that answer and replays it as a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, replace
from typing import Any

from .cache import CacheRow, PromptCache
from .calls import (
    Call,
    Flight,
    OwnerLeft,
    payload_of,
    replay_row,
    response_of,
    store_answer,
)
from .clock import Clock
from .errors import MinimaLlmError
from .flight import Broadcast, Follower
from .loopbound import LoopBound
from .stats import LiveStats
from .streaming import ChunkAssembler, kind_of
from .types import MinimaLlmFailure, MinimaLlmResponse, Usage
from .upstream import (
    Completion,
    StreamInterrupted,
    UpstreamCaller,
    UpstreamStream,
    kept_headers,
)

log = logging.getLogger("minima_llm")


class StreamError(MinimaLlmError):
    """A stream could not be opened; ``failure`` says why."""

    def __init__(self, failure: MinimaLlmFailure) -> None:
        super().__init__(f"{failure.error_type}: {failure.message}")
        self.failure = failure


@dataclass
class ChunkStream:
    """Chunks of one streamed answer: live, joined to an identical live one, or replayed from cache."""

    request_id: str
    chunks: AsyncIterator[dict[str, Any]]
    cached: bool = False
    cache_source: str | None = None
    coalesced: bool = False
    # The upstream's identifying headers (upstream.KEPT_HEADERS), for the stream's opener.
    upstream_headers: Mapping[str, str] | None = None

    def __aiter__(self) -> AsyncIterator[dict[str, Any]]:
        return self.chunks

    @property
    def finished_at(self) -> float | None:
        """When the live stream this reads ended upstream (``time.monotonic``); None if not yet, or not live."""
        chunks = self.chunks
        return chunks.flight.finished_at if isinstance(chunks, Follower) else None

    async def aclose(self) -> None:
        """Stop reading; a live upstream stream nobody else follows is cancelled."""
        closer = getattr(self.chunks, "aclose", None)
        if closer is not None:
            await closer()


class LiveStreams:
    """The streams a backend has on the wire, per event loop, and how requests join them.

    Holds what the stream path needs of the backend (its upstream, cache, counters,
    clock and whole calls in flight), never the backend itself.
    """

    def __init__(
        self,
        upstream: UpstreamCaller,
        cache: PromptCache,
        stats: LiveStats,
        clock: Clock,
        base_url: str,
        whole: LoopBound[dict[str, Flight]],
    ) -> None:
        self.upstream = upstream
        self.cache = cache
        self.stats = stats
        self._clock = clock
        self._base_url = base_url
        self._whole = whole
        self._streams: LoopBound[dict[str, Broadcast]] = LoopBound(dict)
        # Live streams on every loop: a whole request looks for one to join only when
        # there are any, without the running-loop lookup on every call.
        self.live = 0
        # Upstream streams being closed in the background: held so they finish.
        self._closing: set[asyncio.Future[None]] = set()

    def on_wire(self, key: str) -> Broadcast | None:
        """The running loop's stream for ``key``, if one is on the wire that can still be joined."""
        if not self.live:
            return None
        flight = self._streams.get().get(key)
        return flight if flight is not None and flight.joinable else None

    async def follow_whole(
        self, call: Call, flight: Broadcast, started: float
    ) -> MinimaLlmResponse | None:
        """An identical stream in flight, read to the end and assembled; None if it breaks."""
        assembler = ChunkAssembler(kind_of(call.endpoint))
        follower = flight.follow()
        try:
            async for chunk in follower:
                assembler.add(chunk)
        except BaseException as exc:
            # The stream's failure (it did not open, broke, or its opener was cancelled)
            # is not this request's: it makes its own call. Its own cancellation is.
            if isinstance(exc, Exception) or exc is flight.error:
                return None
            raise
        finally:
            follower.close()
        self.stats.coalesced += 1
        completion = assembler.completion()
        outcome = Completion(json.dumps(completion), completion, assembler.text(0))
        latency = self._clock.monotonic() - started
        return response_of(call, outcome, Usage.from_body(completion), latency, "inflight")

    async def open(self, call: Call, started: float) -> ChunkStream | MinimaLlmFailure:
        """``open_stream`` past the cache: join an identical live stream, or start one."""
        streams = self._streams.get()
        flight = self._joinable(streams, call.key)
        coalesced = flight is not None
        headers: Mapping[str, str] | None = None
        shared = self._whole.get().get(call.key) if flight is None else None
        if shared is not None:
            # The same question is on the wire as a whole answer: stream that one.
            replayed = await self._stream_shared(call, shared)
            if replayed is not None:
                return replayed
            # Its owner left while we waited: someone may have started this stream since.
            flight = self._joinable(streams, call.key)
            coalesced = flight is not None
        if flight is None:
            flight = streams[call.key] = Broadcast()
            self.live += 1
            flight.reserve()
            try:
                headers = await self._launch(flight, call, started)
            except BaseException:
                flight.leave()
                raise
        else:
            flight.reserve()
            self.stats.coalesced += 1
        try:
            await flight.started()
        except BaseException:
            flight.leave()
            raise
        request_id = call.request.request_id
        if flight.done and not flight.published and isinstance(flight.error, StreamError):
            flight.leave()
            return replace(flight.error.failure, request_id=request_id)
        if (
            flight.done
            and not flight.published
            and isinstance(flight.error, asyncio.CancelledError)
        ):
            # The stream's opener was cancelled before the first byte, not this reader:
            # raising its cancellation here would end this reader's task as cancelled.
            flight.leave()
            self.stats.coalesced -= 1
            return await self.open(call, started)
        return ChunkStream(
            request_id, flight.follow(reserved=True), coalesced=coalesced, upstream_headers=headers
        )

    async def _stream_shared(
        self, call: Call, shared: Flight
    ) -> ChunkStream | MinimaLlmFailure | None:
        """An identical non-streamed call in flight, replayed as a stream once it answers."""
        try:
            result = await asyncio.shield(shared.joined())
        except OwnerLeft:
            return None  # its owner was cancelled: this request makes its own call
        self.stats.coalesced += 1
        request_id = call.request.request_id
        if isinstance(result, MinimaLlmFailure):
            return replace(result, request_id=request_id)
        row = CacheRow(
            call.key, result.text, result.raw_text, time.time(), call.model, call.canonical
        )
        return ChunkStream(request_id, replay_row(row, kind_of(call.endpoint)), coalesced=True)

    def _producer_done(self, flight: Broadcast, upstream: UpstreamStream, call: Call) -> None:
        """Clean up after a producer cancelled before its first step, whose own cleanup never ran."""
        if flight.done:
            return
        flight.finish(StreamInterrupted("stream cancelled: every reader left"))
        self._forget_stream(self._streams.get(), call.key, flight)
        closing = asyncio.ensure_future(upstream.aclose())  # frees the connection and its slot
        self._closing.add(closing)
        closing.add_done_callback(self._closing.discard)

    def _joinable(self, streams: dict[str, Broadcast], key: str) -> Broadcast | None:
        """The stream on the wire for ``key`` if a new reader can join it from its first chunk.

        One too long to join is forgotten here, so the new reader's own stream takes its place.
        """
        flight = streams.get(key)
        if flight is not None and not flight.joinable:
            self._forget_stream(streams, key, flight)
            return None
        return flight

    def _forget_stream(self, streams: dict[str, Broadcast], key: str, flight: Broadcast) -> None:
        if streams.get(key) is flight:
            del streams[key]
            self.live -= 1

    async def _launch(
        self, flight: Broadcast, call: Call, started: float
    ) -> Mapping[str, str] | None:
        """Open the upstream stream and start its producer; returns the headers it kept."""
        url = f"{self._base_url}/{call.endpoint}"
        payload = (
            dict(call.payload)
            if call.payload is not None
            else payload_of(call.request, call.model, call.endpoint)
        )
        payload["stream"] = True
        payload["stream_options"] = {"include_usage": True}
        try:
            opened = await self.upstream.open_stream(
                call.request.request_id, url, payload, call.api_key, call.endpoint
            )
        except BaseException as exc:
            self._forget_stream(self._streams.get(), call.key, flight)
            flight.finish(exc)
            raise
        if isinstance(opened, MinimaLlmFailure):
            self._forget_stream(self._streams.get(), call.key, flight)
            flight.finish(StreamError(opened))
            return None
        producer = asyncio.ensure_future(self._produce(flight, opened, call, started))
        flight.producer = producer
        producer.add_done_callback(lambda _: self._producer_done(flight, opened, call))
        return kept_headers(opened.resp.headers)

    async def _produce(
        self, flight: Broadcast, upstream: UpstreamStream, call: Call, started: float
    ) -> None:
        assembler = ChunkAssembler(kind_of(call.endpoint))
        streams = self._streams.get()
        try:
            async for chunk in upstream.events():
                assembler.add(chunk)
                if flight.publish(chunk):
                    # Readers are waiting for this chunk: let them send it before reading
                    # on. Chunks that came in one burst are already buffered, and reading
                    # them all first held the first one back from the client (0.46 ms of
                    # time to first token for a short answer at concurrency 1).
                    await asyncio.sleep(0)
            completion = assembler.completion()
            usage = Usage.from_body(completion)
            await store_answer(
                self.cache, self.stats, call, assembler.text(0), json.dumps(completion)
            )
            self.stats.live(usage, self._clock.monotonic() - started)
            flight.finish()
        except StreamInterrupted as exc:
            self.stats.failures += 1
            # Debug, not a warning: every reader gets the error raised, and the gateway
            # logs its own line for it, so a warning here made two of one event.
            log.debug("%s: stream interrupted, not cached: %s", call.request.request_id, exc)
            flight.finish(exc)
        except asyncio.CancelledError:
            flight.finish(StreamInterrupted("stream cancelled: every reader left"))
            raise
        except Exception as exc:
            # A chunk the assembler cannot read (ValueError) or a bug: the flight must still
            # end, as followers wait on it without a bound and the gateway sends its error
            # event only for StreamInterrupted.
            self.stats.failures += 1
            log.error(
                "%s: stream failed, not cached: %s", call.request.request_id, exc, exc_info=exc
            )
            error = StreamInterrupted(f"stream failed: {exc}")
            error.__cause__ = exc
            flight.finish(error)
        finally:
            # Idempotent; acts only if a BaseException other than cancellation escaped.
            flight.finish(StreamInterrupted("stream producer stopped"))
            self._forget_stream(streams, call.key, flight)
            await upstream.aclose()
