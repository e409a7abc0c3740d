"""A thread that owns one SQLite connection and serves batches of async requests.

SQLite calls block, so they run here and never on the event loop. Requests that
queue up while a batch runs are served together: many lookups become one query
and many writes share one commit.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import sqlite3
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..errors import CacheError
from ..loopbound import LoopBound

log = logging.getLogger("minima_llm.cache")

Handler = Callable[[sqlite3.Connection, list[Any]], list[Any]]


@dataclass
class _Job:
    payload: Any
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


_STOP = object()


class ConnectionWorker:
    """Runs ``handler(conn, payloads) -> results`` on batches of queued payloads."""

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        handler: Handler,
        max_batch: int = 1024,
    ) -> None:
        self._connect = connect
        self._handler = handler
        self._max_batch = max_batch
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._ready = threading.Event()
        self._open_error: BaseException | None = None
        # Guards _stopped against a racing put: a job queued after _STOP would never be answered.
        self._lock = threading.Lock()
        self._stopped = False
        self._outbox: LoopBound[list[_Job]] = LoopBound(list)
        self._thread = threading.Thread(target=self._run, name=name, daemon=True)
        self.batches = 0
        self.jobs = 0
        self._thread.start()

    def wait_ready(self, timeout: float) -> None:
        """Block until the connection is open; re-raise what stopped it from opening."""
        if not self._ready.wait(timeout):
            raise TimeoutError(f"{self._thread.name}: SQLite did not open within {timeout}s")
        if self._open_error is not None:
            raise self._open_error

    def submit(self, payload: Any) -> asyncio.Future[Any]:
        """Queue a payload; the future resolves with its result on the caller's loop.

        Payloads submitted during one pass of the event loop go to the thread
        together, so a burst of lookups or writes costs one wake-up, not one each.
        """
        if self._stopped:
            raise CacheError(f"{self._thread.name}: used after close")
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        outbox = self._outbox.get()
        outbox.append(_Job(payload, fut, loop))
        if len(outbox) == 1:
            loop.call_soon(self._flush, outbox)
        return fut

    @property
    def stopped(self) -> bool:
        """Whether ``stop`` has been called."""
        return self._stopped

    def flush_pending(self) -> None:
        """Hand this loop's not-yet-sent payloads to the thread now (before a stop)."""
        outbox = self._outbox.get()
        if outbox:
            self._flush(outbox)

    def _flush(self, outbox: list[_Job]) -> None:
        jobs = outbox[:]
        outbox.clear()
        try:
            self._put(jobs)
        except CacheError as exc:
            for job in jobs:
                if job.future is not None and not job.future.done():
                    job.future.set_exception(exc)

    def call_sync(self, payload: Any, timeout: float = 60.0) -> Any:
        """Run one payload from synchronous code and wait for its result."""
        done = threading.Event()
        box: list[Any] = []
        self._put(_SyncJob(payload, done, box))
        if not done.wait(timeout):
            raise TimeoutError(f"{self._thread.name}: no answer within {timeout}s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _put(self, job: Any) -> None:
        with self._lock:
            if self._stopped:
                raise CacheError(f"{self._thread.name}: used after close")
            self._queue.put(job)

    def stop(self, timeout: float = 30.0) -> None:
        """Finish queued work, close the connection and end the thread."""
        with self._lock:
            if self._stopped:
                return
            self._stopped = True
            self._queue.put(_STOP)
        self._thread.join(timeout)

    def _run(self) -> None:
        try:
            conn = self._connect()
        except BaseException as exc:  # reported to the opener through wait_ready
            self._open_error = exc
            self._ready.set()
            return
        self._ready.set()
        try:
            while self._serve_batch(conn):
                pass
        finally:
            conn.close()

    def _serve_batch(self, conn: sqlite3.Connection) -> bool:
        first = self._queue.get()
        jobs: list[Any] = []
        running = True
        item = first
        while True:
            if item is _STOP:
                running = False
            elif isinstance(item, list):
                jobs.extend(item)
            else:
                jobs.append(item)
            if len(jobs) >= self._max_batch:
                break
            try:
                item = self._queue.get_nowait()
            except queue.Empty:
                break
        if jobs:
            self._process(conn, jobs)
        return running

    def _process(self, conn: sqlite3.Connection, jobs: list[Any]) -> None:
        self.batches += 1
        self.jobs += len(jobs)
        try:
            results: list[Any] = self._handler(conn, [job.payload for job in jobs])
        except Exception as exc:
            log.error("%s: batch of %d failed: %s", self._thread.name, len(jobs), exc)
            results = [exc] * len(jobs)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any]]] = {}
        for job, result in zip(jobs, results, strict=True):
            if isinstance(job, _SyncJob):
                job.box.append(result)
                job.done.set()
            elif job.loop is not None and job.future is not None:
                by_loop.setdefault(job.loop, []).append((job.future, result))
        for loop, pairs in by_loop.items():
            try:
                loop.call_soon_threadsafe(_resolve_all, pairs)
            except RuntimeError:
                # The caller's loop closed before its answer came back; nobody is waiting.
                log.debug("%s: dropped %d answers for a closed loop", self._thread.name, len(pairs))

    def __repr__(self) -> str:
        state = "alive" if self._thread.is_alive() else "stopped"
        return f"<ConnectionWorker {self._thread.name} {state} batches={self.batches} jobs={self.jobs} queued={self._queue.qsize()}>"


@dataclass
class _SyncJob:
    payload: Any
    done: threading.Event
    box: list[Any]


def _resolve_all(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, result in pairs:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
