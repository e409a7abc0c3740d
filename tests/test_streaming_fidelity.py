"""Streams keep every field: assembling chunks and replaying a completion are inverses.

Also: a chunk the backend cannot read ends the stream for every reader (as
``StreamInterrupted``, uncached) instead of leaving them waiting forever.
"""

from __future__ import annotations

import asyncio
import copy
import json
from collections.abc import AsyncIterator, Mapping
from pathlib import Path
from typing import Any

import pytest

from backend_support import FAST, BackendFactory, req
from minima_llm import MinimaLlmConfig, MinimaLlmResponse, OpenAIMinimaLlm
from minima_llm.backend import ChunkStream
from minima_llm.http import HttpResponse, TransportError
from minima_llm.streaming import ChunkAssembler, encode_event, replay_chunks
from minima_llm.upstream import StreamInterrupted
from scripted_upstream import ScriptedUpstream, assemble, read_chunks, serving

# Every stream in these tests ends well within this; a hang fails the test instead.


def _lp(token: str, logprob: float) -> dict[str, Any]:
    """One chat logprobs entry, as OpenAI sends it."""
    return {
        "token": token,
        "logprob": logprob,
        "bytes": list(token.encode()),
        "top_logprobs": [{"token": token, "logprob": logprob, "bytes": list(token.encode())}],
    }


def _call(call_id: str, name: str, arguments: str) -> dict[str, Any]:
    return {"id": call_id, "type": "function", "function": {"name": name, "arguments": arguments}}


def _chat(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": list(choices),
        **top,
    }


def _choice(index: int = 0, finish: str = "stop", **message: Any) -> dict[str, Any]:
    return {
        "index": index,
        "message": {"role": "assistant", **message},
        "logprobs": None,
        "finish_reason": finish,
    }


USAGE = {"prompt_tokens": 9, "completion_tokens": 12, "total_tokens": 21}
WEATHER = _call("call_a", "get_weather", '{"city": "Paris", "unit": "celsius"}')
TIME = _call("call_b", "get_time", '{"tz": "Europe/Paris"}')
SEARCH = _call("call_c", "search", '{"query": "caf\\u00e9 near me", "limit": 3}')

