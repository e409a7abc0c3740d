"""One request on its way through the backend: what is known of it, and the answers built for it.

The backend, its streaming path and its batch mode share these; none holds a backend.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
import weakref
from collections.abc import AsyncIterator, Callable, Mapping
from contextvars import ContextVar
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple

from .cache import CacheRow, Prefetched, PromptCache, storable_text
from .jobs import Outcome
from .stats import LiveStats
from .streaming import replay_chunks
from .types import MinimaLlmRequest, MinimaLlmResponse, MinimaLlmResult, Usage
from .upstream import TEXT_OF, Completion

log = logging.getLogger("minima_llm")


class RepeatedError:
    """Logs an error that recurs at most once per ``every_s``, counting the lines left out.

    A full disk fails every write of a batch: one line per answer buried the log in
    thousands of copies of one message.
    """

    def __init__(
        self,
        every_s: float,
        clock: Callable[[], float] = time.monotonic,
        logger: logging.Logger | None = None,
        level: int = logging.ERROR,
    ) -> None:
        self.every_s = every_s
        self._clock = clock
        self._logger = logger or log
        self._level = level
        self._logged_at = -float("inf")
        self._left_out = 0

    def due(self) -> bool:
        """Whether a line may go out now; one that may not is counted as left out.

        For a caller whose line costs something to build: build it only when due,
        then ``log`` it.
        """
        if self._clock() - self._logged_at < self.every_s:
            self._left_out += 1
            return False
        return True

    def log(self, message: str, *args: Any) -> None:
        """Log ``message % args`` at the level given, unless one went out less than ``every_s`` ago."""
        if not self.due():
            return
        if self._left_out:
            message += " (%d more like it since the last such line)"
            args = (*args, self._left_out)
        self._logged_at, self._left_out = self._clock(), 0
        self._logger.log(self._level, message, *args)


# Per cache (so per backend) and kind of fault: each backend reports its own at least
# once per period; the count of every fault is in its stats all the same.
_FAULTS: weakref.WeakKeyDictionary[PromptCache, dict[str, RepeatedError]] = (
    weakref.WeakKeyDictionary()
)


def fault_log(cache: PromptCache, kind: str) -> RepeatedError:
    """The log of one kind of fault (``read``, ``write``) of ``cache``: a line per 10 s at most."""
    kinds = _FAULTS.setdefault(cache, {})
    if kind not in kinds:
        kinds[kind] = RepeatedError(10.0)
    return kinds[kind]


CHAT = "chat/completions"


@dataclass
class BatchScope:
    """What ``run_batched`` learned up front: each request's key, and the primary rows for them."""

    keys: dict[int, tuple[str, str]]
    known: Prefetched
    # Batch mode: the provider job's outcome for each key it was sent, by key.
    answered: dict[str, Outcome] | None = None
    job_started: float = 0.0
    # Keys whose answer a request already took: repeats are shared, not spent again.
    delivered: set[str] = field(default_factory=set)


# Set while a batch runs, so each request's canonical JSON is built once and the
# primary cache is read once for the whole batch, not once per request.
BATCH: ContextVar[BatchScope | None] = ContextVar("minima_llm_batch", default=None)


class Call(NamedTuple):
    """Everything about one request the backend needs besides its payload.

    A named tuple: one is built for every request, several times faster than a
    frozen dataclass.
    """

    request: MinimaLlmRequest
    endpoint: str
    model: str
    key: str
    canonical: str
    store: bool
    key_extra: Mapping[str, Any] | None = None
    api_key: str | None = None
    # The body to send instead of one built from ``request`` (the gateway forwards its caller's).
    payload: Mapping[str, Any] | None = None


class Flight:
    """A live call others may join; its future exists only once someone does.

    Most calls are never joined, so they skip making and resolving a future.
    """

    __slots__ = ("future",)

    def __init__(self) -> None:
        self.future: asyncio.Future[MinimaLlmResult] | None = None

    def joined(self) -> asyncio.Future[MinimaLlmResult]:
        """The future a joiner waits on."""
        if self.future is None:
            self.future = asyncio.get_running_loop().create_future()
        return self.future

    def succeed(self, result: MinimaLlmResult) -> None:
        """Hand the answer to every joiner."""
        if self.future is not None and not self.future.done():
            self.future.set_result(result)

    def fail(self, exc: BaseException) -> None:
        """Hand the error to every joiner (retrieved here: only joiners re-raise it)."""
        if self.future is not None and not self.future.done():
            self.future.set_exception(exc)
            self.future.exception()


class OwnerLeft(Exception):
    """The request that made a shared call was cancelled before the answer came."""


async def store_answer(
    cache: PromptCache, stats: LiveStats, call: Call, text: str, raw: str
) -> bool:
    """Cache an answer; whether it is now in the cache (False: no cache, or a fault)."""
    if not call.store:
        return False
    try:
        row = await cache.store(call.key, call.canonical, call.model, text, raw)
    except Exception as exc:
        # The answer arrived and the caller gets it; losing it to a cache fault would be worse.
        stats.cache_errors += 1
        fault_log(cache, "write").log("cache write failed, answer returned uncached: %s", exc)
        return False
    return row is not None


