"""Reading one output field's text the way a model actually wrote it.

Pure functions: DSPy's own ``parse_value`` gets the cleaned text first; when it
refuses, simple types get a tolerant reading (numbers inside prose, yes/no,
bullet lists). What still cannot be read raises ``ValueError``.
"""

from __future__ import annotations

import ast
import json
import re
import types
from typing import Any, Literal, Union, get_args, get_origin

from ._compat import parse_value

_FENCE = re.compile(r"^```[\w+.-]*[ \t]*\n?(.*?)\n?```$", re.DOTALL)
_QUOTES = (('"', '"'), ("'", "'"), ("`", "`"), ("\u201c", "\u201d"), ("\u2018", "\u2019"))
_EMPHASIS = ("**", "__", "*")
_NUMBER = r"[-+]?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][-+]?\d+)?"
_NUMBER_RE = re.compile(_NUMBER)
# "3/5", "3 / 5", "3 out of 5": the score is the first number.
_RATIO_RE = re.compile(rf"({_NUMBER})\s*(?:/|out of)\s*{_NUMBER}", re.IGNORECASE)
_LABEL_RE = re.compile(r"^[A-Za-z][\w \-]{0,40}:\s*")
_BULLET_RE = re.compile(r"^\s*(?:[-*\u2022+]|\d+[.)])\s+(.*\S)\s*$")
_TRUE = frozenset({"true", "yes", "y", "t", "1", "correct", "right"})
_FALSE = frozenset({"false", "no", "n", "f", "0", "incorrect", "wrong"})
_NONE = frozenset({"", "none", "null", "nil", "n/a", "na", "-"})


def clean(text: str) -> str:
    """Strip code fences, surrounding quotes and emphasis until nothing changes."""
    text = text.strip()
    while True:
        before = text
        fence = _FENCE.match(text)
        if fence:
            text = fence.group(1).strip()
        text = _unwrap(text, _QUOTES)
        text = _unwrap(text, tuple((mark, mark) for mark in _EMPHASIS))
        if text == before:
            return text


def _unwrap(text: str, pairs: tuple[tuple[str, str], ...]) -> str:
    for left, right in pairs:
        inner = text[len(left) : len(text) - len(right)]
        # Only a pair around the whole value: '"a" and "b"' keeps its quotes.
        if (
            len(text) > len(left) + len(right)
            and text.startswith(left)
            and text.endswith(right)
            and left not in inner
            and right not in inner
        ):
            return inner.strip()
    return text


def unwrap_optional(annotation: Any) -> tuple[Any, bool]:
    """``(X, True)`` for ``Optional[X]`` / ``X | None``; else ``(annotation, False)``."""
    if get_origin(annotation) in (Union, types.UnionType):
        args = get_args(annotation)
        rest = [arg for arg in args if arg is not type(None)]
        if len(rest) == 1 and len(rest) < len(args):
            return rest[0], True
    return annotation, False


def allows_none(annotation: Any) -> bool:
    """Whether ``None`` is a valid value for ``annotation``."""
    if annotation is None or annotation is type(None):
        return True
    return get_origin(annotation) in (Union, types.UnionType) and type(None) in get_args(annotation)


def parse_field(text: str, annotation: Any) -> Any:
    """The value of one field: DSPy's reading of the cleaned text, else a tolerant one."""
    cleaned = clean(text)
    inner, optional = unwrap_optional(annotation)
    if optional and cleaned.lower().rstrip(".") in _NONE:
        return None
    if parse_value is not None:
        try:
            return parse_value(cleaned, annotation)
        except (ValueError, TypeError):
            pass  # DSPy is strict; the readings below are the tolerant part
    return tolerant(cleaned, inner)


def tolerant(text: str, annotation: Any) -> Any:
    """Read ``text`` as a bool, int, float, Literal or list of those; ``ValueError`` otherwise."""
    if annotation is str:
        return text
    if annotation is bool:
        return read_bool(text)
    if annotation is int:
        return read_int(text)
    if annotation is float:
        return read_float(text)
    origin = get_origin(annotation)
    if origin is Literal:
        return read_literal(text, get_args(annotation))
    if origin in (list, tuple, set, frozenset):
        args = get_args(annotation)
        items = [parse_field(item, args[0] if args else str) for item in read_items(text)]
        return items if origin is list else origin(items)
    raise ValueError(f"cannot read {text[:80]!r} as {annotation!r}")


def read_number(text: str) -> float:
    """The number a value means: the whole text, ``N/M`` or ``N out of M``, else the first number."""
    body = _LABEL_RE.sub("", text, count=1).strip()
    candidates = (body, *(m.group(1) for m in _RATIO_RE.finditer(body)))
    for candidate in candidates:
        try:
            return float(candidate)
        except ValueError:
            continue
    found = _NUMBER_RE.search(body)
    if found is None:
        raise ValueError(f"no number in {text[:80]!r}")
    return float(found.group())


def read_int(text: str) -> int:
    """An integer, also from prose ("Score: 3/5" is 3); a fractional number is an error."""
    value = read_number(text)
    if not value.is_integer():
        raise ValueError(f"{value} in {text[:80]!r} is not a whole number")
    return int(value)


def read_float(text: str) -> float:
    """A number, also from prose ("confidence about 0.8")."""
    return read_number(text)


def read_bool(text: str) -> bool:
    """yes/no/true/false (and similar), as the first word after any ``Label:``."""
    body = _LABEL_RE.sub("", text, count=1).strip()
    word = body.split(maxsplit=1)[0].strip(".,;:!?*\"'`()").lower() if body else ""
    if word in _TRUE:
        return True
    if word in _FALSE:
        return False
    raise ValueError(f"cannot read {text[:80]!r} as a boolean")


def read_literal(text: str, options: tuple[Any, ...]) -> Any:
    """The option ``text`` names, ignoring case, or the one its first word names."""
    by_name = {str(option).lower(): option for option in options}
    lowered = text.lower().strip(" .")
    if lowered in by_name:
        return by_name[lowered]
    first = lowered.split(maxsplit=1)[0].strip(".,;:!?*\"'`()") if lowered else ""
    if first in by_name:
        return by_name[first]
    raise ValueError(f"{text[:80]!r} is not one of {list(options)!r}")


def read_items(text: str) -> list[str]:
    """List items from JSON, a Python literal, bullet or numbered lines, lines, or commas."""
    for load in (json.loads, ast.literal_eval):
        try:
            value = load(text)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            continue
        if isinstance(value, list | tuple | set):
            return [item if isinstance(item, str) else json.dumps(item) for item in value]
    lines = [line for line in text.splitlines() if line.strip()]
    bullets = [m.group(1) for m in map(_BULLET_RE.match, lines) if m]
    if bullets:
        return bullets
    if len(lines) > 1:
        return [line.strip() for line in lines]
    if not text:
        return []
    return [part.strip() for part in text.split(",") if part.strip()]
