"""Request handlers: translate HTTP to the backend's request path and back."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import math
import time
from collections.abc import Awaitable, Mapping
from typing import Any

from aiohttp import web

from .._version import __version__
from ..deadline import bounded
from ..flight import Broadcast, Follower
from ..live_streams import ChunkStream
from ..streaming import encode_event
from ..types import MinimaLlmFailure, MinimaLlmResponse, Usage
from ..upstream import StreamInterrupted
from .errors import (
    REFUSALS,
    ClientLeft,
    RequestError,
    error_body,
    error_response,
    failure_response,
    upstream_error_of,
)
from .gateway import Gateway, client_gone, take_back_cancel
from .normalize import CHAT, COMPLETIONS, EMBEDDINGS, Parsed, key_extra, parse_body
from .settings import ProxySettings

GATEWAY: web.AppKey[Gateway] = web.AppKey("gateway", Gateway)


def _request_key(name: str) -> Any:
    # aiohttp >= 3.13 warns (NotAppKeyWarning) on str keys in request storage, which
    # is an error under -W error; older versions have no RequestKey and no warning.
    maker = getattr(web, "RequestKey", None)
    return maker(name, str) if maker is not None else name


CLIENT_KEY = _request_key("client_key")  # the caller's API key, for pass-through
REQUEST_ID = _request_key("request_id")  # the gateway's id for the request (RequestIds)
TENANT = _request_key("tenant")  # the caller's cache partition

_DONE = b"data: [DONE]\n\n"
# What clients may disconnect with while we write to them.
_GONE = (ConnectionResetError, ConnectionError)
# How soon a stream first looks whether its client is still there; the looks then space
# out to _WATCH_MAX_S, so a long wait for a first token (seconds from a busy model, for
# each of hundreds of streams) costs a few wake-ups, not one every 0.1 s.
_WATCH_S = 0.1
_WATCH_MAX_S = 1.0
log = logging.getLogger("minima_llm.proxy")


async def _json_body(request: web.Request, settings: ProxySettings) -> Any:
    limit = settings.max_body_bytes
    declared = request.content_length
    if declared is not None and declared > limit and not request.headers.get("Content-Encoding"):
        # Refused before a byte of it is read: waiting for a body we would refuse anyway
        # ties up a connection (and, at a slow sender's pace, a handler) for nothing.
        raise RequestError(
            413, f"request body of {declared} bytes is over the limit of {limit} bytes", close=True
        )
    try:
        # A body that came whole with the headers (nearly all of them) needs no timer.
        if request.content.is_eof():
            raw = await request.read()
        else:
            raw = await _read_slowly(request, limit, settings.client_timeout_s)
    except web.RequestPayloadError as exc:
        # A body aiohttp cannot decode (Content-Encoding: gzip over bytes that are not
        # gzip) is the caller's mistake, not an internal error with a traceback.
        reason = getattr(exc.__cause__, "message", None) or str(exc)
        raise RequestError(400, f"request body could not be read: {reason}") from exc
    except ConnectionResetError as exc:
        raise ClientLeft() from exc
    try:
        # As json.loads reads bytes (UTF-8, -16 or -32), with the one decoder built below.
        body = _DECODER.decode(raw.decode(json.detect_encoding(raw), "surrogatepass"))
    except (ValueError, UnicodeDecodeError) as exc:
        if "int_max_str_digits" in str(exc):
            # Python's own wording names an interpreter setting the caller cannot change.
            raise RequestError(400, "request body has a number too long to read") from exc
        raise RequestError(400, f"request body is not valid JSON: {exc}") from exc
    except RecursionError as exc:
        raise RequestError(400, "request body is nested too deeply") from exc
    # Fewer brackets than the limit cannot nest past it: most bodies skip the walk.
    if raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH and _depth_over(body, MAX_JSON_DEPTH):
        raise RequestError(400, f"request body is nested more than {MAX_JSON_DEPTH} levels deep")
    return body


# The slowest average a request body may arrive at, after the first client_timeout_s.
MIN_BODY_RATE = 1000


async def _read_slowly(request: web.Request, limit: int, idle_s: float) -> bytes:
    """The body, each piece within ``idle_s`` of the last: a slow but steady sender gets in.

    One bound on the whole read would refuse a large body on a slow link that never
    stalled. A sender must still keep up ``MIN_BODY_RATE`` on average after its first
    ``idle_s``: a byte just inside every ``idle_s`` would otherwise hold a handler for
    as long as the body limit lasts. The size limit is checked as pieces come
    (decompressed, if encoded).
    """
    body = bytearray()
    content = request.content
    loop = asyncio.get_running_loop()
    started = loop.time()
    while True:
        # The time the bytes so far have earned: idle_s, and a second per MIN_BODY_RATE.
        earned = started + idle_s + len(body) / MIN_BODY_RATE - loop.time()
        try:
            piece = await bounded(content.readany(), min(idle_s, earned))
        except asyncio.TimeoutError:
            # Both rules and what came: which one ended it is a matter of milliseconds.
            took = loop.time() - started
            raise RequestError(
                408,
                f"the request body stopped arriving: {len(body)} bytes in {took:.1f}s"
                f" (a body may pause at most {idle_s:g}s, and must average"
                f" {MIN_BODY_RATE} bytes/s after its first {idle_s:g}s)",
                code="request_timeout",
                close=True,
            ) from None
        if not piece:
            return bytes(body)
        body += piece
        if len(body) > limit:
            raise RequestError(413, f"request body is over the limit of {limit} bytes", close=True)


# json stops at the interpreter's recursion limit, about 1,000 levels before 3.12 and
# 10,000 on 3.13: a limit of our own refuses the same bodies on every Python.
MAX_JSON_DEPTH = 512


def _depth_over(body: Any, limit: int) -> bool:
    """Whether arrays and objects in ``body`` nest more than ``limit`` levels deep."""
    stack = [(body, 1)] if isinstance(body, (dict, list)) else []
    while stack:
        value, depth = stack.pop()
        if depth > limit:
            return True
        children = value.values() if isinstance(value, dict) else value
        stack.extend((child, depth + 1) for child in children if isinstance(child, (dict, list)))
    return False


# Python's json reads NaN, Infinity and 1e400 (as inf), none of which is JSON (RFC 8259
# section 6): let through, they would be forwarded upstream as the literal NaN or Infinity.
def _finite(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"number {text} is out of range")
    return value


def _not_json(literal: str) -> Any:
    raise ValueError(f"{literal} is not a JSON value")


# Built once: json.loads given parse_float builds a decoder and its scanner on every call.
_DECODER = json.JSONDecoder(parse_float=_finite, parse_constant=_not_json)


def _inference(endpoint: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        gw = request.app[GATEWAY]
        started = time.monotonic()
        body = await _json_body(request, gw.settings)
        parsed = parse_body(
            endpoint,
            body,
            gw.config.model,
            gw.settings.force_model,
            gw.settings.strict_params,
            request.headers,
        )
        options: dict[str, Any] = {
            "endpoint": endpoint,
            "force_refresh": parsed.no_cache,
            "store": not parsed.no_store,
            "key_extra": key_extra(endpoint, request.get(TENANT)),
            "api_key": request.get(CLIENT_KEY) if gw.settings.pass_through_client_key else None,
            "payload": parsed.payload,
        }
        if parsed.stream:
            return await _stream(request, gw, parsed, options, started)
        # Looked after by the gateway's sweep while it waits, for a client that leaves.
        # request.task is the task running this handler (and cheaper than current_task).
        task = request.task
        sweep = gw.sweep
        waiting = sweep.waiting
        waiting[task] = (request, parsed.request, options)
        if sweep.timer is None:
            sweep.start()
        try:
            result = await gw.backend.call(parsed.request, **options)
        except asyncio.CancelledError:
            if sweep.took_back(task):
                # Nobody reads this; the sweep counted the disconnect.
                return error_response(499, "client closed the request before it was answered")
            why = gw.took_back_cut_off(asyncio.current_task())
            if why is None:
                raise
            return _shut_down_response(request, gw, parsed, started, why)
        finally:
            del waiting[task]
        resp = _answer(gw, parsed, result, started, request)
        if isinstance(resp.body, bytes) and len(resp.body) > _SLICE_BYTES:
            return await _send_in_slices(request, resp, gw)
        return resp

    return handler


# An answer past the connection's usual high-water mark (64 KiB) can wait on its client:
# it goes in slices of this size, each bounded, rather than as one unbounded write.
_SLICE_BYTES = 64 * 1024


async def _send_in_slices(
    request: web.Request, resp: web.Response, gw: Gateway
) -> web.StreamResponse:
    """Send a large answer here, dropping a client that takes none of it for the client timeout.

    aiohttp would write it whole after the handler and wait for it with no bound; one
    bound on the whole transfer would cut a client that reads steadily but slowly.
    """
    assert isinstance(resp.body, bytes)
    body = resp.body
    out = web.StreamResponse(status=resp.status, headers=resp.headers)
    out.content_length = len(body)
    send = _Sender(out, request, gw.settings.client_timeout_s)
    try:
        await out.prepare(request)
        for at in range(0, len(body), _SLICE_BYTES):
            await send(body[at : at + _SLICE_BYTES])
        await send.eof()
    except _GONE:
        gw.metrics.client_disconnects += 1
    return out


def _label(parsed: Parsed, cached: bool, coalesced: bool) -> str:
    if cached:
        return "hit"
    if coalesced:
        return "coalesced"
    return "refresh" if parsed.no_cache else "miss"


def _answer(
    gw: Gateway,
    parsed: Parsed,
    result: MinimaLlmResponse | MinimaLlmFailure,
    started: float,
    request: web.Request,
) -> web.Response:
    latency = time.monotonic() - started
    if isinstance(result, MinimaLlmFailure):
        key = request.get(CLIENT_KEY) if gw.settings.pass_through_client_key else None
        resp = failure_response(result, gw.retry_after_s(result, key))
        upstream = result.upstream_headers
        if upstream is not None:
            resp.headers.update(upstream)  # the failed call's id, for the provider's support
        gw.log.answered(
            "refused" if result.error_type in REFUSALS else "failed",
            request.path,
            parsed.model,
            resp.status,
            latency,
            f"{result.error_type}: {result.message}{_upstream_said(result)}"
            + _upstream_id(upstream),
            request[REQUEST_ID],
        )
        return resp
    label = _label(parsed, result.cached, result.cache_source == "inflight")
    gw.metrics.count_answer(
        label, result.usage, _token_source(label), None if result.cached else result.latency_s
    )
    # The provider's headers go to the request whose call it answered; one that joined
    # that call is named by the gateway alone, as a stream that joined another is.
    upstream = result.upstream_headers if label != "coalesced" else None
    gw.log.answered(
        label,
        request.path,
        parsed.model,
        200,
        latency,
        f"tokens={result.usage.prompt_tokens}+{result.usage.completion_tokens}"
        + _upstream_id(upstream),
        request[REQUEST_ID],
    )
    headers = {"x-minima-cache": _header(label)}
    if upstream is not None:
        # Passed on so a caller can quote the provider's request id. Not x-ratelimit-*:
        # those are the gateway's own account's limits, which it paces itself.
        headers.update(upstream)
    return web.Response(
        body=_body(result, parsed.endpoint), content_type="application/json", headers=headers
    )


# As much of an upstream's error message as a log line carries.
_SAID_CHARS = 200


def _upstream_said(failure: MinimaLlmFailure) -> str:
    """`` (what the upstream said)`` for a log line: its error's code and message, else its body's start.

    "HTTP 400" alone leaves an operator to guess between a context overflow, a bad
    parameter and a model that does not exist.
    """
    error = upstream_error_of(failure)
    if error is not None and isinstance(error.get("message"), str):
        code = error.get("code") or error.get("type")
        said = f"{code}: {error['message']}" if isinstance(code, str) else error["message"]
    elif failure.body_snippet:
        said = failure.body_snippet  # not OpenAI-shaped (a proxy's page), or cut short
    else:
        return ""
    said = " ".join(said.split())
    return f" ({said[:_SAID_CHARS]}{'...' if len(said) > _SAID_CHARS else ''})"


def _upstream_id(upstream: Mapping[str, str] | None) -> str:
    """`` upstream_id=...`` for a log line, when the upstream named its answer."""
    named = upstream.get("x-request-id") if upstream is not None else None
    return f" upstream_id={named}" if named else ""


def _body(result: MinimaLlmResponse, endpoint: str) -> bytes:
    if result.raw_text:
        return result.raw_text.encode("utf-8")
    # A row from an older cache may hold only the text; clients still need OpenAI's shape.
    choice: dict[str, Any] = (
        {"message": {"role": "assistant", "content": result.text}}
        if endpoint == CHAT
        else {"text": result.text}
    )
    completion = {
        "id": f"cached-{result.request_id}",
        "object": "chat.completion" if endpoint == CHAT else "text_completion",
        "created": int(time.time()),
        "model": result.model or "",
        "choices": [{"index": 0, **choice, "finish_reason": "stop"}],
    }
    return json.dumps(completion).encode("utf-8")


def _token_source(label: str) -> str:
    return {"hit": "cache", "coalesced": "coalesced"}.get(label, "upstream")


def _header(label: str) -> str:
    return "miss" if label == "coalesced" else label


async def _stream(
    request: web.Request, gw: Gateway, parsed: Parsed, options: dict[str, Any], started: float
) -> web.StreamResponse:
    """A streamed answer, watched for its client leaving from the first step to the last.

    aiohttp does not cancel a handler whose client left, and nothing is written before
    the first chunk (a stalled upstream, a queue for a slot, retries) nor while the
    upstream sends only SSE comments (``: keep-alive``, which reset the per-read
    timeout and give the client nothing): without the watch a stream nobody reads
    would keep its upstream slot, perhaps for good. The watch is a timer, not a task
    beside the stream.
    """
    watch = _ClientWatch(request)
    try:
        try:
            opened = await gw.backend.open_stream(parsed.request, **options)
        except asyncio.CancelledError:
            if watch.took_back():
                gw.metrics.client_disconnects += 1
                return error_response(499, "client closed the request before the stream opened")
            why = gw.took_back_cut_off(asyncio.current_task())
            if why is None:
                raise
            return _shut_down_response(request, gw, parsed, started, why)
        if isinstance(opened, MinimaLlmFailure):
            return _answer(gw, parsed, opened, started, request)
        try:
            return await _send_stream(request, gw, parsed, opened, started, watch)
        finally:
            watch.stop()  # before the close: a look must not cancel it halfway
            await opened.aclose()
    finally:
        watch.stop()


async def _send_stream(
    request: web.Request,
    gw: Gateway,
    parsed: Parsed,
    opened: ChunkStream,
    started: float,
    watch: _ClientWatch,
) -> web.StreamResponse:
    label = _label(parsed, opened.cached, opened.coalesced)
    headers = {
        "Content-Type": "text/event-stream",
        "Cache-Control": "no-cache",
        "x-minima-cache": _header(label),
    }
    if opened.upstream_headers is not None:
        headers.update(opened.upstream_headers)  # as for a whole answer: see _answer
    resp = web.StreamResponse(headers=headers)
    usage = Usage()
    send = _Sender(resp, request, gw.settings.client_timeout_s)
    try:
        await resp.prepare(request)
        usage = await _pump(send, opened, parsed.include_usage)
        await send(_DONE)
        await send.eof()
    except StreamInterrupted as exc:
        # What follows only writes, and a write notices a client gone by itself.
        watch.stop()
        gw.metrics.streams_interrupted += 1
        gw.log.answered(
            "failed",
            request.path,
            parsed.model,
            502,
            time.monotonic() - started,
            f"stream interrupted, not cached: {exc}" + _upstream_id(opened.upstream_headers),
            request[REQUEST_ID],
        )
        # The upstream's own error event as it sent it (its type and code are what a
        # client straight to it would branch on); ours only when the stream just broke.
        event = (
            {"error": dict(exc.error)}
            if exc.error is not None
            else error_body(
                502,
                f"upstream stream interrupted: {exc}",
                code="upstream_error",
                kind="upstream_error",
            )
        )
        await _try_write(send, encode_event(event))
        with contextlib.suppress(*_GONE):
            await send.eof()
        return resp
    except _GONE:
        _client_left(request, gw, parsed, label, opened, started)
        return resp
    except asyncio.CancelledError:
        watch.stop()
        if watch.took_back():
            _client_left(request, gw, parsed, label, opened, started)
            return resp
        why = gw.took_back_cut_off(asyncio.current_task())
        if why is None:
            raise
        # Cut off by a shutdown: the client is told so in the stream's own terms (an
        # error event, then a clean end) rather than left with a broken chunked body.
        event = _shut_down(request, gw, parsed, started, why, streamed=True)
        await _try_write(send, encode_event(event))
        with contextlib.suppress(*_GONE):
            await send.eof()
        return resp
    gw.metrics.count_answer(
        label, usage, _token_source(label), None if opened.cached else _upstream_s(opened, started)
    )
    gw.log.answered(
        label,
        request.path,
        parsed.model,
        200,
        time.monotonic() - started,
        f"stream tokens={usage.prompt_tokens}+{usage.completion_tokens}"
        + _upstream_id(opened.upstream_headers),
        request[REQUEST_ID],
    )
    return resp


def _shut_down(
    request: web.Request, gw: Gateway, parsed: Parsed, started: float, why: str, streamed: bool
) -> dict[str, Any]:
    """Log a request a shutdown stopped; the error body to tell its client."""
    gw.log.answered(
        "failed",
        request.path,
        parsed.model,
        503,
        time.monotonic() - started,
        f"stopped by the shutdown ({why})" + (" mid-stream, not cached" if streamed else ""),
        request[REQUEST_ID],
    )
    return error_body(
        503,
        f"the gateway is shutting down ({why}); send the request again",
        code="server_shutting_down",
        kind="server_error",
    )


def _shut_down_response(
    request: web.Request, gw: Gateway, parsed: Parsed, started: float, why: str
) -> web.Response:
    """The 503 for a request a shutdown stopped before anything of its answer was sent."""
    return web.json_response(_shut_down(request, gw, parsed, started, why, False), status=503)


def _client_left(
    request: web.Request,
    gw: Gateway,
    parsed: Parsed,
    label: str,
    opened: ChunkStream,
    started: float,
) -> None:
    """The client left mid-stream: the caller's ``aclose`` cancels the upstream stream unless others follow it."""
    gw.metrics.client_disconnects += 1
    if label in ("miss", "refresh"):
        _count_if_finished(gw, label, opened, started, request, parsed.model)


