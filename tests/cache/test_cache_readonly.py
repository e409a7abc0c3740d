"""Caches in directories this process cannot write: archived runs, read-only mounts."""

from __future__ import annotations

import os
import shutil
import sqlite3
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from contextlib import closing, contextmanager
from pathlib import Path

import pytest

from backend_support import BackendFactory, req
from fork_support import ALLOW_FORK, NOBODY, in_forked_child
from minima_llm.cache import DB_NAME, CacheRow, SqliteStore
from minima_llm.errors import CacheError
from minima_llm.testing import MockServer


def _writable(path: Path) -> bool:
    probe = path / ".probe"
    try:
        probe.touch()
    except OSError:
        return False
    probe.unlink()
    return True


@contextmanager
def read_only_dir(path: Path) -> Iterator[None]:
    """``path`` made unwritable for real: mode 0555, or the immutable flag where we run as root."""
    mode = path.stat().st_mode
    path.chmod(0o555)
    immutable = False
    try:
        if _writable(path) and shutil.which("chattr"):  # root ignores the mode bits
            immutable = subprocess.run(["chattr", "+i", str(path)], check=False).returncode == 0
        if _writable(path):
            pytest.skip("cannot make a directory read-only here")
        yield
    finally:
        if immutable:
            subprocess.run(["chattr", "-i", str(path)], check=True)
        path.chmod(mode)


