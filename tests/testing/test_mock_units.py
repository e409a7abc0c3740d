"""Table tests for the mock server's I/O-free parts: config, rate limit, replies, faults."""

from __future__ import annotations

import json
import random

import pytest

import minima_llm.testing
from minima_llm.testing import Fault, MockConfig, TokenBucket, format_duration
from minima_llm.testing._faults import FaultQueue, draw_fault, parse_fail_next
from minima_llm.testing._ratelimit import format_retry_after
from minima_llm.testing._replies import (
    RequestError,
    parse_chat,
    parse_completion,
    render_stream,
    reply_text,
    split_words,
    truncate_words,
)


def test_public_api_is_pinned() -> None:
    assert sorted(minima_llm.testing.__all__) == [
        "Fault",
        "FaultMode",
        "MockConfig",
        "MockServer",
        "ThreadedMockServer",
        "TokenBucket",
        "format_duration",
        "run_mock_server_in_thread",
        "serve",
    ]


@pytest.mark.parametrize(
    ("changes", "field"),
    [
        ({"latency_s": -1}, "latency_s"),
        ({"latency_jitter_s": float("inf")}, "latency_jitter_s"),
        ({"rpm": -5}, "rpm"),
        ({"rpm": 1.5}, "rpm"),
        ({"max_concurrency": True}, "max_concurrency"),
        ({"failure_rate": 1.5}, "failure_rate"),
        ({"reset_rate": "0.1"}, "reset_rate"),
        ({"failure_rate": 0.6, "malformed_rate": 0.6}, "malformed_rate"),
        ({"seed": None}, "seed"),
        ({"model": ""}, "model"),
        ({"stream_chunk_delay_s": -0.1}, "stream_chunk_delay_s"),
        ({"bogus": 1}, "bogus"),
    ],
)
def test_config_rejects_bad_values_naming_the_field(changes: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError, match=field):
        MockConfig().merge(changes)


def test_config_accepts_json_ints_for_floats_and_is_frozen() -> None:
    config = MockConfig().replace(latency_s=1, failure_rate=0)
    assert config.latency_s == 1.0
    assert isinstance(config.latency_s, float)
    with pytest.raises(AttributeError):
        config.rpm = 5  # type: ignore[misc]


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [
        (0, "0s"),
        (-1, "0s"),
        (0.0001, "1ms"),
        (0.05, "50ms"),
        (0.25, "250ms"),
        (0.9994, "1s"),
        (1, "1s"),
        (1.5, "1.5s"),
        (8.64, "8.64s"),
        (59.999, "59.999s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3600, "1h0m0s"),
        (3723.5, "1h2m3.5s"),
        (90061.25, "25h1m1.25s"),
    ],
)
def test_format_duration(seconds: float, expected: str) -> None:
    assert format_duration(seconds) == expected


@pytest.mark.parametrize(
    ("seconds", "expected"),
    [(0.0, ("0.001", "1")), (0.05, ("0.05", "50")), (0.1234, ("0.124", "124")), (2, ("2", "2000"))],
)
def test_format_retry_after(seconds: float, expected: tuple[str, str]) -> None:
    assert format_retry_after(seconds) == expected


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_token_bucket_bursts_one_second_then_refills() -> None:
    clock = FakeClock()
    bucket = TokenBucket(600, clock=clock)
    assert [bucket.try_acquire() for _ in range(11)] == [True] * 10 + [False]
    assert bucket.headers(limited=True) == {
        "x-ratelimit-limit-requests": "600",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "1s",
        "retry-after": "0.1",
        "retry-after-ms": "100",
    }
    clock.now += 0.25
    assert bucket.try_acquire()
    assert bucket.remaining == 1
    assert bucket.headers(limited=False)["x-ratelimit-reset-requests"] == "850ms"
    clock.now += 60
    bucket.try_acquire()
    assert bucket.remaining == 9


