"""Helpers for the end-to-end tests: real subprocesses on 127.0.0.1 and plain-HTTP control calls.

Kept out of ``conftest.py`` so test modules can import the helpers by name; the
fixtures that use them live in ``conftest.py``.
"""

from __future__ import annotations

import json
import os
import re
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from minima_llm.testing import MockConfig

MODEL = "mock-model"
API_KEY = "sk-test"
READY_TIMEOUT_S = 30.0
STOP_TIMEOUT_S = 10.0
# The mock answers "mock reply: <last user message>" (see minima_llm.testing._replies).
REPLY_PREFIX = "mock reply: "
_LISTENING = re.compile(r"listening on (http://\S+)")
# Settings a developer's shell may carry that would change what the subprocesses do.
_CONFIG_PREFIXES = ("OPENAI_", "MINIMA_", "CACHE_", "BATCH_", "COOLDOWN_", "LITELLM_")
_CONFIG_NAMES = {
    "RPM",
    "TIMEOUT_S",
    "MAX_ATTEMPTS",
    "MAX_OUTSTANDING",
    "BASE_BACKOFF_S",
    "MAX_BACKOFF_S",
    "JITTER",
    "COMPRESS_GZIP",
    "MODEL_SYNONYMS",
}
# Retries fast enough for tests, slow enough that a Retry-After of 0.2 s is still honoured.
FAST_RETRIES = {
    "RPM": "0",
    "MAX_ATTEMPTS": "4",
    "BASE_BACKOFF_S": "0.02",
    "MAX_BACKOFF_S": "0.2",
    "JITTER": "0",
    "COOLDOWN_CAP_S": "1.0",
    "COOLDOWN_HALFLIFE_S": "1.0",
    "TIMEOUT_S": "10",
}
# Requests (MAX_ATTEMPTS above) the gateway sends before giving up on a failing upstream.
GATEWAY_ATTEMPTS = int(FAST_RETRIES["MAX_ATTEMPTS"])
# Keeps urllib away from any proxy set in the environment: every test talks to 127.0.0.1.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))


def free_port() -> int:
    """A port nothing listens on right now (the kernel's pick for a bind to port 0)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def clean_env(**extra: str) -> dict[str, str]:
    """The parent environment without minima-llm settings, plus ``extra``."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(_CONFIG_PREFIXES) and k not in _CONFIG_NAMES
    }
    env.update(PYTHONUNBUFFERED="1", NO_PROXY="127.0.0.1,localhost", no_proxy="127.0.0.1,localhost")
    env.update(extra)
    return env


def expected_reply(prompt: str) -> str:
    """What the mock answers to a single user message ``prompt``."""
    return REPLY_PREFIX + prompt[:200]


def user(text: str) -> list[dict[str, str]]:
    """A one-message conversation."""
    return [{"role": "user", "content": text}]


@dataclass
class Service:
    """A server subprocess: its process, the URL it announced and its combined output."""

    name: str
    proc: subprocess.Popen[bytes]
    log_path: Path
    url: str = ""
    cache_dir: Path | None = None

    @property
    def root_url(self) -> str:
        """The URL without the ``/v1`` suffix."""
        return self.url.removesuffix("/v1")

    def output(self) -> str:
        """Everything the process printed so far (stdout and stderr)."""
        return self.log_path.read_text(encoding="utf-8", errors="replace")

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        """Wait for the ``... listening on URL`` line, or fail with the process's output."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            match = _LISTENING.search(self.output())
            if match:
                self.url = match.group(1)
                return
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"{self.name} exited with {self.proc.returncode} before listening:\n"
                    + self.output()
                )
            time.sleep(0.02)
        self.stop()
        raise AssertionError(f"{self.name} not listening after {timeout}s:\n{self.output()}")

    def signal(self, signum: int = signal.SIGTERM) -> None:
        """Send ``signum`` if the process still runs."""
        if self.proc.poll() is None:
            self.proc.send_signal(signum)

    def stop(self, timeout: float = STOP_TIMEOUT_S) -> int:
        """SIGTERM, then SIGKILL after ``timeout``; the exit code."""
        self.signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(timeout)


def spawn(
    name: str, argv: list[str], env: dict[str, str], workdir: Path, wait: bool = True
) -> Service:
    """Start ``argv`` with its output in ``workdir/<name>.log`` and wait until it listens."""
    workdir.mkdir(parents=True, exist_ok=True)
    log_path = workdir / f"{name}.log"
    # A file, not a pipe: nobody has to drain it, so a chatty server can never block on write.
    with log_path.open("wb") as log:
        proc = subprocess.Popen(
            argv, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env
        )
    service = Service(name, proc, log_path)
    if wait:
        service.wait_ready()
    return service


def mock_argv(port: int) -> list[str]:
    """The mock upstream's command line."""
    return [sys.executable, "-m", "minima_llm.testing", "--port", str(port)]


