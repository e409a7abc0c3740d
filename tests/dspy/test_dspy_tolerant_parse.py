"""TolerantChatAdapter against the messy completions real models write."""

from __future__ import annotations

from typing import Any, Literal, Optional

import dspy
import pytest

from minima_llm.dspy._adapter import fast_parse
from minima_llm.dspy._coerce import clean, read_items, read_number
from minima_llm.dspy_adapter import TolerantChatAdapter


class Answer(dspy.Signature):
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Score(dspy.Signature):
    score: int = dspy.OutputField()


class Confidence(dspy.Signature):
    confidence: float = dspy.OutputField()


class Relevant(dspy.Signature):
    relevant: bool = dspy.OutputField()


class Tags(dspy.Signature):
    tags: list[str] = dspy.OutputField()


class Numbers(dspy.Signature):
    nums: list[int] = dspy.OutputField()


class Noted(dspy.Signature):
    note: Optional[str] = dspy.OutputField()  # noqa: UP045 - the spelling DSPy users write
    answer: str = dspy.OutputField()
    weight: float | None = dspy.OutputField()


class Label(dspy.Signature):
    label: Literal["yes", "no", "maybe"] = dspy.OutputField()


class Judged(dspy.Signature):
    reasoning: str = dspy.OutputField()
    score: int = dspy.OutputField()


END = "\n\n[[ ## completed ## ]]"

CASES: list[tuple[str, type, str, dict[str, Any]]] = [
    ("canonical", Answer, "[[ ## answer ## ]]\nParis" + END, {"answer": "Paris"}),
    ("bold marker", Answer, "**[[ ## answer ## ]]**\nParis", {"answer": "Paris"}),
    ("tight capitalised", Answer, "[[## Answer ##]]\nParis", {"answer": "Paris"}),
    ("value on header line", Answer, "[[ ##answer## ]] Paris", {"answer": "Paris"}),
    ("markdown heading", Answer, "## answer\nParis", {"answer": "Paris"}),
    ("bold heading colon", Answer, "### **Answer:**\nParis", {"answer": "Paris"}),
    ("quoted value", Answer, '**[[ ## answer ## ]]**\n"Paris"', {"answer": "Paris"}),
    ("fenced value", Answer, "## answer\n```\nParis\n```", {"answer": "Paris"}),
    ("no completed marker", Answer, "[[ ## answer ## ]]\nParis", {"answer": "Paris"}),
    ("label line", Answer, "Sure!\nAnswer: Paris", {"answer": "Paris"}),
    ("bold label", Answer, "**Answer:** Paris", {"answer": "Paris"}),
    ("echoed input", Answer, "## question\nwhere?\n## answer\nParis", {"answer": "Paris"}),
    ("first of repeats", Answer, "## answer\nParis\n## answer\nLyon", {"answer": "Paris"}),
    ("score in prose", Score, "[[ ## score ## ]]\nScore: 3/5", {"score": 3}),
    ("bold number", Score, "[[ ## score ## ]]\n**4**" + END, {"score": 4}),
    ("out of", Score, "[[ ## score ## ]]\nI would give it a 2 out of 3.", {"score": 2}),
    ("backticked", Score, "[[ ## score ## ]]\n`5`" + END, {"score": 5}),
    ("integral float", Score, "[[ ## score ## ]]\n3.0", {"score": 3}),
    ("colon after marker", Score, "[[ ## score ## ]]: 1", {"score": 1}),
    (
        "float in prose",
        Confidence,
        "[[ ## confidence ## ]]\nabout 0.85, fairly",
        {"confidence": 0.85},
    ),
    ("quoted float", Confidence, "[[ ## confidence ## ]]\n'0.5'", {"confidence": 0.5}),
    ("float label", Confidence, "Confidence: 0.9 (high)", {"confidence": 0.9}),
    ("yes", Relevant, "[[ ## relevant ## ]]\nyes" + END, {"relevant": True}),
    ("no with reason", Relevant, "[[ ## relevant ## ]]\nNo, it is off-topic.", {"relevant": False}),
    ("bold TRUE", Relevant, "[[ ## relevant ## ]]\n**TRUE**", {"relevant": True}),
    ("bool label", Relevant, "Relevant: false", {"relevant": False}),
    ("json list", Tags, '[[ ## tags ## ]]\n["a", "b"]' + END, {"tags": ["a", "b"]}),
    ("python list", Tags, "**[[ ## tags ## ]]**\n['a', 'b']", {"tags": ["a", "b"]}),
    ("bullets", Tags, "[[ ## tags ## ]]\n- apple\n- banana" + END, {"tags": ["apple", "banana"]}),
    ("numbered", Tags, "[[ ## tags ## ]]\n1. apple\n2) banana", {"tags": ["apple", "banana"]}),
    ("commas", Tags, "[[ ## tags ## ]]\napple, banana", {"tags": ["apple", "banana"]}),
    (
        "fenced json",
        Tags,
        '## tags\n```json\n["apple", "banana"]\n```',
        {"tags": ["apple", "banana"]},
    ),
    ("int bullets", Numbers, "[[ ## nums ## ]]\n- 1\n- 2", {"nums": [1, 2]}),
    (
        "optional left out",
        Noted,
        "[[ ## answer ## ]]\nParis" + END,
        {"note": None, "answer": "Paris", "weight": None},
    ),
    (
        "optional null",
        Noted,
        "**[[ ## note ## ]]**\nnull\n**[[ ## answer ## ]]**\nParis\n**[[ ## weight ## ]]**\nN/A",
        {"note": None, "answer": "Paris", "weight": None},
    ),
    (
        "dspy wins when it parses",
        Noted,
        "[[ ## note ## ]]\nN/A\n\n[[ ## answer ## ]]\nParis\n\n[[ ## weight ## ]]\n0.5" + END,
        {"note": "N/A", "answer": "Paris", "weight": 0.5},
    ),
    ("literal case", Label, "[[ ## label ## ]]\nMaybe", {"label": "maybe"}),
    ("literal with reason", Label, "[[ ## label ## ]]\n'yes' - clearly", {"label": "yes"}),
    ("labels", Judged, "Reasoning: because\nScore: 4", {"reasoning": "because", "score": 4}),
    (
        "markers beat labels",
        Judged,
        "**[[ ## reasoning ## ]]**\nScore: 2 in a draft\n**[[ ## score ## ]]**\n4",
        {"reasoning": "Score: 2 in a draft", "score": 4},
    ),
]


