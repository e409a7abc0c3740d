"""Looking after cache files: what one holds, and merging several into one.

A job array on several nodes gives each node its own cache (SQLite's WAL works only
among processes on one host); afterwards the runs are replayed, shared or archived
from one file. Merging keeps, for each key, the row a replay with every file as a
lookup dir would have answered with: the newest ``created_at``.
"""

from __future__ import annotations

import contextlib
import itertools
import math
import os
import shutil
import sqlite3
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import CacheError
from .sqlite import CHECKPOINT_FRAMES, DB_NAME, SqliteFile
from .store import CacheRow

# Rows per transaction: other writers of the target wait at most one chunk's commit.
MERGE_CHUNK = 2_000
# SQLite's files beside a database (a shell glob over a cache directory names them too).
_SIDE_FILES = ("-wal", "-shm", "-journal")


@dataclass(frozen=True)
class CacheStats:
    """What one cache file holds."""

    path: Path
    rows: int
    file_bytes: int
    wal_bytes: int
    oldest: float | None
    newest: float | None
    models: dict[str, int] = field(default_factory=dict)

    def describe(self, top: int = 10) -> str:
        """A few lines for a person: size, dates, and the models with the most rows."""
        lines = [
            f"{self.path}",
            f"  rows     {self.rows:,}",
            f"  size     {_mib(self.file_bytes)} (+ {_mib(self.wal_bytes)} WAL)",
        ]
        if self.oldest is not None and self.newest is not None:
            lines.append(f"  written  {_when(self.oldest)} .. {_when(self.newest)}")
        ranked = sorted(self.models.items(), key=lambda item: (-item[1], item[0]))
        for model, count in ranked[:top]:
            lines.append(f"  model    {model}: {count:,}")
        if len(ranked) > top:
            rest = sum(count for _, count in ranked[top:])
            lines.append(f"  model    ({len(ranked) - top} more): {rest:,}")
        return "\n".join(lines)


@dataclass(frozen=True)
class MergeReport:
    """What a merge did with each source's rows."""

    into: Path
    added: int = 0
    replaced: int = 0
    kept: int = 0
    sources: tuple[Path, ...] = ()
    skipped: int = 0

    def describe(self) -> str:
        """One line for a person."""
        return (
            f"merged {len(self.sources)} cache file(s) into {self.into}: "
            f"{self.added:,} added, {self.replaced:,} replaced by newer, "
            f"{self.kept:,} already there (as new or newer)"
            + (f", {self.skipped:,} unreadable rows skipped" if self.skipped else "")
        )


def cache_file(path: str | os.PathLike[str]) -> Path:
    """The cache file a path names: the file itself, or ``minima_llm.db`` in a directory."""
    given = Path(path).expanduser()
    return given / DB_NAME if given.is_dir() else given


def cache_stats(path: str | os.PathLike[str]) -> CacheStats:
    """Rows, sizes, dates and rows per model of the cache at ``path`` (read-only)."""
    with _reading(cache_file(path)) as (file, conn):
        rows, oldest, newest = conn.execute(
            "SELECT count(*), min(created_at), max(created_at) FROM cache"
        ).fetchone()
        models: dict[str, int] = {}
        if file.has_column("model"):
            for model, count in conn.execute("SELECT model, count(*) FROM cache GROUP BY model"):
                models[model if model is not None else "(not recorded)"] = count
        elif rows:
            models["(not recorded)"] = rows
    db = cache_file(path)
    wal = db.with_name(db.name + "-wal")
    return CacheStats(
        db,
        rows,
        db.stat().st_size,
        wal.stat().st_size if wal.exists() else 0,
        oldest,
        newest,
        models,
    )


def merge_caches(
    into: str | os.PathLike[str],
    sources: Sequence[str | os.PathLike[str]],
    progress: Callable[[str], None] | None = None,
) -> MergeReport:
    """Copy every row of ``sources`` into the cache at ``into`` where it is new or newer.

    ``into`` is a cache directory (``CACHE_DIR``; made if missing), each source a cache
    directory or file. The sources are only read,
    and may be in use by other processes, as may ``into``: rows go in chunks of
    ``MERGE_CHUNK``, each its own transaction, and a row is replaced only by one with a
    later ``created_at``, decided inside that transaction: on a tie, the row already
    there wins, then the source named first.
    """
    note = progress or (lambda _: None)
    directory = Path(into).expanduser()
    if directory.exists() and not directory.is_dir():
        raise CacheError(f"--into must be a cache directory (CACHE_DIR), not the file {directory}")
    target = directory / DB_NAME
    files = []
    for path in map(cache_file, sources):
        if path.name.endswith(_SIDE_FILES):
            note(f"skipped {path}: SQLite's own file, read with its database")
        elif not path.is_file():
            raise CacheError(f"no cache file at {path}")
        else:
            files.append(path)
    totals = Counter[str]()
    merged: list[Path] = []
    with contextlib.closing(_open_target(target)) as out:
        for path in files:
            if _same_file(path, target):
                note(f"skipped {path}: it is the target")
                continue
            counts = _merge_one(out, target, path, note)
            totals.update(counts)
            merged.append(path)
            skipped = (
                f", {counts['skipped']:,} unreadable rows skipped" if counts["skipped"] else ""
            )
            note(
                f"{path}: {counts['added']:,} added, {counts['replaced']:,} replaced, "
                f"{counts['kept']:,} kept{skipped}"
            )
    return MergeReport(
        target,
        totals["added"],
        totals["replaced"],
        totals["kept"],
        tuple(merged),
        totals["skipped"],
    )