def gateway_argv(port: int, *args: str, script: bool = False) -> list[str]:
    """The gateway's command line: ``python -m minima_llm.proxy.cli``, or the console script."""
    command = (
        [str(Path(sys.executable).with_name("minimallm-proxy"))]
        if script
        else [sys.executable, "-m", "minima_llm.proxy.cli"]
    )
    return [*command, "--port", str(port), *args]


def gateway_env(upstream_url: str, cache_dir: Path | None, **extra: str) -> dict[str, str]:
    """Environment for a gateway in front of ``upstream_url`` with fast retries."""
    env = clean_env(
        OPENAI_BASE_URL=upstream_url, OPENAI_MODEL=MODEL, OPENAI_API_KEY=API_KEY, **FAST_RETRIES
    )
    if cache_dir is not None:
        env["CACHE_DIR"] = str(cache_dir)
    env.update(extra)
    return env


@dataclass(frozen=True)
class HttpResult:
    """Status, headers (lower-cased names) and body of one plain HTTP exchange."""

    status: int
    headers: dict[str, str]
    body: bytes

    def json(self) -> Any:
        """The body as JSON."""
        return json.loads(self.body)


def http(
    method: str,
    url: str,
    body: Any = None,
    headers: dict[str, str] | None = None,
    timeout: float = 10.0,
) -> HttpResult:
    """One request with urllib; HTTP errors are returned, not raised."""
    data = body if isinstance(body, bytes) or body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, method=method, headers=headers or {})
    if data is not None and "Content-Type" not in request.headers:
        request.add_header("Content-Type", "application/json")
    try:
        with _OPENER.open(request, timeout=timeout) as resp:
            return HttpResult(resp.status, _lower(resp.headers.items()), resp.read())
    except urllib.error.HTTPError as exc:
        with exc:
            return HttpResult(exc.code, _lower(exc.headers.items()), exc.read())


def _lower(items: Any) -> dict[str, str]:
    return {str(k).lower(): str(v) for k, v in items}


class MockControl:
    """The mock upstream's ``/_mock/*`` routes."""

    def __init__(self, service: Service) -> None:
        self.service = service
        self.url = service.url
        self._root = service.root_url

    def __repr__(self) -> str:
        return f"<MockControl {self.url}>"

    def _call(self, method: str, path: str, body: Any = None) -> Any:
        result = http(method, self._root + path, body)
        assert result.status == 200, (path, result.status, result.body)
        return result.json()

    def stats(self) -> dict[str, Any]:
        """``GET /_mock/stats``."""
        stats: dict[str, Any] = self._call("GET", "/_mock/stats")
        return stats

    def requests(self) -> int:
        """Inference and model requests received so far."""
        return int(self.stats()["requests"])

    def fail_next(self, **fault: Any) -> None:
        """Script faults for the next inference requests."""
        self._call("POST", "/_mock/fail_next", fault)

    def configure(self, **changes: Any) -> None:
        """Change the mock's config (latency, chunk delay, ...)."""
        self._call("POST", "/_mock/config", changes)

    def restore(self) -> None:
        """Default config, no pending faults, zeroed counters."""
        self._call("POST", "/_mock/config", MockConfig().to_dict())
        self._call("POST", "/_mock/reset")

    def wait_in_flight(self, count: int = 1, timeout: float = 5.0) -> None:
        """Wait until at least ``count`` requests are being answered by the mock."""
        deadline = time.monotonic() + timeout
        while self.stats()["concurrency"] < count:
            assert time.monotonic() < deadline, f"mock never had {count} request(s) in flight"
            time.sleep(0.01)
