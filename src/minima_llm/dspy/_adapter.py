"""``TolerantChatAdapter``: DSPy's ChatAdapter with a parser for what models really write.

DSPy's parse runs first and wins whenever it succeeds. Otherwise the completion
is split again, accepting headers with odd spacing, case or markdown
(``**[[ ## answer ## ]]**``, ``[[## Answer ##]]``, ``## answer``), and, when
that still misses fields, ``Answer: ...`` labels; the ``completed`` marker may
be missing. Each value is then read by :func:`parse_field`.
"""

from __future__ import annotations

import re
import weakref
from typing import Any

from ._coerce import allows_none, parse_field
from ._compat import AdapterParseError, ChatAdapter, History, expand_markers

_NAME = r"([A-Za-z_][\w \-]*?)"
# [[ ## name ## ]] with any spacing, any number of #, and markdown around it.
_MARKER = re.compile(rf"^[\s*_#>`]*\[\[\s*#*\s*{_NAME}\s*#*\s*\]\][*_`:\s]*(.*)$")
# A markdown heading that is nothing but a field name: "## Answer", "### **answer:**".
_HEADING = re.compile(rf"^\s*#{{1,6}}\s*[*_]*\s*{_NAME}\s*[*_]*\s*:?\s*[*_]*\s*$")
# "Answer: 3", "**Answer:** 3", "**answer**: 3".
_LABEL = re.compile(rf"^\s*[*_]*\s*{_NAME}\s*[*_]*\s*:\s*[*_]*\s*(.*)$")
_COMPLETED = "completed"
_CLOSED = ""  # a header whose section nobody reads

_dspy_parse = getattr(ChatAdapter.parse, "__wrapped__", ChatAdapter.parse)
_dspy_format = getattr(ChatAdapter.format, "__wrapped__", ChatAdapter.format)
# DSPy's own header pattern, for the fast path that must split exactly as DSPy does.
_DSPY_HEADER = re.compile(r"\[\[ ## (\w+) ## \]\]")
_INT = re.compile(r"-?(?:0|[1-9]\d*)")
_FLOAT = re.compile(r"-?(?:0|[1-9]\d*)(?:\.\d+)?")
_BOOLS = {"True": True, "true": True, "False": False, "false": False}
_SKIP = object()


def _plain(text: str, annotation: Any) -> Any:
    """A value DSPy would read the same way, read without pydantic; ``_SKIP`` otherwise."""
    if annotation is str:
        return text
    if annotation is int and _INT.fullmatch(text):
        return int(text)
    if annotation is float and _FLOAT.fullmatch(text):
        return float(text)
    if annotation is bool and text in _BOOLS:
        return _BOOLS[text]
    return _SKIP


