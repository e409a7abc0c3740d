"""Prompt cache: keys, the store interface, SQLite and memory stores, lookups and tracing."""

from .keys import cache_key, canonical_json, json_default, key_of
from .memory import MemoryStore
from .prompt import CacheHit, Prefetched, PromptCache, TraceWriter
from .sqlite import DB_NAME, SqliteStore, storable_text
from .store import CacheRow, CacheStore, newest

__all__ = [
    "DB_NAME",
    "CacheHit",
    "CacheRow",
    "CacheStore",
    "MemoryStore",
    "Prefetched",
    "PromptCache",
    "SqliteStore",
    "TraceWriter",
    "cache_key",
    "canonical_json",
    "json_default",
    "key_of",
    "newest",
    "storable_text",
]
