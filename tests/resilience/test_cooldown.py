"""The shared overload cooldown, driven by a fake clock."""

from __future__ import annotations

import pytest

from minima_llm.clock import FakeClock
from minima_llm.resilience import Cooldown


def make(
    floor: float = 0.0, cap: float = 30.0, halflife: float = 20.0, base: float = 0.5
) -> tuple[Cooldown, FakeClock]:
    clock = FakeClock()
    return Cooldown(floor, cap, halflife, base, clock), clock


async def test_idle_cooldown_does_not_wait() -> None:
    cooldown, clock = make()
    assert cooldown.level() == 0.0
    assert cooldown.remaining() == 0.0
    assert await cooldown.wait() == 0.0
    assert clock.sleeps == []


@pytest.mark.parametrize(
    ("floor", "cap", "base", "expected"),
    [
        (0.0, 30.0, 0.5, [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]),
        (3.0, 30.0, 0.5, [3.0, 6.0, 12.0, 24.0, 30.0]),
        (0.0, 5.0, 1.0, [1.0, 2.0, 4.0, 5.0, 5.0]),
        (2.0, 2.0, 0.5, [2.0, 2.0, 2.0]),
    ],
)
def test_bump_doubles_within_floor_and_cap(
    floor: float, cap: float, base: float, expected: list[float]
) -> None:
    cooldown, _ = make(floor=floor, cap=cap, base=base)
    assert [cooldown.bump() for _ in expected] == pytest.approx(expected)
    assert cooldown.bumps == len(expected)
    assert cooldown.remaining() == pytest.approx(expected[-1])


@pytest.mark.parametrize(
    ("floor", "cap", "hint", "expected"),
    [(0.0, 30.0, 7.0, 7.0), (0.0, 30.0, 90.0, 30.0), (2.0, 30.0, 0.5, 2.0), (0.0, 30.0, 0.0, 0.0)],
)
def test_retry_after_hint_is_used_as_is(
    floor: float, cap: float, hint: float, expected: float
) -> None:
    cooldown, _ = make(floor=floor, cap=cap)
    cooldown.bump()
    cooldown.bump()  # level 1.0: a hint replaces, not doubles, our guess
    assert cooldown.bump(hint) == pytest.approx(expected)
    assert cooldown.level() == pytest.approx(expected)


def test_level_halves_every_halflife() -> None:
    cooldown, clock = make(halflife=20.0)
    for _ in range(4):
        cooldown.bump()
    assert cooldown.level() == pytest.approx(4.0)
    clock.advance(20.0)
    assert cooldown.level() == pytest.approx(2.0)
    clock.advance(20.0)
    assert cooldown.level() == pytest.approx(1.0)
    clock.advance(10.0)
    assert cooldown.level() == pytest.approx(2**-0.5)
    # The next signal doubles the decayed level, not the old peak.
    assert cooldown.bump() == pytest.approx(2 * 2**-0.5)


def test_remaining_counts_down_and_wait_sleeps_the_rest() -> None:
    cooldown, clock = make()
    cooldown.bump(4.0)
    clock.advance(1.5)
    assert cooldown.remaining() == pytest.approx(2.5)


async def test_wait_sleeps_remaining_time_through_the_clock() -> None:
    cooldown, clock = make()
    cooldown.bump(4.0)
    clock.advance(1.5)
    start = clock.monotonic()
    assert await cooldown.wait() == pytest.approx(2.5)
    assert clock.sleeps == pytest.approx([2.5])
    assert clock.monotonic() - start == pytest.approx(2.5)
    assert cooldown.remaining() == 0.0
    assert await cooldown.wait() == 0.0
    assert len(clock.sleeps) == 1


def test_shorter_signal_does_not_shorten_the_pause() -> None:
    cooldown, _ = make()
    cooldown.bump(10.0)
    cooldown.bump(1.0)
    assert cooldown.remaining() == pytest.approx(10.0)
    assert cooldown.level() == pytest.approx(1.0)


def test_pause_is_over_after_its_length_even_if_level_lingers() -> None:
    cooldown, clock = make()
    cooldown.bump(2.0)
    clock.advance(2.0)
    assert cooldown.remaining() == 0.0
    assert cooldown.level() > 0.0


def test_repr_shows_state() -> None:
    cooldown, _ = make(floor=1.0, cap=9.0)
    cooldown.bump()
    text = repr(cooldown)
    assert "bumps=1" in text
    assert "remaining=1.00s" in text
    assert "cap=9.0" in text


def test_refusals_of_requests_already_in_flight_do_not_escalate() -> None:
    cooldown, clock = make(cap=30.0, base=0.5)
    sent = clock.monotonic()
    clock.advance(0.01)
    # 64 requests sent together, refused together: one overload, one doubling.
    levels = [cooldown.bump(sent_at=sent) for _ in range(64)]
    assert levels[0] == pytest.approx(0.5)
    assert max(levels) == pytest.approx(0.5)
    assert (cooldown.bumps, cooldown.echoes) == (1, 63)
    # A request sent after the cooldown began and still refused is news: it doubles.
    clock.advance(1.0)
    resent = clock.monotonic()
    clock.advance(0.01)
    assert cooldown.bump(sent_at=resent) == pytest.approx(2 * 0.5 * 2 ** (-1.01 / 20.0))
    assert cooldown.bumps == 2


def test_a_retry_after_hint_applies_even_from_a_request_in_flight() -> None:
    cooldown, clock = make(cap=30.0)
    sent = clock.monotonic()
    clock.advance(0.01)
    cooldown.bump(sent_at=sent)
    assert cooldown.bump(5.0, sent_at=sent) == pytest.approx(5.0)
    assert cooldown.remaining() == pytest.approx(5.0)
