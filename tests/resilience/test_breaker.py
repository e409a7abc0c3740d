"""The circuit breaker's state, driven by a fake clock."""

from __future__ import annotations

import pytest

from minima_llm.clock import FakeClock
from minima_llm.resilience import CLOSED, HALF_OPEN, OPEN, Breaker
from minima_llm.resilience.breaker import MAX_RESET_S, PROBE_RETRY_S


def tripped(failures: int = 3, reset_s: float = 5.0) -> tuple[Breaker, FakeClock]:
    """A breaker that has just opened."""
    clock = FakeClock()
    breaker = Breaker(failures, reset_s, clock)
    for _ in range(failures):
        breaker.failed(clock.now, "refused")
    assert breaker.state == OPEN
    return breaker, clock


def test_it_opens_only_after_the_failures_in_a_row() -> None:
    clock = FakeClock()
    breaker = Breaker(3, 5.0, clock)
    assert [breaker.failed(clock.now, "x") for _ in range(2)] == [False, False]
    breaker.answered(clock.now)  # an answer in between: the streak starts again
    assert [breaker.failed(clock.now, "x") for _ in range(3)] == [False, False, True]
    assert breaker.state == OPEN and breaker.opened == 1
    assert breaker.failed(clock.now, "x") is False  # already open: no second trip


def test_open_it_refuses_every_call_until_the_reset_time() -> None:
    breaker, clock = tripped(reset_s=5.0)
    assert breaker.admit(10.0) == pytest.approx(5.0)
    clock.advance(3.0)
    assert breaker.admit(10.0) == pytest.approx(2.0)
    assert breaker.retry_in() == pytest.approx(2.0)
    assert breaker.rejected == 2


def test_half_open_it_lets_exactly_one_probe_through() -> None:
    breaker, clock = tripped(reset_s=5.0)
    clock.advance(5.0)
    assert breaker.state == HALF_OPEN
    assert breaker.admit(10.0) == 0.0
    # Everyone else waits for the probe's word, told to come back soon.
    assert breaker.admit(10.0) == PROBE_RETRY_S
    assert breaker.retry_in() == PROBE_RETRY_S
    assert breaker.answered(clock.now) is True
    assert breaker.state == CLOSED and breaker.admit(10.0) == 0.0


def test_a_failed_probe_doubles_the_wait_up_to_the_cap() -> None:
    breaker, clock = tripped(reset_s=5.0)
    waits = []
    for _ in range(6):
        clock.advance(breaker.retry_in())
        assert breaker.admit(10.0) == 0.0
        assert breaker.failed(clock.now, "still down") is False  # reopened, not tripped again
        waits.append(breaker.retry_in())
    assert waits == [10.0, 20.0, 40.0, MAX_RESET_S, MAX_RESET_S, MAX_RESET_S]
    assert breaker.opened == 1
    clock.advance(MAX_RESET_S)
    assert breaker.admit(10.0) == 0.0
    breaker.answered(clock.now)
    # Closed again, the next outage starts from the configured wait.
    for _ in range(3):
        breaker.failed(clock.now, "down again")
    assert breaker.retry_in() == 5.0 and breaker.opened == 2


def test_a_reset_longer_than_the_cap_is_kept() -> None:
    breaker, clock = tripped(reset_s=90.0)
    clock.advance(90.0)
    breaker.admit(10.0)
    breaker.failed(clock.now, "down")
    assert breaker.retry_in() == 90.0


def test_failures_of_calls_sent_before_it_opened_change_nothing() -> None:
    breaker, clock = tripped(reset_s=5.0)
    sent_before = clock.now - 1.0
    clock.advance(5.0)
    assert breaker.admit(10.0) == 0.0  # the probe goes out
    assert breaker.failed(sent_before, "late news") is False
    assert breaker.state == HALF_OPEN and breaker.retry_in() == PROBE_RETRY_S


def test_an_answer_to_any_call_closes_it() -> None:
    breaker, clock = tripped()
    # Sent before it opened, but the upstream answered it now.
    assert breaker.answered(clock.now - 1.0) is True
    assert breaker.state == CLOSED and breaker.streak == 0


def test_a_probe_that_ends_unjudged_lets_another_go() -> None:
    breaker, clock = tripped(reset_s=5.0)
    clock.advance(5.0)
    probe_sent = clock.now
    assert breaker.admit(10.0) == 0.0
    assert breaker.admit(10.0) > 0
    breaker.unjudged(probe_sent)  # its caller was cancelled, say
    assert breaker.admit(10.0) == 0.0


