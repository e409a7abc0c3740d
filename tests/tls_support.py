"""Self-signed certificates from the ``openssl`` tool, and the mock server behind TLS."""

from __future__ import annotations

import ssl
import subprocess
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from minima_llm.testing import MockServer


def self_signed(where: Path, subject: str, alt_name: str) -> tuple[Path, Path]:
    """A certificate for ``subject`` (``alt_name`` such as ``DNS:host`` or ``IP:127.0.0.1``) and its key."""
    cert, key = where / "cert.pem", where / "key.pem"
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
            "-subj", f"/CN={subject}", "-addext", f"subjectAltName={alt_name}",
            "-keyout", str(key), "-out", str(cert),
        ],
        check=True,
        capture_output=True,
        timeout=60,
    )  # fmt: skip
    return cert, key


@asynccontextmanager
async def serving_tls(cert: Path, key: Path) -> AsyncIterator[MockServer]:
    """The mock server on 127.0.0.1, answering https with ``cert``."""
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    server = MockServer()
    await server.start(ssl_context=context)
    try:
        yield server
    finally:
        await server.stop()
