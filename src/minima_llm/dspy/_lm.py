"""``MinimaLlmDSPyLM``: a DSPy LM whose calls go through a minima-llm backend.

The backend owns caching, retries and pacing, so DSPy's own cache and retries
are off. ``acall``/``__call__`` are implemented here rather than inherited: DSPy
3.4 routes inherited calls through a worker thread and a deprecation warning
for ``forward``/``aforward`` subclasses, and neither is needed for a call that
is already async.
"""

from __future__ import annotations

import asyncio
import itertools
import json
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar, cast

from ..backend import OpenAIMinimaLlm
from ..context import get_force_refresh, set_last_cached
from ..errors import MinimaLlmError
from ..types import AsyncMinimaLlmBackend, MinimaLlmFailure, MinimaLlmRequest, MinimaLlmResponse
from ._compat import BaseLM, LMProviderError, with_callbacks
from ._pending import PendingCall, is_pending
from ._retry import get_retry_sample

T = TypeVar("T")

SYNC_IN_LOOP = (
    "MinimaLlmDSPyLM was called synchronously inside a running event loop; "
    "use await predictor.acall(...) instead of predictor(...)"
)

# DSPy settings that steer DSPy or its client, never parameters for the upstream.
_NOT_SENT = frozenset(
    {
        "cache",
        "num_retries",
        "rollout_id",
        "api_key",
        "api_base",
        "base_url",
        "api_version",
        "prompt_cache",
        "num_generations",
        "model_type",
    }
)


@dataclass(frozen=True, slots=True)
class RequestParams:
    """DSPy call kwargs sorted into the request's fields, its ``extra``, and key-only parts."""

    temperature: float | None
    max_tokens: int | None
    extra: dict[str, Any]
    rollout_id: Any = None


def request_params(kwargs: Mapping[str, Any]) -> RequestParams:
    """Sort merged DSPy kwargs: ``None`` values are dropped, DSPy-only settings are not sent."""
    extra = {k: v for k, v in kwargs.items() if v is not None and k not in _NOT_SENT}
    temperature = extra.pop("temperature", None)
    max_tokens = extra.pop("max_tokens", None)
    generations = kwargs.get("num_generations")
    if generations is not None and "n" not in extra:
        extra["n"] = generations  # DSPy's older name for n
    sample = get_retry_sample()
    if sample is not None:
        if sample.seed is not None:
            extra["seed"] = sample.seed
        if sample.temperature is not None:
            temperature = sample.temperature
    return RequestParams(temperature, max_tokens, extra, kwargs.get("rollout_id"))


@dataclass
class ChatCompletion:
    """An OpenAI-style chat completion, shaped the way DSPy's history and usage tracker read it."""

    id: str
    model: str
    choices: list[dict[str, Any]]
    usage: dict[str, int]
    cache_hit: bool = False
    response: MinimaLlmResponse | None = field(default=None, repr=False)
    _hidden_params: dict[str, Any] = field(default_factory=dict, repr=False)

    @classmethod
    def from_response(cls, resp: MinimaLlmResponse, model: str) -> ChatCompletion:
        """The upstream body's choices when stored, else one choice holding ``resp.text``."""
        body = _body(resp.raw_text)
        choices = body.get("choices")
        if not isinstance(choices, list) or not choices:
            message = {"role": "assistant", "content": resp.text}
            choices = [{"index": 0, "message": message, "finish_reason": "stop"}]
        usage = resp.usage
        return cls(
            id=str(body.get("id") or resp.request_id),
            model=str(body.get("model") or resp.model or model),
            choices=choices,
            usage={
                "prompt_tokens": usage.prompt_tokens,
                "completion_tokens": usage.completion_tokens,
                "total_tokens": usage.total_tokens,
            },
            cache_hit=resp.cached,
            response=resp,
        )


def _body(raw_text: str | None) -> dict[str, Any]:
    if not raw_text:
        return {}
    try:
        body = json.loads(raw_text)
    except ValueError:
        return {}
    return body if isinstance(body, dict) else {}


def _error_base() -> type[Exception]:
    return cast(type[Exception], LMProviderError) if LMProviderError is not None else Exception


class MinimaLlmDSPyError(MinimaLlmError, _error_base()):  # type: ignore[misc]
    """The backend could not answer an LM call; ``failure`` has every detail.

    Also a DSPy ``LMProviderError`` when DSPy has one, so DSPy code that catches
    LM errors catches this one.
    """

    def __init__(self, failure: MinimaLlmFailure, model: str) -> None:
        message = (
            f"{failure.error_type}: {failure.message} (request {failure.request_id}, "
            f"status={failure.status}, attempts={failure.attempts} {failure.format_attempts()})"
        )
        meta = {"model": model, "status": failure.status, "request_id": failure.request_id}
        init = cast(Any, super().__init__)
        if LMProviderError is not None:
            init(message, **meta)
        else:
            init(message)
        self.failure = failure


