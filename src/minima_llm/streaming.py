"""Server-sent events and OpenAI chunk objects: decoding, assembling, replaying. No I/O."""

from __future__ import annotations

import json
import re
from bisect import bisect_left, bisect_right
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from itertools import accumulate
from typing import Any, TypeAlias, TypeVar

DONE = "[DONE]"
# Message fields ``replay_chunks`` streams by their own rules rather than as plain fields.
_SPECIAL = ("role", "content", "tool_calls", "function_call")
# The parallel lists of a legacy completion's ``logprobs``, one entry per token.
_TOKEN_LISTS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")
# Top-level chunk fields the assembler reads by their own rules. ``obfuscation`` is
# OpenAI's random padding, different in every chunk and absent from a whole answer.
_CHUNK_OWN = frozenset({"id", "object", "created", "model", "choices", "usage", "obfuscation"})
# Top-level fields OpenAI repeats in every chunk: the first non-null value is the answer's.
_EVERY_CHUNK = ("system_fingerprint", "service_tier")
_CHUNK_KNOWN = _CHUNK_OWN | frozenset(_EVERY_CHUNK)
# A UTF-16 surrogate pair, as two chunks' halves (each a JSON ``\u`` escape) join up.
_PAIR = re.compile("[\ud800-\udbff][\udc00-\udfff]")
_T = TypeVar("_T")


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


def kind_of(endpoint: str) -> str:
    """The chunk shape an endpoint streams: ``chat`` (deltas) or ``text`` (completions)."""
    return "chat" if endpoint == "chat/completions" else "text"


def encode_event(data: Mapping[str, Any] | str) -> bytes:
    """One SSE event carrying JSON (or the literal ``[DONE]``)."""
    payload = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return b"data: " + payload.encode("utf-8") + b"\n\n"


class _Text(list[str]):
    """Pieces of a string field, joined when the completion is built."""


class _Items(list[Any]):
    """A ``logprobs`` list that grows chunk by chunk."""


class _Merged(dict[str, Any]):
    """An object assembled from fragments: a tool call, a function, ``logprobs``."""


class _Calls(dict[int, _Merged]):
    """Tool calls by their ``index``."""


@dataclass
class _Slot:
    """One choice as it accumulates: its delta (or text) fields, and its choice-level fields."""

    fields: dict[str, Any] = field(default_factory=dict)
    extras: dict[str, Any] = field(default_factory=dict)

    def add(self, choice: Mapping[str, Any], chat: bool) -> None:
        """Fold one chunk's choice in."""
        for key, value in choice.items():
            if key == "index":
                continue
            if chat and key == "delta":
                _merge_delta(self.fields, {} if value is None else _object(value, "delta"))
            elif not chat and key == "text":
                _merge_field(self.fields, key, value)
            elif key == "logprobs":
                _merge_logprobs(self.extras, value)
            else:
                _merge_last(self.extras, key, value)

    def text(self, key: str) -> str:
        """The joined string field ``key`` ("" when it carried none)."""
        value = self.fields.get(key)
        return _joined(value) if isinstance(value, _Text) else ""

    def choice(self, index: int, chat: bool) -> dict[str, Any]:
        """The choice as a non-streamed response has it."""
        body: dict[str, Any] = {"index": index}
        if chat:
            body["message"] = _message(self.fields)
        else:
            body["text"] = self.text("text")
        if "logprobs" in self.extras:
            body["logprobs"] = _settled(self.extras["logprobs"])
        body["finish_reason"] = self.extras.get("finish_reason")
        body.update((k, v) for k, v in self.extras.items() if k not in body)
        return body


