"""Child processes for test_cache_processes.py (run as a script, never imported by pytest).

_cache_child.py writer DIR              write rows forever, print each committed count
_cache_child.py burst DIR ID N GOFILE   write N rows (and read) once GOFILE exists
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import sys
import time
from pathlib import Path

from minima_llm.cache import CacheRow, SqliteStore


def make_row(tag: str, i: int) -> CacheRow:
    """A row keyed by the contract whose content the parent can recompute from ``tag`` and ``i``."""
    obj = {"model": "m", "messages": [{"role": "user", "content": f"{tag} {i}"}]}
    canonical = json.dumps(obj, sort_keys=True, ensure_ascii=True, separators=(",", ":"))
    key = hashlib.sha256(canonical.encode("utf-8")).hexdigest()
    text = f"answer {tag} {i} " + "é" * (i % 50)
    return CacheRow(key, text, json.dumps({"text": text}), time.time(), "m", canonical)


async def write_forever(store: SqliteStore) -> None:
    i = 0
    while True:
        await store.put_many([make_row("kill", i)])
        i += 1
        print(i, flush=True)


async def burst(store: SqliteStore, ident: int, n: int) -> None:
    rows = [make_row(f"p{ident}", i) for i in range(n)]
    others = [make_row(f"p{(ident + 1) % 4}", i).key for i in range(n)]

    async def write(part: list[CacheRow]) -> None:
        for r in part:
            await store.put_many([r])
            got = await store.get_many([r.key])
            if got.get(r.key) != r:
                raise AssertionError(f"row {r.key} not readable after its put")

    async def read() -> None:
        for start in range(0, n, 25):
            await store.get_many(others[start : start + 50])
            await asyncio.sleep(0)

    tasks = [write(rows[j::10]) for j in range(10)]
    await asyncio.gather(*tasks, read())


def main() -> None:
    mode, directory = sys.argv[1], sys.argv[2]
    store = SqliteStore.in_dir(directory)
    try:
        if mode == "writer":
            asyncio.run(write_forever(store))
        else:
            ident, n, go = int(sys.argv[3]), int(sys.argv[4]), Path(sys.argv[5])
            print("ready", flush=True)
            deadline = time.monotonic() + 30
            while not go.exists():
                if time.monotonic() > deadline:
                    raise TimeoutError("never told to go")
                time.sleep(0.005)
            asyncio.run(burst(store, ident, n))
            print("done", store.commits, flush=True)
    finally:
        store.close()


if __name__ == "__main__":
    main()
