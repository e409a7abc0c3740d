"""A TCP server on 127.0.0.1 for tests' hand-written HTTP peers: it owns their connections.

Each test server (a raw upstream, a forward proxy) supplies only what it does with one
connection; starting on a free port, tracking every connection, and stopping without
leaving a handler behind are the same for all of them and live here.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable

Handle = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Listener:
    """Serves ``handle`` on 127.0.0.1; ``stop`` closes every connection it knows of."""

    def __init__(self, handle: Handle) -> None:
        self._handle = handle
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task[object]] = set()
        self.writers: set[asyncio.StreamWriter] = set()  # also a handler's own upstream ones
        self.port = 0

    async def start(self) -> int:
        """Listen on a free port; returns it."""
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self.port

    def drop_connections(self) -> None:
        """Close every connection now, as a server does with idle ones."""
        for writer in list(self.writers):
            writer.close()

    async def stop(self, timeout: float = 5.0) -> int:
        """Stop listening and close every connection; returns how many handlers had to be cancelled.

        Closed, not cancelled, first: Python 3.11's ``start_server`` logs a cancelled
        handler as an error. Only a handler still running ``timeout`` later (one asleep
        in a route, say) is cancelled.
        """
        assert self._server is not None
        self._server.close()
        self.drop_connections()
        stuck: set[asyncio.Task[object]] = set()
        if self._tasks:
            _, stuck = await asyncio.wait(set(self._tasks), timeout=timeout)
            for task in stuck:
                task.cancel()
        await self._server.wait_closed()
        return len(stuck)

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.writers.add(writer)
        try:
            await self._handle(reader, writer)
        finally:
            writer.close()
            self.writers.discard(writer)
            self._tasks.discard(task)


async def read_request(reader: asyncio.StreamReader) -> tuple[str, dict[str, str], bytes] | None:
    """The next request on a connection (first line, lower-cased fields, body); None once it ends."""
    try:
        head = await reader.readuntil(b"\r\n\r\n")
        first, *lines = head.decode("latin-1").split("\r\n")
        fields = dict(line.split(": ", 1) for line in lines if ": " in line)
        headers = {name.lower(): value for name, value in fields.items()}
        body = await reader.readexactly(int(headers.get("content-length", "0")))
    except (asyncio.IncompleteReadError, ConnectionError):
        return None
    return first, headers, body
