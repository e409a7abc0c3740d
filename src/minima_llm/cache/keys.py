"""Cache keys: canonical JSON of the request and its SHA-256 (the compatibility contract)."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping, Sequence
from typing import Any


def canonical_json(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    temperature: float | None = None,
    max_tokens: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> str:
    """The canonical JSON minima-llm hashes: sorted keys, ASCII, no spaces; optional fields only when set."""
    obj: dict[str, Any] = {"model": model, "messages": messages}
    if temperature is not None:
        obj["temperature"] = temperature
    if max_tokens is not None:
        obj["max_tokens"] = max_tokens
    if extra:
        obj["extra"] = extra
    return _CANONICAL.encode(obj)


def json_default(value: Any) -> Any:
    """``json.dumps``' ``default``: a Mapping that is not a dict (MappingProxyType) as the dict it shows."""
    if isinstance(value, Mapping):
        return dict(value)
    raise TypeError(f"cannot put {type(value).__name__} in a cache key")


# What json.dumps would build from these arguments on every call; encode keeps no state.
_CANONICAL = json.JSONEncoder(
    sort_keys=True, ensure_ascii=True, separators=(",", ":"), default=json_default
)


def key_of(canonical: str) -> str:
    """Hex SHA-256 of the canonical JSON (UTF-8)."""
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest()


def cache_key(
    model: str,
    messages: Sequence[Mapping[str, Any]],
    temperature: float | None = None,
    max_tokens: int | None = None,
    extra: Mapping[str, Any] | None = None,
) -> tuple[str, str]:
    """``(key, canonical)`` for a request."""
    canonical = canonical_json(model, messages, temperature, max_tokens, extra)
    return key_of(canonical), canonical
