"""Misses decided in memory: the key filter, when it may be trusted, and the store using it."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import AsyncIterator, Callable
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from minima_llm.cache import CacheRow, SqliteStore
from minima_llm.cache.absences import SCAN_AFTER, Absences, KeyFilter

WAIT_S = 10.0


def row(key: str) -> CacheRow:
    return CacheRow(key, f"text of {key}", None, 1000.0, "m", None)


def wait_for(check: Callable[[], bool], what: str) -> None:
    deadline = time.monotonic() + WAIT_S
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {WAIT_S}s: {what}")
        time.sleep(0.005)


def write_elsewhere(path: Path, keys: list[str]) -> None:
    """Commit rows through a connection of its own, as another process would."""
    with closing(sqlite3.connect(path, isolation_level=None)) as conn:
        conn.executemany(
            "INSERT OR REPLACE INTO cache (key, response_text, created_at) VALUES (?, ?, 1.0)",
            [(k, "elsewhere") for k in keys],
        )


# --- the filter --------------------------------------------------------------------------


def test_a_filter_holds_every_key_added() -> None:
    keys = [f"key-{i}" for i in range(50_000)]
    found = KeyFilter(len(keys))
    for key in keys:
        found.add(key)
    assert all(found.might_hold(k) for k in keys)
    assert found.count == len(keys)


def test_a_full_filter_seldom_claims_a_key_never_added() -> None:
    found = KeyFilter(20_000)
    for i in range(found.capacity):
        found.add(f"in-{i}")
    claimed = sum(found.might_hold(f"out-{i}") for i in range(20_000))
    # Two positions a key in 16 bits a key: about 1.4% at capacity.
    assert claimed / 20_000 < 0.03


def test_a_filter_rounds_its_size_up_and_costs_two_bytes_a_key() -> None:
    found = KeyFilter(100_000)
    assert found.capacity >= 100_000
    assert found.nbytes == found.capacity * 2
    assert KeyFilter(0).capacity >= 4096


# --- when absences may be trusted -------------------------------------------------------


class FakeWatch:
    """The writer's side, set by hand one field at a time (``looked`` is the pair)."""

    def __init__(self) -> None:
        # No WAL state: only the time of the last look bounds an absence.
        self.looked: tuple[int, float, Any] = (0, 0.0, None)

    def wal_state(self) -> Any:
        return None

    @property
    def foreign_writes(self) -> int:
        return self.looked[0]

    @foreign_writes.setter
    def foreign_writes(self, writes: int) -> None:
        self.looked = (writes, self.looked[1], None)

    @property
    def checked_at(self) -> float:
        return self.looked[1]

    @checked_at.setter
    def checked_at(self, at: float) -> None:
        self.looked = (self.looked[0], at, None)


class Looks:
    """``look_again`` for the tests: records each request, answered when the test says."""

    def __init__(self) -> None:
        self.asked: list[asyncio.Future[Any]] = []

    def __call__(self) -> asyncio.Future[Any]:
        fut: asyncio.Future[Any] = asyncio.get_running_loop().create_future()
        self.asked.append(fut)
        return fut


@pytest.fixture
def cache_file(tmp_path: Path) -> Path:
    store = SqliteStore(tmp_path / "c.db")
    store.put_many_sync([row("held-1"), row("held-2")])
    store.close()
    return tmp_path / "c.db"


def absences_of(path: Path, watch: FakeWatch, looks: Looks | None = None, **kw: Any) -> Absences:
    """Absences of ``path``; the writer's last look stays fresh for a minute unless told.

    The first miss starts a scan, unless ``scan_after`` says otherwise.
    """
    kw.setdefault("fresh_s", 60.0)
    kw.setdefault("scan_after", 0)
    return Absences(path, watch, looks or Looks(), **kw)


def fresh(watch: FakeWatch) -> FakeWatch:
    watch.checked_at = time.monotonic()
    return watch


def rescan(absences: Absences, watch: FakeWatch) -> None:
    """Have another process commit, then ask until a new scan's filter is trusted."""
    scans = absences.scans
    watch.foreign_writes += 1
    wait_for(lambda: absences.absent("x") and absences.scans > scans, "a new scan")


def test_nothing_is_absent_until_a_scan_has_read_the_keys(cache_file: Path) -> None:
    watch = fresh(FakeWatch())
    absences = absences_of(cache_file, watch)
    assert absences.absent("never") is False  # and a scan starts
    wait_for(absences.trusted, "the first scan")
    assert absences.scans == 1
    assert absences.absent("never") is True
    assert absences.absent("held-1") is False
    assert absences.absent("held-2") is False


