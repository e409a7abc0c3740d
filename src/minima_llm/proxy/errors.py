"""Errors in OpenAI's JSON shape, and the mapping from upstream failures to HTTP statuses."""

from __future__ import annotations

import json
import math
from collections.abc import Mapping
from typing import Any

from aiohttp import web

from ..types import MinimaLlmFailure
from ..upstream import QUEUE_FULL, UPSTREAM_DOWN

# Failures that are the gateway's own refusals, before anything reached the upstream:
# what the message says of them, and their error code.
REFUSALS = {
    QUEUE_FULL: ("the gateway is at capacity", "queue_full"),
    UPSTREAM_DOWN: ("upstream unavailable", "upstream_unavailable"),
}
_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "invalid_request_error",
    405: "invalid_request_error",
    408: "invalid_request_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
}


class RequestError(Exception):
    """A request the gateway refuses, with the status and OpenAI error fields to answer.

    ``close`` ends the connection after the answer: the body was not read to its end,
    so the connection cannot carry another request.
    """

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        close: bool = False,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.param = param
        self.code = code
        self.close = close


class ClientLeft(Exception):
    """The client closed its connection before its request could be answered."""


def error_body(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str | None = None,
) -> dict[str, Any]:
    """``{"error": {"message", "type", "param", "code"}}``."""
    return {
        "error": {
            "message": message,
            "type": kind or _TYPES.get(status, "api_error"),
            "param": param,
            "code": code,
        }
    }


def error_response(
    status: int,
    message: str,
    param: str | None = None,
    code: str | None = None,
    kind: str | None = None,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """An OpenAI-shaped JSON error response."""
    return web.json_response(
        error_body(status, message, param, code, kind), status=status, headers=headers
    )


def failure_status(failure: MinimaLlmFailure) -> int:
    """The status to answer when the upstream could not produce an answer."""
    status = failure.status
    if failure.error_type == "TimeoutError":
        return 504
    if failure.error_type in REFUSALS:
        return 503
    if status is None:
        return 502
    if status == 408:
        return 504  # the upstream's own request timeout, after retries: a gateway timeout
    if 400 <= status < 500:
        return status  # the caller's own problem (or limit), reported as the upstream said it
    if status in (503, 504):
        return status
    return 502


def failure_response(failure: MinimaLlmFailure, retry_after_s: float = 0.0) -> web.Response:
    """The upstream's own error where it sent one, else one describing the failure.

    A refusal the caller caused (a 4xx passed through) keeps the upstream's message,
    type, param and code as they were, so SDK users can still branch on codes such as
    ``context_length_exceeded``; a failure after retries says so in the message. A 429
    or 503 carries ``Retry-After``: the gateway's own cooldown (at least one second),
    so well-behaved clients back off instead of hammering a saturated upstream.
    """
    status = failure_status(failure)
    headers = (
        {"Retry-After": str(max(1, math.ceil(retry_after_s)))} if status in (429, 503) else None
    )
    if failure.error_type in REFUSALS:
        # The gateway's own refusal, before anything was sent: not an upstream error.
        about, code = REFUSALS[failure.error_type]
        return error_response(
            503,
            f"{about}: {failure.message}; retry later",
            code=code,
            kind="server_error",
            headers=headers,
        )
    snippet = failure.body_snippet
    parsed = upstream_error_of(failure)
    upstream = parsed or {}
    detail = _text(upstream.get("message"))
    if detail and status == failure.status and status < 500:
        # A refusal or limit passed through: the upstream's answer is the whole story,
        # and SDKs pick their exception and its fields from it.
        return error_response(
            status,
            detail,
            _text(upstream.get("param")),
            _text(upstream.get("code")),
            _text(upstream.get("type")),
            headers,
        )
    message = (
        f"upstream {failure.error_type} after {failure.attempts} attempt(s)"
        # A timeout's 408 is the failure record's convention (reference 002), not an answer.
        + (
            f" (HTTP {failure.status})"
            if failure.status and failure.error_type != "TimeoutError"
            else ""
        )
        # A body that is not OpenAI-shaped (a proxy's HTML page, say) is quoted as it came.
        + f": {detail or (snippet[:200] if snippet and parsed is None else None) or failure.message}"
    )
    return error_response(
        status,
        message,
        _text(upstream.get("param")),
        _text(upstream.get("code")) or "upstream_error",
        "upstream_error" if status >= 500 else None,
        headers,
    )


def upstream_error_of(failure: MinimaLlmFailure) -> Mapping[str, Any] | None:
    """The ``error`` object the upstream answered ``failure`` with, if it sent an OpenAI-shaped one."""
    return failure.upstream_error or _upstream_error(failure.body_snippet)


def _upstream_error(snippet: str | None) -> dict[str, Any] | None:
    """The ``error`` object of an OpenAI-shaped error body, if the snippet is one."""
    if not snippet:
        return None
    try:
        body = json.loads(snippet)
    except ValueError:
        return None
    error = body.get("error") if isinstance(body, dict) else None
    return error if isinstance(error, dict) else None


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None