@dataclass
class ChunkAssembler:
    """Collects streamed chunks into the completion a non-streamed call would have returned.

    Delta fields merge as OpenAI's streaming format implies: strings concatenate
    (``content`` may also come as a list of content parts), ``tool_calls`` merge
    by ``index``, function arguments concatenate, other values keep the last
    non-null one, and a field only ever sent as null stays null. ``logprobs``
    lists concatenate. Other top-level fields (``system_fingerprint``, Azure's
    ``prompt_filter_results``, vLLM's ``prompt_logprobs``...) are kept as a whole
    answer has them. ``add`` raises ``ValueError`` for a chunk not shaped like an
    OpenAI chunk.
    """

    kind: str = "chat"
    id: str | None = None
    model: str | None = None
    created: int | None = None
    usage: dict[str, Any] | None = None
    _top: dict[str, Any] = field(default_factory=dict)
    _choices: dict[int, _Slot] = field(default_factory=dict)

    @property
    def system_fingerprint(self) -> str | None:
        """The stream's ``system_fingerprint``, if it carried one."""
        return self._top.get("system_fingerprint")

    @property
    def service_tier(self) -> str | None:
        """The stream's ``service_tier``, if it carried one."""
        return self._top.get("service_tier")

    def add(self, chunk: Mapping[str, Any]) -> None:
        """Fold one chunk in."""
        self.id = self.id or chunk.get("id")
        self.model = self.model or chunk.get("model")
        self.created = self.created or chunk.get("created")
        if isinstance(chunk.get("usage"), Mapping):
            self.usage = dict(chunk["usage"])
        top = self._top
        for key in _EVERY_CHUNK:
            if top.get(key) is None and key in chunk:
                top[key] = chunk[key]
        # One C-level check for the usual chunk, which has no other field: this runs per chunk.
        if not _CHUNK_KNOWN.issuperset(chunk):
            for key, value in chunk.items():
                if key not in _CHUNK_KNOWN:
                    # Sent once (Azure's filter results) or repeated whole (Perplexity's
                    # citations): the last non-null value, never a concatenation.
                    _merge_last(top, key, value)
        chat = self.kind == "chat"
        for choice in _choices_of(chunk):
            index = _index(choice)
            slot = self._choices.get(index)
            if slot is None:
                slot = self._choices[index] = _Slot()
            slot.add(choice, chat)

    @property
    def finished(self) -> bool:
        """Whether every choice seen so far carried a finish reason."""
        return bool(self._choices) and all(
            c.extras.get("finish_reason") for c in self._choices.values()
        )

    def text(self, index: int = 0) -> str:
        """The assembled text of one choice."""
        slot = self._choices.get(index)
        return slot.text("content" if self.kind == "chat" else "text") if slot else ""

    def completion(self) -> dict[str, Any]:
        """The whole completion object."""
        chat = self.kind == "chat"
        body: dict[str, Any] = {
            "id": self.id or "",
            "object": "chat.completion" if chat else "text_completion",
            "created": self.created or 0,
            "model": self.model or "",
            "choices": [self._choices[i].choice(i, chat) for i in sorted(self._choices)],
        }
        # Before ``usage``: ``calls.usage_of`` reads a body fastest with usage last.
        body.update(self._top)
        if self.usage is not None:
            body["usage"] = self.usage
        return body


def _choices_of(chunk: Mapping[str, Any]) -> list[Mapping[str, Any]]:
    choices = chunk.get("choices")
    if choices is None:
        return []  # the usage chunk may send null
    if not isinstance(choices, list):
        raise ValueError(f"malformed stream chunk: 'choices' is {_type(choices)}, not a list")
    return [_object(choice, "choice") for choice in choices]


def _index(choice: Mapping[str, Any]) -> int:
    index = choice.get("index")
    if index is None:
        return 0
    if not isinstance(index, int) or isinstance(index, bool):
        raise ValueError(f"malformed stream chunk: choice index is {_type(index)}")
    return index


def _object(value: Any, what: str) -> Mapping[str, Any]:
    # ``type(...) is dict`` first: parsed JSON is dicts, and the ABC check costs more per chunk.
    if type(value) is not dict and not isinstance(value, Mapping):
        raise ValueError(f"malformed stream chunk: {what} is {_type(value)}, not an object")
    return value