class _ClientWatch:
    """Cancels the current task once its client has gone, looking at widening intervals."""

    __slots__ = ("_handle", "_request", "_task", "_wait_s", "fired")

    def __init__(self, request: web.Request) -> None:
        self._request = request
        # Never None under aiohttp; a call outside a task has nothing to watch over.
        self._task = asyncio.current_task()
        self._wait_s = _WATCH_S
        self.fired = False
        self._handle: asyncio.TimerHandle | None = (
            asyncio.get_running_loop().call_later(_WATCH_S, self._look)
            if self._task is not None
            else None
        )

    def _look(self) -> None:
        if client_gone(self._request):
            self.fired = True
            assert self._task is not None  # no look is scheduled without a task
            self._task.cancel()
            return
        self._wait_s = min(self._wait_s * 2, _WATCH_MAX_S)
        self._handle = asyncio.get_running_loop().call_later(self._wait_s, self._look)

    def stop(self) -> None:
        """No more looks (idempotent)."""
        if self._handle is not None:
            self._handle.cancel()

    def took_back(self) -> bool:
        """Whether the cancellation being handled is this watch's alone (and now taken back).

        Another cancellation too (a shutdown stopping the request) must still end the task.
        """
        if not self.fired or self._task is None:
            return False
        self.fired = False
        return take_back_cancel(self._task) == 0