async def test_lookup_cache_in_a_read_only_directory_serves_its_rows(
    make_backend: BackendFactory, mock: MockServer, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    first = make_backend(cache_dir=str(archive))
    await first.run_batched([req(i) for i in range(3)], progress=False)
    await first.aclose()  # a clean close leaves the database file alone, no -wal or -shm
    assert sorted(os.listdir(archive)) == ["minima_llm.db"]
    mock.reset()
    with read_only_dir(archive):
        # SQLite's ?mode=ro reader needs to create the -shm file next to a WAL database,
        # which it cannot here; the lookup was skipped and every request went live.
        replay = make_backend(cache_dir=str(tmp_path / "fresh"), cache_lookup_dirs=(str(archive),))
        results = await replay.run_batched([req(i) for i in range(3)], progress=False)
        await replay.aclose()
    assert [(r.cached, r.cache_source) for r in results] == [(True, "lookup")] * 3
    assert mock.stats()["requests"] == 0


def test_a_primary_cache_in_a_read_only_directory_says_so(tmp_path: Path) -> None:
    # SQLite says only "unable to open database file".
    locked = tmp_path / "locked"
    locked.mkdir()
    with read_only_dir(locked), pytest.raises(CacheError, match="is not writable"):
        SqliteStore.in_dir(locked)


def _rows(start: int, stop: int, tag: str) -> list[CacheRow]:
    return [
        CacheRow(f"k{i}", f"{tag} {i}" + "x" * 400, "{}", 1.0 + i, "m", None)
        for i in range(start, stop)
    ]


def test_a_read_only_lookup_follows_its_owner_writing_again(tmp_path: Path) -> None:
    # immutable=1 promises SQLite the file never changes; its owner may well run again.
    archive = tmp_path / "archive"
    owner = SqliteStore.in_dir(archive)
    owner.put_many_sync(_rows(0, 3, "old"))
    owner.close()
    with read_only_dir(archive):
        lookup = SqliteStore.in_dir(archive, readonly=True)
        assert lookup.get_many_sync(["k1"])["k1"].response_text.startswith("old 1")
    try:
        owner = SqliteStore.in_dir(archive)  # the owner's next run, while the lookup stays open
        owner.put_many_sync(_rows(0, 3000, "new"))
        owner.close()
        with read_only_dir(archive):
            found = lookup.get_many_sync([f"k{i}" for i in range(0, 3000, 7)])
        assert len(found) == len(range(0, 3000, 7))
        assert all(row.response_text.startswith("new") for row in found.values())
    finally:
        lookup.close()


@pytest.fixture
def shared_dir() -> Iterator[Path]:
    """A directory another user can reach: pytest's tmp_path is private to its owner."""
    path = Path(tempfile.mkdtemp(prefix="minima-ro-"))
    path.chmod(0o755)
    try:
        yield path
    finally:
        for directory in [path, *path.rglob("*")]:
            if directory.is_dir():
                directory.chmod(0o755)
        shutil.rmtree(path)


def as_non_root(fn: Callable[[], str]) -> str:
    """``fn()`` run by a user whom mode bits bind: this one, or nobody in a forked child of root."""
    if os.geteuid() != 0:
        return fn()
    if not hasattr(os, "fork"):
        pytest.skip("running as root, and cannot fork a child to drop to another user")
    result: str = in_forked_child(fn, uid=NOBODY)
    return result


@ALLOW_FORK
def test_a_lookup_in_a_directory_a_non_root_user_cannot_write_serves_its_rows(
    shared_dir: Path,
) -> None:
    # For a user without write access to the directory, SQLite 3.40 fails a ?mode=ro
    # reader with "attempt to write a readonly database", not "unable to open"; root,
    # which the chattr tests above run as, never sees it.
    archive = shared_dir / "archive"
    owner = SqliteStore.in_dir(archive)
    owner.put_many_sync(_rows(0, 3, "old"))
    owner.close()
    assert sorted(os.listdir(archive)) == [DB_NAME]
    archive.chmod(0o555)

    def look_up() -> str:
        lookup = SqliteStore.in_dir(archive, readonly=True)
        try:
            return lookup.get_many_sync(["k1"])["k1"].response_text
        finally:
            lookup.close()

    assert as_non_root(look_up).startswith("old 1")


@ALLOW_FORK
def test_a_lookup_that_cannot_read_its_wal_says_why_not_to_move_cache_dir(
    shared_dir: Path,
) -> None:
    owner = SqliteStore.in_dir(shared_dir / "live")
    copy = shared_dir / "copy"
    copy.mkdir()
    try:
        owner.put_many_sync(_rows(0, 3, "old"))
        # The file and its WAL as a run still writing (or killed) leaves them, without the -shm.
        for name in (DB_NAME, f"{DB_NAME}-wal"):
            shutil.copy(shared_dir / "live" / name, copy / name)
    finally:
        owner.close()
    assert (copy / f"{DB_NAME}-wal").stat().st_size > 0
    copy.chmod(0o555)

    def open_it() -> str:
        try:
            SqliteStore.in_dir(copy, readonly=True).close()
        except CacheError as exc:
            return str(exc)
        return "opened"

    message = as_non_root(open_it)
    assert f"the directory {copy} is not writable and {DB_NAME}-wal holds commits" in message
    assert "point cache_dir elsewhere" not in message


@ALLOW_FORK
def test_a_cache_file_of_another_user_in_a_shared_directory_is_refused_when_opened(
    shared_dir: Path,
) -> None:
    # A colleague's minima_llm.db (mode 644) in a directory everyone may write: SQLite
    # opens it read-only without a word, and every commit of the run would fail.
    owner = SqliteStore.in_dir(shared_dir)
    owner.put_many_sync(_rows(0, 1, "theirs"))
    owner.close()
    shared_dir.chmod(0o777)
    (shared_dir / DB_NAME).chmod(0o644)

    def open_it() -> str:
        try:
            SqliteStore.in_dir(shared_dir).close()
        except CacheError as exc:
            return str(exc)
        return "opened"

    said = as_non_root(open_it)
    assert f"{shared_dir / DB_NAME} is not writable by this user" in said
    assert "CACHE_LOOKUP_DIRS" in said
    # The same file read as a lookup cache is fine.
    assert as_non_root(lambda: _lookup_text(shared_dir)).startswith("theirs 0")


def _lookup_text(directory: Path) -> str:
    lookup = SqliteStore.in_dir(directory, readonly=True)
    try:
        return lookup.get_many_sync(["k0"])["k0"].response_text
    finally:
        lookup.close()


def _closed_archive(tmp_path: Path) -> Path:
    """A cache directory whose owner wrote three rows ("old 0".."old 2") and closed it."""
    archive = tmp_path / "archive"
    owner = SqliteStore.in_dir(archive)
    owner.put_many_sync(_rows(0, 3, "old"))
    owner.close()
    return archive


def test_a_lookup_of_a_cache_nobody_has_open_leaves_no_file_beside_it(tmp_path: Path) -> None:
    # A ?mode=ro reader made a -wal and a -shm here and, read-only, never removed them.
    archive = _closed_archive(tmp_path)
    lookup = SqliteStore.in_dir(archive, readonly=True)
    try:
        assert lookup.get_many_sync(["k1"])["k1"].response_text.startswith("old 1")
        assert os.listdir(archive) == [DB_NAME]
    finally:
        lookup.close()
    assert os.listdir(archive) == [DB_NAME]


def test_a_lookup_in_a_writable_directory_follows_its_owner_writing_again(tmp_path: Path) -> None:
    archive = _closed_archive(tmp_path)
    lookup = SqliteStore.in_dir(archive, readonly=True)
    try:
        assert lookup.get_many_sync(["k1"])["k1"].response_text.startswith("old 1")
        owner = SqliteStore.in_dir(archive)
        owner.put_many_sync(_rows(0, 3000, "new"))  # checkpointed into the file meanwhile
        wanted = [f"k{i}" for i in range(0, 3000, 7)]
        while_open = lookup.get_many_sync(wanted)
        owner.close()
        after = lookup.get_many_sync(wanted)
    finally:
        lookup.close()
    for found in (while_open, after):
        assert len(found) == len(wanted)
        assert all(row.response_text.startswith("new") for row in found.values())
    assert os.listdir(archive) == [DB_NAME]  # the owner's close removed its -wal and -shm


@ALLOW_FORK
def test_a_colleagues_lookup_does_not_lock_the_owner_out_of_a_shared_directory(
    shared_dir: Path,
) -> None:
    # A lab directory (setgid, group-writable) that alice writes and bob reads: bob's
    # reader left a -wal and -shm of his, mode 644, and alice's next run was refused.
    if os.geteuid() != 0:
        pytest.skip("needs root to run as two users")
    lab = shared_dir / "alice"
    lab.mkdir()
    os.chown(lab, 1001, 1500)
    lab.chmod(0o2775)

    def alice_writes() -> int:
        store = SqliteStore.in_dir(lab)
        try:
            store.put_many_sync(_rows(0, 3, "alice"))
            return store.rows_written
        finally:
            store.close()

    def bob_looks_up() -> str:
        lookup = SqliteStore.in_dir(lab, readonly=True)
        try:
            return lookup.get_many_sync(["k1"])["k1"].response_text
        finally:
            lookup.close()

    assert in_forked_child(alice_writes, uid=1001, gid=1500, umask=0o002) == 3
    assert in_forked_child(bob_looks_up, uid=1002, gid=1500, umask=0o022).startswith("alice 1")
    assert os.listdir(lab) == [DB_NAME]
    assert in_forked_child(alice_writes, uid=1001, gid=1500, umask=0o002) == 3


@contextmanager
def read_only_mount(path: Path) -> Iterator[None]:
    """``path`` bind-mounted onto itself read-only, as a dataset or a container's ro bind is."""
    mount = shutil.which("mount")
    if os.geteuid() != 0 or mount is None or sys.platform != "linux":
        pytest.skip("needs root and mount(8) to make a read-only mount")
    made = subprocess.run([mount, "--bind", str(path), str(path)], check=False)
    if made.returncode != 0:
        pytest.skip("cannot bind-mount here")
    try:
        ro = subprocess.run([mount, "-o", "remount,bind,ro", str(path)], check=False)
        if ro.returncode != 0:
            pytest.skip("cannot remount read-only here")
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_a_primary_cache_on_a_read_only_filesystem_says_so_not_to_ask_its_owner(
    tmp_path: Path,
) -> None:
    dataset = tmp_path / "dataset"
    SqliteStore.in_dir(dataset).close()
    with read_only_mount(dataset):
        with pytest.raises(CacheError) as raised:
            SqliteStore.in_dir(dataset)
        lookup = SqliteStore.in_dir(dataset, readonly=True)  # reading it is fine
        lookup.close()
    said = str(raised.value)
    assert f"{dataset / DB_NAME} is on a read-only filesystem" in said
    assert "CACHE_LOOKUP_DIRS" in said
    assert "ask its owner" not in said


def test_a_cache_copied_without_its_wal_says_where_its_answers_are(tmp_path: Path) -> None:
    live = tmp_path / "live"
    copy = tmp_path / "copy"
    copy.mkdir()
    owner = SqliteStore.in_dir(live)
    try:
        owner.put_many_sync(_rows(0, 3, "old"))
        # A preempted job's directory copied file by file, the WAL left out.
        shutil.copy(live / DB_NAME, copy / DB_NAME)
    finally:
        owner.close()
    with pytest.raises(CacheError, match="copied without the -wal file"):
        SqliteStore.in_dir(copy, readonly=True)


def test_another_programs_database_gets_no_wal_hint(tmp_path: Path) -> None:
    with closing(sqlite3.connect(tmp_path / DB_NAME)) as conn:
        conn.execute("CREATE TABLE other (x)")
    with pytest.raises(CacheError, match="no cache table") as raised:
        SqliteStore.in_dir(tmp_path, readonly=True)
    assert "-wal" not in str(raised.value)
