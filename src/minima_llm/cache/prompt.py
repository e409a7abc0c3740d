"""The prompt cache as the backend sees it: primary store, model synonyms, lookup caches, trace."""

from __future__ import annotations

import json
import logging
import threading
import time
import weakref
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from types import EllipsisType
from typing import IO

from ..errors import ConfigError
from .memory import MemoryStore
from .sqlite import SqliteStore
from .store import CacheRow, CacheStore, newest

log = logging.getLogger("minima_llm.cache")
# The in-memory layer's bound in characters of row text, beside its bound in rows
# (memory_cache_entries): the gateway keeps 10,000 rows, and long answers or embeddings
# would otherwise fill gigabytes. Past it, hits come from the file.
MEMORY_BYTES = 256 * 2**20

Rekey = Callable[[str], tuple[str, str]]


class Prefetched(dict[str, CacheRow | None]):
    """Primary rows read up front for many keys (None: absent then).

    ``foreign_at`` is the primary's ``foreign_writes`` at that read: once another
    process has committed since, an absence no longer holds and is read again (None:
    the store cannot tell, and absences are never trusted). Compared by identity: two
    batches' maps may hold the same rows and still be two batches.
    """

    foreign_at: int | None = 0
    __eq__ = object.__eq__
    __ne__ = object.__ne__
    __hash__ = object.__hash__  # type: ignore[assignment]


@dataclass(frozen=True)
class CacheHit:
    """A cached row and where it was found: ``primary``, ``synonym`` or ``lookup``."""

    row: CacheRow
    source: str


class TraceWriter:
    """Appends one JSON line per key computed: key, canonical JSON and where the answer came from.

    ``close`` releases the file; the next ``write`` opens it again (appending).
    """

    def __init__(self, path: str) -> None:
        self.path = path
        self._lock = threading.Lock()
        self._fh: IO[str] | None = None
        try:
            self._open()  # now, so a bad path fails when the cache is built, not at the first request
        except OSError as exc:
            raise ConfigError("trace_file", path, f"a file that can be written ({exc})") from exc

    def _open(self) -> IO[str]:
        # Line-buffered so a crashed run still leaves a readable trace of its keys.
        fh = self._fh = open(self.path, "a", encoding="utf-8", buffering=1)  # noqa: SIM115
        # Closed with the writer when a backend is dropped without aclose.
        self._closer = weakref.finalize(self, fh.close)
        return fh

    def write(self, key: str, canonical: str, source: str) -> None:
        """Record one key."""
        line = json.dumps({"key": key, "canonical": canonical, "source": source}) + "\n"
        with self._lock:
            (self._fh or self._open()).write(line)

    def close(self) -> None:
        """Flush and close the file."""
        with self._lock:
            if self._fh is not None:
                self._closer()
                self._fh = None


