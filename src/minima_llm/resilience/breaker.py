"""A circuit breaker: stop sending to an upstream that keeps failing, and probe it now and then."""

from __future__ import annotations

from ..clock import SYSTEM_CLOCK, Clock

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
# However often the probes fail, one goes out at least this often.
MAX_RESET_S = 60.0
# What a call refused while a probe is out is told to wait: probes usually take well
# under a second, and a caller should come back soon after one succeeds.
PROBE_RETRY_S = 1.0


class Breaker:
    """Opens after ``failures`` calls in a row found the upstream down; then fails calls fast.

    Open, it refuses every call for ``reset_s``, then lets one through: the probe. The
    probe's failure opens it again for twice as long (up to ``MAX_RESET_S``, or
    ``reset_s`` if that is longer); any answer closes it. Only calls sent after the
    breaker opened can fail a probe: those already on the wire when it opened tell
    nothing new. What counts as down (refused connections, timeouts, a fronting
    proxy's 502) is the caller's to decide; this object only keeps the state.
    """

    def __init__(self, failures: int, reset_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if failures < 1 or not reset_s > 0:
            raise ValueError(
                f"a breaker needs failures >= 1 and reset_s > 0, not {failures}, {reset_s}"
            )
        self.failures = failures
        self.reset_s = reset_s
        self.clock = clock
        self.streak = 0
        self.opened = 0
        self.rejected = 0
        self.last_failure = ""
        self._open = False
        self._open_for = reset_s
        self._until = 0.0  # while open: when the next probe may go
        self._probe_until: float | None = None  # while a probe is out: when it counts as lost

    @property
    def state(self) -> str:
        """``closed``, ``open`` (refusing every call) or ``half-open`` (a probe may go)."""
        if not self._open:
            return CLOSED
        return HALF_OPEN if self.clock.monotonic() >= self._until else OPEN

    def admit(self, probe_bound_s: float) -> float:
        """0.0 if a call may go now, else about how many seconds until one may.

        Half-open, the first call admitted is the probe; calls after it are refused until
        it reports, or until ``probe_bound_s`` has passed without a report.
        """
        if not self._open:
            return 0.0
        now = self.clock.monotonic()
        wait = self._until - now
        if wait <= 0 and (self._probe_until is None or now >= self._probe_until):
            self._probe_until = now + probe_bound_s
            return 0.0
        self.rejected += 1
        return wait if wait > 0 else PROBE_RETRY_S

    def retry_in(self) -> float:
        """Seconds until a call may go (0.0 when closed), for a ``Retry-After``."""
        if not self._open:
            return 0.0
        wait = self._until - self.clock.monotonic()
        return wait if wait > 0 else PROBE_RETRY_S

    def answered(self) -> bool:
        """The upstream answered a call: close; True if it was open."""
        self.streak = 0
        if not self._open:
            return False
        self._open = False
        self._open_for = self.reset_s
        self._probe_until = None
        return True

    def failed(self, sent_at: float, why: str) -> bool:
        """A call sent at ``sent_at`` found the upstream down; True if this opened a closed breaker."""
        self.last_failure = why
        tripped = not self._open
        if tripped:
            self.streak += 1
            if self.streak < self.failures:
                return False
            self._open = True
            self._open_for = self.reset_s
            self.opened += 1
        elif sent_at >= self._until:
            # The probe failed: wait longer before the next one.
            self._open_for = min(2 * self._open_for, max(MAX_RESET_S, self.reset_s))
        else:
            return False  # sent before the breaker opened: nothing new
        self._until = self.clock.monotonic() + self._open_for
        self._probe_until = None
        return tripped

    def unjudged(self, sent_at: float) -> None:
        """A call ended telling nothing about the upstream (cancelled, say): a probe may go again."""
        if self._open and sent_at >= self._until:
            self._probe_until = None

    def __repr__(self) -> str:
        return (
            f"<Breaker {self.state} streak={self.streak}/{self.failures}"
            f" opened={self.opened} rejected={self.rejected}>"
        )
