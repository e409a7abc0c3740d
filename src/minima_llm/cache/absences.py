"""Knowing a key is not in the cache file without reading it.

Most gateway requests are misses, and each read costs a trip to the reader thread
and back (about 110 us of a miss's latency and 50-80 us of its CPU on the benchmark
VM). A Bloom filter of every key in the file answers "surely absent" in memory, so a
miss goes straight upstream.

The filter holds the keys of a full scan plus every key this process writes since.
Another process's commits are not in it, so an absence is trusted only while
nothing else has committed since the scan began (the writer counts those commits
through ``PRAGMA data_version`` at each of its own), and only for ``fresh_s`` after
the writer last looked. A miss outside those bounds reads as before, and asks the
writer to look again or a new scan to start. A row another process commits is thus
treated as absent for ``fresh_s`` at most: less than the time an upstream call
takes, in which two processes missing the same key already both ask.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol

from .. import afterfork

log = logging.getLogger("minima_llm.cache")

# Bits of filter per key of capacity, with two bit positions a key: a false "maybe
# present" (which only costs the read every miss made before) 1.4% of the time at full
# capacity. The filter is at most 2**32 bits, far past any cache, as a hash's half picks one.
_BITS_PER_KEY = 16
_MIN_CAPACITY = 4096
# Keys taken from the scan's cursor at a time, between looks at the stop flag.
_SCAN_CHUNK = 5_000
# After a scan, the next may start only once this many times its duration has passed
# (and at least a second): a file another process writes all the time would otherwise
# be scanned without end. Its misses then read, as without a filter.
_SCAN_SPACING = 10.0
_MIN_SCAN_GAP_S = 1.0
# How long an unanswered request for a look blocks the next.
_LOOK_TIMEOUT_S = 1.0
# How long after the writer's last look at other processes' commits an absence holds.
FRESH_S = 0.05


class KeyFilter:
    """A Bloom filter of strings: ``might_hold`` is never False for a key added."""

    def __init__(self, capacity: int) -> None:
        bits = max(_MIN_CAPACITY, capacity) * _BITS_PER_KEY
        size = 1 << (bits - 1).bit_length()  # a power of two, so a mask picks the bit
        self.capacity = size // _BITS_PER_KEY
        self.count = 0
        self._mask = size - 1
        self._bits = bytearray(size // 8)

    def add(self, key: str) -> None:
        """Add ``key`` (not thread-safe: callers hold one lock per filter)."""
        bits, mask = self._bits, self._mask
        h = hash(key)
        # Two positions from one hash's two halves: str hashes are SipHash, so both are good.
        at = h & mask
        bits[at >> 3] |= 1 << (at & 7)
        at = (h >> 32) & mask
        bits[at >> 3] |= 1 << (at & 7)
        self.count += 1

    def might_hold(self, key: str) -> bool:
        """False only for a key never added."""
        bits, mask = self._bits, self._mask
        h = hash(key)
        at = h & mask
        if not bits[at >> 3] & (1 << (at & 7)):
            return False
        at = (h >> 32) & mask
        return bool(bits[at >> 3] & (1 << (at & 7)))

    @property
    def nbytes(self) -> int:
        """Memory held by the bits."""
        return len(self._bits)


class Watch(Protocol):
    """What the writer keeps up to date about other processes' commits."""

    foreign_writes: int
    checked_at: float


