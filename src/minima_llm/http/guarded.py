"""A transport behind a circuit breaker: calls to an upstream that is down fail at once."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Protocol, TypeVar
from urllib.parse import urlsplit

from ..errors import TransportError
from ..resilience import Breaker
from .base import HttpResponse, StreamingResponse, Transport

log = logging.getLogger("minima_llm")

# What says the upstream is down rather than unhappy with one request: no connection,
# a connection dropped or silent, or a fronting proxy (nginx, a load balancer) saying
# it could not reach it. 503 and 429 are overload, which cooldown and pacing handle.
DOWN_KINDS = frozenset({"connect", "reset", "timeout"})
DOWN_STATUSES = frozenset({502, 504})


class _Answer(Protocol):
    @property
    def status(self) -> int: ...


R = TypeVar("R", bound=_Answer)


class GuardedTransport:
    """Sends through ``inner`` while ``breaker`` admits calls; refusals are ``TransportError("unavailable")``."""

    def __init__(self, inner: Transport, breaker: Breaker) -> None:
        self.inner = inner
        self.breaker = breaker

    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        """As the inner transport's, unless the breaker is open."""
        return await self._send(self.inner.post, url, body, headers, timeout_s)

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> StreamingResponse:
        """As the inner transport's, unless the breaker is open; judged by the status alone."""
        return await self._send(self.inner.open_stream, url, body, headers, timeout_s)

    async def _send(
        self,
        send: Callable[[str, bytes, Mapping[str, str], float], Awaitable[R]],
        url: str,
        body: bytes,
        headers: Mapping[str, str],
        timeout_s: float,
    ) -> R:
        sent_at = self._admit(timeout_s)
        try:
            resp = await send(url, body, headers, timeout_s)
        except TransportError as exc:
            self._failed(url, sent_at, exc)
            raise
        except BaseException:
            self.breaker.unjudged(sent_at)
            raise
        self._answered(url, sent_at, resp.status)
        return resp

    async def aclose(self) -> None:
        """Close the inner transport."""
        await self.inner.aclose()

    def _admit(self, timeout_s: float) -> float:
        breaker = self.breaker
        # A probe that never reports (its caller gone without a word) frees the way
        # after the longest an attempt can take: a read timeout, and a second for the rest.
        wait = breaker.admit(timeout_s + 1.0)
        if wait:
            raise TransportError(
                "unavailable",
                f"the upstream failed {_calls(breaker.failures)} in a row"
                f" (last: {breaker.last_failure}); nothing is sent to it for {wait:.1f}s",
            )
        return breaker.clock.monotonic()

    def _failed(self, url: str, sent_at: float, exc: TransportError) -> None:
        if exc.kind not in DOWN_KINDS:
            self.breaker.unjudged(sent_at)
        elif self.breaker.failed(sent_at, str(exc)):
            self._tripped(url)

    def _answered(self, url: str, sent_at: float, status: int) -> None:
        breaker = self.breaker
        if status in DOWN_STATUSES:
            if breaker.failed(sent_at, f"HTTP {status}"):
                self._tripped(url)
        elif breaker.answered():
            log.info("upstream %s answers again: sending to it again", _origin(url))

    def _tripped(self, url: str) -> None:
        breaker = self.breaker
        log.warning(
            "upstream %s failed %s in a row (last: %s): failing calls at once,"
            " probing it again in %gs",
            _origin(url),
            _calls(breaker.failures),
            breaker.last_failure,
            breaker.reset_s,
        )

    def __repr__(self) -> str:
        return f"<GuardedTransport {self.inner!r} {self.breaker!r}>"


def _calls(n: int) -> str:
    return "1 call" if n == 1 else f"{n} calls"


def _origin(url: str) -> str:
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}"