class MinimaLlmDSPyLM(BaseLM):  # type: ignore[misc]
    """A DSPy LM backed by an :class:`~minima_llm.AsyncMinimaLlmBackend`.

    ``model`` is sent as each request's model (default: the backend's own).
    ``kwargs`` become default call parameters (``temperature``, ``max_tokens``,
    anything OpenAI accepts). Await ``predictor.acall(...)`` from async code; a
    plain ``predictor(...)`` works only where no event loop is running.
    """

    def __init__(
        self, backend: AsyncMinimaLlmBackend, *, model: str | None = None, **kwargs: Any
    ) -> None:
        # dspy.LM's own switches: without these checks, code moved over from dspy.LM(...,
        # cache=False) fails with "got multiple values for keyword argument 'cache'".
        if "cache" in kwargs:
            raise ValueError(
                "MinimaLlmDSPyLM caches through its backend's prompt cache; instead of "
                "cache=..., set cache_dir or force_refresh on the backend's config, or use "
                "set_force_refresh(True) around the calls to send live"
            )
        if kwargs.pop("model_type", "chat") != "chat":
            raise ValueError("MinimaLlmDSPyLM speaks chat completions only (model_type='chat')")
        super().__init__(
            model=model or _model_of(backend), model_type="chat", cache=False, **kwargs
        )
        self._minimallm = backend
        self._request_model = model
        self._model_at_start = self.model
        self._ids = itertools.count(1)

    @property
    def backend(self) -> AsyncMinimaLlmBackend:
        """The backend every call goes through."""
        return self._minimallm

    def request_for(
        self,
        prompt: str | None,
        messages: Sequence[Mapping[str, Any]] | None,
        kwargs: Mapping[str, Any],
    ) -> tuple[MinimaLlmRequest, Any]:
        """The backend request one call with these arguments sends, and DSPy's rollout id."""
        params = request_params({**self.kwargs, **kwargs})
        request = MinimaLlmRequest(
            request_id=f"dspy-{next(self._ids)}",
            messages=list(messages) if messages else [{"role": "user", "content": prompt or ""}],
            temperature=params.temperature,
            max_tokens=params.max_tokens,
            extra=params.extra or None,
            # DSPy's copy(model=...) sets the attribute: the model named is the one asked.
            model=self.model if self.model != self._model_at_start else self._request_model,
        )
        return request, params.rollout_id

    async def send(
        self, request: MinimaLlmRequest, *, force_refresh: bool = False, rollout_id: Any = None
    ) -> ChatCompletion:
        """Send a request from :meth:`request_for`; raises ``MinimaLlmDSPyError`` or ``PendingCall``."""
        refresh = force_refresh or get_force_refresh()
        return self.completion_of(await self._generate(request, refresh, rollout_id))

    def completion_of(self, result: Any) -> ChatCompletion:
        """The completion for one backend result, noted in ``get_last_cached()``.

        Raises ``PendingCall`` for a placeholder and ``MinimaLlmDSPyError`` for a failure.
        """
        if is_pending(result):
            set_last_cached(False)
            raise PendingCall(result)
        if isinstance(result, MinimaLlmFailure):
            set_last_cached(False)
            raise MinimaLlmDSPyError(result, str(self.model))
        set_last_cached(result.cached)
        return ChatCompletion.from_response(result, str(self.model))

    async def aforward(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        force_refresh: bool = False,
        **kwargs: Any,
    ) -> ChatCompletion:
        """One backend call; returns an OpenAI-style completion or raises ``MinimaLlmDSPyError``."""
        request, rollout_id = self.request_for(prompt, messages, kwargs)
        return await self.send(request, force_refresh=force_refresh, rollout_id=rollout_id)

    async def _generate(self, request: MinimaLlmRequest, refresh: bool, rollout_id: Any) -> Any:
        backend = self._minimallm
        if rollout_id is not None and isinstance(backend, OpenAIMinimaLlm):
            # DSPy asks for a distinct sample per rollout; the id joins the cache
            # key only, since OpenAI rejects parameters it does not know.
            key_extra = {"dspy_rollout_id": rollout_id}
            return await backend.call(request, force_refresh=refresh, key_extra=key_extra)
        return await backend.generate(request, force_refresh=refresh)

    def forward(
        self,
        prompt: str | None = None,
        messages: Sequence[Mapping[str, Any]] | None = None,
        **kwargs: Any,
    ) -> ChatCompletion:
        """Synchronous :meth:`aforward`, for code without a running event loop."""
        return _run_sync(lambda: self.aforward(prompt, messages, **kwargs))

    async def _complete(
        self, prompt: str | None, messages: Any, kwargs: dict[str, Any]
    ) -> list[Any]:
        response = await self.aforward(prompt, messages, **kwargs)
        return self.outputs(response, prompt, messages, kwargs)

    def outputs(
        self, response: ChatCompletion, prompt: str | None, messages: Any, kwargs: Mapping[str, Any]
    ) -> list[Any]:
        """What ``acall`` returns for ``response``: DSPy's outputs, recorded in DSPy's history."""
        process = getattr(self, "_process_lm_response", None)
        if process is None:  # a DSPy without the 3.x helper: plain texts, no history
            return [choice["message"]["content"] for choice in response.choices]
        return cast(list[Any], process(response, prompt, messages, **kwargs))

    @with_callbacks
    async def acall(
        self, prompt: str | None = None, messages: Any = None, **kwargs: Any
    ) -> list[Any]:
        """What DSPy's adapters await: the completion texts, recorded in DSPy's history."""
        return await self._complete(prompt, messages, kwargs)

    @with_callbacks
    def __call__(self, prompt: str | None = None, messages: Any = None, **kwargs: Any) -> list[Any]:
        """Synchronous :meth:`acall`; raises ``RuntimeError`` inside a running event loop."""
        return _run_sync(lambda: self._complete(prompt, messages, kwargs))

    def __repr__(self) -> str:
        return (
            f"<MinimaLlmDSPyLM model={self.model!r} calls={len(self.history)} {self._minimallm!r}>"
        )


def _model_of(backend: AsyncMinimaLlmBackend) -> str:
    config = getattr(backend, "cfg", None)
    model = getattr(config, "model", None)
    return model if isinstance(model, str) and model else "minima-llm"


def _run_sync(start: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to completion where no loop runs; refuse inside one (it would deadlock)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_await(start))
    raise RuntimeError(SYNC_IN_LOOP)


async def _await(start: Callable[[], Awaitable[T]]) -> T:
    return await start()