def payload_of(request: MinimaLlmRequest, model: str, endpoint: str) -> dict[str, Any]:
    payload: dict[str, Any] = dict(request.extra or {})
    payload["model"] = model
    if endpoint == CHAT:
        payload["messages"] = list(request.messages)
    if request.temperature is not None:
        payload["temperature"] = request.temperature
    if request.max_tokens is not None:
        payload["max_tokens"] = request.max_tokens
    return payload


def response_of(
    call: Call, outcome: Completion, usage: Usage, latency: float, source: str | None = None
) -> MinimaLlmResponse:
    return MinimaLlmResponse(
        request_id=call.request.request_id,
        text=outcome.text,
        cached=False,
        raw_text=outcome.body_text,
        usage=usage,
        latency_s=latency,
        cache_source=source,
        model=call.model,
        upstream_headers=outcome.headers,
    )


async def replay_row(row: CacheRow, kind: str) -> AsyncIterator[dict[str, Any]]:
    completion = completion_of(row, kind)
    for chunk in replay_chunks(completion, kind):
        yield chunk


def completion_of(row: CacheRow, kind: str) -> dict[str, Any]:
    """The stored completion, or one rebuilt from the text for rows without a raw body."""
    if row.response_raw:
        try:
            body = json.loads(row.response_raw)
            if isinstance(body, dict) and body.get("choices"):
                return body
        except ValueError:
            pass
    message: dict[str, Any] = (
        {"message": {"role": "assistant", "content": row.response_text}}
        if kind == "chat"
        else {"text": row.response_text}
    )
    return {
        "id": f"cached-{row.key[:24]}",
        "created": int(row.created_at),
        "model": row.model or "",
        "choices": [{"index": 0, **message, "finish_reason": "stop"}],
    }


def text_of_row(row: CacheRow, raw: str | None) -> str:
    """A cached answer's text as it arrived, even where the cache file could not hold it.

    SQLite text is UTF-8, which has no form for a lone surrogate (a ``\\ud800`` escape
    in the upstream's JSON decodes to one), so the store wrote U+FFFD in its place. The
    raw body keeps the escape: the text comes back from it, taken only if it differs
    from the row's in those places alone.
    """
    text = row.response_text
    if "\ufffd" not in text or raw is None:
        return text
    try:
        body = json.loads(raw)
        endpoint = "chat/completions" if "message" in body["choices"][0] else "completions"
        exact = TEXT_OF[endpoint](body)
    except (ValueError, LookupError, TypeError, AttributeError):
        return text
    return exact if storable_text(exact) == text else text


_decoder = json.JSONDecoder()


def stored_body(raw: str | None) -> str | None:
    """A row's raw body if it looks like a JSON object; None for one cut short or foreign.

    A hit is answered with this text as it is (the gateway sends it unparsed), so a
    body that cannot be a completion is dropped and the answer rebuilt from the text.
    Only its ends are looked at: parsing every hit would cost the replay its speed.
    """
    if not raw:
        return None
    if (raw[0] == "{" or raw.lstrip()[:1] == "{") and (raw[-1] == "}" or raw.rstrip()[-1:] == "}"):
        return raw
    return None


def usage_of(raw: str | None) -> Usage:
    """The ``usage`` object of a stored body, without parsing the whole body.

    A cached replay reads usage for every hit; bodies put ``usage`` last, so
    decoding just that object from its key onwards is far cheaper than ``loads``.
    """
    if not raw:
        return Usage()
    at = raw.rfind('"usage"')
    if at >= 0:
        start = raw.find("{", at)
        if start >= 0 and raw[at + 7 : start].strip() == ":":
            try:
                usage, end = _decoder.raw_decode(raw, start)
            except ValueError:
                usage = None
            # Only the body's own: a "usage" nested deeper (in a choice, say) is followed by
            # two closing brackets at least, the top-level one (OpenAI puts service_tier and
            # system_fingerprint after it) by one and plain values. A bracket in a string
            # after it only sends this to the full parse below.
            if isinstance(usage, dict) and _closes_body(raw, end):
                return Usage.from_body({"usage": usage})
    try:
        body = json.loads(raw)
    except ValueError:
        return Usage()
    return Usage.from_body(body)


def _closes_body(raw: str, end: int) -> bool:
    """Whether ``raw[end:]`` holds only scalar members and the top-level object's ``}``."""
    tail = raw[end:]
    return tail.count("}") == 1 and "{" not in tail and "[" not in tail and "]" not in tail


def joined(result: MinimaLlmResult, request_id: str) -> MinimaLlmResult:
    """A shared answer for one of the requests that joined it (marked ``cache_source="inflight"``)."""
    if isinstance(result, MinimaLlmResponse):
        return replace(result, request_id=request_id, cache_source="inflight")
    return replace(result, request_id=request_id)
