"""HTTPS through the standard-library transport: certificates verified against the CA store in force."""

from __future__ import annotations

import json
import shutil
import ssl
import subprocess
from collections.abc import AsyncIterator
from pathlib import Path

import pytest

from minima_llm.http import StdlibTransport, TransportError
from minima_llm.testing import MockServer

BODY = json.dumps({"model": "m", "messages": [{"role": "user", "content": "hi"}]}).encode()
JSON = {"Content-Type": "application/json"}

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl tool")


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A self-signed certificate for 127.0.0.1 and its key."""
    where = tmp_path_factory.mktemp("tls")
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@pytest.fixture
async def tls_mock(certificate: tuple[Path, Path]) -> AsyncIterator[MockServer]:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(*certificate)
    server = MockServer()
    await server.start(ssl_context=context)
    try:
        yield server
    finally:
        await server.stop()


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
