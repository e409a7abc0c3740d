"""Knowing a key is not in the cache file without reading it.

Most gateway requests are misses, and each read costs a trip to the reader thread
and back (about 110 us of a miss's latency and 50-80 us of its CPU on the benchmark
VM). A Bloom filter of every key in the file answers "surely absent" in memory, so a
miss goes straight upstream.

The filter holds the keys of a full scan plus every key this process writes since.
Another process's commits are not in it, so an absence is trusted only while
nothing else has committed since the scan began (the writer counts those commits
through ``PRAGMA data_version`` at each of its own), and only while the writer's
last look is recent (``fresh_s``) and the WAL file is as it saw it then: a commit
anywhere writes into the WAL, which moves its size or its modification time, so one
is noticed at the next miss by a ``stat``. A miss outside those bounds reads as
before, and asks the writer to look again or a new scan to start. What could slip
through is a commit that leaves the WAL's size alone (one that starts the WAL over)
in the same clock tick as the last write seen; its rows are then taken as absent for
``fresh_s`` at most.

Two writable stores of one file in this process would each count the other's
commits as foreign, but only at their next look: a row one of them committed could
be a miss for the other meanwhile. So a filter is trusted only while its store is
the only one open for writing on the file, and only if none opened since its scan
began; with more (a backend built per item, next to the batch's own) every miss
reads, as without a filter. A store that is asked only a few times (that same
backend per item) never scans: the first scan waits for ``scan_after`` lookups.
"""

from __future__ import annotations

import asyncio
import logging
import math
import sqlite3
import threading
import time
import weakref
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple, Protocol

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
# How long after the writer's last look an absence holds at most.
FRESH_S = 0.05
# Lookups a store answers by reading before its first scan: a store used for a request
# or two (a backend per item) is gone before a scan of a large file would pay off.
SCAN_AFTER = 64
# Above this many rowids the filter is sized by counting the rows: rowids another tool
# chose (or a table emptied and refilled) may be far more than the rows.
_COUNT_ABOVE = 1_000_000


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

    # (other processes' commits counted, monotonic time, the WAL file's state) at the
    # writer's last look, replaced whole: read as fields, one look's count could pair
    # with the next's time. The state is None where the WAL could not be read.
    looked: tuple[int, float, Any]

    def wal_state(self) -> Any:
        """The WAL file's state now; equal to the looked one while nobody has committed."""
        ...


class _Held(NamedTuple):
    """A scan's filter, and what it holds for: the writer's count and the stores' joins."""

    keys: KeyFilter
    writes: int
    joins: int


class _Stores:
    """The Absences of one file in this process whose writer is open; ``joins`` counts openings."""

    __slots__ = ("__weakref__", "joins", "members")

    def __init__(self) -> None:
        self.members: weakref.WeakSet[Absences] = weakref.WeakSet()
        self.joins = 0


# Guards _stores_of and each _Stores; the only lock shared by stores of different files.
# Reentrant: a store's finalizer leaves, and may run in garbage collection inside it.
_stores_lock = threading.RLock()
_stores_of: weakref.WeakValueDictionary[str, _Stores] = weakref.WeakValueDictionary()


def _stores_for(path: Path) -> _Stores:
    """The one record of ``path``'s stores in this process."""
    with _stores_lock:
        name = str(path.resolve())
        stores = _stores_of.get(name)
        if stores is None:
            stores = _stores_of[name] = _Stores()
        return stores


