"""Files written by minima-llm 0.2.x open in SqliteStore, and 0.2.x can read what we write.

Every file here is made with plain sqlite3 and every key with json + hashlib, so the
tests check the on-disk contract rather than this package agreeing with itself.
"""

from __future__ import annotations

import hashlib
import json
import sqlite3
from contextlib import closing
from pathlib import Path

import pytest

from minima_llm.cache import CacheRow, PromptCache, SqliteStore, cache_key
from minima_llm.errors import CacheError

OLD_SCHEMA = (
    "CREATE TABLE cache (key TEXT PRIMARY KEY, response_text TEXT NOT NULL, "
    "response_raw TEXT, created_at REAL NOT NULL)"
)
NEW_SCHEMA = (
    "CREATE TABLE cache (key TEXT PRIMARY KEY, response_text TEXT NOT NULL, "
    "response_raw TEXT, created_at REAL NOT NULL, model TEXT, canonical TEXT)"
)
# What minima-llm 0.2.x runs to answer a request from its cache.
OLD_READ = "SELECT response_text, response_raw FROM cache WHERE key=?"


def contract(model: str, content: str, temperature: float | None = 0.0) -> tuple[str, str]:
    obj: dict[str, object] = {"model": model, "messages": [{"role": "user", "content": content}]}
    if temperature is not None:
        obj["temperature"] = temperature
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode("utf-8")).hexdigest(), canonical


def raw_body(text: str) -> str:
    return json.dumps(
        {"choices": [{"index": 0, "message": {"role": "assistant", "content": text}}]}
    )


def columns(path: Path) -> list[str]:
    with closing(sqlite3.connect(path)) as conn:
        return [r[1] for r in conn.execute("PRAGMA table_info(cache)")]


