"""Deterministic OpenAI-shaped replies: pure functions from request bytes to response bytes."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

CREATED = 1_700_000_000
DONE_EVENT = b"data: [DONE]\n\n"
ECHO_PREFIX = "ECHO:"
REPLY_PREFIX = "mock reply: "
MAX_N = 128
_PROMPT_CHARS = 200
_PER_MESSAGE_TOKENS = 3
# json.dumps() with any option builds a new encoder per call; reuse one instead.
_ENCODER = json.JSONEncoder(separators=(",", ":"))
# Split after whitespace and before a word, so the pieces concatenate to the exact text.
_WORD_BOUNDARY = re.compile(r"(?<=\s)(?=\S)")

# Answers a chat in a special format (DSPy's, say) from its (role, content) messages
# and the request payload, or returns None to leave it to ``reply_text``.
Responder = Callable[[Sequence[tuple[str, str]], Mapping[str, Any]], str | None]


class RequestError(ValueError):
    """The request body is not a valid OpenAI request; answered with a 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


@dataclass(frozen=True, slots=True)
class Choice:
    """One generated choice: its text and why it stopped."""

    text: str
    finish_reason: Literal["stop", "length"]


@dataclass(frozen=True, slots=True)
class Reply:
    """Everything needed to render a chat or text completion, streamed or not."""

    kind: Literal["chat", "text"]
    id: str
    model: str
    choices: tuple[Choice, ...]
    prompt_tokens: int
    stream: bool
    include_usage: bool
    # What a token rate limit charges, as OpenAI's limiter counts: the prompt at four
    # characters a token, plus max_tokens for every choice (the reply itself without it).
    prompt_chars: int = 0
    max_tokens: int | None = None

    @property
    def charged_tokens(self) -> int:
        """Tokens a per-minute token limit counts for this request when it is admitted."""
        prompt = -(-self.prompt_chars // 4)
        if self.max_tokens is None:
            return prompt + self.completion_tokens
        return prompt + self.max_tokens * len(self.choices)

    @property
    def completion_tokens(self) -> int:
        """Words across all choices, the mock's stand-in for tokens."""
        return sum(len(choice.text.split()) for choice in self.choices)

    def usage(self) -> dict[str, int]:
        """The OpenAI ``usage`` object."""
        completion = self.completion_tokens
        return {
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": completion,
            "total_tokens": self.prompt_tokens + completion,
        }


def dumps(obj: Any) -> bytes:
    """Compact JSON as bytes; the one serialisation each response pays for."""
    return _ENCODER.encode(obj).encode()


def error_body(
    message: str,
    *,
    type: str = "invalid_request_error",
    code: str | None = None,
    param: str | None = None,
) -> bytes:
    """An OpenAI error object as JSON bytes."""
    return dumps({"error": {"message": message, "type": type, "param": param, "code": code}})


def reply_text(prompt: str) -> str:
    """The reply to ``prompt``: the rest after ``ECHO:``, else a prefixed, truncated echo."""
    if prompt.startswith(ECHO_PREFIX):
        return prompt[len(ECHO_PREFIX) :]
    return REPLY_PREFIX + prompt[:_PROMPT_CHARS]


def truncate_words(text: str, max_tokens: int | None) -> Choice:
    """Cut ``text`` to ``max_tokens`` words, reporting ``length`` when it had to."""
    if max_tokens is None:
        return Choice(text, "stop")
    words = text.split()
    if len(words) <= max_tokens:
        return Choice(text, "stop")
    return Choice(" ".join(words[:max_tokens]), "length")


def load_object(raw: bytes) -> dict[str, Any]:
    """Decode a JSON object body or raise :class:`RequestError`."""
    try:
        payload = json.loads(raw)
    except ValueError as exc:
        raise RequestError(f"request body is not valid JSON: {exc}") from exc
    if not isinstance(payload, dict):
        raise RequestError("request body must be a JSON object")
    return payload


def parse_chat(raw: bytes, default_model: str, responder: Responder | None = None) -> Reply:
    """Build the reply to a ``/chat/completions`` body; ``responder`` may answer it instead."""
    payload = load_object(raw)
    messages = payload.get("messages")
    if not isinstance(messages, list) or not messages:
        raise RequestError("'messages' must be a non-empty array", "messages")
    contents = [_message_content(message) for message in messages]
    prompt_tokens = sum(len(text.split()) + _PER_MESSAGE_TOKENS for text in contents)
    users = [
        text for message, text in zip(messages, contents, strict=True) if message["role"] == "user"
    ]
    text = None
    if responder is not None:
        text = responder([(m["role"], c) for m, c in zip(messages, contents, strict=True)], payload)
    if text is None:
        text = reply_text(users[-1] if users else contents[-1])
    max_tokens = _max_tokens(payload)
    choice = truncate_words(text, max_tokens)
    return Reply(
        kind="chat",
        id="chatcmpl-" + _short_hash(raw),
        model=_model(payload, default_model),
        choices=(choice,) * _n(payload),
        prompt_tokens=prompt_tokens,
        stream=payload.get("stream") is True,
        include_usage=_include_usage(payload),
        prompt_chars=sum(map(len, contents)),
        max_tokens=max_tokens,
    )


def parse_completion(raw: bytes, default_model: str) -> Reply:
    """Build the reply to a legacy ``/completions`` body; a prompt list yields choices per prompt."""
    payload = load_object(raw)
    prompt = payload.get("prompt")
    if isinstance(prompt, str):
        prompts = [prompt]
    elif isinstance(prompt, list) and prompt and all(isinstance(p, str) for p in prompt):
        prompts = prompt
    else:
        raise RequestError("'prompt' must be a string or a non-empty array of strings", "prompt")
    max_tokens, n = _max_tokens(payload), _n(payload)
    choices = [truncate_words(reply_text(text), max_tokens) for text in prompts for _ in range(n)]
    return Reply(
        kind="text",
        id="cmpl-" + _short_hash(raw),
        model=_model(payload, default_model),
        choices=tuple(choices),
        prompt_tokens=sum(len(text.split()) for text in prompts),
        stream=payload.get("stream") is True,
        include_usage=_include_usage(payload),
        prompt_chars=sum(map(len, prompts)),
        max_tokens=max_tokens,
    )


def render(reply: Reply) -> bytes:
    """The non-streamed response body."""
    if reply.kind == "chat":
        choices: list[dict[str, Any]] = [
            {
                "index": index,
                "message": {"role": "assistant", "content": choice.text},
                "logprobs": None,
                "finish_reason": choice.finish_reason,
            }
            for index, choice in enumerate(reply.choices)
        ]
        obj = "chat.completion"
    else:
        choices = [_text_choice(i, c.text, c.finish_reason) for i, c in enumerate(reply.choices)]
        obj = "text_completion"
    return dumps(
        {
            "id": reply.id,
            "object": obj,
            "created": CREATED,
            "model": reply.model,
            "choices": choices,
            "usage": reply.usage(),
        }
    )


def render_stream(reply: Reply) -> list[bytes]:
    """The SSE events of a streamed response, ending with ``data: [DONE]``."""
    base: dict[str, Any] = {
        "id": reply.id,
        "object": "chat.completion.chunk" if reply.kind == "chat" else "text_completion",
        "created": CREATED,
        "model": reply.model,
    }
    if reply.include_usage:
        # OpenAI sends ``usage: null`` on every chunk but the last when usage is requested.
        base["usage"] = None
    # Chunks differ only in their one choice, so the envelope is serialised once and
    # content pieces are spliced in: streaming costs one small encode per word.
    head = b"data: " + dumps(base)[:-1] + b',"choices":['
    tail = b"]}\n\n"
    events = []
    for index, choice in enumerate(reply.choices):
        if reply.kind == "chat":
            events.append(
                head + dumps(_chat_choice(index, {"role": "assistant", "content": ""})) + tail
            )
            opening = b'{"index":%d,"delta":{"content":' % index
            closing = b'},"logprobs":null,"finish_reason":null}' + tail
            final = _chat_choice(index, {}, choice.finish_reason)
        else:
            opening = b'{"index":%d,"text":' % index
            closing = b',"logprobs":null,"finish_reason":null}' + tail
            final = _text_choice(index, "", choice.finish_reason)
        events.extend(head + opening + dumps(piece) + closing for piece in split_words(choice.text))
        events.append(head + dumps(final) + tail)
    if reply.include_usage:
        events.append(sse({**base, "choices": [], "usage": reply.usage()}))
    events.append(DONE_EVENT)
    return events


def sse(obj: Any) -> bytes:
    """One server-sent event carrying ``obj`` as JSON."""
    return b"data: " + dumps(obj) + b"\n\n"


def split_words(text: str) -> list[str]:
    """Split ``text`` into word pieces (trailing whitespace kept) that join back to it."""
    return [piece for piece in _WORD_BOUNDARY.split(text) if piece]


def _chat_choice(index: int, delta: dict[str, str], finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": None, "finish_reason": finish}


def _text_choice(index: int, text: str, finish: str | None = None) -> dict[str, Any]:
    return {"index": index, "text": text, "logprobs": None, "finish_reason": finish}


def _message_content(message: object) -> str:
    if not isinstance(message, dict) or not isinstance(message.get("role"), str):
        raise RequestError("each message must be an object with a string 'role'", "messages")
    content = message.get("content")
    if content is None or isinstance(content, str):
        return content or ""
    if isinstance(content, list):
        # Content parts: only text parts contribute to the deterministic reply.
        return "".join(
            part.get("text", "")
            for part in content
            if isinstance(part, dict) and part.get("type") == "text"
        )
    raise RequestError("message 'content' must be a string, an array or null", "messages")


def _model(payload: dict[str, Any], default: str) -> str:
    model = payload.get("model")
    return model if isinstance(model, str) and model else default


def _max_tokens(payload: dict[str, Any]) -> int | None:
    name = "max_completion_tokens" if "max_completion_tokens" in payload else "max_tokens"
    value = payload.get(name)
    if value is None:
        return None
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise RequestError(f"'{name}' must be a positive integer", name)
    return value


def _n(payload: dict[str, Any]) -> int:
    value = payload.get("n", 1)
    if value is None:
        return 1
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= MAX_N:
        raise RequestError(f"'n' must be an integer between 1 and {MAX_N}", "n")
    return value


def _include_usage(payload: dict[str, Any]) -> bool:
    options = payload.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _short_hash(raw: bytes) -> str:
    return hashlib.blake2b(raw, digest_size=8).hexdigest()
