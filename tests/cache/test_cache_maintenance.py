"""``minima-llm cache stats`` and ``cache merge``: one file from the caches of several nodes."""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import threading
from contextlib import closing
from pathlib import Path

import pytest
from test_cache_compat import make_old_file
from test_cache_readonly import read_only_dir

from minima_llm import MinimaLlmConfig, MinimaLlmRequest, OpenAIMinimaLlm
from minima_llm.cache import CacheRow, SqliteStore
from minima_llm.cache.maintenance import MERGE_CHUNK, cache_stats, merge_caches
from minima_llm.cli import main
from minima_llm.errors import CacheError
from minima_llm.testing import MockServer


def row(key: str, text: str, created_at: float, model: str | None = "m") -> CacheRow:
    return CacheRow(key, text, None, created_at, model, None)


def write(directory: Path, rows: list[CacheRow]) -> Path:
    store = SqliteStore.in_dir(directory)
    try:
        store.put_many_sync(rows)
    finally:
        store.close()
    return directory


def texts(directory: Path) -> dict[str, str]:
    with closing(sqlite3.connect(directory / "minima_llm.db")) as conn:
        return dict(conn.execute("SELECT key, response_text FROM cache"))


def test_the_newest_row_of_each_key_wins_whatever_the_order(tmp_path: Path) -> None:
    a = write(tmp_path / "node-a", [row("k1", "a-old", 1.0), row("k2", "a-new", 5.0)])
    b = write(
        tmp_path / "node-b", [row("k1", "b-new", 2.0), row("k2", "b-old", 3.0), row("k3", "b", 1.0)]
    )
    into = write(tmp_path / "merged", [row("k3", "target-newer", 9.0)])

    report = merge_caches(into, [a, b])

    assert texts(into) == {"k1": "b-new", "k2": "a-new", "k3": "target-newer"}
    # a: k1 and k2 added; b: k1 replaces a's, k2 and k3 are older than what is there.
    assert (report.added, report.replaced, report.kept) == (2, 1, 2)
    assert report.sources == (a / "minima_llm.db", b / "minima_llm.db")
    assert merge_caches(into, [b, a]).replaced == 0  # merging again changes nothing


async def test_a_merged_cache_replays_every_node_with_no_live_call(
    mock: MockServer, tmp_path: Path
) -> None:
    questions = [
        MinimaLlmRequest(f"q{i}", [{"role": "user", "content": f"question {i}"}]) for i in range(40)
    ]
    for node, part in (("node-a", questions[:25]), ("node-b", questions[15:])):
        config = MinimaLlmConfig(base_url=mock.url, model="m", cache_dir=str(tmp_path / node))
        async with OpenAIMinimaLlm(config) as backend:
            await backend.run_batched(part)
    asked = mock.stats()["requests"]

    report = merge_caches(tmp_path / "merged", [tmp_path / "node-a", tmp_path / "node-b"])

    # The 10 both nodes asked: node b asked them later, so its answers are the ones kept.
    assert (report.added, report.replaced, report.kept) == (40, 10, 0)
    config = MinimaLlmConfig(base_url=mock.url, model="m", cache_dir=str(tmp_path / "merged"))
    async with OpenAIMinimaLlm(config) as backend:
        results = await backend.run_batched(questions)
    assert all(r.cached for r in results)  # type: ignore[union-attr]
    assert mock.stats()["requests"] == asked


def test_a_file_in_the_old_format_merges(tmp_path: Path) -> None:
    old = make_old_file(tmp_path / "old", ["x", "y"])
    report = merge_caches(tmp_path / "merged", [old])
    assert report.added == 2
    assert cache_stats(tmp_path / "merged").models == {"(not recorded)": 2}


def test_a_source_in_a_read_only_directory_is_read_and_left_as_it_was(tmp_path: Path) -> None:
    source = write(tmp_path / "archive", [row(f"k{i}", "t", float(i)) for i in range(10)])
    before = sorted(p.name for p in source.iterdir())
    with read_only_dir(source):
        report = merge_caches(tmp_path / "merged", [source])
    assert report.added == 10
    assert sorted(p.name for p in source.iterdir()) == before


