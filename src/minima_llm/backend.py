"""``OpenAIMinimaLlm``: the async backend with cache, coalescing, pacing and retries."""

from __future__ import annotations

import asyncio
import random
from collections.abc import Sequence
from contextvars import ContextVar
from typing import Any

from .cache import CacheHit, PromptCache, cache_key
from .clock import SYSTEM_CLOCK, Clock
from .config import MinimaLlmConfig
from .context import get_force_refresh, set_last_cached
from .http import Transport, make_transport
from .loopbound import LoopBound
from .stats import LiveStats, StatsSnapshot
from .types import MinimaLlmFailure, MinimaLlmRequest, MinimaLlmResponse, MinimaLlmResult, Usage
from .upstream import Completion, UpstreamCaller

# Keys computed while a batch prefetched its cache rows, by request identity, so
# each request's canonical JSON is built once per batch, not twice.
_batch_keys: ContextVar[dict[int, tuple[str, str]] | None] = ContextVar(
    "minima_llm_batch_keys", default=None
)


class OpenAIMinimaLlm:
    """Async client for an OpenAI-compatible chat completions endpoint."""

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
        self.stats = LiveStats()
        self.transport = transport or make_transport(config.transport, config.max_outstanding)
        self.cache = cache or PromptCache.open(
            config.cache_dir, config.cache_lookup_dirs, config.model_synonyms, config.trace_file
        )
        self.upstream = UpstreamCaller(config, self.transport, clock, self.stats, rng)
        self._clock = clock
        self._inflight: LoopBound[dict[str, asyncio.Future[MinimaLlmResult]]] = LoopBound(dict)
        self._url = config.chat_completions_url

    @property
    def config(self) -> MinimaLlmConfig:
        """The configuration this backend was built with."""
        return self.cfg

    @classmethod
    def from_env(cls) -> OpenAIMinimaLlm:
        """A backend configured from environment variables."""
        return cls(MinimaLlmConfig.from_env())

    def key_for(self, request: MinimaLlmRequest) -> tuple[str, str]:
        """``(key, canonical)`` of a request under the model it will be sent to."""
        model = request.model or self.cfg.model
        return cache_key(
            model, request.messages, request.temperature, request.max_tokens, request.extra
        )

    def snapshot(self) -> StatsSnapshot:
        """The live statistics."""
        return self.stats.snapshot()

    async def generate(
        self, request: MinimaLlmRequest, force_refresh: bool = False
    ) -> MinimaLlmResult:
        """Answer from the cache or the upstream; upstream trouble comes back as a failure."""
        self.stats.requests += 1
        started = self._clock.monotonic()
        model = request.model or self.cfg.model
        keys = _batch_keys.get()
        key, canonical = (keys.get(id(request)) if keys else None) or self.key_for(request)
        refresh = force_refresh or self.cfg.force_refresh or get_force_refresh()
        if self.cache.enabled and not refresh:
            hit = await self._find(key, model, request)
            if hit is not None:
                self.cache.note(key, canonical, hit.source)
                set_last_cached(True)
                return self._from_hit(request, hit, started)
        self.cache.note(key, canonical, "refresh" if refresh else "miss")
        set_last_cached(False)
        return await self._coalesced(request, key, canonical, model, started)

    async def _find(self, key: str, model: str, request: MinimaLlmRequest) -> CacheHit | None:
        def rekey(other: str) -> tuple[str, str]:
            return cache_key(
                other, request.messages, request.temperature, request.max_tokens, request.extra
            )

        try:
            return await self.cache.find(key, model, rekey)
        except Exception as exc:
            # A broken cache must not stop the work: log it, count it, ask the upstream.
            self.stats.cache_errors += 1
            _log_cache_error("read", exc)
            return None

    def _from_hit(
        self, request: MinimaLlmRequest, hit: CacheHit, started: float
    ) -> MinimaLlmResponse:
        row = hit.row
        usage = _usage_of(row.response_raw)
        self.stats.hit(hit.source, usage)
        return MinimaLlmResponse(
            request_id=request.request_id,
            text=row.response_text,
            cached=True,
            raw_text=row.response_raw,
            usage=usage,
            latency_s=self._clock.monotonic() - started,
            cache_source=hit.source,
            model=row.model,
        )

    async def _coalesced(
        self, request: MinimaLlmRequest, key: str, canonical: str, model: str, started: float
    ) -> MinimaLlmResult:
        inflight = self._inflight.get()
        shared = inflight.get(key)
        if shared is not None:
            # An identical request is already on the wire: share its answer.
            self.stats.coalesced += 1
            result = await asyncio.shield(shared)
            return _for_request(result, request.request_id)
        fut: asyncio.Future[MinimaLlmResult] = asyncio.get_running_loop().create_future()
        inflight[key] = fut
        try:
            result = await self._live(request, key, canonical, model, started)
        except BaseException as exc:
            if not fut.done():
                fut.set_exception(exc)
                fut.exception()  # mark retrieved: joiners re-raise it, nobody else must
            raise
        finally:
            inflight.pop(key, None)
        fut.set_result(result)
        return result

    async def _live(
        self, request: MinimaLlmRequest, key: str, canonical: str, model: str, started: float
    ) -> MinimaLlmResult:
        outcome = await self.upstream.complete(
            request.request_id, self._url, _payload(request, model)
        )
        if isinstance(outcome, MinimaLlmFailure):
            return outcome
        await self._store(key, canonical, model, outcome)
        latency = self._clock.monotonic() - started
        usage = Usage.from_body(outcome.body)
        self.stats.live(usage, latency)
        return MinimaLlmResponse(
            request_id=request.request_id,
            text=outcome.text,
            cached=False,
            raw_text=outcome.body_text,
            usage=usage,
            latency_s=latency,
            cache_source=None,
            model=model,
        )

    async def _store(self, key: str, canonical: str, model: str, outcome: Completion) -> None:
        try:
            await self.cache.store(key, canonical, model, outcome.text, outcome.body_text)
        except Exception as exc:
            # The answer arrived and the caller gets it; losing it to a cache fault would be worse.
            self.stats.cache_errors += 1
            _log_cache_error("write", exc)

    async def run_batched(self, requests: Sequence[MinimaLlmRequest]) -> list[MinimaLlmResult]:
        """Answer many requests with the batch runner; results in input order."""
        from .runner import run_batched_callable

        requests = list(requests)
        keys = {id(r): self.key_for(r) for r in requests}
        token = _batch_keys.set(keys)
        try:
            if not (self.cfg.force_refresh or get_force_refresh()):
                try:
                    await self.cache.prefetch([k for k, _ in keys.values()])
                except Exception as exc:
                    self.stats.cache_errors += 1
                    _log_cache_error("prefetch", exc)
            results: list[Any] = await run_batched_callable(
                requests, self.generate, self.cfg.batch, stats=self.snapshot
            )
        finally:
            _batch_keys.reset(token)
            self.cache.clear_prefetched()
        return results

    async def aclose(self) -> None:
        """Close connections and the cache (pending writes are committed first)."""
        await self.transport.aclose()
        await self.cache.aclose()

    async def __aenter__(self) -> OpenAIMinimaLlm:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<OpenAIMinimaLlm {self._url} model={self.cfg.model!r} {self.stats!r} {self.upstream.pacer!r} {self.upstream.cooldown!r}>"


def _payload(request: MinimaLlmRequest, model: str) -> dict[str, Any]:
    payload: dict[str, Any] = dict(request.extra or {})
    payload["model"] = model
    payload["messages"] = list(request.messages)
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.max_tokens is not None:
        payload["max_tokens"] = request.max_tokens
    return payload


def _usage_of(raw: str | None) -> Usage:
    if not raw:
        return Usage()
    import json

    try:
        body = json.loads(raw)
    except ValueError:
        return Usage()
    return Usage.from_body(body)


def _for_request(result: MinimaLlmResult, request_id: str) -> MinimaLlmResult:
    from dataclasses import replace

    return result if result.request_id == request_id else replace(result, request_id=request_id)


def _log_cache_error(what: str, exc: BaseException) -> None:
    import logging

    logging.getLogger("minima_llm.cache").error(
        "cache %s failed, continuing without it: %s", what, exc
    )
