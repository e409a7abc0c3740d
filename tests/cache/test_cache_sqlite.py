"""SqliteStore: file layout, schema, round trips, batching of commits, read-only use, lifecycle."""

from __future__ import annotations

import asyncio
import sqlite3
import sys
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from minima_llm.cache import DB_NAME, CacheRow, SqliteStore
from minima_llm.errors import CacheError

# (name, declared type, NOT NULL, primary key position) as PRAGMA table_info reports them.
SCHEMA = [
    ("key", "TEXT", 0, 1),
    ("response_text", "TEXT", 1, 0),
    ("response_raw", "TEXT", 0, 0),
    ("created_at", "REAL", 1, 0),
    ("model", "TEXT", 0, 0),
    ("canonical", "TEXT", 0, 0),
]


def row(i: int, text: str | None = None, created_at: float = 1000.0) -> CacheRow:
    return CacheRow(
        key=f"k{i:06d}",
        response_text=text if text is not None else f"text {i}",
        response_raw=f'{{"id": {i}}}',
        created_at=created_at + i,
        model="m",
        canonical=f'{{"i":{i}}}',
    )


def plain(path: Path) -> sqlite3.Connection:
    """An independent connection, as another process or tool would open the file."""
    return sqlite3.connect(path, isolation_level=None)


def count(path: Path) -> int:
    with closing(plain(path)) as conn:
        n: int = conn.execute("SELECT count(*) FROM cache").fetchone()[0]
        return n


def variable_limit() -> int:
    """How many ``?`` parameters one statement may have in this SQLite build."""
    with closing(sqlite3.connect(":memory:")) as probe:
        if sys.version_info >= (3, 11):
            return probe.getlimit(sqlite3.SQLITE_LIMIT_VARIABLE_NUMBER)
        for (option,) in probe.execute("PRAGMA compile_options"):
            if option.startswith("MAX_VARIABLE_NUMBER="):
                return int(option.split("=")[1])
    return 32766 if sqlite3.sqlite_version_info >= (3, 32) else 999


@pytest.fixture
def store(tmp_path: Path) -> Iterator[SqliteStore]:
    s = SqliteStore.in_dir(tmp_path)
    yield s
    s.close()


