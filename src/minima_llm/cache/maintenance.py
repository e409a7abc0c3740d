"""Looking after cache files: what one holds, and merging several into one.

A job array on several nodes gives each node its own cache (SQLite's WAL works only
among processes on one host); afterwards the runs are replayed, shared or archived
from one file. Merging keeps, for each key, the row a replay with every file as a
lookup dir would have answered with: the newest ``created_at``.
"""

from __future__ import annotations

import contextlib
import os
import sqlite3
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

    def describe(self) -> str:
        """One line for a person."""
        return (
            f"merged {len(self.sources)} cache file(s) into {self.into}: "
            f"{self.added:,} added, {self.replaced:,} replaced by newer, "
            f"{self.kept:,} already there (as new or newer)"
        )


def cache_file(path: str | os.PathLike[str]) -> Path:
    """The cache file a path names: the file itself, or ``minima_llm.db`` in a directory."""
    given = Path(path).expanduser()
    return given / DB_NAME if given.is_dir() else given


def cache_stats(path: str | os.PathLike[str]) -> CacheStats:
    """Rows, sizes, dates and rows per model of the cache at ``path`` (read-only)."""
    file = SqliteFile(cache_file(path), readonly=True, checkpoint_frames=CHECKPOINT_FRAMES)
    with _reading(file) as conn:
        rows, oldest, newest = conn.execute(
            "SELECT count(*), min(created_at), max(created_at) FROM cache"
        ).fetchone()
        models: dict[str, int] = {}
        if file.has_column("model"):
            for model, count in conn.execute("SELECT model, count(*) FROM cache GROUP BY model"):
                models[model if model is not None else "(not recorded)"] = count
        elif rows:
            models["(not recorded)"] = rows
    wal = file.path.with_name(file.path.name + "-wal")
    return CacheStats(
        file.path,
        rows,
        file.path.stat().st_size,
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
    later ``created_at``, decided inside that transaction.
    """
    target = Path(into).expanduser() / DB_NAME
    target.parent.mkdir(parents=True, exist_ok=True)
    writer = SqliteFile(target, readonly=False, checkpoint_frames=CHECKPOINT_FRAMES)
    files = [cache_file(s) for s in sources]
    for path in files:
        if not path.is_file():
            raise CacheError(f"no cache file at {path}")
    totals = Counter[str]()
    merged: list[Path] = []
    with contextlib.closing(writer.connect_writer()) as out:
        for path in files:
            if _same_file(path, target):
                if progress:
                    progress(f"skipped {path}: it is the target")
                continue
            counts = _merge_one(out, SqliteFile(path, True, CHECKPOINT_FRAMES))
            totals.update(counts)
            merged.append(path)
            if progress:
                progress(
                    f"{path}: {counts['added']:,} added, {counts['replaced']:,} replaced, "
                    f"{counts['kept']:,} kept"
                )
    return MergeReport(target, totals["added"], totals["replaced"], totals["kept"], tuple(merged))


def _merge_one(out: sqlite3.Connection, source: SqliteFile) -> Counter[str]:
    counts = Counter[str]()
    with _reading(source) as conn:
        after = 0
        while True:
            rows = source.scan(conn, after, MERGE_CHUNK)
            if not rows:
                return counts
            after = rows[-1][0]
            counts.update(_upsert_newer(out, [row for _, row in rows]))


def _upsert_newer(out: sqlite3.Connection, rows: list[CacheRow]) -> Counter[str]:
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
                if had is None:
                    counts["added"] += 1
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
            out.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        raise CacheError(f"merge into {out} failed: {exc}") from exc
    return counts


def _created_at(out: sqlite3.Connection, keys: list[str]) -> Iterator[tuple[str, float]]:
    for start in range(0, len(keys), 500):
        chunk = keys[start : start + 500]
        marks = ",".join("?" * len(chunk))
        yield from out.execute(f"SELECT key, created_at FROM cache WHERE key IN ({marks})", chunk)


@contextlib.contextmanager
def _reading(file: SqliteFile) -> Iterator[sqlite3.Connection]:
    try:
        conn = file.connect_reader()
    except (sqlite3.Error, OSError) as exc:
        raise CacheError(f"cannot read the cache at {file.path}: {exc}") from exc
    with contextlib.closing(conn):
        yield conn


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.samefile(b)
    except OSError:
        return False


def _mib(size: int) -> str:
    return f"{size / 2**20:,.1f} MiB"


def _when(stamp: float) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(stamp))