def _type(value: Any) -> str:
    return "null" if value is None else type(value).__name__


def _merge_delta(fields: dict[str, Any], delta: Mapping[str, Any]) -> None:
    for key, value in delta.items():
        if key == "role":
            # Some servers repeat the role on every delta; it must not concatenate.
            _merge_first(fields, key, value)
        elif key == "content":
            _merge_field(fields, key, _content_text(value))
        elif key == "tool_calls" and value is not None:
            _merge_tool_calls(_slot_of(fields, key, _Calls), value)
        elif key == "function_call" and value is not None:
            _merge_function(_slot_of(fields, key, _Merged), value)
        else:
            _merge_any(fields, key, value)


def _merge_any(target: dict[str, Any], key: str, value: Any) -> None:
    """A delta field with no rule of its own: objects merge member by member, lists extend.

    ``audio`` comes as ``{id, expires_at}`` once and ``data``/``transcript`` in pieces,
    ``annotations`` a few at a time: taking the last fragment kept only the tail.
    """
    if isinstance(value, Mapping):
        merged = _slot_of(target, key, _Merged)
        for name, item in value.items():
            if name in _FIRST_WINS:
                _merge_first(merged, name, item)
            else:
                _merge_any(merged, name, item)
    elif isinstance(value, list):
        _slot_of(target, key, _Items).extend(value)
    else:
        _merge_field(target, key, value)


# Members that name a thing rather than carry its text: repeated, they must not concatenate.
_FIRST_WINS = frozenset({"id", "type", "name", "index"})


def _content_text(value: Any) -> str | None:
    if value is None or isinstance(value, str):
        return value
    if isinstance(value, list):
        return parts_text(value)
    raise ValueError(f"malformed stream chunk: delta content is {_type(value)}")


def parts_text(parts: list[Any]) -> str:
    """The text of content parts (Mistral sends ``[{"type": "text", "text": ...}]``)."""
    texts = []
    for part in parts:
        if isinstance(part, str):
            texts.append(part)
        elif (
            isinstance(part, Mapping)
            and part.get("type", "text") == "text"
            and isinstance(part.get("text"), str)
        ):
            texts.append(part["text"])
    return "".join(texts)


def _merge_tool_calls(calls: _Calls, deltas: Any) -> None:
    if not isinstance(deltas, list):
        raise ValueError(f"malformed stream chunk: tool_calls is {_type(deltas)}, not a list")
    for delta in deltas:
        delta = _object(delta, "tool call delta")
        call = calls.setdefault(_call_index(calls, delta), _Merged())
        for key, value in delta.items():
            if key in ("id", "type"):
                _merge_first(call, key, value)
            elif key == "function" and value is not None:
                _merge_function(_slot_of(call, key, _Merged), value)
            elif key != "index":
                _merge_last(call, key, value)


def _call_index(calls: _Calls, delta: Mapping[str, Any]) -> int:
    """A tool call delta's ``index``.

    OpenAI always sends one; without it, a new ``id`` starts a call and a
    fragment without an ``id`` continues the last one.
    """
    index = delta.get("index")
    if isinstance(index, int) and not isinstance(index, bool):
        return index
    if index is not None:
        raise ValueError(f"malformed stream chunk: tool call index is {_type(index)}")
    call_id = delta.get("id")
    if call_id is None:
        return max(calls, default=0)
    known = [i for i, call in calls.items() if call.get("id") == call_id]
    return known[0] if known else max(calls, default=-1) + 1


def _merge_function(target: _Merged, fragment: Any) -> None:
    """A tool call's function or a legacy ``function_call``: name once, arguments concatenated."""
    for key, value in _object(fragment, "function delta").items():
        if key == "name":
            _merge_first(target, key, value)
        else:
            _merge_field(target, key, value)


