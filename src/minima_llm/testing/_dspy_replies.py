"""Replies to DSPy prompts in the format DSPy asked for, so DSPy programs run against the mock.

A prompt is DSPy's when its system message lists ``Your output fields are:``.
The ChatAdapter's (``[[ ## completed ## ]]`` in the system message) is answered
with ``[[ ## name ## ]]`` sections, the JSONAdapter's with a JSON object. Each
value is derived from a hash of the last user message, the field name and its
declared type (``str``, ``int``, ``float``, ``bool``, ``list[...]``,
``Literal[...]``, ``Optional[...]``, ``dict[...]``), so answers are repeatable.

Test hooks in the last user message:

- ``UNPARSEABLE``: always a reply without any field marker;
- ``FLAKY-N``: such a reply for the first ``N`` distinct ``(temperature, seed)``
  variants of that message this server has seen, then proper ones. Variants
  are remembered until ``reset``; repeating a variant repeats its answer kind.
"""

from __future__ import annotations

import ast
import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from typing import Any

GARBAGE = "mock: this reply ignores the requested format entirely."
_OUTPUTS_HEAD = "Your output fields are:"
_OUTPUTS_END = "All interactions will be structured"
_CHAT_MARK = "[[ ## completed ## ]]"
_JSON_MARK = "Outputs will be a JSON object"
_FIELD = re.compile(r"^\s*\d+\.\s+`(\w+)`\s+\((.*?)\):", re.MULTILINE)
_OPTIONAL = re.compile(r"^(?:Optional\[(.*)\]|Union\[(.*), NoneType\])$")
_FLAKY = re.compile(r"FLAKY-(\d+)")
_UNPARSEABLE = "UNPARSEABLE"


def output_fields(system: str) -> list[tuple[str, str]] | None:
    """``(name, type)`` of each output field a DSPy system message lists, or None."""
    head = system.find(_OUTPUTS_HEAD)
    if head < 0:
        return None
    section = system[head + len(_OUTPUTS_HEAD) :]
    end = section.find(_OUTPUTS_END)
    return _FIELD.findall(section if end < 0 else section[:end]) or None


def value_for(type_text: str, name: str, digest: bytes) -> Any:
    """A deterministic value of the declared type."""
    seed = int.from_bytes(hashlib.blake2b(digest + name.encode(), digest_size=8).digest(), "big")
    kind = type_text.strip()
    optional = _OPTIONAL.match(kind)
    if optional:
        kind = (optional.group(1) or optional.group(2)).strip()
    if kind == "int":
        return 1 + seed % 5
    if kind == "float":
        return round((seed % 100) / 100, 2)
    if kind == "bool":
        return seed % 2 == 0
    if kind.startswith(("list[", "tuple[", "set[")):
        inner = kind[kind.index("[") + 1 : -1].split(",")[0]
        return [value_for(inner, f"{name}.{i}", digest) for i in range(2)]
    if kind.startswith("Literal["):
        options = ast.literal_eval("[" + kind[len("Literal[") : -1] + "]")
        return options[seed % len(options)] if options else ""
    if kind.startswith("dict["):
        return {}
    return f"mock {name} {seed & 0xFFFFFFFF:08x}"


def render_chat(fields: Sequence[tuple[str, str]], digest: bytes) -> str:
    """A ChatAdapter answer: one ``[[ ## name ## ]]`` section per field, then ``completed``."""
    parts = []
    for name, kind in fields:
        value = value_for(kind, name, digest)
        text = value if isinstance(value, str) else json.dumps(value)
        if isinstance(value, bool):
            text = str(value)
        parts.append(f"[[ ## {name} ## ]]\n{text}")
    parts.append("[[ ## completed ## ]]")
    return "\n\n".join(parts)


def render_json(fields: Sequence[tuple[str, str]], digest: bytes) -> str:
    """A JSONAdapter answer: one JSON object."""
    return json.dumps({name: value_for(kind, name, digest) for name, kind in fields})


class DSPyReplies:
    """Answers DSPy prompts; remembers the ``FLAKY-N`` variants it has seen."""

    def __init__(self) -> None:
        self._variants: dict[bytes, list[tuple[Any, Any]]] = {}

    def __repr__(self) -> str:
        return f"<DSPyReplies flaky_prompts={len(self._variants)}>"

    def reset(self) -> None:
        """Forget every variant seen."""
        self._variants.clear()

    def reply(self, messages: Sequence[tuple[str, str]], payload: Mapping[str, Any]) -> str | None:
        """The reply text for ``(role, content)`` messages, or None when not a DSPy prompt."""
        if not messages or messages[0][0] != "system":
            return None
        system = messages[0][1]
        is_json = _CHAT_MARK not in system and _JSON_MARK in system
        if not (is_json or _CHAT_MARK in system):
            return None
        fields = output_fields(system)
        if fields is None:
            return None
        user = next((text for role, text in reversed(messages) if role == "user"), "")
        digest = hashlib.blake2b(user.encode(), digest_size=16).digest()
        if self._garbage(user, digest, payload):
            return GARBAGE
        return render_json(fields, digest) if is_json else render_chat(fields, digest)

    def _garbage(self, user: str, digest: bytes, payload: Mapping[str, Any]) -> bool:
        if _UNPARSEABLE in user:
            return True
        flaky = _FLAKY.search(user)
        if flaky is None:
            return False
        variant = (payload.get("temperature"), payload.get("seed"))
        seen = self._variants.setdefault(digest, [])
        if variant not in seen:
            seen.append(variant)
        return seen.index(variant) < int(flaky.group(1))
