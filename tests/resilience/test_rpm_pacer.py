"""Request pacing: configured spacing, learning from headers, holds, the probe, cancellation."""

from __future__ import annotations

import asyncio
import itertools
import time
from typing import Any

import pytest

from minima_llm.clock import FakeClock
from minima_llm.resilience import RateLimitInfo, RpmPacer
from minima_llm.resilience import pacer as pacer_module


def make(rpm: int, follow_server: bool = True) -> tuple[RpmPacer, FakeClock]:
    clock = FakeClock()
    return RpmPacer(rpm, clock, follow_server=follow_server), clock


def slots(pacer: RpmPacer, n: int) -> list[float]:
    return [pacer.reserve() for _ in range(n)]


@pytest.mark.parametrize(
    ("rpm", "gap"), [(600, 0.1), (60, 1.0), (6000, 0.01), (1, 60.0)]
)  # fmt: skip
def test_configured_rpm_spaces_reservations(rpm: int, gap: float) -> None:
    pacer, _ = make(rpm)
    assert slots(pacer, 4) == pytest.approx([0.0, gap, 2 * gap, 3 * gap])


async def test_rpm_600_starts_are_100ms_apart() -> None:
    pacer, clock = make(600)
    starts = []
    for _ in range(5):
        await pacer.acquire()
        starts.append(clock.monotonic())
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps == pytest.approx([0.1] * 4)
    assert pacer.waits == 4
    assert pacer.waited_s == pytest.approx(0.4)


async def test_concurrent_acquires_are_served_fifo() -> None:
    pacer, clock = make(600)
    order: list[int] = []

    async def worker(i: int) -> None:
        await pacer.acquire()
        order.append(i)

    await asyncio.gather(*(worker(i) for i in range(6)))
    assert order == list(range(6))
    assert clock.sleeps == pytest.approx([0.1] * 5)


def test_idle_time_is_not_banked_as_a_burst() -> None:
    pacer, clock = make(600)
    pacer.reserve()
    clock.advance(10.0)
    assert slots(pacer, 3) == pytest.approx([0.0, 0.1, 0.2])


def test_rpm_zero_with_nothing_learned_is_unpaced() -> None:
    pacer, _ = make(0)
    assert pacer.rpm == 0.0
    assert slots(pacer, 5) == [0.0] * 5


