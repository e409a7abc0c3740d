"""PromptCache: primary, model synonyms, read-only lookup dirs, trace file, prefetch."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
from collections.abc import AsyncIterator, Iterable, Sequence
from contextlib import closing
from pathlib import Path

import pytest

from minima_llm import MinimaLlmConfig, MinimaLlmRequest, OpenAIMinimaLlm
from minima_llm.cache import (
    CacheRow,
    MemoryStore,
    Prefetched,
    PromptCache,
    SqliteStore,
    cache_key,
    newest,
)
from minima_llm.errors import CacheError, ConfigError
from minima_llm.testing import MockServer

MESSAGES = [{"role": "user", "content": "Name a prime."}]
SYNONYMS = {"model-a": ("model-b",), "model-b": ("model-a",)}


def rekey(model: str) -> tuple[str, str]:
    return cache_key(model, MESSAGES, 0.0)


KEY_A, CANON_A = rekey("model-a")
KEY_B, CANON_B = rekey("model-b")


def row_for(model: str, text: str, created_at: float) -> CacheRow:
    key, canonical = rekey(model)
    return CacheRow(key, text, json.dumps({"text": text}), created_at, model, canonical)


def make_cache_dir(directory: Path, *rows: CacheRow) -> str:
    store = SqliteStore.in_dir(directory)
    try:
        store.put_many_sync(rows)
    finally:
        store.close()
    return str(directory)


def primary_rows(directory: Path) -> dict[str, tuple[str, float, str | None, str | None]]:
    with closing(sqlite3.connect(directory / "minima_llm.db")) as conn:
        query = "SELECT key, response_text, created_at, model, canonical FROM cache"
        return {r[0]: r[1:] for r in conn.execute(query)}


@pytest.fixture
async def cache(tmp_path: Path) -> AsyncIterator[PromptCache]:
    c = PromptCache.open(str(tmp_path / "primary"), synonyms=SYNONYMS)
    yield c
    await c.aclose()


async def test_store_then_find_in_primary(cache: PromptCache, tmp_path: Path) -> None:
    assert await cache.find(KEY_A, "model-a", rekey) is None
    await cache.store(KEY_A, CANON_A, "model-a", "7", '{"raw": 1}')
    # store() returns after the commit: another connection already sees the row.
    assert primary_rows(tmp_path / "primary")[KEY_A][0] == "7"
    hit = await cache.find(KEY_A, "model-a", rekey)
    assert hit is not None
    assert hit.source == "primary"
    assert (hit.row.key, hit.row.response_text, hit.row.response_raw) == (KEY_A, "7", '{"raw": 1}')
    assert (hit.row.model, hit.row.canonical) == ("model-a", CANON_A)


async def test_synonym_hit_is_copied_under_the_requested_key(
    cache: PromptCache, tmp_path: Path
) -> None:
    await cache.store(KEY_B, CANON_B, "model-b", "from b", None)
    hit = await cache.find(KEY_A, "model-a", rekey)
    assert hit is not None
    assert (hit.source, hit.row.response_text) == ("synonym", "from b")
    rows = primary_rows(tmp_path / "primary")
    text, _, model, canonical = rows[KEY_A]
    assert (text, model, canonical) == ("from b", "model-a", CANON_A)
    # Next time it is an ordinary primary hit.
    again = await cache.find(KEY_A, "model-a", rekey)
    assert again is not None
    assert (again.source, again.row.key) == ("primary", KEY_A)


async def test_without_synonyms_another_models_row_is_a_miss(tmp_path: Path) -> None:
    cache = PromptCache.open(str(tmp_path / "primary"))
    try:
        await cache.store(KEY_B, CANON_B, "model-b", "from b", None)
        assert await cache.find(KEY_A, "model-a", rekey) is None
        assert KEY_A not in primary_rows(tmp_path / "primary")
    finally:
        await cache.aclose()


@pytest.mark.parametrize("newest_first", [True, False])
async def test_newest_lookup_row_wins_and_is_copied(tmp_path: Path, newest_first: bool) -> None:
    old = make_cache_dir(tmp_path / "old", row_for("model-a", "old answer", 100.0))
    new = make_cache_dir(tmp_path / "new", row_for("model-a", "new answer", 200.0))
    dirs = [new, old] if newest_first else [old, new]
    cache = PromptCache.open(str(tmp_path / "primary"), dirs)
    try:
        assert [d for d, _ in cache.lookups] == dirs
        assert all(getattr(store, "readonly", False) for _, store in cache.lookups)
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert (hit.source, hit.row.response_text, hit.row.created_at) == (
            "lookup",
            "new answer",
            200.0,
        )
        assert primary_rows(tmp_path / "primary")[KEY_A] == (
            "new answer",
            200.0,
            "model-a",
            CANON_A,
        )
        again = await cache.find(KEY_A, "model-a", rekey)
        assert again is not None
        assert again.source == "primary"
    finally:
        await cache.aclose()
    # The lookup caches are only read.
    assert list(primary_rows(tmp_path / "old").values()) == [
        ("old answer", 100.0, "model-a", CANON_A)
    ]
    assert len(primary_rows(tmp_path / "new")) == 1


async def test_lookup_finds_rows_stored_under_a_synonym(tmp_path: Path) -> None:
    other = make_cache_dir(tmp_path / "other", row_for("model-b", "b in lookup", 50.0))
    cache = PromptCache.open(str(tmp_path / "primary"), [other], synonyms=SYNONYMS)
    try:
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert (hit.source, hit.row.response_text) == ("lookup", "b in lookup")
        assert primary_rows(tmp_path / "primary")[KEY_A][2:] == ("model-a", CANON_A)
    finally:
        await cache.aclose()


def test_newest_picks_the_latest_created_at() -> None:
    rows = [row_for("model-a", t, c) for t, c in (("mid", 5.0), ("new", 9.0), ("old", 1.0))]
    assert newest(rows) == rows[1]
    assert newest(reversed(rows)) == rows[1]
    assert newest([]) is None


async def test_newest_synonym_row_in_the_primary_wins(tmp_path: Path) -> None:
    synonyms = {"model-a": ("model-b", "model-c"), "model-b": ("model-a", "model-c")}
    make_cache_dir(
        tmp_path / "primary",
        row_for("model-b", "b", 300.0),
        row_for("model-c", "c", 100.0),
    )
    cache = PromptCache.open(str(tmp_path / "primary"), synonyms=synonyms)
    try:
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert (hit.source, hit.row.response_text) == ("synonym", "b")
    finally:
        await cache.aclose()


@pytest.mark.parametrize("newer", ["model-a", "model-b"])
async def test_newest_row_within_one_lookup_wins(tmp_path: Path, newer: str) -> None:
    older = "model-b" if newer == "model-a" else "model-a"
    lookup = make_cache_dir(
        tmp_path / "lookup", row_for(newer, "newer", 20.0), row_for(older, "older", 10.0)
    )
    cache = PromptCache.open(str(tmp_path / "primary"), [lookup], synonyms=SYNONYMS)
    try:
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert (hit.source, hit.row.response_text) == ("lookup", "newer")
    finally:
        await cache.aclose()


async def test_primary_comes_before_synonyms_and_lookups(tmp_path: Path) -> None:
    lookup = make_cache_dir(
        tmp_path / "lookup",
        row_for("model-a", "lookup a", 900.0),
        row_for("model-b", "lookup b", 900.0),
    )
    make_cache_dir(tmp_path / "primary", row_for("model-b", "primary b", 1.0))
    cache = PromptCache.open(str(tmp_path / "primary"), [lookup], synonyms=SYNONYMS)
    try:
        hit = await cache.find(KEY_B, "model-b", rekey)
        assert hit is not None
        assert (hit.source, hit.row.response_text) == ("primary", "primary b")
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert (hit.source, hit.row.response_text) == ("synonym", "primary b")
    finally:
        await cache.aclose()


async def test_lookup_only_without_primary(tmp_path: Path) -> None:
    lookup = make_cache_dir(tmp_path / "lookup", row_for("model-a", "a", 1.0))
    cache = PromptCache.open(None, [lookup])
    try:
        assert cache.primary is None
        assert cache.enabled
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert hit.source == "lookup"
        await cache.store(KEY_B, CANON_B, "model-b", "nowhere to go", None)
        assert await cache.find(KEY_B, "model-b", rekey) is None
    finally:
        await cache.aclose()


async def test_missing_and_broken_lookup_dirs_are_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    good = make_cache_dir(tmp_path / "good", row_for("model-a", "good", 1.0))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "minima_llm.db").write_text("not a database\n" * 100)
    missing = str(tmp_path / "does-not-exist")
    with caplog.at_level(logging.WARNING, logger="minima_llm.cache"):
        cache = PromptCache.open(str(tmp_path / "primary"), [missing, str(broken), good])
    try:
        assert [d for d, _ in cache.lookups] == [good]
        warned = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
        assert any(missing in m and "CACHE_LOOKUP_DIRS" in m for m in warned)
        assert all("will be asked of the upstream" in m for m in warned)
        assert any(str(broken) in m for m in warned)
        assert not (tmp_path / "does-not-exist").exists()
        hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert hit.row.response_text == "good"
    finally:
        await cache.aclose()


class _Unreadable(MemoryStore):
    """A lookup store whose every read fails, as a file gone bad under a run does."""

    async def get_many(self, keys: Sequence[str]) -> dict[str, CacheRow]:
        raise CacheError("cache read from /archive/minima_llm.db failed: disk I/O error")


async def test_one_unreadable_lookup_does_not_hide_the_others(
    caplog: pytest.LogCaptureFixture,
) -> None:
    good = MemoryStore()
    good.put_now(row_for("model-a", "from the good archive", 1.0))
    cache = PromptCache(None, [("/archive", _Unreadable()), ("/good", good)])
    with caplog.at_level(logging.WARNING, logger="minima_llm.cache"):
        hit = await cache.find(KEY_A, "model-a", rekey)
    assert hit is not None and hit.row.response_text == "from the good archive"
    assert any("/archive skipped" in r.getMessage() for r in caplog.records)


async def test_a_skipped_lookup_is_counted_in_the_backends_cache_errors(mock: MockServer) -> None:
    # Stepped over inside find(), it no longer reached the backend's own counter.
    cache = PromptCache(None, [("/archive", _Unreadable())])
    config = MinimaLlmConfig(base_url=mock.url, model="mock-model", rpm=0)
    async with OpenAIMinimaLlm(config, cache=cache) as backend:
        await backend.generate(MinimaLlmRequest(request_id="r", messages=MESSAGES))
        assert backend.snapshot().cache_errors == 1


def test_a_trace_file_that_cannot_be_opened_is_a_config_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="trace_file"):
        PromptCache.open(None, trace_file=str(tmp_path / "no-such-dir" / "trace.jsonl"))


async def test_a_copy_that_cannot_be_written_still_answers(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    lookup = make_cache_dir(tmp_path / "lookup", row_for("model-a", "a", 1.0))
    make_cache_dir(tmp_path / "primary")
    primary = SqliteStore.in_dir(tmp_path / "primary", readonly=True)
    cache = PromptCache(primary, [(lookup, SqliteStore.in_dir(lookup, readonly=True))])
    try:
        with caplog.at_level(logging.WARNING, logger="minima_llm.cache"):
            hit = await cache.find(KEY_A, "model-a", rekey)
        assert hit is not None
        assert hit.source == "lookup"
        assert any("could not copy" in r.getMessage() for r in caplog.records)
    finally:
        await cache.aclose()


async def test_trace_lines_are_json_with_key_canonical_and_source(tmp_path: Path) -> None:
    trace = tmp_path / "trace.jsonl"
    cache = PromptCache(None, trace_file=str(trace))
    try:
        cache.note(KEY_A, CANON_A, "miss")
        cache.note(KEY_B, CANON_B, "primary")
        cache.note(KEY_A, CANON_A, "lookup")
        # Readable before close: a crashed run still leaves its trace.
        lines = trace.read_text(encoding="utf-8").splitlines()
    finally:
        await cache.aclose()
    assert [json.loads(line) for line in lines] == [
        {"key": KEY_A, "canonical": CANON_A, "source": "miss"},
        {"key": KEY_B, "canonical": CANON_B, "source": "primary"},
        {"key": KEY_A, "canonical": CANON_A, "source": "lookup"},
    ]
    # Reopens: a backend reused after aclose keeps tracing.
    cache.note(KEY_A, CANON_A, "after close")
    await cache.aclose()
    second = PromptCache(None, trace_file=str(trace))
    second.note(KEY_B, CANON_B, "miss")
    await second.aclose()
    assert len(trace.read_text(encoding="utf-8").splitlines()) == 5


def test_no_trace_file_means_no_tracing(tmp_path: Path) -> None:
    cache = PromptCache(None)
    cache.note(KEY_A, CANON_A, "miss")
    assert cache.trace is None
    assert not cache.enabled
    assert list(tmp_path.iterdir()) == []


async def test_prefetch_serves_finds_without_io(cache: PromptCache, tmp_path: Path) -> None:
    keys = []
    for i in range(5):
        key, canonical = cache_key("model-a", [{"role": "user", "content": str(i)}])
        keys.append(key)
        await cache.store(key, canonical, "model-a", f"answer {i}", None)
    known = await cache.prefetch([*keys, "missing"])
    assert sum(row is not None for row in known.values()) == 5
    assert known[keys[2]] is not None
    assert "missing" in known and known["missing"] is None
    # Rows gone from the file are still served from the prefetch, which proves no read happened.
    with closing(sqlite3.connect(tmp_path / "primary" / "minima_llm.db")) as conn:
        conn.execute("DELETE FROM cache")
        conn.commit()
    hit = await cache.find(keys[3], "model-a", rekey, known)
    assert hit is not None
    assert (hit.source, hit.row.response_text) == ("primary", "answer 3")
    assert await cache.find(keys[3], "model-a", rekey) is None  # without it, the file is read
    assert await cache.prefetch([]) == {}


async def test_prefetched_miss_skips_the_primary_read(cache: PromptCache) -> None:
    key, canonical = cache_key("model-a", [{"role": "user", "content": "late"}])
    known = await cache.prefetch([key])
    await cache.store(key, canonical, "model-a", "written after the prefetch", None)
    assert await cache.find(key, "model-a", rekey, known) is None
    assert await cache.find(key, "model-a", rekey) is not None


async def test_prefetch_without_primary_is_a_no_op() -> None:
    cache = PromptCache(None)
    assert await cache.prefetch([KEY_A]) == {}


async def test_aclose_closes_every_store(tmp_path: Path) -> None:
    lookup = make_cache_dir(tmp_path / "lookup", row_for("model-a", "a", 1.0))
    cache = PromptCache.open(str(tmp_path / "primary"), [lookup])
    assert "lookups=1" in repr(cache)
    assert "trace=off" in repr(cache)
    await cache.aclose()
    assert cache.primary is not None
    assert "idle" in repr(cache.primary._reader)  # closed, not refusing: the next use reopens
    assert await asyncio.wait_for(cache.primary.get_many([KEY_A]), 5) == {}
    assert KEY_A in await asyncio.wait_for(cache.lookups[0][1].get_many([KEY_A]), 5)
    await cache.aclose()


async def test_find_now_decides_without_io_only_when_it_can(tmp_path: Path) -> None:
    cache = PromptCache.open(str(tmp_path / "p"), synonyms=SYNONYMS, memory_entries=8)
    try:
        row = row_for("model-a", "7", 1.0)
        assert cache.find_now(KEY_A, "model-a") is ...  # not prefetched: must read
        hit = cache.find_now(KEY_A, "model-a", Prefetched({KEY_A: row}))
        assert hit is not None and hit is not ... and hit.row == row
        # The prefetched row now sits in memory: no batch needed any more.
        again = cache.find_now(KEY_A, "model-a")
        assert again is not None and again is not ... and again.row == row
        # A prefetched miss under a model with synonyms still has to look further.
        assert cache.find_now(KEY_B, "model-b", Prefetched({KEY_B: None})) is ...
    finally:
        await cache.aclose()
    plain = PromptCache.open(str(tmp_path / "q"))
    try:
        absent = Prefetched({KEY_A: None})
        absent.foreign_at = plain.primary.foreign_writes if plain.primary else 0
        assert plain.find_now(KEY_A, "model-a", absent) is None
        # Once another process has committed, an absence read before is read again.
        absent.foreign_at -= 1
        assert plain.find_now(KEY_A, "model-a", absent) is ...
    finally:
        await plain.aclose()
    assert PromptCache(None).find_now(KEY_A, "model-a") is None


async def test_two_batches_with_equal_maps_are_tracked_as_two(tmp_path: Path) -> None:
    # Two batches of the same requests prefetch equal maps; ending one must not stop
    # the other from seeing this process's writes.
    cache = PromptCache.open(str(tmp_path / "p"))
    try:
        first = await cache.prefetch([KEY_A])
        second = await cache.prefetch([KEY_A])
        assert dict(first) == dict(second) and first != second
        cache.track(first)
        cache.track(second)
        cache.untrack(second)
        row = await cache.store(KEY_A, CANON_A, "model-a", "stored", None)
        assert first[KEY_A] == row and second[KEY_A] is None
        cache.untrack(first)
    finally:
        await cache.aclose()


async def test_a_store_that_cannot_count_foreign_writes_has_its_absences_read_again() -> None:
    class Plain:
        """A third party's store: get and put, nothing more."""

        def __init__(self) -> None:
            self.rows: dict[str, CacheRow] = {}

        async def get_many(self, keys: Sequence[str]) -> dict[str, CacheRow]:
            return {k: self.rows[k] for k in keys if k in self.rows}

        async def put_many(self, rows: Iterable[CacheRow]) -> None:
            self.rows.update((r.key, r) for r in rows)

        async def aclose(self) -> None:
            pass

    cache = PromptCache(Plain())
    known = await cache.prefetch([KEY_A])
    assert known.foreign_at is None and cache.find_now(KEY_A, "model-a", known) is ...


async def test_a_failed_prefetch_leaves_every_key_to_be_read_one_by_one() -> None:
    class FailsOnce(MemoryStore):
        """A store whose first read fails, as a file busy for a moment does."""

        failed = False

        async def get_many(self, keys: Sequence[str]) -> dict[str, CacheRow]:
            if not self.failed:
                self.failed = True
                raise CacheError("cache read failed: disk I/O error")
            return await super().get_many(keys)

    store = FailsOnce()
    store.put_now(row_for("model-a", "cached", 1.0))
    cache = PromptCache(store)
    known = Prefetched()
    with pytest.raises(CacheError):
        await cache.prefetch([KEY_A], into=known)
    assert cache.find_now(KEY_A, "model-a", known) is ...
    hit = await cache.find(KEY_A, "model-a", rekey, known)
    assert hit is not None and hit.row.response_text == "cached"
