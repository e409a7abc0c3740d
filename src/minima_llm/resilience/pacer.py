"""Request pacing: start from the configured RPM, then follow what the server advertises."""

from __future__ import annotations

import asyncio
import contextlib
import math

from ..clock import SYSTEM_CLOCK, Clock
from ._futures import wake
from .headers import NO_RATE_LIMITS, RateLimitInfo

# Pace a little under the advertised limit: responses arrive out of order and the
# server's clock is not ours, so running exactly at the limit meets 429s.
SAFETY = 0.97
# With no configured RPM and nothing learned yet, one probe request goes first so
# that a rate-limited server can state its limit before every worker fires at once.
# The others wait at most this long for the probe's answer, so a slow endpoint
# costs only this much once.
PROBE_WAIT_S = 0.1
# Whatever a per-minute request limit spends comes back within a minute, so a longer
# reset (a few seconds allowed for rounding) says the limit is counted over a longer
# window: Groq's x-ratelimit-limit-requests is per day ("14400" with "2m59.56s"), as
# is OpenAI's on tiers with a daily limit ("200" with "7m12s"). Read as per minute, it
# would pace at 14,400 a minute, far past the configured rate and the real limit.
PER_MINUTE_RESET_MAX_S = 65.0
# A server that refuses with 429s but never states its limit (Azure without limit
# headers, Together's per-second names, most gateways) is paced at a rate learned from
# its refusals, as TCP learns a path's capacity: at the first 429, a little under the
# rate it accepted just before; at each later one sent since, a fifth less; and a
# little more after each answer, so the rate keeps probing upward. Without this, every
# worker waits out one shared pause, is released at once, and is refused together.
FIRST_DECREASE = 0.9
DECREASE = 0.8
# Raised by this fraction a second while answers come: back from a decrease in about
# 4.5 s, so a server at its limit refuses about one start in every few hundred.
INCREASE_PER_S = 0.05
MIN_LEARNED_RPM = 6.0  # one start in ten seconds, however often refused
# At most one decrease this often: requests that took their turn before one (queued
# for a connection, or retried) are refused after it, and say nothing of the new rate.
DECREASE_EVERY_S = 1.0
# The rate accepted before the first refusal is counted over windows this long, and
# learned only from this many answers at least: fewer say how often this client asked,
# not how often the server allows (a lone 429 before any answer tells nothing of a rate).
RATE_WINDOW_S = 2.0
MIN_EVIDENCE = 8


