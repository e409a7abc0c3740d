"""HTTPS through the standard-library transport: certificates verified against the CA store in force."""

from __future__ import annotations

import json
import shutil
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from minima_llm.http import StdlibTransport, TransportError
from minima_llm.testing import MockServer
from tls_support import self_signed, serving_tls

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = {"Content-Type": "application/json"}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    return self_signed(tmp_path_factory.mktemp("tls"), "127.0.0.1", "IP:127.0.0.1")


@pytest.fixture
async def tls_mock(certificate: tuple[Path, Path]) -> AsyncIterator[MockServer]:
    async with serving_tls(*certificate) as server:
        yield server


async def test_https_with_a_trusted_certificate(
    tls_mock: MockServer, certificate: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch
) -> None:
    # SSL_CERT_FILE is how a corporate or cluster CA bundle is handed to OpenSSL.
    monkeypatch.setenv("SSL_CERT_FILE", str(certificate[0]))
    transport = StdlibTransport(2)
    try:
        assert tls_mock.url.startswith("https://")
        for _ in range(3):
            resp = await transport.post(tls_mock.url + "/chat/completions", BODY, JSON, 5.0)
            assert resp.status == 200
            assert json.loads(resp.body)["choices"][0]["message"]["content"]
        assert transport.opened == 1  # the TLS connection was kept alive
    finally:
        await transport.aclose()


async def test_an_untrusted_certificate_is_refused(tls_mock: MockServer) -> None:
    transport = StdlibTransport(2)
    try:
        with pytest.raises(TransportError) as caught:
            await transport.post(tls_mock.url + "/chat/completions", BODY, JSON, 5.0)
        assert caught.value.kind == "connect"
        assert "CERTIFICATE_VERIFY_FAILED" in str(caught.value)
        assert tls_mock.stats()["requests"] == 0
    finally:
        await transport.aclose()


async def test_verification_can_be_turned_off_explicitly(tls_mock: MockServer) -> None:
    transport = StdlibTransport(2, verify_tls=False)
    try:
        resp = await transport.post(tls_mock.url + "/chat/completions", BODY, JSON, 5.0)
        assert resp.status == 200
    finally:
        await transport.aclose()