def test_a_probe_that_never_reports_is_given_up_after_its_bound() -> None:
    breaker, clock = tripped(reset_s=5.0)
    clock.advance(5.0)
    assert breaker.admit(10.0) == 0.0
    clock.advance(9.9)
    assert breaker.admit(10.0) == PROBE_RETRY_S
    clock.advance(0.1)
    assert breaker.admit(10.0) == 0.0


def test_failures_of_calls_sent_before_an_answered_one_do_not_count() -> None:
    # Long generations timing out beside quick answers: the upstream was up all along.
    clock = FakeClock()
    breaker = Breaker(2, 5.0, clock)
    long_ones_sent = clock.now
    clock.advance(1.0)
    breaker.answered(clock.now)  # a short call sent after them
    clock.advance(30.0)
    assert not any(breaker.failed(long_ones_sent, "timed out") for _ in range(5))
    assert breaker.state == CLOSED and breaker.streak == 0


def test_probe_now_shortens_the_wait_but_does_not_close() -> None:
    breaker, clock = tripped(reset_s=30.0)
    breaker.probe_now()
    assert breaker.state == HALF_OPEN and breaker.admit(10.0) == 0.0
    assert breaker.is_open
    Breaker(1, 1.0, clock).probe_now()  # closed: nothing to do


def test_probe_now_does_nothing_once_a_probe_has_failed() -> None:
    # /models answering while the chat engine is stuck: each health poll would send a
    # caller's request out as a probe, to hang for its timeout.
    breaker, clock = tripped(reset_s=30.0)
    breaker.probe_now()
    breaker.admit(10.0)
    breaker.failed(clock.now, "stuck")
    breaker.probe_now()
    assert breaker.retry_in() == 60.0


def test_refusing_covers_open_and_a_probe_out() -> None:
    breaker, clock = tripped(reset_s=5.0)
    assert breaker.refusing
    clock.advance(5.0)
    assert not breaker.refusing  # half-open: the next call goes through as the probe
    breaker.admit(10.0)
    assert breaker.refusing and breaker.rejected == 0  # asking counts nothing
    breaker.answered(clock.now)
    assert not breaker.refusing


def test_late_failures_of_calls_sent_before_it_closed_do_not_reopen_it() -> None:
    # An upstream that went silent with calls on the wire: a few fast refusals trip it,
    # the probe finds it back, and then the old calls time out one after another.
    breaker, clock = tripped(failures=3, reset_s=5.0)
    on_the_wire = clock.now - 1.0
    clock.advance(5.0)
    assert breaker.admit(10.0) == 0.0
    assert breaker.answered(clock.now) is True
    clock.advance(2.0)
    assert not any(breaker.failed(on_the_wire, "read timeout") for _ in range(5))
    assert breaker.state == CLOSED and breaker.streak == 0
    # New calls failing still count.
    assert [breaker.failed(clock.now, "refused") for _ in range(3)] == [False, False, True]


def test_blocked_refuses_as_admit_does_but_claims_no_probe() -> None:
    breaker, clock = tripped(reset_s=5.0)
    assert breaker.blocked() == pytest.approx(5.0)
    clock.advance(5.0)
    assert [breaker.blocked(), breaker.blocked()] == [0.0, 0.0]  # each may go for its turn
    assert breaker.admit(10.0) == 0.0  # the first to be sent is the probe
    assert breaker.blocked() == PROBE_RETRY_S and breaker.admit(10.0) == PROBE_RETRY_S
    assert breaker.rejected == 3
    assert Breaker(1, 1.0, clock).blocked() == 0.0


def test_unjudged_calls_while_closed_change_nothing() -> None:
    clock = FakeClock()
    breaker = Breaker(2, 5.0, clock)
    breaker.failed(clock.now, "x")
    breaker.unjudged(clock.now)
    assert breaker.streak == 1 and breaker.state == CLOSED


@pytest.mark.parametrize(("failures", "reset_s"), [(0, 5.0), (3, 0.0), (3, float("nan"))])
def test_it_needs_a_threshold_and_a_wait(failures: int, reset_s: float) -> None:
    with pytest.raises(ValueError, match="threshold >= 1 and reset_s > 0"):
        Breaker(failures, reset_s)


def test_its_repr_shows_state_and_counts() -> None:
    breaker, _ = tripped()
    assert repr(breaker) == "<Breaker open streak=3/3 opened=1 rejected=0>"