def _count_if_finished(
    gw: Gateway, label: str, opened: ChunkStream, started: float, request: web.Request, model: str
) -> None:
    """Count and log a live stream its opener left once it ends whole for the readers still on it.

    The upstream answered in full (and the answer was cached), so its tokens were
    spent; the readers who joined count theirs as coalesced, not as upstream. The
    log line keeps the log's summary in step with the metrics.
    """
    if not isinstance(opened.chunks, Follower):
        return

    def count(flight: Broadcast) -> None:
        if flight.error is None:
            usage = next(
                (
                    Usage.from_body(chunk)
                    for chunk in reversed(flight.chunks)
                    if isinstance(chunk.get("usage"), dict)
                ),
                Usage(),
            )
            upstream_s = _upstream_s(opened, started)
            gw.metrics.count_answer(label, usage, "upstream", upstream_s)
            gw.log.answered(
                label,
                request.path,
                model,
                200,
                upstream_s,
                f"stream tokens={usage.prompt_tokens}+{usage.completion_tokens}, client left"
                + _upstream_id(opened.upstream_headers),
                request[REQUEST_ID],
            )

    opened.chunks.flight.when_finished(count)


def _upstream_s(opened: ChunkStream, started: float) -> float:
    """From the request's start until its upstream stream ended, however slowly it was read."""
    ended = opened.finished_at
    return (ended if ended is not None else time.monotonic()) - started