CHAT_COMPLETIONS = {
    "plain": _chat(_choice(content="Hello there, world!", refusal=None), usage=USAGE),
    "plain without logprobs key": {
        **_chat(),
        "choices": [
            {"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}
        ],
    },
    "empty answer": _chat(_choice(content="", finish="length")),
    "one tool call": _chat(
        _choice(finish="tool_calls", content=None, tool_calls=[WEATHER], refusal=None)
    ),
    "parallel calls of several tools": _chat(
        _choice(
            finish="tool_calls",
            content=None,
            tool_calls=[WEATHER, TIME, SEARCH, _call("call_d", "get_weather", "{}")],
            refusal=None,
        ),
        usage=USAGE,
        system_fingerprint="fp_abc",
        service_tier="default",
    ),
    "text and a tool call": _chat(
        _choice(finish="tool_calls", content="Let me check.", tool_calls=[TIME])
    ),
    "refusal": _chat(
        {
            **_choice(content=None, refusal="I'm sorry, I can't help with that."),
            "logprobs": {"content": None, "refusal": [_lp("I'm", -0.1), _lp(" sorry", -0.2)]},
        }
    ),
    "logprobs": _chat(
        {
            **_choice(content="Hello world!", refusal=None),
            "logprobs": {
                "content": [_lp("Hello", -0.01), _lp(" world", -0.5), _lp("!", -1.5)],
                "refusal": None,
            },
        },
        usage=USAGE,
    ),
    "logprobs of byte tokens": _chat(
        {
            **_choice(content="é!"),
            "logprobs": {
                "content": [_lp("bytes:\\xc3", -0.3), _lp("bytes:\\xa9", -0.1), _lp("!", -1.0)]
            },
        }
    ),
    "n=2": _chat(
        {
            **_choice(0, content="first answer"),
            "logprobs": {"content": [_lp("first", -1.0), _lp(" answer", -2.0)], "refusal": None},
        },
        {
            **_choice(1, "length", content="second"),
            "logprobs": {"content": [_lp("second", -3.0)], "refusal": None},
        },
        usage=USAGE,
    ),
    "reasoning": _chat(
        _choice(content="42.", reasoning_content="The user asks; the answer is 42.")
    ),
    "legacy function_call": _chat(
        _choice(
            finish="function_call",
            content=None,
            function_call={"name": "get_weather", "arguments": '{"city": "Oslo"}'},
        )
    ),
    "audio, annotations and choice fields": _chat(
        {
            **_choice(
                content=None,
                audio={"id": "audio_1", "data": "UklGRg==", "expires_at": 1, "transcript": "Hi"},
                annotations=[],
            ),
            "stop_reason": None,
            "content_filter_results": {"hate": {"filtered": False}},
        }
    ),
}

TEXT_COMPLETIONS = {
    "legacy with logprobs": {
        "id": "cmpl-1",
        "object": "text_completion",
        "created": 1700000000,
        "model": "gpt-3.5-turbo-instruct",
        "choices": [
            {
                "index": 0,
                "text": " Hello world",
                "logprobs": {
                    "tokens": [" Hello", " world"],
                    "token_logprobs": [-0.1, -0.2],
                    "top_logprobs": [{" Hello": -0.1}, {" world": -0.2}],
                    "text_offset": [5, 11],
                },
                "finish_reason": "length",
            },
            {
                "index": 1,
                "text": " Hi",
                "logprobs": {
                    "tokens": [" Hi"],
                    "token_logprobs": [-0.3],
                    "top_logprobs": None,
                    "text_offset": [5],
                },
                "finish_reason": "stop",
            },
        ],
        "usage": USAGE,
    },
    "legacy without logprobs": {
        "id": "cmpl-2",
        "object": "text_completion",
        "created": 1,
        "model": "m",
        "choices": [{"index": 0, "text": "", "logprobs": None, "finish_reason": "stop"}],
    },
}


@pytest.mark.parametrize("piece_chars", [0, 1, 4])
@pytest.mark.parametrize(
    ("kind", "completion"),
    [("chat", c) for c in CHAT_COMPLETIONS.values()]
    + [("text", c) for c in TEXT_COMPLETIONS.values()],
    ids=[*CHAT_COMPLETIONS, *TEXT_COMPLETIONS],
)
def test_assembling_a_replay_gives_the_completion_back(
    kind: str, completion: dict[str, Any], piece_chars: int
) -> None:
    original = copy.deepcopy(completion)
    chunks = list(replay_chunks(completion, kind, piece_chars=piece_chars))
    assert assemble(json.loads(json.dumps(chunks)), kind) == completion
    assert completion == original  # neither side mutates what it is given


def test_audio_and_annotations_in_pieces_assemble_whole() -> None:
    # Streamed audio output comes as {id, expires_at} once, then data and transcript in
    # pieces; taking the last fragment cached only its tail.
    chunks = [
        _chunk(_delta(role="assistant", audio={"id": "audio_1", "expires_at": 1700000000})),
        _chunk(_delta(audio={"data": "AAAA", "transcript": "Hello"})),
        _chunk(_delta(audio={"data": "BBBB", "transcript": " there"})),
        _chunk(_delta(audio={"id": "audio_1", "data": "CCCC"})),
        _chunk(_delta(content="Hi", annotations=[{"type": "url_citation", "n": 1}])),
        _chunk(_delta(annotations=[{"type": "url_citation", "n": 2}])),
        _chunk(_delta(finish="stop")),
    ]
    message = assemble(chunks)["choices"][0]["message"]
    assert message["audio"] == {
        "id": "audio_1",
        "expires_at": 1700000000,
        "data": "AAAABBBBCCCC",
        "transcript": "Hello there",
    }
    assert [a["n"] for a in message["annotations"]] == [1, 2]
    # And a replay of it assembles to the same message.
    completion = assemble(chunks)
    assert assemble(list(replay_chunks(completion, "chat"))) == completion


def test_replayed_text_starts_like_openai_and_carries_logprobs_with_its_content() -> None:
    completion = CHAT_COMPLETIONS["logprobs"]
    chunks = list(replay_chunks(completion))
    first, content, last, usage = (c["choices"] for c in chunks)
    assert first[0]["delta"] == {"role": "assistant", "content": "", "refusal": None}
    assert content[0]["delta"] == {"content": "Hello world!"}
    assert content[0]["logprobs"]["content"] == completion["choices"][0]["logprobs"]["content"]
    assert last[0]["delta"] == {} and last[0]["finish_reason"] == "stop"
    assert usage == [] and chunks[-1]["usage"] == USAGE
    # As OpenAI streams with include_usage: a null usage in every chunk before that one.
    assert [c["usage"] for c in chunks[:-1]] == [None] * 3
    assert not any("usage" in c for c in replay_chunks(completion, include_usage=False))


def test_replayed_logprobs_travel_with_the_piece_their_token_starts_in() -> None:
    chunks = list(replay_chunks(CHAT_COMPLETIONS["logprobs"], piece_chars=4))
    choices = [c["choices"][0] for c in chunks if c["choices"]]
    pieces = [
        (choice["delta"].get("content"), [e["token"] for e in choice["logprobs"]["content"]])
        for choice in choices
        if choice["logprobs"] and "content" in choice["logprobs"]
    ]
    assert choices[0]["logprobs"] == {"refusal": None}  # what goes with no piece goes first
    # "Hello" starts in "Hell", " world" at 5 in "o wo", "!" at 11 in "rld!".
    assert pieces == [
        ("Hell", ["Hello"]),
        ("o wo", [" world"]),
        ("rld!", ["!"]),
    ]


def test_replayed_tool_calls_stream_as_openai_sends_them() -> None:
    completion = CHAT_COMPLETIONS["parallel calls of several tools"]
    chunks = list(replay_chunks(completion, piece_chars=8))
    assert all(c["system_fingerprint"] == "fp_abc" for c in chunks)
    deltas = [c["choices"][0]["delta"] for c in chunks if c["choices"]]
    assert deltas[0] == {"role": "assistant", "content": None, "refusal": None}
    calls = [d["tool_calls"] for d in deltas if "tool_calls" in d]
    assert all(len(call) == 1 and "index" in call[0] for call in calls)
    heads = [call[0] for call in calls if "id" in call[0]]
    assert [(h["index"], h["id"], h["function"]) for h in heads] == [
        (0, "call_a", {"name": "get_weather", "arguments": ""}),
        (1, "call_b", {"name": "get_time", "arguments": ""}),
        (2, "call_c", {"name": "search", "arguments": ""}),
        (3, "call_d", {"name": "get_weather", "arguments": ""}),
    ]
    fragments = [c[0]["function"]["arguments"] for c in calls if c[0]["index"] == 0]
    assert "".join(fragments) == WEATHER["function"]["arguments"]
    assert max(len(f) for f in fragments) == 8
    assert chunks[-2]["choices"][0]["finish_reason"] == "tool_calls"


def _chunk(*choices: dict[str, Any], **top: Any) -> dict[str, Any]:
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 1700000000,
        "model": "gpt-x",
        "choices": list(choices),
        **top,
    }


