"""Copying a SQLite file's WAL back into the file on a thread of its own, beside the commits.

SQLite's autocheckpoint runs inside the commit that crosses its threshold, and that
commit then waits while pages are copied and synced: 4-30 ms on the benchmark VM,
against 50 us for a commit that only appends to the WAL. A ``Checkpointer`` runs
those copies on its own thread instead, when the writer asks.
"""

from __future__ import annotations

import atexit
import logging
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path

# Imported for its exit hook: registered before ours, it runs after ours (atexit is
# last-in, first-out), so every checkpointer has stopped before the writers finish.
from .. import afterfork
from ._worker import EXIT_WAIT_S

log = logging.getLogger("minima_llm.cache")

_alive: weakref.WeakSet[Checkpointer] = weakref.WeakSet()


class Checkpointer:
    """Runs PASSIVE checkpoints of one file when asked, while armed.

    Each checkpoint opens a connection of its own and closes it, so between
    checkpoints the store's writer and reader are the file's only connections, and
    the last of them to close still removes the WAL. A store arms it when its writer
    opens and disarms it when it closes; disarmed, it refuses requests, so no thread
    starts after a store was told to stop (a commit landing late, at exit say).
    ``done(ok)`` is called on this thread after each attempt.
    """

    def __init__(self, path: Path, name: str, done: Callable[[bool], None]) -> None:
        self.path = path
        self.name = name
        self._done = done
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._armed = False
        _alive.add(self)
        afterfork.register(self)

    def arm(self) -> None:
        """Accept requests (the store's writer is open)."""
        with self._lock:
            self._armed = True

    def request(self) -> bool:
        """Ask for a checkpoint soon; False if disarmed or no thread could be started."""
        with self._lock:
            if not self._armed:
                return False
            if self._thread is None or not self._thread.is_alive():
                thread = threading.Thread(target=self._run, name=self.name, daemon=True)
                try:
                    thread.start()
                except RuntimeError as exc:  # out of threads, or the interpreter is exiting
                    log.debug("cache: no checkpointer thread for %s: %s", self.path, exc)
                    return False
                self._thread = thread
            self._wake.set()
            return True

    def stop(self, timeout: float | None = None) -> None:
        """Refuse further requests and end the thread after any checkpoint it is running.

        With ``timeout``, wait that long for the thread to end.
        """
        with self._lock:
            self._armed = False
            thread = self._thread
            self._wake.set()
        if timeout is not None and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _run(self) -> None:
        while True:
            self._wake.wait()
            with self._lock:
                self._wake.clear()
                if not self._armed:
                    if self._thread is threading.current_thread():
                        self._thread = None
                    return
            self._done(self._checkpoint_once())

    def _checkpoint_once(self) -> bool:
        try:
            conn = sqlite3.connect(self.path, isolation_level=None)
        except sqlite3.Error as exc:
            log.debug("cache: checkpointer cannot open %s: %s", self.path, exc)
            return False
        try:
            return checkpoint(conn, self.path)
        finally:
            conn.close()

    def after_fork_in_child(self) -> None:
        """In a forked child: no thread runs here, and a parent thread may have held the locks."""
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._thread = None
        # Armed again when the child's writer opens its own connection.
        self._armed = False

    def __repr__(self) -> str:
        state = "armed" if self._armed else "disarmed"
        return f"<Checkpointer {self.path} {state}>"


def checkpoint(conn: sqlite3.Connection, path: Path) -> bool:
    """One PASSIVE checkpoint: it never waits for readers or writers, and copies what it can."""
    try:
        conn.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
    except sqlite3.Error as exc:  # the backstop, or the next checkpoint, copies what this did not
        log.debug("cache: checkpoint of %s failed: %s", path, exc)
        return False
    return True


@atexit.register
def _stop_at_exit() -> None:
    # A checkpoint running while the writers close would keep a connection open, and
    # the WAL would outlive the process.
    deadline = time.monotonic() + EXIT_WAIT_S
    for checkpointer in list(_alive):
        checkpointer.stop(timeout=max(0.0, deadline - time.monotonic()))
