"""A circuit breaker: stop sending to an upstream that keeps failing, and probe it now and then."""

from __future__ import annotations

import math

from ..clock import SYSTEM_CLOCK, Clock

CLOSED = "closed"
OPEN = "open"
HALF_OPEN = "half-open"
# However often the probes fail, one goes out at least this often.
MAX_RESET_S = 60.0
# What a call refused while a probe is out is told to wait: probes usually take well
# under a second, and a caller should come back soon after one succeeds.
PROBE_RETRY_S = 1.0
# What says the upstream is down rather than unhappy with one request: no connection,
# no answer in time (counted only if nothing sent later was answered meanwhile), or a
# fronting proxy (nginx, a load balancer) that could not reach it. A dropped connection
# says nothing: a live server cuts answers halfway too. 503, 429 and 504 (which nginx
# also sends for one long generation) are overload, which cooldown and pacing handle.
DOWN_KINDS = frozenset({"connect", "timeout"})
DOWN_STATUS = 502


class Breaker:
    """Opens after ``threshold`` calls in a row found the upstream down; then fails calls fast.

    Open, it refuses every call for ``reset_s``, then lets one through: the probe. The
    probe's failure opens it again for twice as long (up to ``MAX_RESET_S``, or
    ``reset_s`` if that is longer); any answer closes it. A failure counts only if no
    call sent after it has been answered: the upstream was up while it waited. So long
    generations timing out beside quick answers, or calls on the wire when the probe
    closed it timing out late, neither trip it nor reopen it; and while it is open, only
    the probe's failure counts. What counts as down is the caller's to judge
    (``DOWN_KINDS``, ``DOWN_STATUS``); this object keeps the state.
    """

    def __init__(self, threshold: int, reset_s: float, clock: Clock = SYSTEM_CLOCK) -> None:
        if threshold < 1 or not reset_s > 0:
            raise ValueError(
                f"a breaker needs threshold >= 1 and reset_s > 0, not {threshold}, {reset_s}"
            )
        self.threshold = threshold
        self.reset_s = reset_s
        self.clock = clock
        self.streak = 0
        self.opened = 0
        self.rejected = 0
        self.last_failure = ""
        # Read by callers before they ask anything: closed, there is nothing to ask.
        self.is_open = False
        self._open_for = reset_s
        self._until = 0.0  # while open: when the next probe may go
        self._probe_until: float | None = None  # while a probe is out: when it counts as lost
        # The send time of the latest call answered: failures of calls sent before it do not count.
        self._answered_sent_at = -math.inf

    @property
    def state(self) -> str:
        """``closed``; ``open``, refusing every call; or ``half-open``, past its wait (a probe may be out)."""
        if not self.is_open:
            return CLOSED
        return HALF_OPEN if self.clock.monotonic() >= self._until else OPEN

    @property
    def refusing(self) -> bool:
        """Whether a call would be refused now: open, or half-open with its probe out."""
        return self.is_open and self._wait(self.clock.monotonic()) > 0

    def blocked(self) -> float:
        """0.0 if a call may go on to wait for its turn, else about how long until one may.

        Unlike ``admit`` it claims no probe: a call refused here never waits for pacing
        or a slot, and one that passes still asks ``admit`` right before it is sent.
        """
        if not self.is_open:
            return 0.0
        wait = self._wait(self.clock.monotonic())
        if wait:
            self.rejected += 1
        return wait

    def admit(self, probe_bound_s: float) -> float:
        """0.0 if a call may go now (half-open: as the probe), else about how long until one may.

        Calls after the probe are refused until it reports, or until ``probe_bound_s``
        has passed without a report.
        """
        if not self.is_open:
            return 0.0
        now = self.clock.monotonic()
        wait = self._wait(now)
        if wait:
            self.rejected += 1
        else:
            self._probe_until = now + probe_bound_s
        return wait

    def _wait(self, now: float) -> float:
        """Open: how long a call must wait (0.0: it may go, as the probe)."""
        wait = self._until - now
        if wait > 0:
            return wait
        probe = self._probe_until
        return PROBE_RETRY_S if probe is not None and now < probe else 0.0

    def retry_in(self) -> float:
        """Seconds until a call may go (0.0 when closed), for a ``Retry-After``."""
        if not self.is_open:
            return 0.0
        wait = self._until - self.clock.monotonic()
        return wait if wait > 0 else PROBE_RETRY_S

    def answered(self, sent_at: float) -> bool:
        """The upstream answered a call sent at ``sent_at``: close; True if it was open."""
        self.streak = 0
        if sent_at > self._answered_sent_at:
            self._answered_sent_at = sent_at
        if not self.is_open:
            return False
        self.is_open = False
        self._probe_until = None
        return True

    def probe_now(self) -> None:
        """Let the next call probe at once: something else (a health check) saw the upstream answer.

        Only in the first wait after the breaker opened: once a probe has failed, that
        other sign of life is known not to mean the calls would succeed.
        """
        if self.is_open and self._open_for == self.reset_s:
            self._until = min(self._until, self.clock.monotonic())

    def failed(self, sent_at: float, why: str) -> bool:
        """A call sent at ``sent_at`` found the upstream down; True if this opened a closed breaker."""
        if sent_at < self._answered_sent_at:
            return False  # a call sent after it was answered: the upstream was up meanwhile
        if self.is_open:
            if sent_at < self._until:
                return False  # sent before the breaker opened: not the probe
            # The probe failed: wait longer before the next one.
            self._open_for = min(2 * self._open_for, max(MAX_RESET_S, self.reset_s))
            self._reopen(why)
            return False
        self.streak += 1
        if self.streak < self.threshold:
            return False
        self.is_open = True
        self.opened += 1
        self._open_for = self.reset_s
        self._reopen(why)
        return True

    def unjudged(self, sent_at: float) -> None:
        """A call ended telling nothing about the upstream (cancelled, say): a probe may go again."""
        if self.is_open and sent_at >= self._until:
            self._probe_until = None

    def _reopen(self, why: str) -> None:
        self.last_failure = why
        self._until = self.clock.monotonic() + self._open_for
        self._probe_until = None

    def __repr__(self) -> str:
        return (
            f"<Breaker {self.state} streak={self.streak}/{self.threshold}"
            f" opened={self.opened} rejected={self.rejected}>"
        )
