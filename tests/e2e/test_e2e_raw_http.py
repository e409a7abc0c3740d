"""Plain HTTP with ``urllib.request``: what curl or any hand-written client sees."""

from __future__ import annotations

import json
from collections.abc import Callable

from _e2e_support import MODEL, MockControl, Service, expected_reply, http, user


def _events(body: bytes) -> list[bytes]:
    return [e for e in body.split(b"\n\n") if e]


def test_chat(gateway: Service, mock: MockControl, unique: Callable[[str], str]) -> None:
    prompt = unique("raw chat")
    result = http(
        "POST", gateway.url + "/chat/completions", {"model": MODEL, "messages": user(prompt)}
    )
    assert result.status == 200, result.body
    assert result.headers["content-type"].startswith("application/json")
    assert result.headers["x-minima-cache"] == "miss"
    body = result.json()
    assert body["object"] == "chat.completion"
    assert body["choices"][0]["message"]["content"] == expected_reply(prompt)
    assert mock.requests() == 1


def test_streaming_body_is_sse_ending_with_done(
    gateway: Service, mock: MockControl, unique: Callable[[str], str]
) -> None:
    prompt = unique("raw stream of words")
    payload = {"model": MODEL, "messages": user(prompt), "stream": True}
    for want in ("miss", "hit"):
        result = http("POST", gateway.url + "/chat/completions", payload)
        assert result.status == 200, result.body
        assert result.headers["content-type"].startswith("text/event-stream")
        assert result.headers["x-minima-cache"] == want
        assert result.body.endswith(b"data: [DONE]\n\n")
        events = _events(result.body)
        assert all(e.startswith(b"data: ") for e in events)
        chunks = [json.loads(e[len(b"data: ") :]) for e in events[:-1]]
        assert all(c["object"] == "chat.completion.chunk" for c in chunks)
        text = "".join(c["choices"][0]["delta"].get("content") or "" for c in chunks)
        assert text == expected_reply(prompt)
    assert mock.requests() == 1


def test_bad_requests_get_openai_shaped_errors(gateway: Service, mock: MockControl) -> None:
    not_json = http("POST", gateway.url + "/chat/completions", b"{not json")
    assert not_json.status == 400
    assert not_json.json()["error"]["type"] == "invalid_request_error"
    too_hot = http(
        "POST",
        gateway.url + "/chat/completions",
        {"model": MODEL, "messages": user("hi"), "temperature": 7},
    )
    assert too_hot.status == 400
    assert too_hot.json()["error"]["param"] == "temperature"
    wrong_method = http("GET", gateway.url + "/chat/completions")
    assert wrong_method.status == 405
    assert "POST" in wrong_method.headers["allow"]
    assert wrong_method.json()["error"]["type"] == "invalid_request_error"
    missing = http("GET", gateway.url + "/no/such/route")
    assert missing.status == 404
    assert missing.json()["error"]["code"] == "not_found"
    assert mock.requests() == 0