def test_a_commit_elsewhere_voids_the_filter_until_a_new_scan(cache_file: Path) -> None:
    watch = fresh(FakeWatch())
    absences = absences_of(cache_file, watch, scan_gap_s=0.0)
    absences.absent("x")
    wait_for(absences.trusted, "the first scan")
    write_elsewhere(cache_file, ["theirs"])
    assert absences.absent("theirs") is True  # the writer has not looked yet
    watch.foreign_writes += 1  # it has now
    assert absences.absent("theirs") is False
    assert absences.absent("never") is False
    # Each miss read meanwhile asks for the scan, due shortly after the first.
    wait_for(lambda: absences.absent("never"), "the second scan")
    assert absences.scans == 2
    assert absences.absent("theirs") is False
    assert absences.absent("never") is True


def test_scans_are_spaced_out_when_others_keep_writing(cache_file: Path) -> None:
    watch = fresh(FakeWatch())
    absences = absences_of(cache_file, watch, scan_gap_s=60.0)
    absences.absent("x")
    wait_for(absences.trusted, "the first scan")
    watch.foreign_writes += 1
    for _ in range(5):
        assert absences.absent("never") is False
    time.sleep(0.05)
    assert absences.scans == 1  # the next is due in a minute; misses read meanwhile


async def test_an_old_look_is_not_trusted_and_asks_the_writer_once(cache_file: Path) -> None:
    watch = fresh(FakeWatch())
    looks = Looks()
    absences = absences_of(cache_file, watch, looks, fresh_s=0.5)
    absences.absent("x")
    await asyncio.to_thread(wait_for, lambda: absences.scans == 1, "the first scan")
    watch.checked_at = time.monotonic()
    assert absences.absent("never") is True
    watch.checked_at -= 1.0  # the writer last looked a second ago
    assert absences.absent("never") is False
    assert absences.absent("never") is False
    assert len(looks.asked) == 1  # one request until it is answered
    watch.checked_at = time.monotonic()
    looks.asked[0].set_result(None)
    await asyncio.sleep(0)
    assert absences.absent("never") is True
    watch.checked_at -= 1.0
    assert absences.absent("never") is False
    assert len(looks.asked) == 2


def test_without_a_loop_an_old_look_just_reads(cache_file: Path) -> None:
    watch = fresh(FakeWatch())
    looks = Looks()
    absences = absences_of(cache_file, watch, looks, fresh_s=0.5)
    absences.absent("x")
    wait_for(lambda: absences.scans == 1, "the first scan")
    watch.checked_at -= 1.0
    assert absences.absent("never") is False
    assert looks.asked == []


