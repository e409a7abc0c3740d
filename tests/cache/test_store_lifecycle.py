"""SqliteStore lifecycle: threads start at first use, aclose releases and the next use reopens,
a store dropped unclosed frees its threads and files, and exit commits what is queued."""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from contextlib import closing
from pathlib import Path

import pytest

from minima_llm.cache import DB_NAME, CacheRow, PromptCache, SqliteStore, TraceWriter
from minima_llm.errors import CacheError

WORKER_PREFIX = "minima-cache-"


def row(i: int) -> CacheRow:
    return CacheRow(f"k{i:06d}", f"text {i}", f'{{"id": {i}}}', 1000.0 + i, "m", f'{{"i":{i}}}')


def count(path: Path) -> int:
    with closing(sqlite3.connect(path)) as conn:
        n: int = conn.execute("SELECT count(*) FROM cache").fetchone()[0]
        return n


@pytest.fixture
def workers() -> Callable[[], list[str]]:
    """Names of the cache threads started since the test began (other tests may leave theirs)."""
    before = set(threading.enumerate())

    def running() -> list[str]:
        return sorted(
            t.name
            for t in threading.enumerate()
            if t.name.startswith(WORKER_PREFIX) and t not in before
        )

    return running


def open_files(under: Path) -> list[str]:
    """Files under ``under`` this process holds open."""
    found = []
    for fd in os.listdir("/proc/self/fd"):
        try:
            target = os.readlink(f"/proc/self/fd/{fd}")
        except OSError:  # closed meanwhile (the listing's own fd, or another thread's)
            continue
        if target.startswith(str(under)):
            found.append(target)
    return found


