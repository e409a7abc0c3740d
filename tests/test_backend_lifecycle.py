"""A backend after aclose, and a backend nobody closes.

The references end each ``main()`` with ``await backend.aclose()`` and reuse one
backend across several ``asyncio.run()`` calls; minima-llm 0.2.x documents that
the cache reopens automatically. Reference 002's generic batch runner builds a
backend per item and never closes it: each must be freed with its threads and files.
"""

from __future__ import annotations

import asyncio
import gc
import os
import sqlite3
import threading
import time
from contextlib import closing
from pathlib import Path

import pytest

from backend_support import req
from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmResponse,
    MinimaLlmResult,
    OpenAIMinimaLlm,
    run_batched_callable,
)
from minima_llm.cache import DB_NAME
from minima_llm.testing import MockConfig, MockServer, run_mock_server_in_thread

# Items per transport; the stdlib transport loads the CA store for each backend (~40 ms).
ITEMS = {"aiohttp": 300, "stdlib": 100, "asyncio": 300}


def rows(cache_dir: Path) -> int:
    with closing(sqlite3.connect(cache_dir / DB_NAME)) as conn:
        n: int = conn.execute("SELECT count(*) FROM cache").fetchone()[0]
        return n


def backend_threads(
    prefix: str = "minima-", besides: frozenset[threading.Thread] = frozenset()
) -> list[str]:
    """Names of the backend's threads, leaving out ``besides`` (other tests' leftovers)."""
    return [t.name for t in threading.enumerate() if t.name.startswith(prefix) and t not in besides]


def fds() -> int:
    return len(os.listdir("/proc/self/fd"))


def test_backend_reused_after_aclose_keeps_its_cache(transport: str, tmp_path: Path) -> None:
    with run_mock_server_in_thread(MockConfig()) as server:
        cfg = MinimaLlmConfig(
            base_url=server.url, model="m", cache_dir=str(tmp_path), rpm=0, transport=transport
        )
        backend = OpenAIMinimaLlm(cfg)

        async def run(*ids: int) -> list[MinimaLlmResult]:
            try:
                return [await backend.generate(req(i)) for i in ids]
            finally:
                await backend.aclose()

        first = asyncio.run(run(1))
        second = asyncio.run(run(2))
        replay = asyncio.run(run(1, 2))
        requests = server.stats()["requests"]
    for result in (*first, *second, *replay):
        assert isinstance(result, MinimaLlmResponse), result
    assert [r.cached for r in (*first, *second)] == [False, False]  # type: ignore[union-attr]
    assert [(r.cached, r.cache_source) for r in replay] == [(True, "primary")] * 2  # type: ignore[union-attr]
    assert requests == 2
    assert backend.stats.cache_errors == 0
    assert rows(tmp_path) == 2


async def test_backend_works_after_aclose_in_the_same_loop(
    transport: str, mock: MockServer, tmp_path: Path
) -> None:
    before = frozenset(threading.enumerate())
    cfg = MinimaLlmConfig(
        base_url=mock.url, model="m", cache_dir=str(tmp_path), rpm=0, transport=transport
    )
    async with OpenAIMinimaLlm(cfg) as backend:
        await backend.generate(req(1))
        await backend.aclose()
        again = await backend.generate(req(2))
    assert isinstance(again, MinimaLlmResponse) and not again.cached
    assert backend.stats.cache_errors == 0
    assert rows(tmp_path) == 2
    assert backend_threads("minima-cache-", before) == []


async def test_aclose_while_requests_run_gives_each_an_answer_or_a_failure(
    transport: str, mock: MockServer, tmp_path: Path
) -> None:
    # The close cuts the requests on the wire; with a short, jittered backoff some are
    # retried while the close is still under way.
    mock.update_config(latency_s=0.3, latency_jitter_s=0.2)
    cfg = MinimaLlmConfig(
        base_url=mock.url,
        model="m",
        cache_dir=str(tmp_path),
        rpm=0,
        transport=transport,
        max_outstanding=32,
        base_backoff_s=0.05,
        max_backoff_s=0.2,
    )
    async with OpenAIMinimaLlm(cfg) as backend:
        calls = [asyncio.ensure_future(backend.generate(req(i))) for i in range(40)]
        await asyncio.sleep(0.15)
        await backend.aclose()
        results = await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), 30)
    # Never an exception out of generate: a closed session is no reason to raise.
    assert [r for r in results if isinstance(r, BaseException)] == []


async def settle(baseline_threads: int, baseline_fds: int, timeout: float = 20.0) -> bool:
    """Let dropped backends' threads end and sessions close (some need the loop to run)."""
    deadline = time.monotonic() + timeout
    while threading.active_count() > baseline_threads or fds() > baseline_fds:
        if time.monotonic() > deadline:
            return False
        gc.collect()
        await asyncio.sleep(0.02)
    return True


@pytest.mark.parametrize(
    "kind", ["aiohttp", "asyncio", pytest.param("stdlib", marks=pytest.mark.slow)]
)
async def test_a_backend_per_item_never_closed_is_freed(
    kind: str, mock: MockServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in {
        "OPENAI_BASE_URL": mock.url,
        "OPENAI_MODEL": "m",
        "CACHE_DIR": str(tmp_path),
        "RPM": "0",
        "MINIMA_TRANSPORT": kind,
    }.items():
        monkeypatch.setenv(name, value)

    async def my_async_function(item: int) -> str:
        # As in reference 002: a backend per item, never closed.
        backend = OpenAIMinimaLlm.from_env()
        response = await backend.generate(req(item))
        assert isinstance(response, MinimaLlmResponse), response
        return response.text

    gc.collect()
    threads, files = threading.active_count(), fds()
    items = ITEMS[kind]
    results = await run_batched_callable(
        list(range(items)),
        my_async_function,
        BatchConfig(num_workers=8, heartbeat_s=0, stall_s=0),
        progress=False,
    )
    assert results == [f"mock reply: question {i}" for i in range(items)]
    # Unfixed, each item kept two cache threads and their connections for good.
    settled = await settle(threads, files + 2)
    assert settled, (threading.active_count(), threads, fds(), files, backend_threads()[:5])
    assert not [f for f in os.listdir("/proc/self/fd") if _points_under(f, tmp_path)]
    assert rows(tmp_path) == items


def _points_under(fd: str, directory: Path) -> bool:
    try:
        return os.readlink(f"/proc/self/fd/{fd}").startswith(str(directory))
    except OSError:  # closed meanwhile
        return False


def test_max_outstanding_bounds_event_loops_running_at_once_in_threads() -> None:
    with run_mock_server_in_thread(MockConfig(latency_s=0.1)) as server:
        config = MinimaLlmConfig(base_url=server.url, model="m", rpm=0, max_outstanding=3)
        backend = OpenAIMinimaLlm(config)
        answered: list[int] = []

        def thread(k: int) -> None:
            async def main() -> None:
                results = await asyncio.gather(
                    *(backend.generate(req(f"{k}-{i}")) for i in range(6))
                )
                answered.append(sum(isinstance(r, MinimaLlmResponse) for r in results))

            asyncio.run(main())

        threads = [threading.Thread(target=thread, args=(k,), daemon=True) for k in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=60)
        assert answered == [6, 6, 6, 6]
        assert server.stats()["peak_concurrency"] <= 3  # 12 with a bound per loop
