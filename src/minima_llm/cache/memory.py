"""An in-memory LRU store: for tests, and as a fast layer in front of a shared store."""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Iterable, Sequence

from .store import CacheRow


class MemoryStore:
    """Least-recently-used store of at most ``max_entries`` rows (0 = unbounded)."""

    def __init__(self, max_entries: int = 0) -> None:
        self.max_entries = max_entries
        self._rows: OrderedDict[str, CacheRow] = OrderedDict()

    def get_now(self, key: str) -> CacheRow | None:
        """Synchronous lookup (no I/O involved)."""
        row = self._rows.get(key)
        if row is not None:
            self._rows.move_to_end(key)
        return row

    def put_now(self, row: CacheRow) -> None:
        """Synchronous insert, evicting the least recently used row when full."""
        self._rows[row.key] = row
        self._rows.move_to_end(row.key)
        if self.max_entries and len(self._rows) > self.max_entries:
            self._rows.popitem(last=False)

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
        return f"<MemoryStore rows={len(self._rows)} max={self.max_entries or 'unbounded'}>"
