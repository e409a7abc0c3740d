"""Request, response and failure values."""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from typing import Any

import pytest

from minima_llm import (
    AsyncMinimaLlmBackend,
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResponse,
    MinimaLlmResult,
    Usage,
)


def failure(**kwargs: Any) -> MinimaLlmFailure:
    defaults: dict[str, Any] = {
        "request_id": "r",
        "error_type": "HTTPError",
        "message": "HTTP 500",
        "attempts": 1,
    }
    return MinimaLlmFailure(**{**defaults, **kwargs})


@pytest.mark.parametrize(
    ("stamps", "expected"),
    [
        ((), "[]"),
        ((1000.0,), "[+0.0s]"),
        ((1000.0, 1001.2, 1003.5), "[+0.0s, +1.2s, +3.5s]"),
        ((5.25, 5.25, 7.0), "[+0.0s, +0.0s, +1.8s]"),
        ((0.0, 36.8), "[+0.0s, +36.8s]"),
    ],
)
def test_format_attempts(stamps: tuple[float, ...], expected: str) -> None:
    assert failure(attempt_timestamps=stamps).format_attempts() == expected


def test_format_report_matches_reference_block() -> None:
    fail = MinimaLlmFailure(
        request_id="request-123",
        error_type="TimeoutError",
        message="timed out after 60.0s",
        attempts=6,
        status=408,
        body_snippet="URLError: timed out",
        timeout_s=60.0,
        attempt_timestamps=(100.0, 101.2, 103.5, 108.1, 117.3, 136.8),
    )
    assert fail.format_report(1) == (
        "Failure 1: request-123\n"
        "    TimeoutError: status=408\n"
        "    attempts=6, timeout=60.0s [+0.0s, +1.2s, +3.5s, +8.1s, +17.3s, +36.8s]\n"
        "    body=URLError: timed out"
    )


def test_format_report_without_optional_fields() -> None:
    fail = failure(request_id="q9", error_type="ConnectionError", message="refused", attempts=2)
    assert fail.format_report() == (
        "q9\n    ConnectionError: status=None\n    attempts=2, timeout=None []\n    body=refused"
    )


@pytest.mark.parametrize(
    ("value", "field", "new"),
    [
        (MinimaLlmRequest("r", [{"role": "user", "content": "hi"}]), "temperature", 1.0),
        (MinimaLlmResponse("r", "text"), "cached", True),
        (failure(), "attempts", 9),
        (Usage(1, 2), "prompt_tokens", 5),
    ],
)
def test_values_are_frozen(value: object, field: str, new: object) -> None:
    before = getattr(value, field)
    with pytest.raises(dataclasses.FrozenInstanceError):
        setattr(value, field, new)
    assert getattr(value, field) == before


def test_request_defaults() -> None:
    req = MinimaLlmRequest("r", [{"role": "user", "content": "hi"}])
    assert (req.temperature, req.max_tokens, req.extra, req.model) == (None, None, None, None)


@pytest.mark.parametrize(
    ("raw_text", "expected"),
    [
        (None, None),
        ('{"id": "x", "choices": []}', {"id": "x", "choices": []}),
        ("[1, 2]", None),
        ('"just a string"', None),
    ],
)
def test_response_raw_parses_raw_text(raw_text: str | None, expected: object) -> None:
    resp = MinimaLlmResponse("r", "t", raw_text=raw_text)
    assert resp.raw == expected


def test_response_raw_text_is_kept_out_of_repr() -> None:
    resp = MinimaLlmResponse("r", "t", raw_text=json.dumps({"secret_blob": 1}))
    assert "secret_blob" not in repr(resp)
    assert resp.raw == {"secret_blob": 1}


def test_response_token_properties() -> None:
    resp = MinimaLlmResponse("r", "t", usage=Usage(prompt_tokens=7, completion_tokens=3))
    assert (resp.input_tokens, resp.output_tokens, resp.usage.total_tokens) == (7, 3, 10)
    assert MinimaLlmResponse("r", "t").usage == Usage(0, 0)


@pytest.mark.parametrize(
    ("body", "expected"),
    [
        (
            {"usage": {"prompt_tokens": 12, "completion_tokens": 5, "total_tokens": 17}},
            Usage(12, 5),
        ),
        ({"usage": {"prompt_tokens": 12}}, Usage(12, 0)),
        ({"usage": {"prompt_tokens": "12", "completion_tokens": 1.5}}, Usage(0, 0)),
        ({"usage": {"prompt_tokens": True, "completion_tokens": 4}}, Usage(0, 4)),
        ({"usage": None}, Usage(0, 0)),
        ({"usage": [1, 2]}, Usage(0, 0)),
        ({}, Usage(0, 0)),
        (None, Usage(0, 0)),
        ([1, 2], Usage(0, 0)),
    ],
)
def test_usage_from_body(body: Any, expected: Usage) -> None:
    usage = Usage.from_body(body)
    assert usage == expected
    assert usage.total_tokens == expected.prompt_tokens + expected.completion_tokens


class _Backend:
    async def generate(
        self, request: MinimaLlmRequest, force_refresh: bool = False
    ) -> MinimaLlmResult:
        return MinimaLlmResponse(request.request_id, "ok")

    async def run_batched(self, requests: Sequence[MinimaLlmRequest]) -> list[MinimaLlmResult]:
        return [await self.generate(r) for r in requests]

    async def aclose(self) -> None:
        return None


class _NoClose:
    async def generate(
        self, request: MinimaLlmRequest, force_refresh: bool = False
    ) -> MinimaLlmResult:
        return MinimaLlmResponse(request.request_id, "ok")


def test_backend_protocol_is_runtime_checkable() -> None:
    assert isinstance(_Backend(), AsyncMinimaLlmBackend)
    assert not isinstance(_NoClose(), AsyncMinimaLlmBackend)


def test_result_union_covers_both_outcomes() -> None:
    for value in (MinimaLlmResponse("r", "t"), failure()):
        assert isinstance(value, MinimaLlmResult)  # type: ignore[arg-type, misc]
