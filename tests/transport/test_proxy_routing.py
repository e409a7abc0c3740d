"""Requests through an HTTP proxy, as on a compute node that reaches the internet no other way.

The upstream is named ``upstream.test``, which resolves nowhere: only the proxy
(``tests/forward_proxy.py``) knows where it listens, so an answer proves the request
went through it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import sys
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from backend_support import FAST
from forward_proxy import ForwardProxy, free_refused_tunnels
from minima_llm import MinimaLlmConfig, MinimaLlmFailure, MinimaLlmRequest, OpenAIMinimaLlm
from minima_llm.errors import ConfigError
from minima_llm.http import HttpResponse, ProxyRules, Transport, TransportError, make_transport
from minima_llm.testing import MockServer
from tls_support import self_signed, serving_tls

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = {"Content-Type": "application/json"}
NAME = "upstream.test"


def _port(server: MockServer) -> int:
    return int(server.url.rsplit(":", 1)[1].split("/")[0])


def _transport(kind: str, rules: ProxyRules) -> Transport:
    return make_transport(kind, 4, proxies=rules)


async def _post_once(kind: str, rules: ProxyRules, url: str) -> HttpResponse:
    """One request from a transport of its own, closed after."""
    client = _transport(kind, rules)
    try:
        return await client.post(url, BODY, JSON, 5.0)
    finally:
        await client.aclose()


@pytest.fixture
async def via(mock: MockServer) -> AsyncIterator[ForwardProxy]:
    """A proxy that knows where ``upstream.test`` (the mock) listens, asking for credentials."""
    async with ForwardProxy({NAME: ("127.0.0.1", _port(mock))}, credentials="ada:pw") as proxy:
        yield proxy


def _rules(
    proxy: ForwardProxy, variable: str = "HTTP_PROXY", credentials: str = "ada:pw"
) -> ProxyRules:
    return ProxyRules.from_environ({variable: proxy.url.replace("//", f"//{credentials}@")})


async def test_plain_http_goes_through_the_proxy_on_kept_connections(
    mock: MockServer, via: ForwardProxy, transport: str
) -> None:
    client = _transport(transport, _rules(via))
    url = f"http://{NAME}:{_port(mock)}/v1/chat/completions"
    try:
        for _ in range(3):
            resp = await client.post(url, BODY, JSON, 5.0)
            assert resp.status == 200, resp.body
    finally:
        await client.aclose()
    assert [(s.method, s.target) for s in via.seen] == [("POST", url)] * 3
    assert {s.proxy_authorization for s in via.seen} == {"Basic YWRhOnB3"}
    assert via.connections == 1  # one kept-alive connection to the proxy
    assert "proxy-authorization" not in mock.last_headers  # the proxy's, not the origin's
    assert mock.stats()["requests"] == 3


async def test_streams_go_through_the_proxy(
    mock: MockServer, via: ForwardProxy, transport: str
) -> None:
    client = _transport(transport, _rules(via))
    body = json.dumps(
        {"model": "m", "stream": True, "messages": [{"role": "user", "content": "hi"}]}
    )
    try:
        stream = await client.open_stream(
            f"http://{NAME}:{_port(mock)}/v1/chat/completions", body.encode(), JSON, 5.0
        )
        lines = [line async for line in stream.lines()]
        await stream.aclose()
    finally:
        await client.aclose()
    assert stream.status == 200
    assert any(line.startswith(b"data: [DONE]") for line in lines)
    assert [s.method for s in via.seen] == ["POST"]


async def test_wrong_credentials_are_refused_by_the_proxy(
    mock: MockServer, via: ForwardProxy, transport: str
) -> None:
    url = f"http://{NAME}:{_port(mock)}/v1/chat/completions"
    resp = await _post_once(transport, _rules(via, credentials="ada:wrong"), url)
    # A plain-http request: the proxy's 407 is the answer, as curl and the SDK see it.
    assert resp.status == 407
    assert mock.stats()["requests"] == 0


async def test_a_proxy_that_is_down_is_a_connect_error_naming_it(transport: str) -> None:
    rules = ProxyRules.from_environ({"HTTPS_PROXY": "http://127.0.0.1:1"})
    with pytest.raises(TransportError) as caught:
        await _post_once(transport, rules, f"https://{NAME}/v1/chat/completions")
    assert caught.value.kind == "connect"
    assert "via proxy http://127.0.0.1:1 (from HTTPS_PROXY)" in str(caught.value)


async def test_loopback_is_reached_directly_with_a_proxy_set(
    mock: MockServer, via: ForwardProxy, transport: str
) -> None:
    resp = await _post_once(transport, _rules(via), mock.url + "/chat/completions")
    assert resp.status == 200
    assert via.seen == []


async def test_an_unusable_proxy_for_a_request_is_a_connect_error(transport: str) -> None:
    rules = ProxyRules.from_environ({"ALL_PROXY": "socks5://127.0.0.1:9"})
    with pytest.raises(TransportError) as caught:
        await _post_once(transport, rules, f"https://{NAME}/v1/chat/completions")
    assert caught.value.kind == "connect"
    assert "ALL_PROXY" in str(caught.value)


# --- https through CONNECT ---------------------------------------------------------

needs_openssl = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for ``upstream.test`` and its key."""
    return self_signed(tmp_path_factory.mktemp("tls-proxy"), NAME, f"DNS:{NAME}")