def settle(check: Callable[[], bool], timeout: float = 10.0) -> bool:
    """Wait for threads that were told to stop to get there."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            return False
        time.sleep(0.01)
    return True


def assert_released(workers: Callable[[], list[str]], under: Path) -> None:
    """Every cache thread started in the test has ended, and no file under ``under`` is open."""
    assert settle(lambda: workers() == []), workers()
    assert settle(lambda: open_files(under) == []), open_files(under)


def checkpointed(store: SqliteStore, times: int) -> bool:
    """Wait for the checkpointer thread to have run ``times`` checkpoints."""
    return settle(lambda: store.checkpoints >= times)


def test_threads_start_at_first_use_not_at_construction(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore.in_dir(tmp_path)
    try:
        assert workers() == []
        store.get_many_sync([row(1).key])
        assert workers() == [f"minima-cache-reader:{DB_NAME}"]
        store.put_many_sync([row(1)])
        assert len(workers()) == 2
    finally:
        store.close()
    assert workers() == []


async def test_aclose_releases_and_the_next_use_reopens(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore.in_dir(tmp_path)
    await store.put_many([row(1)])
    await store.aclose()
    assert workers() == []
    # Rows committed before the close are there; new ones are written.
    assert await store.get_many([row(1).key]) == {row(1).key: row(1)}
    await store.put_many([row(2)])
    await store.aclose()
    await store.aclose()
    store.close()
    assert store.get_many_sync([row(2).key]) == {row(2).key: row(2)}
    store.put_many_sync([row(3)])
    store.close()
    assert count(store.path) == 3
    assert store.rows_written == 3


def test_reopens_across_asyncio_runs_closed_in_between(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore.in_dir(tmp_path)
    lookup = SqliteStore.in_dir(tmp_path, readonly=True)

    async def run(i: int) -> dict[str, CacheRow]:
        await store.put_many([row(i)])
        found = await lookup.get_many([row(j).key for j in range(i + 1)])
        await store.aclose()
        await lookup.aclose()
        return found

    for i in range(3):
        assert len(asyncio.run(run(i))) == i + 1
    assert workers() == []


def test_a_closed_store_reopens_once_for_many_callers(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore.in_dir(tmp_path)
    store.put_many_sync([row(1)])
    store.close()
    callers = 8
    start = threading.Barrier(callers)
    found: list[int] = []

    def sync_caller() -> None:
        start.wait()
        found.append(len(store.get_many_sync([row(1).key])))

    async def many_tasks() -> None:
        start.wait()
        got = await asyncio.gather(*(store.get_many([row(1).key]) for _ in range(20)))
        found.extend(len(g) for g in got)

    threads = [threading.Thread(target=sync_caller) for _ in range(callers // 2)]
    threads += [
        threading.Thread(target=asyncio.run, args=(many_tasks(),)) for _ in range(callers // 2)
    ]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(10)
        assert found == [1] * (callers // 2 + 20 * callers // 2)
        # A second opening would have left a second reader running.
        assert workers() == [f"minima-cache-reader:{DB_NAME}"]
    finally:
        store.close()


async def test_a_store_that_cannot_reopen_fails_fast_and_retries(tmp_path: Path) -> None:
    writer = SqliteStore.in_dir(tmp_path)
    writer.put_many_sync([row(1)])
    writer.close()
    lookup = SqliteStore.in_dir(tmp_path, readonly=True)
    lookup.close()
    moved = tmp_path / "moved.db"
    lookup.path.rename(moved)
    with pytest.raises(CacheError, match="cannot open"):
        await asyncio.wait_for(lookup.get_many([row(1).key]), 5)
    with pytest.raises(CacheError, match="cannot open"):
        lookup.get_many_sync([row(1).key])
    moved.rename(lookup.path)
    try:
        assert await lookup.get_many([row(1).key]) == {row(1).key: row(1)}
    finally:
        lookup.close()


def test_a_dropped_store_stops_its_threads_and_closes_its_files(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    for i in range(20):
        store = SqliteStore.in_dir(tmp_path)
        store.put_many_sync([row(i)])
        assert store.get_many_sync([row(i).key])
        del store
    gc.collect()
    assert_released(workers, tmp_path)
    assert count(tmp_path / DB_NAME) == 20


def test_the_checkpointer_thread_ends_with_the_store(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore(tmp_path / DB_NAME, checkpoint_frames=1)
    store.put_many_sync([row(1)])
    assert checkpointed(store, 1), store
    assert f"minima-cache-checkpoint:{DB_NAME}" in workers()
    store.close()
    assert workers() == []
    assert open_files(tmp_path) == []
    # The next writes reopen the writer and, once due, the checkpointer (the first one
    # after a copy finishes it: the writer's catch-up, run once the batch is answered).
    store.put_many_sync([row(2)])
    store.put_many_sync([row(3)])
    assert checkpointed(store, 2), store
    del store
    gc.collect()
    assert_released(workers, tmp_path)
    assert count(tmp_path / DB_NAME) == 3


def test_a_write_that_lands_after_close_starts_no_checkpointer(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore(tmp_path / DB_NAME, checkpoint_frames=1)
    store.put_many_sync([row(0)])
    assert checkpointed(store, 1), store
    with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN IMMEDIATE")  # the writer's next commit waits for this lock
        late = threading.Thread(target=store.put_many_sync, args=([row(1)],))
        late.start()
        time.sleep(0.2)
        store.close(timeout=0.2)  # gives up on the blocked writer, which commits later
        assert f"minima-cache-writer:{DB_NAME}" in workers()
        other.execute("COMMIT")
    late.join(10)
    # The late commit (due a checkpoint at one frame) found the checkpointer stopped.
    assert_released(workers, tmp_path)
    assert count(tmp_path / DB_NAME) == 2
    assert not (tmp_path / f"{DB_NAME}-wal").exists()


async def test_dropping_a_store_commits_its_queued_write_without_waiting_for_it(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    store = SqliteStore.in_dir(tmp_path)
    store.put_many_sync([row(0)])
    with closing(sqlite3.connect(store.path, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")  # the writer waits for this lock
        task = asyncio.ensure_future(store.put_many([row(1)]))
        await asyncio.sleep(0.1)
        task.cancel()  # the write stays queued, and nobody waits for it any more
        # Not awaited: the awaiter would keep the CancelledError, its traceback and the store.
        await asyncio.sleep(0.01)
        assert task.cancelled()
        del task, store
        started = time.monotonic()
        gc.collect()
        # The finalizer ran on the event loop: it must not wait for the blocked writer.
        assert time.monotonic() - started < 0.5
        assert f"minima-cache-writer:{DB_NAME}" in workers()
        other.execute("COMMIT")
    assert settle(lambda: workers() == []), workers()
    assert count(tmp_path / DB_NAME) == 2


EXIT_SCRIPT = """
import asyncio, sys
from minima_llm.cache import CacheRow, SqliteStore

store = SqliteStore.in_dir(sys.argv[1])  # never closed

async def main():
    # Handed to the writer thread (which waits for the parent's lock); nobody waits for it.
    asyncio.ensure_future(store.put_many([CacheRow("queued", "q", None, 2.0)]))
    await asyncio.sleep(0)
    await asyncio.sleep(0)

