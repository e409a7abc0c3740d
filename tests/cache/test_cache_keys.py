"""Cache keys follow the compatibility contract in ARCHITECTURE.md, byte for byte."""

from __future__ import annotations

import hashlib
import json
import re
from types import MappingProxyType
from typing import Any

import pytest

from minima_llm.cache import cache_key, canonical_json, key_of

HELLO = [{"role": "user", "content": "Hello"}]


def contract_canonical(
    model: str,
    messages: Any,
    temperature: float | None = None,
    max_tokens: int | None = None,
    extra: dict[str, Any] | None = None,
) -> str:
    """The contract, written out independently of the code under test."""
    obj: dict[str, Any] = {"model": model, "messages": messages}
    if temperature is not None:
        obj["temperature"] = temperature
    if max_tokens is not None:
        obj["max_tokens"] = max_tokens
    if extra:
        obj["extra"] = extra
    return json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))


def sha(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


# (arguments, canonical JSON, key): the literals were computed once with json.dumps and
# hashlib, so a change to the canonical form shows up here as a changed key.
PINNED = [
    (
        {"model": "gpt-4o-mini", "messages": HELLO},
        '{"messages":[{"content":"Hello","role":"user"}],"model":"gpt-4o-mini"}',
        "a84de116f4fb40259a25b189747c92a06ccd935f8d3a32842f9ee5373f67129a",
    ),
    (
        {
            "model": "gpt-4o-mini",
            "messages": [
                {"role": "system", "content": "Be terse."},
                {"role": "user", "content": "2+2?"},
            ],
            "temperature": 0.0,
            "max_tokens": 128,
        },
        '{"max_tokens":128,"messages":[{"content":"Be terse.","role":"system"},'
        '{"content":"2+2?","role":"user"}],"model":"gpt-4o-mini","temperature":0.0}',
        "9278a051cc7f879103ef9ac690b0c146277ecfd1dea54ee8523396ddd3e51fda",
    ),
    (
        {
            "model": "llama-3.1-8b",
            "messages": [{"role": "user", "content": "Grüße, 世界 😀"}],
            "temperature": 0.7,
        },
        '{"messages":[{"content":"Gr\\u00fc\\u00dfe, \\u4e16\\u754c \\ud83d\\ude00",'
        '"role":"user"}],"model":"llama-3.1-8b","temperature":0.7}',
        "70eb68acbe286fd2d6b27e4bbb1b79c2801aa3107b53da56d123572b37efdd4c",
    ),
    (
        {
            "model": "gpt-4o",
            "messages": [{"role": "user", "content": "x"}],
            "max_tokens": 0,
            "extra": {
                "top_p": 0.9,
                "stop": ["\n", "END"],
                "response_format": {"type": "json_object"},
            },
        },
        '{"extra":{"response_format":{"type":"json_object"},"stop":["\\n","END"],"top_p":0.9},'
        '"max_tokens":0,"messages":[{"content":"x","role":"user"}],"model":"gpt-4o"}',
        "d7ae531556ed534e33314a14594a869f43822d5609fa5a4d1893afa2e9c657da",
    ),
]


@pytest.mark.parametrize(("kwargs", "canonical", "key"), PINNED)
def test_pinned_literals_agree_with_the_contract(
    kwargs: dict[str, Any], canonical: str, key: str
) -> None:
    # Guards the pins themselves: they must follow from json.dumps and hashlib alone.
    assert contract_canonical(**kwargs) == canonical
    assert sha(canonical) == key


@pytest.mark.parametrize(("kwargs", "canonical", "key"), PINNED)
def test_pinned_keys(kwargs: dict[str, Any], canonical: str, key: str) -> None:
    assert canonical_json(**kwargs) == canonical
    assert key_of(canonical) == key
    assert cache_key(**kwargs) == (key, canonical)


def test_positional_arguments_follow_the_documented_order() -> None:
    got = cache_key("m", HELLO, 0.5, 10, {"seed": 1})
    assert got[1] == contract_canonical("m", HELLO, 0.5, 10, {"seed": 1})


CASES: list[dict[str, Any]] = [
    {"model": "m", "messages": []},
    {"model": "m", "messages": HELLO, "temperature": None, "max_tokens": None, "extra": None},
    {"model": "m", "messages": HELLO, "temperature": 0.0},
    {"model": "m", "messages": HELLO, "temperature": 0},
    {"model": "m", "messages": HELLO, "temperature": 1.25},
    {"model": "m", "messages": HELLO, "max_tokens": 0},
    {"model": "m", "messages": HELLO, "max_tokens": 4096},
    {"model": "m", "messages": HELLO, "extra": {}},
    {"model": "m", "messages": HELLO, "extra": {"n": 2, "logit_bias": {"50256": -100}}},
    {"model": "m", "messages": [{"role": "user", "content": 'quote " back \\ tab \t nul \x00'}]},
    {"model": "m", "messages": [{"role": "user", "content": [{"type": "text", "text": "a"}]}]},
    {"model": "ünï", "messages": [{"role": "user", "content": "\u2028\U0001f600é"}]},
    {"model": "m", "messages": [{"role": "tool", "content": None, "tool_call_id": "t1"}]},
]


@pytest.mark.parametrize("kwargs", CASES)
def test_canonical_json_matches_the_contract(kwargs: dict[str, Any]) -> None:
    canonical = canonical_json(**kwargs)
    assert canonical == contract_canonical(**kwargs)
    assert canonical.isascii()
    assert key_of(canonical) == sha(canonical)


def test_temperature_zero_is_part_of_the_key_but_none_is_not() -> None:
    without = canonical_json("m", HELLO)
    zero = canonical_json("m", HELLO, temperature=0.0)
    assert "temperature" not in without
    assert zero.endswith(',"temperature":0.0}')
    assert key_of(zero) != key_of(without)


def test_max_tokens_zero_is_part_of_the_key() -> None:
    assert '"max_tokens":0' in canonical_json("m", HELLO, max_tokens=0)
    assert "max_tokens" not in canonical_json("m", HELLO, max_tokens=None)


def test_empty_extra_is_left_out() -> None:
    plain = canonical_json("m", HELLO)
    assert canonical_json("m", HELLO, extra={}) == plain
    assert canonical_json("m", HELLO, extra=None) == plain
    assert '"extra":{"seed":1}' in canonical_json("m", HELLO, extra={"seed": 1})


def test_non_ascii_is_escaped() -> None:
    canonical = canonical_json("m", [{"role": "user", "content": "é 中 😀"}])
    assert "\\u00e9 \\u4e2d \\ud83d\\ude00" in canonical
    assert canonical.isascii()


def test_no_whitespace_between_tokens() -> None:
    canonical = canonical_json("m", HELLO, 0.5, 3, {"a": [1, 2]})
    assert not re.search(r"[,:] ", canonical)


def test_dict_key_order_is_irrelevant() -> None:
    a = cache_key(
        "m",
        [{"role": "user", "content": "hi", "name": "bob"}],
        extra={"top_p": 0.5, "stop": ["x"], "response_format": {"type": "json", "schema": {}}},
    )
    b = cache_key(
        "m",
        [{"name": "bob", "content": "hi", "role": "user"}],
        extra={"response_format": {"schema": {}, "type": "json"}, "stop": ["x"], "top_p": 0.5},
    )
    assert a == b


def test_message_order_is_relevant() -> None:
    first = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert cache_key("m", first)[0] != cache_key("m", first[::-1])[0]


def test_tuple_and_list_messages_give_the_same_key() -> None:
    messages = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    assert cache_key("m", tuple(messages)) == cache_key("m", list(messages))
    assert cache_key("m", messages, extra={"stop": ("a", "b")}) == cache_key(
        "m", messages, extra={"stop": ["a", "b"]}
    )


def test_read_only_mappings_hash_like_dicts() -> None:
    frozen = [MappingProxyType({"role": "user", "content": "Hello"})]
    assert cache_key("m", frozen) == cache_key("m", HELLO)
    extra = MappingProxyType({"seed": 3})
    assert cache_key("m", HELLO, extra=extra) == cache_key("m", HELLO, extra={"seed": 3})


def test_every_request_field_changes_the_key() -> None:
    base = cache_key("m", HELLO, 0.5, 10, {"seed": 1})[0]
    variants = [
        cache_key("m2", HELLO, 0.5, 10, {"seed": 1}),
        cache_key("m", [{"role": "user", "content": "Hello!"}], 0.5, 10, {"seed": 1}),
        cache_key("m", HELLO, 0.6, 10, {"seed": 1}),
        cache_key("m", HELLO, 0.5, 11, {"seed": 1}),
        cache_key("m", HELLO, 0.5, 10, {"seed": 2}),
    ]
    assert base not in {key for key, _ in variants}


def test_key_is_lowercase_hex_sha256_of_utf8() -> None:
    key = cache_key("m", HELLO)[0]
    assert re.fullmatch(r"[0-9a-f]{64}", key)
    # key_of hashes UTF-8, which matters for callers that pass a non-ASCII string.
    assert key_of("é") == hashlib.sha256(b"\xc3\xa9").hexdigest()


def test_unserialisable_values_are_refused() -> None:
    with pytest.raises(TypeError):
        canonical_json("m", [{"role": "user", "content": object()}])
