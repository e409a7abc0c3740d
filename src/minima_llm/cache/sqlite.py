"""The SQLite prompt cache, in the file format minima-llm 0.2.x reads and writes.

File ``{cache_dir}/minima_llm.db`` in WAL mode, table ``cache(key, response_text,
response_raw, created_at, model, canonical)``. One thread reads, one writes, and a
third copies the WAL back into the file; several processes may share the file. The
threads start at first use and end at ``aclose`` (the next use starts them again) or
when the store is garbage-collected.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import re
import sqlite3
import time
import weakref
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

from ..errors import CacheError
from ._checkpoint import Checkpointer, checkpoint
from ._mounts import MOUNTINFO, warn_if_network
from ._worker import ConnectionWorker
from .absences import Absences
from .store import CacheRow

log = logging.getLogger("minima_llm.cache")

DB_NAME = "minima_llm.db"
_SCHEMA = (
    "CREATE TABLE IF NOT EXISTS cache ("
    "key TEXT PRIMARY KEY, response_text TEXT NOT NULL, response_raw TEXT, "
    "created_at REAL NOT NULL, model TEXT, canonical TEXT)"
)
_COLUMN_NAMES = ("key", "response_text", "response_raw", "created_at", "model", "canonical")
# What a 0.2.x file already had; model and canonical came in 0.2.7 (see _migrate).
_REQUIRED = _COLUMN_NAMES[:4]
_COLUMNS = ", ".join(_COLUMN_NAMES)
# Well under SQLite's bound-parameter limit on every build we support.
_CHUNK = 500
_WRITE_CHUNK = _CHUNK // 6  # six parameters a row
_INSERT = f"INSERT OR REPLACE INTO cache ({_COLUMNS}) VALUES"
_ROW_MARKS = "(?, ?, ?, ?, ?, ?)"
# Other processes may hold the write lock; wait this long before giving up on a write.
BUSY_TIMEOUT_S = 60.0
# Estimated WAL frames (pages) written between two checkpoints by the checkpointer
# thread (see _checkpoint.py). The writer then copies only the few frames committed
# meanwhile: the WAL restarts from its start only after a checkpoint that leaves nothing
# behind, which a copy running beside the commits never does, so without that step it
# would grow for as long as commits keep coming. The estimate runs low (real WAL growth
# reaches 1.5-2.5 times it), so this lands near SQLite's own default of 1,000.
CHECKPOINT_FRAMES = 500
# The writer's own autocheckpoint stays as a backstop for a checkpointer that falls behind.
_BACKSTOP_FRAMES = 4_000
# How often the writer looks whether its file is still the one at the path.
_IDENTITY_EVERY_S = 0.5
# What os.stat says of the WAL file: every commit writes into it, moving its size or
# its modification time (a file is never opened for this: closing any descriptor of a
# file drops every POSIX lock SQLite holds on it in this process).
WalState = tuple[int, int, int]
# How SQLite says a ?mode=ro reader could not create the -shm index: SQLITE_CANTOPEN, or
# from 3.22 on, for a user without write access to the directory, SQLITE_READONLY_DIRECTORY.
_NO_INDEX = ("unable to open", "attempt to write a readonly database")
_PAGE_GUESS = 2048  # characters of row text per WAL frame (a page holds about 4,000 bytes)
# A surrogate alone in a str (a JSON "\ud800" escape decodes to one) has no UTF-8 form.
_SURROGATE = re.compile("[\ud800-\udfff]")


class SqliteFile:
    """What the worker threads need of a store: opening, reading, writing, counting.

    The threads hold this and never the store, so a store nobody holds (a backend
    made per item and never closed) is collected and its finalizer stops them.
    """

    def __init__(self, path: Path, readonly: bool, checkpoint_frames: int) -> None:
        self.path = path
        self.readonly = readonly
        self.rows_written = 0
        self.commits = 0
        self.checkpoints = 0
        # Changes by other connections (other processes) seen through the writer's
        # PRAGMA data_version: their commits move it (and their RESTART or TRUNCATE
        # checkpoints, which only costs a batch some extra reads). With when the writer
        # last read it (monotonic) and the WAL file's state just before: while it is
        # unchanged, nobody has committed since. One tuple, replaced whole, so other
        # threads read the parts of one look together.
        self.looked: tuple[int, float, WalState | None] = (0, -math.inf, None)
        self._wal_path = f"{path}-wal"  # a str: os.stat takes it without a conversion
        self._data_version: int | None = None
        # The store's filter of keys held, told when a commit is done; None when read-only.
        self.absences: Absences | None = None
        # Set by the store before its writer opens; None for a read-only file.
        self.checkpointer: Checkpointer | None = None
        self._checkpoint_frames = checkpoint_frames
        # The writer thread's: frames since the last checkpoint, and whether one is asked for.
        self._frames_since_checkpoint = 0
        self._checkpoint_asked = False
        # Set by the checkpointer thread, cleared by the writer's catch-up.
        self._checkpoint_done = False
        # What the reader selects; a read-only file from before 0.2.7 lacks model and canonical.
        self._select = _COLUMNS
        # Set when the file is read without SQLite's index (a directory we cannot write,
        # or a file nobody had open): see ``_read_now``.
        self._immutable = False
        # The file the writer opened (device, inode), to notice it being deleted under us.
        self._identity: tuple[int, int] | None = None
        self._identity_checked_at = -math.inf

    def connect_writer(self) -> sqlite3.Connection:
        _check_writable(self.path)
        conn = sqlite3.connect(
            self.path, timeout=BUSY_TIMEOUT_S, isolation_level=None, check_same_thread=False
        )
        try:
            _retry_locked(lambda: conn.execute("PRAGMA journal_mode=WAL"))
            # NORMAL in WAL mode survives a killed process; only power loss can drop the last commits.
            conn.execute("PRAGMA synchronous=NORMAL")
            conn.execute(f"PRAGMA wal_autocheckpoint={_BACKSTOP_FRAMES}")
            _retry_locked(lambda: conn.execute(_SCHEMA))
            _migrate(conn)
            # Reopened (after a close, or in a forked child): whatever others wrote
            # while no writer watched is in the new baseline, so assume they did.
            reopened = self._data_version is not None
            wal = self.wal_state()  # before the baseline: a commit between counts
            self._data_version = _data_version(conn)
            self.looked = (self.foreign_writes + reopened, time.monotonic(), wal)
            if self.absences is not None:
                self.absences.join()  # the first opening joins as the Absences is made
        except BaseException:
            conn.close()  # else Python 3.13 warns about an unclosed database
            raise
        if self.checkpointer is not None:
            self.checkpointer.arm()  # a store reopened after a close checkpoints again
        # A request the checkpointer dropped at a close, or left behind in the parent of a
        # forked child, is never answered: without this the writer would never ask again.
        self._checkpoint_asked = False
        self._identity = _identity(self.path)
        return conn

    def writer_closed(self) -> None:
        """The writer's connection closed: its commits are all in, it voids no filter now."""
        if self.absences is not None:
            self.absences.leave()

    def _file_changed(self) -> bool:
        # SQLite goes on writing into an open file that was deleted (the cache directory
        # cleared mid-run, say): those rows would vanish with it, and no error says so.
        # Looked at twice a second, not per commit: a stat is one more GIL hand-off.
        now = time.monotonic()
        if now < self._identity_checked_at + _IDENTITY_EVERY_S:
            return False
        self._identity_checked_at = now
        return _identity(self.path) != self._identity

    def checkpointed(self, ok: bool) -> None:
        """The checkpointer's report: the writer catches up at its next batch, whatever the outcome."""
        if ok:
            self.checkpoints += 1
        self._checkpoint_done = True

    def catch_up(self, conn: sqlite3.Connection) -> None:
        """On the writer, once the checkpointer has copied: the rest, so the next write restarts the WAL.

        Run after a batch's answers are out, so it delays only a batch already waiting.
        """
        if not self._checkpoint_done:
            return
        self._checkpoint_done = self._checkpoint_asked = False
        self._frames_since_checkpoint = 0
        checkpoint(conn, self.path)

    def _wrote(self, rows: list[CacheRow]) -> None:
        """Count a commit's frames (an estimate; see CHECKPOINT_FRAMES) and ask for a checkpoint when due."""
        text = sum(len(r[1]) + len(r[2] or "") + len(r[5] or "") for r in rows)
        self._frames_since_checkpoint += 1 + 2 * len(rows) + text // _PAGE_GUESS
        if (
            self._frames_since_checkpoint >= self._checkpoint_frames
            and not self._checkpoint_asked
            and self.checkpointer is not None
        ):
            # Refused while the store closes, or without a thread: asked again next commit.
            self._checkpoint_asked = self.checkpointer.request()

    def connect_reader(self) -> sqlite3.Connection:
        if not self.readonly:
            conn = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_S, check_same_thread=False)
            return self._checked(conn)
        if not self.path.exists():
            raise FileNotFoundError(f"no cache file at {self.path}")
        uri = self.path.resolve().as_uri()
        if not _in_wal_mode(self.path):
            # A file of minima-llm before 0.2.7 may still use a rollback journal. Its readers
            # take locks on the file itself and make no side files, and immutable=1 would
            # skip a hot -journal (a writer killed mid-commit) and read torn, uncommitted pages.
            return self._checked_rollback(_connect_uri(uri + "?mode=ro"))
        if not self._open_elsewhere():
            # A ?mode=ro reader creates a -wal and a -shm beside a file nobody has open
            # and, being read-only, never removes them. In a shared directory those are
            # this user's, and refuse the owner's next run (see _check_writable). Read
            # as in a read-only directory instead, which leaves no file behind.
            self._immutable = True
            return self._checked(_connect_uri(uri + "?immutable=1"))
        try:
            return self._checked(_connect_uri(uri + "?mode=ro"))
        except sqlite3.OperationalError as exc:
            if not any(text in str(exc) for text in _NO_INDEX) or self._wal_in_use():
                raise
            # A WAL-mode file in a directory this process cannot write (a read-only mount,
            # an archived run): a ?mode=ro reader must create the -shm index and cannot.
            # With no WAL left to read (the writer closed cleanly), the file alone is the
            # whole cache, and immutable=1 reads it without the index or any locks.
            log.info("cache: %s is in a read-only directory, reading it as immutable", self.path)
            self._immutable = True
            return self._checked(_connect_uri(uri + "?immutable=1"))

    def _checked_rollback(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        try:
            return self._checked(conn)
        except sqlite3.OperationalError as exc:
            if "readonly" not in str(exc) and "read-only" not in str(exc):
                raise
            # SQLite must roll a hot journal back before anyone reads, and a reader cannot.
            raise sqlite3.OperationalError(
                f"{self.path} has a -journal left by a writer that was killed mid-write; "
                "open it once where it can be written (as its cache_dir) to roll it back"
            ) from exc

    def _open_elsewhere(self) -> bool:
        """Whether a connection may have the file open: a -shm exists, or its WAL holds commits."""
        shm = self.path.with_name(self.path.name + "-shm")
        return shm.exists() or self._wal_in_use()

    def _wal_in_use(self) -> bool:
        wal = self.path.with_name(self.path.name + "-wal")
        return wal.exists() and wal.stat().st_size > 0

    def _read_now(self) -> sqlite3.Connection:
        """A connection for one read of a file read without its -shm index (``_immutable``).

        immutable=1 promises SQLite that nobody changes the file, but its owner may
        run again and write to it; a connection kept open would then read pages from
        two versions. So none outlives a read, and a WAL in use means the owner is
        writing now: its -shm exists, and a ?mode=ro reader can share it.
        """
        uri = self.path.resolve().as_uri()
        return _connect_uri(uri + ("?mode=ro" if self._wal_in_use() else "?immutable=1"))

    def _checked(self, conn: sqlite3.Connection) -> sqlite3.Connection:
        """``conn`` made read-only and checked to hold a cache table (closed if not)."""
        try:
            conn.execute("PRAGMA query_only=1")
            # Checked here so a lookup dir holding some other file fails at open, not at every read.
            have = _cache_columns(conn)
        except BaseException:
            conn.close()
            raise
        self._select = ", ".join(c if c in have else f"NULL AS {c}" for c in _COLUMN_NAMES)
        return conn

    def read(self, conn: sqlite3.Connection, requests: list[list[str]]) -> list[Any]:
        try:
            # Not through _one_read: a lookup is on every miss's path, a generator is not free.
            if self._immutable:
                with contextlib.closing(self._read_now()) as now:
                    return _read_batch(now, requests, self._select)
            return _read_batch(conn, requests, self._select)
        except sqlite3.Error as exc:
            raise CacheError(f"cache read from {self.path} failed: {exc}") from exc

    def scan(self, conn: sqlite3.Connection, after: int, limit: int) -> list[tuple[int, CacheRow]]:
        """Up to ``limit`` rows (with their rowid) in rowid order, past rowid ``after``."""
        sql = f"SELECT rowid, {self._select} FROM cache WHERE rowid > ? ORDER BY rowid LIMIT ?"
        try:
            with self._one_read(conn) as now:
                # Text that is not UTF-8 (written by some other tool) is kept with U+FFFD
                # in its place, not a reason to stop reading the file.
                now.text_factory = _lenient_text
                found = now.execute(sql, (after, limit)).fetchall()
        except sqlite3.Error as exc:
            raise CacheError(f"cache read from {self.path} failed: {exc}") from exc
        return [(r[0], CacheRow._make(r[1:])) for r in found]

    def has_column(self, name: str) -> bool:
        """Whether the file's table has column ``name`` (known once a reader is connected)."""
        return name in _COLUMN_NAMES and f"NULL AS {name}" not in self._select

    @contextlib.contextmanager
    def _one_read(self, conn: sqlite3.Connection) -> Iterator[sqlite3.Connection]:
        """The connection for one read: ``conn``, or one of its own for a file read as immutable."""
        if not self._immutable:
            yield conn
            return
        with contextlib.closing(self._read_now()) as now:
            yield now

    def write_batch(self, conn: sqlite3.Connection, batches: list[list[CacheRow]]) -> list[Any]:
        rows = [row for batch in batches for row in batch]
        absences = self.absences
        if rows:
            if absences is None:
                self._commit(conn, rows)
            else:
                # Before the commit: from it on, a lookup that trusts the filter must read.
                absences.add([row[0] for row in rows])
                try:
                    self._commit(conn, rows)
                finally:
                    absences.committed()
        # An empty batch only asks for this look at other processes' commits.
        wal = self.wal_state()  # before data_version, which then covers what it shows
        try:
            version: int | None = _data_version(conn)
        except sqlite3.Error:
            version = None  # the rows are committed; count it as a change nobody saw
        writes = self.foreign_writes
        if version is None or version != self._data_version:
            self._data_version = version
            writes += 1
        self.looked = (writes, time.monotonic(), wal)
        return [None] * len(batches)

    @property
    def foreign_writes(self) -> int:
        """Commits by other connections the writer has noticed."""
        return self.looked[0]

    def wal_state(self) -> WalState | None:
        """The WAL file's state now (a commit anywhere changes it); None if unknown."""
        return _wal_state(self._wal_path)

    def _commit(self, conn: sqlite3.Connection, rows: list[CacheRow]) -> None:
        def commit() -> None:
            if len(rows) <= _WRITE_CHUNK:
                # One statement in autocommit mode is its own transaction: one call into
                # SQLite instead of three, and each call is a GIL hand-off with the loop.
                conn.execute(f"{_INSERT} {','.join([_ROW_MARKS] * len(rows))}", _flat(rows))
                return
            conn.execute("BEGIN IMMEDIATE")
            try:
                # One multi-row statement per chunk rather than executemany: the sqlite3
                # module releases the GIL around every step, and each release lets the
                # busy event-loop thread in, costing a thread switch per row.
                for start in range(0, len(rows), _WRITE_CHUNK):
                    chunk = rows[start : start + _WRITE_CHUNK]
                    marks = ",".join([_ROW_MARKS] * len(chunk))
                    conn.execute(f"{_INSERT} {marks}", _flat(chunk))
                conn.execute("COMMIT")
            except BaseException:
                # A failed COMMIT (disk full, I/O error) leaves the transaction open;
                # without the rollback every later write fails as a nested BEGIN.
                if conn.in_transaction:
                    conn.execute("ROLLBACK")
                raise

        try:
            try:
                _retry_locked(commit)
            except UnicodeEncodeError:
                # sqlite3 binds text as UTF-8 and refuses the whole statement, so one answer
                # holding a lone surrogate would leave every row written with it uncached.
                rows = [_storable(row) for row in rows]
                _retry_locked(commit)
        except sqlite3.Error as exc:
            raise CacheError(f"cache write to {self.path} failed: {exc}") from exc
        if self._file_changed():
            raise CacheError(
                f"cache file {self.path} was deleted or replaced while open: answers since "
                "are not cached; restart to cache at that path again"
            )
        self.rows_written += len(rows)
        self.commits += 1
        self._wrote(rows)


class SqliteStore:
    """A ``CacheStore`` on one SQLite file; ``readonly`` for lookup caches of other runs.

    ``checkpoint_frames`` is about how many WAL pages (an estimate from the rows' size)
    the writer appends before the checkpointer thread copies them into the file.
    ``mountinfo`` is the file that tells which filesystem holds it (a test's own).
    """

    def __init__(
        self,
        path: str | os.PathLike[str],
        readonly: bool = False,
        checkpoint_frames: int = CHECKPOINT_FRAMES,
        *,
        mountinfo: str | os.PathLike[str] = MOUNTINFO,
    ) -> None:
        # Absolute now: the checkpointer and a reopened worker connect again later, and a
        # relative path would follow an os.chdir to another file (and a false "replaced").
        self.path = Path(os.path.abspath(path))
        self.readonly = readonly
        self._file = file = SqliteFile(self.path, readonly, checkpoint_frames)
        self._writer: ConnectionWorker | None = None
        self._absences: Absences | None = None
        try:
            if not readonly:
                self.path.parent.mkdir(parents=True, exist_ok=True)
                # Only a writer: a lookup cache on a shared dataset mount is the normal
                # case, and is safe while nobody writes it from another host.
                warn_if_network(str(self.path), mountinfo)
                # Before the writer, whose opening arms it.
                file.checkpointer = Checkpointer(
                    self.path, f"minima-cache-checkpoint:{self.path.name}", file.checkpointed
                )
                self._writer = ConnectionWorker(
                    f"minima-cache-writer:{self.path.name}",
                    file.connect_writer,
                    file.write_batch,
                    after=file.catch_up,
                    closed=file.writer_closed,
                )
                # Told only of the file and the writer: the threads hold it, never the store.
                writer = self._writer
                self._absences = file.absences = Absences(
                    self.path, file, lambda: writer.submit([])
                )
            self._reader = ConnectionWorker(
                f"minima-cache-reader:{self.path.name}", file.connect_reader, file.read
            )
        except (OSError, sqlite3.Error) as exc:
            self._stop_workers()
            raise CacheError(
                f"cannot open cache {self.path}: {exc}{_why(self.path, readonly)}"
            ) from exc
        # A store dropped without aclose (reference 002 builds a backend per item and never
        # closes it) must not keep its threads and files open for the rest of the process.
        weakref.finalize(
            self, _release, file.checkpointer, self._absences, self._writer, self._reader
        )

    @classmethod
    def in_dir(
        cls,
        cache_dir: str | os.PathLike[str],
        readonly: bool = False,
        *,
        mountinfo: str | os.PathLike[str] = MOUNTINFO,
    ) -> SqliteStore:
        """The store at ``{cache_dir}/minima_llm.db``."""
        return cls(Path(cache_dir) / DB_NAME, readonly=readonly, mountinfo=mountinfo)

    @property
    def rows_written(self) -> int:
        """Rows committed by this store."""
        return self._file.rows_written

    @property
    def commits(self) -> int:
        """Commits made by this store."""
        return self._file.commits

    @property
    def foreign_writes(self) -> int:
        """Commits by other processes noticed since the store opened (checked at each commit)."""
        return self._file.foreign_writes

    @property
    def reads(self) -> int:
        """Lookups the reader thread has served (a miss decided in memory is not one)."""
        return self._reader.jobs

    @property
    def checkpoints(self) -> int:
        """WAL checkpoints the checkpointer thread has run."""
        return self._file.checkpoints

    def absent_now(self, key: str) -> bool:
        """True only if ``key`` is surely not in the file, decided without reading it."""
        return self._absences is not None and self._absences.absent(key)

    async def get_many(self, keys: Sequence[str]) -> dict[str, CacheRow]:
        """The rows found among ``keys`` (one query per batch of waiting lookups)."""
        if not keys:
            return {}
        result: dict[str, CacheRow] = await self._reader.submit(list(keys))
        return result

    def get_many_sync(self, keys: Sequence[str]) -> dict[str, CacheRow]:
        """``get_many`` for synchronous callers (tools, tests)."""
        result: dict[str, CacheRow] = self._reader.call_sync(list(keys))
        return result

    async def put_many(self, rows: Iterable[CacheRow]) -> None:
        """Store rows; returns after the commit that holds them."""
        batch = list(rows)
        if not batch:
            return
        if self._writer is None:
            raise CacheError(f"cache {self.path} is read-only")
        await self._writer.submit(batch)

    def put_many_sync(self, rows: Iterable[CacheRow]) -> None:
        """``put_many`` for synchronous callers."""
        batch = list(rows)
        if not batch:
            return
        if self._writer is None:
            raise CacheError(f"cache {self.path} is read-only")
        self._writer.call_sync(batch)

    async def aclose(self) -> None:
        """Finish pending writes and close the connections; the next use opens them again."""
        for worker in (self._writer, self._reader):
            if worker is not None:
                worker.flush_pending()
        await asyncio.to_thread(self.close)

    def close(self, timeout: float = 30.0) -> None:
        """Synchronous ``aclose``, waiting up to ``timeout`` for each thread to finish."""
        self._stop_workers(timeout)

    def _stop_workers(self, timeout: float = 30.0) -> None:
        # The scan and the checkpointer first: the writer's last commits then ask them
        # for nothing, and the writer, closing last, removes the WAL.
        absences = getattr(self, "_absences", None)
        if absences is not None:
            absences.stop(timeout)  # and no miss arriving meanwhile starts another
        file = getattr(self, "_file", None)
        checkpointer = file.checkpointer if file is not None else None
        if checkpointer is not None:
            checkpointer.stop(timeout)
        for worker in (getattr(self, "_writer", None), getattr(self, "_reader", None)):
            if worker is not None:
                worker.stop(timeout)

    def __repr__(self) -> str:
        mode = "ro" if self.readonly else "rw"
        return f"<SqliteStore {self.path} {mode} rows_written={self.rows_written} commits={self.commits} checkpoints={self.checkpoints}>"


def _release(
    checkpointer: Checkpointer | None,
    absences: Absences | None,
    *workers: ConnectionWorker | None,
) -> None:
    """The finalizer of a store nobody closed: queued work still commits, nothing waits for it."""
    if checkpointer is not None:
        checkpointer.stop()
    if absences is not None:
        absences.stop()  # a scan running ends at its next chunk
    for worker in workers:
        if worker is not None:
            worker.release()


def _why(path: Path, readonly: bool) -> str:
    """A hint for an open that failed: SQLite says only "unable to open database file"."""
    directory = path.parent
    if not directory.is_dir() or os.access(directory, os.W_OK | os.X_OK):
        return ""
    if not readonly:
        why = "is on a read-only filesystem" if _read_only_fs(directory) else "is not writable"
        return f" (the directory {directory} {why}: point cache_dir elsewhere)"
    wal_in_use = False
    wal = path.with_name(path.name + "-wal")
    with contextlib.suppress(OSError):  # a directory we cannot even search: no hint
        wal_in_use = wal.stat().st_size > 0
    if wal_in_use:
        # A lookup needs no write access, except to read commits still in the WAL: SQLite
        # must then create the -shm index beside it (see connect_reader).
        return (
            f" (the directory {directory} is not writable and {wal.name} holds commits "
            "not yet in the file: copy the directory somewhere writable, or let the run "
            "that wrote it close it cleanly)"
        )
    return ""


def _check_writable(path: Path) -> None:
    """Refuse a cache file (or its WAL or index) this process may not write.

    SQLite opens such a file read-only without a word and refuses only the first
    commit, so every answer of the run would be paid for and none kept. Asking
    SQLite for the write lock instead would wait on any other process's transaction.
    """
    # Plain access(2): effective_ids makes glibc use faccessat2, which older Docker
    # seccomp profiles answer with EPERM, and every file would look read-only.
    for part in (path, path.with_name(path.name + "-wal"), path.with_name(path.name + "-shm")):
        # Asked again after a refusal: another store's last close removes its -wal and
        # -shm, and access() says no for a file gone since exists() saw it.
        if part.exists() and not os.access(part, os.W_OK) and part.exists():
            # An sqlite3 error, so the store's constructor cleans up and says CacheError.
            if _read_only_fs(part):
                # A read-only mount (a shared dataset, a container's ro bind): no owner
                # can make it writable, and asking them would send the user astray.
                raise sqlite3.OperationalError(
                    f"{part} is on a read-only filesystem, where a cache can only be read: "
                    "name its directory in CACHE_LOOKUP_DIRS"
                )
            raise sqlite3.OperationalError(
                f"{part} is not writable by this user: ask its owner to make it group-"
                "writable, or use another cache_dir (a cache only to read from belongs in "
                "CACHE_LOOKUP_DIRS)"
            )


def _lenient_text(data: bytes) -> str:
    return data.decode("utf-8", "replace")


def _in_wal_mode(path: Path) -> bool:
    """Whether the database file's header says WAL (byte 18 is 2; 1 is a rollback journal).

    An empty or unreadable header is taken as WAL, the mode every writer here sets.
    """
    try:
        with open(path, "rb") as fh:
            header = fh.read(19)
    except OSError:
        return True
    return len(header) < 19 or header[18] == 2


def _read_only_fs(path: Path) -> bool:
    """Whether ``path`` is on a filesystem mounted read-only."""
    try:
        return bool(os.statvfs(path).f_flag & os.ST_RDONLY)
    except (OSError, AttributeError):  # Windows has no statvfs
        return False


def _wal_state(path: str) -> WalState | None:
    """The WAL file's inode, size and modification time; None if it cannot be read."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return (st.st_ino, st.st_size, st.st_mtime_ns)


def _data_version(conn: sqlite3.Connection) -> int:
    row = conn.execute("PRAGMA data_version").fetchone()
    return int(row[0])


def _connect_uri(uri: str) -> sqlite3.Connection:
    return sqlite3.connect(uri, uri=True, timeout=BUSY_TIMEOUT_S, check_same_thread=False)


def storable_text(text: str) -> str:
    """``text`` with each lone surrogate replaced by U+FFFD, as a UTF-8 decoder would show it."""
    return _SURROGATE.sub("\ufffd", text)


def _storable(row: CacheRow) -> CacheRow:
    return CacheRow._make(storable_text(v) if isinstance(v, str) else v for v in row)


def _flat(rows: list[CacheRow]) -> list[Any]:
    return [v for row in rows for v in row]


def _read_batch(conn: sqlite3.Connection, requests: list[list[str]], select: str) -> list[Any]:
    wanted = list(dict.fromkeys(k for keys in requests for k in keys))
    found: dict[str, CacheRow] = {}
    for start in range(0, len(wanted), _CHUNK):
        chunk = wanted[start : start + _CHUNK]
        marks = ",".join("?" * len(chunk))
        for row in conn.execute(f"SELECT {select} FROM cache WHERE key IN ({marks})", chunk):
            found[row[0]] = CacheRow._make(row)
    return [{k: found[k] for k in keys if k in found} for keys in requests]


def _cache_columns(conn: sqlite3.Connection) -> set[str]:
    """The columns of the file's ``cache`` table, refused unless it is ours (of any version)."""
    have = [row[1] for row in conn.execute("PRAGMA table_info(cache)")]
    if not have:
        raise sqlite3.DatabaseError("no cache table" + _empty_hint(conn))
    if not set(_REQUIRED) <= set(have):
        # Some other program's table: writing would fail on every row, reading would
        # return rows without their text, and migrating would alter a file not ours.
        raise sqlite3.DatabaseError(
            f"not a minima-llm cache: table cache has columns ({', '.join(have)}), "
            f"needs ({', '.join(_REQUIRED)})"
        )
    return set(have)


def _empty_hint(conn: sqlite3.Connection) -> str:
    """Why a file may hold no table at all: most often, its WAL was left behind."""
    if conn.execute("SELECT 1 FROM sqlite_master LIMIT 1").fetchone() is not None:
        return ""  # some other program's database
    # The file of a run killed (or still running) copied alone: until a checkpoint,
    # even the table exists only in the -wal file beside the original.
    return (
        " (copied without the -wal file beside it? a run that was killed or is still "
        "running keeps its latest answers there: copy both)"
    )


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the ``model`` and ``canonical`` columns to a file from before minima-llm 0.2.7."""
    have = _cache_columns(conn)
    for column in ("model", "canonical"):
        if column in have:
            continue
        try:
            conn.execute(f"ALTER TABLE cache ADD COLUMN {column} TEXT")
        except sqlite3.OperationalError as exc:
            # Another process migrating the same file at the same moment got there first.
            if "duplicate column" not in str(exc):
                raise
        log.info("cache: added column %s to an older cache file", column)


def _retry_locked(fn: Any, deadline_s: float = BUSY_TIMEOUT_S) -> Any:
    """Run ``fn``, retrying while another process holds the lock, up to ``deadline_s``.

    busy_timeout covers most waits, but SQLite returns SQLITE_BUSY at once when
    waiting could deadlock (e.g. a WAL-mode switch racing other writers).
    """
    end = time.monotonic() + deadline_s
    delay = 0.005
    while True:
        try:
            return fn()
        except sqlite3.OperationalError as exc:
            if ("locked" not in str(exc) and "busy" not in str(exc)) or time.monotonic() > end:
                raise
            time.sleep(delay)
            delay = min(delay * 2, 0.25)


def _identity(path: Path) -> tuple[int, int] | None:
    """The (device, inode) of the file at ``path``; None if there is none."""
    try:
        st = os.stat(path)
    except OSError:
        return None
    return st.st_dev, st.st_ino
