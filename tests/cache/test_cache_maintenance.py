"""``minima-llm cache stats`` and ``cache merge``: one file from the caches of several nodes."""

from __future__ import annotations

import sqlite3
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