@pytest.fixture
async def tls_mock(certificate: tuple[Path, Path]) -> AsyncIterator[MockServer]:
    async with serving_tls(*certificate) as server:
        yield server


# A child process: aiohttp builds its default TLS context when it is imported, so
# SSL_CERT_FILE (how a cluster's CA bundle is handed over) must be set before that.
_TLS_CHILD = """
import asyncio, json, sys
from minima_llm.http import make_transport
async def main():
    client = make_transport(sys.argv[1], 4)
    try:
        for _ in range(2):
            resp = await client.post(sys.argv[2], b'{"model": "m", "messages": [{"role": "user", "content": "hi"}]}',
                                     {"Content-Type": "application/json"}, 5.0)
            print(resp.status, flush=True)
    finally:
        await client.aclose()
asyncio.run(main())
"""


@needs_openssl
async def test_https_tunnels_through_connect_and_checks_the_origin_certificate(
    tls_mock: MockServer, certificate: tuple[Path, Path], transport: str
) -> None:
    port = _port(tls_mock)
    async with ForwardProxy({NAME: ("127.0.0.1", port)}, credentials="ada:pw") as proxy:
        env = {
            **os.environ,
            "SSL_CERT_FILE": str(certificate[0]),
            "HTTPS_PROXY": proxy.url.replace("//", "//ada:pw@"),
        }
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", _TLS_CHILD, transport, f"https://{NAME}:{port}/v1/chat/completions",
            env=env, stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        out, err = await asyncio.wait_for(child.communicate(), 60)
    assert out.split() == [b"200", b"200"], err.decode()
    # One tunnel, kept alive, with the credentials in the CONNECT and never inside it.
    assert [(s.method, s.target, s.proxy_authorization) for s in proxy.seen] == [
        ("CONNECT", f"{NAME}:{port}", "Basic YWRhOnB3")
    ]
    assert "proxy-authorization" not in tls_mock.last_headers
    assert tls_mock.stats()["requests"] == 2


@needs_openssl
async def test_https_through_a_proxy_still_refuses_an_untrusted_origin(
    tls_mock: MockServer, transport: str
) -> None:
    port = _port(tls_mock)
    async with ForwardProxy({NAME: ("127.0.0.1", port)}, credentials="ada:pw") as proxy:
        url = f"https://{NAME}:{port}/v1/chat/completions"
        with pytest.raises(TransportError) as caught:
            await _post_once(transport, _rules(proxy, "HTTPS_PROXY"), url)
    assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
    assert (proxy.seen[0].method, proxy.seen[0].proxy_authorization) == (
        "CONNECT",
        "Basic YWRhOnB3",
    )
    assert tls_mock.stats()["requests"] == 0


# --- the backend ---------------------------------------------------------------------


