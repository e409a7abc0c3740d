"""Context variables that carry per-call intent through code the caller does not control.

An adapter (DSPy, say) sits between a retry loop and ``generate``; these let the
retry loop ask for a fresh answer and read back whether one came from the cache.
"""

from __future__ import annotations

from contextvars import ContextVar, Token

_force_refresh: ContextVar[bool] = ContextVar("minima_llm_force_refresh", default=False)
_last_cached: ContextVar[bool] = ContextVar("minima_llm_last_cached", default=False)


def set_force_refresh(force: bool) -> Token[bool]:
    """Ask ``generate`` calls in this context to bypass cache reads; returns a reset token."""
    return _force_refresh.set(bool(force))


def get_force_refresh() -> bool:
    """Whether cache reads are bypassed in this context."""
    return _force_refresh.get()


def reset_force_refresh(token: Token[bool]) -> None:
    """Restore the force-refresh state from before ``set_force_refresh``."""
    _force_refresh.reset(token)


def set_last_cached(cached: bool) -> None:
    """Record whether the last response in this context came from the cache."""
    _last_cached.set(bool(cached))


def get_last_cached() -> bool:
    """Whether the last response in this context came from the cache."""
    return _last_cached.get()
