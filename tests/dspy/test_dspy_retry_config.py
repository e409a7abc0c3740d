"""Retry temperatures, the retry-seed context variable, and DSPyRetryConfig."""

from __future__ import annotations

import asyncio

import pytest

from minima_llm import ConfigError
from minima_llm.dspy_adapter import (
    DSPyRetryConfig,
    RetrySample,
    get_retry_sample,
    reset_retry_seed,
    retry_temperature,
    set_retry_seed,
)


@pytest.mark.parametrize(
    ("n", "max_temp", "halflife", "expected"),
    [
        (0, 0.5, 5.0, 0.0),
        (1, 0.5, 5.0, 0.5 / 6),
        (2, 0.5, 5.0, 1.0 / 7),
        (5, 0.5, 5.0, 0.25),
        (10, 0.5, 5.0, 5.0 / 15),
        (1000, 0.5, 5.0, 500.0 / 1005),
        (1, 1.0, 1.0, 0.5),
        (3, 0.9, 0.5, 2.7 / 3.5),
        (4, 0.0, 5.0, 0.0),
    ],
)
def test_retry_temperature(n: int, max_temp: float, halflife: float, expected: float) -> None:
    assert retry_temperature(n, max_temp, halflife) == pytest.approx(expected)


def test_retry_temperature_defaults_and_bounds() -> None:
    assert retry_temperature(5) == pytest.approx(0.25)
    temps = [retry_temperature(n) for n in range(50)]
    assert temps == sorted(temps) and temps[-1] < 0.5
    with pytest.raises(ValueError, match="retry number"):
        retry_temperature(-1)
    with pytest.raises(ValueError, match="halflife"):
        retry_temperature(1, 0.5, 0.0)


def test_samples_per_attempt() -> None:
    config = DSPyRetryConfig()
    assert config.sample(0) is None
    assert config.sample(5) == RetrySample(seed=5, temperature=0.25)
    assert DSPyRetryConfig(retry_seed=False).sample(1) == RetrySample(None, 0.083333)


def test_retry_seed_context_is_scoped() -> None:
    assert get_retry_sample() is None
    token = set_retry_seed(7, temperature=0.1)
    try:
        assert get_retry_sample() == RetrySample(7, 0.1)
        inner = set_retry_seed(None)
        assert get_retry_sample() is None
        reset_retry_seed(inner)
        assert get_retry_sample() == RetrySample(7, 0.1)
    finally:
        reset_retry_seed(token)
    assert get_retry_sample() is None


async def test_retry_seed_does_not_leak_between_tasks() -> None:
    async def one(seed: int) -> int | None:
        token = set_retry_seed(seed)
        await asyncio.sleep(0)
        sample = get_retry_sample()
        reset_retry_seed(token)
        return sample.seed if sample else None

    assert await asyncio.gather(one(1), one(2), one(3)) == [1, 2, 3]


def test_config_from_env() -> None:
    env = {
        "DSPY_PARSE_RETRIES": "5",
        "RETRY_TEMPERATURE_MAX": "0.8",
        "RETRY_TEMPERATURE_HALFLIFE": " 2.5 ",
        "DSPY_RETRY_SEED": "no",
    }
    assert DSPyRetryConfig.from_env(env) == DSPyRetryConfig(5, 0.8, 2.5, False)
    assert DSPyRetryConfig.from_env({}) == DSPyRetryConfig(3, 0.5, 5.0, True)


def test_empty_variables_mean_unset() -> None:
    # KEY=${KEY} lines with KEY unset, as the client's own variables already read them.
    names = ["DSPY_PARSE_RETRIES", "RETRY_TEMPERATURE_MAX", "RETRY_TEMPERATURE_HALFLIFE"]
    empty = {name: "" for name in [*names, "DSPY_RETRY_SEED"]}
    assert DSPyRetryConfig.from_env(empty) == DSPyRetryConfig()


@pytest.mark.parametrize(
    ("env", "field"),
    [
        ({"DSPY_PARSE_RETRIES": "many"}, "DSPY_PARSE_RETRIES"),
        ({"DSPY_PARSE_RETRIES": "-1"}, "parse_retries"),
        ({"RETRY_TEMPERATURE_MAX": "hot"}, "RETRY_TEMPERATURE_MAX"),
        ({"RETRY_TEMPERATURE_HALFLIFE": "0"}, "retry_temperature_halflife"),
        ({"RETRY_TEMPERATURE_MAX": "nan"}, "retry_temperature_max"),
        ({"RETRY_TEMPERATURE_MAX": "inf"}, "retry_temperature_max"),
        ({"RETRY_TEMPERATURE_HALFLIFE": "nan"}, "retry_temperature_halflife"),
        ({"DSPY_RETRY_SEED": "maybe"}, "DSPY_RETRY_SEED"),
    ],
)
def test_bad_settings_name_the_field(env: dict[str, str], field: str) -> None:
    with pytest.raises(ConfigError) as caught:
        DSPyRetryConfig.from_env(env)
    assert caught.value.field == field


def test_bad_values_are_refused_at_construction() -> None:
    with pytest.raises(ConfigError, match="retry_temperature_max"):
        DSPyRetryConfig(retry_temperature_max=-0.1)
    with pytest.raises(ConfigError, match="parse_retries"):
        DSPyRetryConfig(parse_retries=True)
    with pytest.raises(ConfigError, match="retry_temperature_max"):
        DSPyRetryConfig(retry_temperature_max=10**400)
