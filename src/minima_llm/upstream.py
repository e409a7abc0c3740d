"""The attempt loop: cooldown, pacing, in-flight bound, send, classify, back off, retry."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import json
import logging
import random
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from typing import Any, NamedTuple, TypeVar

from ._version import USER_AGENT
from .clock import Clock
from .config import MinimaLlmConfig, is_header_safe
from .deadline import bounded
from .errors import MinimaLlmError, TransportError
from .http import HttpResponse, StreamingResponse, Transport, encode_body
from .resilience import (
    DOWN_KINDS,
    DOWN_STATUS,
    HALF_OPEN,
    NO_RATE_LIMITS,
    Breaker,
    Charge,
    Cooldown,
    RpmPacer,
    Slots,
    TokenPacer,
    attempts_left,
    backoff_delay,
    estimate_tokens,
    is_overload_status,
    is_retryable_status,
    parse_rate_limits,
    parse_retry_after,
    server_says_retry,
)
from .stats import LiveStats
from .streaming import DONE, SseDecoder, kind_of, parts_text, replay_chunks
from .types import MinimaLlmFailure

log = logging.getLogger("minima_llm")

SNIPPET = 300
# The error type of a request refused because too many already wait for the upstream.
QUEUE_FULL = "QueueFull"
# The error type of a request not sent because the upstream's breaker is open.
UPSTREAM_DOWN = "UpstreamUnavailable"
T = TypeVar("T")


class Completion(NamedTuple):
    """A successful upstream answer: the raw body text, its parsed form, and the text to cache."""

    body_text: str
    body: dict[str, Any]
    text: str
    # The answer's identifying headers (see KEPT_HEADERS); None if it had none.
    headers: Mapping[str, str] | None = None


class Problem(Exception):
    """One failed attempt, described well enough to retry it or report it."""

    def __init__(
        self,
        error_type: str,
        message: str,
        status: int | None,
        snippet: str | None,
        retryable: bool,
    ) -> None:
        super().__init__(message)
        self.error_type = error_type
        self.status = status
        self.snippet = snippet
        self.retryable = retryable
        self.retry_after: float | None = None
        # A 429 the pacers space out: retried at its paced turn, without a backoff or
        # cooldown of its own, which would only leave the rate the server allows unused.
        self.paced = False
        # The upstream's OpenAI-style error object, when its answer carried one.
        self.error: Mapping[str, Any] | None = None
        # That answer's identifying headers (KEPT_HEADERS), when it had any.
        self.headers: Mapping[str, str] | None = None


class StreamInterrupted(MinimaLlmError):
    """A stream broke after it started; what arrived is not cached.

    ``error`` is the error object of an error event the upstream sent, if that was why.
    """

    def __init__(
        self, message: str, error: Mapping[str, Any] | None = None, too_large: bool = False
    ) -> None:
        super().__init__(message)
        self.error = error
        # Cut at max_response_bytes: asked again, the answer would most likely be as long.
        self.too_large = too_large


# Error types of OpenAI's error objects that asking again cannot change.
# OpenAI's code and type for a 429 that means the account is out of credit, not too fast.
_QUOTA = "insufficient_quota"
_TOO_LARGE = "Request too large"
_PERMANENT_TYPES = frozenset(
    {"invalid_request_error", "authentication_error", "permission_error", "not_found_error"}
)


def _passing(exc: StreamInterrupted) -> bool:
    """Whether a stream that failed before its first chunk may succeed if asked again."""
    error = exc.error
    if exc.too_large:
        return False
    if error is None:
        return True  # cut, empty or unreadable: the faults of a proxy or a restart
    # vLLM and others put the HTTP status in "code"; OpenAI names the kind in "type".
    status = error.get("status", error.get("code"))
    if isinstance(status, int) and not isinstance(status, bool):
        return is_retryable_status(status)
    return error.get("type") not in _PERMANENT_TYPES


Parse = Callable[[HttpResponse], Completion]


def _content_of(body: dict[str, Any]) -> str:
    content = body["choices"][0]["message"].get("content")
    if isinstance(content, list):
        return parts_text(content)  # as a streamed answer of the same parts is stored
    return content if isinstance(content, str) else ""


def _text_of(body: dict[str, Any]) -> str:
    text = body["choices"][0].get("text")
    return text if isinstance(text, str) else ""


def _embeddings_of(body: dict[str, Any]) -> str:
    if not isinstance(body["data"], list):
        raise TypeError("embeddings 'data' is not a list")
    return ""


# What to keep as ``response_text`` for each endpoint; a body these cannot read is malformed.
TEXT_OF: dict[str, Callable[[dict[str, Any]], str]] = {
    "chat/completions": _content_of,
    "completions": _text_of,
    "embeddings": _embeddings_of,
}


# The response headers an answer keeps: the provider's id for the call and its timing,
# what its support asks for. Only these: a 100,000-answer batch holding every header of
# every answer would hold some 100 MB more.
KEPT_HEADERS = (
    "x-request-id",
    "openai-processing-ms",
    "openai-organization",
    "openai-project",
    "openai-version",
)


def kept_headers(headers: Mapping[str, str]) -> dict[str, str] | None:
    """Those of ``KEPT_HEADERS`` that ``headers`` holds; None if none."""
    kept = {name: value for name in KEPT_HEADERS if (value := headers.get(name)) is not None}
    return kept or None


def _left(deadline: float) -> float:
    """Seconds from now (loop time) to ``deadline``, never below 0."""
    return max(0.0, deadline - asyncio.get_running_loop().time())


def parse_completion(resp: HttpResponse, endpoint: str = "chat/completions") -> Completion:
    """Read a 2xx body; an unreadable one is a retryable ``Problem``."""
    try:
        text = resp.body.decode("utf-8")
        body = json.loads(text)
        return Completion(text, body, TEXT_OF[endpoint](body), kept_headers(resp.headers))
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        snippet = resp.body[:SNIPPET].decode("utf-8", "replace")
        # A 200 with a body we cannot read is usually a proxy cutting the body; try again.
        raise Problem(
            "MalformedResponse", f"unreadable response body: {exc!r}", resp.status, snippet, True
        ) from exc


class UpstreamStream:
    """An open upstream stream holding one ``max_outstanding`` slot until closed."""

    def __init__(
        self, resp: StreamingResponse, release: Callable[[], None], stats: LiveStats
    ) -> None:
        self.resp = resp
        self._release: Callable[[], None] | None = release
        self._stats = stats
        self._events: AsyncIterator[dict[str, Any]] | None = None
        self._first: dict[str, Any] | None = None

    async def start(self, endpoint: str = "chat/completions") -> None:
        """Read up to the first chunk, so a stream that fails before it can still be retried.

        Raises ``StreamInterrupted`` (or a ``Problem`` for an unreadable whole body).
        A server that answers a stream request with one JSON completion, ignoring
        ``stream``, is replayed as the chunks that completion would have streamed.
        """
        if self.resp.headers.get("content-type", "").startswith("application/json"):
            body = await self.resp.read()
            whole = parse_completion(
                HttpResponse(self.resp.status, self.resp.headers, body), endpoint
            )
            self._events = _replayed(replay_chunks(whole.body, kind_of(endpoint)))
            return
        self._events = self._read()
        with contextlib.suppress(StopAsyncIteration):  # [DONE] at once: empty, but whole
            self._first = await self._events.__anext__()

    async def events(self) -> AsyncIterator[dict[str, Any]]:
        """Parsed JSON chunks until ``[DONE]``; a stream that ends without it is interrupted."""
        events = self._events if self._events is not None else self._read()
        if self._first is not None:
            first, self._first = self._first, None
            yield first
        async for chunk in events:
            yield chunk

    async def _read(self) -> AsyncIterator[dict[str, Any]]:
        decoder = SseDecoder()
        try:
            async for line in self.resp.lines():
                data = decoder.feed(line)
                if data is None:
                    continue
                if data.strip() == DONE:
                    return
                yield _chunk(data)
        except TransportError as exc:
            too_large = exc.kind == "too_large"
            raise StreamInterrupted(f"upstream stream broke: {exc}", too_large=too_large) from exc
        tail = decoder.close()
        if tail is not None and tail.strip() == DONE:
            return
        raise StreamInterrupted("upstream stream ended without [DONE]")

    async def aclose(self) -> None:
        """Release the connection and the slot (idempotent)."""
        release, self._release = self._release, None
        if release is not None:
            try:
                await self.resp.aclose()
            finally:
                release()


async def _replayed(chunks: Iterable[dict[str, Any]]) -> AsyncIterator[dict[str, Any]]:
    for chunk in chunks:
        yield chunk


def _chunk(data: str) -> dict[str, Any]:
    try:
        chunk = json.loads(data)
    except ValueError as exc:
        raise StreamInterrupted(f"unreadable stream chunk: {data[:SNIPPET]!r}") from exc
    if not isinstance(chunk, dict):
        raise StreamInterrupted(f"stream chunk is not an object: {data[:SNIPPET]!r}")
    if "error" in chunk and "choices" not in chunk:
        error = chunk["error"]
        raise StreamInterrupted(
            f"upstream sent an error mid-stream: {data[:SNIPPET]}",
            error if isinstance(error, dict) else None,
        )
    return chunk


def request_headers(config: MinimaLlmConfig) -> dict[str, str]:
    """The headers every upstream request carries: JSON, who sends it, and the key if any."""
    headers = {"Content-Type": "application/json", "User-Agent": USER_AGENT}
    if config.api_key:
        headers["Authorization"] = f"Bearer {config.api_key}"
    return headers


class Limits(NamedTuple):
    """What one API key's calls learn and wait for: the cooldown after its 429s and both pacers.

    A provider limits each key (each organisation) apart: calls made with another key
    (a gateway passing its callers' keys through) must not wait out this one's 429s
    or follow the rate its headers state. An overloaded server (503, 504) is
    everyone's trouble: that cooldown is the caller's, shared by every key.
    """

    cooldown: Cooldown
    pacer: RpmPacer
    tokens: TokenPacer


# Keys whose limits are remembered at once; the least recently used is forgotten first.
MAX_KEYED_LIMITS = 1024


class UpstreamCaller:
    """Sends request bodies with every resilience rule applied; never raises for upstream trouble."""

    def __init__(
        self,
        config: MinimaLlmConfig,
        transport: Transport,
        clock: Clock,
        stats: LiveStats,
        rng: random.Random | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        self.cfg = config
        self.transport = transport
        self.clock = clock
        self.stats = stats
        self.rng = rng or random.Random()
        # Retry-After can be long; every wait still needs a bound.
        self.max_wait_s = max(config.max_backoff_s, config.cooldown_cap_s)
        self.limits = self._new_limits()  # the configured key's
        # After 503/504: the server's own state, whichever key was refused.
        self.overload = self._new_cooldown()
        self._keyed: collections.OrderedDict[str, Limits] = collections.OrderedDict()
        # One bound for every event loop using this caller, threads' included.
        self._slots = Slots(config.max_outstanding)
        self.headers = headers if headers is not None else request_headers(config)
        # Admission: how many new requests may wait for their turn (cooldown, pacing or a
        # slot) before more are refused with QUEUE_FULL. None: no bound, as a batch wants.
        self.queue_limit: int | None = None
        # And how long a new request may wait for its turn (cooldown, pacing, tokens, a
        # slot) before it is refused.
        self.queue_wait_s: float | None = None
        self.queued = 0
        self.refused = 0
        # The upstream's circuit breaker (see use_breaker); None: every call is sent.
        self.breaker: Breaker | None = None

    @property
    def cooldown(self) -> Cooldown:
        """The cooldown after 429s of calls made with the configured key."""
        return self.limits.cooldown

    @property
    def pacer(self) -> RpmPacer:
        """The request pacer of calls made with the configured key."""
        return self.limits.pacer

    @property
    def tokens(self) -> TokenPacer:
        """The token pacer of calls made with the configured key."""
        return self.limits.tokens

    def _new_cooldown(self) -> Cooldown:
        cfg = self.cfg
        return Cooldown(
            cfg.cooldown_floor_s,
            cfg.cooldown_cap_s,
            cfg.cooldown_halflife_s,
            cfg.base_backoff_s,
            self.clock,
        )

    def _new_limits(self) -> Limits:
        pacer = RpmPacer(self.cfg.rpm, self.clock, max_hold_s=self.max_wait_s)
        return Limits(self._new_cooldown(), pacer, TokenPacer(self.clock))

    def limits_for(self, api_key: str | None) -> Limits:
        """The limits of calls made with ``api_key`` (None: the configured key)."""
        if not api_key or api_key == self.cfg.api_key:
            return self.limits
        keyed = self._keyed
        limits = keyed.get(api_key)
        if limits is None:
            if len(keyed) >= MAX_KEYED_LIMITS:
                keyed.popitem(last=False)
            limits = keyed[api_key] = self._new_limits()
        else:
            keyed.move_to_end(api_key)
        return limits

    def cooling_s(self, api_key: str | None = None) -> float:
        """Seconds until calls made with ``api_key`` (None: the configured key) may be sent again."""
        overload = self.overload.remaining()
        if api_key and api_key != self.cfg.api_key:
            keyed = self._keyed.get(api_key)  # None: no 429 of its own remembered
            return overload if keyed is None else max(overload, keyed.cooldown.remaining())
        return max(overload, self.limits.cooldown.remaining())

    def use_breaker(self, threshold: int, reset_s: float) -> Breaker:
        """Fail calls without sending them while ``threshold`` calls in a row found the upstream down."""
        self.breaker = Breaker(threshold, reset_s, self.clock)
        return self.breaker

    def pace(self) -> str | None:
        """The limits the server stated, or that its refusals taught, as a short phrase; None if none."""
        parts = []
        pacer = self.pacer
        if pacer.server_rpm and pacer.follow_server:
            parts.append(f"{pacer.server_rpm} requests/min (server)")
        elif pacer.learns_from_refusals:
            parts.append(f"{pacer.rpm:.0f} requests/min (learned from 429s)")
        if self.tokens.limit is not None:
            parts.append(f"{self.tokens.limit} tokens/min (server)")
        return ", ".join(parts) or None

    @property
    def in_flight_limit(self) -> int:
        """Requests this loop may have in flight now: ``max_outstanding``, less after 503s."""
        return self._slots.limit

    def encode(
        self, payload: Mapping[str, Any], api_key: str | None = None, body: bytes | None = None
    ) -> tuple[bytes, dict[str, str]]:
        """The request body and headers for a JSON payload (``api_key`` overrides the configured one).

        ``body`` is the payload already encoded, when the caller has it. The
        configured headers are shared, not copied, unless this call changes them:
        callers must copy before adding their own.
        """
        if body is None:
            body = json.dumps(payload).encode("utf-8")
        if not api_key and not self.cfg.compress_gzip:
            return body, self.headers
        headers = dict(self.headers)
        if api_key:
            headers["Authorization"] = f"Bearer {api_key}"
        return encode_body(body, headers, self.cfg.compress_gzip), headers

    async def complete(
        self,
        request_id: str,
        url: str,
        payload: Mapping[str, Any],
        endpoint: str = "chat/completions",
        api_key: str | None = None,
        body: bytes | None = None,
    ) -> Completion | MinimaLlmFailure:
        """Send until success, a permanent error, or attempts run out (``body``: ``payload`` encoded)."""
        if api_key and not is_header_safe(api_key):
            return self._unsendable_key(request_id)
        if payload.get("stream"):
            # The answer would be an event stream, which a whole-body read takes for a
            # cut or malformed answer and retries, paying for every generation.
            problem = Problem(
                "InvalidRequest",
                "the request asks for a stream ('stream' in extra): use stream() or"
                " open_stream() for streamed answers",
                None,
                None,
                False,
            )
            return self._failure(request_id, problem, 0, [])
        data, headers = self.encode(payload, api_key, body)
        limits = self.limits if api_key is None else self.limits_for(api_key)
        stamps: list[float] = []
        # The first attempt runs inline: most calls succeed at once, and the retry
        # loop's extra coroutines and closure cost several microseconds a request.
        try:
            return await self._post_once(
                url, data, headers, endpoint, stamps, payload, body, limits
            )
        except Problem as problem:

            def attempt(stamps: list[float]) -> Awaitable[Completion]:
                return self._post_once(url, data, headers, endpoint, stamps, payload, body, limits)

            return await self._retrying(request_id, attempt, stamps, problem)

    async def open_stream(
        self,
        request_id: str,
        url: str,
        payload: Mapping[str, Any],
        api_key: str | None = None,
        endpoint: str = "chat/completions",
    ) -> UpstreamStream | MinimaLlmFailure:
        """Open a stream, retrying until the upstream sends a first chunk; the slot is held until closed.

        Retries cover everything before that chunk: statuses, connection errors, and a
        2xx whose stream breaks, ends or carries an error before any chunk of an answer.
        """
        if api_key and not is_header_safe(api_key):
            return self._unsendable_key(request_id)
        body, shared = self.encode(payload, api_key)
        headers = {**shared, "Accept": "text/event-stream"}
        limits = self.limits_for(api_key)

        async def attempt(stamps: list[float]) -> UpstreamStream:
            breaker = self.breaker
            if breaker is not None and breaker.is_open:
                self._check_breaker(breaker)
            slots = self._slots
            charged = None
            if not self._turn_now(slots, limits):
                charged = await self._take_turn(slots, not stamps, payload, None, limits)
            if breaker is not None and breaker.is_open:
                # Its headers, then its first chunk: each bounded on its own.
                self._admit(breaker, slots, 2 * self.cfg.timeout_s + 1)
            try:
                stamps.append(self.clock.monotonic())
                resp = await self.transport.open_stream(url, body, headers, self.cfg.timeout_s)
            except TransportError as exc:
                slots.release()
                if breaker is not None:
                    self._failed(breaker, exc, stamps[-1])
                raise _transport_problem(exc, self.cfg.timeout_s) from exc
            except BaseException:
                slots.release()
                if breaker is not None:
                    breaker.unjudged(stamps[-1])
                raise
            self._observe(resp.status, resp.headers, stamps[-1], charged, limits)
            ok = 200 <= resp.status < 300
            if breaker is not None and not ok:
                self._answered(breaker, resp.status, stamps[-1])
            if ok:
                limits.pacer.answered(stamps[-1])
                self.stats.in_flight += 1
                took_on = asyncio.get_running_loop()  # its close may come from elsewhere
                stream = UpstreamStream(
                    resp, lambda: self._release_stream(slots, took_on), self.stats
                )
                try:
                    # One bound for the whole wait: each read has its own, but a server
                    # dripping keep-alive comments would otherwise hold the slot forever.
                    await bounded(stream.start(endpoint), self.cfg.timeout_s)
                except StreamInterrupted as exc:
                    cause = exc.__cause__
                    # Each verdict before the close: a close that fails or is cancelled
                    # must not leave a probe out until its bound.
                    if breaker is not None:
                        if isinstance(cause, TransportError):
                            self._failed(breaker, cause, stamps[-1])  # judged by its kind
                        else:
                            self._up(breaker, stamps[-1])  # it said something, if not a chunk
                    await stream.aclose()
                    if isinstance(cause, TransportError) and cause.kind == "timeout":
                        # The transport's read timeout, come before the bound's: the same
                        # "no first chunk in time", and a timeout to the caller too.
                        raise _transport_problem(cause, self.cfg.timeout_s) from exc
                    problem = Problem(
                        "ResponseTooLarge" if exc.too_large else "MalformedResponse",
                        f"stream failed before its first chunk: {exc}",
                        resp.status,
                        str(exc)[:SNIPPET],
                        _passing(exc),
                    )
                    problem.error = exc.error
                    raise problem from exc
                except TransportError as exc:
                    # Reading a whole JSON answer to a stream request (too large, or cut).
                    if breaker is not None:
                        self._failed(breaker, exc, stamps[-1])
                    await stream.aclose()
                    raise _transport_problem(exc, self.cfg.timeout_s) from exc
                except asyncio.TimeoutError as exc:
                    timed_out = TransportError("timeout", "no first chunk in time")
                    if breaker is not None:
                        # Headers and then nothing: a hung server as much as no answer at all.
                        self._failed(breaker, timed_out, stamps[-1])
                    await stream.aclose()
                    raise _transport_problem(timed_out, self.cfg.timeout_s) from exc
                except Problem:
                    # A whole answer that cannot be read: an answer all the same.
                    if breaker is not None:
                        self._up(breaker, stamps[-1])
                    await stream.aclose()
                    raise
                except BaseException:
                    if breaker is not None:
                        breaker.unjudged(stamps[-1])
                    await stream.aclose()
                    raise
                if breaker is not None:
                    self._up(breaker, stamps[-1])  # judged at the first chunk, not the headers
                slots.succeeded()
                return stream
            try:
                data = await asyncio.wait_for(resp.read(), self.cfg.timeout_s)
            except (TransportError, asyncio.TimeoutError):
                data = b""
            finally:
                await resp.aclose()
                slots.release()
            raise self._status_problem(resp.status, resp.headers, data, stamps[-1], slots, limits)

        return await self._retrying(request_id, attempt)

    def _unsendable_key(self, request_id: str) -> MinimaLlmFailure:
        # A caller's key passed through that no HTTP header can carry: a failure of this
        # call, never an exception from inside a transport quoting the key.
        problem = Problem(
            "InvalidApiKey", "the API key for this call is not printable ASCII", None, None, False
        )
        return self._failure(request_id, problem, 0, [])

    def _release_stream(self, slots: Slots, took_on: asyncio.AbstractEventLoop) -> None:
        self.stats.in_flight -= 1
        slots.release(took_on)

    async def _retrying(
        self,
        request_id: str,
        attempt: Callable[[list[float]], Awaitable[T]],
        stamps: list[float] | None = None,
        problem: Problem | None = None,
    ) -> T | MinimaLlmFailure:
        """Run ``attempt`` until it succeeds or must stop; ``problem`` is a first attempt's failure."""
        stamps = [] if stamps is None else stamps
        tries = 0 if problem is None else 1
        while True:
            if problem is not None:
                if not problem.retryable or not attempts_left(tries, self.cfg.max_attempts):
                    # Attempts sent, each stamped: none for a request refused at admission.
                    return self._failure(request_id, problem, len(stamps), stamps)
                breaker = self.breaker
                if breaker is not None and breaker.is_open:
                    # Refused now rather than after a backoff that ends in the same refusal.
                    try:
                        self._check_breaker(breaker)
                    except Problem as refusal:
                        return self._failure(request_id, refusal, len(stamps), stamps)
                await self._back_off(request_id, tries, problem)
            tries += 1
            try:
                return await attempt(stamps)
            except Problem as failed:
                problem = failed

    async def _back_off(self, request_id: str, tries: int, problem: Problem) -> None:
        delay = backoff_delay(
            tries, self.cfg.base_backoff_s, self.cfg.max_backoff_s, self.cfg.jitter, self.rng
        )
        if problem.paced:
            delay = 0.0
        if problem.retry_after is not None:
            delay = max(delay, problem.retry_after)
        self.stats.retries += 1
        log.debug("%s: attempt %d failed (%s), retry in %.2fs", request_id, tries, problem, delay)
        await self.clock.sleep(min(delay, self.max_wait_s))

    def _turn_now(self, slots: Slots, limits: Limits) -> bool:
        """Take a slot if nothing is to be waited for first: no cooldown, no pacing, one free."""
        # Checked before any await: most requests have nothing to wait for, and the
        # coroutines of the waiting path are measurable at thousands of requests a second.
        now = self.clock.monotonic()
        return (
            limits.cooldown.until <= now
            and self.overload.until <= now
            and limits.pacer.ready()
            and limits.tokens.limit is None
            and slots.try_take()
        )

    async def _take_turn(
        self,
        slots: Slots,
        first: bool,
        payload: Mapping[str, Any],
        raw: bytes | None,
        limits: Limits,
    ) -> Charge | None:
        """Wait out cooldown and pacing, then for a slot; a new request finding the queue full is refused.

        Returns what the token pacer charged this request (None: no token limit paced it).
        """
        limit = self.queue_limit
        # Against the limit: the waiting requests no free slot is left for. Those held
        # only by the first answer's rate-limit probe (at most PROBE_WAIT_S) or by a
        # cooldown, with slots to go to, are not a queue, so a burst on a fresh gateway
        # or after an overload is not refused while slots stand free.
        if first and limit is not None and self.queued - slots.free >= limit:
            # Retries are not refused: the request was admitted, and a refusal now
            # would throw away the attempts it already made.
            self.refused += 1
            raise Problem(
                QUEUE_FULL,
                f"{self.queued} requests already wait for the upstream, {limit} more than"
                " its free slots can take",
                None,
                None,
                False,
            )
        self.queued += 1
        cooldown, pacer, tokens = limits
        charged: Charge | None = None
        # One bound on a new request's whole wait, whatever it waits for: an operator's
        # "at most this long in the queue" covers a token or pacing queue as much as slots.
        wait_s = self.queue_wait_s if first else None
        deadline = None if wait_s is None else asyncio.get_running_loop().time() + wait_s
        try:
            # Until neither holds: a 503 arriving during a wait on a 429 extends it.
            overload = self.overload
            while (cooling := max(overload, cooldown, key=Cooldown.remaining)).remaining() > 0:
                await self._within(cooling.wait(), deadline, wait_s)
            if tokens.limit is not None:
                charged = await self._within(self._charge(payload, raw, tokens), deadline, wait_s)
            # The request turn after the token wait: taken before it, the turns of all
            # requests queued behind a large prompt would fall due together.
            if not pacer.ready():
                await self._within(pacer.acquire(), deadline, wait_s)
            if charged is None and tokens.limit is not None:
                # The first answer stated a limit.
                charged = await self._within(self._charge(payload, raw, tokens), deadline, wait_s)
            unpaced = pacer.rpm <= 0  # the turn was taken with no pace in force
            if not await slots.take(None if deadline is None else _left(deadline)):
                raise self._waited_too_long(wait_s)
            if unpaced and pacer.rpm > 0:
                # A pace was set (a first 429) while this request waited for a slot:
                # sent now, a whole queue would go at once, to be refused together.
                try:
                    await self._within(pacer.acquire(), deadline, wait_s)
                except BaseException:
                    slots.release()
                    raise
        except BaseException:
            if charged is not None:
                # Never sent (refused, or its client left): the tokens go back to the queue.
                tokens.refund(charged)
            raise
        finally:
            self.queued -= 1
        return charged

    async def _within(
        self, awaitable: Awaitable[T], deadline: float | None, wait_s: float | None
    ) -> T:
        """``await awaitable``, refused with QUEUE_FULL if ``deadline`` (loop time) passes first."""
        if deadline is None:
            return await awaitable
        try:
            return await bounded(awaitable, _left(deadline))
        except asyncio.TimeoutError:
            raise self._waited_too_long(wait_s) from None

    def _waited_too_long(self, wait_s: float | None) -> Problem:
        self.refused += 1
        return Problem(
            QUEUE_FULL,
            f"no turn upstream within {wait_s:g}s of waiting (for a cooldown, pacing,"
            " tokens or an in-flight slot)",
            None,
            None,
            False,
        )

    @staticmethod
    async def _charge(payload: Mapping[str, Any], raw: bytes | None, tokens: TokenPacer) -> Charge:
        """Wait for the tokens the request will be charged (``raw``: the payload encoded)."""
        if raw is not None and not payload:
            payload = json.loads(raw)
        return await tokens.acquire(estimate_tokens(payload))

    async def _post_once(
        self,
        url: str,
        body: bytes,
        headers: dict[str, str],
        endpoint: str,
        stamps: list[float],
        payload: Mapping[str, Any],
        raw: bytes | None,
        limits: Limits,
    ) -> Completion:
        """One attempt: wait for a turn and a slot, POST, read the answer or raise a ``Problem``.

        ``raw`` is ``payload`` encoded when the caller passed it that way (``payload`` is
        then empty): the token pacer reads it only when a token limit is in force.
        """
        breaker = self.breaker
        if breaker is not None and breaker.is_open:
            self._check_breaker(breaker)
        slots = self._slots
        charged = None
        if not self._turn_now(slots, limits):
            charged = await self._take_turn(slots, not stamps, payload, raw, limits)
        if breaker is not None and breaker.is_open:
            # Every transport bounds a whole call by timeout_s; a second for the rest.
            self._admit(breaker, slots, self.cfg.timeout_s + 1)
        stamps.append(self.clock.monotonic())
        self.stats.in_flight += 1
        try:
            resp = await self.transport.post(url, body, headers, self.cfg.timeout_s)
        except TransportError as exc:
            if breaker is not None:
                self._failed(breaker, exc, stamps[-1])
            raise _transport_problem(exc, self.cfg.timeout_s) from exc
        except BaseException:
            if breaker is not None:
                breaker.unjudged(stamps[-1])
            raise
        finally:
            self.stats.in_flight -= 1
            slots.release()
        if breaker is not None:
            self._answered(breaker, resp.status, stamps[-1])
        self._observe(resp.status, resp.headers, stamps[-1], charged, limits)
        if 200 <= resp.status < 300:
            limits.pacer.answered(stamps[-1])
            if slots.limit < slots.max:
                slots.succeeded()
            return parse_completion(resp, endpoint)
        raise self._status_problem(resp.status, resp.headers, resp.body, stamps[-1], slots, limits)

    @staticmethod
    def _observe(
        status: int,
        headers: Mapping[str, str],
        sent_at: float,
        charge: Charge | None,
        limits: Limits,
    ) -> None:
        """Both pacers learn from an answer's rate-limit headers."""
        info = parse_rate_limits(headers)
        limits.pacer.observe(info)
        if info is not NO_RATE_LIMITS:
            if status == 429:
                limits.tokens.observe(info, sent_at, charge, True, parse_retry_after(headers))
            else:
                limits.tokens.observe(info, sent_at, charge)

    def _check_breaker(self, breaker: Breaker) -> None:
        """Refuse a call before it waits for a turn if the breaker would refuse it anyway."""
        wait = breaker.blocked()
        if wait:
            raise self._refusal(breaker, wait)

    def _admit(self, breaker: Breaker, slots: Slots, bound_s: float) -> None:
        """Right before sending: the breaker's word, which may make this call its probe.

        ``bound_s`` is the longest the call can take: a probe that never reports frees
        the way after it.
        """
        wait = breaker.admit(bound_s)
        if wait:
            slots.release()
            raise self._refusal(breaker, wait)

    @staticmethod
    def _refusal(breaker: Breaker, wait: float) -> Problem:
        # Nothing was sent; a retry within this request's budget would only be refused too.
        when = (
            "one call is probing it now"
            if breaker.state == HALF_OPEN
            else f"nothing is sent to it for {wait:.1f}s"
        )
        return Problem(
            UPSTREAM_DOWN,
            f"the upstream is down (last failure: {breaker.last_failure}); {when}",
            None,
            None,
            False,
        )

    def _failed(self, breaker: Breaker, exc: TransportError, sent_at: float) -> None:
        if exc.kind in DOWN_KINDS:
            if breaker.failed(sent_at, str(exc)):
                self._tripped(breaker)
        elif exc.kind in ("too_large", "malformed"):
            self._up(breaker, sent_at)  # an answer came, too large or garbled, but it came
        else:
            # Closed under us, or a connection dropped: before the answer or halfway
            # through one (a live server does that too), it does not say which.
            breaker.unjudged(sent_at)

    def _answered(self, breaker: Breaker, status: int, sent_at: float) -> None:
        if status != DOWN_STATUS:
            self._up(breaker, sent_at)
        elif breaker.failed(sent_at, f"HTTP {status}"):
            self._tripped(breaker)

    def _up(self, breaker: Breaker, sent_at: float) -> None:
        if breaker.answered(sent_at):
            log.info("upstream %s answers again: sending to it again", self.cfg.base_url)

    def _tripped(self, breaker: Breaker) -> None:
        log.warning(
            "upstream %s failed %d calls in a row (last: %s): failing calls at once,"
            " probing it again in %gs",
            self.cfg.base_url,
            breaker.threshold,
            breaker.last_failure,
            breaker.reset_s,
        )

    def _status_problem(
        self,
        status: int,
        headers: Mapping[str, str],
        body: bytes,
        sent_at: float,
        slots: Slots,
        limits: Limits,
    ) -> Problem:
        snippet, error = _error_parts(body)
        message = f"HTTP {status}"
        if 300 <= status < 400 and headers.get("location"):
            # Not followed (a POST must not become a GET elsewhere): say where to point instead.
            message += f", redirected to {headers['location']}: set base_url to the new address"
        # A spent quota is a 429 that no wait will lift; retried, it only delays the answer.
        # So is a request larger than a token limit allows in a minute (OpenAI: "Request
        # too large for <model> ... on tokens per min").
        hopeless = status == 429 and error is not None and _never_admitted(error)
        # The server's x-should-retry overrides the status, as OpenAI's own SDK takes it.
        said = server_says_retry(headers)
        retryable = (is_retryable_status(status) if said is None else said) and not hopeless
        problem = Problem("HTTPError", message, status, snippet, retryable)
        problem.error = error
        problem.headers = kept_headers(headers)
        problem.retry_after = parse_retry_after(headers)
        if hopeless:
            return problem
        if status == 429:
            self.stats.rate_limited += 1
            limits.pacer.penalize(problem.retry_after, sent_at)
            if limits.pacer.learns_from_refusals or limits.tokens.limit is not None:
                # A rate problem, paced from here on: a doubled shared pause would send
                # every worker back at once, to be refused together again.
                problem.paced = True
                return problem
        if (
            status in (503, 504)
            and problem.retry_after is None
            and slots.overloaded(sent_at, self.clock.monotonic())
        ):
            # Too many at once for this server: fewer in flight (grown back as answers
            # come) and a short pause, not a doubled cooldown. Doubling on every refusal
            # of a wave sends all workers back together at the cap, to be refused again.
            self.overload.pause(self.cfg.base_backoff_s)
        elif status == 429:
            limits.cooldown.bump(problem.retry_after, sent_at)
        elif is_overload_status(status):
            self.overload.bump(problem.retry_after, sent_at)
        return problem

    def _failure(
        self, request_id: str, problem: Problem, attempts: int, stamps: list[float]
    ) -> MinimaLlmFailure:
        self.stats.failures += 1
        return MinimaLlmFailure(
            request_id=request_id,
            error_type=problem.error_type,
            message=str(problem),
            attempts=attempts,
            status=problem.status,
            body_snippet=problem.snippet,
            timeout_s=self.cfg.timeout_s,
            attempt_timestamps=tuple(stamps),
            upstream_error=problem.error,
            upstream_headers=problem.headers,
        )


def _never_admitted(error: Mapping[str, Any]) -> bool:
    """Whether a 429's error object says no wait will admit the request."""
    if _QUOTA in (error.get("code"), error.get("type")):
        return True
    message = error.get("message")
    return isinstance(message, str) and message.startswith(_TOO_LARGE)


def _error_parts(body: bytes) -> tuple[str, Mapping[str, Any] | None]:
    """The start of an error body (JSON compacted first), and its ``error`` object if it has one.

    api.openai.com indents its error objects, and a context-length error runs past
    ``SNIPPET`` characters even compacted: the object itself is kept whole beside the snippet.
    """
    if len(body) <= 65_536:
        try:
            parsed = json.loads(body)
        except (ValueError, UnicodeDecodeError):
            pass
        else:
            compact = json.dumps(parsed, separators=(",", ":"), ensure_ascii=False)[:SNIPPET]
            error = parsed.get("error") if isinstance(parsed, dict) else None
            return compact, error if isinstance(error, dict) else None
    return body[:SNIPPET].decode("utf-8", "replace"), None


def _transport_problem(exc: TransportError, timeout_s: float) -> Problem:
    if exc.kind == "timeout":
        return Problem("TimeoutError", f"timed out after {timeout_s}s", 408, str(exc), True)
    if exc.kind == "closed":
        return Problem("ClosedError", str(exc), None, None, False)
    if exc.kind == "proxy":
        # The proxy's own refusal (407, 403): asking again asks it again, to the same answer.
        return Problem("ProxyError", str(exc), None, str(exc)[:SNIPPET], False)
    if exc.kind == "too_large":
        # The same request would most likely bring the same runaway answer again.
        return Problem("ResponseTooLarge", str(exc), None, str(exc)[:SNIPPET], False)
    kind = "ConnectionResetError" if exc.kind == "reset" else "ConnectionError"
    return Problem(kind, str(exc), None, str(exc)[:SNIPPET], True)