def _merge_logprobs(extras: dict[str, Any], value: Any) -> None:
    """Chat ``content``/``refusal`` and legacy ``tokens``... lists concatenate across chunks."""
    if type(value) is not dict and not isinstance(value, Mapping):
        _merge_last(extras, "logprobs", value)
        return
    merged = _slot_of(extras, "logprobs", _Merged)
    for key, item in value.items():
        if isinstance(item, list):
            _slot_of(merged, key, _Items).extend(item)
        else:
            _merge_last(merged, key, item)


def _merge_field(target: dict[str, Any], key: str, value: Any) -> None:
    """Strings concatenate; other values as ``_merge_last``."""
    if isinstance(value, str):
        _slot_of(target, key, _Text).append(value)
    else:
        _merge_last(target, key, value)


def _merge_last(target: dict[str, Any], key: str, value: Any) -> None:
    """The last non-null value wins; a field only ever sent as null stays null."""
    if value is not None or key not in target:
        target[key] = value


def _merge_first(target: dict[str, Any], key: str, value: Any) -> None:
    """The first non-null value wins (role, a tool call's id, type and name)."""
    if target.get(key) is None:
        target[key] = value


def _slot_of(target: dict[str, Any], key: str, kind: type[_T]) -> _T:
    """``target[key]`` as a ``kind`` accumulator, replacing a null or foreign value."""
    value = target.get(key)
    if not isinstance(value, kind):
        value = target[key] = kind()
    return value


def _joined(pieces: list[str]) -> str:
    """String pieces joined, with a surrogate pair split between two pieces made one character.

    A server that cuts text by UTF-16 units sends an emoji's halves in two chunks; left
    apart, the text cannot be encoded and the cache stored two U+FFFD for the emoji.
    """
    text = "".join(pieces)
    if len(pieces) < 2 or _PAIR.search(text) is None:
        return text
    return _PAIR.sub(
        lambda m: m.group().encode("utf-16-le", "surrogatepass").decode("utf-16-le"), text
    )


def _settled(value: Any) -> Any:
    """An accumulated value as plain JSON."""
    if isinstance(value, _Text):
        return _joined(value)
    if isinstance(value, _Items):
        return list(value)
    if isinstance(value, _Calls):
        return [_settled(call) for _, call in sorted(value.items())]
    if isinstance(value, _Merged):
        return {k: _settled(v) for k, v in value.items()}
    return value


def _message(fields: dict[str, Any]) -> dict[str, Any]:
    # A non-streamed message always has both; content is null when no text arrived.
    message = {
        "role": fields.get("role") or "assistant",
        "content": _settled(fields.get("content")),
    }
    message.update((k, _settled(v)) for k, v in fields.items() if k not in message)
    return message


def replay_chunks(
    completion: Mapping[str, Any],
    kind: str = "chat",
    include_usage: bool = True,
    piece_chars: int = 0,
) -> Iterator[dict[str, Any]]:
    """The chunks a stream of ``completion`` would have carried (for answering a stream from cache).

    ``ChunkAssembler`` turns them back into ``completion``'s choices. ``piece_chars``
    > 0 splits each string (text, arguments, refusal...) into pieces of that many
    characters; logprobs travel with the piece their tokens start in.
    """
    base = {
        "id": completion.get("id", ""),
        "object": "chat.completion.chunk" if kind == "chat" else "text_completion",
        "created": completion.get("created", 0),
        "model": completion.get("model", ""),
    }
    # Present even as null: OpenAI sends ``"system_fingerprint": null`` in every chunk too.
    base.update((key, completion[key]) for key in _EVERY_CHUNK if key in completion)
    # Fields of the answer itself (Azure's prompt_filter_results...) go once, in the first chunk.
    head = {k: v for k, v in completion.items() if k not in _REPLAY_OWN}
    usage = completion.get("usage") if include_usage else None
    # As OpenAI streams with include_usage: "usage": null in every chunk but the last.
    pending = {"usage": None} if isinstance(usage, Mapping) else {}
    for choice in completion.get("choices") or ():
        if isinstance(choice, Mapping):  # a stored body's non-object choice has nothing to replay
            for body in _replayed_choice(choice, kind == "chat", piece_chars):
                yield {**base, "choices": [body], **head, **pending}
                head = {}
    if isinstance(usage, Mapping):
        yield {**base, "choices": [], "usage": dict(usage)}