class RpmPacer:
    """Spaces request starts ``60 / rpm`` seconds apart, FIFO, learning the rate from headers."""

    def __init__(
        self,
        rpm: int,
        clock: Clock = SYSTEM_CLOCK,
        follow_server: bool = True,
        max_hold_s: float = math.inf,
    ) -> None:
        self.configured_rpm = rpm
        # A Retry-After of an hour (a spent quota) or the reset of a daily limit must
        # not stop every request that long; retries cope with a server that still
        # refuses when the hold ends.
        self.max_hold_s = max_hold_s
        self.server_rpm: int | None = None
        self.follow_server = follow_server
        self._clock = clock
        self._next_at = 0.0
        self._burst = 0
        self._hold_until = 0.0
        self._probe: asyncio.Future[None] | None = None
        self._probe_deadline = 0.0
        self._learned = rpm > 0
        # The server's request limit turned out to be counted over more than a minute.
        self.limit_not_per_minute = False
        # The server states a token limit: its 429s are paced by tokens, not learned from.
        self.token_limit_stated = False
        # The rate learned from 429s of a server that states no limit (None: none yet).
        self.learned_rpm: float | None = None
        self._decreased_at = -math.inf
        self._raised_at = -math.inf
        # Answers in the current and the last full RATE_WINDOW_S, for the first estimate.
        self._window_at = -math.inf
        self._window_answers = 0
        self._last_window_answers = 0
        self.waits = 0
        self.waited_s = 0.0

    @property
    def rpm(self) -> float:
        """The rate in force now (0 = unlimited)."""
        if self.server_rpm and self.follow_server:
            return self.server_rpm * SAFETY
        learned = self.learned_rpm
        if learned is not None and (self.configured_rpm <= 0 or learned < self.configured_rpm):
            return learned
        return float(self.configured_rpm)

    def reserve(self) -> float:
        """Claim the next start slot; returns how long the caller must wait for it."""
        now = self._clock.monotonic()
        start = max(now, self._hold_until)
        rate = self.rpm
        if rate > 0:
            if self._burst > 0:
                self._burst -= 1
            else:
                start = max(start, self._next_at)
                self._next_at = start + 60.0 / rate
        return start - now

    def ready(self) -> bool:
        """Whether a request may start now with nothing to wait for or claim (unpaced, no hold)."""
        return self._learned and self.rpm <= 0 and self._clock.monotonic() >= self._hold_until

    async def acquire(self) -> None:
        """Wait for a start slot (and for the probe, before anything is learned)."""
        if not self._learned:
            await self._await_probe()
        delay = self.reserve()
        if delay > 0:
            self.waits += 1
            self.waited_s += delay
            claimed = self._next_at
            try:
                await self._clock.sleep(delay)
            except asyncio.CancelledError:
                # Give the slot back if nobody queued behind it, so an aborted batch
                # does not push the next one's start back by one interval per worker.
                if self._next_at == claimed and self.rpm > 0:
                    self._next_at -= 60.0 / self.rpm
                raise

    async def _await_probe(self) -> None:
        loop = asyncio.get_running_loop()
        probe = self._probe
        if probe is None or probe.get_loop() is not loop or probe.done():
            if probe is not None and probe.done():
                return
            # This caller is the probe: it goes now; the rest wait for observe().
            self._probe = loop.create_future()
            self._probe_deadline = self._clock.monotonic() + PROBE_WAIT_S
            return
        left = self._probe_deadline - self._clock.monotonic()
        if left > 0:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(asyncio.shield(probe), left)
        self._learned = True

    def observe(self, info: RateLimitInfo) -> None:
        """Learn from one response's rate-limit headers (or their absence)."""
        if self._learned and info is NO_RATE_LIMITS:
            return  # nothing to learn, and no probe left to finish (learning finished it)
        now = self._clock.monotonic()
        limit = info.limit_requests
        reset = info.reset_requests_s
        if limit and reset is not None and reset > PER_MINUTE_RESET_MAX_S:
            # A budget for the day (or hour), not a rate: pace as if it had not been said.
            self.limit_not_per_minute = True
            self.server_rpm = None
            self._burst = 0
        if limit and not self.limit_not_per_minute:
            first = self.server_rpm is None
            self.server_rpm = limit
            if first and self.configured_rpm == 0 and info.remaining_requests:
                # Spend what the server says is left now, keeping a margin for racers.
                self._burst = max(0, info.remaining_requests - 2)
                self._next_at = max(self._next_at, now)
        if info.remaining_requests == 0 and info.reset_requests_s:
            interval = 60.0 / self.rpm if self.rpm > 0 else info.reset_requests_s
            self._hold(now, min(info.reset_requests_s, interval))
            self._burst = 0
        if info.limit_tokens:
            # Token limits are TokenPacer's: holding every start until the bucket is full
            # again (what x-ratelimit-reset-tokens says) would idle most of a minute.
            self.token_limit_stated = True
        self._finish_probe()

    def answered(self, at: float) -> None:
        """A request sent at ``at`` was answered (2xx): count it, and probe the learned rate up."""
        learned = self.learned_rpm
        if learned is not None:
            # By time, not per answer: per answer, a rate learned low would climb slowly.
            elapsed = at - self._raised_at
            if elapsed > 0:
                self.learned_rpm = learned * (1.0 + INCREASE_PER_S * min(elapsed, 1.0))
                self._raised_at = at
        elif at - self._window_at < RATE_WINDOW_S:
            self._window_answers += 1
        else:
            full = at - self._window_at < 2 * RATE_WINDOW_S
            self._last_window_answers = self._window_answers if full else 0
            self._window_at, self._window_answers = at, 1

    def penalize(self, retry_after_s: float | None, sent_at: float | None = None) -> None:
        """After a 429: hold every start until the server's retry-after has passed.

        For a server that states no limit, also lower the learned rate, once for the
        requests sent after the last lowering (the rest were on the wire already).
        """
        now = self._clock.monotonic()
        if retry_after_s:
            self._hold(now, retry_after_s)
        self._burst = 0
        if (
            self._limit_unstated
            and now - self._decreased_at >= DECREASE_EVERY_S
            and (sent_at is None or sent_at >= self._decreased_at)
        ):
            self._decrease(now)
        self._finish_probe()

    @property
    def learns_from_refusals(self) -> bool:
        """Whether the last 429 set the pace: a server that states no limit, and a rate learned."""
        return self.learned_rpm is not None and self._limit_unstated

    @property
    def _limit_unstated(self) -> bool:
        """Whether refusals may set the pace: the server is followed, and stated no limit."""
        return self.follow_server and not self.server_rpm and not self.token_limit_stated

    def _decrease(self, now: float) -> None:
        learned = self.learned_rpm
        if learned is None:
            answers = self._last_window_answers + self._window_answers
            if answers < MIN_EVIDENCE:
                return
            # Answers per minute over the last full window and the one under way.
            span = RATE_WINDOW_S + max(min(now - self._window_at, RATE_WINDOW_S), 0.0)
            configured = self.configured_rpm or math.inf
            learned = min(answers * 60.0 / span, configured) * FIRST_DECREASE
        else:
            learned *= DECREASE
        self.learned_rpm = max(MIN_LEARNED_RPM, learned)
        self._decreased_at = self._raised_at = now
        self._next_at = max(self._next_at, now)

    def _hold(self, now: float, seconds: float) -> None:
        self._hold_until = max(self._hold_until, now + min(seconds, self.max_hold_s))

    def _finish_probe(self) -> None:
        self._learned = True
        probe, self._probe = self._probe, None
        if probe is None or probe.done():
            return
        # A probe whose request failed without headers outlives its loop (asyncio.run
        # ended): a backend reused under the next loop must not touch the closed one.
        wake(probe)

    def __repr__(self) -> str:
        learned = f" learned={self.learned_rpm:.0f}" if self.learned_rpm is not None else ""
        return (
            f"<RpmPacer rpm={self.rpm:.0f} configured={self.configured_rpm} "
            f"server={self.server_rpm}{learned} waits={self.waits} waited={self.waited_s:.2f}s>"
        )
