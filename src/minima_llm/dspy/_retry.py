"""Parse-retry settings and the reproducible re-sampling each retry uses.

Retry ``n`` asks for temperature :func:`retry_temperature` and seed ``n``. Both
go into the request, so each retry has its own cache key: the first run stores
every attempt, and a rerun replays the same attempts from the cache.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from contextvars import ContextVar, Token
from dataclasses import dataclass
from typing import Any

from ..config import env_set, is_finite_number
from ..errors import ConfigError


@dataclass(frozen=True, slots=True)
class RetrySample:
    """How one retry re-samples: the seed sent upstream and the temperature override."""

    seed: int | None
    temperature: float | None = None


_retry_sample: ContextVar[RetrySample | None] = ContextVar("minima_llm_retry_sample", default=None)


def set_retry_seed(seed: int | None, temperature: float | None = None) -> Token[RetrySample | None]:
    """Make LM calls in this context send ``seed`` (and ``temperature``, when given).

    Returns a token for :func:`reset_retry_seed`. ``None`` for both clears it.
    """
    sample = None if seed is None and temperature is None else RetrySample(seed, temperature)
    return _retry_sample.set(sample)


def reset_retry_seed(token: Token[RetrySample | None]) -> None:
    """Restore the retry sample from before :func:`set_retry_seed`."""
    _retry_sample.reset(token)


def get_retry_sample() -> RetrySample | None:
    """The retry sample LM calls in this context should use, if any."""
    return _retry_sample.get()


def retry_temperature(n: int, max_temp: float = 0.5, halflife: float = 5.0) -> float:
    """Temperature for retry ``n``: ``max_temp * n / (n + halflife)``.

    0 for the first attempt, half of ``max_temp`` at ``n == halflife``, and
    approaching ``max_temp`` from below: each retry samples a little wider.
    """
    if n < 0:
        raise ValueError(f"retry number must be >= 0, got {n!r}")
    if halflife <= 0:
        raise ValueError(f"halflife must be > 0, got {halflife!r}")
    return max_temp * n / (n + halflife)


@dataclass(frozen=True, slots=True)
class DSPyRetryConfig:
    """How ``run_dspy_batch`` retries an answer DSPy could not parse.

    ``parse_retries`` extra attempts per item; retry ``n`` uses
    ``retry_temperature(n, retry_temperature_max, retry_temperature_halflife)``
    and, with ``retry_seed``, seed ``n``. Without a seed, a retry whose request
    would repeat an earlier one bypasses the cache read instead (force refresh).
    """

    parse_retries: int = 3
    retry_temperature_max: float = 0.5
    retry_temperature_halflife: float = 5.0
    retry_seed: bool = True

    def __post_init__(self) -> None:
        retries = self.parse_retries
        if isinstance(retries, bool) or not isinstance(retries, int) or retries < 0:
            raise ConfigError("parse_retries", retries, "an integer >= 0")
        if not _number(self.retry_temperature_max) or self.retry_temperature_max < 0:
            raise ConfigError("retry_temperature_max", self.retry_temperature_max, "a number >= 0")
        if not _number(self.retry_temperature_halflife) or self.retry_temperature_halflife <= 0:
            raise ConfigError(
                "retry_temperature_halflife", self.retry_temperature_halflife, "a number > 0"
            )
        if not isinstance(self.retry_seed, bool):
            raise ConfigError("retry_seed", self.retry_seed, "true or false")

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> DSPyRetryConfig:
        """Read ``DSPY_PARSE_RETRIES``, ``RETRY_TEMPERATURE_MAX``, ``RETRY_TEMPERATURE_HALFLIFE``, ``DSPY_RETRY_SEED``."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        # Empty means unset (``KEY=${KEY}`` lines), as for the client's own variables.
        if env_set(env, "DSPY_PARSE_RETRIES"):
            kwargs["parse_retries"] = _parse(env, "DSPY_PARSE_RETRIES", int, "an integer")
        if env_set(env, "RETRY_TEMPERATURE_MAX"):
            kwargs["retry_temperature_max"] = _parse(
                env, "RETRY_TEMPERATURE_MAX", float, "a number"
            )
        if env_set(env, "RETRY_TEMPERATURE_HALFLIFE"):
            kwargs["retry_temperature_halflife"] = _parse(
                env, "RETRY_TEMPERATURE_HALFLIFE", float, "a number"
            )
        if env_set(env, "DSPY_RETRY_SEED"):
            kwargs["retry_seed"] = _flag(env, "DSPY_RETRY_SEED")
        return cls(**kwargs)

    def sample(self, n: int) -> RetrySample | None:
        """The re-sampling of attempt ``n`` (0 is the first attempt, which has none)."""
        if n == 0:
            return None
        temperature = retry_temperature(
            n, self.retry_temperature_max, self.retry_temperature_halflife
        )
        # Rounded so the cache key reads 0.2, not 0.19999999999999998.
        return RetrySample(n if self.retry_seed else None, round(temperature, 6))


def _number(value: object) -> bool:
    # Finite: NaN passes no comparison, and either would be sent upstream as a temperature.
    return is_finite_number(value)


def _parse(env: Mapping[str, str], var: str, kind: type[int] | type[float], allowed: str) -> Any:
    try:
        return kind(env[var].strip())
    except ValueError as exc:
        raise ConfigError(var, env[var], allowed) from exc


def _flag(env: Mapping[str, str], var: str) -> bool:
    text = env[var].strip().lower()
    if text in ("1", "true", "yes", "on"):
        return True
    if text in ("0", "false", "no", "off"):
        return False
    raise ConfigError(var, env[var], "one of 1/0, true/false, yes/no, on/off")