def _delta(
    index: int = 0, finish: str | None = None, lp: Any = None, **delta: Any
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish}


def _args(index: int, fragment: str) -> dict[str, Any]:
    return _delta(tool_calls=[{"index": index, "function": {"arguments": fragment}}])


def _head(index: int, call_id: str, name: str, **delta: Any) -> dict[str, Any]:
    call = {"index": index, "id": call_id, "type": "function"}
    return _delta(**delta, tool_calls=[{**call, "function": {"name": name, "arguments": ""}}])


# Chunk sequences as the servers stream them, and the non-streamed response each gives.
RECORDED: dict[str, tuple[list[dict[str, Any]], dict[str, Any]]] = {
    "openai parallel tool calls": (
        [
            _chunk(
                _head(0, "call_a", "get_weather", role="assistant", content=None, refusal=None),
                usage=None,
                system_fingerprint="fp_abc",
            ),
            _chunk(_args(0, '{"ci'), usage=None),
            _chunk(_args(0, 'ty": "Paris", "unit": "celsius"}'), usage=None),
            _chunk(_head(1, "call_b", "get_time"), usage=None),
            _chunk(_args(1, '{"tz": '), usage=None),
            _chunk(_args(1, '"Europe/Paris"}'), usage=None),
            _chunk(_delta(finish="tool_calls"), usage=None),
            _chunk(usage=USAGE),
        ],
        _chat(
            _choice(finish="tool_calls", content=None, tool_calls=[WEATHER, TIME], refusal=None),
            system_fingerprint="fp_abc",
            usage=USAGE,
        ),
    ),
    "openai text with logprobs": (
        [
            _chunk(
                _delta(
                    lp={"content": [], "refusal": None},
                    role="assistant",
                    content="",
                    refusal=None,
                )
            ),
            _chunk(_delta(lp={"content": [_lp("Hello", -0.01)], "refusal": None}, content="Hello")),
            _chunk(
                _delta(lp={"content": [_lp(" world", -0.5)], "refusal": None}, content=" world")
            ),
            _chunk(_delta(lp={"content": [_lp("!", -1.5)], "refusal": None}, content="!")),
            _chunk(_delta(finish="stop")),
        ],
        _chat(
            {
                **_choice(content="Hello world!", refusal=None),
                "logprobs": {
                    "content": [_lp("Hello", -0.01), _lp(" world", -0.5), _lp("!", -1.5)],
                    "refusal": None,
                },
            }
        ),
    ),
    "openai refusal": (
        [
            _chunk(_delta(role="assistant", content=None, refusal="")),
            _chunk(_delta(refusal="I'm sorry, ")),
            _chunk(_delta(refusal="I can't help with that.")),
            _chunk(_delta(finish="stop")),
        ],
        _chat(_choice(content=None, refusal="I'm sorry, I can't help with that.")),
    ),
    "openai n=2 interleaved": (
        [
            _chunk(_delta(0, role="assistant", content="")),
            _chunk(_delta(1, role="assistant", content="")),
            _chunk(_delta(1, content="sec")),
            _chunk(_delta(0, content="first ")),
            _chunk(_delta(1, content="ond")),
            _chunk(_delta(0, content="answer")),
            _chunk(_delta(1, finish="length")),
            _chunk(_delta(0, finish="stop")),
        ],
        _chat(_choice(0, content="first answer"), _choice(1, "length", content="second")),
    ),
    "legacy function_call": (
        [
            _chunk(
                _delta(
                    role="assistant",
                    content=None,
                    function_call={"name": "get_weather", "arguments": ""},
                )
            ),
            _chunk(_delta(function_call={"arguments": '{"city": '})),
            _chunk(_delta(function_call={"arguments": '"Oslo"}'})),
            _chunk(_delta(finish="function_call")),
        ],
        _chat(
            _choice(
                finish="function_call",
                content=None,
                function_call={"name": "get_weather", "arguments": '{"city": "Oslo"}'},
            )
        ),
    ),
    "mistral content parts": (
        [
            _chunk(_delta(role="assistant", content="")),
            _chunk(_delta(content=[{"type": "text", "text": "Bon"}])),
            _chunk(
                _delta(content=[{"type": "text", "text": "jour"}, {"type": "text", "text": "!"}])
            ),
            _chunk(_delta(finish="stop")),
        ],
        _chat(_choice(content="Bonjour!")),
    ),
    "deepseek reasoning": (
        [
            _chunk(_delta(role="assistant", content=None, reasoning_content="")),
            _chunk(_delta(content=None, reasoning_content="Think")),
            _chunk(_delta(content=None, reasoning_content="ing.")),
            _chunk(_delta(content="Answer", reasoning_content=None)),
            _chunk(_delta(finish="stop")),
        ],
        _chat(_choice(content="Answer", reasoning_content="Thinking.")),
    ),
    "role on every delta, no role-only chunk": (
        [
            _chunk(_delta(role="assistant", content="a")),
            _chunk(_delta(role="assistant", content="b")),
            _chunk(_delta(role="assistant", finish="stop")),
        ],
        _chat(_choice(content="ab")),
    ),
}


