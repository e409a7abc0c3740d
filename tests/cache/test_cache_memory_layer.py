"""The in-memory LRU in front of the SQLite primary: repeat hits without a trip to the thread."""

from __future__ import annotations

import sqlite3
from contextlib import closing
from pathlib import Path

from minima_llm import MinimaLlmConfig
from minima_llm.cache import PromptCache, cache_key


def _rekey(model: str) -> tuple[str, str]:
    return cache_key(model, [{"role": "user", "content": "q"}])


def _wipe(directory: Path) -> None:
    with closing(sqlite3.connect(directory / "minima_llm.db")) as conn:
        conn.execute("DELETE FROM cache")
        conn.commit()


async def test_stored_rows_are_served_from_memory(tmp_path: Path) -> None:
    cache = PromptCache.open(str(tmp_path), memory_entries=10)
    try:
        key, canonical = _rekey("m")
        await cache.store(key, canonical, "m", "answer", '{"choices": []}')
        _wipe(tmp_path)  # only memory can still answer
        hit = await cache.find(key, "m", _rekey)
        assert hit is not None and hit.row.response_text == "answer" and hit.source == "primary"
    finally:
        await cache.aclose()


async def test_rows_read_from_sqlite_are_kept_in_memory(tmp_path: Path) -> None:
    writer = PromptCache.open(str(tmp_path))
    key, canonical = _rekey("m")
    await writer.store(key, canonical, "m", "from disk", None)
    await writer.aclose()
    cache = PromptCache.open(str(tmp_path), memory_entries=10)
    try:
        assert await cache.find(key, "m", _rekey) is not None  # read from SQLite
        _wipe(tmp_path)
        again = await cache.find(key, "m", _rekey)
        assert again is not None and again.row.response_text == "from disk"
    finally:
        await cache.aclose()


async def test_memory_is_bounded_and_off_by_default(tmp_path: Path) -> None:
    cache = PromptCache.open(str(tmp_path), memory_entries=2)
    try:
        for i in range(5):
            key, canonical = cache_key("m", [{"role": "user", "content": str(i)}])
            await cache.store(key, canonical, "m", str(i), None)
        assert cache.memory is not None and len(cache.memory) == 2
    finally:
        await cache.aclose()
    plain = PromptCache.open(str(tmp_path / "other"))
    try:
        assert plain.memory is None
    finally:
        await plain.aclose()


def test_memory_cache_entries_config_and_env() -> None:
    env = {"OPENAI_BASE_URL": "http://x", "OPENAI_MODEL": "m", "MEMORY_CACHE_ENTRIES": "500"}
    assert MinimaLlmConfig.from_env(env).memory_cache_entries == 500
    assert MinimaLlmConfig(base_url="http://x", model="m").memory_cache_entries == 0


def test_negative_memory_cache_entries_is_a_config_error() -> None:
    import pytest

    from minima_llm import ConfigError

    with pytest.raises(ConfigError, match="memory_cache_entries"):
        MinimaLlmConfig(base_url="http://x", model="m", memory_cache_entries=-1)
