"""CORS: pages on the origins an operator names may call the gateway from a browser."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from gateway_harness import serve, sse_data

from minima_llm.errors import ConfigError
from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockServer

APP = "https://app.example.com"
KEY = "sk-gw-cors-41b7"
PREFLIGHT = {
    "Origin": APP,
    "Access-Control-Request-Method": "POST",
    "Access-Control-Request-Headers": "authorization, content-type, x-stainless-os",
}


def cors(*origins: str, **changes: object) -> ProxySettings:
    return ProxySettings(port=0, cors_origins=origins, **changes)  # type: ignore[arg-type]


async def test_a_preflight_from_an_allowed_origin_is_answered_without_a_key(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path, cors(APP, api_keys=(KEY,))) as gw:
        reply = await gw.request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
        assert reply.status == 204, reply.text
        headers = reply.headers
        assert headers["Access-Control-Allow-Origin"] == APP and headers["Vary"] == "Origin"
        assert "POST" in headers["Access-Control-Allow-Methods"]
        assert (
            headers["Access-Control-Allow-Headers"] == PREFLIGHT["Access-Control-Request-Headers"]
        )
        assert int(headers["Access-Control-Max-Age"]) > 0
        # Counted apart: a browser asking, not a call of the route.
        assert gw.gateway.metrics.requests == {("preflight", 204): 1}
    assert mock.stats()["requests"] == 0


async def test_answers_to_an_allowed_page_let_it_read_them(
    mock: MockServer, tmp_path: Path
) -> None:
    page = {"Origin": APP, "Authorization": f"Bearer {KEY}"}
    async with serve(mock.url, tmp_path, cors(APP, api_keys=(KEY,))) as gw:
        whole = await gw.chat("from a page", headers=page)
        streamed = await gw.chat("streamed to a page", headers=page, stream=True)
        refused = await gw.chat("no key", headers={"Origin": APP})
        elsewhere = await gw.chat("no origin", headers={"Authorization": f"Bearer {KEY}"})
    assert (
        whole.status == 200 and streamed.status == 200 and sse_data(streamed.text)[-1] == "[DONE]"
    )
    for reply in (whole, streamed, refused):  # an error too: the page can show why
        assert reply.headers["Access-Control-Allow-Origin"] == APP
        assert "x-minima-cache" in reply.headers["Access-Control-Expose-Headers"]
    assert refused.status == 401
    assert "Access-Control-Allow-Origin" not in elsewhere.headers  # not a browser's call


async def test_another_origin_gets_no_grant(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, cors(APP)) as gw:
        other = {**PREFLIGHT, "Origin": "https://evil.example"}
        refused = await gw.request("OPTIONS", "/v1/chat/completions", headers=other)
        assert refused.status == 403 and "cors_origins" in refused.json()["error"]["message"]
        answer = await gw.chat("hi", headers={"Origin": "https://evil.example"})
        assert answer.status == 200 and "Access-Control-Allow-Origin" not in answer.headers
        # Whatever the origin, or none: a cache in between must keep answers apart.
        assert answer.headers["Vary"] == "Origin"
        assert (await gw.get("/v1/models")).headers["Vary"] == "Origin"
        # A header list that is not one is not echoed into the answer.
        odd = {**PREFLIGHT, "Origin": APP, "Access-Control-Request-Headers": "x-a; x-b=<1>"}
        reply = await gw.request("OPTIONS", "/v1/models", headers=odd)
        assert reply.status == 204 and "x-b" not in reply.headers["Access-Control-Allow-Headers"]


def test_any_origin_needs_api_keys_or_an_explicit_allowance() -> None:
    # A browser is a local program: a loopback gateway without keys is open to any page.
    with pytest.raises(ConfigError) as info:
        cors("*").check_exposure()
    assert info.value.field == "proxy.cors_origins"
    cors("*", api_keys=(KEY,)).check_exposure()
    cors("*", allow_unauthenticated=True).check_exposure()
    cors(APP).check_exposure()  # the operator named the page it trusts


async def test_any_origin_with_a_star(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, cors("*")) as gw:
        reply = await gw.request("OPTIONS", "/models", headers=PREFLIGHT)
        assert reply.status == 204 and reply.headers["Access-Control-Allow-Origin"] == "*"
        assert "Vary" not in reply.headers
        answer = await gw.get("/v1/models", headers={"Origin": "http://localhost:5173"})
        assert answer.headers["Access-Control-Allow-Origin"] == "*"
        plain = await gw.get("/v1/models")  # the same answer without an Origin: no Vary needed
        assert plain.headers["Access-Control-Allow-Origin"] == "*" and "Vary" not in plain.headers


async def test_without_cors_options_is_a_method_not_allowed(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.request("OPTIONS", "/v1/chat/completions", headers=PREFLIGHT)
        assert reply.status == 405 and "Access-Control-Allow-Origin" not in reply.headers


def test_origins_are_checked_and_read_from_the_environment() -> None:
    assert ProxySettings(cors_origins="https://A.example.com/, http://[::1]:8080").cors_origins == (
        "https://a.example.com",
        "http://[::1]:8080",
    )
    for bad in ("app.example.com", "https://app.example.com/path", "ftp://x"):
        with pytest.raises(ConfigError) as info:
            ProxySettings(cors_origins=(bad,))
        assert info.value.field == "proxy.cors_origins"
    env = {"MINIMA_PROXY_CORS_ORIGINS": f"{APP},*"}
    assert ProxySettings.env_overrides(env)["cors_origins"] == (APP, "*")
    with pytest.raises(ConfigError) as info:
        ProxySettings.env_overrides({"MINIMA_PROXY_CORS_ORIGINS": "nope"})
    assert info.value.field == "MINIMA_PROXY_CORS_ORIGINS"


async def test_a_refused_preflight_is_logged_with_its_origin(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    async with serve(mock.url, tmp_path, cors(APP)) as gw:
        with caplog.at_level(logging.INFO, logger="minima_llm.proxy"):
            headers = {**PREFLIGHT, "Origin": "https://typo.example"}
            await gw.request("OPTIONS", "/v1/chat/completions", headers=headers)
    assert "https://typo.example" in caplog.text