def test_creates_the_file_in_wal_mode(tmp_path: Path) -> None:
    target = tmp_path / "deep" / "er"
    store = SqliteStore.in_dir(target)
    try:
        assert store.path == target / "minima_llm.db"
        assert DB_NAME == "minima_llm.db"
        assert store.path.is_file()
        with closing(plain(store.path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        store.close()


def test_table_has_exactly_the_contract_columns(store: SqliteStore) -> None:
    with closing(plain(store.path)) as conn:
        info = conn.execute("PRAGMA table_info(cache)").fetchall()
        tables = [r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type='table'")]
    assert [(name, typ, notnull, pk) for _, name, typ, notnull, _, pk in info] == SCHEMA
    assert tables == ["cache"]


async def test_put_then_get_round_trips_every_field(store: SqliteStore) -> None:
    rows = [
        row(1),
        CacheRow("k-none", "only text", None, 12.5),
        CacheRow("k-uni", "Grüße 😀\n", '{"x": "é"}', 1.0, "mödel", '{"a":"\\u00e9"}'),
    ]
    await store.put_many(rows)
    got = await store.get_many([r.key for r in rows])
    assert got == {r.key: r for r in rows}


async def test_get_many_returns_only_what_exists(store: SqliteStore) -> None:
    await store.put_many([row(1), row(2)])
    assert await store.get_many([]) == {}
    assert await store.get_many(["nope"]) == {}
    got = await store.get_many(["nope", row(2).key, row(2).key, row(1).key])
    assert got == {row(1).key: row(1), row(2).key: row(2)}


async def test_put_replaces_a_row_with_the_same_key(store: SqliteStore) -> None:
    await store.put_many([row(1, text="old", created_at=1.0)])
    await store.put_many([row(1, text="new", created_at=5.0)])
    got = (await store.get_many([row(1).key]))[row(1).key]
    assert (got.response_text, got.created_at) == ("new", 6.0)
    assert count(store.path) == 1


async def test_later_duplicate_in_one_batch_wins(store: SqliteStore) -> None:
    await store.put_many([row(1, text="first"), row(1, text="second")])
    assert (await store.get_many([row(1).key]))[row(1).key].response_text == "second"


async def test_get_many_across_chunk_boundaries(store: SqliteStore) -> None:
    present = [row(i) for i in range(0, 2402, 2)]  # 1201 rows, every other key
    await store.put_many(present)
    keys = [row(i).key for i in range(2402)]
    got = await store.get_many(keys)
    assert got == {r.key: r for r in present}


async def test_get_many_with_more_keys_than_sqlite_allows_parameters(store: SqliteStore) -> None:
    limit = variable_limit()
    present = [row(i) for i in range(600)]
    await store.put_many(present)
    keys = [f"missing-{i}" for i in range(limit + 1)]
    step = len(keys) // len(present)
    for i, r in enumerate(present):  # spread the present keys over every part of the list
        keys[i * step + i % 7] = r.key
    assert len(set(keys)) > limit
    got = await store.get_many(keys)
    assert got == {r.key: r for r in present}


async def test_concurrent_lookups_each_get_their_own_answer(store: SqliteStore) -> None:
    await store.put_many([row(i) for i in range(300)])

    async def look(i: int) -> None:
        keys = [row(i).key, row(i + 1).key, f"missing-{i}"]
        got = await store.get_many(keys)
        expected = {r.key: r for r in (row(i), row(i + 1)) if int(r.key[1:]) < 300}
        assert got == expected

    await asyncio.gather(*(look(i) for i in range(300)))


async def test_write_burst_shares_commits(store: SqliteStore) -> None:
    n = 500

    async def put(i: int) -> None:
        await store.put_many([row(i)])

    await asyncio.gather(*(put(i) for i in range(n)))
    assert store.rows_written == n
    assert store.commits < n / 5, store
    assert count(store.path) == n
    assert await store.get_many([row(i).key for i in range(n)]) == {
        row(i).key: row(i) for i in range(n)
    }


async def test_put_returns_after_the_row_is_visible_to_other_connections(
    store: SqliteStore,
) -> None:
    with closing(plain(store.path)) as other:

        async def put_and_check(i: int) -> None:
            await store.put_many([row(i)])
            found = other.execute(
                "SELECT response_text FROM cache WHERE key = ?", (row(i).key,)
            ).fetchone()
            assert found == (row(i).response_text,)

        for i in range(20):
            await put_and_check(i)
        await asyncio.gather(*(put_and_check(i) for i in range(20, 220)))


async def test_a_failed_write_raises_cache_error_and_the_store_recovers(
    store: SqliteStore,
) -> None:
    bad = CacheRow("bad", None, None, 1.0)  # type: ignore[arg-type]  # violates NOT NULL
    with pytest.raises(CacheError, match="write"):
        await store.put_many([bad])
    await store.put_many([row(1)])
    assert count(store.path) == 1


@pytest.mark.parametrize("batch", [3, 200])  # one autocommit statement; a transaction
async def test_a_lone_surrogate_does_not_cost_its_batch_mates_their_rows(
    store: SqliteStore, batch: int
) -> None:
    # "\ud800" escaped in an upstream's JSON decodes to a str UTF-8 cannot encode.
    rows = [row(i, text="x\ud800y" if i == 1 else None) for i in range(batch)]
    await asyncio.gather(*(store.put_many([r]) for r in rows))
    found = await store.get_many([r.key for r in rows])
    assert len(found) == batch == count(store.path)
    assert found[row(1).key].response_text == "x\ufffdy"
    assert found[row(0).key] == row(0)


def test_sync_variants(store: SqliteStore) -> None:
    store.put_many_sync([row(1), row(2)])
    store.put_many_sync([])
    assert store.get_many_sync([row(1).key, row(2).key, "x"]) == {
        row(1).key: row(1),
        row(2).key: row(2),
    }
    assert store.get_many_sync([]) == {}
    assert store.commits == 1
    assert count(store.path) == 2


async def test_readonly_store_reads_but_cannot_write(store: SqliteStore) -> None:
    await store.put_many([row(1)])
    ro = SqliteStore(store.path, readonly=True)
    try:
        assert ro.readonly
        assert await ro.get_many([row(1).key]) == {row(1).key: row(1)}
        with pytest.raises(CacheError, match="read-only"):
            await ro.put_many([row(2)])
        with pytest.raises(CacheError, match="read-only"):
            ro.put_many_sync([row(2)])
        # Rows the writer commits later are visible to the read-only store.
        await store.put_many([row(3)])
        assert row(3).key in await ro.get_many([row(3).key])
    finally:
        ro.close()
    assert count(store.path) == 2


def test_readonly_store_of_a_missing_file_fails_at_construction(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match="cannot open"):
        SqliteStore.in_dir(tmp_path / "absent", readonly=True)
    assert not (tmp_path / "absent").exists()
    with pytest.raises(CacheError):
        SqliteStore(tmp_path / "nope.db", readonly=True)
    assert not (tmp_path / "nope.db").exists()


@pytest.mark.parametrize("readonly", [False, True])
def test_a_file_that_is_not_a_cache_fails_at_construction(tmp_path: Path, readonly: bool) -> None:
    (tmp_path / DB_NAME).write_bytes(b"definitely not an sqlite database\n" * 200)
    with pytest.raises(CacheError, match="cannot open"):
        SqliteStore.in_dir(tmp_path, readonly=readonly)


def test_readonly_store_of_a_database_without_cache_table_fails(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(CacheError, match="no cache table"):
        SqliteStore.in_dir(tmp_path, readonly=True)


async def test_read_errors_are_cache_errors(store: SqliteStore) -> None:
    ro = SqliteStore(store.path, readonly=True)
    try:
        with closing(plain(store.path)) as conn:
            conn.execute("DROP TABLE cache")
        with pytest.raises(CacheError, match="read"):
            await ro.get_many(["k"])
    finally:
        ro.close()


async def test_close_is_idempotent_and_later_use_reopens(tmp_path: Path) -> None:
    store = SqliteStore.in_dir(tmp_path)
    await store.put_many([row(1)])
    await store.aclose()
    await store.aclose()
    store.close()
    # Once hung forever (the request sat in the queue of a thread that had ended), then
    # failed; minima-llm 0.2.x documents that the cache reopens automatically.
    await asyncio.wait_for(store.put_many([row(2)]), 5)
    assert await asyncio.wait_for(store.get_many([row(1).key]), 5) == {row(1).key: row(1)}
    store.close()
    assert store.get_many_sync([row(2).key]) == {row(2).key: row(2)}
    store.put_many_sync([row(3)])
    store.close()
    assert count(store.path) == 3


async def test_close_waits_for_queued_writes(tmp_path: Path) -> None:
    store = SqliteStore.in_dir(tmp_path)
    pending = [asyncio.ensure_future(store.put_many([row(i)])) for i in range(100)]
    await asyncio.sleep(0)
    await store.aclose()
    await asyncio.gather(*pending)
    assert count(store.path) == 100


def test_repr_shows_path_mode_and_counts(store: SqliteStore) -> None:
    assert repr(store) == f"<SqliteStore {store.path} rw rows_written=0 commits=0 checkpoints=0>"
    store.put_many_sync([row(1), row(2), row(3)])
    assert "rows_written=3 commits=1" in repr(store)
    ro = SqliteStore(store.path, readonly=True)
    try:
        assert repr(ro) == f"<SqliteStore {store.path} ro rows_written=0 commits=0 checkpoints=0>"
    finally:
        ro.close()


async def test_the_checkpointer_copies_the_wal_into_the_file_and_bounds_it(
    tmp_path: Path,
) -> None:
    # The writer's own autocheckpoint is a backstop for 4,000 frames; these 600 single-row
    # commits (about 3 frames each) stay under it, so only the checkpointer can move them.
    store = SqliteStore(tmp_path / DB_NAME, checkpoint_frames=100)
    try:
        for i in range(600):
            await store.put_many([row(i, text="x" * 1000)])
        assert store.checkpoints >= 1, store
        wal = store.path.with_name(DB_NAME + "-wal")
        # Checkpointed pages are in the database file itself, and the WAL is reused
        # from its start instead of growing with every commit.
        assert store.path.stat().st_size > 600 * 1000
        assert wal.stat().st_size < 2_000_000  # 7 MB if it never restarted
        assert count(store.path) == 600
    finally:
        store.close()


async def test_a_readonly_store_never_checkpoints(store: SqliteStore) -> None:
    await store.put_many([row(1)])
    ro = SqliteStore(store.path, readonly=True, checkpoint_frames=1)
    try:
        assert await ro.get_many([row(1).key]) == {row(1).key: row(1)}
        assert ro.checkpoints == 0
    finally:
        ro.close()


def test_works_across_successive_event_loops(store: SqliteStore) -> None:
    async def put(start: int) -> None:
        await asyncio.gather(*(store.put_many([row(i)]) for i in range(start, start + 50)))

    async def get() -> dict[str, CacheRow]:
        return await store.get_many([row(i).key for i in range(100)])

    asyncio.run(put(0))
    asyncio.run(put(50))
    assert len(asyncio.run(get())) == 100
    assert len(asyncio.run(get())) == 100