def fast_parse(
    signature: Any, completion: str, fields: dict[str, Any] | None = None
) -> dict[str, Any] | None:
    """DSPy's parse for the common case, without its per-field pydantic adapters.

    Only canonical completions whose fields are all plain ``str``/``int``/
    ``float``/``bool`` literals; there the result equals DSPy's (a test holds the
    two side by side). Anything else returns None and goes to DSPy.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in completion.splitlines():
        match = _DSPY_HEADER.match(line.strip())
        if match is None:
            if current is not None:
                current.append(line)
            continue
        name = match.group(1)
        rest = line[match.end() :].strip()
        current = None if name in sections else sections.setdefault(name, [rest] if rest else [])
    if fields is None:
        fields = signature.output_fields
    values: dict[str, Any] = {}
    for name, info in fields.items():
        lines = sections.get(name)
        value = _SKIP if lines is None else _plain("\n".join(lines).strip(), info.annotation)
        if value is _SKIP:
            return None
        values[name] = value
    return values


def _key(name: str) -> str:
    return re.sub(r"[\s\-]+", "_", name.strip()).lower()


def split_sections(completion: str, names: dict[str, str], labels: bool = False) -> dict[str, str]:
    """The text under each known field header, first occurrence wins.

    ``names`` maps lower-cased field names to field names. With ``labels``,
    ``Name: value`` lines start a field too.
    """
    sections: dict[str, list[str]] = {}
    current: list[str] | None = None
    for line in completion.splitlines():
        header = _header(line, names, labels)
        if header is None:
            if current is not None:
                current.append(line)
            continue
        name, rest = header
        if name == _CLOSED or name in sections:
            current = None  # later repeats and the end marker carry nothing we keep
            continue
        current = sections[name] = [rest] if rest.strip() else []
    return {name: "\n".join(lines).strip() for name, lines in sections.items()}


def _header(line: str, names: dict[str, str], labels: bool) -> tuple[str, str] | None:
    marker = _MARKER.match(line)
    if marker:
        key = _key(marker.group(1))
        if key in names:
            return names[key], marker.group(2)
        return _CLOSED, ""  # completed, an echoed input field, or a field we do not know
    heading = _HEADING.match(line)
    if heading:
        key = _key(heading.group(1))
        if key == _COMPLETED or key in names:
            return names.get(key, _CLOSED), ""
    if labels:
        label = _LABEL.match(line)
        if label and _key(label.group(1)) in names:
            return names[_key(label.group(1))], label.group(2)
    return None


class TolerantChatAdapter(ChatAdapter):  # type: ignore[misc]
    """A ChatAdapter that also reads messy field markers and values.

    DSPy's JSON-adapter fallback is off by default: it would spend a second
    call on a differently shaped prompt, while ``run_dspy_batch`` re-samples
    the same prompt instead. What cannot be read raises ``AdapterParseError``
    carrying the completion.
    """

    def __init__(self, *, use_json_adapter_fallback: bool = False, **kwargs: Any) -> None:
        super().__init__(use_json_adapter_fallback=use_json_adapter_fallback, **kwargs)
        self._system: weakref.WeakKeyDictionary[Any, tuple[Any, str]] = weakref.WeakKeyDictionary()
        self._requirements: weakref.WeakKeyDictionary[Any, str] = weakref.WeakKeyDictionary()
        self._plain: weakref.WeakKeyDictionary[Any, bool] = weakref.WeakKeyDictionary()
        self._fields: weakref.WeakKeyDictionary[Any, tuple[Any, Any]] = weakref.WeakKeyDictionary()

    def fields_of(self, signature: Any) -> tuple[dict[str, Any], dict[str, Any]]:
        """A signature's input and output fields, read once per signature.

        DSPy rebuilds both mappings from pydantic on every access, several times
        per call; a signature class never changes them (DSPy derives a new class).
        """
        known = self._fields.get(signature)
        if known is None:
            known = self._fields[signature] = (
                dict(signature.input_fields),
                dict(signature.output_fields),
            )
        return known

    def format(self, signature: Any, demos: list[dict[str, Any]], inputs: dict[str, Any]) -> Any:
        """DSPy's messages; without demos or a conversation history, built without its per-call scans.

        The messages are DSPy's (a test holds the two side by side), so both
        adapters share cache keys.
        """
        if demos or expand_markers is None or not self._plain_inputs(signature):
            return _dspy_format(self, signature, demos, inputs)
        messages = [{"role": "system", "content": self.format_system_message(signature)}]
        content = self.format_user_message_content(signature, dict(inputs), main_request=True)
        if content:
            messages.append(expand_markers({"role": "user", "content": content}))
        return messages

    def _plain_inputs(self, signature: Any) -> bool:
        """Whether no input field is a DSPy ``History`` (which DSPy turns into extra turns)."""
        known = self._plain.get(signature)
        if known is None:
            fields = signature.input_fields.values()
            known = self._plain[signature] = all(info.annotation != History for info in fields)
        return known

    def format_system_message(self, signature: Any) -> str:
        """DSPy's system message, built once per signature and instructions.

        DSPy rebuilds it on every call (pydantic JSON schemas for each field), which
        costs more than a cached answer does.
        """
        # DSPy's instructions are the cleaned-up docstring: the raw one tells a change
        # apart without cleaning it up on every call.
        doc = getattr(signature, "__doc__", None)
        known = self._system.get(signature)
        if known is not None and known[0] == doc:
            return known[1]
        message = str(super().format_system_message(signature))
        self._system[signature] = (doc, message)
        return message

    def user_message_output_requirements(self, signature: Any) -> str:
        """DSPy's reminder of the output format, built once per signature.

        It depends on the output fields alone, which a signature class never
        changes (DSPy derives a new class instead), yet DSPy rebuilds it per call.
        """
        known = self._requirements.get(signature)
        if known is None:
            known = str(super().user_message_output_requirements(signature))
            self._requirements[signature] = known
        return known

    def format_user_message_content(
        self,
        signature: Any,
        inputs: dict[str, Any],
        prefix: str = "",
        suffix: str = "",
        main_request: bool = False,
    ) -> str:
        """DSPy's user message; plain-string inputs skip its per-value pydantic round trip.

        The text is the same as DSPy's (a test holds the two side by side), so
        both adapters share cache keys.
        """
        names = [name for name in self.fields_of(signature)[0] if name in inputs]
        if not all(type(inputs[name]) is str for name in names):
            return str(
                super().format_user_message_content(signature, inputs, prefix, suffix, main_request)
            )
        parts = [prefix, *(f"[[ ## {name} ## ]]\n{inputs[name]}" for name in names)]
        if main_request:
            requirements = self.user_message_output_requirements(signature)
            if requirements is not None:
                parts.append(requirements)
        parts.append(suffix)
        return "\n\n".join(parts).strip()

    def parse(self, signature: Any, completion: str) -> dict[str, Any]:
        """DSPy's reading when it succeeds (its common case done without pydantic), else the tolerant one."""
        fast = fast_parse(signature, completion, self.fields_of(signature)[1])
        if fast is not None:
            return fast
        try:
            return dict(_dspy_parse(self, signature, completion))
        except AdapterParseError:
            pass  # the tolerant reading below either succeeds or raises its own error
        return self.parse_tolerant(signature, completion)

    def parse_tolerant(self, signature: Any, completion: str) -> dict[str, Any]:
        """Only the tolerant parse (no DSPy first)."""
        fields = signature.output_fields
        names = {_key(name): name for name in fields}
        sections = split_sections(completion, names)
        if _missing(fields, sections):
            labelled = split_sections(completion, names, labels=True)
            sections = {**labelled, **sections}
        values: dict[str, Any] = {}
        for name, text in sections.items():
            try:
                values[name] = parse_field(text, fields[name].annotation)
            except ValueError as exc:
                raise AdapterParseError(
                    adapter_name=type(self).__name__,
                    signature=signature,
                    lm_response=completion,
                    message=f"Failed to parse field {name} with value {text[:200]!r}: {exc}",
                ) from exc
        missing = _missing(fields, values)
        if missing:
            raise AdapterParseError(
                adapter_name=type(self).__name__,
                signature=signature,
                lm_response=completion,
                message=f"Missing output fields: {', '.join(missing)}",
                parsed_result=values,
            )
        return {name: values[name] if name in values else _default(fields[name]) for name in fields}


def _missing(fields: dict[str, Any], found: dict[str, Any]) -> list[str]:
    """Required fields not in ``found``; optional ones and those with defaults may be absent."""
    return [
        name
        for name, info in fields.items()
        if name not in found and info.is_required() and not allows_none(info.annotation)
    ]


def _default(info: Any) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)
