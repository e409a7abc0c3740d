"""Request pacing: start from the configured RPM, then follow what the server advertises."""

from __future__ import annotations

import asyncio
import contextlib
import math

from ..clock import SYSTEM_CLOCK, Clock
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
        self.waits = 0
        self.waited_s = 0.0

    @property
    def rpm(self) -> float:
        """The rate in force now (0 = unlimited)."""
        if self.server_rpm and self.follow_server:
            return self.server_rpm * SAFETY
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
        if (
            info.remaining_tokens is not None
            and info.limit_tokens
            and info.remaining_tokens < info.limit_tokens * 0.01
            and info.reset_tokens_s
        ):
            self._hold(now, info.reset_tokens_s)
        self._finish_probe()

    def penalize(self, retry_after_s: float | None) -> None:
        """After a 429: hold every start until the server's retry-after has passed."""
        if retry_after_s:
            self._hold(self._clock.monotonic(), retry_after_s)
        self._burst = 0
        self._finish_probe()

    def _hold(self, now: float, seconds: float) -> None:
        self._hold_until = max(self._hold_until, now + min(seconds, self.max_hold_s))

    def _finish_probe(self) -> None:
        self._learned = True
        probe, self._probe = self._probe, None
        if probe is None or probe.done():
            return
        loop = probe.get_loop()
        # A probe whose request failed without headers outlives its loop (asyncio.run
        # ended); a backend reused under the next loop must not touch the closed one.
        if not loop.is_closed():
            with contextlib.suppress(RuntimeError):  # it closed just now, in its own thread
                loop.call_soon_threadsafe(_resolve, probe)

    def __repr__(self) -> str:
        return (
            f"<RpmPacer rpm={self.rpm:.0f} configured={self.configured_rpm} "
            f"server={self.server_rpm} waits={self.waits} waited={self.waited_s:.2f}s>"
        )


def _resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