asyncio.run(main())
print("exiting", flush=True)
"""


def test_exit_with_an_unclosed_store_commits_what_is_queued(tmp_path: Path) -> None:
    SqliteStore.in_dir(tmp_path).close()
    with closing(sqlite3.connect(tmp_path / DB_NAME, isolation_level=None)) as other:
        other.execute("BEGIN EXCLUSIVE")
        child = subprocess.Popen(
            [sys.executable, "-c", EXIT_SCRIPT, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        try:
            assert child.stdout is not None
            assert child.stdout.readline() == "exiting\n"
            time.sleep(0.3)  # the child is in its exit hooks, its writer still blocked
            other.execute("COMMIT")
            _, err = child.communicate(timeout=30)
        finally:
            if child.poll() is None:
                child.kill()
                child.communicate()
    assert child.returncode == 0, err
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert [k for (k,) in conn.execute("SELECT key FROM cache")] == ["queued"]
    # The connections were closed, not abandoned: SQLite checkpointed and removed the WAL.
    assert not (tmp_path / f"{DB_NAME}-wal").exists()


BUSY_EXIT_SCRIPT = """
import asyncio, sys
from minima_llm.cache import DB_NAME, CacheRow, SqliteStore

store = SqliteStore(sys.argv[1] + "/" + DB_NAME, checkpoint_frames=1)  # never closed
store.put_many_sync([CacheRow("warm", "w", None, 1.0)])
store.put_many_sync([CacheRow("warm-2", "w", None, 1.0)])  # the checkpointer is running

async def main():
    # Queued and never awaited: the writer commits them during exit, each due a checkpoint.
    for i in range(20):
        rows = [CacheRow(f"k{i}-{j}", "x" * 200, None, 1.0) for j in range(5000)]
        asyncio.ensure_future(store.put_many(rows))
    await asyncio.sleep(0)
    await asyncio.sleep(0)

asyncio.run(main())
"""


def test_exit_while_checkpoints_run_leaves_every_row_and_no_wal(tmp_path: Path) -> None:
    # A checkpointer that restarted or still ran while the writer closed would keep a
    # connection open, and the WAL would outlive the process (a race: it showed in
    # about one exit in five, with 100,000 rows queued).
    done = subprocess.run(
        [sys.executable, "-c", BUSY_EXIT_SCRIPT, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert count(tmp_path / DB_NAME) == 20 * 5000 + 2
    # Every connection closed before the last one did: it removed the WAL.
    assert not (tmp_path / f"{DB_NAME}-wal").exists()


async def test_prompt_cache_reopens_its_stores_and_trace_after_aclose(
    tmp_path: Path, workers: Callable[[], list[str]]
) -> None:
    trace = tmp_path / "trace.jsonl"
    cache = PromptCache.open(str(tmp_path / "c"), trace_file=str(trace))
    await cache.store("k1", "{}", "m", "one", None)
    cache.note("k1", "{}", "miss")
    await cache.aclose()
    assert workers() == []
    await cache.store("k2", "{}", "m", "two", None)
    cache.note("k2", "{}", "miss")
    hit = await cache.find("k1", "m", lambda m: ("k1", "{}"))
    await cache.aclose()
    assert hit is not None and hit.row.response_text == "one"
    assert [line.count('"key"') for line in trace.read_text().splitlines()] == [1, 1]


def test_a_dropped_trace_writer_closes_its_file(tmp_path: Path) -> None:
    writer = TraceWriter(str(tmp_path / "t.jsonl"))
    writer.write("k", "{}", "miss")
    writer.close()
    assert open_files(tmp_path) == []
    writer.write("k2", "{}", "miss")  # reopened
    assert open_files(tmp_path) == [str(tmp_path / "t.jsonl")]
    del writer
    gc.collect()
    assert open_files(tmp_path) == []
    assert len((tmp_path / "t.jsonl").read_text().splitlines()) == 2


def test_a_relative_path_stays_on_its_file_across_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The checkpointer connects anew for each checkpoint, and the writer looks at the
    # path twice a second: a relative path then named another file (or none).
    first, later = tmp_path / "first", tmp_path / "later"
    (first / "cache").mkdir(parents=True)
    (later / "cache").mkdir(parents=True)
    monkeypatch.chdir(first)
    store = SqliteStore(Path("cache") / DB_NAME, checkpoint_frames=1)
    try:
        store.put_many_sync([row(0)])
        monkeypatch.chdir(later)
        time.sleep(0.6)  # past the writer's interval between two looks at its file
        store.put_many_sync([row(i) for i in range(1, 50)])
        assert len(store.get_many_sync([row(i).key for i in range(50)])) == 50
    finally:
        store.close()
    assert store.path == first / "cache" / DB_NAME
    assert count(first / "cache" / DB_NAME) == 50
    assert os.listdir(later / "cache") == []
