"""Token pacing: send a request only when the server's token limit has room for its charge."""

from __future__ import annotations

import asyncio
import contextlib
import threading
from collections import deque
from collections.abc import Mapping
from typing import Any, NamedTuple

from ..clock import SYSTEM_CLOCK, Clock
from ._futures import wake
from .headers import RateLimitInfo
from .pacer import PER_MINUTE_RESET_MAX_S, SAFETY

# A token limit charges a request when it is admitted, before any token is generated:
# OpenAI's limiter counts the prompt at about four characters a token (it does not
# tokenize) plus max_tokens for every choice asked for.
CHARS_PER_TOKEN = 4
# The request at the head of the queue looks again this often while it waits: an
# answer may have said that more is left than this client had counted.
RECHECK_S = 0.1
# A server may charge more than the estimate (a reply without max_tokens, another
# tokenizer). Each refusal says by how much, and that is added to every charge after
# it, fading by this factor with each answer so one long reply does not count forever.
EXTRA_FADE = 0.98
MAX_EXTRA_STEP = 0.1  # of the bucket, at most, per refusal


class Charge(NamedTuple):
    """What acquire charged a request: its tokens, and the running total once they were taken."""

    tokens: float
    total: float


def estimate_tokens(payload: Mapping[str, Any]) -> int:
    """What a per-minute token limit charges for ``payload`` when the server admits it."""
    chars = _text_length(payload.get("messages"))
    chars += _text_length(payload.get("prompt")) + _text_length(payload.get("input"))
    most = payload.get("max_completion_tokens") or payload.get("max_tokens")
    n = payload.get("n")
    choices = n if isinstance(n, int) and n > 0 else 1
    charge = -(-chars // CHARS_PER_TOKEN)
    if isinstance(most, int) and not isinstance(most, bool) and most > 0:
        charge += most * choices
    return charge


def _text_length(value: object) -> int:
    """Characters of text in a prompt, an input, messages or content parts, however nested."""
    if isinstance(value, str):
        return len(value)
    if isinstance(value, Mapping):
        return _text_length(value.get("content")) + _text_length(value.get("text"))
    if isinstance(value, list):
        if value and all(isinstance(item, int) for item in value):
            return len(value) * CHARS_PER_TOKEN  # token ids, one token each
        return sum(_text_length(item) for item in value)
    return 0


class TokenPacer:
    """A local copy of the server's token bucket, kept in step with ``x-ratelimit-*-tokens``.

    Requests wait in FIFO order for the tokens they will be charged, so a large
    prompt is not refused again and again while small ones take every refill.
    Nothing is paced until the server states a per-minute token limit.
    """

    def __init__(self, clock: Clock = SYSTEM_CLOCK) -> None:
        self._clock = clock
        self.limit: int | None = None
        self.capacity = 0.0
        self._level = 0.0
        self._at = 0.0
        # Tokens charged to every request sent, so an answer's count of what was
        # left can be set against what this client sent after that request.
        self.charged = 0.0
        # Tokens added to each estimate, learned from refusals (see EXTRA_FADE).
        self.extra = 0.0
        self._queue: deque[asyncio.Future[None]] = deque()
        self._lock = threading.Lock()
        self.waits = 0
        self.waited_s = 0.0

    @property
    def rate(self) -> float:
        """Tokens a second this client spends at most (0 when no limit is known)."""
        return self.limit * SAFETY / 60.0 if self.limit else 0.0

    def level(self) -> float:
        """Tokens this client counts as left now."""
        now = self._clock.monotonic()
        self._level = min(self.capacity, self._level + (now - self._at) * self.rate)
        self._at = now
        return self._level

    async def acquire(self, cost: int) -> Charge:
        """Wait until ``cost`` tokens (and the learned extra) are left, and take them."""
        queue = self._queue
        # The queue and the level are shared by every event loop using the backend,
        # each in its own thread: a turn is taken and handed on under one lock.
        with self._lock:
            if not queue and self.level() >= self._need(cost):
                return self._take(self._need(cost))
            turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            dropped = False
            while queue and queue[0].get_loop().is_closed():
                queue.popleft()  # left behind by an event loop that has ended
                dropped = True
            if dropped and queue and not queue[0].done():
                wake(queue[0])  # the live waiter now first was waiting on the dead one
            queue.append(turn)
            first = queue[0] is turn
        started = self._clock.monotonic()
        try:
            if not first:
                await turn
            # The need is read again each time: a refusal meanwhile may have raised the extra.
            # A thousandth of a token short is close enough: waits for less can round to
            # no time at all on the clock, and the loop would spin.
            while (short := self._need(cost) - self.level()) > 1e-3 and self.rate > 0:
                await self._clock.sleep(min(short / self.rate, RECHECK_S))
            self.waits += 1
            self.waited_s += self._clock.monotonic() - started
            with self._lock:
                return self._take(self._need(cost))
        finally:
            self._leave(turn)

    def refund(self, charge: Charge) -> None:
        """Give back what ``acquire`` took for a request that was never sent.

        Only the level goes back up; the running total stays, so an answer to a request
        sent before this one still counts these tokens as spent, which errs on the side
        of sending less until the next answer sets the level again.
        """
        self._level = min(self.capacity, self.level() + charge.tokens)

    def _need(self, cost: int) -> float:
        # More than the bucket holds goes when it is full: the server says whether it fits.
        return min(cost + self.extra, self.capacity)

    def _take(self, cost: float) -> Charge:
        self._level -= cost
        self.charged += cost
        return Charge(cost, self.charged)

    def _leave(self, turn: asyncio.Future[None]) -> None:
        queue = self._queue
        with self._lock:
            head = bool(queue) and queue[0] is turn
            if not head:
                with contextlib.suppress(ValueError):  # dropped already, as an ended loop's
                    queue.remove(turn)
                return
            queue.popleft()
            # The next request's turn to wait for its tokens, on whichever loop it waits.
            # One already done was cancelled: leaving, it hands the turn on itself.
            while queue and not queue[0].done() and not wake(queue[0]):
                queue.popleft()  # its loop has closed: nobody is there to take the turn

    def observe(
        self,
        info: RateLimitInfo,
        sent_at: float,
        charge: Charge | None,
        refused: bool = False,
        retry_after: float | None = None,
    ) -> None:
        """Learn the limit and what is left from an answer to a request sent at ``sent_at``.

        ``charge`` is what acquire took for it (None: it was not paced), so the tokens
        of requests sent since then, which the server may not have counted yet, still
        count as spent. ``refused``: it was answered 429, after ``retry_after``.
        """
        limit = info.limit_tokens
        reset = info.reset_tokens_s
        if limit and (reset is None or reset <= PER_MINUTE_RESET_MAX_S):
            self.limit = limit
        elif limit:
            return  # a budget for the day, not a rate: the request pacer's retries cope
        if not self.limit or info.remaining_tokens is None:
            return
        left = float(info.remaining_tokens)
        if reset is not None:
            # OpenAI's reset is the time until the bucket is full again: it says how much it holds.
            # Never lowered: a reset rounded to 0s, or a window that rolls over, would
            # otherwise say the bucket holds nothing and leave every request unpaced.
            held = left + reset * self.limit / 60.0
            self.capacity = min(float(self.limit), max(self.capacity, held))
        elif not self.capacity:
            self.capacity = float(self.limit)
        now = self._clock.monotonic()
        since = self.charged - charge.total if charge is not None else 0.0
        self._level = min(self.capacity, left + (now - sent_at) * self.rate - since)
        self._at = now
        if charge is None:
            return
        if not refused:
            self.extra *= EXTRA_FADE
        elif info.remaining_requests != 0:
            # A 429 with no request left is the request limit's, whatever tokens were left.
            self._learn_extra(left, retry_after, charge.tokens)

    def _learn_extra(self, left: float, retry_after: float | None, took: float) -> None:
        """A paced request was refused: count what the server must have charged past ``took``."""
        if retry_after is not None and self.limit:
            # What it would charge: what is left plus the refill until it would fit.
            short = left + retry_after * self.limit / 60.0 - took
        elif left >= took:
            short = left - took + 0.1 * took  # it fit by this client's count: more than that
        else:
            short = 0.0  # too little was left: the count of the level was off, not the charge
        if short > 0:
            # A little at a time: a Retry-After in whole seconds, or one set by another
            # limit, says far more than any estimate is off by.
            step = min(short, MAX_EXTRA_STEP * self.capacity)
            self.extra = min(self.extra + step, self.capacity)

    def __repr__(self) -> str:
        limit = "unknown" if self.limit is None else f"{self.limit}/min"
        return (
            f"<TokenPacer limit={limit} level={self._level:.0f}/{self.capacity:.0f}"
            f" extra={self.extra:.0f}"
            f" queued={len(self._queue)} waits={self.waits} waited={self.waited_s:.2f}s>"
        )