class PromptCache:
    """Finds and stores completions by key across the primary store and read-only lookups.

    Lookup order: primary; the same request under a synonym model in the primary;
    then every lookup cache (under any of those models), newest ``created_at``
    winning. A hit found anywhere but the primary is copied into the primary.

    An optional in-memory LRU (``memory``) answers repeat hits without a trip to
    the SQLite thread. It only ever holds rows this process read or wrote, so a
    row another process later replaces (a force refresh elsewhere) may be served
    from memory until evicted.
    """

    def __init__(
        self,
        primary: CacheStore | None,
        lookups: Sequence[tuple[str, CacheStore]] = (),
        synonyms: Mapping[str, tuple[str, ...]] | None = None,
        trace_file: str | None = None,
        memory: MemoryStore | None = None,
    ) -> None:
        self.primary = primary
        self.memory = memory if primary is not None else None
        self.lookups = list(lookups)
        self.synonyms = dict(synonyms or {})
        self.trace = TraceWriter(trace_file) if trace_file else None
        # Told of each lookup-store error ``find`` steps over, so its owner can count them.
        self.on_lookup_error: Callable[[Exception], None] | None = None
        # The prefetched rows of batches running now: each row stored is entered in them.
        self._tracked: list[Prefetched] = []
        # The primary's way to call a key absent without reading, if it has one.
        self._absent_now: Callable[[str], bool] | None = getattr(primary, "absent_now", None)

    @classmethod
    def open(
        cls,
        cache_dir: str | None,
        lookup_dirs: Iterable[str] = (),
        synonyms: Mapping[str, tuple[str, ...]] | None = None,
        trace_file: str | None = None,
        memory_entries: int = 0,
    ) -> PromptCache:
        """Open the SQLite primary in ``cache_dir`` (if any) and each lookup dir read-only."""
        primary = SqliteStore.in_dir(cache_dir) if cache_dir else None
        lookups: list[tuple[str, CacheStore]] = []
        for directory in lookup_dirs:
            try:
                lookups.append((directory, SqliteStore.in_dir(directory, readonly=True)))
            except Exception as exc:
                # Skipped, not fatal: one list may name archives on several clusters. But a
                # typo would turn a replay into a paid run, so the line says what it costs.
                log.warning(
                    "cache lookup dir %s (cache_lookup_dirs, CACHE_LOOKUP_DIRS) skipped: %s;"
                    " answers only it holds will be asked of the upstream",
                    directory,
                    exc,
                )
        memory = MemoryStore(memory_entries, MEMORY_BYTES) if memory_entries > 0 else None
        return cls(primary, lookups, synonyms, trace_file, memory)

    @property
    def enabled(self) -> bool:
        """Whether there is anywhere to look or store."""
        return self.primary is not None or bool(self.lookups)

    def note(self, key: str, canonical: str, source: str) -> None:
        """Write a trace line if tracing is on."""
        if self.trace is not None:
            self.trace.write(key, canonical, source)

    async def prefetch(self, keys: Sequence[str], into: Prefetched | None = None) -> Prefetched:
        """Primary rows for many keys in one go: every key maps to its row, or None if absent.

        Pass the result to ``find`` as ``known``: a key it holds needs no further
        primary read, unless it was absent and another process has written since.
        ``into`` is a map already tracked: a row stored while the read ran stays in it.
        """
        known = Prefetched() if into is None else into
        if self.primary is None or not keys:
            return known
        # A store that cannot tell whether others wrote (a third party's) trusts no absence.
        known.foreign_at = getattr(self.primary, "foreign_writes", None)
        # In place before the read, so store() can fill it; rows already there are kept.
        absent = dict.fromkeys(keys)
        absent.update(known)
        known.update(absent)
        try:
            found = await self.primary.get_many(keys)
        except BaseException:
            known.foreign_at = None  # nothing was read: no absence in it may be trusted
            raise
        for key, row in found.items():
            if known.get(key) is None:
                known[key] = row
        return known

    def track(self, known: Prefetched) -> None:
        """Keep ``known`` up to date with the rows this process stores until ``untrack``."""
        self._tracked.append(known)

    def untrack(self, known: Prefetched) -> None:
        """Stop updating ``known``."""
        self._tracked.remove(known)  # by identity: Prefetched compares so

    def find_now(
        self, key: str, model: str, known: Prefetched | None = None
    ) -> CacheHit | EllipsisType | None:
        """``find``'s answer when it needs no I/O (memory, or a prefetched batch); ``...`` otherwise.

        A cached replay or a batch of misses decides every request here, without
        a coroutine and a trip to the SQLite thread each.
        """
        if self.primary is None:
            return ... if self.lookups else None
        row = self._primary_now(key, known)
        if row is ...:
            return ...
        if row is not None:
            return CacheHit(row, "primary")
        return ... if self.lookups or self.synonyms.get(model) else None

    def _primary_now(self, key: str, known: Prefetched | None) -> CacheRow | EllipsisType | None:
        """The primary's row from memory or ``known`` (None: known absent); ``...``: read it."""
        row = self.memory.get_now(key) if self.memory is not None else None
        if row is not None:
            return row
        if known is None or key not in known:
            absent_now = self._absent_now
            return None if absent_now is not None and absent_now(key) else ...
        row = known[key]
        if row is None:
            # Absent at the batch's start; since then another process may have stored it.
            foreign_at = known.foreign_at
            # foreign_at is a number only for a store that counts foreign writes.
            if foreign_at is None or self.primary.foreign_writes != foreign_at:  # type: ignore[union-attr]
                return ...
        elif self.memory is not None:
            self.memory.put_now(row)
        return row

    async def find(
        self,
        key: str,
        model: str,
        rekey: Rekey,
        known: Prefetched | None = None,
        adopt: bool = True,
    ) -> CacheHit | None:
        """Look ``key`` up everywhere; ``rekey(model)`` gives the key under another model.

        ``adopt=False`` leaves the primary untouched by a hit found elsewhere (a no-store call).
        """
        if self.primary is not None:
            row = self._primary_now(key, known)
            if row is ...:
                row = (await self.primary.get_many([key])).get(key)
                if row is not None and self.memory is not None:
                    self.memory.put_now(row)
            if row is not None:
                return CacheHit(row, "primary")
        other_keys = [rekey(m)[0] for m in self.synonyms.get(model, ())]
        if self.primary is not None and other_keys:
            row = newest((await self.primary.get_many(other_keys)).values())
            if row is not None:
                return await self._adopt(row, key, model, rekey, "synonym", adopt)
        best: CacheRow | None = None
        for directory, store in self.lookups:
            try:
                found = await store.get_many([key, *other_keys])
            except Exception as exc:
                # One unreadable archive (a file gone bad, a mount gone away) must not
                # hide the answers the other lookup dirs hold.
                log.warning("cache lookup dir %s skipped for this request: %s", directory, exc)
                if self.on_lookup_error is not None:
                    self.on_lookup_error(exc)
                continue
            candidate = newest(found.values())
            if candidate is not None and (best is None or candidate.created_at > best.created_at):
                best = candidate
        if best is not None:
            return await self._adopt(best, key, model, rekey, "lookup", adopt)
        return None

    async def _adopt(
        self, row: CacheRow, key: str, model: str, rekey: Rekey, source: str, adopt: bool
    ) -> CacheHit:
        # The row as the primary holds it once copied, so this replay and every later
        # one report the same model (the one asked for) and key.
        copy = row._replace(key=key, model=model, canonical=rekey(model)[1])
        if self.primary is not None and adopt:
            try:
                await self.primary.put_many([copy])
                if self.memory is not None:
                    self.memory.put_now(copy)
            except Exception as exc:
                log.warning(
                    "cache: could not copy a %s hit into the primary cache: %s", source, exc
                )
        return CacheHit(copy, source)

    async def store(
        self, key: str, canonical: str, model: str, text: str, raw: str | None
    ) -> CacheRow | None:
        """Write a completion to the primary store; returns the row once it is committed."""
        if self.primary is None:
            return None
        row = CacheRow(key, text, raw, time.time(), model, canonical)
        await self.primary.put_many([row])
        if self.memory is not None:
            self.memory.put_now(row)
        for known in self._tracked:
            if key in known:
                known[key] = row  # a request for it later in that batch is a hit
        return row

    async def aclose(self) -> None:
        """Close every store and the trace file; each opens again when next used."""
        stores = [s for s in (self.primary, *(s for _, s in self.lookups)) if s is not None]
        failed: BaseException | None = None
        for store in stores:
            try:
                await store.aclose()
            except Exception as exc:
                # One store that cannot close must not leave the others (and their writes) open.
                failed = failed or exc
        if self.trace is not None:
            self.trace.close()
        if failed is not None:
            raise failed

    def __repr__(self) -> str:
        return f"<PromptCache primary={self.primary!r} lookups={len(self.lookups)} synonyms={len(self.synonyms)} trace={'on' if self.trace else 'off'}>"
