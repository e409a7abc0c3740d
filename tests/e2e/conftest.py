"""End-to-end fixtures: the mock upstream and ``minimallm-proxy`` as real subprocesses.

Both listen on free ports of 127.0.0.1. One mock and one gateway (with its own
cache directory) serve the whole session; tests that need a gateway configured
differently start their own with ``launch_gateway``. Nothing here may reach the
internet: every test module runs with a guard that blocks and reports any
connection or name lookup beyond loopback made by the test process.
"""

from __future__ import annotations

import ipaddress
import itertools
import sys
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import openai
import pytest
from _e2e_support import (
    API_KEY,
    MockControl,
    Service,
    clean_env,
    free_port,
    gateway_argv,
    gateway_env,
    mock_argv,
    spawn,
)


class _NetworkGuard:
    """An audit hook that blocks and records non-loopback connects and lookups while active.

    Audit hooks cannot be removed, so the hook stays installed and is switched
    on only around the e2e modules.
    """

    def __init__(self) -> None:
        self.active = False
        self.blocked: list[str] = []

    def __call__(self, event: str, args: tuple[Any, ...]) -> None:
        if not self.active:
            return
        if event == "socket.connect" and isinstance(args[1], tuple):
            host = args[1][0]
        elif event == "socket.getaddrinfo" and args[0] is not None:
            host = args[0]
        else:
            return
        if isinstance(host, bytes):
            host = host.decode("ascii", "replace")
        if not _is_local(str(host)):
            self.blocked.append(f"{event} {host}")
            raise OSError(f"e2e tests must stay offline: {event} to {host} blocked")


def _is_local(host: str) -> bool:
    if host in ("localhost", ""):
        return True
    try:
        return ipaddress.ip_address(host.split("%")[0]).is_loopback
    except ValueError:
        return False


_GUARD = _NetworkGuard()
_guard_installed = False


@pytest.fixture(scope="module", autouse=True)
def _offline(tmp_path_factory: pytest.TempPathFactory) -> Iterator[None]:
    """No telemetry, price-map downloads or tracing; any attempt to go online fails the module."""
    global _guard_installed
    if not _guard_installed:
        sys.addaudithook(_GUARD)
        _guard_installed = True
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("OPENAI_API_KEY", API_KEY)
        # A closed loopback port: a client that ignored our base_url fails here, not online.
        mp.setenv("OPENAI_BASE_URL", f"http://127.0.0.1:{free_port()}/v1")
        # litellm otherwise downloads its model price map on import.
        mp.setenv("LITELLM_LOCAL_MODEL_COST_MAP", "True")
        mp.setenv("LITELLM_TELEMETRY", "False")
        mp.setenv("LANGSMITH_TRACING", "false")
        mp.setenv("LANGCHAIN_TRACING_V2", "false")
        mp.setenv("DO_NOT_TRACK", "1")
        mp.setenv("DSPY_CACHEDIR", str(tmp_path_factory.mktemp("dspy-cache")))
        mp.setenv("NO_PROXY", "127.0.0.1,localhost")
        mp.setenv("no_proxy", "127.0.0.1,localhost")
        _GUARD.blocked.clear()
        _GUARD.active = True
        try:
            yield
        finally:
            _GUARD.active = False
    assert not _GUARD.blocked, f"tried to go online: {_GUARD.blocked}"


@pytest.fixture(scope="session")
def e2e_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Working directory (logs, caches) of the session's subprocesses."""
    return tmp_path_factory.mktemp("e2e")


@pytest.fixture(scope="session")
def mock_service(e2e_dir: Path) -> Iterator[Service]:
    """``python -m minima_llm.testing`` for the whole session."""
    service = spawn("mock", mock_argv(0), clean_env(), e2e_dir / "mock")
    yield service
    service.stop()


@pytest.fixture
def mock(mock_service: Service) -> Iterator[MockControl]:
    """The session's mock with default config, no faults and zeroed counters, restored after."""
    control = MockControl(mock_service)
    control.restore()
    yield control
    control.restore()


@pytest.fixture(scope="session")
def gateway(mock_service: Service, e2e_dir: Path) -> Iterator[Service]:
    """``minimallm-proxy`` in front of the mock for the whole session, with its own cache."""
    cache_dir = e2e_dir / "gateway-cache"
    env = gateway_env(mock_service.url, cache_dir)
    service = spawn("gateway", gateway_argv(0), env, e2e_dir / "gateway")
    service.cache_dir = cache_dir
    yield service
    service.stop()


@pytest.fixture
def launch_gateway(mock_service: Service, tmp_path: Path) -> Iterator[Callable[..., Service]]:
    """Start a gateway of the test's own (stopped after the test).

    ``launch_gateway(*args, upstream=url, cache_dir=path, wait=True, script=False, **env)``;
    ``script=True`` runs the ``minimallm-proxy`` console script instead of ``python -m``.
    """
    started: list[Service] = []
    names = itertools.count(1)

    def launch(
        *args: str,
        upstream: str | None = None,
        cache_dir: Path | None = None,
        wait: bool = True,
        script: bool = False,
        **env: str,
    ) -> Service:
        name = f"gateway-{next(names)}"
        cache = cache_dir or tmp_path / f"{name}-cache"
        environ = gateway_env(upstream or mock_service.url, cache, **env)
        # Port 0: the gateway binds a free port itself and prints it, so no other process can take it first.
        argv = gateway_argv(0, *args, script=script)
        service = spawn(name, argv, environ, tmp_path, wait=wait)
        service.cache_dir = cache
        started.append(service)
        return service

    yield launch
    for service in started:
        service.stop()


@pytest.fixture
def unique(request: pytest.FixtureRequest) -> Callable[[str], str]:
    """Prompts no other test asks, so the session-wide cache never answers them by accident."""
    tag = f"{request.node.name[:40]} {uuid.uuid4().hex[:8]}"

    def make(text: str = "question") -> str:
        return f"{text} [{tag}]"

    return make


@pytest.fixture
def client(gateway: Service) -> Iterator[openai.OpenAI]:
    """The OpenAI SDK against the session's gateway, without client-side retries."""
    with openai.OpenAI(base_url=gateway.url, api_key=API_KEY, max_retries=0, timeout=15.0) as sdk:
        yield sdk


@pytest.fixture
async def aclient(gateway: Service) -> AsyncIterator[openai.AsyncOpenAI]:
    """The async OpenAI SDK against the session's gateway, without client-side retries."""
    async with openai.AsyncOpenAI(
        base_url=gateway.url, api_key=API_KEY, max_retries=0, timeout=15.0
    ) as sdk:
        yield sdk