def test_token_bucket_below_60_rpm_still_admits_one_request() -> None:
    clock = FakeClock()
    bucket = TokenBucket(30, clock=clock)
    assert [bucket.try_acquire() for _ in range(2)] == [True, False]
    assert bucket.seconds_until_token == pytest.approx(2.0)
    with pytest.raises(ValueError, match="rpm"):
        TokenBucket(0)


def test_a_token_bucket_charges_costs_and_names_its_headers_for_tokens() -> None:
    clock = FakeClock()
    bucket = TokenBucket(120_000, clock=clock, unit="tokens", burst_s=0.5)
    assert bucket.capacity == 1000
    assert bucket.try_acquire(600) and not bucket.try_acquire(600)
    assert bucket.headers(limited=True, cost=600) == {
        "x-ratelimit-limit-tokens": "120000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "300ms",
        "retry-after": "0.1",
        "retry-after-ms": "100",
    }
    assert repr(bucket) == "<TokenBucket tokens=120000/min level=400.00/1000>"
    with pytest.raises(ValueError, match="tpm"):
        TokenBucket(0, unit="tokens")


@pytest.mark.parametrize(
    ("body", "charged"),
    [
        ({"messages": [{"role": "user", "content": "x" * 41}]}, 11 + 3),  # "mock reply: xxx"
        ({"messages": [{"role": "user", "content": "x" * 40}], "max_tokens": 5, "n": 3}, 25),
    ],
)
def test_a_reply_is_charged_the_prompt_at_four_characters_and_max_tokens(
    body: dict[str, object], charged: int
) -> None:
    assert parse_chat(json.dumps(body).encode(), "m").charged_tokens == charged


def test_a_completion_reply_is_charged_max_tokens_for_every_choice() -> None:
    body = {"prompt": ["x" * 8, "y" * 8], "max_tokens": 3, "n": 2}
    assert parse_completion(json.dumps(body).encode(), "m").charged_tokens == 4 + 3 * 4


@pytest.mark.parametrize(
    "text", ["", "one", "mock reply: hello  there\nworld ", "  leading", "a\tb\n\nc"]
)
def test_split_words_joins_back_to_the_text(text: str) -> None:
    assert "".join(split_words(text)) == text


def test_reply_text_echo_and_default() -> None:
    assert reply_text("ECHO:exactly this ") == "exactly this "
    assert reply_text("hi") == "mock reply: hi"
    assert reply_text("x" * 500) == "mock reply: " + "x" * 200


@pytest.mark.parametrize(
    ("text", "max_tokens", "expected"),
    [
        ("a b c", None, ("a b c", "stop")),
        ("a b c", 3, ("a b c", "stop")),
        ("a  b c", 2, ("a b", "length")),
    ],
)
def test_truncate_words(text: str, max_tokens: int | None, expected: tuple[str, str]) -> None:
    choice = truncate_words(text, max_tokens)
    assert (choice.text, choice.finish_reason) == expected