def test_more_rows_than_a_chunk_and_a_writer_beside_the_merge(tmp_path: Path) -> None:
    count = MERGE_CHUNK * 3 + 7
    source = write(tmp_path / "big", [row(f"k{i}", "t", 1.0) for i in range(count)])
    into = write(tmp_path / "merged", [])
    # Another process's store keeps writing the target while the merge runs.
    live = SqliteStore.in_dir(into)
    stop = threading.Event()

    def keep_writing() -> None:
        n = 0
        while not stop.is_set():
            live.put_many_sync([row(f"live{n}", "live", 2.0)])
            n += 1

    writer = threading.Thread(target=keep_writing)
    writer.start()
    try:
        report = merge_caches(into, [source])
    finally:
        stop.set()
        writer.join(30)
        live.close()
    assert report.added == count
    held = texts(into)
    assert sum(1 for k in held if k.startswith("k")) == count
    assert any(k.startswith("live") for k in held)


def test_the_target_itself_among_the_sources_is_skipped(tmp_path: Path) -> None:
    into = write(tmp_path / "merged", [row("k", "t", 1.0)])
    notes: list[str] = []
    report = merge_caches(into, [into / "minima_llm.db"], progress=notes.append)
    assert report.sources == () and "it is the target" in notes[0]


def test_a_missing_source_or_one_that_is_not_a_cache_is_refused_naming_it(tmp_path: Path) -> None:
    with pytest.raises(CacheError, match=r"no cache file at .*nowhere"):
        merge_caches(tmp_path / "merged", [tmp_path / "nowhere"])
    other = tmp_path / "other.db"
    with closing(sqlite3.connect(other)) as conn:
        conn.execute("CREATE TABLE cache (id INTEGER)")
    with pytest.raises(CacheError, match=r"other\.db.*not a minima-llm cache"):
        merge_caches(tmp_path / "merged", [other])


def test_stats(tmp_path: Path) -> None:
    rows = [row("a", "t", 1_700_000_000.0, "gpt-x"), row("b", "t", 1_700_086_400.0, "gpt-x")]
    write(tmp_path / "c", [*rows, row("c", "t", 1_700_000_500.0, "llama")])
    stats = cache_stats(tmp_path / "c")
    assert (stats.rows, stats.models) == (3, {"gpt-x": 2, "llama": 1})
    assert (stats.oldest, stats.newest) == (1_700_000_000.0, 1_700_086_400.0)
    text = stats.describe(top=1)
    assert "rows     3" in text and "gpt-x: 2" in text and "(1 more): 1" in text
    assert "2023-11-14 22:13:20 UTC .. 2023-11-15 22:13:20 UTC" in text


def test_the_command_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a = write(tmp_path / "a", [row("k1", "t", 1.0)])
    b = write(tmp_path / "b", [row("k2", "t", 1.0)])
    assert main(["cache", "merge", str(a), str(b), "--into", str(tmp_path / "m")]) == 0
    assert "2 added, 0 replaced by newer, 0 already there" in capsys.readouterr().out
    assert main(["cache", "stats", str(tmp_path / "m")]) == 0
    assert "rows     2" in capsys.readouterr().out
    assert main(["cache", "stats", str(tmp_path / "nothing")]) == 2
    assert "nothing" in capsys.readouterr().err


def test_a_rollback_journal_left_hot_by_a_killed_writer_is_refused(tmp_path: Path) -> None:
    # minima-llm before 0.2.7 wrote with a rollback journal; a writer killed mid-commit
    # leaves a hot -journal, and reading around it would copy uncommitted rows.
    old = make_old_file(tmp_path / "old", [f"p{i}" for i in range(3000)])
    kill_mid_write = (
        "import os, signal, sqlite3, sys\n"
        "c = sqlite3.connect(sys.argv[1], isolation_level=None)\n"
        "c.execute('PRAGMA cache_size=5'); c.execute('BEGIN')\n"
        "c.execute(\"UPDATE cache SET response_text='UNCOMMITTED', created_at=99.0\")\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", kill_mid_write, str(old)], timeout=60)
    assert (old.parent / "minima_llm.db-journal").exists()
    for attempt in (lambda: cache_stats(old), lambda: merge_caches(tmp_path / "m", [old])):
        with pytest.raises(CacheError, match="-journal left by a writer that was killed"):
            attempt()
    # As the error says: opened once as a cache_dir, SQLite rolls the journal back.
    SqliteStore.in_dir(old.parent).close()
    assert merge_caches(tmp_path / "m", [old]).added == 3000
    assert "UNCOMMITTED" not in texts(tmp_path / "m").values()


