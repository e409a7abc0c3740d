"""Server-sent events and OpenAI chunk objects: decoding, assembling, replaying. No I/O."""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

DONE = "[DONE]"


class SseDecoder:
    """Turns raw lines of an SSE stream into the ``data`` payloads of its events.

    Follows the SSE rules that matter for OpenAI-style streams: ``data:`` lines of
    one event are joined with newlines, a blank line ends the event, comment lines
    (``:``) and other fields are ignored, and a trailing CR is stripped.
    """

    def __init__(self) -> None:
        self._data: list[str] = []

    def feed(self, line: bytes | str) -> str | None:
        """Feed one line; returns an event's data when the line completes it."""
        text = line.decode("utf-8") if isinstance(line, bytes) else line
        text = text.rstrip("\r\n")
        if not text:
            return self._flush()
        if text.startswith(":"):
            return None
        name, _, value = text.partition(":")
        if name == "data":
            self._data.append(value[1:] if value.startswith(" ") else value)
        return None

    def close(self) -> str | None:
        """End of stream: the last event, if the stream did not end with a blank line."""
        return self._flush()

    def _flush(self) -> str | None:
        if not self._data:
            return None
        data = "\n".join(self._data)
        self._data = []
        return data


def encode_event(data: Mapping[str, Any] | str) -> bytes:
    """One SSE event carrying JSON (or the literal ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


@dataclass
class ChunkAssembler:
    """Collects streamed chunks into the completion a non-streamed call would have returned."""

    kind: str = "chat"
    id: str | None = None
    model: str | None = None
    created: int | None = None
    usage: dict[str, Any] | None = None
    system_fingerprint: str | None = None
    _choices: dict[int, dict[str, Any]] = field(default_factory=dict)

    def add(self, chunk: Mapping[str, Any]) -> None:
        """Fold one chunk in."""
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        self.created = self.created or chunk.get("created")
        self.system_fingerprint = self.system_fingerprint or chunk.get("system_fingerprint")
        if isinstance(chunk.get("usage"), Mapping):
            self.usage = dict(chunk["usage"])
        for choice in chunk.get("choices") or ():
            index = choice.get("index", 0)
            slot = self._choices.setdefault(
                index, {"index": index, "role": None, "parts": [], "finish_reason": None}
            )
            if self.kind == "chat":
                delta = choice.get("delta") or {}
                slot["role"] = slot["role"] or delta.get("role")
                if delta.get("content"):
                    slot["parts"].append(delta["content"])
            elif choice.get("text"):
                slot["parts"].append(choice["text"])
            if choice.get("finish_reason"):
                slot["finish_reason"] = choice["finish_reason"]

    @property
    def finished(self) -> bool:
        """Whether every choice seen so far carried a finish reason."""
        return bool(self._choices) and all(c["finish_reason"] for c in self._choices.values())

    def text(self, index: int = 0) -> str:
        """The assembled text of one choice."""
        slot = self._choices.get(index)
        return "".join(slot["parts"]) if slot else ""

    def completion(self) -> dict[str, Any]:
        """The whole completion object."""
        choices = []
        for index in sorted(self._choices):
            slot = self._choices[index]
            content = "".join(slot["parts"])
            if self.kind == "chat":
                message = {"role": slot["role"] or "assistant", "content": content}
                choices.append(
                    {"index": index, "message": message, "finish_reason": slot["finish_reason"]}
                )
            else:
                choices.append(
                    {"index": index, "text": content, "finish_reason": slot["finish_reason"]}
                )
        body: dict[str, Any] = {
            "id": self.id or "",
            "object": "chat.completion" if self.kind == "chat" else "text_completion",
            "created": self.created or 0,
            "model": self.model or "",
            "choices": choices,
        }
        if self.system_fingerprint:
            body["system_fingerprint"] = self.system_fingerprint
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def replay_chunks(
    completion: Mapping[str, Any],
    kind: str = "chat",
    include_usage: bool = True,
    piece_chars: int = 0,
) -> Iterator[dict[str, Any]]:
    """The chunks a stream of ``completion`` would have carried (for answering a stream from cache).

    ``piece_chars`` > 0 splits each choice's text into pieces of that many characters.
    """
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    for choice in completion.get("choices") or ():
        index = choice.get("index", 0)
        if kind == "chat":
            message = choice.get("message") or {}
            text = message.get("content") or ""
            yield {
                **base,
                "choices": [
                    {
                        "index": index,
                        "delta": {"role": message.get("role", "assistant"), "content": ""},
                        "finish_reason": None,
                    }
                ],
            }
            for piece in _pieces(text, piece_chars):
                yield {
                    **base,
                    "choices": [
                        {"index": index, "delta": {"content": piece}, "finish_reason": None}
                    ],
                }
            yield {
                **base,
                "choices": [
                    {
                        "index": index,
                        "delta": {},
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ],
            }
        else:
            for piece in _pieces(choice.get("text") or "", piece_chars):
                yield {**base, "choices": [{"index": index, "text": piece, "finish_reason": None}]}
            yield {
                **base,
                "choices": [
                    {
                        "index": index,
                        "text": "",
                        "finish_reason": choice.get("finish_reason") or "stop",
                    }
                ],
            }
    if include_usage and isinstance(completion.get("usage"), Mapping):
        yield {**base, "choices": [], "usage": dict(completion["usage"])}


def _pieces(text: str, size: int) -> Iterator[str]:
    if not text:
        return
    if size <= 0:
        yield text
        return
    for start in range(0, len(text), size):
        yield text[start : start + size]
