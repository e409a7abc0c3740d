"""Fault injection: scripted faults for the next N requests and seeded random ones."""

from __future__ import annotations

import json
import math
import random
from collections import deque
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal, cast, get_args

from ._config import MockConfig
from ._replies import RequestError, error_body

FaultMode = Literal["status", "reset", "malformed", "timeout", "truncate_stream"]
FAULT_MODES: frozenset[str] = frozenset(get_args(FaultMode))
DEFAULT_TIMEOUT_S = 30.0


@dataclass(frozen=True, slots=True)
class Fault:
    """One injected fault.

    ``status`` answers with ``status``/``headers``/``body``; ``reset`` and
    ``truncate_stream`` abort the connection part-way through the body;
    ``malformed`` answers 200 with invalid JSON; ``timeout`` sleeps
    ``sleep_s`` before answering normally.
    """

    mode: FaultMode = "status"
    status: int = 503
    headers: tuple[tuple[str, str], ...] = ()
    body: bytes = b""
    sleep_s: float = DEFAULT_TIMEOUT_S

    @classmethod
    def create(
        cls,
        mode: str = "status",
        *,
        status: int = 503,
        headers: Mapping[str, object] | None = None,
        body: str | bytes | Mapping[str, Any] | list[Any] | None = None,
        sleep_s: float = DEFAULT_TIMEOUT_S,
    ) -> Fault:
        """Validate the parts of a fault and build it; bad values raise ``ValueError``."""
        if mode not in FAULT_MODES:
            raise ValueError(f"mode must be one of {sorted(FAULT_MODES)}, got {mode!r}")
        if not isinstance(status, int) or isinstance(status, bool) or not 200 <= status <= 599:
            raise ValueError(f"status must be an integer between 200 and 599, got {status!r}")
        if isinstance(sleep_s, bool) or not isinstance(sleep_s, int | float):
            raise ValueError(f"sleep_s must be a number, got {sleep_s!r}")
        if not math.isfinite(sleep_s) or sleep_s < 0:
            raise ValueError(f"sleep_s must be finite and >= 0, got {sleep_s!r}")
        if headers is not None and not isinstance(headers, Mapping):
            raise ValueError("headers must be an object of header names to values")
        pairs = tuple((str(name), str(value)) for name, value in (headers or {}).items())
        body_bytes = _encode_body(body, status)
        return cls(cast(FaultMode, mode), status, pairs, body_bytes, float(sleep_s))

    @property
    def sets_content_type(self) -> bool:
        """Whether the scripted headers already carry a ``Content-Type``."""
        return any(name.lower() == "content-type" for name, _ in self.headers)


def parse_fail_next(payload: Mapping[str, Any]) -> tuple[Fault, int]:
    """Read a ``POST /_mock/fail_next`` body into a fault and how many requests get it."""
    known = {"count", "mode", "status", "headers", "body", "sleep_s"}
    unknown = sorted(set(payload) - known)
    if unknown:
        raise RequestError(f"unknown fail_next field(s): {', '.join(unknown)}")
    count = payload.get("count", 1)
    if not isinstance(count, int) or isinstance(count, bool) or count < 1:
        raise RequestError("'count' must be a positive integer", "count")
    try:
        fault = Fault.create(
            payload.get("mode", "status"),
            status=payload.get("status", 503),
            headers=payload.get("headers"),
            body=payload.get("body"),
            sleep_s=payload.get("sleep_s", DEFAULT_TIMEOUT_S),
        )
    except ValueError as exc:
        raise RequestError(str(exc)) from exc
    return fault, count


class FaultQueue:
    """Scripted faults, consumed first-in first-out by the next inference requests."""

    __slots__ = ("_entries", "_pending")

    def __init__(self) -> None:
        self._entries: deque[list[Any]] = deque()
        self._pending = 0

    def __len__(self) -> int:
        return self._pending

    def __repr__(self) -> str:
        return f"<FaultQueue pending={self._pending}>"

    def push(self, fault: Fault, count: int = 1) -> int:
        """Queue ``fault`` for the next ``count`` requests; return how many are pending."""
        self._entries.append([fault, count])
        self._pending += count
        return self._pending

    def pop(self) -> Fault | None:
        """Take the fault for the current request, if one is scripted."""
        if not self._pending:
            return None
        entry = self._entries[0]
        entry[1] -= 1
        if entry[1] == 0:
            self._entries.popleft()
        self._pending -= 1
        fault: Fault = entry[0]
        return fault

    def clear(self) -> None:
        """Drop every pending fault."""
        self._entries.clear()
        self._pending = 0


def draw_fault(rng: random.Random, config: MockConfig) -> Fault | None:
    """Pick this request's random fault; exactly one draw so seeded runs replay."""
    draw = rng.random()
    for rate, fault in (
        (config.failure_rate, RANDOM_FAILURE),
        (config.reset_rate, RANDOM_RESET),
        (config.malformed_rate, RANDOM_MALFORMED),
    ):
        if draw < rate:
            return fault
        draw -= rate
    return None


def _encode_body(body: object, status: int) -> bytes:
    if body is None:
        kind = "server_error" if status >= 500 else "mock_error"
        return error_body(f"mock: injected {status}", type=kind, code="injected_fault")
    if isinstance(body, bytes):
        return body
    if isinstance(body, str):
        return body.encode()
    if isinstance(body, dict | list):
        return json.dumps(body).encode()
    raise ValueError(f"body must be a string, an object or an array, got {type(body).__name__}")


# Built after _encode_body exists; shared by every random draw.
RANDOM_FAILURE = Fault.create(status=500)
RANDOM_RESET = Fault.create("reset")
RANDOM_MALFORMED = Fault.create("malformed")
