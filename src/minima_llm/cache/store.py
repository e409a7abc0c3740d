"""The cache store interface and the row it holds."""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import NamedTuple, Protocol


class CacheRow(NamedTuple):
    """One cached completion, as stored in the ``cache`` table.

    A named tuple rather than a dataclass: a cached replay builds one per
    request, and tuple construction is several times cheaper.
    """

    key: str
    response_text: str
    response_raw: str | None
    created_at: float
    model: str | None = None
    canonical: str | None = None


class CacheStore(Protocol):
    """Async key-value storage of completions.

    A store may also have ``foreign_writes``, a count of the commits of other writers
    (other processes) it has noticed, so a caller holding rows it read earlier knows
    when they may be out of date. Without it a caller cannot tell, and must read again.
    It may also have ``absent_now(key) -> bool``, True only for a key it surely does
    not hold, so a miss is decided without a read.
    """

    async def get_many(self, keys: Sequence[str]) -> dict[str, CacheRow]:
        """The rows found among ``keys``."""
        ...

    async def put_many(self, rows: Iterable[CacheRow]) -> None:
        """Store rows (replacing same keys); returns once they are durable."""
        ...

    async def aclose(self) -> None:
        """Flush pending writes and release resources."""
        ...


def newest(rows: Iterable[CacheRow]) -> CacheRow | None:
    """The row with the latest ``created_at``."""
    best: CacheRow | None = None
    for row in rows:
        if best is None or row.created_at > best.created_at:
            best = row
    return best