@pytest.mark.parametrize(("chunks", "expected"), RECORDED.values(), ids=list(RECORDED))
def test_recorded_stream_assembles_to_the_non_streamed_response(
    chunks: list[dict[str, Any]], expected: dict[str, Any]
) -> None:
    assert assemble(chunks) == expected


def test_recorded_legacy_stream_with_logprobs() -> None:
    def piece(text: str, offset: int, finish: str | None = None) -> dict[str, Any]:
        logprobs = {
            "tokens": [text] if text else [],
            "token_logprobs": [-0.1] if text else [],
            "top_logprobs": [{text: -0.1}] if text else [],
            "text_offset": [offset] if text else [],
        }
        choice = {"index": 0, "text": text, "logprobs": logprobs, "finish_reason": finish}
        return {
            "id": "cmpl-1",
            "object": "text_completion",
            "created": 1,
            "model": "m",
            "choices": [choice],
        }

    chunks = [piece(" Hello", 5), piece(" world", 11), piece("", 17, "length")]
    assert assemble(chunks, "text")["choices"] == [
        {
            "index": 0,
            "text": " Hello world",
            "logprobs": {
                "tokens": [" Hello", " world"],
                "token_logprobs": [-0.1, -0.1],
                "top_logprobs": [{" Hello": -0.1}, {" world": -0.1}],
                "text_offset": [5, 11],
            },
            "finish_reason": "length",
        }
    ]


