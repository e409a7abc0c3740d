"""A thread that owns one SQLite connection and serves batches of async requests.

SQLite calls block, so they run here and never on the event loop. Requests that
queue up while a batch runs are served together: many lookups become one query
and many writes share one commit.

The connection opens when the worker is made, the thread starts at the first
payload, and ``stop`` ends both; the next payload opens them again, so a backend
reused after ``aclose`` keeps its cache. The thread holds the worker and its
handler, never the store, so a store nobody holds is collected and its finalizer
can call ``release``.
"""

from __future__ import annotations

import asyncio
import atexit
import logging
import queue
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

from .. import afterfork
from ..errors import CacheError
from ..loopbound import LoopBound

log = logging.getLogger("minima_llm.cache")

Handler = Callable[[sqlite3.Connection, list[Any]], list[Any]]


class _Job(NamedTuple):
    payload: Any
    future: asyncio.Future[Any] | None
    loop: asyncio.AbstractEventLoop | None


_STOP = object()
# Workers whose thread may be running, for the exit hook (weakly: a thread holds its own).
_started: weakref.WeakSet[ConnectionWorker] = weakref.WeakSet()
# Connections a forked child inherited where ctypes is missing (see _never_close).
_inherited: list[sqlite3.Connection] = []
# How long interpreter exit waits for queued work to be committed, over all workers.
EXIT_WAIT_S = 10.0


