"""The attempt loop: cooldown, pacing, in-flight bound, send, classify, back off, retry."""

from __future__ import annotations

import asyncio
import json
import logging
import random
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from .clock import Clock
from .config import MinimaLlmConfig
from .errors import TransportError
from .http import HttpResponse, Transport, encode_body
from .loopbound import LoopBound
from .resilience import (
    Cooldown,
    RpmPacer,
    attempts_left,
    backoff_delay,
    is_overload_status,
    is_retryable_status,
    parse_rate_limits,
    parse_retry_after,
)
from .stats import LiveStats
from .types import MinimaLlmFailure

log = logging.getLogger("minima_llm")

SNIPPET = 300


@dataclass(frozen=True)
class Completion:
    """A successful upstream answer: the raw body text and its parsed form."""

    body_text: str
    body: dict[str, Any]
    text: str


class _Problem(Exception):
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


class UpstreamCaller:
    """Sends one request body with every resilience rule applied; never raises for upstream trouble."""

    def __init__(
        self,
        config: MinimaLlmConfig,
        transport: Transport,
        clock: Clock,
        stats: LiveStats,
        rng: random.Random | None = None,
    ) -> None:
        self.cfg = config
        self.transport = transport
        self.clock = clock
        self.stats = stats
        self.rng = rng or random.Random()
        self.cooldown = Cooldown(
            config.cooldown_floor_s,
            config.cooldown_cap_s,
            config.cooldown_halflife_s,
            config.base_backoff_s,
            clock,
        )
        self.pacer = RpmPacer(config.rpm, clock)
        self._slots: LoopBound[asyncio.Semaphore] = LoopBound(
            lambda: asyncio.Semaphore(config.max_outstanding)
        )
        self.headers: dict[str, str] = {
            "Content-Type": "application/json",
            "Accept": "application/json",
        }
        if config.api_key:
            self.headers["Authorization"] = f"Bearer {config.api_key}"
        # Retry-After can be long; every wait still needs a bound.
        self.max_wait_s = max(config.max_backoff_s, config.cooldown_cap_s)

    def encode(self, payload: Mapping[str, Any]) -> tuple[bytes, dict[str, str]]:
        """The request body and headers for a JSON payload."""
        headers = dict(self.headers)
        body = encode_body(json.dumps(payload).encode("utf-8"), headers, self.cfg.compress_gzip)
        return body, headers

    async def complete(
        self, request_id: str, url: str, payload: Mapping[str, Any]
    ) -> Completion | MinimaLlmFailure:
        """Send until success, a permanent error, or attempts run out."""
        body, headers = self.encode(payload)
        stamps: list[float] = []
        attempt = 0
        while True:
            attempt += 1
            try:
                return await self._attempt(url, body, headers, stamps)
            except _Problem as problem:
                if not problem.retryable or not attempts_left(attempt, self.cfg.max_attempts):
                    return self._failure(request_id, problem, attempt, stamps)
                delay = backoff_delay(
                    attempt,
                    self.cfg.base_backoff_s,
                    self.cfg.max_backoff_s,
                    self.cfg.jitter,
                    self.rng,
                )
                if problem.retry_after is not None:
                    delay = max(delay, problem.retry_after)
                self.stats.retries += 1
                log.debug(
                    "%s: attempt %d failed (%s), retrying in %.2fs",
                    request_id,
                    attempt,
                    problem,
                    delay,
                )
                await self.clock.sleep(min(delay, self.max_wait_s))

    async def _attempt(
        self, url: str, body: bytes, headers: dict[str, str], stamps: list[float]
    ) -> Completion:
        await self.cooldown.wait()
        await self.pacer.acquire()
        async with self._slots.get():
            stamps.append(self.clock.monotonic())
            self.stats.in_flight += 1
            try:
                resp = await self.transport.post(url, body, headers, self.cfg.timeout_s)
            except TransportError as exc:
                raise _transport_problem(exc, self.cfg.timeout_s) from exc
            finally:
                self.stats.in_flight -= 1
        self.pacer.observe(parse_rate_limits(resp.headers))
        if 200 <= resp.status < 300:
            return _parse_completion(resp)
        raise self._status_problem(resp)

    def _status_problem(self, resp: HttpResponse) -> _Problem:
        status = resp.status
        snippet = resp.body[:SNIPPET].decode("utf-8", "replace")
        problem = _Problem(
            "HTTPError", f"HTTP {status}", status, snippet, is_retryable_status(status)
        )
        problem.retry_after = parse_retry_after(resp.headers)
        if status == 429:
            self.stats.rate_limited += 1
            self.pacer.penalize(problem.retry_after)
        if is_overload_status(status):
            self.cooldown.bump(problem.retry_after)
        return problem

    def _failure(
        self, request_id: str, problem: _Problem, attempts: int, stamps: list[float]
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
        )


def _transport_problem(exc: TransportError, timeout_s: float) -> _Problem:
    if exc.kind == "timeout":
        return _Problem("TimeoutError", f"timed out after {timeout_s}s", 408, str(exc), True)
    if exc.kind == "closed":
        return _Problem("ClosedError", str(exc), None, None, False)
    kind = "ConnectionResetError" if exc.kind == "reset" else "ConnectionError"
    return _Problem(kind, str(exc), None, str(exc)[:SNIPPET], True)


def _parse_completion(resp: HttpResponse) -> Completion:
    try:
        text = resp.body.decode("utf-8")
        body = json.loads(text)
        content = body["choices"][0]["message"].get("content")
    except (UnicodeDecodeError, ValueError, KeyError, IndexError, TypeError, AttributeError) as exc:
        snippet = resp.body[:SNIPPET].decode("utf-8", "replace")
        # A 200 with a body we cannot read is usually a proxy cutting the body; try again.
        raise _Problem(
            "MalformedResponse", f"unreadable completion body: {exc!r}", resp.status, snippet, True
        ) from exc
    return Completion(text, body, content if isinstance(content, str) else "")
