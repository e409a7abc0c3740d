"""OpenAI request bodies to backend requests: validation and cache-key normalisation. No I/O.

Fields that cannot change the answer (``stream``, ``stream_options``, ``user``,
the ``cache`` directive) and parameters left at OpenAI's documented defaults are
kept out of the key, so the same question asked by the OpenAI SDK, LangChain or
a minima-llm batch run is one cache entry.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from ..types import MinimaLlmRequest
from .errors import RequestError

CHAT = "chat/completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

# Never part of the key and never forwarded as given: the backend sets its own stream flags.
_TRANSPORT_FIELDS = {"stream", "stream_options", "cache"}
# A body of only these is exactly the one the backend builds from the parsed request.
_REBUILT = {"model", "messages", "temperature", "max_tokens"} | _TRANSPORT_FIELDS
# Who asks, how the provider files or bills it: none of these can change the answer,
# and keyed by them (an end user's id, a run's metadata) every caller would miss.
_NOT_IN_KEY = {
    "user",
    "safety_identifier",
    "prompt_cache_key",
    "prompt_cache_retention",
    "metadata",
    "store",
    "service_tier",
}
# OpenAI's defaults: sending them or not asks the same question.
_DEFAULTS: dict[str, Any] = {
    "n": 1,
    "top_p": 1,
    "presence_penalty": 0,
    "frequency_penalty": 0,
    "logprobs": False,
    "echo": False,
    "best_of": 1,
    "stop": None,
    "logit_bias": None,
    "seed": None,
    "response_format": {"type": "text"},
    "parallel_tool_calls": True,
    "encoding_format": "float",
}
# Parameters chat and legacy completions share; each endpoint adds its own.
_SAMPLING = {
    "model",
    "temperature",
    "max_tokens",
    "n",
    "top_p",
    "stop",
    "presence_penalty",
    "frequency_penalty",
    "logit_bias",
    "logprobs",
    "seed",
    "user",
    "stream",
    "stream_options",
    "cache",
}
_KNOWN = {
    CHAT: _SAMPLING
    | {
        "messages",
        "max_completion_tokens",
        "top_logprobs",
        "response_format",
        "tools",
        "tool_choice",
        "parallel_tool_calls",
        "functions",
        "function_call",
        "service_tier",
        "store",
        "metadata",
        "reasoning_effort",
        "verbosity",
        "modalities",
        "audio",
        "prediction",
        "web_search_options",
        "safety_identifier",
        "prompt_cache_key",
        "prompt_cache_retention",
    },
    COMPLETIONS: _SAMPLING | {"prompt", "echo", "best_of", "suffix"},
    EMBEDDINGS: {"model", "input", "encoding_format", "dimensions", "user", "cache"},
}
_ids = itertools.count(1)


@dataclass(frozen=True)
class Parsed:
    """A validated request and what the caller asked of the gateway."""

    endpoint: str
    request: MinimaLlmRequest
    stream: bool
    include_usage: bool
    no_cache: bool
    no_store: bool
    model: str
    # What goes upstream when it is not simply the request rebuilt: the caller's own body.
    payload: dict[str, Any] | None = None


def parse_body(
    endpoint: str,
    body: Any,
    default_model: str,
    force_model: bool,
    strict: bool,
    headers: Mapping[str, str],
) -> Parsed:
    """Validate an OpenAI request body and turn it into a backend request."""
    if not isinstance(body, dict):
        raise RequestError(400, "request body must be a JSON object")
    if strict:
        unknown = sorted(set(body) - _KNOWN[endpoint])
        if unknown:
            raise RequestError(
                400, f"Unrecognized request argument supplied: {unknown[0]}", param=unknown[0]
            )
    model = _model(body, default_model, force_model)
    stream = _bool(body, "stream", False)
    if stream and endpoint == EMBEDDINGS:
        raise RequestError(400, "embeddings cannot be streamed", param="stream")
    if strict and not stream and body.get("stream_options") is not None:
        # OpenAI's own answer: checked as strictly as it checks, the app finds out here.
        raise RequestError(
            400,
            "The 'stream_options' parameter is only allowed when 'stream' is enabled.",
            param="stream_options",
        )
    include_usage = _include_usage(body) if stream else True
    no_cache, no_store = _cache_directives(body, headers)
    temperature = _number(body, "temperature", 0, 2)
    max_tokens = _max_tokens(body)
    messages: list[Any] = _messages(body) if endpoint == CHAT else []
    extra = _extra(endpoint, body)
    request = MinimaLlmRequest(
        request_id=f"gw-{next(_ids)}",
        messages=messages,
        temperature=temperature,
        max_tokens=max_tokens,
        extra=extra,
        model=model,
    )
    return Parsed(
        endpoint, request, stream, include_usage, no_cache, no_store, model, _forwarded(body, model)
    )


def _forwarded(body: dict[str, Any], model: str) -> dict[str, Any] | None:
    """The caller's body less the gateway's own fields, or None if the backend builds the same.

    The cache key leaves out what cannot change the answer (``user``, parameters at
    their defaults) and folds ``max_completion_tokens`` into ``max_tokens``; the
    upstream still gets every parameter under the name the caller used, since some
    models refuse ``max_tokens`` and some servers have defaults of their own.
    """
    if _REBUILT.issuperset(body):
        return None
    payload = {name: value for name, value in body.items() if name not in _TRANSPORT_FIELDS}
    payload["model"] = model
    return payload


def _model(body: dict[str, Any], default_model: str, force_model: bool) -> str:
    model = body.get("model")
    if model is not None and not isinstance(model, str):
        raise RequestError(400, "'model' must be a string", param="model")
    return default_model if force_model or not model else model


def _bool(body: dict[str, Any], name: str, default: bool) -> bool:
    value = body.get(name, default)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise RequestError(400, f"'{name}' must be a boolean", param=name)
    return value


def _include_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise RequestError(400, "'stream_options' must be an object", param="stream_options")
    return _flag(options, "include_usage", "stream_options.")


def _cache_directives(body: dict[str, Any], headers: Mapping[str, str]) -> tuple[bool, bool]:
    control = {part.strip().lower() for part in headers.get("cache-control", "").split(",")}
    no_cache, no_store = "no-cache" in control, "no-store" in control
    directive = body.get("cache")
    if directive is not None:
        if not isinstance(directive, dict):
            raise RequestError(
                400, "'cache' must be an object such as {\"no-cache\": true}", param="cache"
            )
        # Every flag is read, so a bad one is refused whatever the others say.
        flags = {name: _flag(directive, name, "cache.") for name in _CACHE_FLAGS}
        no_cache = no_cache or flags["no-cache"] or flags["no_cache"]
        no_store = no_store or flags["no-store"] or flags["no_store"]
    return no_cache, no_store


_CACHE_FLAGS = ("no-cache", "no_cache", "no-store", "no_store")


def _flag(options: Mapping[str, Any], name: str, where: str) -> bool:
    value = options.get(name)
    if value is not None and not isinstance(value, bool):
        # bool("false") is True: a quoted "false" would turn on what was asked off.
        raise RequestError(400, f"'{where}{name}' must be a boolean", param=f"{where}{name}")
    return bool(value)


def _number(body: dict[str, Any], name: str, low: float, high: float) -> float | None:
    value = body.get(name)
    if value is None:
        return None
    if not isinstance(value, (int, float)) or isinstance(value, bool) or not low <= value <= high:
        raise RequestError(400, f"'{name}' must be a number from {low} to {high}", param=name)
    # JSON clients send 0 where the client library has 0.0; both are one cache key.
    return float(value)


def _max_tokens(body: dict[str, Any]) -> int | None:
    # max_completion_tokens is the newer name for the same limit; one key for both.
    for name in ("max_tokens", "max_completion_tokens"):
        value = body.get(name)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or value < 1:
            raise RequestError(400, f"'{name}' must be a positive integer", param=name)
        return value
    return None


def _messages(body: dict[str, Any]) -> list[Any]:
    messages = body.get("messages")
    if messages is None:
        raise RequestError(400, "'messages' is a required property", param="messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError(400, "'messages' must be a non-empty array", param="messages")
    for i, message in enumerate(messages):
        if not isinstance(message, dict) or not isinstance(message.get("role"), str):
            raise RequestError(
                400, f"messages[{i}] must be an object with a string 'role'", param=f"messages[{i}]"
            )
        content = message.get("content")
        if content is not None and not isinstance(content, (str, list)):
            raise RequestError(
                400,
                f"messages[{i}].content must be a string or an array",
                param=f"messages[{i}].content",
            )
    return messages


# Fields that are the request itself or cannot change the answer: never in ``extra``.
_NOT_EXTRA = (
    frozenset({"model", "messages", "temperature", "max_tokens", "max_completion_tokens"})
    | _TRANSPORT_FIELDS
    | _NOT_IN_KEY
)
# Each endpoint's required input, and the values that count as missing: an empty
# prompt is a valid completion request (OpenAI starts a new document), an empty
# embedding input is not.
_REQUIRED: dict[str, tuple[str, tuple[Any, ...]]] = {
    COMPLETIONS: ("prompt", (None, [])),
    EMBEDDINGS: ("input", (None, "", [])),
}


def _extra(endpoint: str, body: dict[str, Any]) -> dict[str, Any]:
    if endpoint in _REQUIRED:
        field, missing = _REQUIRED[endpoint]
        if body.get(field) in missing:
            raise RequestError(400, f"'{field}' is a required property", param=field)
    extra = {}
    both = body.get("max_tokens"), body.get("max_completion_tokens")
    if None not in both and both[0] != both[1]:
        # Two different limits: which one applies is up to the server (vLLM and OpenAI
        # take max_completion_tokens), so the answer is keyed by both, not by max_tokens.
        extra["max_completion_tokens"] = both[1]
    for name, value in body.items():
        if name in _NOT_EXTRA or value is None:
            continue
        if name in _DEFAULTS and _is_default(value, _DEFAULTS[name]):
            continue
        # A body field named like a key-only one (see key_extra) is keyed under another
        # name: a keyless body with "tenant": <a tenant's id> read that tenant's answers.
        extra[f"body:{name}" if name in _KEY_ONLY else name] = value
    return extra


def _is_default(value: Any, default: Any) -> bool:
    # 0 == False in Python, but legacy completions' "logprobs": 0 asks for the sampled
    # token's logprob, which the default (none) does not: a bool only matches a bool.
    return value == default and isinstance(value, bool) == isinstance(default, bool)


_KEY_ONLY = frozenset({"endpoint", "tenant"})


def key_extra(endpoint: str, tenant: str | None) -> dict[str, str] | None:
    """Key-only fields: the endpoint (chat keys stay the client library's) and the tenant."""
    extra: dict[str, str] = {}
    if endpoint != CHAT:
        extra["endpoint"] = endpoint
    if tenant:
        extra["tenant"] = tenant
    return extra or None