def _open_target(target: Path) -> sqlite3.Connection:
    """The target's writer connection (its directory made if missing), or a ``CacheError`` saying why not."""
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        return SqliteFile(
            target, readonly=False, checkpoint_frames=CHECKPOINT_FRAMES
        ).connect_writer()
    except (sqlite3.Error, OSError) as exc:
        raise CacheError(f"cannot write the cache at {target}: {exc}") from exc


def _merge_one(
    out: sqlite3.Connection, target: Path, path: Path, note: Callable[[str], None]
) -> Counter[str]:
    counts = Counter[str]()
    with _reading(path) as (source, conn):
        after = 0
        for chunk in itertools.count(1):
            rows = source.scan(conn, after, MERGE_CHUNK)
            if not rows:
                return counts
            if rows[-1][0] <= after:
                # Rowids go up in a sound file: going back means its pages contradict
                # each other, and reading on would go round for ever.
                raise CacheError(f"{path} is damaged: its rows do not come in order")
            after = rows[-1][0]
            sound = [row for _, row in rows if _sound(row)]
            counts["skipped"] += len(rows) - len(sound)
            counts.update(_upsert_newer(out, target, sound))
            if chunk % 50 == 0:
                note(f"{path}: {chunk * MERGE_CHUNK:,} rows so far")
    raise AssertionError("unreachable")


def _sound(row: CacheRow) -> bool:
    """Whether a row can be kept: text, and a ``created_at`` that orders it (SQLite's NaN is NULL)."""
    created = row.created_at
    return (
        isinstance(row.response_text, str)
        and isinstance(created, (int, float))
        and math.isfinite(created)
    )


def _upsert_newer(out: sqlite3.Connection, target: Path, rows: list[CacheRow]) -> Counter[str]:
    """Write ``rows`` where their key is absent or older, in one transaction; what each did."""
    counts = Counter[str]()
    keys = [row.key for row in rows]
    try:
        out.execute("BEGIN IMMEDIATE")
        try:
            held = dict(_created_at(out, keys))
            fresh = []
            for row in rows:
                had = held.get(row.key)
                if not isinstance(had, (int, float)) or not math.isfinite(had):
                    # Absent, or a row of the target's own that orders nothing: replaced.
                    counts["added" if had is None else "replaced"] += 1
                elif row.created_at > had:
                    counts["replaced"] += 1
                else:
                    counts["kept"] += 1
                    continue
                fresh.append(row)
            out.executemany(
                "INSERT OR REPLACE INTO cache (key, response_text, response_raw, created_at, "
                "model, canonical) VALUES (?, ?, ?, ?, ?, ?)",
                fresh,
            )
            out.execute("COMMIT")
        except BaseException:
            # SQLite may have rolled back already (a full disk): a second ROLLBACK would
            # fail and hide the error that matters.
            if out.in_transaction:
                out.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise CacheError(f"merge into {target} failed: {exc}") from exc
    return counts


def _created_at(out: sqlite3.Connection, keys: list[str]) -> Iterator[tuple[str, float]]:
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        yield from out.execute(f"SELECT key, created_at FROM cache WHERE key IN ({marks})", chunk)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[tuple[SqliteFile, sqlite3.Connection]]:
    """A read-only view of the cache at ``path``; any SQLite error is a ``CacheError`` naming it.

    A run killed with answers in its WAL and no ``-shm`` left would need SQLite to make
    one, owned by whoever reads: in a shared directory that refuses the owner's next
    run. A file that is not ours is then read from a private copy.
    """
    try:
        with _private_copy_if_needed(path) as readable:
            file = SqliteFile(readable, readonly=True, checkpoint_frames=CHECKPOINT_FRAMES)
            with contextlib.closing(file.connect_reader()) as conn:
                yield file, conn
    except (sqlite3.Error, OSError) as exc:
        raise CacheError(f"cannot read the cache at {path}: {exc}") from exc


@contextlib.contextmanager
def _private_copy_if_needed(path: Path) -> Iterator[Path]:
    wal = path.with_name(path.name + "-wal")
    shm = path.with_name(path.name + "-shm")
    needs_index = wal.exists() and wal.stat().st_size > 0 and not shm.exists()
    if not needs_index or path.stat().st_uid == os.geteuid():
        yield path
        return
    with tempfile.TemporaryDirectory(prefix="minima-llm-read-") as scratch:
        copy = Path(scratch) / path.name
        shutil.copyfile(path, copy)
        shutil.copyfile(wal, copy.with_name(copy.name + "-wal"))
        yield copy


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _when(stamp: float) -> str:
    try:
        return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
    except (OverflowError, OSError, ValueError, TypeError):
        return repr(stamp)  # not a time a calendar holds
