"""Upstream trouble and access control, seen end to end through the OpenAI SDK."""

from __future__ import annotations

import subprocess
import time
from collections.abc import Callable

import openai
import pytest
from _e2e_support import (
    API_KEY,
    GATEWAY_ATTEMPTS,
    MODEL,
    MockControl,
    Service,
    expected_reply,
    free_port,
    gateway_argv,
    gateway_env,
    http,
    user,
)


def _sdk(service: Service, key: str = API_KEY) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url, api_key=key, max_retries=0, timeout=15.0)


def test_upstream_down_is_a_quick_502(launch_gateway: Callable[..., Service]) -> None:
    closed = f"http://127.0.0.1:{free_port()}/v1"
    gw = launch_gateway(upstream=closed)
    started = time.monotonic()
    with _sdk(gw) as client, pytest.raises(openai.InternalServerError) as caught:
        client.chat.completions.create(model=MODEL, messages=user("anyone there?"))
    assert caught.value.status_code == 502
    assert "ConnectionError" in caught.value.message
    assert time.monotonic() - started < 5.0
    health = http("GET", gw.root_url + "/health")
    assert health.status == 200
    assert health.json()["status"] == "degraded"
    assert health.json()["upstream"]["reachable"] is False


def test_429_storm_with_retry_after_then_success(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    mock.fail_next(count=3, status=429, headers={"retry-after": "0.2"})
    prompt = unique("patience")
    started = time.monotonic()
    resp = client.chat.completions.create(model=MODEL, messages=user(prompt))
    elapsed = time.monotonic() - started
    assert resp.choices[0].message.content == expected_reply(prompt)
    assert mock.requests() == 4
    assert mock.stats()["by_status"] == {"200": 1, "429": 3}
    # Each retry waited at least the Retry-After the upstream asked for.
    assert elapsed >= 3 * 0.2 - 0.05


def test_429_that_outlasts_the_retries_is_a_rate_limit_error(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    mock.fail_next(count=GATEWAY_ATTEMPTS, status=429, headers={"retry-after": "0.01"})
    with pytest.raises(openai.RateLimitError) as caught:
        client.chat.completions.create(model=MODEL, messages=user(unique("no luck")))
    assert caught.value.status_code == 429
    assert mock.requests() == GATEWAY_ATTEMPTS


def test_connection_reset_mid_body_is_retried(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    mock.fail_next(count=1, mode="reset")
    prompt = unique("second time lucky")
    resp = client.chat.completions.create(model=MODEL, messages=user(prompt))
    assert resp.choices[0].message.content == expected_reply(prompt)
    assert mock.requests() == 2


def test_stream_cut_midway_is_reported_and_not_cached(
    client: openai.OpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    mock.fail_next(count=1, mode="truncate_stream")
    prompt = unique("a stream that breaks halfway through")
    chunks = []
    with (
        pytest.raises(openai.APIError) as caught,
        client.chat.completions.create(model=MODEL, messages=user(prompt), stream=True) as stream,
    ):
        chunks.extend(stream)  # the gateway's error event arrives mid-iteration
    assert "interrupted" in caught.value.message
    assert all(c.choices[0].finish_reason is None for c in chunks if c.choices)

    labels = []
    for _ in range(2):
        raw = client.chat.completions.with_raw_response.create(
            model=MODEL, messages=user(prompt), stream=True
        )
        labels.append(raw.headers["x-minima-cache"])
        with raw.parse() as stream:
            text = "".join(c.choices[0].delta.content or "" for c in stream if c.choices)
        assert text == expected_reply(prompt)
    assert labels == ["miss", "hit"]  # the broken stream was not cached; the complete one was
    assert mock.requests() == 2


def test_api_keys_are_enforced(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    gw = launch_gateway(MINIMA_PROXY_API_KEYS="k1")
    prompt = unique("members only")
    with _sdk(gw, "wrong") as client, pytest.raises(openai.AuthenticationError) as caught:
        client.chat.completions.create(model=MODEL, messages=user(prompt))
    assert caught.value.status_code == 401
    assert caught.value.code == "invalid_api_key"
    anonymous = http(
        "POST", gw.url + "/chat/completions", {"model": MODEL, "messages": user(prompt)}
    )
    assert anonymous.status == 401
    assert anonymous.json()["error"]["code"] == "missing_api_key"
    assert mock.requests() == 0
    with _sdk(gw, "k1") as client:
        resp = client.chat.completions.create(model=MODEL, messages=user(prompt))
    assert resp.choices[0].message.content == expected_reply(prompt)
    assert http("GET", gw.root_url + "/health").status == 200  # liveness needs no key


def test_refuses_to_listen_beyond_loopback_without_keys(mock: MockControl) -> None:
    # Must exit before binding; if it ever listened on 0.0.0.0, the timeout stops it.
    proc = subprocess.run(
        gateway_argv(free_port(), "--host", "0.0.0.0"),
        env=gateway_env(mock.url, None),
        capture_output=True,
        text=True,
        timeout=15,
    )
    assert proc.returncode != 0
    assert "proxy.host" in proc.stderr
    assert "listening" not in proc.stdout