@pytest.mark.parametrize(
    ("body", "param"),
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"{}", "messages"),
        (b'{"messages": []}', "messages"),
        (b'{"messages": ["hi"]}', "messages"),
        (b'{"messages": [{"role": "user", "content": 5}]}', "messages"),
        (b'{"messages": [{"role": "user", "content": "x"}], "max_tokens": 0}', "max_tokens"),
        (b'{"messages": [{"role": "user", "content": "x"}], "n": 0}', "n"),
    ],
)
def test_parse_chat_rejects_invalid_requests(body: bytes, param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse_chat(body, "m")
    assert info.value.param == param


def test_parse_chat_uses_last_user_message_and_text_parts() -> None:
    body = {
        "messages": [
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": [{"type": "text", "text": "first"}]},
            {"role": "assistant", "content": None},
            {
                "role": "user",
                "content": [{"type": "text", "text": "ECHO:"}, {"type": "text", "text": "ok"}],
            },
        ]
    }
    reply = parse_chat(json.dumps(body).encode(), "default-model")
    assert reply.model == "default-model"
    assert reply.choices[0].text == "ok"
    assert reply.prompt_tokens == 2 + 1 + 0 + 1 + 4 * 3


def test_parse_completion_prompt_list_gives_a_choice_per_prompt() -> None:
    reply = parse_completion(b'{"prompt": ["a", "b"], "n": 2}', "m")
    assert [choice.text for choice in reply.choices] == ["mock reply: a"] * 2 + [
        "mock reply: b"
    ] * 2
    with pytest.raises(RequestError):
        parse_completion(b'{"prompt": 5}', "m")


def test_fault_queue_is_fifo_with_counts() -> None:
    queue = FaultQueue()
    first, second = Fault.create(status=500), Fault.create("reset")
    assert queue.push(first, 2) == 2
    assert queue.push(second) == 3
    assert [queue.pop(), queue.pop(), queue.pop(), queue.pop()] == [first, first, second, None]
    assert len(queue) == 0


def test_draw_fault_uses_one_draw_per_request_in_rate_order() -> None:
    config = MockConfig(failure_rate=0.2, reset_rate=0.3, malformed_rate=0.1, seed=3)
    rng, reference = random.Random(3), random.Random(3)
    for _ in range(200):
        fault, draw = draw_fault(rng, config), reference.random()
        if draw < 0.2:
            assert fault is not None and fault.status == 500 and fault.mode == "status"
        elif draw < 0.5:
            assert fault is not None and fault.mode == "reset"
        elif draw < 0.6:
            assert fault is not None and fault.mode == "malformed"
        else:
            assert fault is None


@pytest.mark.parametrize(
    "payload",
    [
        {"count": 0},
        {"mode": "explode"},
        {"status": 99},
        {"status": "503"},
        {"sleep_s": -1},
        {"headers": ["x"]},
        {"body": 5},
        {"colour": "red"},
    ],
)
def test_parse_fail_next_rejects_bad_payloads(payload: dict[str, object]) -> None:
    with pytest.raises(RequestError):
        parse_fail_next(payload)


def test_parse_fail_next_defaults_to_one_503_with_an_openai_error_body() -> None:
    fault, count = parse_fail_next({})
    assert count == 1
    assert (fault.mode, fault.status) == ("status", 503)
    assert json.loads(fault.body)["error"]["code"] == "injected_fault"
    fault, _ = parse_fail_next({"body": {"error": "x"}, "headers": {"Retry-After": 2}})
    assert (fault.body, fault.headers) == (b'{"error": "x"}', (("Retry-After", "2"),))


def _assemble(events: list[bytes], field: str) -> dict[int, str]:
    assert events[-1] == b"data: [DONE]\n\n"
    texts: dict[int, str] = {}
    for event in events[:-1]:
        assert event.startswith(b"data: ") and event.endswith(b"\n\n")
        for choice in json.loads(event[len(b"data: ") :])["choices"]:
            piece = choice["delta"].get("content", "") if field == "delta" else choice["text"]
            texts[choice["index"]] = texts.get(choice["index"], "") + piece
    return texts


def test_stream_events_are_valid_json_for_awkward_text_and_many_choices() -> None:
    awkward = 'ECHO:say "hi"\n\\ caf\u00e9 \U0001f600  \ud800 end'
    body = {"messages": [{"role": "user", "content": awkward}], "n": 2, "stream": True}
    reply = parse_chat(json.dumps(body).encode(), "m")
    assert _assemble(render_stream(reply), "delta") == {0: awkward[5:], 1: awkward[5:]}


def test_text_completion_stream_with_a_prompt_list() -> None:
    reply = parse_completion(b'{"prompt": ["a b", "ECHO:"], "stream": true}', "m")
    assert _assemble(render_stream(reply), "text") == {0: "mock reply: a b", 1: ""}
