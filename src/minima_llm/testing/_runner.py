"""Ways to run the mock server: in a background thread for sync code, or in the foreground."""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import signal
import threading
from collections.abc import Callable
from types import TracebackType
from typing import Any, TypeVar

from ._config import MockConfig
from .mock_server import MockServer

T = TypeVar("T")
_CALL_TIMEOUT_S = 10.0


class ThreadedMockServer:
    """A :class:`MockServer` on its own event loop in a daemon thread.

    Every method marshals onto that loop, so counters and config are only
    ever touched by the thread that serves requests.
    """

    def __init__(
        self, config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.server = MockServer(config)
        self._host = host
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def __repr__(self) -> str:
        return f"<ThreadedMockServer {self.server!r}>"

    @property
    def url(self) -> str:
        """The OpenAI base URL, ``http://host:port/v1``."""
        return self.server.url

    @property
    def root_url(self) -> str:
        """``http://host:port`` without the ``/v1`` prefix."""
        return self.server.root_url

    @property
    def port(self) -> int | None:
        """The port listened on, once started."""
        return self.server.port

    @property
    def config(self) -> MockConfig:
        """The configuration in force."""
        return self.server.config

    def start(self) -> ThreadedMockServer:
        """Start the thread and wait until the server listens; no-op if already running."""
        if self._thread is not None:
            return self
        ready: concurrent.futures.Future[None] = concurrent.futures.Future()
        thread = threading.Thread(
            target=self._run, args=(ready,), name="minima-llm-mock-server", daemon=True
        )
        thread.start()
        try:
            ready.result(timeout=_CALL_TIMEOUT_S)
        except BaseException:
            thread.join(_CALL_TIMEOUT_S)
            raise
        self._thread = thread
        return self

    def stop(self) -> None:
        """Stop the server and its loop and join the thread."""
        thread, self._thread = self._thread, None
        if thread is None or self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._loop.stop)
        thread.join(_CALL_TIMEOUT_S)

    def stats(self) -> dict[str, Any]:
        """A snapshot of the request counters."""
        return self._call(self.server.stats)

    def reset(self) -> None:
        """Zero the counters, drop scripted faults and restart rate limit and random draws."""
        self._call(self.server.reset)

    def set_config(self, config: MockConfig | None = None, **changes: Any) -> MockConfig:
        """Replace the config with ``config`` and/or the named field ``changes``."""
        new = (config or self.server.config).merge(changes)
        self._call(self.server.set_config, new)
        return new

    def fail_next(self, count: int = 1, **fault: Any) -> int:
        """Give the next ``count`` inference requests a fault (see :class:`Fault`)."""
        return self._call(self.server.fail_next, count, **fault)

    def __enter__(self) -> ThreadedMockServer:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()

    def _call(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        if self._loop is None or self._thread is None:
            raise RuntimeError("ThreadedMockServer is not running")

        async def run() -> T:
            return fn(*args, **kwargs)

        future = asyncio.run_coroutine_threadsafe(run(), self._loop)
        return future.result(timeout=_CALL_TIMEOUT_S)

    def _run(self, ready: concurrent.futures.Future[None]) -> None:
        loop = asyncio.new_event_loop()
        try:
            loop.run_until_complete(self.server.start(self._host, self._port))
        except BaseException as exc:
            ready.set_exception(exc)
            loop.close()
            return
        self._loop = loop
        ready.set_result(None)
        try:
            loop.run_forever()
        finally:
            loop.run_until_complete(self.server.stop())
            _cancel_remaining(loop)
            loop.close()


def run_mock_server_in_thread(
    config: MockConfig | None = None, *, host: str = "127.0.0.1", port: int = 0
) -> ThreadedMockServer:
    """Start a mock server in a background thread; use as ``with`` or call ``.stop()``."""
    return ThreadedMockServer(config, host=host, port=port).start()


def serve(host: str = "127.0.0.1", port: int = 8000, config: MockConfig | None = None) -> None:
    """Serve until SIGINT or SIGTERM, after printing ``mock server listening on <url>``.

    Raises ``OSError`` saying where and why when the address cannot be bound.
    """
    with contextlib.suppress(KeyboardInterrupt):
        asyncio.run(_serve_until_signalled(host, port, config))


async def _serve_until_signalled(host: str, port: int, config: MockConfig | None) -> None:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    installed = []
    for signum in (signal.SIGINT, signal.SIGTERM):
        try:
            loop.add_signal_handler(signum, stop.set)
        except (NotImplementedError, RuntimeError, ValueError):
            continue  # Windows or not the main thread: Ctrl-C still raises KeyboardInterrupt
        installed.append(signum)
    try:
        server = await MockServer(config).start(host, port)
    except OSError as exc:
        # Both command lines print this as their one line: where, and why in the OS's words.
        raise OSError(exc.errno, f"cannot listen on {host}:{port}: {exc.strerror or exc}") from exc
    try:
        print(f"mock server listening on {server.url}", flush=True)
        await stop.wait()
    finally:
        await server.stop()
        for signum in installed:
            loop.remove_signal_handler(signum)


def _cancel_remaining(loop: asyncio.AbstractEventLoop) -> None:
    tasks = asyncio.all_tasks(loop)
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.gather(*tasks, return_exceptions=True))
    loop.run_until_complete(loop.shutdown_asyncgens())
