"""Bad requests and upstream trouble come back as OpenAI-shaped JSON errors, never a traceback."""

from __future__ import annotations

import gzip
import json
import sys
from pathlib import Path
from typing import Any

import pytest
from gateway_harness import MODEL, Reply, chat_body, closed_port_url, serve, stream_text

from minima_llm.proxy import ProxySettings
from minima_llm.proxy.handlers import MAX_JSON_DEPTH
from minima_llm.testing import MockServer
from minima_llm.upstream import SNIPPET


def error_of(reply: Reply, status: int) -> dict[str, object]:
    """The ``error`` object of an OpenAI-shaped error answer with ``status``."""
    assert reply.status == status, reply.text
    assert reply.headers["Content-Type"].startswith("application/json")
    assert "Traceback" not in reply.text and 'File "' not in reply.text
    error = reply.json()["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert isinstance(error["message"], str) and error["message"]
    return dict(error)


async def test_malformed_json(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.request(
            "POST", "/v1/chat/completions", data=b'{"model": "m", "messages": [', headers={}
        )
        error = error_of(reply, 400)
        assert error["type"] == "invalid_request_error"
        assert "JSON" in str(error["message"])
        error_of(await gw.request("POST", "/v1/chat/completions", data=b"\xff\xfe"), 400)
        if hasattr(sys, "get_int_max_str_digits"):  # the limit came in 3.10.7, 3.11
            huge = b'{"model": "m", "messages": [], "seed": ' + b"9" * 5000 + b"}"
            reply = await gw.request("POST", "/v1/chat/completions", data=huge)
            assert "too long" in str(error_of(reply, 400)["message"])
            assert "sys." not in reply.text


async def test_deeply_nested_json_is_a_bad_request(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        deep = b"[" * 200_000
        error = error_of(await gw.request("POST", "/v1/chat/completions", data=deep), 400)
        assert "nested too deeply" in str(error["message"])
        metadata = b'{"a":' * 5_000 + b"1" + b"}" * 5_000
        body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": '
        reply = await gw.request("POST", "/v1/chat/completions", data=body + metadata + b"}")
        error_of(reply, 400)
    assert mock.stats()["requests"] == 0


@pytest.mark.parametrize(("depth", "status"), [(100, 200), (MAX_JSON_DEPTH - 3, 200), (600, 400)])
async def test_one_nesting_limit_on_every_python(
    mock: MockServer, tmp_path: Path, depth: int, status: int
) -> None:
    # Python's json gives up near its recursion limit, which 3.13 raised tenfold: 600
    # levels passed there and failed on 3.11. The gateway's own limit answers alike.
    # The body's own object and the metadata object are two levels above the nesting.
    nested = b'{"a":' * depth + b"1" + b"}" * depth
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "metadata": '
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.request("POST", "/v1/chat/completions", data=body + nested + b"}")
        assert reply.status == status, reply.text
        if status == 400:
            assert "nested more than 512 levels" in str(error_of(reply, 400)["message"])


async def test_brackets_inside_strings_are_not_nesting(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat("[{" * 1_000)
        assert reply.status == 200, reply.text
        scalar = await gw.request("POST", "/v1/chat/completions", data=b'"' + b"[" * 1_000 + b'"')
        error_of(scalar, 400)  # not an object, and not a crash in the depth check


@pytest.mark.parametrize("number", ["NaN", "Infinity", "-Infinity", "1e400"])
async def test_numbers_json_cannot_carry_are_a_bad_request(
    mock: MockServer, tmp_path: Path, number: str
) -> None:
    # Python's json reads them; forwarded, the upstream would get NaN or Infinity, not JSON.
    body = b'{"model": "m", "messages": [{"role": "user", "content": "x"}], "top_p": %s}'
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.request("POST", "/v1/chat/completions", data=body % number.encode())
        assert "not valid JSON" in str(error_of(reply, 400)["message"])
    assert mock.stats()["requests"] == 0


async def test_include_usage_must_be_a_boolean(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat("x", stream=True, stream_options={"include_usage": "false"})
        assert error_of(reply, 400)["param"] == "stream_options.include_usage"
    assert mock.stats()["requests"] == 0


async def test_validation_error_over_http(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        error = error_of(await gw.chat("hi", temperature=5), 400)
        assert error["param"] == "temperature"
        error = error_of(await gw.post("/v1/embeddings", {"input": "x", "stream": True}), 400)
        assert error["param"] == "stream"
        strict = ProxySettings(port=0, strict_params=True)
    async with serve(mock.url, tmp_path, strict) as gw:
        assert error_of(await gw.chat("hi", top_k=3), 400)["param"] == "top_k"
    assert mock.stats()["requests"] == 0


async def test_body_too_large(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, ProxySettings(port=0, max_body_bytes=2048)) as gw:
        error = error_of(await gw.chat("x" * 4000), 413)
        assert error["type"] == "invalid_request_error"
        assert (await gw.chat("x" * 100)).status == 200


async def test_body_that_does_not_match_its_content_encoding(
    mock: MockServer, tmp_path: Path
) -> None:
    body = json.dumps(chat_body("compressed")).encode()
    async with serve(mock.url, tmp_path) as gw:
        for encoding in ("gzip", "deflate"):
            reply = await gw.request(
                "POST", "/v1/chat/completions", data=body, headers={"Content-Encoding": encoding}
            )
            assert "content-encoding" in str(error_of(reply, 400)["message"]).lower()
        packed = await gw.request(
            "POST",
            "/v1/chat/completions",
            data=gzip.compress(body),
            headers={"Content-Encoding": "gzip"},
        )
        assert packed.status == 200, packed.text
    assert mock.stats()["requests"] == 1


async def test_unknown_route_and_wrong_method(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        missing = error_of(await gw.post("/v1/nothing/here", {}), 404)
        assert missing["code"] == "not_found" and "/v1/nothing/here" in str(missing["message"])
        error_of(await gw.get("/v2/models"), 404)
        wrong = await gw.get("/v1/chat/completions")
        error_of(wrong, 405)
        assert "POST" in wrong.headers["Allow"]
        error_of(await gw.post("/health", {}), 405)
        error_of(await gw.post("/v1/models/some-model", {}), 405)
        requests = gw.gateway.metrics.requests
        # A wrong method counts under the route it asked for; made-up paths share one label.
        assert requests[("/v1/chat/completions", 405)] == 1 and requests[("/health", 405)] == 1
        assert requests[("unmatched", 404)] == 2 and requests[("unmatched", 405)] == 1
        error_of(await gw.post("/v1/chat%2Fcompletions", {}), 404)  # no route, decoded or not
        assert requests[("unmatched", 404)] == 3 and ("/v1/chat/completions", 404) not in requests


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_down(tmp_path: Path, stream: bool) -> None:
    async with serve(closed_port_url(), tmp_path, max_attempts=2) as gw:
        error = error_of(await gw.chat("anyone there", stream=stream), 502)
        assert error["type"] == "upstream_error" and error["code"] == "upstream_error"
        assert "ConnectionError" in str(error["message"])
        assert "2 attempt(s)" in str(error["message"])


async def test_upstream_stopped(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, max_attempts=1) as gw:
        assert (await gw.chat("before")).status == 200
        await mock.stop()
        error_of(await gw.chat("after"), 502)


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_503_storm(mock: MockServer, tmp_path: Path, stream: bool) -> None:
    mock.fail_next(10, status=503)
    async with serve(mock.url, tmp_path, max_attempts=3) as gw:
        reply = await gw.chat("busy", stream=stream)
        error = error_of(reply, 503)
        assert "HTTP 503" in str(error["message"])
        assert mock.stats()["requests"] == 3
        assert int(reply.headers["Retry-After"]) >= 1  # clients are told to back off


async def test_upstream_500_is_a_bad_gateway(mock: MockServer, tmp_path: Path) -> None:
    mock.fail_next(10, status=500)
    async with serve(mock.url, tmp_path, max_attempts=2) as gw:
        error_of(await gw.chat("broken"), 502)


async def test_upstream_429_storm(mock: MockServer, tmp_path: Path) -> None:
    mock.fail_next(10, status=429, headers={"Retry-After": "0"})
    async with serve(mock.url, tmp_path, max_attempts=2) as gw:
        reply = await gw.chat("limited")
        # The upstream's last refusal as it said it (SDKs pick RateLimitError by status).
        error = error_of(reply, 429)
        assert error["message"] == "mock: injected 429" and error["code"] == "injected_fault"
        assert int(reply.headers["Retry-After"]) >= 1
        assert mock.stats()["requests"] == 2  # an ordinary 429 is retried


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_timeout(mock: MockServer, tmp_path: Path, stream: bool) -> None:
    mock.fail_next(10, mode="timeout", sleep_s=2.0)
    async with serve(mock.url, tmp_path, timeout_s=0.2, max_attempts=2) as gw:
        error = error_of(await gw.chat("slow", stream=stream), 504)
        assert "TimeoutError" in str(error["message"])


@pytest.mark.parametrize("stream", [False, True])
async def test_upstream_400_keeps_its_message(
    mock: MockServer, tmp_path: Path, stream: bool
) -> None:
    upstream_error = {
        "error": {
            "message": "This model's maximum context length is 8 tokens",
            "type": "invalid_request_error",
            "param": "messages",
            "code": "context_length_exceeded",
        }
    }
    mock.fail_next(1, status=400, body=upstream_error)
    async with serve(mock.url, tmp_path) as gw:
        error = error_of(await gw.chat("too long", stream=stream), 400)
        assert "maximum context length is 8 tokens" in str(error["message"])
        assert error["type"] == "invalid_request_error"
        assert mock.stats()["requests"] == 1  # a 400 is not retried
        assert (await gw.chat("too long", stream=stream)).status == 200  # and not cached


# api.openai.com's answer to an over-long prompt, indented as it sends it: past the
# failure record's 300-character snippet even compacted, code and param at the end.
CONTEXT_LENGTH = {
    "error": {
        "message": "This model's maximum context length is 128000 tokens. However, your "
        "messages resulted in 130532 tokens (130000 in the messages, 532 in the functions). "
        "Please reduce the length of the messages or functions.",
        "type": "invalid_request_error",
        "param": "messages",
        "code": "context_length_exceeded",
    }
}


@pytest.mark.parametrize("stream", [False, True])
async def test_a_long_upstream_error_reaches_the_client_whole(
    mock: MockServer, tmp_path: Path, stream: bool
) -> None:
    assert len(json.dumps(CONTEXT_LENGTH, separators=(",", ":"))) > SNIPPET
    mock.fail_next(1, status=400, body=json.dumps(CONTEXT_LENGTH, indent=4))
    async with serve(mock.url, tmp_path) as gw:
        error = error_of(await gw.chat("too long", stream=stream), 400)
        # SDK users branch on the code: it used to come back as "upstream_error".
        assert error == {**CONTEXT_LENGTH["error"]}


async def test_a_spent_quota_is_answered_at_once_as_the_upstream_said_it(
    mock: MockServer, tmp_path: Path
) -> None:
    quota = {
        "message": "You exceeded your current quota, please check your plan and billing details.",
        "type": "insufficient_quota",
        "param": None,
        "code": "insufficient_quota",
    }
    mock.fail_next(3, status=429, body={"error": quota})
    async with serve(mock.url, tmp_path, max_attempts=3) as gw:
        error = error_of(await gw.chat("out of credit"), 429)
        assert error == quota
        assert mock.stats()["requests"] == 1  # no wait lifts a spent quota


async def test_a_conflict_that_outlasts_the_retries_is_a_conflict(
    mock: MockServer, tmp_path: Path
) -> None:
    conflict = {"message": "busy", "type": "conflict", "param": None, "code": None}
    mock.fail_next(2, status=409, body={"error": conflict})
    async with serve(mock.url, tmp_path, max_attempts=2) as gw:
        assert error_of(await gw.chat("contended"), 409)["message"] == "busy"


@pytest.mark.parametrize(
    "fault",
    [
        {"status": 200, "body": "not json"},  # a body cut to nothing useful by a proxy
        {"status": 200, "body": ""},
        {"status": 200, "body": "", "headers": {"Content-Type": "text/event-stream"}},
        {
            "status": 200,
            "body": 'data: {"error": {"message": "overloaded"}}\n\n',
            "headers": {"Content-Type": "text/event-stream"},
        },
    ],
)
async def test_a_stream_that_fails_before_its_first_chunk_is_retried(
    mock: MockServer, tmp_path: Path, fault: dict[str, object]
) -> None:
    # Nothing has reached the client yet, so the gateway may still ask again, as it
    # would for a whole answer, rather than answer 200 with only an error event.
    mock.fail_next(1, **fault)
    async with serve(mock.url, tmp_path, max_attempts=3) as gw:
        reply = await gw.chat("second time lucky", stream=True)
        assert reply.status == 200
        assert reply.events()[-1] == "[DONE]"
        assert stream_text(reply.events()) == "mock reply: second time lucky"
        assert mock.stats()["requests"] == 2


async def test_a_stream_refused_for_good_before_its_first_chunk_is_not_retried(
    mock: MockServer, tmp_path: Path
) -> None:
    refusal = {"message": "too long", "type": "invalid_request_error", "code": "context_length"}
    event = f"data: {json.dumps({'error': refusal})}\n\n"
    mock.fail_next(3, status=200, body=event, headers={"Content-Type": "text/event-stream"})
    async with serve(mock.url, tmp_path, max_attempts=3) as gw:
        error = error_of(await gw.chat("far too long", stream=True), 502)
        assert "too long" in str(error["message"])
        assert mock.stats()["requests"] == 1  # asking again cannot change this answer


async def test_a_stream_line_past_the_limit_is_a_bad_gateway_not_a_crash(
    mock: MockServer, tmp_path: Path
) -> None:
    line = "data: " + json.dumps({"choices": [{"delta": {"content": "z" * 17_000_000}}]})
    sse = {"Content-Type": "text/event-stream"}
    mock.fail_next(2, status=200, body=line + "\n\n", headers=sse)
    async with serve(mock.url, tmp_path, max_attempts=2) as gw:
        error = error_of(await gw.chat("one enormous chunk", stream=True), 502)
        assert "stream line over" in str(error["message"]) and "zzz" not in str(error)
        assert mock.stats()["requests"] == 2  # retried, as nothing had reached the client


async def test_an_error_event_mid_stream_reaches_the_client_as_the_upstream_sent_it(
    mock: MockServer, tmp_path: Path
) -> None:
    chunk = {
        "id": "c1",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "delta": {"role": "assistant", "content": "Hal"}}],
    }
    error = {"message": "Overloaded", "type": "server_error", "param": None, "code": "overloaded"}
    body = f"data: {json.dumps(chunk)}\n\ndata: {json.dumps({'error': error})}\n\n"
    mock.fail_next(1, status=200, body=body, headers={"Content-Type": "text/event-stream"})
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat("cut by the upstream", stream=True)
        events = reply.events()
        assert json.loads(events[0])["choices"][0]["delta"]["content"] == "Hal"
        assert json.loads(events[-1]) == {"error": error}  # not rewritten as upstream_error
        assert (await gw.chat("cut by the upstream")).cache == "miss"  # and not cached


def _completion(answer_id: str, content: str) -> dict[str, Any]:
    """A whole chat completion as an upstream sends it."""
    message = {"role": "assistant", "content": content}
    return {
        "id": answer_id,
        "object": "chat.completion",
        "created": 1,
        "model": MODEL,
        "choices": [{"index": 0, "message": message, "finish_reason": "stop"}],
    }


async def test_a_live_answer_carries_the_upstreams_request_id(
    mock: MockServer, tmp_path: Path
) -> None:
    # Support asks for OpenAI's request id; behind the gateway a client had none.
    answer = _completion("chatcmpl-9", "hi")
    ids = {"x-request-id": "req_abc123", "openai-processing-ms": "42"}
    limits = {"x-ratelimit-remaining-requests": "7"}
    mock.fail_next(1, status=200, body=answer, headers={**ids, **limits})
    async with serve(mock.url, tmp_path) as gw:
        live = await gw.chat("who answered")
        assert {name: live.headers.get(name) for name in ids} == ids
        assert "x-ratelimit-remaining-requests" not in live.headers  # the gateway's own limits
        assert live.headers["x-minima-request-id"].startswith("mgw-")  # the gateway's own
        hit = await gw.chat("who answered")
        # No provider saw the hit: its id is the gateway's, as its log line has it.
        assert hit.cache == "hit" and hit.headers["x-request-id"].startswith("mgw-")
        assert hit.headers["x-request-id"] == hit.headers["x-minima-request-id"]


async def test_a_stream_that_never_starts_is_a_json_error(mock: MockServer, tmp_path: Path) -> None:
    mock.fail_next(2, status=200, body="", headers={"Content-Type": "text/event-stream"})
    async with serve(mock.url, tmp_path, max_attempts=2) as gw:
        error = error_of(await gw.chat("never starts", stream=True), 502)
        assert "MalformedResponse" in str(error["message"]) and "[DONE]" in str(error["message"])
        assert mock.stats()["requests"] == 2
        assert (await gw.chat("never starts")).cache == "miss"  # nothing was cached


async def test_a_whole_answer_to_a_stream_request_is_streamed(
    mock: MockServer, tmp_path: Path
) -> None:
    # Some servers ignore "stream": true and answer with one JSON completion.
    whole = _completion("chatcmpl-whole", "all at once")
    whole["usage"] = {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    mock.fail_next(1, status=200, body=whole)
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat("ignored stream flag", stream=True)
        assert reply.status == 200 and reply.events()[-1] == "[DONE]"
        assert stream_text(reply.events()) == "all at once"
        again = await gw.chat("ignored stream flag")
        assert (
            again.cache == "hit"
            and again.json()["choices"][0]["message"]["content"] == "all at once"
        )
        assert mock.stats()["requests"] == 1


async def test_errors_are_counted_by_status(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        await gw.post("/nope", {})
        await gw.request("POST", "/v1/completions", data=b"{")
        await gw.post("/v1/completions", chat_body("no prompt"))
        by_status = (await gw.get("/metrics")).json()["by_status"]
        assert by_status == {"400": 2, "404": 1}
