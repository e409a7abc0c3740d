"""Request, response and failure values, and the backend protocol."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

Message = Mapping[str, Any]


@dataclass(frozen=True)
class MinimaLlmRequest:
    """One chat completion request; ``extra`` carries any other OpenAI parameter."""

    request_id: str
    messages: Sequence[Message]
    temperature: float | None = None
    max_tokens: int | None = None
    extra: Mapping[str, Any] | None = None
    model: str | None = None


@dataclass(frozen=True)
class Usage:
    """Token counts reported by the upstream for one call."""

    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        """Prompt plus completion tokens."""
        return self.prompt_tokens + self.completion_tokens

    @classmethod
    def from_body(cls, body: Mapping[str, Any] | None) -> Usage:
        """Read the ``usage`` object of an OpenAI response body; missing counts are 0."""
        # ``type(...) is dict`` first: JSON bodies are dicts, and the ABC check costs more.
        usage = body.get("usage") if type(body) is dict or isinstance(body, Mapping) else None
        if type(usage) is not dict and not isinstance(usage, Mapping):
            return _NO_USAGE
        prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens")
        # Exact ints (what JSON gives) skip the check that keeps out bools and subclasses.
        if type(prompt) is not int:
            prompt = _int(prompt)
        if type(completion) is not int:
            completion = _int(completion)
        return cls(prompt, completion)


def _int(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


_NO_USAGE = Usage()


@dataclass(frozen=True)
class MinimaLlmResponse:
    """A completion: from the upstream (``cached=False``) or from a cache.

    ``raw_text`` is the upstream JSON body exactly as stored; ``raw`` parses it on
    demand, so a cached replay does not pay for JSON it never reads.
    """

    request_id: str
    text: str
    cached: bool = False
    raw_text: str | None = field(default=None, repr=False)
    usage: Usage = _NO_USAGE
    latency_s: float = 0.0
    cache_source: str | None = None
    model: str | None = None
    # A live answer's identifying response headers (x-request-id, openai-processing-ms,
    # openai-organization, openai-project, openai-version), names lower-case; None for an
    # answer from a cache, or one whose upstream sent none of them.
    upstream_headers: Mapping[str, str] | None = field(
        default=None, repr=False, compare=False, hash=False
    )

    @property
    def raw(self) -> dict[str, Any] | None:
        """The upstream JSON body, parsed; None if there is none, or none that parses (an old row)."""
        if self.raw_text is None:
            return None
        try:
            parsed = json.loads(self.raw_text)
        except ValueError:
            return None
        return parsed if isinstance(parsed, dict) else None

    @property
    def input_tokens(self) -> int:
        """Prompt tokens of the call that produced this text."""
        return self.usage.prompt_tokens

    @property
    def output_tokens(self) -> int:
        """Completion tokens of the call that produced this text."""
        return self.usage.completion_tokens


@dataclass(frozen=True)
class MinimaLlmFailure:
    """A request that could not succeed, with every attempt's send time."""

    request_id: str
    error_type: str
    message: str
    attempts: int
    status: int | None = None
    body_snippet: str | None = None
    timeout_s: float | None = None
    attempt_timestamps: tuple[float, ...] = ()
    # The error object (message, type, param, code) of the upstream's last answer,
    # whole: ``body_snippet`` is cut at 300 characters, and OpenAI's context-length
    # error runs past that, code and all.
    upstream_error: Mapping[str, Any] | None = field(default=None, hash=False)
    # The identifying headers of that answer (x-request-id, openai-*), what the
    # provider's support asks for about a failed call.
    upstream_headers: Mapping[str, str] | None = field(default=None, hash=False)

    def format_attempts(self) -> str:
        """Attempt send times relative to the first, e.g. ``[+0.0s, +1.2s, +3.5s]``."""
        if not self.attempt_timestamps:
            return "[]"
        t0 = self.attempt_timestamps[0]
        return "[" + ", ".join(f"+{t - t0:.1f}s" for t in self.attempt_timestamps) + "]"

    def format_report(self, index: int | None = None) -> str:
        """The multi-line report the batch runner prints for a failure."""
        head = f"Failure {index}: {self.request_id}" if index is not None else self.request_id
        status = f"status={self.status}" if self.status is not None else "status=None"
        timeout = f"{self.timeout_s}s" if self.timeout_s is not None else "None"
        lines = [
            head,
            f"    {self.error_type}: {status}",
            f"    attempts={self.attempts}, timeout={timeout} {self.format_attempts()}",
            f"    body={self.body_snippet if self.body_snippet is not None else self.message}",
        ]
        return "\n".join(lines)


MinimaLlmResult = MinimaLlmResponse | MinimaLlmFailure


@runtime_checkable
class AsyncMinimaLlmBackend(Protocol):
    """What a backend offers: one call, a batch, and closing."""

    async def generate(
        self, request: MinimaLlmRequest, force_refresh: bool = False
    ) -> MinimaLlmResult:
        """Answer one request from the cache or the upstream; never raises for upstream trouble."""
        ...

    async def run_batched(self, requests: Sequence[MinimaLlmRequest]) -> list[MinimaLlmResult]:
        """Answer many requests, results in input order."""
        ...

    async def aclose(self) -> None:
        """Release connections and flush the cache."""
        ...