# What ``replay_chunks`` puts in every chunk, or in chunks of its own.
_REPLAY_OWN = frozenset({"id", "object", "created", "model", "choices", "usage", *_EVERY_CHUNK})

# One chunk's choice fields (its delta, or its text) and the logprobs that go with them.
_Part: TypeAlias = tuple[dict[str, Any], dict[str, Any] | None]


def _replayed_choice(choice: Mapping[str, Any], chat: bool, size: int) -> list[dict[str, Any]]:
    """The chunk choices of one choice; the last carries the finish reason, first and last its other fields."""
    logprobs = choice.get("logprobs")
    spread = dict(logprobs) if isinstance(logprobs, Mapping) else {}
    parts = (
        _message_parts(choice.get("message"), spread, size)
        if chat
        else _text_parts(choice.get("text"), spread, size)
    )
    extras = {
        k: v
        for k, v in choice.items()
        if k not in ("index", "message", "text", "delta", "logprobs", "finish_reason")
    }
    final: dict[str, Any] = {"delta": {}} if chat else {"text": ""}
    # A null finish reason stays null: the whole answer replayed says so too.
    parts.append(({**final, "finish_reason": choice.get("finish_reason"), **extras}, None))
    bodies = []
    for n, (fields, piece_logprobs) in enumerate(parts):
        body = {"index": choice.get("index", 0), **fields}
        if isinstance(logprobs, Mapping):
            # What was not spread over the pieces (e.g. ``"refusal": null``) goes first.
            body["logprobs"] = {**spread, **(piece_logprobs or {})} if n == 0 else piece_logprobs
        elif "logprobs" in choice:
            body["logprobs"] = logprobs
        body.setdefault("finish_reason", None)
        bodies.append(body)
    if extras and len(bodies) > 1:
        # Also on the first chunk: the OpenAI SDK's stream helpers keep a choice's own
        # fields (vLLM's stop_reason, Azure's content_filter_results) from its first.
        bodies[0].update((k, v) for k, v in extras.items() if k not in bodies[0])
    return bodies


def _message_parts(message: Any, spread: dict[str, Any], size: int) -> list[_Part]:
    """A message as deltas: role first (with null fields), other fields, content, tool calls."""
    message = message if isinstance(message, Mapping) else {}
    text = _replayed_text(message.get("content"))
    # OpenAI's first delta: role, content "" for a text answer (null otherwise), null fields.
    head: dict[str, Any] = {"role": message.get("role") or "assistant"}
    head["content"] = None if text is None else ""
    head.update((k, None) for k, v in message.items() if v is None and k not in head)
    deltas: list[_Part] = [(head, None)]
    for key, value in message.items():
        if key in _SPECIAL or value is None:
            continue
        if isinstance(value, str):
            deltas += _string_parts(key, value, spread, size)
        else:
            deltas.append(({key: value}, None))
    if text:
        deltas += _string_parts("content", text, spread, size)
    calls = message.get("tool_calls")
    # vLLM answers text with ``"tool_calls": []``; no call to stream, but the list is the answer's.
    deltas += _tool_call_parts(calls, size) if calls != [] else [({"tool_calls": []}, None)]
    function_call = message.get("function_call")
    if isinstance(function_call, Mapping):
        deltas += [({"function_call": f}, None) for f in _function_parts(function_call, size)]
    return [({"delta": delta}, piece_logprobs) for delta, piece_logprobs in deltas]


def _replayed_text(content: Any) -> str | None:
    if isinstance(content, list):
        return parts_text(content)
    return content if isinstance(content, str) else None


