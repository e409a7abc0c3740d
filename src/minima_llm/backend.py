"""``OpenAIMinimaLlm``: the async backend with cache, coalescing, pacing and retries."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import random
from collections.abc import AsyncIterator, Callable, Mapping, Sequence
from dataclasses import replace
from types import EllipsisType
from typing import Any

from .batch_mode import job_result, run_collected, send_jobs
from .cache import CacheHit, Prefetched, PromptCache, cache_key
from .calls import (
    BATCH,
    CHAT,
    BatchScope,
    Call,
    Flight,
    OwnerLeft,
    fault_log,
    joined,
    payload_of,
    replay_row,
    response_of,
    store_answer,
    stored_body,
    text_of_row,
    usage_of,
)
from .clock import SYSTEM_CLOCK, Clock
from .config import MinimaLlmConfig
from .context import get_force_refresh, set_last_cached
from .http import Proxy, ProxyRules, Transport, make_transport
from .jobs import BATCHABLE, JobCollector, Outcome, ProviderJobs
from .live_streams import ChunkStream, LiveStreams, StreamError
from .loopbound import LoopBound
from .progress import ProgressSink, ProgressTarget
from .stats import LiveStats, StatsSnapshot
from .streaming import kind_of
from .types import MinimaLlmFailure, MinimaLlmRequest, MinimaLlmResponse, MinimaLlmResult, Usage
from .upstream import (
    UpstreamCaller,
    request_headers,
)

# ChunkStream and StreamError live with the stream path; importing them from here still works.
__all__ = ["ChunkStream", "OpenAIMinimaLlm", "StreamError"]

log = logging.getLogger("minima_llm")


# Identical live streams a whole request follows, one after another as each breaks.
_STREAMS_TO_FOLLOW = 3


class OpenAIMinimaLlm:
    """Async client for an OpenAI-compatible endpoint."""

    def __init__(
        self,
        config: MinimaLlmConfig,
        *,
        transport: Transport | None = None,
        cache: PromptCache | None = None,
        clock: Clock = SYSTEM_CLOCK,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = config
        # Batch mode (parasail.llm_batch_prefix set): cache misses go to the provider's
        # batch API, at about half the price of live calls, instead of being sent live.
        self.jobs = jobs = ProviderJobs(config, clock=clock) if config.parasail.enabled else None
        # One per event loop: DSPy's synchronous LM calls asyncio.run in each of its
        # threads, and a future may only be resolved on (and by) its own loop.
        self._collectors: LoopBound[JobCollector[tuple[OpenAIMinimaLlm, Call]]] | None = (
            LoopBound(lambda: JobCollector(run_collected, jobs.max_lines))
            if jobs is not None
            else None
        )
        self.stats = LiveStats()
        headers = request_headers(config)
        # The proxy the *_proxy variables give for base_url (None: direct); one that
        # cannot be used fails here, naming the variable, not at the first request.
        # A transport passed in may have rules of its own (a StdlibTransport built by
        # hand reads the environment too); the health check and banner follow them.
        proxies = (
            ProxyRules.from_environ() if transport is None else getattr(transport, "proxies", None)
        )
        self.proxy: Proxy | None = (
            proxies.for_url(config.base_url) if isinstance(proxies, ProxyRules) else None
        )
        # The transport learns the headers most requests carry, so it need not merge them each time.
        self.transport = transport or make_transport(
            config.transport,
            config.max_outstanding,
            headers,
            max_response_bytes=config.max_response_bytes,
            proxies=proxies,
        )
        self.cache = cache or PromptCache.open(
            config.cache_dir,
            config.cache_lookup_dirs,
            config.model_synonyms,
            config.trace_file,
            config.memory_cache_entries,
        )
        self.cache.on_lookup_error = _counting_into(self.stats)
        self.upstream = UpstreamCaller(config, self.transport, clock, self.stats, rng, headers)
        self._clock = clock
        self._inflight: LoopBound[dict[str, Flight]] = LoopBound(dict)
        self.streams = LiveStreams(
            self.upstream, self.cache, self.stats, clock, config.base_url, self._inflight
        )

    @property
    def config(self) -> MinimaLlmConfig:
        """The configuration this backend was built with."""
        return self.cfg

    @classmethod
    def from_env(cls) -> OpenAIMinimaLlm:
        """A backend configured from environment variables."""
        return cls(MinimaLlmConfig.from_env())

    def key_for(
        self, request: MinimaLlmRequest, key_extra: Mapping[str, Any] | None = None
    ) -> tuple[str, str]:
        """``(key, canonical)`` of a request under the model it will be sent to.

        ``key_extra`` joins ``extra`` in the key only (never sent upstream): the
        gateway uses it to keep endpoints and tenants apart.
        """
        model = request.model or self.cfg.model
        extra = {**(request.extra or {}), **key_extra} if key_extra else request.extra
        return cache_key(model, request.messages, request.temperature, request.max_tokens, extra)

    def snapshot(self) -> StatsSnapshot:
        """The live statistics, with the server's limits pacing live calls."""
        snap = self.stats.snapshot()
        pace = self.upstream.pace()
        return snap if pace is None else replace(snap, pace=pace)

    def _prepare(
        self,
        request: MinimaLlmRequest,
        endpoint: str,
        key_extra: Mapping[str, Any] | None,
        store: bool,
        api_key: str | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> Call:
        batch = BATCH.get()
        computed = batch.keys.get(id(request)) if batch is not None and not key_extra else None
        key, canonical = computed or self.key_for(request, key_extra)
        model = request.model or self.cfg.model
        return Call(request, endpoint, model, key, canonical, store, key_extra, api_key, payload)

    def _refresh(self, force_refresh: bool) -> bool:
        return force_refresh or self.cfg.force_refresh or get_force_refresh()

    async def generate(
        self, request: MinimaLlmRequest, force_refresh: bool = False
    ) -> MinimaLlmResult:
        """Answer a chat request from the cache or the upstream; upstream trouble comes back as a failure."""
        return await self.call(request, force_refresh=force_refresh)

    async def call(
        self,
        request: MinimaLlmRequest,
        *,
        endpoint: str = CHAT,
        force_refresh: bool = False,
        store: bool = True,
        key_extra: Mapping[str, Any] | None = None,
        api_key: str | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> MinimaLlmResult:
        """``generate`` for any endpoint (``chat/completions``, ``completions``, ``embeddings``).

        ``store=False`` answers without writing the cache; ``api_key`` replaces the
        configured key for this call (a gateway passing its caller's key through);
        ``payload`` is sent upstream as it is instead of a body built from ``request``,
        which still decides the cache key (a gateway forwarding its caller's body).
        """
        self.stats.requests += 1
        started = self._clock.monotonic()
        call = self._prepare(request, endpoint, key_extra, store, api_key, payload)
        if self.jobs is not None:
            batch = BATCH.get()
            if batch is not None and batch.answered and call.key in batch.answered:
                self._noted(call, None, False)  # traced as the miss it was
                shared = call.key in batch.delivered
                batch.delivered.add(call.key)
                outcome = batch.answered[call.key]
                return job_result(self.stats, self._clock, call, outcome, batch.job_started, shared)
        refresh = self._refresh(force_refresh)
        # Decided without a coroutine when no I/O is needed (memory, batch prefetch, no cache).
        found = self._lookup_now(call, refresh)
        hit = await self._lookup_slow(call, refresh) if found is ... else found
        if hit is not None:
            return self._from_hit(request, hit, started)
        followed = None
        # The same question may be streaming right now: take its answer whole. If that
        # stream breaks (its opener left, say), a reader of it may have started another;
        # a few of those, and this request stops waiting on others and asks itself.
        for _ in range(_STREAMS_TO_FOLLOW):
            flight = self.streams.on_wire(call.key) if self.streams.live else None
            if flight is None or flight is followed:
                break
            whole = await self.streams.follow_whole(call, flight, started)
            if whole is not None:
                return whole
            followed = flight
        return await self._coalesced(call, started, refresh)

    def _lookup_now(self, call: Call, refresh: bool) -> CacheHit | EllipsisType | None:
        """The hit or None (traced, context variable set) when no I/O is needed; else ``...``."""
        if refresh or not self.cache.enabled:
            return self._noted(call, None, refresh)
        batch = BATCH.get()
        known = batch.known if batch is not None else None
        found = self.cache.find_now(call.key, call.model, known)
        return found if found is ... else self._noted(call, found, refresh)

    async def _lookup_slow(self, call: Call, refresh: bool) -> CacheHit | None:
        return self._noted(call, await self._find(call), refresh)

    def _noted(self, call: Call, hit: CacheHit | None, refresh: bool) -> CacheHit | None:
        source = hit.source if hit else ("refresh" if refresh else "miss")
        self.cache.note(call.key, call.canonical, source)
        set_last_cached(hit is not None)
        return hit

    async def _find(self, call: Call, known: Prefetched | None = None) -> CacheHit | None:
        request = call.request

        def rekey(other: str) -> tuple[str, str]:
            # With the call's key-only fields: a synonym must not reach another tenant's rows.
            return (
                self.key_for(replace(request, model=other), call.key_extra)
                if other != call.model
                else (call.key, call.canonical)
            )

        try:
            if known is None:
                batch = BATCH.get()
                known = batch.known if batch is not None else None
            return await self.cache.find(call.key, call.model, rekey, known, call.store)
        except Exception as exc:
            # A broken cache must not stop the work: log it, count it, ask the upstream.
            self.stats.cache_errors += 1
            # A cache that cannot be read fails every lookup of a run.
            fault_log(self.cache, "read").log("cache read failed, asking the upstream: %s", exc)
            return None

    async def _cached(self, call: Call, known: Prefetched) -> CacheHit | None:
        """The cached answer for ``call`` given prefetched rows, reading more only if needed."""
        found = self.cache.find_now(call.key, call.model, known)
        return await self._find(call, known) if found is ... else found

    def _from_hit(
        self, request: MinimaLlmRequest, hit: CacheHit, started: float
    ) -> MinimaLlmResponse:
        row = hit.row
        raw = stored_body(row.response_raw)
        usage = usage_of(raw)
        self.stats.hit(hit.source, usage)
        return MinimaLlmResponse(
            request_id=request.request_id,
            text=text_of_row(row, raw),
            cached=True,
            raw_text=raw,
            usage=usage,
            latency_s=self._clock.monotonic() - started,
            cache_source=hit.source,
            model=row.model,
        )

    async def _coalesced(
        self, call: Call, started: float, refresh: bool = False
    ) -> MinimaLlmResult:
        inflight = self._inflight.get()
        flight = inflight.get(call.key)
        if flight is not None:
            # An identical request is already on the wire: share its answer.
            self.stats.coalesced += 1
            try:
                shared = await asyncio.shield(flight.joined())
            except OwnerLeft:
                # Its owner was cancelled, not this request: ask again (join or go live).
                self.stats.coalesced -= 1
                return await self._coalesced(call, started, refresh)
            return joined(shared, call.request.request_id)
        flight = inflight[call.key] = Flight()
        try:
            result = await self._live(call, started, refresh)
        except asyncio.CancelledError:
            # The owner's own timeout or cancellation is no failure of the requests that joined.
            flight.fail(OwnerLeft())
            raise
        except BaseException as exc:
            flight.fail(exc)
            raise
        finally:
            if inflight.get(call.key) is flight:
                del inflight[call.key]
        flight.succeed(result)
        return result

    async def _live(self, call: Call, started: float, refresh: bool = False) -> MinimaLlmResult:
        request = call.request
        if self._collectors is not None and call.endpoint in BATCHABLE:
            # Batch mode, one call at a time (DSPy, say): calls close together share a job.
            job = await self._collectors.get().submit(
                call.endpoint, call.model, call.key, (self, call), refresh
            )
            return job_result(self.stats, self._clock, call, job, started)
        url = f"{self.cfg.base_url}/{call.endpoint}"
        # Without extra fields the canonical JSON of the key is itself a valid chat
        # body for the same question: send it rather than encode the request twice.
        body: bytes | None = None
        payload: Mapping[str, Any] = {}
        if call.payload is not None:
            payload = call.payload
        elif call.endpoint == CHAT and not request.extra and not call.key_extra:
            body = call.canonical.encode("ascii")
        else:
            payload = payload_of(request, call.model, call.endpoint)
        outcome = await self.upstream.complete(
            request.request_id, url, payload, call.endpoint, call.api_key, body
        )
        if isinstance(outcome, MinimaLlmFailure):
            return outcome
        if call.store:
            await store_answer(self.cache, self.stats, call, outcome.text, outcome.body_text)
        latency = self._clock.monotonic() - started
        usage = Usage.from_body(outcome.body)
        self.stats.live(usage, latency)
        return response_of(call, outcome, usage, latency)

    async def open_stream(
        self,
        request: MinimaLlmRequest,
        *,
        endpoint: str = CHAT,
        force_refresh: bool = False,
        store: bool = True,
        key_extra: Mapping[str, Any] | None = None,
        api_key: str | None = None,
        payload: Mapping[str, Any] | None = None,
    ) -> ChunkStream | MinimaLlmFailure:
        """Start a streamed answer: from the cache, joined to an identical live stream, or live.

        Retries happen before the first byte; a failure to open comes back as a
        ``MinimaLlmFailure``. A stream that completes is cached whole; one cut off
        raises ``StreamInterrupted`` to its readers and is not cached.
        """
        self.stats.requests += 1
        started = self._clock.monotonic()
        call = self._prepare(request, endpoint, key_extra, store, api_key, payload)
        refresh = self._refresh(force_refresh)
        found = self._lookup_now(call, refresh)
        hit = await self._lookup_slow(call, refresh) if found is ... else found
        if hit is not None:
            self._from_hit(request, hit, started)
            chunks = replay_row(hit.row, kind_of(endpoint))
            return ChunkStream(request.request_id, chunks, cached=True, cache_source=hit.source)
        return await self.streams.open(call, started)

    async def stream(
        self, request: MinimaLlmRequest, force_refresh: bool = False
    ) -> AsyncIterator[dict[str, Any]]:
        """Chat completion chunks as they arrive; raises ``StreamError`` if the stream cannot open."""
        opened = await self.open_stream(request, force_refresh=force_refresh)
        if isinstance(opened, MinimaLlmFailure):
            raise StreamError(opened)
        async with contextlib.aclosing(opened):
            async for chunk in opened:
                yield chunk

    async def run_batched(
        self, requests: Sequence[MinimaLlmRequest], *, progress: ProgressTarget = None
    ) -> list[MinimaLlmResult]:
        """Answer many requests with the batch runner; results in input order.

        ``progress`` is where heartbeats and failures go: a logger, a stream,
        ``False`` for silence, or stderr by default.
        """
        from .runner import run_batched_callable

        requests = list(requests)
        batch = BatchScope({id(r): self.key_for(r) for r in requests}, Prefetched())
        # Rows this process stores meanwhile (this batch's, another's) are hits in it,
        # those stored while the read below runs included.
        self.cache.track(batch.known)
        try:
            if not self._refresh(False):
                await self._prefetch([k for k, _ in batch.keys.values()], batch.known)
            if self.jobs is not None:
                # Every miss goes in one provider job up front; the runner then hands out
                # its answers (and reports its failures) like any other batch's.
                batch.job_started = self._clock.monotonic()
                batch.answered = await self._run_jobs(requests, batch, progress)
            token = BATCH.set(batch)
            try:
                results: list[Any] = await run_batched_callable(
                    requests, self.generate, self.cfg.batch, progress=progress, stats=self.snapshot
                )
            finally:
                BATCH.reset(token)
        finally:
            self.cache.untrack(batch.known)
        return results

    async def _run_jobs(
        self, requests: list[MinimaLlmRequest], batch: BatchScope, progress: ProgressTarget
    ) -> dict[str, Outcome]:
        """Send the batch's cache misses as provider jobs (one per model); each key's outcome."""
        refresh = self._refresh(False)
        groups: dict[str, dict[str, tuple[OpenAIMinimaLlm, Call]]] = {}
        token = BATCH.set(batch)
        try:
            for request in requests:
                call = self._prepare(request, CHAT, None, True)
                if call.key in groups.get(call.model, {}):
                    continue
                if not refresh and await self._cached(call, batch.known) is not None:
                    continue
                groups.setdefault(call.model, {})[call.key] = (self, call)
        finally:
            BATCH.reset(token)
        provider = self.jobs
        assert provider is not None  # run_batched calls this in batch mode only
        return await send_jobs(provider, groups, refresh, ProgressSink(progress).report)

    async def lookup_many(
        self, requests: Sequence[MinimaLlmRequest]
    ) -> list[MinimaLlmResponse | None]:
        """Cached answers to many requests, read together; None where the cache has none.

        A hit is answered, counted and traced exactly as ``generate`` would answer
        it; a miss has no effect at all (nothing counted, traced or sent), so the
        caller can hand it to ``generate`` or to anything else afterwards.
        Force refresh (config or context) makes every request a miss.
        """
        if self._refresh(False) or not self.cache.enabled:
            return [None] * len(requests)
        calls = [self._prepare(request, CHAT, None, True) for request in requests]
        known = await self._prefetch([call.key for call in calls])
        answers: list[MinimaLlmResponse | None] = []
        for call in calls:
            started = self._clock.monotonic()
            # Inline, not _cached: a replay of thousands of hits pays for a coroutine each.
            found = self.cache.find_now(call.key, call.model, known)
            hit = await self._find(call, known) if found is ... else found
            if hit is None:
                answers.append(None)
                continue
            self.stats.requests += 1
            self.cache.note(call.key, call.canonical, hit.source)
            answers.append(self._from_hit(call.request, hit, started))
        return answers

    async def _prefetch(self, keys: list[str], into: Prefetched | None = None) -> Prefetched:
        try:
            return await self.cache.prefetch(keys, into)
        except Exception as exc:
            self.stats.cache_errors += 1
            log.error("cache prefetch failed, looking up one by one: %s", exc)
            return Prefetched()

    async def aclose(self) -> None:
        """Close connections and the cache (pending writes are committed first).

        The backend stays usable: as in minima-llm 0.2.x, the next request opens
        the connections and the cache again.
        """
        try:
            await self.transport.aclose()
        finally:
            # Pending writes are answers callers already have: commit them even if closing the transport failed.
            await self.cache.aclose()

    async def __aenter__(self) -> OpenAIMinimaLlm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return (
            f"<OpenAIMinimaLlm {self.cfg.base_url} model={self.cfg.model!r} {self.stats!r} "
            f"{self.upstream.pacer!r} {self.upstream.cooldown!r} {self.upstream.overload!r}>"
        )


def _counting_into(stats: LiveStats) -> Callable[[Exception], None]:
    """A lookup error counter on ``stats`` alone: holding the backend would make a cycle."""

    def count(_: Exception) -> None:
        stats.cache_errors += 1

    return count
