"""A store used before a fork keeps working in the child (multiprocessing's fork start method)."""

from __future__ import annotations

import asyncio
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path
from typing import Any

import pytest

from fork_support import ALLOW_FORK, in_forked_child, needs_fork
from minima_llm.cache import DB_NAME, CacheRow, SqliteStore

pytestmark = [needs_fork, ALLOW_FORK]


def row(tag: str) -> CacheRow:
    return CacheRow(f"k-{tag}", f"answer {tag}", "{}", 1.0, "m", None)


def child_round_trip(store: SqliteStore) -> list[str]:
    """In the child: read the parent's row, write one of ours, read it back; each bounded."""

    async def go() -> list[str]:
        parents = await asyncio.wait_for(store.get_many(["k-parent"]), 10)
        await asyncio.wait_for(store.put_many([row("child")]), 10)
        ours = await asyncio.wait_for(store.get_many(["k-child"]), 10)
        await store.aclose()
        return [parents["k-parent"].response_text, ours["k-child"].response_text]

    return asyncio.run(go())


def test_a_store_used_before_a_fork_reads_and_writes_in_the_child(tmp_path: Path) -> None:
    store = SqliteStore.in_dir(tmp_path)
    try:
        # Used, so its reader and writer threads run (and hold their connections) at the fork.
        asyncio.run(store.put_many([row("parent")]))
        assert store.get_many_sync(["k-parent"])
        got = in_forked_child(lambda: child_round_trip(store), timeout=30)
        assert got == ["answer parent", "answer child"]
        # The parent's threads and connections were left alone: they still read and write.
        assert store.get_many_sync(["k-child"])["k-child"].response_text == "answer child"
        store.put_many_sync([row("after")])
        assert set(store.get_many_sync(["k-parent", "k-child", "k-after"])) == {
            "k-parent",
            "k-child",
            "k-after",
        }
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)


@pytest.mark.parametrize("use", ["async", "sync"])
def test_a_store_forked_before_its_first_use_works_in_the_child(tmp_path: Path, use: str) -> None:
    # Connections opened at construction, threads not yet started: the child must not
    # adopt the parent's connection as its own first thread would.
    store = SqliteStore.in_dir(tmp_path)
    store.put_many_sync([row("parent")])
    store.close()
    store = SqliteStore.in_dir(tmp_path)

    def sync_round_trip() -> list[str]:
        parents = store.get_many_sync(["k-parent"])
        store.put_many_sync([row("child")])
        ours = store.get_many_sync(["k-child"])
        store.close()
        return [parents["k-parent"].response_text, ours["k-child"].response_text]

    try:
        child = sync_round_trip if use == "sync" else lambda: child_round_trip(store)
        assert in_forked_child(child, timeout=30) == ["answer parent", "answer child"]
        assert store.get_many_sync(["k-child"])["k-child"].response_text == "answer child"
    finally:
        store.close()


def test_a_checkpointer_caught_mid_request_by_the_fork_works_in_the_child(tmp_path: Path) -> None:
    # The moment the fork hook exists for: a parent thread inside the checkpointer's
    # lock when the child is made. The child inherits the lock held, by a thread it
    # does not have, and without a fresh lock its first request would wait forever.
    from minima_llm.cache._checkpoint import Checkpointer

    store = SqliteStore.in_dir(tmp_path)
    store.put_many_sync([row("parent")])
    store.close()
    done: list[bool] = []
    checkpointer = Checkpointer(tmp_path / DB_NAME, "test-checkpointer", done.append)
    checkpointer.arm()
    inside, leave = threading.Event(), threading.Event()

    def hold_the_lock() -> None:
        with checkpointer._lock:
            inside.set()
            leave.wait(30)

    holder = threading.Thread(target=hold_the_lock)
    holder.start()
    try:
        assert inside.wait(10)

        def in_child() -> list[Any]:
            refused_before_arming = checkpointer.request()
            checkpointer.arm()  # as the child's own writer does when it opens
            accepted = checkpointer.request()
            deadline = time.monotonic() + 10
            while not done and time.monotonic() < deadline:
                time.sleep(0.01)
            checkpointer.stop(timeout=5)
            return [refused_before_arming, accepted, done]

        assert in_forked_child(in_child, timeout=30) == [False, True, [True]]
    finally:
        leave.set()
        holder.join(10)
        checkpointer.stop(timeout=5)
    assert not done  # the parent asked for nothing