def _string_parts(key: str, value: str, spread: dict[str, Any], size: int) -> list[_Part]:
    """A string field in pieces; chat logprobs of the same name (content, refusal) go along."""
    pieces = list(_pieces(value, size)) or [""]
    entries = spread.get(key)
    if not isinstance(entries, list):
        return [({key: piece}, None) for piece in pieces]
    del spread[key]
    tokens = [e.get("token") if isinstance(e, Mapping) else None for e in entries]
    cut = _spread({key: entries}, tokens, pieces)
    return [({key: piece}, lp) for piece, lp in zip(pieces, cut, strict=True)]


def _text_parts(text: Any, spread: dict[str, Any], size: int) -> list[_Part]:
    """A legacy choice's text in pieces, each with its share of the per-token logprobs lists."""
    pieces = list(_pieces(text if isinstance(text, str) else "", size))
    tokens = spread.get("tokens")
    if not pieces or not isinstance(tokens, list):
        return [({"text": piece}, None) for piece in pieces]
    lists = {
        key: spread.pop(key)
        for key in _TOKEN_LISTS
        if isinstance(spread.get(key), list) and len(spread[key]) == len(tokens)
    }
    return [({"text": p}, lp) for p, lp in zip(pieces, _spread(lists, tokens, pieces), strict=True)]


def _spread(
    lists: dict[str, list[Any]], tokens: list[Any], pieces: list[str]
) -> list[dict[str, Any] | None]:
    """Per piece, the slice of each list for the tokens that start in it; the first gets one always."""
    ranges = _token_ranges(tokens, pieces)
    return [
        {key: items[r.start : r.stop] for key, items in lists.items()} if r or n == 0 else None
        for n, r in enumerate(ranges)
    ]


def _token_ranges(tokens: list[Any], pieces: list[str]) -> list[range]:
    """Which tokens each piece carries: those starting inside it.

    Tokens that do not spell the text (byte fragments of a character, say) all
    go with the first piece, so none is lost.
    """
    count = len(tokens)
    if not all(isinstance(t, str) for t in tokens) or "".join(tokens) != "".join(pieces):
        return [range(count)] + [range(count, count)] * (len(pieces) - 1)
    ends = list(accumulate(len(piece) for piece in pieces))
    owners, offset = [], 0
    for token in tokens:
        owners.append(min(bisect_right(ends, offset), len(pieces) - 1))
        offset += len(token)
    return [range(bisect_left(owners, n), bisect_right(owners, n)) for n in range(len(pieces))]


def _tool_call_parts(calls: Any, size: int) -> list[_Part]:
    """Each tool call as OpenAI streams it: index, id, type and name first, then arguments."""
    if not isinstance(calls, list):
        return []
    parts: list[_Part] = []
    for index, call in enumerate(c for c in calls if isinstance(c, Mapping)):
        head = {"index": index, **{k: v for k, v in call.items() if k not in ("index", "function")}}
        function = call.get("function")
        if not isinstance(function, Mapping):
            if "function" in call:
                head["function"] = function
            parts.append(({"tool_calls": [head]}, None))
            continue
        first, *rest = _function_parts(function, size)
        parts.append(({"tool_calls": [{**head, "function": first}]}, None))
        parts += [({"tool_calls": [{"index": index, "function": f}]}, None) for f in rest]
    return parts


def _function_parts(function: Mapping[str, Any], size: int) -> list[dict[str, Any]]:
    """A function's name (and other fields) with empty arguments, then argument fragments."""
    arguments = function.get("arguments")
    if not isinstance(arguments, str):
        return [dict(function)]
    head = {**function, "arguments": ""}
    return [head, *({"arguments": piece} for piece in _pieces(arguments, size))]


def _pieces(text: str, size: int) -> Iterator[str]:
    if not text:
        return
    if size <= 0:
        yield text
        return
    for start in range(0, len(text), size):
        yield text[start : start + size]
