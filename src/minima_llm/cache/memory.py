"""An in-memory LRU store: for tests, and as a fast layer in front of a shared store."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .store import CacheRow

# A row over this share of the byte budget is not held at all: one huge answer would
# otherwise push out everything else, for a hit the file gives just as well.
_LARGEST_SHARE = 16


class MemoryStore:
    """Least-recently-used store of at most ``max_entries`` rows and ``max_bytes`` of text (0 = unbounded).

    Rows are counted by the characters of their text, raw body and canonical request:
    bounded by count alone, 10,000 answers of 200 KB held 4 GB.
    """

    # Nobody else writes into a process's memory.
    foreign_writes = 0

    def __init__(self, max_entries: int = 0, max_bytes: int = 0) -> None:
        self.max_entries = max_entries
        self.max_bytes = max_bytes
        self.size = 0
        self._rows: OrderedDict[str, CacheRow] = OrderedDict()

    def get_now(self, key: str) -> CacheRow | None:
        """Synchronous lookup (no I/O involved)."""
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put_now(self, row: CacheRow) -> None:
        """Synchronous insert, evicting the least recently used rows when full."""
        rows = self._rows
        old = rows.pop(row.key, None)
        if old is not None:
            self.size -= _size(old)
        size = _size(row)
        if self.max_bytes and size * _LARGEST_SHARE > self.max_bytes:
            return
        rows[row.key] = row
        self.size += size
        while (self.max_entries and len(rows) > self.max_entries) or (
            self.max_bytes and self.size > self.max_bytes
        ):
            self.size -= _size(rows.popitem(last=False)[1])

    async def get_many(self, keys: Sequence[str]) -> dict[str, CacheRow]:
        """The rows found among ``keys``."""
        found = {}
        for key in keys:
            row = self.get_now(key)
            if row is not None:
                found[key] = row
        return found

    async def put_many(self, rows: Iterable[CacheRow]) -> None:
        """Store rows."""
        for row in rows:
            self.put_now(row)

    async def aclose(self) -> None:
        """Nothing to release."""

    def __len__(self) -> int:
        return len(self._rows)

    def __repr__(self) -> str:
        size = f" size={self.size}/{self.max_bytes}" if self.max_bytes else ""
        return f"<MemoryStore rows={len(self._rows)} max={self.max_entries or 'unbounded'}{size}>"


def _size(row: CacheRow) -> int:
    return len(row.response_text) + len(row.response_raw or "") + len(row.canonical or "")
