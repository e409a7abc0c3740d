"""The mock server's DSPy reply mode: format detection, typed values, test hooks."""

from __future__ import annotations

from typing import Any, Literal

import aiohttp
import dspy
import pytest

from minima_llm.testing import MockServer
from minima_llm.testing._dspy_replies import GARBAGE, DSPyReplies, output_fields, value_for


class Everything(dspy.Signature):
    question: str = dspy.InputField()
    text: str = dspy.OutputField()
    count: int = dspy.OutputField()
    ratio: float = dspy.OutputField()
    flag: bool = dspy.OutputField()
    items: list[int] = dspy.OutputField()
    choice: Literal["red", "blue"] = dspy.OutputField()
    maybe: float | None = dspy.OutputField()
    mapping: dict[str, int] = dspy.OutputField()


def dspy_messages(adapter: Any, question: str) -> list[tuple[str, str]]:
    formatted = adapter.format(Everything, demos=[], inputs={"question": question})
    return [(m["role"], m["content"]) for m in formatted]


def test_output_fields_are_read_from_the_system_message() -> None:
    system = dspy_messages(dspy.ChatAdapter(), "q")[0][1]
    assert output_fields(system) == [
        ("text", "str"),
        ("count", "int"),
        ("ratio", "float"),
        ("flag", "bool"),
        ("items", "list[int]"),
        ("choice", "Literal['red', 'blue']"),
        ("maybe", "Union[float, NoneType]"),
        ("mapping", "dict[str, int]"),
    ]
    assert output_fields("You are a helpful assistant.") is None


@pytest.mark.parametrize("adapter", [dspy.ChatAdapter(), dspy.JSONAdapter()])
def test_replies_parse_with_dspys_own_adapters(adapter: Any) -> None:
    replies = DSPyReplies()
    text = replies.reply(dspy_messages(adapter, "what?"), {})
    assert text is not None
    parsed = adapter.parse(Everything, text)
    assert isinstance(parsed["count"], int) and 1 <= parsed["count"] <= 5
    assert isinstance(parsed["flag"], bool) and isinstance(parsed["ratio"], float)
    assert len(parsed["items"]) == 2 and parsed["choice"] in ("red", "blue")
    assert parsed["mapping"] == {} and parsed["text"].startswith("mock text")
    assert replies.reply(dspy_messages(adapter, "what?"), {}) == text  # deterministic
    assert replies.reply(dspy_messages(adapter, "other"), {}) != text


def test_values_depend_on_type_name_and_prompt() -> None:
    assert value_for("Optional[int]", "n", b"x") == value_for("int", "n", b"x")
    assert value_for("Literal[3]", "n", b"x") == 3
    assert isinstance(value_for("SomeModel", "n", b"x"), str)


def test_other_prompts_are_left_alone() -> None:
    replies = DSPyReplies()
    assert replies.reply([("user", "hello")], {}) is None
    assert replies.reply([("system", "Be brief."), ("user", "hello")], {}) is None


def test_unparseable_and_flaky_hooks() -> None:
    replies = DSPyReplies()
    bad = dspy_messages(dspy.ChatAdapter(), "UNPARSEABLE please")
    assert replies.reply(bad, {}) == replies.reply(bad, {"seed": 5}) == GARBAGE
    flaky = dspy_messages(dspy.ChatAdapter(), "FLAKY-2 please")
    kinds = [
        replies.reply(flaky, variant) == GARBAGE
        for variant in ({}, {}, {"temperature": 0.1, "seed": 1}, {"seed": 2}, {})
    ]
    assert kinds == [True, True, True, False, True]  # a variant keeps its kind
    replies.reset()
    assert replies.reply(flaky, {"seed": 2}) == GARBAGE  # first variant seen after the reset


async def test_the_server_answers_dspy_prompts_and_resets_its_variants(mock: MockServer) -> None:
    messages = [{"role": r, "content": c} for r, c in dspy_messages(dspy.ChatAdapter(), "FLAKY-1")]

    async def ask(**params: Any) -> str:
        body = {"model": "m", "messages": messages, "max_tokens": 1000, **params}
        async with (
            aiohttp.ClientSession() as session,
            session.post(mock.url + "/chat/completions", json=body) as response,
        ):
            return str((await response.json())["choices"][0]["message"]["content"])

    assert await ask() == GARBAGE
    assert await ask() == GARBAGE  # the same variant again
    assert (await ask(seed=1)).startswith("[[ ## text ## ]]\nmock text")
    mock.reset()
    assert await ask(seed=1) == GARBAGE  # the server forgot the variants it had seen
    assert mock.stats()["requests"] == 1
