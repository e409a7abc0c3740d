"""A server that refuses with 429s but states no limit: the pace is learned from its refusals."""

from __future__ import annotations

import pytest

from minima_llm.clock import FakeClock
from minima_llm.resilience import RateLimitInfo, RpmPacer
from minima_llm.resilience import pacer as pacer_module


def answered_at_rate(pacer: RpmPacer, clock: FakeClock, per_s: float, seconds: float) -> None:
    """Answers at ``per_s`` for ``seconds``, the clock moving with them."""
    for _ in range(int(per_s * seconds)):
        clock.advance(1.0 / per_s)
        pacer.answered(clock.monotonic())


def gap(pacer: RpmPacer) -> float:
    """Seconds between two start slots claimed now."""
    pacer.reserve()
    return pacer.reserve()


def test_the_first_refusal_paces_a_little_under_the_rate_accepted_before_it() -> None:
    clock = FakeClock()
    pacer = RpmPacer(0, clock)
    answered_at_rate(pacer, clock, 10.0, 4.0)  # 600 a minute got through
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm == pytest.approx(600 * pacer_module.FIRST_DECREASE, rel=0.1)
    assert pacer.learns_from_refusals
    assert gap(pacer) == pytest.approx(60 / pacer.rpm)


def test_a_lone_refusal_before_any_answers_teaches_nothing() -> None:
    # A rate cannot be read from one 429 (a scripted fault, or the very first request).
    clock = FakeClock()
    pacer = RpmPacer(0, clock)
    answered_at_rate(pacer, clock, 2.0, 1.0)
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm is None and not pacer.learns_from_refusals
    assert pacer.rpm == 0


def test_refusals_already_on_the_wire_lower_the_rate_once() -> None:
    clock = FakeClock()
    pacer = RpmPacer(0, clock)
    answered_at_rate(pacer, clock, 10.0, 4.0)
    sent = clock.monotonic() - 0.05
    pacer.penalize(None, sent_at=sent)
    first = pacer.learned_rpm
    for _ in range(20):  # the rest of that wave
        pacer.penalize(None, sent_at=sent)
    assert pacer.learned_rpm == first
    clock.advance(0.5)
    # Sent after the lowering, but it may have taken its turn before it: not yet.
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm == first
    clock.advance(pacer_module.DECREASE_EVERY_S)
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm == pytest.approx(first * pacer_module.DECREASE)


def test_the_learned_rate_climbs_with_time_while_answers_come() -> None:
    clock = FakeClock()
    pacer = RpmPacer(0, clock)
    answered_at_rate(pacer, clock, 10.0, 4.0)
    pacer.penalize(None, sent_at=clock.monotonic())
    learned = pacer.learned_rpm
    assert learned is not None
    answered_at_rate(pacer, clock, 10.0, 3.0)
    assert pacer.learned_rpm == pytest.approx(
        learned * (1 + pacer_module.INCREASE_PER_S / 10) ** 30
    )


def test_it_never_falls_below_the_floor_nor_rises_past_the_configured_rpm() -> None:
    clock = FakeClock()
    pacer = RpmPacer(300, clock)
    answered_at_rate(pacer, clock, 10.0, 4.0)  # faster than configured: the configured caps it
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm == pytest.approx(300 * pacer_module.FIRST_DECREASE)
    for _ in range(100):
        clock.advance(1.0)
        pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm == pacer_module.MIN_LEARNED_RPM
    answered_at_rate(pacer, clock, 10.0, 600.0)
    assert pacer.rpm == 300  # the learned rate may climb past it; the configured one holds


def test_a_server_that_states_its_limit_is_followed_instead() -> None:
    clock = FakeClock()
    pacer = RpmPacer(0, clock)
    answered_at_rate(pacer, clock, 10.0, 4.0)
    pacer.observe(RateLimitInfo(limit_requests=1200, remaining_requests=5))
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm is None and not pacer.learns_from_refusals
    assert pacer.rpm == pytest.approx(1200 * pacer_module.SAFETY)


def test_refusals_under_a_stated_token_limit_leave_the_request_rate_alone() -> None:
    # Those 429s are for tokens, and the token pacer waits for them request by request.
    clock = FakeClock()
    pacer = RpmPacer(0, clock)
    answered_at_rate(pacer, clock, 10.0, 4.0)
    pacer.observe(RateLimitInfo(limit_tokens=30_000, remaining_tokens=10, reset_tokens_s=5.0))
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm is None and not pacer.learns_from_refusals
    assert pacer.rpm == 0 and pacer.reserve() == 0.0


def test_not_following_the_server_learns_nothing() -> None:
    clock = FakeClock()
    pacer = RpmPacer(600, clock, follow_server=False)
    answered_at_rate(pacer, clock, 10.0, 4.0)
    pacer.penalize(None, sent_at=clock.monotonic())
    assert pacer.learned_rpm is None and pacer.rpm == 600