@pytest.mark.parametrize(
    ("signature", "completion", "expected"),
    [case[1:] for case in CASES],
    ids=[case[0] for case in CASES],
)
def test_messy_completions_parse(
    signature: type, completion: str, expected: dict[str, Any]
) -> None:
    assert TolerantChatAdapter().parse(signature, completion) == expected


FAILURES: list[tuple[str, type, str]] = [
    ("no number", Score, "[[ ## score ## ]]\nno idea"),
    ("fractional int", Score, "[[ ## score ## ]]\n3.5"),
    ("no fields", Answer, "I cannot answer that."),
    ("not a bool", Relevant, "[[ ## relevant ## ]]\nperhaps"),
    ("not an option", Label, "## label\nunsure"),
    ("one field missing", Judged, "## reasoning\nhmm"),
]


@pytest.mark.parametrize(
    ("signature", "completion"), [case[1:] for case in FAILURES], ids=[c[0] for c in FAILURES]
)
def test_unreadable_completions_raise_with_the_completion(signature: type, completion: str) -> None:
    with pytest.raises(dspy.AdapterParseError) as caught:
        TolerantChatAdapter().parse(signature, completion)
    assert caught.value.lm_response == completion
    assert caught.value.adapter_name == "TolerantChatAdapter"


def test_json_fallback_is_off_unless_asked_for() -> None:
    assert TolerantChatAdapter().use_json_adapter_fallback is False
    assert TolerantChatAdapter(use_json_adapter_fallback=True).use_json_adapter_fallback is True
    assert isinstance(TolerantChatAdapter(), dspy.ChatAdapter)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('"x"', "x"),
        ("**'x'**", "x"),
        ("```python\nx = 1\n```", "x = 1"),
        ('"a" and "b"', '"a" and "b"'),
        ("**bold** and **more**", "**bold** and **more**"),
        ("\u201cx\u201d", "x"),
    ],
)
def test_clean(text: str, expected: str) -> None:
    assert clean(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [("7", 7.0), ("Rating: 4/5", 4.0), ("-2.5e1", -25.0), ("3 out of 4 and then 9", 3.0)],
)
def test_read_number(text: str, expected: float) -> None:
    assert read_number(text) == expected