async def test_the_backend_follows_the_environment(
    mock: MockServer,
    via: ForwardProxy,
    transport: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("http_proxy", via.url.replace("//", "//ada:pw@"))
    config = MinimaLlmConfig(
        base_url=f"http://{NAME}:{_port(mock)}/v1",
        model="m",
        cache_dir=str(tmp_path),
        transport=transport,
    )
    async with OpenAIMinimaLlm(config) as backend:
        assert str(backend.proxy) == f"{via.url} (from http_proxy)"
        result = await backend.generate(
            MinimaLlmRequest("q", [{"role": "user", "content": "through the proxy"}])
        )
        assert not isinstance(result, MinimaLlmFailure), result
    assert len(via.seen) == 1


def test_an_unusable_proxy_for_base_url_fails_at_construction(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "socks5://user:secret@127.0.0.1:1080")
    config = MinimaLlmConfig(
        base_url="https://api.example.com/v1", model="m", cache_dir=str(tmp_path)
    )
    with pytest.raises(ConfigError) as caught:
        OpenAIMinimaLlm(config)
    assert caught.value.field == "HTTPS_PROXY"
    assert "secret" not in str(caught.value)


# --- refusals, dropped tunnels, names outside ASCII -------------------------------------


@needs_openssl
async def test_a_connect_refused_by_the_proxy_is_one_attempt_and_no_retry(
    tls_mock: MockServer, transport: str, tmp_path: Path
) -> None:
    # A wrong password asked again and again can lock a directory-backed account.
    port = _port(tls_mock)
    async with ForwardProxy({NAME: ("127.0.0.1", port)}, credentials="ada:pw") as proxy:
        client = _transport(transport, _rules(proxy, "HTTPS_PROXY", credentials="ada:wrong"))
        config = MinimaLlmConfig(
            base_url=f"https://{NAME}:{port}/v1", model="m", cache_dir=str(tmp_path), **FAST
        )
        async with OpenAIMinimaLlm(config, transport=client) as backend:
            result = await backend.generate(
                MinimaLlmRequest("q", [{"role": "user", "content": "x"}])
            )
    free_refused_tunnels()
    assert isinstance(result, MinimaLlmFailure)
    assert result.error_type == "ProxyError" and result.attempts == 1
    assert "HTTP 407" in result.message and "via proxy" in result.message
    assert [s.method for s in proxy.seen] == ["CONNECT"]


async def test_a_proxy_that_cannot_reach_the_upstream_is_a_connect_error(transport: str) -> None:
    async with ForwardProxy({NAME: ("127.0.0.1", 1)}) as proxy:
        rules = ProxyRules.from_environ({"HTTPS_PROXY": proxy.url})
        with pytest.raises(TransportError) as caught:
            await _post_once(transport, rules, f"https://{NAME}/v1/chat/completions")
    free_refused_tunnels()
    assert caught.value.kind == "connect"  # the upstream may be back soon: retried
    assert "HTTP 502" in str(caught.value)


@needs_openssl
async def test_a_tunnel_the_proxy_closed_while_idle_is_replaced_at_once(
    tls_mock: MockServer, certificate: tuple[Path, Path], transport: str
) -> None:
    port = _port(tls_mock)
    # Each request waits for a line, read on a thread: the child's loop runs meanwhile,
    # as an application's does, and sees what the proxy closes.
    script = _TLS_CHILD.replace(
        "for _ in range(2):",
        "for _ in range(3):\n            await asyncio.to_thread(sys.stdin.readline)",
    )
    async with ForwardProxy({NAME: ("127.0.0.1", port)}) as proxy:
        env = {**os.environ, "SSL_CERT_FILE": str(certificate[0]), "HTTPS_PROXY": proxy.url}
        child = await asyncio.create_subprocess_exec(
            sys.executable, "-c", script, transport, f"https://{NAME}:{port}/v1/chat/completions",
            env=env, stdin=asyncio.subprocess.PIPE, stdout=asyncio.subprocess.PIPE,
            stderr=asyncio.subprocess.PIPE,
        )  # fmt: skip
        assert child.stdin is not None and child.stdout is not None
        statuses = []
        for turn in range(3):
            if turn == 2:
                proxy.drop_connections()  # idle: the proxy closes the tunnel, no TLS goodbye
                await asyncio.sleep(0.2)
            child.stdin.write(b"\n")
            statuses.append(await asyncio.wait_for(child.stdout.readline(), 30))
        _, err = await asyncio.wait_for(child.communicate(), 30)
    assert [s.strip() for s in statuses] == [b"200"] * 3, err.decode()
    assert [s.method for s in proxy.seen] == ["CONNECT", "CONNECT"]


async def test_a_host_name_outside_ascii_goes_through_the_proxy_in_idna(
    mock: MockServer, transport: str
) -> None:
    async with ForwardProxy({"xn--bcher-kva.test": ("127.0.0.1", _port(mock))}) as proxy:
        rules = ProxyRules.from_environ({"HTTP_PROXY": proxy.url})
        url = f"http://bücher.test:{_port(mock)}/v1/chat/completions"
        resp = await _post_once(transport, rules, url)
    assert resp.status == 200
    assert proxy.seen[0].target == f"http://xn--bcher-kva.test:{_port(mock)}/v1/chat/completions"


def test_a_backend_given_a_transport_reports_that_transports_proxy(tmp_path: Path) -> None:
    rules = ProxyRules.from_environ({"HTTPS_PROXY": "http://proxy.corp:3128"})
    config = MinimaLlmConfig(
        base_url="https://api.example.com/v1", model="m", cache_dir=str(tmp_path)
    )
    backend = OpenAIMinimaLlm(config, transport=make_transport("stdlib", 2, proxies=rules))
    assert str(backend.proxy) == "http://proxy.corp:3128 (from HTTPS_PROXY)"
    assert OpenAIMinimaLlm(config, transport=object()).proxy is None  # type: ignore[arg-type]