class Absences:
    """Decides misses of one SQLite file in memory, while that is safe (module docstring).

    ``watch.looked`` is the writer's count of other processes' commits, with the
    monotonic time it last looked and the WAL file's state then (``watch.wal_state()``
    gives it now); ``look_again()`` queues an empty write, whose commit step looks
    again, on the running loop.
    """

    def __init__(
        self,
        path: Path,
        watch: Watch,
        look_again: Callable[[], asyncio.Future[Any]],
        fresh_s: float = FRESH_S,
        scan_gap_s: float = _MIN_SCAN_GAP_S,
        scan_after: int = SCAN_AFTER,
    ) -> None:
        self.path = path
        self.fresh_s = fresh_s
        self.scan_gap_s = scan_gap_s
        self.scans = 0
        self._unscanned_asks = scan_after
        self._watch = watch
        self._look_again = look_again
        self._looking = False
        self._asked_at = -math.inf
        self._held: _Held | None = None
        # Guards adds to the filters and the hand-over from a scan; never held for a scan.
        self._lock = threading.Lock()
        self._scanning = False
        self._thread: threading.Thread | None = None
        # Bumped by stop: a scan begun before it neither finishes nor counts.
        self._generation = 0
        # Keys the writer entered since the scan running now began: its snapshot may
        # have been taken before their commit.
        self._added_meanwhile: list[str] = []
        # Keys entered whose commit has not returned: a scan beginning now may not see them.
        self._committing: list[str] = []
        self._next_scan_at = 0.0
        self._open = False  # set by join, cleared by leave
        afterfork.register(self)
        self._stores = _stores_for(path)
        self.join()

    def absent(self, key: str) -> bool:
        """True only if ``key`` is surely not in the file; False means read it."""
        held = self._held
        writes, looked_at, wal = self._watch.looked
        if held is None or held.writes != writes or held.joins != self._stores.joins:
            self._scan_soon()
            return False
        if not self._unchanged_since(looked_at, wal):
            self._ask_writer()
            return False
        found = held.keys
        if found.count > found.capacity:
            self._scan_soon()  # a bigger filter; this one still answers, less often
        return not found.might_hold(key)

    def trusted(self) -> bool:
        """Whether a miss would be decided in memory right now."""
        held = self._held
        writes, looked_at, wal = self._watch.looked
        return (
            held is not None
            and held.writes == writes
            and held.joins == self._stores.joins
            and self._unchanged_since(looked_at, wal)
        )

    def _unchanged_since(self, looked_at: float, wal: Any) -> bool:
        """Whether nobody has committed since the writer's last look, as far as is known."""
        if time.monotonic() - looked_at > self.fresh_s:
            return False
        return wal is None or self._watch.wal_state() == wal

    def add(self, keys: list[str]) -> None:
        """Enter keys the writer is about to commit (on its thread, before the commit)."""
        with self._lock:
            held = self._held
            if held is not None:
                for key in keys:
                    held.keys.add(key)
            if self._scanning:
                self._added_meanwhile.extend(keys)
            self._committing = keys

    def join(self) -> None:
        """The store's writer opened: no filter of the file made before holds from now on."""
        with _stores_lock:
            self._stores.members.add(self)
            self._stores.joins += 1
        with self._lock:
            self._open = True

    def leave(self) -> None:
        """The store's writer closed, its last commit in: the others' filters may hold again."""
        with _stores_lock:
            self._stores.members.discard(self)

    def committed(self) -> None:
        """The commit of the keys last added has returned (or failed): a scan now sees it."""
        with self._lock:
            self._committing = []

    def stop(self, timeout: float | None = None) -> None:
        """End a running scan (waiting up to ``timeout``); none starts until the writer reopens."""
        with self._lock:
            self._open = False
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
        if self._unscanned_asks > 0:
            self._unscanned_asks -= 1
            return
        if not self._open:
            self._ask_writer()  # a store closed and used again: reopening joins
            return
        if self._scanning or time.monotonic() < self._next_scan_at:
            return
        # Read before the scan's snapshot, and the joins before the count of stores: a
        # commit elsewhere or a store opened from here on voids the filter.
        writes, joins = self._watch.looked[0], self._stores.joins
        if len(self._stores.members) > 1:
            return  # no filter would be trusted
        with self._lock:
            if self._scanning or not self._open:
                return  # one runs, or a stop came first
            self._scanning = True
            generation = self._generation  # a stop from here on drops the scan
            # A commit under way may land after the scan's snapshot.
            self._added_meanwhile = list(self._committing)
        thread = threading.Thread(
            target=self._scan,
            args=(writes, joins, generation),
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

    def _scan(self, writes: int, joins: int, generation: int) -> None:
        started = time.monotonic()
        found: KeyFilter | None = None
        try:
            found = self._read_keys(generation)
        except Exception as exc:  # a MemoryError too: any failure only leaves misses reading
            log.debug("cache: key scan of %s failed: %r", self.path, exc)
        finally:
            with self._lock:
                if found is not None and generation == self._generation:
                    for key in self._added_meanwhile:
                        found.add(key)
                    self._held = _Held(found, writes, joins)
                    self.scans += 1
                self._added_meanwhile = []
                self._scanning = False
            took = time.monotonic() - started
            self._next_scan_at = time.monotonic() + max(self.scan_gap_s, _SCAN_SPACING * took)

    def _read_keys(self, generation: int) -> KeyFilter | None:
        """Every key in the file, in a filter of twice their number; None if stopped."""
        # mode=rw, not ro, though it only reads: the last connection to close removes the
        # WAL, which a read-only one cannot do, and a scan may outlive the writer (a store
        # dropped unclosed). Not the default mode either, which would create a file
        # deleted under us anew.
        conn = sqlite3.connect(
            f"{self.path.resolve().as_uri()}?mode=rw", uri=True, timeout=_LOOK_TIMEOUT_S
        )
        try:
            (top,) = conn.execute("SELECT max(rowid) FROM cache").fetchone()
            # The largest rowid bounds the number of rows, and costs one step to read.
            if (top or 0) > _COUNT_ABOVE:
                (top,) = conn.execute("SELECT count(*) FROM cache").fetchone()
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
        global _stores_lock
        self._lock = threading.Lock()
        _stores_lock = threading.RLock()  # a parent's thread may have held it at the fork
        self._scanning = self._looking = False
        self._added_meanwhile = []
        self._committing = []
        self._thread = None

    def __repr__(self) -> str:
        held = self._held
        size = f"{held.keys.count}/{held.keys.capacity} keys" if held is not None else "no filter"
        return f"<Absences {self.path.name} {size} scans={self.scans} trusted={self.trusted()}>"