class _Sender:
    """Writes an answer to its client, dropping a client that takes no data for ``timeout_s``.

    A write can wait only while the transport is paused, which takes its buffer past
    the high-water mark: a write onto an empty buffer that fits under it cannot, so
    it goes straight through and only the others get a timer.
    """

    __slots__ = ("_high", "_resp", "_timeout_s", "_transport")

    def __init__(self, resp: web.StreamResponse, request: web.Request, timeout_s: float) -> None:
        self._resp = resp
        self._transport = request.transport
        self._high = self._transport.get_write_buffer_limits()[1] if self._transport else 0
        self._timeout_s = timeout_s

    async def __call__(self, data: bytes) -> None:
        """Write ``data``; raises ``ConnectionResetError`` for a client gone or too slow."""
        transport = self._transport
        if transport is None or (
            transport.get_write_buffer_size() == 0 and len(data) <= self._high
        ):
            await self._resp.write(data)
            return
        await self._bounded(self._resp.write(data))

    async def eof(self) -> None:
        """End the body here, bounded: aiohttp would otherwise end it after the handler, unbounded."""
        await self._bounded(self._resp.write_eof())

    async def _bounded(self, writing: Awaitable[None]) -> None:
        try:
            await bounded(writing, self._timeout_s)
        except asyncio.TimeoutError:
            if self._transport is not None:
                # Aborted, not closed: closing would wait to flush what it will not take.
                self._transport.abort()
            log.warning("dropped a client: it took no data for %gs", self._timeout_s)
            raise ConnectionResetError(f"client took no data for {self._timeout_s:g}s") from None