class Absences:
    """Decides misses of one SQLite file in memory, while that is safe (module docstring).

    ``watch.foreign_writes`` is the writer's count of other processes' commits,
    ``watch.checked_at`` the monotonic time of its last look, and ``look_again()``
    queues an empty write, whose commit step looks again, on the running loop.
    """

    def __init__(
        self,
        path: Path,
        watch: Watch,
        look_again: Callable[[], asyncio.Future[Any]],
        fresh_s: float = FRESH_S,
        scan_gap_s: float = _MIN_SCAN_GAP_S,
    ) -> None:
        self.path = path
        self.fresh_s = fresh_s
        self.scan_gap_s = scan_gap_s
        self.scans = 0
        self._watch = watch
        self._look_again = look_again
        self._looking = False
        self._asked_at = -math.inf
        self._filter: KeyFilter | None = None
        # watch.foreign_writes when the filter's scan began: the filter holds while it is unchanged.
        self._scanned_at_writes = -1
        # Guards adds to the filters and the hand-over from a scan; never held for a scan.
        self._lock = threading.Lock()
        self._scanning = False
        self._thread: threading.Thread | None = None
        # Bumped by stop: a scan begun before it neither finishes nor counts.
        self._generation = 0
        # Keys the writer entered since the scan running now began: its snapshot may
        # have been taken before their commit.
        self._added_meanwhile: list[str] = []
        self._next_scan_at = 0.0
        afterfork.register(self)

    def absent(self, key: str) -> bool:
        """True only if ``key`` is surely not in the file; False means read it."""
        found = self._filter
        if found is None or self._scanned_at_writes != self._watch.foreign_writes:
            self._scan_soon()
            return False
        if time.monotonic() - self._watch.checked_at > self.fresh_s:
            self._ask_writer()
            return False
        if found.count > found.capacity:
            self._scan_soon()  # a bigger filter; this one still answers, less often
        return not found.might_hold(key)

    def trusted(self) -> bool:
        """Whether a miss would be decided in memory right now."""
        return (
            self._filter is not None
            and self._scanned_at_writes == self._watch.foreign_writes
            and time.monotonic() - self._watch.checked_at <= self.fresh_s
        )

    def add(self, keys: list[str]) -> None:
        """Enter keys the writer is about to commit (on its thread, before the commit)."""
        with self._lock:
            found = self._filter
            if found is not None:
                for key in keys:
                    found.add(key)
            if self._scanning:
                self._added_meanwhile.extend(keys)

    def stop(self, timeout: float | None = None) -> None:
        """End a running scan (waiting up to ``timeout``); the next miss may start another."""
        self._generation += 1
        thread = self._thread
        if timeout is not None and thread is not None and thread is not threading.current_thread():
            thread.join(timeout)

    def _ask_writer(self) -> None:
        """Have the writer look at other processes' commits again, one request at a time."""
        now = time.monotonic()
        # An answer for a loop that closed first never comes: ask again after a while.
        if self._looking and now - self._asked_at < _LOOK_TIMEOUT_S:
            return
        try:
            looked = self._look_again()
        except RuntimeError:  # no running loop: a synchronous caller reads instead
            return
        self._looking, self._asked_at = True, now
        looked.add_done_callback(self._looked)

    def _looked(self, done: asyncio.Future[Any]) -> None:
        self._looking = False
        if not done.cancelled():
            done.exception()  # retrieved here: a failing cache is reported by its writes

    def _scan_soon(self) -> None:
        if self._scanning or time.monotonic() < self._next_scan_at:
            return
        with self._lock:
            if self._scanning:
                return
            self._scanning = True
            self._added_meanwhile = []
        # Read before the scan's snapshot: a commit in between is counted later and only
        # costs another scan.
        writes = self._watch.foreign_writes
        thread = threading.Thread(
            target=self._scan,
            args=(writes, self._generation),
            name=f"minima-cache-scan:{self.path.name}",
            daemon=True,
        )
        try:
            thread.start()
        except RuntimeError as exc:  # out of threads, or the interpreter is exiting
            log.debug("cache: no scan thread for %s: %s", self.path, exc)
            self._scanning = False
            return
        self._thread = thread

    def _scan(self, writes: int, generation: int) -> None:
        started = time.monotonic()
        found: KeyFilter | None = None
        try:
            found = self._read_keys(generation)
        except sqlite3.Error as exc:
            log.debug("cache: key scan of %s failed: %s", self.path, exc)
        finally:
            with self._lock:
                if found is not None and generation == self._generation:
                    for key in self._added_meanwhile:
                        found.add(key)
                    self._filter, self._scanned_at_writes = found, writes
                    self.scans += 1
                self._added_meanwhile = []
                self._scanning = False
            took = time.monotonic() - started
            self._next_scan_at = time.monotonic() + max(self.scan_gap_s, _SCAN_SPACING * took)

    def _read_keys(self, generation: int) -> KeyFilter | None:
        """Every key in the file, in a filter of twice their number; None if stopped."""
        conn = sqlite3.connect(f"{self.path.resolve().as_uri()}?mode=ro", uri=True)
        try:
            (top,) = conn.execute("SELECT max(rowid) FROM cache").fetchone()
            # Rowids only grow, so the largest bounds the number of rows.
            found = KeyFilter(2 * (top or 0))
            cursor = conn.execute("SELECT key FROM cache")
            while rows := cursor.fetchmany(_SCAN_CHUNK):
                if generation != self._generation:
                    return None
                for (key,) in rows:
                    found.add(key)
            return found
        finally:
            conn.close()

    def after_fork_in_child(self) -> None:
        """In a forked child: no scan runs here; the child's writer reopening forces a new one."""
        self._lock = threading.Lock()
        self._scanning = self._looking = False
        self._added_meanwhile = []
        self._thread = None

    def __repr__(self) -> str:
        found = self._filter
        size = f"{found.count}/{found.capacity} keys" if found is not None else "no filter"
        return f"<Absences {self.path.name} {size} scans={self.scans} trusted={self.trusted()}>"