class ConnectionWorker:
    """Runs ``handler(conn, payloads) -> results`` on batches of queued payloads.

    ``after(conn)``, if given, runs after each batch's results are handed back: work
    no caller should wait for, done while the thread would otherwise sleep.
    ``closed()``, if given, runs each time the worker has closed its connection.
    """

    def __init__(
        self,
        name: str,
        connect: Callable[[], sqlite3.Connection],
        handler: Handler,
        max_batch: int = 1024,
        after: Callable[[sqlite3.Connection], None] | None = None,
        closed: Callable[[], None] | None = None,
    ) -> None:
        self.name = name
        self._connect = connect
        self._handler = handler
        self._max_batch = max_batch
        self._after = after
        self._closed = closed
        # Guards _queue against a racing put: a job queued after _STOP would never be answered.
        # Reentrant because a finalizer calling ``release`` may run inside a held block (gc).
        self._lock = threading.RLock()
        # The running thread's queue; None while no thread serves (not started yet, or stopped).
        self._queue: queue.SimpleQueue[Any] | None = None
        self._thread: threading.Thread | None = None
        self._released = False
        self._outbox: LoopBound[list[_Job]] = LoopBound(list)
        self.batches = 0
        self.jobs = 0
        # Opened here, in the caller's thread, so a bad file fails at construction; the
        # first thread adopts it, later ones (after a stop) open their own.
        self._conn: sqlite3.Connection | None = connect()
        afterfork.register(self)

    def submit(self, payload: Any) -> asyncio.Future[Any]:
        """Queue a payload; the future resolves with its result on the caller's loop.

        Payloads submitted during one pass of the event loop go to the thread
        together, so a burst of lookups or writes costs one wake-up, not one each.
        """
        loop = asyncio.get_running_loop()
        fut: asyncio.Future[Any] = loop.create_future()
        outbox = self._outbox.get()
        outbox.append(_Job(payload, fut, loop))
        if len(outbox) == 1:
            loop.call_soon(self._flush, outbox)
        return fut

    def flush_pending(self) -> None:
        """Hand this loop's not-yet-sent payloads to the thread now (before a stop)."""
        outbox = self._outbox.get()
        if outbox:
            self._flush(outbox)

    def _flush(self, outbox: list[_Job]) -> None:
        if not outbox:
            return  # sent already by flush_pending (a close): nothing to start a thread for
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
            raise TimeoutError(f"{self.name}: no answer within {timeout}s")
        if isinstance(box[0], BaseException):
            raise box[0]
        return box[0]

    def _put(self, job: Any) -> None:
        with self._lock:
            jobs = self._queue or self._start()
            jobs.put(job)
            if self._released:  # the store was collected while this block ran
                self.stop(wait=False)

    def _start(self) -> queue.SimpleQueue[Any]:
        """Start a thread with a queue of its own (lock held): one thread per opening, however many callers."""
        jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()
        conn, self._conn = self._conn, None
        thread = threading.Thread(target=self._run, args=(jobs, conn), name=self.name, daemon=True)
        try:
            thread.start()
        except RuntimeError as exc:  # out of threads, or the interpreter is shutting down
            self._conn = conn
            # A CacheError, which every caller handles; any other error would leave futures unanswered.
            raise CacheError(f"{self.name}: cannot start a thread: {exc}") from exc
        self._queue, self._thread = jobs, thread
        _started.add(self)
        return jobs

    def stop(self, timeout: float = 30.0, wait: bool = True) -> None:
        """Finish queued work, close the connection and end the thread; the next payload reopens.

        ``wait=False`` returns at once and the thread finishes on its own.
        """
        with self._lock:
            jobs, self._queue = self._queue, None
            conn, self._conn = self._conn, None
            if jobs is not None:
                jobs.put(_STOP)
        if conn is not None:
            self._close(conn)
        thread = self._thread
        if wait and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def release(self) -> None:
        """``stop`` for a finalizer: never waits, as it may run on the event loop or on this thread."""
        self._released = True
        self.stop(wait=False)

    def _run(self, jobs: queue.SimpleQueue[Any], conn: sqlite3.Connection | None) -> None:
        if conn is None:
            try:
                conn = self._connect()
            except Exception as exc:
                self._refuse(jobs, exc)
                return
        try:
            while self._serve_batch(conn, jobs):
                pass
            with self._lock:
                pass  # a put into this queue that began before the stop has finished
            while self._serve_batch(conn, jobs, block=False):
                pass
        finally:
            self._close(conn)

    def _close(self, conn: sqlite3.Connection) -> None:
        conn.close()
        if self._closed is not None:
            self._closed()

    def _refuse(self, jobs: queue.SimpleQueue[Any], exc: Exception) -> None:
        """Answer every queued payload with the reason SQLite did not open; the next payload retries."""
        error = CacheError(f"{self.name}: cannot open the cache: {exc}")
        error.__cause__ = exc
        with self._lock:
            if self._queue is jobs:
                self._queue = None
        pending: list[Any] = []
        while True:
            try:
                item = jobs.get_nowait()
            except queue.Empty:
                break
            if item is not _STOP:
                pending.extend(item if isinstance(item, list) else [item])
        self._deliver(pending, [error] * len(pending))

    def _serve_batch(
        self, conn: sqlite3.Connection, queued: queue.SimpleQueue[Any], block: bool = True
    ) -> bool:
        """Serve one batch; False once ``_STOP`` is seen (or, not blocking, the queue is empty)."""
        try:
            item = queued.get() if block else queued.get_nowait()
        except queue.Empty:
            return False
        jobs: list[Any] = []
        running = True
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
                item = queued.get_nowait()
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
            # Every caller gets the error and reports it (the backend at most once per
            # 10 s): a line per batch here too buried a full disk's log in copies.
            log.debug("%s: batch of %d failed: %s", self.name, len(jobs), exc)
            results = [exc] * len(jobs)
        self._deliver(jobs, results)
        if self._after is not None:
            try:
                self._after(conn)
            except Exception as exc:
                log.error("%s: work after a batch failed: %s", self.name, exc)

    def _deliver(self, jobs: list[Any], results: list[Any]) -> None:
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
                log.debug("%s: dropped %d answers for a closed loop", self.name, len(pairs))

    def after_fork_in_child(self) -> None:
        """In a forked child: drop the parent's thread, queue and locks; the next payload starts afresh.

        SQLite forbids using a connection across fork(), and closing one could take a
        lock or touch the WAL the parent is using: the parent's stays open and
        untouched, and the worker opens its own.
        """
        _started.discard(self)  # no thread of its own to wait for at exit
        if self._conn is not None:
            _never_close(self._conn)
        self._conn = None
        self._queue = None
        self._thread = None
        # A parent thread may have held the lock at the fork; in the child nobody would release it.
        self._lock = threading.RLock()
        self._outbox = LoopBound(list)

    def __repr__(self) -> str:
        jobs = self._queue
        state = "running" if jobs is not None else "idle"
        queued = jobs.qsize() if jobs is not None else 0
        return f"<ConnectionWorker {self.name} {state} batches={self.batches} jobs={self.jobs} queued={queued}>"


@dataclass
class _SyncJob:
    payload: Any
    done: threading.Event
    box: list[Any]


@atexit.register
def _finish_at_exit() -> None:
    # Daemon threads die wherever they are when the interpreter exits: let queued
    # work commit and connections close first, within a bound.
    deadline = time.monotonic() + EXIT_WAIT_S
    for worker in list(_started):
        worker.stop(timeout=max(0.0, deadline - time.monotonic()))


def _never_close(conn: sqlite3.Connection) -> None:
    """Keep ``conn`` from ever being closed in this process, interpreter exit included."""
    # A connection is closed when freed, and interpreter exit frees what module globals
    # hold; one reference that nothing owns is never given back.
    try:
        import ctypes
    except ImportError:  # a Python built without ctypes: closed at exit, not before
        _inherited.append(conn)
        return
    ctypes.pythonapi.Py_IncRef(ctypes.py_object(conn))


def _resolve_all(pairs: list[tuple[asyncio.Future[Any], Any]]) -> None:
    for fut, result in pairs:
        if fut.done():
            continue
        if isinstance(result, BaseException):
            fut.set_exception(result)
        else:
            fut.set_result(result)
