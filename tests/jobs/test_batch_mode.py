"""Batch mode: cache misses go to the mock's Files and Batches API as one job, over real HTTP."""

from __future__ import annotations

import asyncio
import io
import json
import socket
import time
from pathlib import Path

import pytest
from jobs_support import BAD, LIVE, Factory, answers, config, parasail, questions, route

from backend_support import req
from minima_llm import (
    ConfigError,
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResponse,
    OpenAIMinimaLlm,
    cancel_all_local_batches,
)
from minima_llm.jobs.state import list_states
from minima_llm.testing import MockServer

# Twenty requests, eight distinct questions, repeats scattered through.
MIXED = (0, 1, 2, 0, 3, 4, 1, 5, 6, 7, 2, 0, 3, 7, 7, 4, 5, 1, 6, 0)


async def test_misses_go_in_one_job_and_answer_like_live_calls(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    requests = questions(*MIXED)

    results = answers(await make().run_batched(requests, progress=False))

    assert [r.request_id for r in results] == [r.request_id for r in requests]
    assert route(mock, LIVE) == 0
    assert (route(mock, "/v1/files"), route(mock, "/v1/batches")) == (1, 1)
    assert mock.stats()["batch_lines"] == len(set(MIXED))
    live = answers(
        await make(live=True, cache_dir=tmp_path / "live").run_batched(requests, progress=False)
    )
    assert [r.text for r in results] == [r.text for r in live]
    assert [r.usage for r in results] == [r.usage for r in live]
    assert all(not r.cached for r in results)
    first = {n: MIXED.index(n) for n in MIXED}
    expected = [None if first[n] == at else "inflight" for at, n in enumerate(MIXED)]
    assert [r.cache_source for r in results] == expected


async def test_answers_are_cached_before_run_batched_returns(
    make: Factory, mock: MockServer
) -> None:
    requests = questions(*MIXED)
    sent = answers(await make().run_batched(requests, progress=False))
    before = mock.stats()["requests"]

    replayed = answers(await make(live=True).run_batched(requests, progress=False))

    assert mock.stats()["requests"] == before
    assert all(r.cached for r in replayed)
    assert [r.text for r in replayed] == [r.text for r in sent]


async def test_stats_count_distinct_questions_as_live_and_repeats_as_coalesced(
    make: Factory,
) -> None:
    backend = make()

    await backend.run_batched(questions(*MIXED), progress=False)

    snap = backend.snapshot()
    distinct = len(set(MIXED))
    assert (snap.requests, snap.live_calls, snap.coalesced) == (
        len(MIXED),
        distinct,
        len(MIXED) - distinct,
    )
    assert (snap.hits, snap.failures) == (0, 0)
    assert snap.tokens_in > 0


async def test_progress_names_the_batch_job(make: Factory, tmp_path: Path) -> None:
    progress = io.StringIO()

    await make().run_batched(questions(0, 1), progress=progress)

    (state,) = list_states(tmp_path / "cache")
    assert f"[batch-job] {state.batch_id}: submitted 2 requests" in progress.getvalue()


async def test_only_cache_misses_are_sent(make: Factory, mock: MockServer) -> None:
    await make(live=True).run_batched(questions(0, 1, 2), progress=False)
    live_before = route(mock, LIVE)

    results = answers(await make().run_batched(questions(*range(8)), progress=False))

    assert [r.cached for r in results] == [True] * 3 + [False] * 5
    assert [r.text for r in results] == [f"mock reply: question {n}" for n in range(8)]
    assert mock.stats()["batch_lines"] == 5
    assert route(mock, LIVE) == live_before


async def test_a_fully_cached_batch_sends_no_job(make: Factory, mock: MockServer) -> None:
    await make(live=True).run_batched(questions(0, 1), progress=False)
    before = mock.stats()["requests"]

    results = answers(await make().run_batched(questions(0, 1, 0), progress=False))

    assert all(r.cached for r in results)
    assert mock.stats()["requests"] == before


async def test_one_job_per_model(make: Factory, mock: MockServer, tmp_path: Path) -> None:
    requests = [
        MinimaLlmRequest(
            f"r{i}", [{"role": "user", "content": f"q{i % 2}"}], model=f"model-{i % 2}"
        )
        for i in range(4)
    ]

    results = answers(await make().run_batched(requests, progress=False))

    assert route(mock, "/v1/batches") == 2
    assert mock.stats()["batch_lines"] == 2
    assert [r.model for r in results] == ["model-0", "model-1"] * 2
    assert {s.model for s in list_states(tmp_path / "cache")} == {"model-0", "model-1"}


async def test_a_failed_line_is_a_failure_and_not_cached(make: Factory, mock: MockServer) -> None:
    requests = [req(0), req(1, text=f"please fail {BAD}"), req(2)]

    results = await make().run_batched(requests, progress=False)

    failure = results[1]
    assert isinstance(failure, MinimaLlmFailure)
    assert (failure.request_id, failure.error_type, failure.status) == (
        "r1",
        "BatchRequestError",
        500,
    )
    assert "injected batch line failure" in failure.message
    assert [r.text for r in answers([results[0], results[2]])] == [
        "mock reply: question 0",
        "mock reply: question 2",
    ]
    cached = await make(live=True).lookup_many(requests)
    assert [c is not None for c in cached] == [True, False, True]


async def test_rerun_sends_only_the_failed_request(make: Factory, mock: MockServer) -> None:
    requests = [req(0), req(1, text=f"please fail {BAD}"), req(2)]
    await make().run_batched(requests, progress=False)

    results = await make().run_batched(requests, progress=False)

    assert (route(mock, "/v1/files"), route(mock, "/v1/batches")) == (2, 2)
    assert mock.stats()["batch_lines"] == 3 + 1
    assert [type(r) for r in results] == [MinimaLlmResponse, MinimaLlmFailure, MinimaLlmResponse]
    assert results[0].cached and results[2].cached  # type: ignore[union-attr]


async def test_every_rerun_sends_a_failed_request_again(make: Factory, mock: MockServer) -> None:
    requests = [req(1, text=f"please fail {BAD}")]
    await make().run_batched(requests, progress=False)

    await make().run_batched(requests, progress=False)

    assert route(mock, "/v1/files") == 2
    assert mock.stats()["batch_lines"] == 2


async def test_a_job_still_running_after_max_poll_hours_is_resumed_by_the_next_run(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(batch_delay_s=60)
    requests = questions(0, 1, 2, 1)
    slow = parasail(max_poll_hours=0.0001)  # 0.36 s

    first = await make(parasail=slow).run_batched(requests, progress=False)

    assert all(isinstance(r, MinimaLlmFailure) for r in first)
    assert {r.error_type for r in first} == {"BatchApiError"}  # type: ignore[union-attr]
    assert all("resume" in r.message for r in first)  # type: ignore[union-attr]
    (left,) = list_states(tmp_path / "cache")
    assert (left.status, left.request_count, left.collected_at) == ("in_progress", 3, None)
    assert left.batch_id is not None and left.batch_id in first[0].message  # type: ignore[union-attr]

    mock.update_config(batch_delay_s=0)
    second = answers(await make(parasail=slow).run_batched(requests, progress=False))

    assert [r.text for r in second] == [f"mock reply: question {n}" for n in (0, 1, 2, 1)]
    assert (route(mock, "/v1/files"), route(mock, "/v1/batches")) == (1, 1)
    assert mock.stats()["batch_lines"] == 3
    (done,) = list_states(tmp_path / "cache")
    assert (done.batch_id, done.status) == (left.batch_id, "completed")
    assert done.collected_at is not None


async def test_requests_of_a_cancelled_job_are_sent_again(make: Factory, mock: MockServer) -> None:
    mock.update_config(batch_delay_s=60)
    backend = make(parasail=parasail(max_poll_hours=0.0001))
    await backend.run_batched(questions(0, 1), progress=False)
    assert len(await asyncio.to_thread(cancel_all_local_batches, backend.config)) == 1
    mock.update_config(batch_delay_s=0)

    results = await backend.run_batched(questions(0, 1), progress=False)

    assert [getattr(r, "error_type", None) for r in results] == [None, None]
    assert route(mock, "/v1/files") == 2


async def test_force_refresh_sends_a_new_job(make: Factory, mock: MockServer) -> None:
    await make().run_batched(questions(0), progress=False)

    results = answers(await make(force_refresh=True).run_batched(questions(0), progress=False))

    assert not results[0].cached
    assert route(mock, "/v1/files") == 2
    assert mock.stats()["batch_lines"] == 2


async def test_concurrent_generate_calls_share_one_job(make: Factory, mock: MockServer) -> None:
    backend = make()
    numbers = (0, 1, 2, 0, 1, 0)

    results = answers(await asyncio.gather(*(backend.generate(r) for r in questions(*numbers))))

    assert [r.text for r in results] == [f"mock reply: question {n}" for n in numbers]
    assert (route(mock, "/v1/files"), route(mock, "/v1/batches")) == (1, 1)
    assert mock.stats()["batch_lines"] == 3
    assert route(mock, LIVE) == 0
    assert [r.cache_source for r in results] == [None] * 3 + ["inflight"] * 3
    again = await backend.generate(req(0, text="question 2"))
    assert isinstance(again, MinimaLlmResponse) and again.cached
    assert route(mock, "/v1/batches") == 1


async def test_generate_failure_in_batch_mode_is_a_failure(make: Factory, mock: MockServer) -> None:
    result = await make().generate(req(0, text=f"fail {BAD}"))

    assert isinstance(result, MinimaLlmFailure)
    assert (result.error_type, result.status) == ("BatchRequestError", 500)
    assert route(mock, LIVE) == 0


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize("kind", ["refused", "silent"])
async def test_an_unreachable_batch_api_fails_within_bounded_time(
    make: Factory, taken_port: int, tmp_path: Path, kind: str
) -> None:
    # "silent": something accepts the connection and never answers, so each try times out.
    port = closed_port() if kind == "refused" else taken_port
    backend = make(base_url=f"http://127.0.0.1:{port}/v1", max_attempts=2, timeout_s=0.2)
    started = time.monotonic()

    results = await asyncio.wait_for(backend.run_batched(questions(0, 1, 0), progress=False), 5)

    assert time.monotonic() - started < 2.0
    assert [getattr(r, "error_type", None) for r in results] == ["BatchApiError"] * 3
    assert all("2 attempts" in r.message for r in results)  # type: ignore[union-attr]
    assert list_states(tmp_path / "cache") == []  # nothing was submitted, nothing to resume


def test_batch_mode_needs_somewhere_for_state_files() -> None:
    with pytest.raises(ConfigError) as caught:
        OpenAIMinimaLlm(config("http://127.0.0.1:1/v1", None, parasail=parasail()))

    assert caught.value.field == "parasail.state_dir"
    assert "parasail.state_dir" in str(caught.value)


async def test_batch_mode_with_a_state_dir_and_no_cache(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    state_dir = tmp_path / "states"
    backend = make(cache_dir=None, parasail=parasail(state_dir=str(state_dir)))

    results = answers(await backend.run_batched(questions(0, 1, 0), progress=False))

    assert [r.text for r in results] == [f"mock reply: question {n}" for n in (0, 1, 0)]
    assert mock.stats()["batch_lines"] == 2
    (state,) = list_states(state_dir)
    assert state.path is not None and state.path.parent == state_dir
    assert state.status == "completed"
    assert not (tmp_path / "cache").exists()


async def test_state_dir_is_preferred_to_cache_dir(make: Factory, tmp_path: Path) -> None:
    state_dir = tmp_path / "states"

    await make(parasail=parasail(state_dir=str(state_dir))).run_batched(
        questions(0), progress=False
    )

    assert len(list_states(state_dir)) == 1
    assert list_states(tmp_path / "cache") == []


async def test_the_job_input_file_holds_the_upstream_bodies(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    request = MinimaLlmRequest(
        "r", [{"role": "user", "content": "hi"}], temperature=0.5, max_tokens=7
    )
    backend = make()

    await backend.run_batched([request], progress=False)

    (state,) = list_states(tmp_path / "cache")
    api = backend.jobs.api  # type: ignore[union-attr]
    lines = (await api.acontent(state.input_file_id)).decode().splitlines()  # type: ignore[arg-type]
    (line,) = [json.loads(raw) for raw in lines]
    assert (line["method"], line["url"]) == ("POST", "/v1/chat/completions")
    assert line["custom_id"] == backend.key_for(request)[0]
    assert line["body"] == {
        "model": "mock-model",
        "messages": [{"role": "user", "content": "hi"}],
        "temperature": 0.5,
        "max_tokens": 7,
    }


async def test_a_forced_refresh_of_one_call_sends_a_new_job(
    make: Factory, mock: MockServer
) -> None:
    # DSPy's parse retries call generate(force_refresh=True): the answer being retried
    # must not come back from the earlier job that gave it.
    mock.update_config(batch_delay_s=60)
    request, other = questions(0, 1)
    slow = make(parasail=parasail(max_poll_hours=0.0001))
    left = await slow.run_batched([request, other], progress=False)
    assert all(isinstance(r, MinimaLlmFailure) for r in left)  # the job is left running
    mock.update_config(batch_delay_s=0)

    backend = make()
    taken_over = await backend.generate(request)  # from that job, which stays open for q1
    refreshed = await backend.generate(request, force_refresh=True)

    assert isinstance(taken_over, MinimaLlmResponse) and isinstance(refreshed, MinimaLlmResponse)
    assert route(mock, "/v1/files") == 2  # the first job, then the refresh's own
    assert mock.stats()["batch_lines"] == 3
