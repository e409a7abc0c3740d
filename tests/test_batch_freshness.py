"""A batch reads the cache once up front, yet sees answers that others store while it runs."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from backend_support import BackendFactory, req
from minima_llm import MinimaLlmRequest, MinimaLlmResponse, OpenAIMinimaLlm
from minima_llm.cache import DB_NAME, CacheRow, SqliteStore
from minima_llm.testing import MockServer


async def store_elsewhere(
    cache_dir: Path, backend: OpenAIMinimaLlm, requests: list[MinimaLlmRequest]
) -> None:
    """Answers for ``requests`` written through a connection of another store (process)."""
    other = SqliteStore(cache_dir / DB_NAME)
    try:
        rows = [
            CacheRow(backend.key_for(r)[0], f"from elsewhere {i}", None, time.time(), "mock-model")
            for i, r in enumerate(requests, start=1)
        ]
        await other.put_many(rows)
    finally:
        await other.aclose()


def cached(results: list[object]) -> int:
    return sum(isinstance(r, MinimaLlmResponse) and r.cached for r in results)


async def test_two_batches_of_one_backend_pay_for_each_answer_once(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(latency_s=0.01)
    backend = make_backend(max_outstanding=8)
    requests = [req(i) for i in range(60)]
    first, second = await asyncio.gather(
        backend.run_batched(requests, progress=False),
        backend.run_batched(requests[::-1], progress=False),
    )
    assert all(isinstance(r, MinimaLlmResponse) for r in first + second)
    assert mock.stats()["requests"] == 60


async def test_answers_another_process_stores_during_a_batch_are_hits(
    make_backend: BackendFactory, mock: MockServer, tmp_path: Path
) -> None:
    # Another process is another connection to the file: a second store stands in for it.
    mock.update_config(latency_s=0.3)
    backend = make_backend(batch={"num_workers": 1, "heartbeat_s": 0, "stall_s": 0})
    requests = [req(i) for i in range(6)]
    batch = asyncio.ensure_future(backend.run_batched(requests, progress=False))
    for _ in range(500):  # its up-front read is done once the first call is out
        if mock.stats()["requests"]:
            break
        await asyncio.sleep(0.01)
    await store_elsewhere(tmp_path / "cache", backend, requests[1:])
    results = await batch
    assert mock.stats()["requests"] == 1
    assert cached(results) == 5
    assert [r.text for r in results[1:] if isinstance(r, MinimaLlmResponse)] == [
        f"from elsewhere {i}" for i in range(1, 6)
    ]


async def test_a_backend_reused_after_close_sees_what_others_stored_while_it_was_closed(
    make_backend: BackendFactory, mock: MockServer, tmp_path: Path
) -> None:
    # The writer reconnects at its first commit, after the batch's read: what another
    # process stored in between must not become part of what it takes as its own state.
    backend = make_backend(batch={"num_workers": 1, "heartbeat_s": 0, "stall_s": 0})
    await backend.generate(req("warm"))
    await backend.aclose()
    mock.update_config(latency_s=0.3)
    requests = [req(i) for i in range(4)]
    batch = asyncio.ensure_future(backend.run_batched(requests, progress=False))
    for _ in range(500):
        if mock.stats()["requests"] > 1:
            break
        await asyncio.sleep(0.01)
    await store_elsewhere(tmp_path / "cache", backend, requests[1:])
    results = await batch
    assert mock.stats()["requests"] == 2  # the warm-up and the batch's first
    assert cached(results) == 3