async def _pump(send: _Sender, opened: ChunkStream, include_usage: bool) -> Usage:
    usage = Usage()
    async for chunk in opened:
        if isinstance(chunk.get("usage"), dict):
            usage = Usage.from_body(chunk)
        if not include_usage:
            if not chunk.get("choices") and "usage" in chunk:
                continue
            if "usage" in chunk:
                chunk = {k: v for k, v in chunk.items() if k != "usage"}
        await send(encode_event(chunk))
    return usage


async def _try_write(send: _Sender, data: bytes) -> None:
    with contextlib.suppress(*_GONE):
        await send(data)


def _model_cards(gw: Gateway) -> list[dict[str, Any]]:
    names = [gw.config.model, *gw.config.model_synonyms.get(gw.config.model, ())]
    return [
        {"id": name, "object": "model", "created": 0, "owned_by": "minima-llm"} for name in names
    ]


async def models(request: web.Request) -> web.Response:
    """The configured model and its synonyms."""
    return web.json_response({"object": "list", "data": _model_cards(request.app[GATEWAY])})


async def model(request: web.Request) -> web.Response:
    """One model by id (what the OpenAI SDK's ``models.retrieve`` asks for)."""
    wanted = request.match_info["model"]
    for card in _model_cards(request.app[GATEWAY]):
        if card["id"] == wanted:
            return web.json_response(card)
    raise RequestError(
        404, f"The model '{wanted}' does not exist", param="model", code="model_not_found"
    )