@pytest.mark.parametrize(("configured", "server"), [(600, 1000), (600, 60), (0, 120)])
def test_observed_limit_replaces_configured_rate(configured: int, server: int) -> None:
    pacer, _ = make(configured)
    pacer.observe(RateLimitInfo(limit_requests=server, remaining_requests=server // 2 + 1))
    pacer.reserve()  # the slot in progress
    # Run down any burst the first observation granted, then measure the spacing.
    gaps = slots(pacer, server)
    gap = 60.0 / (server * 0.97)
    assert pacer.rpm == pytest.approx(server * 0.97)
    assert pacer.server_rpm == server
    assert gaps[-1] - gaps[-2] == pytest.approx(gap)


def test_follow_server_off_keeps_configured_rate() -> None:
    pacer, _ = make(600, follow_server=False)
    pacer.observe(RateLimitInfo(limit_requests=60, remaining_requests=59))
    assert pacer.rpm == 600.0
    assert slots(pacer, 3) == pytest.approx([0.0, 0.1, 0.2])


def test_empty_observation_changes_nothing() -> None:
    pacer, _ = make(600)
    pacer.observe(RateLimitInfo())
    assert pacer.rpm == 600.0
    assert slots(pacer, 2) == pytest.approx([0.0, 0.1])


def test_first_observation_without_configured_rpm_grants_a_burst() -> None:
    pacer, _ = make(0)
    pacer.observe(RateLimitInfo(limit_requests=60, remaining_requests=5))
    # remaining 5 minus a margin of 2 for requests already in flight
    assert slots(pacer, 4) == pytest.approx([0.0, 0.0, 0.0, 0.0])
    assert pacer.reserve() == pytest.approx(60.0 / (60 * 0.97))


@pytest.mark.parametrize(
    ("rpm", "info", "hold"),
    [
        # No rate known: hold for the whole reset.
        (0, RateLimitInfo(remaining_requests=0, reset_requests_s=2.0), 2.0),
        # A rate is known: one interval is when a slot frees up again (not the full reset).
        (600, RateLimitInfo(remaining_requests=0, reset_requests_s=30.0), 0.1),
        (600, RateLimitInfo(remaining_requests=0, reset_requests_s=0.05), 0.05),
        (
            600,
            RateLimitInfo(limit_requests=600, remaining_requests=0, reset_requests_s=30.0),
            60.0 / (600 * 0.97),
        ),
    ],
)
def test_exhausted_limit_holds_starts(rpm: int, info: RateLimitInfo, hold: float) -> None:
    pacer, clock = make(rpm)
    pacer.reserve()
    clock.advance(5.0)  # the old spacing no longer matters
    pacer.observe(info)
    assert pacer.reserve() == pytest.approx(hold)


@pytest.mark.parametrize(
    "info",
    [
        RateLimitInfo(remaining_requests=0),
        RateLimitInfo(remaining_requests=1, reset_requests_s=30.0),
        RateLimitInfo(limit_tokens=100_000, remaining_tokens=5_000, reset_tokens_s=6.0),
        # Tokens nearly spent are the token pacer's to wait for, request by request.
        RateLimitInfo(limit_tokens=100_000, remaining_tokens=50, reset_tokens_s=6.0),
    ],
)
def test_limits_with_room_left_do_not_hold(info: RateLimitInfo) -> None:
    pacer, _ = make(0)
    pacer.observe(info)
    assert pacer.reserve() == 0.0


@pytest.mark.parametrize(("rpm", "retry_after"), [(0, 3.0), (600, 3.0), (600, 0.05)])
def test_penalize_holds_for_retry_after(rpm: int, retry_after: float) -> None:
    pacer, clock = make(rpm)
    pacer.reserve()
    clock.advance(5.0)
    pacer.penalize(retry_after)
    first = pacer.reserve()
    assert first == pytest.approx(retry_after)
    if rpm:
        assert pacer.reserve() == pytest.approx(retry_after + 60.0 / rpm)


@pytest.mark.parametrize(
    "hold",
    [
        lambda p: p.penalize(3600.0),  # Retry-After after a spent daily quota
        lambda p: p.observe(RateLimitInfo(remaining_requests=0, reset_requests_s=1.7e9)),
    ],
)
def test_every_hold_is_bounded_by_max_hold_s(hold: Any) -> None:
    clock = FakeClock()
    pacer = RpmPacer(0, clock, max_hold_s=30.0)
    hold(pacer)
    assert pacer.reserve() == pytest.approx(30.0)


def test_penalize_without_retry_after_does_not_hold_but_ends_burst() -> None:
    pacer, _ = make(0)
    pacer.observe(RateLimitInfo(limit_requests=60, remaining_requests=50))
    pacer.penalize(None)
    assert slots(pacer, 2) == pytest.approx([0.0, 60.0 / (60 * 0.97)])


async def test_acquire_sleeps_through_the_clock_for_holds() -> None:
    pacer, clock = make(0)
    await pacer.acquire()  # the probe
    pacer.penalize(2.0)
    start = clock.monotonic()
    await pacer.acquire()
    assert clock.monotonic() - start == pytest.approx(2.0)
    assert clock.sleeps == pytest.approx([2.0])


# --- the probe (rpm=0, nothing learned): real asyncio tasks -------------------------


async def settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


@pytest.fixture
def long_probe_wait(monkeypatch: pytest.MonkeyPatch) -> None:
    """Make the probe bound far longer than the test, so only observe() can release waiters."""
    monkeypatch.setattr(pacer_module, "PROBE_WAIT_S", 30.0)


@pytest.mark.usefixtures("long_probe_wait")
@pytest.mark.parametrize(
    "release",
    [
        lambda p: p.observe(RateLimitInfo()),
        lambda p: p.observe(RateLimitInfo(limit_requests=6000, remaining_requests=100)),
        lambda p: p.penalize(None),
    ],
)
async def test_second_acquire_waits_for_the_probe_to_report(release: object) -> None:
    pacer, _ = make(0)
    await asyncio.wait_for(pacer.acquire(), 1.0)  # the probe goes at once
    waiters = [asyncio.create_task(pacer.acquire()) for _ in range(3)]
    await settle()
    assert not any(w.done() for w in waiters)
    release(pacer)  # type: ignore[operator]
    await asyncio.wait_for(asyncio.gather(*waiters), 1.0)
    # Once learned, nobody waits for a probe again.
    await asyncio.wait_for(pacer.acquire(), 1.0)


async def test_probe_wait_is_bounded() -> None:
    assert pacer_module.PROBE_WAIT_S == 0.1
    pacer, _ = make(0)
    await pacer.acquire()
    started = time.monotonic()
    await asyncio.wait_for(pacer.acquire(), 2.0)
    elapsed = time.monotonic() - started
    assert 0.05 <= elapsed < 1.0
    # After the bound the pacer stops waiting for the probe.
    started = time.monotonic()
    await pacer.acquire()
    assert time.monotonic() - started < 0.05


async def test_configured_rpm_needs_no_probe() -> None:
    pacer, _ = make(600)
    await asyncio.wait_for(asyncio.gather(*(pacer.acquire() for _ in range(3))), 1.0)


@pytest.mark.usefixtures("long_probe_wait")
async def test_cancelled_probe_waiter_does_not_break_later_acquires() -> None:
    pacer, _ = make(0)
    await pacer.acquire()
    doomed = asyncio.create_task(pacer.acquire())
    survivor = asyncio.create_task(pacer.acquire())
    await settle()
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await settle()
    assert not survivor.done()  # the probe is still pending for the others
    pacer.observe(RateLimitInfo())
    await asyncio.wait_for(survivor, 1.0)
    await asyncio.wait_for(pacer.acquire(), 1.0)


async def test_cancelled_paced_waiter_does_not_break_later_acquires() -> None:
    pacer, clock = make(600)
    await pacer.acquire()
    doomed = asyncio.create_task(pacer.acquire())
    await asyncio.sleep(0)  # doomed is now inside the clock's sleep
    doomed.cancel()
    with pytest.raises(asyncio.CancelledError):
        await doomed
    await asyncio.wait_for(asyncio.gather(*(pacer.acquire() for _ in range(3))), 1.0)
    assert all(s > 0 for s in clock.sleeps)


async def test_pacer_works_across_event_loops() -> None:
    pacer, _ = make(0)

    async def first_run() -> None:
        await pacer.acquire()  # becomes the probe, never observed

    # A probe left behind by a finished loop must not trap the next one.
    await asyncio.to_thread(asyncio.run, first_run())
    await asyncio.wait_for(pacer.acquire(), 1.0)


def test_repr_shows_state() -> None:
    pacer, _ = make(600)
    pacer.observe(RateLimitInfo(limit_requests=100))
    text = repr(pacer)
    assert "configured=600" in text
    assert "server=100" in text
    assert "rpm=97" in text


async def test_cancelled_waiter_gives_its_slot_back() -> None:
    pacer = RpmPacer(60)  # one start per second, real clock
    await pacer.acquire()  # takes the first slot at once
    waiter = asyncio.ensure_future(pacer.acquire())  # queued for +1 s
    await asyncio.sleep(0.01)
    waiter.cancel()
    with pytest.raises(asyncio.CancelledError):
        await waiter
    # Without the give-back the next start would be 2 s away.
    assert pacer.reserve() == pytest.approx(1.0, abs=0.05)


def test_ready_only_when_nothing_could_make_a_start_wait() -> None:
    unpaced, clock = make(0)
    assert not unpaced.ready()  # the probe has not answered: others must wait for it
    unpaced.observe(RateLimitInfo())
    assert unpaced.ready()
    unpaced.penalize(2.0)
    assert not unpaced.ready()
    clock.advance(2.0)
    assert unpaced.ready()
    learned, _ = make(0)
    learned.observe(RateLimitInfo(limit_requests=600, remaining_requests=0, reset_requests_s=1))
    assert not learned.ready()  # the server set a limit: every start is paced
    assert not make(600)[0].ready()


def test_a_probe_left_pending_by_a_closed_loop_is_let_go() -> None:
    # One backend, two asyncio.run() calls: the first loop's probe request failed with
    # no headers, so nothing finished the probe before that loop closed.
    pacer = RpmPacer(0)
    asyncio.run(pacer.acquire())
    pacer.observe(RateLimitInfo(limit_requests=600, remaining_requests=100))  # no loop at all

    async def second_run() -> None:
        pacer.penalize(1.0)
        pacer.observe(RateLimitInfo(limit_requests=600, remaining_requests=99))
        await pacer.acquire()

    asyncio.run(second_run())
    assert pacer.server_rpm == 600


@pytest.mark.parametrize(
    ("configured", "limit", "remaining", "reset"),
    [
        (300, 14400, 14370, 179.56),  # Groq: requests per day, "2m59.56s"
        (0, 14400, 14370, 179.56),
        (60, 200, 199, 432.0),  # a daily tier's "7m12s"
    ],
)
def test_a_limit_counted_over_more_than_a_minute_is_not_a_rate(
    configured: int, limit: int, remaining: int, reset: float
) -> None:
    pacer, _ = make(configured)
    pacer.observe(RateLimitInfo(limit_requests=limit, remaining_requests=remaining))
    # Its first answers cannot tell (a reset under a minute); the next one can.
    pacer.observe(
        RateLimitInfo(limit_requests=limit, remaining_requests=remaining, reset_requests_s=reset)
    )
    assert pacer.server_rpm is None
    assert pacer.rpm == configured
    gap = 60.0 / configured if configured else 0.0
    assert slots(pacer, 3) == pytest.approx([0.0, gap, 2 * gap])
    # It stays so: later answers that spent little of the day do not bring it back.
    pacer.observe(
        RateLimitInfo(limit_requests=limit, remaining_requests=limit - 1, reset_requests_s=6.0)
    )
    assert pacer.rpm == configured


@pytest.mark.parametrize("reset", [0.02, 1.0, 60.0, 64.0])
def test_a_reset_within_a_minute_keeps_the_limit_as_requests_per_minute(reset: float) -> None:
    pacer, _ = make(600)
    pacer.observe(RateLimitInfo(limit_requests=3000, remaining_requests=10, reset_requests_s=reset))
    assert pacer.server_rpm == 3000