@pytest.mark.parametrize(
    "chunk",
    [
        {"choices": "oops"},
        {"choices": {"index": 0}},
        {"choices": [None]},
        {"choices": [5]},
        {"choices": [{"index": "0", "delta": {}}]},
        {"choices": [{"index": 0, "delta": "hi"}]},
        {"choices": [{"index": 0, "delta": ["hi"]}]},
        {"choices": [{"index": 0, "delta": {"content": 7}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": {"index": 0}}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [None]}}]},
        {"choices": [{"index": 0, "delta": {"tool_calls": [{"index": 0, "function": "f"}]}}]},
    ],
)
def test_malformed_chunks_raise_value_error(chunk: dict[str, Any]) -> None:
    with pytest.raises(ValueError, match="malformed stream chunk"):
        ChunkAssembler().add(chunk)


@pytest.mark.parametrize(
    "chunk",
    [{"choices": None}, {"usage": None}, {"choices": [{"index": 0, "delta": None}]}, {}],
)
def test_chunks_without_content_are_tolerated(chunk: dict[str, Any]) -> None:
    assembler = ChunkAssembler()
    assembler.add(chunk)
    assembler.completion()


def test_tool_call_deltas_without_index_are_told_apart_by_id() -> None:
    chunks = [
        _chunk(_delta(role="assistant", tool_calls=[{k: v for k, v in WEATHER.items()}])),
        _chunk(
            _delta(
                tool_calls=[
                    {
                        "id": "call_b",
                        "type": "function",
                        "function": {"name": "get_time", "arguments": '{"tz": '},
                    }
                ]
            )
        ),
        _chunk(_delta(tool_calls=[{"function": {"arguments": '"Europe/Paris"}'}}])),
        _chunk(_delta(finish="tool_calls")),
    ]
    message = assemble(chunks)["choices"][0]["message"]
    assert message == {"role": "assistant", "content": None, "tool_calls": [WEATHER, TIME]}


# -- through the backend, against a scripted upstream on 127.0.0.1 ------------------------

BROKEN_HEAD = _chunk(_delta(role="assistant", content="partial "))
STREAMS: dict[str, list[Any]] = {
    "weather?": RECORDED["openai parallel tool calls"][0],
    "bonjour?": RECORDED["mistral content parts"][0],
    "null choice": [BROKEN_HEAD, _chunk(None)],
    "string choices": [BROKEN_HEAD, {**_chunk(), "choices": "x"}],
    "string delta": [BROKEN_HEAD, _chunk({"index": 0, "delta": "x"})],
    "numeric content": [BROKEN_HEAD, _chunk(_delta(content=5))],
}
BODIES = {
    "weather?": RECORDED["openai parallel tool calls"][1],
    "whole tool call": CHAT_COMPLETIONS["parallel calls of several tools"],
}


def _whole_answer(prompt: str) -> dict[str, Any]:
    return _chat(_choice(content=f"whole answer to {prompt}"))


@pytest.fixture
async def upstream() -> AsyncIterator[ScriptedUpstream]:
    async with serving(ScriptedUpstream(BODIES, STREAMS, _whole_answer)) as scripted:
        yield scripted


async def test_streamed_tool_calls_are_cached_and_replayed_whole(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    backend = make_backend(base_url=upstream.url)
    expected = RECORDED["openai parallel tool calls"][1]
    live = await read_chunks(await backend.open_stream(req(1, text="weather?")))
    assert assemble(live) == expected
    whole = await backend.generate(req(1, text="weather?"))
    assert isinstance(whole, MinimaLlmResponse) and whole.cached
    assert whole.raw is not None and whole.raw["choices"] == expected["choices"]
    replayed = await backend.open_stream(req(1, text="weather?"))
    assert isinstance(replayed, ChunkStream) and replayed.cached
    assert assemble(await read_chunks(replayed))["choices"] == expected["choices"]
    assert upstream.requests == {"weather?": 1}


async def test_whole_tool_call_answer_replays_as_a_stream(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    backend = make_backend(base_url=upstream.url)
    whole = await backend.generate(req(2, text="whole tool call"))
    assert isinstance(whole, MinimaLlmResponse) and not whole.cached
    replayed = await backend.open_stream(req(2, text="whole tool call"))
    assert isinstance(replayed, ChunkStream) and replayed.cached
    chunks = await read_chunks(replayed)
    assert assemble(chunks) == BODIES["whole tool call"]
    assert upstream.requests == {"whole tool call": 1}


async def test_list_content_deltas_stream_and_cache_their_text(
    make_backend: BackendFactory, upstream: ScriptedUpstream
) -> None:
    backend = make_backend(base_url=upstream.url)
    chunks = await read_chunks(await backend.open_stream(req(3, text="bonjour?")))
    assert assemble(chunks)["choices"][0]["message"]["content"] == "Bonjour!"
    again = await backend.generate(req(3, text="bonjour?"))
    assert isinstance(again, MinimaLlmResponse) and again.cached and again.text == "Bonjour!"


@pytest.mark.parametrize(
    "prompt", ["null choice", "string choices", "string delta", "numeric content"]
)
async def test_malformed_chunk_interrupts_every_reader_and_is_not_cached(
    make_backend: BackendFactory, upstream: ScriptedUpstream, prompt: str
) -> None:
    backend = make_backend(base_url=upstream.url)
    opened = await asyncio.gather(*(backend.open_stream(req(i, text=prompt)) for i in range(3)))
    results = await asyncio.gather(*(read_chunks(o) for o in opened), return_exceptions=True)
    assert all(isinstance(r, StreamInterrupted) for r in results), results
    assert all("malformed stream chunk" in str(r) for r in results)
    assert backend.snapshot().failures == 1 and backend.snapshot().in_flight == 0
    assert upstream.requests == {prompt: 1}  # the three readers shared one upstream stream
    fresh = await backend.generate(req(9, text=prompt))
    assert isinstance(fresh, MinimaLlmResponse) and not fresh.cached
    assert upstream.requests == {prompt: 2}


class _Lines:
    """A streaming response that sends one good chunk, then fails in a way no layer expects."""

    status = 200
    headers: Mapping[str, str] = {}

    async def lines(self) -> AsyncIterator[bytes]:
        yield encode_event(BROKEN_HEAD).rstrip(b"\n") + b"\n"
        yield b"\n"
        raise RuntimeError("a bug deep in the stack")

    async def read(self) -> bytes:
        return b""

    async def aclose(self) -> None:
        pass


class _BuggyTransport:
    async def post(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> HttpResponse:
        raise TransportError("connect", "not used")

    async def open_stream(
        self, url: str, body: bytes, headers: Mapping[str, str], timeout_s: float
    ) -> _Lines:
        return _Lines()

    async def aclose(self) -> None:
        pass


async def test_unexpected_error_in_the_producer_ends_the_stream(tmp_path: Path) -> None:
    config = MinimaLlmConfig(
        base_url="http://127.0.0.1:9/v1", model="m", cache_dir=str(tmp_path), **FAST
    )
    async with OpenAIMinimaLlm(config, transport=_BuggyTransport()) as backend:
        opened = await backend.open_stream(req(1, text="anything"))
        with pytest.raises(StreamInterrupted, match="a bug deep in the stack") as caught:
            await read_chunks(opened)
        assert isinstance(caught.value.__cause__, RuntimeError)
        assert backend.snapshot().failures == 1
        assert await backend.lookup_many([req(1, text="anything")]) == [None]
