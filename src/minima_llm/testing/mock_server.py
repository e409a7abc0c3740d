"""An OpenAI-compatible aiohttp server with latency, limits and fault injection, for tests."""

from __future__ import annotations

import asyncio
import functools
import json
import random
import ssl
from collections.abc import Awaitable, Callable, Mapping
from types import TracebackType
from typing import Any

from aiohttp import web

from ._batches import BatchStore, add_batch_routes
from ._config import MockConfig
from ._control import add_control_routes
from ._dspy_replies import DSPyReplies
from ._embeddings import render_embeddings
from ._faults import Fault, FaultQueue, draw_fault
from ._ratelimit import TokenBucket, format_duration
from ._replies import (
    CREATED,
    Reply,
    RequestError,
    dumps,
    error_body,
    parse_chat,
    parse_completion,
    render,
    render_stream,
)
from ._stats import MockStats

Build = Callable[[bytes, str], Reply | bytes]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

_OVERLOADED = error_body(
    "mock: too many concurrent requests", type="server_error", code="overloaded"
)
_HEALTH = dumps({"status": "ok"})
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
# How many SSE events a truncated or reset stream gets out before the abort: the role
# chunk and one content chunk, so clients have started assembling a message.
_EVENTS_BEFORE_ABORT = 2
# The default listen backlog (128) overflows when benchmarks open thousands of connections.
_BACKLOG = 2048
# aiohttp's 1 MiB default would answer long-context prompts with a bare 413.
_MAX_BODY_BYTES = 64 * 1024 * 1024