def make_old_file(directory: Path, prompts: list[str], model: str = "old-model") -> Path:
    """A cache as minima-llm before 0.2.7 left it: four columns, default rollback journal."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "minima_llm.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute(OLD_SCHEMA)
        for i, prompt in enumerate(prompts):
            key, _ = contract(model, prompt)
            conn.execute(
                "INSERT INTO cache VALUES (?, ?, ?, ?)",
                (key, f"answer to {prompt}", raw_body(f"answer to {prompt}"), 1_700_000_000.0 + i),
            )
        conn.commit()
    return path


PROMPTS = ["What is 2+2?", "Grüße aus Köln", "日本語で答えて", "x" * 5000]


async def test_old_file_rows_are_hits_and_the_file_is_migrated(tmp_path: Path) -> None:
    path = make_old_file(tmp_path, PROMPTS)
    store = SqliteStore.in_dir(tmp_path)
    try:
        keys = [contract("old-model", p)[0] for p in PROMPTS]
        # The key this package computes for the same request is the one 0.2.x stored.
        assert keys == [
            cache_key("old-model", [{"role": "user", "content": p}], 0.0)[0] for p in PROMPTS
        ]
        got = await store.get_many(keys)
        assert set(got) == set(keys)
        for i, (key, prompt) in enumerate(zip(keys, PROMPTS, strict=True)):
            assert got[key] == CacheRow(
                key, f"answer to {prompt}", raw_body(f"answer to {prompt}"), 1_700_000_000.0 + i
            )
        assert columns(path) == [
            "key",
            "response_text",
            "response_raw",
            "created_at",
            "model",
            "canonical",
        ]
        with closing(sqlite3.connect(path)) as conn:
            assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"

        new_key, canonical = contract("new-model", "fresh")
        new = CacheRow(
            new_key, "fresh answer", raw_body("fresh answer"), 1.8e9, "new-model", canonical
        )
        await store.put_many([new])
        assert (await store.get_many([new_key]))[new_key] == new
    finally:
        store.close()
    with closing(sqlite3.connect(path)) as conn:
        assert conn.execute("SELECT count(*) FROM cache").fetchone()[0] == len(PROMPTS) + 1
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"


async def test_opening_a_migrated_file_again_changes_nothing(tmp_path: Path) -> None:
    path = make_old_file(tmp_path, PROMPTS)
    SqliteStore.in_dir(tmp_path).close()
    before = columns(path)
    store = SqliteStore.in_dir(tmp_path)
    try:
        assert columns(path) == before
        assert len(await store.get_many([contract("old-model", p)[0] for p in PROMPTS])) == 4
    finally:
        store.close()


async def test_old_file_opened_read_only_is_readable_and_left_unchanged(tmp_path: Path) -> None:
    # Lookup dirs often point at caches from older runs, opened read-only, so never migrated.
    path = make_old_file(tmp_path, PROMPTS)
    before = path.read_bytes()
    store = SqliteStore.in_dir(tmp_path, readonly=True)
    try:
        key = contract("old-model", PROMPTS[1])[0]
        got = await store.get_many([key, "missing"])
        assert list(got) == [key]
        assert got[key].response_text == f"answer to {PROMPTS[1]}"
        assert (got[key].model, got[key].canonical) == (None, None)
    finally:
        store.close()
    assert columns(path) == ["key", "response_text", "response_raw", "created_at"]
    assert path.read_bytes() == before


async def test_old_file_as_a_lookup_dir_gives_hits(tmp_path: Path) -> None:
    make_old_file(tmp_path / "old", PROMPTS)
    cache = PromptCache.open(str(tmp_path / "new"), [str(tmp_path / "old")])
    try:
        assert len(cache.lookups) == 1
        messages = [{"role": "user", "content": PROMPTS[0]}]
        key, _ = cache_key("old-model", messages, 0.0)
        hit = await cache.find(key, "old-model", lambda m: cache_key(m, messages, 0.0))
        assert hit is not None
        assert (hit.source, hit.row.response_text) == ("lookup", f"answer to {PROMPTS[0]}")
    finally:
        await cache.aclose()


async def test_new_format_file_written_by_hand_is_read(tmp_path: Path) -> None:
    path = tmp_path / "minima_llm.db"
    key, canonical = contract("m", "hello", None)
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(NEW_SCHEMA)
        conn.execute(
            "INSERT INTO cache VALUES (?, ?, ?, ?, ?, ?)",
            (key, "hi there", raw_body("hi there"), 1.7e9, "m", canonical),
        )
        conn.commit()
    for readonly in (True, False):
        store = SqliteStore.in_dir(tmp_path, readonly=readonly)
        try:
            assert await store.get_many([key]) == {
                key: CacheRow(key, "hi there", raw_body("hi there"), 1.7e9, "m", canonical)
            }
        finally:
            store.close()
    assert len(columns(path)) == 6


@pytest.mark.parametrize("old_file", [False, True])
async def test_a_0_2_reader_gets_our_rows(tmp_path: Path, old_file: bool) -> None:
    if old_file:
        make_old_file(tmp_path, PROMPTS)
    store = SqliteStore.in_dir(tmp_path)
    ours = []
    for i in range(20):
        key, canonical = contract("m", f"prompt {i} é")
        ours.append(
            CacheRow(key, f"answer {i}", raw_body(f"answer {i}"), 1.8e9 + i, "m", canonical)
        )
    try:
        await store.put_many(ours)
        # While our store is still open, as a concurrent 0.2.x process would see it.
        with closing(sqlite3.connect(tmp_path / "minima_llm.db")) as reader:
            for r in ours:
                assert reader.execute(OLD_READ, (r.key,)).fetchone() == (
                    r.response_text,
                    r.response_raw,
                )
    finally:
        store.close()
    with closing(sqlite3.connect(tmp_path / "minima_llm.db")) as reader:
        for r in ours:
            text, raw = reader.execute(OLD_READ, (r.key,)).fetchone()
            assert text == r.response_text
            assert json.loads(raw)["choices"][0]["message"]["content"] == text
            model, canonical = reader.execute(
                "SELECT model, canonical FROM cache WHERE key=?", (r.key,)
            ).fetchone()
            assert hashlib.sha256(canonical.encode("utf-8")).hexdigest() == r.key
            assert model == "m"


async def test_rows_a_0_2_writer_adds_to_our_file_are_hits(tmp_path: Path) -> None:
    store = SqliteStore.in_dir(tmp_path)
    try:
        key, _ = contract("m", "written by the old version")
        with closing(sqlite3.connect(tmp_path / "minima_llm.db")) as old_writer:
            old_writer.execute(
                "INSERT OR REPLACE INTO cache (key, response_text, response_raw, created_at) "
                "VALUES (?, ?, ?, ?)",
                (key, "old answer", raw_body("old answer"), 1.7e9),
            )
            old_writer.commit()
        got = await store.get_many([key])
        assert got[key] == CacheRow(key, "old answer", raw_body("old answer"), 1.7e9)
    finally:
        store.close()


FOREIGN_SCHEMAS = [
    "CREATE TABLE cache (id INTEGER PRIMARY KEY, blob BLOB)",
    "CREATE TABLE cache (key TEXT PRIMARY KEY, value TEXT)",
]


def make_foreign_file(directory: Path, schema: str) -> Path:
    """Some other program's ``cache`` table, holding a row under a key we would look up."""
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "minima_llm.db"
    with closing(sqlite3.connect(path)) as conn:
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute(schema)
        first = 7 if "INTEGER" in schema else contract("m", PROMPTS[0])[0]
        conn.execute("INSERT INTO cache VALUES (?, ?)", (first, "theirs"))
        conn.commit()
    return path


@pytest.mark.parametrize("readonly", [False, True])
@pytest.mark.parametrize("schema", FOREIGN_SCHEMAS)
def test_a_foreign_cache_table_is_refused_and_left_unaltered(
    tmp_path: Path, schema: str, readonly: bool
) -> None:
    path = make_foreign_file(tmp_path, schema)
    found = ", ".join(columns(path))
    with pytest.raises(CacheError, match=rf"{path}.*not a minima-llm cache.*\({found}\)"):
        SqliteStore.in_dir(tmp_path, readonly=readonly)
    with closing(sqlite3.connect(path)) as conn:
        (sql,) = conn.execute("SELECT sql FROM sqlite_master WHERE name = 'cache'").fetchone()
    assert sql == schema


async def test_a_lookup_dir_with_a_foreign_cache_table_is_skipped_saying_why(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    make_foreign_file(tmp_path / "theirs", FOREIGN_SCHEMAS[1])
    cache = PromptCache.open(str(tmp_path / "ours"), [str(tmp_path / "theirs")])
    try:
        assert cache.lookups == []
    finally:
        await cache.aclose()
    assert "skipped" in caplog.text
    assert "not a minima-llm cache: table cache has columns (key, value)" in caplog.text
