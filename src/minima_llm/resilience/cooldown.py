"""A shared cooldown that every request waits out after the server says it is overloaded."""

from __future__ import annotations

import math

from ..clock import SYSTEM_CLOCK, Clock


class Cooldown:
    """Overload backoff shared by all requests, decaying with a half-life.

    Each overload signal doubles the cooldown level (at least ``floor``, at most
    ``cap``); the level halves every ``halflife_s`` of quiet, so one 429 after an
    hour of calm costs little and a storm of them costs up to ``cap``.
    """

    def __init__(
        self,
        floor_s: float,
        cap_s: float,
        halflife_s: float,
        base_s: float = 0.5,
        clock: Clock = SYSTEM_CLOCK,
    ) -> None:
        self.floor_s = floor_s
        self.cap_s = cap_s
        self.halflife_s = halflife_s
        self.base_s = base_s
        self._clock = clock
        self._level = 0.0
        self._level_at = clock.monotonic()
        self.until = 0.0  # monotonic time the cooldown ends; read, never set, from outside
        self._bumped_at = -math.inf
        self.bumps = 0
        # Signals from requests already in flight at the last bump: counted, not escalated.
        self.echoes = 0
        self.pauses = 0

    def pause(self, seconds: float) -> None:
        """Hold requests for ``seconds`` (within floor and cap) without raising the level."""
        seconds = min(self.cap_s, max(self.floor_s, seconds))
        self.until = max(self.until, self._clock.monotonic() + seconds)
        self.pauses += 1

    def level(self) -> float:
        """The current, decayed cooldown level in seconds."""
        elapsed = self._clock.monotonic() - self._level_at
        return self._level * math.pow(0.5, elapsed / self.halflife_s) if self._level else 0.0

    def bump(self, hint_s: float | None = None, sent_at: float | None = None) -> float:
        """Record an overload signal; returns the new cooldown length.

        ``hint_s`` is the server's own Retry-After: when given it is used as is
        (within floor and cap) instead of doubling our guess. ``sent_at`` is when
        the refused request went out: one sent before the last bump was already
        on the wire when the server first said it was overloaded, so it tells us
        nothing new and does not double the level again. Without that, a burst of
        64 requests refused together would double the level 64 times, straight to
        the cap, for one moment of overload.
        """
        now = self._clock.monotonic()
        if sent_at is not None and sent_at < self._bumped_at and hint_s is None:
            self.echoes += 1
            return self.level()
        if hint_s is not None:
            new = hint_s
        else:
            current = self.level()
            new = current * 2.0 if current > 0 else self.base_s
        new = min(self.cap_s, max(self.floor_s, new))
        self._level, self._level_at = new, now
        self.until = max(self.until, now + new)
        self._bumped_at = now
        self.bumps += 1
        return new

    def remaining(self) -> float:
        """Seconds until requests may be sent again."""
        return max(0.0, self.until - self._clock.monotonic())

    async def wait(self) -> float:
        """Sleep out the cooldown (bounded by ``cap_s`` per loop); returns seconds waited."""
        waited = 0.0
        while (left := self.remaining()) > 0:
            step = min(left, self.cap_s) if self.cap_s > 0 else left
            await self._clock.sleep(step)
            waited += step
        return waited

    def __repr__(self) -> str:
        return (
            f"<Cooldown level={self.level():.2f}s remaining={self.remaining():.2f}s "
            f"bumps={self.bumps} echoes={self.echoes} floor={self.floor_s} cap={self.cap_s}>"
        )