def test_read_items_keeps_only_bullets_after_a_preamble() -> None:
    assert read_items("Here they are:\n* one\n* two") == ["one", "two"]
    assert read_items("one\ntwo") == ["one", "two"]
    assert read_items("") == []


class Mixed(dspy.Signature):
    """Grade the passage."""

    question: str = dspy.InputField(desc="what was asked")
    passage: str = dspy.InputField()
    top_k: int = dspy.InputField()
    reasoning: str = dspy.OutputField()
    score: int = dspy.OutputField()
    weight: float = dspy.OutputField()
    relevant: bool = dspy.OutputField()


class Chat(dspy.Signature):
    history: dspy.History = dspy.InputField()
    question: str = dspy.InputField()
    answer: str = dspy.OutputField()


class Caption(dspy.Signature):
    picture: dspy.Image = dspy.InputField()
    caption: str = dspy.OutputField()


PROMPTS: list[tuple[type, dict[str, Any], list[dict[str, Any]]]] = [
    (Answer, {"question": "Where?"}, []),
    (Answer, {"question": "multi\nline [[ ## x ## ]] text"}, []),
    (Mixed, {"question": "q", "passage": "p", "top_k": 3}, []),
    (Mixed, {"question": "q", "passage": ["a", "b"], "top_k": 1}, []),
    (Judged, {}, [{"reasoning": "r", "score": 2}]),
    (Answer, {"question": "q"}, [{"question": "demo q", "answer": "demo a"}]),
    (Chat, {"history": dspy.History(messages=[{"question": "hi", "answer": "hello"}])}, []),
    (Caption, {"picture": dspy.Image("https://example.com/cat.png")}, []),  # content blocks
]


@pytest.mark.parametrize(("signature", "inputs", "demos"), PROMPTS)
def test_prompts_are_byte_identical_to_dspys(
    signature: type, inputs: dict[str, Any], demos: list[dict[str, Any]]
) -> None:
    # Same prompt, same cache key: switching between the two adapters reuses the cache.
    tolerant = TolerantChatAdapter()
    for _ in range(2):  # the second call comes from the system-message memo
        assert tolerant.format(signature, demos, inputs) == dspy.ChatAdapter().format(
            signature, demos, inputs
        )


def test_system_message_memo_follows_the_instructions() -> None:
    adapter = TolerantChatAdapter()
    other = Answer.with_instructions("Answer in French.")
    assert "French" in adapter.format_system_message(other)
    assert "French" not in adapter.format_system_message(Answer)

    class Local(dspy.Signature):
        """Answer."""

        question: str = dspy.InputField()
        answer: str = dspy.OutputField()

    assert "German" not in adapter.format_system_message(Local)
    Local.instructions = "Answer in German."  # DSPy rewrites the class's docstring in place
    assert "German" in adapter.format_system_message(Local)


CANONICAL = [
    (Mixed, {"reasoning": "two\nlines", "score": 4, "weight": 0.25, "relevant": True}),
    (Mixed, {"reasoning": "", "score": -3, "weight": 2, "relevant": False}),
    (Mixed, {"reasoning": "see [[ ## score ## ]]", "score": 0, "weight": -0.5, "relevant": True}),
    (Judged, {"reasoning": "  padded  ", "score": 10}),
]


@pytest.mark.parametrize(("signature", "outputs"), CANONICAL)
def test_fast_path_agrees_with_dspy(signature: type, outputs: dict[str, Any]) -> None:
    completion = dspy.ChatAdapter().format_assistant_message_content(signature, outputs)
    expected = dspy.ChatAdapter().parse(signature, completion)
    assert fast_parse(signature, completion) == expected
    assert TolerantChatAdapter().parse(signature, completion) == expected


@pytest.mark.parametrize(
    ("signature", "completion"),
    [
        (Score, "[[ ## score ## ]]\n007"),  # DSPy reads this its own way
        (Score, "[[ ## score ## ]]\n+3"),
        (Relevant, "[[ ## relevant ## ]]\nyes"),
        (Noted, "[[ ## answer ## ]]\nParis"),  # optional fields are DSPy's call
        (Answer, "**[[ ## answer ## ]]**\nParis"),  # not canonical
        (Score, "[[ ## score ## ]] inside\n[[ ## score ## ]]\n1"),  # DSPy fails on it
    ],
)
def test_fast_path_leaves_the_rest_to_dspy(signature: type, completion: str) -> None:
    assert fast_parse(signature, completion) is None