def test_keys_written_while_a_scan_runs_are_in_its_filter(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    store = SqliteStore(path)
    store.put_many_sync([row(f"old-{i}") for i in range(200_000)])
    store.close()
    watch = fresh(FakeWatch())
    absences = absences_of(path, watch)
    absences.absent("x")
    assert not absences.trusted()
    # As the writer does before a commit the running scan's snapshot may not hold.
    absences.add(["written-meanwhile"])
    wait_for(lambda: absences.scans == 1, "the scan")
    watch.checked_at = time.monotonic()
    assert absences.absent("written-meanwhile") is False
    assert absences.absent("old-199999") is False
    assert absences.absent("never") is True


def test_an_overfull_filter_is_replaced_by_a_bigger_one(cache_file: Path) -> None:
    watch = fresh(FakeWatch())
    absences = absences_of(cache_file, watch, scan_gap_s=0.0)
    absences.absent("x")
    wait_for(absences.trusted, "the first scan")
    first = KeyFilter(0).capacity
    keys = [f"mine-{i}" for i in range(first + 10)]
    absences.add(keys)  # the writer committed them (the file does not hold them: no matter)
    write_elsewhere(cache_file, keys)
    watch.checked_at = time.monotonic()
    absences.absent("never")  # still answers, and starts a bigger scan
    wait_for(lambda: absences.scans == 2, "the bigger scan")
    assert all(absences.absent(k) is False for k in keys)
    assert repr(absences).startswith("<Absences c.db")


def test_a_scan_stopped_midway_is_dropped(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    store = SqliteStore(path)
    store.put_many_sync([row(f"old-{i}") for i in range(200_000)])
    store.close()
    absences = absences_of(path, fresh(FakeWatch()))
    absences.absent("x")
    absences.stop(timeout=WAIT_S)
    assert absences.scans == 0
    assert not absences.trusted()


def test_a_key_whose_commit_is_under_way_when_a_scan_begins_is_in_its_filter(
    cache_file: Path,
) -> None:
    watch = fresh(FakeWatch())
    absences = absences_of(cache_file, watch, scan_gap_s=0.0)
    absences.absent("x")
    wait_for(absences.trusted, "the first scan")
    # Entered before any scan runs; its commit has not landed when the next one reads.
    absences.add(["mine"])
    rescan(absences, watch)
    assert absences.absent("mine") is False
    absences.committed()
    # The commit returned (here: it failed, the file lacks the key); a scan after that knows.
    rescan(absences, watch)
    assert absences.absent("mine") is True


def test_the_first_scan_waits_for_enough_lookups(cache_file: Path) -> None:
    absences = absences_of(cache_file, fresh(FakeWatch()), scan_after=SCAN_AFTER)
    for _ in range(SCAN_AFTER):
        assert absences.absent("never") is False
    time.sleep(0.05)
    assert absences.scans == 0
    assert not [t for t in threading.enumerate() if t.name.startswith("minima-cache-scan")]
    absences.absent("never")
    wait_for(absences.trusted, "the scan the next lookup starts")


def test_a_filter_is_sized_by_the_rows_when_rowids_run_far_past_them(cache_file: Path) -> None:
    with closing(sqlite3.connect(cache_file, isolation_level=None)) as conn:
        conn.execute(
            "INSERT INTO cache (rowid, key, response_text, created_at) VALUES (?, 'far', 'x', 1.0)",
            (2**40,),
        )
    absences = absences_of(cache_file, fresh(FakeWatch()))
    absences.absent("x")
    wait_for(absences.trusted, "the scan")
    assert absences.absent("far") is False
    assert absences.absent("never") is True
    assert "/4096 keys" in repr(absences)


# --- the store ----------------------------------------------------------------------------


async def trusting(store: SqliteStore) -> None:
    """Return once ``store`` decides misses in memory (asked on the loop, so it may ask its writer)."""
    deadline = time.monotonic() + WAIT_S
    while not store.absent_now("probe"):
        assert time.monotonic() < deadline, f"{store} never trusted its filter"
        await asyncio.sleep(0.005)


@contextlib.asynccontextmanager
async def trusted_store(path: Path, held: str) -> AsyncIterator[SqliteStore]:
    """A store of ``path`` holding row ``held``, once it decides misses in memory; closed after."""
    store = SqliteStore(path)
    try:
        await store.put_many([row(held)])
        await trusting(store)
        yield store
    finally:
        await store.aclose()


async def test_a_store_decides_misses_without_reading_once_scanned(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    try:
        await store.put_many([row("held")])
        await trusting(store)
        reads = store.reads
        assert store.absent_now("never") is True
        assert store.absent_now("held") is False
        await store.put_many([row("new")])
        assert store.absent_now("new") is False  # entered before its commit
        assert store.reads == reads
    finally:
        await store.aclose()


async def test_a_store_sees_another_writers_row_once_its_writer_looks(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with trusted_store(path, "mine") as store:
        write_elsewhere(path, ["theirs"])
        await store.put_many([row("mine-2")])  # the writer looks at each commit
        assert store.foreign_writes == 1
        assert store.absent_now("theirs") is False
        assert (await store.get_many(["theirs"]))["theirs"].response_text == "elsewhere"


async def test_a_row_written_elsewhere_is_never_absent_once_committed(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with trusted_store(path, "mine") as store:
        write_elsewhere(path, ["theirs"])
        # At once, with no look of the writer's since: the WAL file has changed.
        assert store.absent_now("theirs") is False
        assert store.absent_now("never") is False
        await asyncio.to_thread(wait_for, lambda: store.foreign_writes == 1, "the look")
        assert store.absent_now("theirs") is False


async def test_a_checkpoint_or_a_read_elsewhere_leaves_the_filter_trusted(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    async with trusted_store(path, "mine") as store:
        with closing(sqlite3.connect(path, isolation_level=None)) as other:
            other.execute("SELECT count(*) FROM cache").fetchall()
            other.execute("PRAGMA wal_checkpoint(PASSIVE)").fetchall()
        assert store.absent_now("never") is True  # neither writes into the WAL
        assert store.foreign_writes == 0


async def test_looking_at_the_wal_holds_no_lock_of_sqlites_back(tmp_path: Path) -> None:
    """Closing any descriptor of a file drops every POSIX lock this process holds on it."""
    path = tmp_path / "c.db"
    first = SqliteStore(path)
    first.put_many_sync([row("first")])
    reader = sqlite3.connect(path, isolation_level=None)
    reader.execute("BEGIN")
    reader.execute("SELECT count(*) FROM cache").fetchall()  # a snapshot, held
    store = SqliteStore(path)  # its writer opens, and looks at the WAL, after the snapshot
    try:
        await store.put_many([row("mine")])
        await first.aclose()
        # Locks only keep other processes out: the checkpoint must run in one.
        code = (
            "import sqlite3, sys; c = sqlite3.connect(sys.argv[1], timeout=0);"
            "print(c.execute('PRAGMA wal_checkpoint(TRUNCATE)').fetchone()[0])"
        )
        done = await asyncio.to_thread(
            subprocess.run, [sys.executable, "-c", code, str(path)], capture_output=True, text=True
        )
        assert done.stdout.strip() == "1", done  # busy: the snapshot's read lock still stands
    finally:
        reader.close()
        await store.aclose()


def test_a_read_only_store_never_calls_a_key_absent(cache_file: Path) -> None:
    store = SqliteStore(cache_file, readonly=True)
    try:
        assert store.absent_now("never") is False
    finally:
        store.close()


async def test_a_reopened_store_scans_again(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    store = SqliteStore(path)
    await store.put_many([row("mine")])
    await trusting(store)
    await store.aclose()
    write_elsewhere(path, ["theirs"])  # while nobody watched
    try:
        await store.put_many([row("mine-2")])  # reopens the writer
        assert store.absent_now("theirs") is False
    finally:
        await store.aclose()


async def test_a_second_store_on_the_file_voids_the_filter_until_it_closes(tmp_path: Path) -> None:
    path = tmp_path / "c.db"
    first = SqliteStore(path)
    try:
        await first.put_many([row("mine")])
        await trusting(first)
        second = SqliteStore(path)
        try:
            # Its commits would reach the first's filter only at the first's next look.
            assert first.absent_now("never") is False
            await second.put_many([row("theirs")])
            assert first.absent_now("theirs") is False
            assert second.absent_now("never") is False
        finally:
            await second.aclose()
        await trusting(first)
        assert first.absent_now("theirs") is False
        assert first.absent_now("mine") is False
    finally:
        await first.aclose()


def scan_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("minima-cache-scan")]


async def test_a_store_dropped_without_closing_ends_its_scan(tmp_path: Path) -> None:
    path = tmp_path / "big.db"
    store = SqliteStore(path)
    store.put_many_sync([row(f"old-{i}") for i in range(300_000)])
    while not scan_threads():
        store.absent_now("probe")
    del store
    gc.collect()
    await asyncio.to_thread(wait_for, lambda: not scan_threads(), "the scan to end")
    # The file's last connection closed, the scan's included: SQLite removed the WAL.
    wal = tmp_path / "big.db-wal"
    await asyncio.to_thread(wait_for, lambda: not wal.exists(), "the WAL to go")


async def test_a_closing_store_voids_the_others_filter_until_its_last_commit_is_in(
    tmp_path: Path,
) -> None:
    path = tmp_path / "c.db"
    first = SqliteStore(path)
    second = SqliteStore(path)
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await first.put_many([row("mine")])
        other.execute("BEGIN IMMEDIATE")  # the write lock, held: the second's commit waits
        put = asyncio.ensure_future(second.put_many([row("theirs")]))
        await asyncio.sleep(0.1)
        closing = asyncio.ensure_future(second.aclose())
        # Long enough for the first to scan and trust a filter, were the second not counted.
        deadline = time.monotonic() + 1.0
        while time.monotonic() < deadline:
            assert first.absent_now("theirs") is False
            await asyncio.sleep(0.005)
        other.execute("ROLLBACK")
        await put
        await closing
        await trusting(first)
        assert first.absent_now("theirs") is False
    finally:
        other.close()
        await first.aclose()


async def test_a_store_closed_then_used_only_for_lookups_scans_again(tmp_path: Path) -> None:
    store = SqliteStore(tmp_path / "c.db")
    await store.put_many([row("mine")])
    await store.aclose()
    try:
        await trusting(store)  # its lookups reopen the writer, which rejoins
        assert store.absent_now("mine") is False
    finally:
        await store.aclose()
