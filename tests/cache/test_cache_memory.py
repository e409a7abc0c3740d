"""MemoryStore: a least-recently-used map of rows."""

from __future__ import annotations

from minima_llm.cache import CacheRow, MemoryStore


def row(key: str, text: str = "t") -> CacheRow:
    return CacheRow(key, text, None, 1.0)


def test_evicts_the_least_recently_inserted_when_full() -> None:
    store = MemoryStore(max_entries=3)
    for key in "abcd":
        store.put_now(row(key))
    assert len(store) == 3
    assert store.get_now("a") is None
    assert [k for k in "bcd" if store.get_now(k)] == ["b", "c", "d"]


def test_a_read_protects_a_row_from_eviction() -> None:
    store = MemoryStore(max_entries=3)
    for key in "abc":
        store.put_now(row(key))
    assert store.get_now("a") == row("a")
    store.put_now(row("d"))
    assert store.get_now("b") is None
    assert store.get_now("a") == row("a")


def test_replacing_a_row_refreshes_it_without_evicting() -> None:
    store = MemoryStore(max_entries=3)
    for key in "abc":
        store.put_now(row(key))
    store.put_now(row("a", "new"))
    assert len(store) == 3
    assert store.get_now("a") == row("a", "new")
    store.put_now(row("d"))
    assert store.get_now("b") is None
    assert {k for k in "acd" if store.get_now(k)} == set("acd")


def test_a_miss_does_not_change_the_order() -> None:
    store = MemoryStore(max_entries=2)
    store.put_now(row("a"))
    store.put_now(row("b"))
    assert store.get_now("zz") is None
    store.put_now(row("c"))
    assert store.get_now("a") is None
    assert store.get_now("b") == row("b")


def test_zero_means_unbounded() -> None:
    store = MemoryStore()
    for i in range(5000):
        store.put_now(row(str(i)))
    assert len(store) == 5000
    assert store.get_now("0") == row("0")


async def test_async_interface_follows_the_same_order() -> None:
    store = MemoryStore(max_entries=2)
    await store.put_many([row("a"), row("b")])
    assert await store.get_many(["a", "missing"]) == {"a": row("a")}
    await store.put_many([row("c")])
    assert await store.get_many(["a", "b", "c"]) == {"a": row("a"), "c": row("c")}
    await store.put_many([row(k) for k in "wxyz"])
    assert len(store) == 2
    assert await store.get_many(list("wxyz")) == {"y": row("y"), "z": row("z")}
    await store.aclose()


def test_repr_shows_size_and_bound() -> None:
    store = MemoryStore(max_entries=5)
    store.put_now(row("a"))
    assert repr(store) == "<MemoryStore rows=1 max=5>"
    assert repr(MemoryStore()) == "<MemoryStore rows=0 max=unbounded>"


def test_a_byte_budget_bounds_the_rows_held_by_their_size() -> None:
    # Bounded by count alone, 10,000 answers of 200 KB held 4 GB in the gateway.
    store = MemoryStore(max_entries=100, max_bytes=1_600)
    for key in "abcdefghij":
        store.put_now(row(key, "x" * 90))
    assert len(store) == 10 and store.size == 900
    for key in "klmnopqr":
        store.put_now(row(key, "y" * 100))
    # 1,700 over 1,600: the two oldest went, as few as it took.
    assert store.size == 1_520 and store.get_now("a") is None and store.get_now("b") is None
    assert store.get_now("c") is not None and store.get_now("r") is not None
    store.put_now(row("r", "z" * 10))  # replacing a row counts its new size only
    assert store.size == 1_430 and len(store) == 16
    assert repr(store) == "<MemoryStore rows=16 max=100 size=1430/1600>"


def test_a_row_too_large_for_its_share_of_the_budget_is_not_held() -> None:
    store = MemoryStore(max_entries=100, max_bytes=1_600)
    store.put_now(row("small", "s" * 50))
    store.put_now(row("huge", "h" * 101))  # over 1/16 of the budget
    assert store.get_now("huge") is None and store.get_now("small") is not None
    store.put_now(row("small", "s" * 200))  # grown past its share: the stale copy goes too
    assert store.get_now("small") is None and store.size == 0