async def health(request: web.Request) -> web.Response:
    """Liveness, and whether the upstream answers; the details only for a caller with a key.

    Probes need no key, but with keys configured an anonymous caller learns only the
    status: the upstream's address, the model and the cache path are not its business.
    """
    gw = request.app[GATEWAY]
    upstream = await gw.upstream_health()
    breaker = gw.backend.upstream.breaker
    up = upstream["reachable"]
    if breaker is not None:
        upstream = {**upstream, "breaker": breaker.state}
        # An open breaker is the gateway's own verdict from its traffic: misses fail now.
        # Half-open with no probe out, the next miss goes through as the probe.
        up = up and not breaker.refusing
    status = "ok" if up else "degraded"
    key = request.get(CLIENT_KEY)
    if gw.settings.auth_enabled and not (key and gw.key_is_valid(key)):
        return web.json_response({"status": status})
    return web.json_response(
        {
            "status": status,
            "upstream": upstream,
            "cache": str(gw.config.cache_path) if gw.config.cache_path else None,
            "model": gw.config.model,
            "version": __version__,
        }
    )


async def metrics_json(request: web.Request) -> web.Response:
    """Counters as JSON."""
    gw = request.app[GATEWAY]
    return web.json_response(gw.metrics.snapshot(gw.backend.snapshot()))


async def metrics_prometheus(request: web.Request) -> web.Response:
    """Counters in Prometheus text format."""
    gw = request.app[GATEWAY]
    return web.Response(
        body=gw.metrics.exposition(), headers={"Content-Type": gw.metrics.content_type}
    )


# The routes of model calls, which log their own lines (ProxyLog.answered).
INFERENCE_ROUTES = frozenset(
    f"{prefix}/{endpoint}" for prefix in ("/v1", "") for endpoint in (CHAT, COMPLETIONS, EMBEDDINGS)
)


def add_routes(app: web.Application) -> None:
    """Every route with and without the ``/v1`` prefix."""
    for prefix in ("/v1", ""):
        app.router.add_post(f"{prefix}/chat/completions", _inference(CHAT))
        app.router.add_post(f"{prefix}/completions", _inference(COMPLETIONS))
        app.router.add_post(f"{prefix}/embeddings", _inference(EMBEDDINGS))
        app.router.add_get(f"{prefix}/models", models)
        app.router.add_get(f"{prefix}/models/{{model:.+}}", model)
    app.router.add_get("/health", health)
    app.router.add_get("/metrics", metrics_json)
    app.router.add_get("/metrics/prometheus", metrics_prometheus)