class MockServer:
    """OpenAI-compatible mock server; ``await start()`` or ``async with`` it.

    State lives on the event loop that runs it; from another thread use
    :func:`run_mock_server_in_thread`, which marshals calls onto that loop.
    """

    def __init__(self, config: MockConfig | None = None, *, shutdown_timeout: float = 1.0) -> None:
        self._stats = MockStats()
        self._faults = FaultQueue()
        self._dspy = DSPyReplies()
        self._batches = BatchStore(self._builds(), lambda: self._config)
        self._shutdown_timeout = shutdown_timeout
        self._runner: web.AppRunner | None = None
        self.host = "127.0.0.1"
        self.scheme = "http"
        self.port: int | None = None
        # The last inference request's headers, kept as aiohttp's view (no copy per request).
        self._last_headers: Mapping[str, str] = {}
        self._last_body = b""
        self._install(config or MockConfig())

    def __repr__(self) -> str:
        state = "running" if self._runner is not None else "stopped"
        where = f" {self.url}" if self.port is not None else ""
        return f"<MockServer {state}{where} {self._stats!r} pending_faults={len(self._faults)}>"

    @property
    def config(self) -> MockConfig:
        """The configuration in force."""
        return self._config

    @property
    def root_url(self) -> str:
        """``http://host:port`` without the ``/v1`` prefix."""
        if self.port is None:
            raise RuntimeError("MockServer is not started")
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"

    @property
    def url(self) -> str:
        """The OpenAI base URL, ``http://host:port/v1``."""
        return self.root_url + "/v1"

    def set_config(self, config: MockConfig) -> None:
        """Replace the configuration: refills the rate bucket and reseeds the fault draws."""
        self._install(config)

    def update_config(self, **changes: Any) -> MockConfig:
        """Replace only the named fields of the configuration and return the result."""
        self._install(self._config.merge(changes))
        return self._config

    @property
    def last_headers(self) -> dict[str, str]:
        """The headers of the last inference request, names lower-cased (what a client sent)."""
        return {name.lower(): value for name, value in self._last_headers.items()}

    @property
    def last_body(self) -> Any:
        """The JSON body of the last inference request, parsed (what a client sent)."""
        return json.loads(self._last_body) if self._last_body else None

    def stats(self) -> dict[str, Any]:
        """A snapshot of the request counters; ``batch_lines`` counts answered batch lines."""
        return {**self._stats.snapshot(), "batch_lines": self._batches.lines}

    def reset(self) -> None:
        """Zero the counters, drop scripted faults, files and batches, restart limits and draws."""
        self._stats.reset()
        self._faults.clear()
        self._dspy.reset()
        self._batches.reset()
        self._install(self._config)

    def fail_next(self, count: int = 1, **fault: Any) -> int:
        """Give the next ``count`` inference requests a fault (see :class:`Fault`)."""
        if count < 1:
            raise ValueError(f"count must be >= 1, got {count!r}")
        return self.queue_fault(Fault.create(**fault), count)

    def queue_fault(self, fault: Fault, count: int = 1) -> int:
        """Queue ``fault`` for the next ``count`` inference requests; return how many are pending."""
        return self._faults.push(fault, count)

    def build_app(self) -> web.Application:
        """The aiohttp application, for callers that run it themselves."""
        app = web.Application(client_max_size=_MAX_BODY_BYTES)
        for route, build in self._builds().items():
            handler = self._inference_handler(route, build)
            app.router.add_post(route.removeprefix("/v1"), handler)
            app.router.add_post(route, handler)
        for prefix in ("", "/v1"):
            app.router.add_get(prefix + "/models", self._models)
        app.router.add_get("/health", self._health)
        add_control_routes(app, self)
        add_batch_routes(app, self._batches, self._stats)
        return app

    def _builds(self) -> dict[str, Build]:
        # One table for the live routes and batch lines, so both give the same answers.
        return {
            "/v1/chat/completions": functools.partial(parse_chat, responder=self._dspy.reply),
            "/v1/completions": parse_completion,
            "/v1/embeddings": render_embeddings,
        }

    async def start(
        self, host: str = "127.0.0.1", port: int = 0, ssl_context: ssl.SSLContext | None = None
    ) -> MockServer:
        """Listen on ``host:port`` (0 picks a free port) and set ``url`` and ``port``.

        With ``ssl_context`` it serves HTTPS, for testing clients' TLS.
        """
        if self._runner is not None:
            raise RuntimeError("MockServer is already started")
        runner = web.AppRunner(
            self.build_app(),
            access_log=None,
            # Cancel handlers whose client went away, so timeouts free their slot.
            handler_cancellation=True,
            shutdown_timeout=self._shutdown_timeout,
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, host, port, backlog=_BACKLOG, ssl_context=ssl_context).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        self.scheme = "https" if ssl_context is not None else "http"
        self.host = host
        self.port = int(runner.addresses[0][1])
        return self

    async def stop(self) -> None:
        """Stop listening and close connections; in-flight requests get ``shutdown_timeout``."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        if self._runner is None:
            await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.stop()

    def _install(self, config: MockConfig) -> None:
        # Everything derived from the config is computed here, once, not per request.
        self._config = config
        self._bucket = TokenBucket(config.rpm) if config.rpm else None
        self._token_bucket = (
            TokenBucket(config.tpm, unit="tokens", burst_s=config.tpm_burst_s)
            if config.tpm
            else None
        )
        self._random_faults = config.has_random_faults
        self._rng = random.Random(config.seed)
        self._latency_rng = random.Random(f"{config.seed}/latency")
        self._models_body = dumps(
            {
                "object": "list",
                "data": [
                    {
                        "id": config.model,
                        "object": "model",
                        "created": CREATED,
                        "owned_by": "minima-llm-mock",
                    }
                ],
            }
        )
        self._rate_limited_body = error_body(
            f"mock: rate limit of {config.rpm} requests per minute reached",
            type="requests",
            code="rate_limit_exceeded",
        )

    def _json(
        self, status: int, body: bytes, headers: Mapping[str, str] | None = None
    ) -> web.Response:
        self._stats.answered(status)
        return web.Response(
            status=status, body=body, headers=headers, content_type="application/json"
        )

    def _inference_handler(self, route: str, build: Build) -> Handler:
        async def handler(request: web.Request) -> web.StreamResponse:
            return await self._inference(request, route, build)

        return handler

    async def _inference(
        self, request: web.Request, route: str, build: Build
    ) -> web.StreamResponse:
        stats, config = self._stats, self._config
        stats.request(route)
        self._last_headers = request.headers
        self._last_body = await request.read()
        try:
            result = build(self._last_body, config.model)
        except RequestError as exc:
            return self._json(400, error_body(exc.message, param=exc.param))
        headers: dict[str, str] | None = None
        # Scripted faults skip the limits so a test gets exactly the fault it asked for.
        fault = self._faults.pop()
        if fault is None:
            if config.max_concurrency and stats.concurrency >= config.max_concurrency:
                stats.overloaded += 1
                return self._json(503, _OVERLOADED)
            if self._bucket is not None or self._token_bucket is not None:
                headers, refusal = self._limit(result)
                if refusal is not None:
                    stats.rate_limited += 1
                    return self._json(429, refusal, headers)
            if self._random_faults:
                fault = draw_fault(self._rng, config)
        stats.enter()
        try:
            await self._delay(config)
            if fault is not None:
                return await self._fault(request, fault, result, headers)
            events, stream = _events(result)
            if stream:
                return await self._stream(request, events, headers)
            return self._json(200, events[0], headers)
        finally:
            stats.concurrency -= 1

    def _limit(self, result: Reply | bytes) -> tuple[dict[str, str] | None, bytes | None]:
        """The rate-limit headers for this request, and the 429 body if a limit refuses it."""
        headers: dict[str, str] = {}
        refusal = None
        bucket, tokens = self._bucket, self._token_bucket
        if bucket is not None:
            admitted = bucket.try_acquire()
            headers.update(bucket.headers(limited=not admitted))
            if not admitted:
                refusal = self._rate_limited_body
        if tokens is not None and refusal is None and isinstance(result, Reply):
            cost = result.charged_tokens
            too_large = cost > tokens.capacity
            admitted = not too_large and tokens.try_acquire(cost)
            headers.update(tokens.headers(limited=not admitted and not too_large, cost=cost))
            if not admitted:
                refusal = self._token_refusal(tokens, cost, too_large)
        return (headers if self._config.rate_limit_headers else None), refusal

    def _token_refusal(self, tokens: TokenBucket, cost: int, too_large: bool) -> bytes:
        # OpenAI's wording: a client can tell a request no wait will admit by "too large".
        limit = f"on tokens per min (TPM): Limit {tokens.rpm}"
        if too_large:
            # Say what refused it: the bucket (the limit's share of --tpm-burst-s), which
            # is smaller than the per-minute limit named first.
            message = (
                f"Request too large for {self._config.model} {limit}, Requested {cost}."
                f" This server's bucket holds {tokens.capacity:g} tokens at most"
                " (raise --tpm-burst-s to admit larger requests)."
                " The input or output tokens must be reduced in order to run successfully."
            )
        else:
            wait = format_duration(tokens.seconds_until(cost))
            message = (
                f"Rate limit reached for {self._config.model} {limit}, Requested {cost}."
                f" Please try again in {wait}."
            )
        return error_body(message, type="tokens", code="rate_limit_exceeded")

    async def _delay(self, config: MockConfig) -> None:
        delay = config.latency_s
        if config.latency_jitter_s:
            delay += self._latency_rng.uniform(0.0, config.latency_jitter_s)
        if delay > 0:
            await asyncio.sleep(delay)

    async def _fault(
        self,
        request: web.Request,
        fault: Fault,
        result: Reply | bytes,
        headers: dict[str, str] | None,
    ) -> web.StreamResponse:
        stats = self._stats
        if fault.mode == "status":
            stats.failures += 1
            stats.answered(fault.status)
            return web.Response(
                status=fault.status,
                body=fault.body,
                headers=dict(fault.headers),
                content_type=None if fault.sets_content_type else "application/json",
            )
        if fault.mode == "timeout":
            stats.timeouts += 1
            await asyncio.sleep(fault.sleep_s)
        events, stream = _events(result)
        if fault.mode in ("reset", "truncate_stream"):
            stats.resets += 1
            return await self._abort(request, events, headers, stream)
        if fault.mode == "malformed":
            stats.malformed += 1
            events = _corrupt(events, stream)
        if stream:
            return await self._stream(request, events, headers)
        return self._json(200, events[0], headers)

    async def _stream(
        self, request: web.Request, events: list[bytes], headers: Mapping[str, str] | None
    ) -> web.StreamResponse:
        response = await self._start_stream(request, headers)
        self._stats.answered(200)
        delay = self._config.stream_chunk_delay_s
        try:
            if not delay:
                await response.write(b"".join(events))
                return response
            for event in events:
                await response.write(event)
                await asyncio.sleep(delay)
        except ConnectionError:
            pass  # the client hung up mid-stream; aiohttp closes the connection
        return response

    async def _start_stream(
        self, request: web.Request, headers: Mapping[str, str] | None
    ) -> web.StreamResponse:
        response = web.StreamResponse(headers={**_SSE_HEADERS, **(headers or {})})
        await response.prepare(request)
        self._stats.streams += 1
        return response

    async def _abort(
        self,
        request: web.Request,
        events: list[bytes],
        headers: dict[str, str] | None,
        stream: bool,
    ) -> web.StreamResponse:
        if stream:
            response = await self._start_stream(request, headers)
            partial = b"".join(events[:_EVENTS_BEFORE_ABORT])
        else:
            body = events[0]
            json_headers = {"Content-Type": "application/json", "Content-Length": str(len(body))}
            response = web.StreamResponse(headers={**(headers or {}), **json_headers})
            await response.prepare(request)
            partial = body[: len(body) // 2]
        await response.write(partial)
        # abort() drops the socket without sending the rest; the client sees a payload error.
        if request.transport is not None:
            request.transport.abort()
        return response

    async def _models(self, request: web.Request) -> web.Response:
        self._stats.request("/v1/models")
        return self._json(200, self._models_body)

    async def _health(self, request: web.Request) -> web.Response:
        self._stats.request("/health")
        return self._json(200, _HEALTH)


def _events(result: Reply | bytes) -> tuple[list[bytes], bool]:
    """The body as SSE events when streamed, else as one element; and whether it streams."""
    if isinstance(result, bytes):
        return [result], False
    if result.stream:
        return render_stream(result), True
    return [render(result)], False


def _corrupt(events: list[bytes], stream: bool) -> list[bytes]:
    if not stream:
        return [events[0][: len(events[0]) // 2]]
    # Cut the first content chunk's JSON in half but keep the SSE framing intact.
    broken = events[1][: len(events[1]) // 2] + b"\n\n"
    return [events[0], broken, *events[2:]]