def test_a_killed_run_of_another_user_is_read_from_a_copy(tmp_path: Path) -> None:
    source = tmp_path / "task-1"
    write_then_kill = (
        "import os, signal, sys\n"
        "from minima_llm.cache import CacheRow, SqliteStore\n"
        "s = SqliteStore.in_dir(sys.argv[1])\n"
        "s.put_many_sync([CacheRow(f'k{i}', 't', None, 1.0, 'm', None) for i in range(50)])\n"
        "os.kill(os.getpid(), signal.SIGKILL)\n"
    )
    subprocess.run([sys.executable, "-c", write_then_kill, str(source)], timeout=60)
    (source / "minima_llm.db-shm").unlink()  # as after a reboot, or a copy of db and WAL
    if os.geteuid() == 0:
        for name in ("minima_llm.db", "minima_llm.db-wal"):
            os.chown(source / name, 4711, 4711)  # a colleague's run
    else:
        pytest.skip("needs root to give the files to another user")
    before = sorted(p.name for p in source.iterdir())
    assert cache_stats(source).rows == 50
    assert merge_caches(tmp_path / "m", [source]).added == 50
    # No -shm of ours beside a colleague's files: it would refuse their next run.
    assert sorted(p.name for p in source.iterdir()) == before


def test_rows_that_order_nothing_are_skipped_and_bad_text_is_kept_readable(tmp_path: Path) -> None:
    db = tmp_path / "odd" / "minima_llm.db"
    write(db.parent, [row("good", "t", 1.0)])
    with closing(sqlite3.connect(db)) as conn:
        conn.execute("PRAGMA ignore_check_constraints=1")
        conn.execute("INSERT INTO cache VALUES ('textual', 't', NULL, 'yesterday', 'm', NULL)")
        conn.execute(
            "INSERT INTO cache VALUES ('bytes', CAST(X'ff41' AS TEXT), NULL, 2.0, 'm', NULL)"
        )
        conn.commit()
    report = merge_caches(tmp_path / "m", [db])
    assert (report.added, report.skipped) == (2, 1)
    assert texts(tmp_path / "m")["bytes"] == "\ufffdA"
    assert "1 unreadable rows skipped" in report.describe()


def test_a_target_that_cannot_be_written_says_so(tmp_path: Path) -> None:
    source = write(tmp_path / "a", [row("k", "t", 1.0)])
    (tmp_path / "file").write_text("x")
    with pytest.raises(CacheError, match="must be a cache directory"):
        merge_caches(tmp_path / "file", [source])
    (tmp_path / "locked").mkdir()
    with (
        read_only_dir(tmp_path / "locked"),
        pytest.raises(CacheError, match="cannot write the cache"),
    ):
        merge_caches(tmp_path / "locked", [source])
    # A mistyped source is refused before anything is made.
    with pytest.raises(CacheError, match="no cache file"):
        merge_caches(tmp_path / "new", [tmp_path / "typo"])
    assert not (tmp_path / "new").exists()


def test_side_files_named_by_a_glob_are_skipped(tmp_path: Path) -> None:
    source = write(tmp_path / "a", [row("k", "t", 1.0)])
    (source / "minima_llm.db-wal").touch()
    notes: list[str] = []
    files = [source / "minima_llm.db", source / "minima_llm.db-wal"]
    assert merge_caches(tmp_path / "m", files, progress=notes.append).added == 1
    assert any("SQLite's own file" in n for n in notes)


def test_stats_of_a_time_no_calendar_holds(tmp_path: Path) -> None:
    write(tmp_path / "c", [row("k", "t", 1e300)])
    assert "1e+300" in cache_stats(tmp_path / "c").describe()


def test_stats_of_several_paths_shows_those_it_can(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = write(tmp_path / "good", [row("k", "t", 1.0)])
    assert main(["cache", "stats", str(tmp_path / "missing"), str(good)]) == 2
    captured = capsys.readouterr()
    assert "rows     1" in captured.out and "missing" in captured.err
