"""Which statuses to retry, how long to back off, when attempts run out."""

from __future__ import annotations

import random

import pytest

from minima_llm.resilience import (
    attempts_left,
    backoff_delay,
    is_overload_status,
    is_retryable_status,
)


@pytest.mark.parametrize(
    ("status", "retryable"),
    [
        (408, True),
        (409, True),
        (425, True),
        (429, True),
        (500, True),
        (502, True),
        (503, True),
        (504, True),
        (599, True),
        (400, False),
        (401, False),
        (403, False),
        (404, False),
        (413, False),
        (422, False),
        (200, False),
    ],
)
def test_is_retryable_status(status: int, retryable: bool) -> None:
    assert is_retryable_status(status) is retryable


@pytest.mark.parametrize(
    ("status", "overload"),
    [(429, True), (503, True), (504, True), (500, False), (502, False), (408, False), (400, False)],
)
def test_is_overload_status(status: int, overload: bool) -> None:
    assert is_overload_status(status) is overload


@pytest.mark.parametrize(
    ("attempt", "expected"),
    [
        (1, 0.5),
        (2, 1.0),
        (3, 2.0),
        (4, 4.0),
        (5, 8.0),
        (6, 16.0),
        (7, 20.0),
        (50, 20.0),
        (10**6, 20.0),
    ],
)
def test_backoff_is_exponential_and_capped_without_jitter(attempt: int, expected: float) -> None:
    assert backoff_delay(attempt, 0.5, 20.0, 0.0) == pytest.approx(expected)


@pytest.mark.parametrize("attempt", [1, 2, 3, 5, 8, 20])
def test_backoff_jitter_stays_within_bounds(attempt: int) -> None:
    rng = random.Random(attempt)
    nominal = min(20.0, 0.5 * 2 ** (attempt - 1))
    delays = [backoff_delay(attempt, 0.5, 20.0, 0.2, rng) for _ in range(500)]
    assert all(nominal * 0.8 <= d <= min(nominal * 1.2, 20.0) for d in delays)
    # Jitter spreads the delays, above the nominal value only while under the cap.
    assert min(delays) < nominal
    assert max(delays) - min(delays) > nominal * 0.15
    if nominal < 20.0:
        assert max(delays) > nominal


def test_backoff_never_exceeds_the_cap() -> None:
    rng = random.Random(3)
    assert max(backoff_delay(30, 0.5, 20.0, 0.2, rng) for _ in range(500)) <= 20.0


def test_backoff_is_deterministic_with_seeded_rng() -> None:
    first = [backoff_delay(n, 0.5, 20.0, 0.2, random.Random(7)) for n in range(1, 8)]
    second = [backoff_delay(n, 0.5, 20.0, 0.2, random.Random(7)) for n in range(1, 8)]
    other = [backoff_delay(n, 0.5, 20.0, 0.2, random.Random(8)) for n in range(1, 8)]
    assert first == second
    assert first != other


@pytest.mark.parametrize(("base", "cap"), [(0.0, 20.0), (0.0, 0.0)])
def test_backoff_with_zero_base_is_zero(base: float, cap: float) -> None:
    assert backoff_delay(3, base, cap, 0.5, random.Random(1)) == 0.0


@pytest.mark.parametrize(
    ("attempt", "max_attempts", "more"),
    [
        (1, 6, True),
        (5, 6, True),
        (6, 6, False),
        (7, 6, False),
        (1, 1, False),
        (1, 0, True),
        (1000, 0, True),
    ],
)
def test_attempts_left(attempt: int, max_attempts: int, more: bool) -> None:
    assert attempts_left(attempt, max_attempts) is more
