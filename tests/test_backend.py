"""The backend against the real mock server over HTTP, on both transports."""

from __future__ import annotations

import asyncio
import json
import logging
import shutil
import sqlite3
import time
from contextlib import closing
from pathlib import Path

import pytest

from backend_support import BackendFactory, req
from minima_llm import (
    BatchConfig,
    MinimaLlmConfig,
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResponse,
    OpenAIMinimaLlm,
    reset_force_refresh,
    run_batched_callable,
    set_force_refresh,
)
from minima_llm.testing import MockServer

QUIET = {"heartbeat_s": 0.0, "stall_s": 0.0}


async def test_generate_then_cache_hit(make_backend: BackendFactory, mock: MockServer) -> None:
    backend = make_backend()
    first = await backend.generate(req(1))
    assert isinstance(first, MinimaLlmResponse)
    assert first.text == "mock reply: question 1"
    assert not first.cached and first.cache_source is None
    assert first.usage.prompt_tokens > 0 and first.usage.completion_tokens == 4
    assert first.raw is not None and first.raw["object"] == "chat.completion"

    second = await backend.generate(req(1))
    assert isinstance(second, MinimaLlmResponse)
    assert second.cached and second.cache_source == "primary"
    assert second.text == first.text
    assert second.usage == first.usage  # the original call's usage, not zero
    assert mock.stats()["requests"] == 1
    snap = backend.snapshot()
    assert snap.live_calls == 1 and snap.hits == 1
    assert snap.tokens_in == first.usage.prompt_tokens  # spent once
    assert snap.tokens_saved_in == first.usage.prompt_tokens  # saved once, not spent


async def test_a_stream_asked_for_in_extra_is_refused_before_it_is_sent(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # Sent, its event stream read as a whole body was "malformed": six paid generations.
    backend = make_backend()
    result = await backend.generate(req(1, extra={"stream": True}))
    assert isinstance(result, MinimaLlmFailure)
    assert result.error_type == "InvalidRequest" and "stream()" in result.message
    assert result.attempts == 0 and mock.stats()["requests"] == 0
    assert isinstance(await backend.generate(req(1, extra={"stream": False})), MinimaLlmResponse)


@pytest.mark.parametrize(
    "answer",
    ["a\ud800b", "a\ufffdb \udfff", "a\ufffdb"],
    ids=["lone-surrogate", "both", "replacement-char"],
)
async def test_a_replay_from_the_file_gives_the_text_exactly_as_it_arrived(
    make_backend: BackendFactory, mock: MockServer, answer: str
) -> None:
    # SQLite cannot hold a lone surrogate (the store writes U+FFFD): the raw body can.
    ask = MinimaLlmRequest(request_id="r", messages=[{"role": "user", "content": "ECHO:" + answer}])
    live = await make_backend().generate(ask)
    replayed = await make_backend().generate(ask)  # a new process's view: the file only
    assert isinstance(live, MinimaLlmResponse) and isinstance(replayed, MinimaLlmResponse)
    assert replayed.cached and replayed.cache_source == "primary"
    assert live.text == replayed.text == answer
    assert mock.stats()["requests"] == 1


async def test_requests_name_the_client_whichever_transport_sends_them(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    import minima_llm

    assert isinstance(await make_backend().generate(req(2)), MinimaLlmResponse)
    assert mock.last_headers["user-agent"] == f"minima-llm/{minima_llm.__version__}"


async def test_result_is_committed_before_it_is_returned(
    make_backend: BackendFactory, tmp_path: Path
) -> None:
    backend = make_backend()
    result = await backend.generate(req(7))
    key, _ = backend.key_for(req(7))
    with closing(sqlite3.connect(tmp_path / "cache" / "minima_llm.db")) as conn:
        row = conn.execute("SELECT response_text, model FROM cache WHERE key=?", (key,)).fetchone()
    assert row == (result.text, "mock-model")  # type: ignore[union-attr]


async def test_429_with_headers_then_recovery(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    headers = {
        "retry-after": "0.02",
        "x-ratelimit-limit-requests": "60000",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "20ms",
    }
    mock.fail_next(2, status=429, headers=headers)
    backend = make_backend()
    started = time.monotonic()
    result = await backend.generate(req(1))
    assert isinstance(result, MinimaLlmResponse)
    assert time.monotonic() - started >= 0.04  # waited out retry-after twice
    snap = backend.snapshot()
    assert snap.rate_limited == 2 and snap.retries == 2
    assert backend.upstream.pacer.server_rpm == 60000  # learned from the 429's headers
    assert mock.stats()["requests"] == 3


async def test_503_storm_exhausts_attempts_then_next_request_succeeds(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.fail_next(3, status=503, body={"error": {"message": "overloaded"}})
    backend = make_backend(max_attempts=3)
    failure = await backend.generate(req(1))
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.error_type == "HTTPError" and failure.status == 503
    assert failure.attempts == 3 and len(failure.attempt_timestamps) == 3
    assert "overloaded" in (failure.body_snippet or "")
    assert list(failure.attempt_timestamps) == sorted(failure.attempt_timestamps)
    # Each refusal halved the in-flight limit and paused everyone briefly.
    assert backend.upstream.overload.pauses == 3
    assert backend.upstream.in_flight_limit == backend.cfg.max_outstanding // 8
    ok = await backend.generate(req(2))
    assert isinstance(ok, MinimaLlmResponse)
    assert backend.snapshot().failures == 1


async def test_a_burst_refused_with_503_does_not_stall_the_batch(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # A server that takes 4 at once and refuses the rest: the refusals of one burst
    # are one overload, not 60 reasons to double the cooldown up to its cap.
    mock.update_config(max_concurrency=4, latency_s=0.02)
    backend = make_backend(
        cooldown_cap_s=30.0, cooldown_halflife_s=20.0, base_backoff_s=0.05, max_backoff_s=0.5
    )
    backend.cfg.batch.num_workers = 64
    backend.cfg.batch.max_failures = None
    started = time.monotonic()
    results = await asyncio.wait_for(backend.run_batched([req(i) for i in range(200)]), 60)
    elapsed = time.monotonic() - started
    assert all(isinstance(r, MinimaLlmResponse) for r in results)
    upstream = backend.upstream
    # The in-flight limit came down to what the server takes; the cooldown never escalated.
    assert upstream.in_flight_limit < 64
    assert upstream.overload.bumps == 0 and upstream.overload.pauses > 0
    # 200 answers at 4 x 20 ms take 1 s of server time; a storm of doubled cooldowns took minutes.
    assert elapsed < 20.0, (elapsed, upstream.overload)


async def test_timeout_is_retried_and_reported_as_408(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend(timeout_s=0.2, max_attempts=2)
    mock.fail_next(1, mode="timeout", sleep_s=2.0)
    assert isinstance(await backend.generate(req(1)), MinimaLlmResponse)
    mock.fail_next(2, mode="timeout", sleep_s=2.0)
    failure = await backend.generate(req(2))
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.error_type == "TimeoutError" and failure.status == 408
    assert failure.timeout_s == 0.2 and failure.attempts == 2


@pytest.mark.parametrize("mode", ["reset", "malformed"])
async def test_broken_body_is_retried(
    make_backend: BackendFactory, mock: MockServer, mode: str
) -> None:
    mock.fail_next(1, mode=mode)
    backend = make_backend()
    result = await backend.generate(req(1))
    assert isinstance(result, MinimaLlmResponse) and result.text == "mock reply: question 1"
    assert backend.snapshot().retries == 1


async def test_malformed_body_on_last_attempt_is_a_failure(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.fail_next(1, mode="malformed")
    failure = await make_backend(max_attempts=1).generate(req(1))
    assert isinstance(failure, MinimaLlmFailure) and failure.error_type == "MalformedResponse"


async def test_reset_on_last_attempt_is_a_failure(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.fail_next(1, mode="reset")
    failure = await make_backend(max_attempts=1).generate(req(1))
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.error_type in ("ConnectionResetError", "ConnectionError")


@pytest.mark.parametrize("status", [400, 401, 404, 422])
async def test_client_errors_fail_at_once(
    make_backend: BackendFactory, mock: MockServer, status: int
) -> None:
    mock.fail_next(1, status=status, body={"error": {"message": "bad request"}})
    failure = await make_backend(max_attempts=5).generate(req(1))
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.status == status and failure.attempts == 1
    assert mock.stats()["requests"] == 1


@pytest.mark.parametrize(
    ("status", "should_retry", "attempts"), [(503, "false", 1), (400, "true", 3), (503, "bogus", 3)]
)
async def test_the_servers_x_should_retry_overrides_the_status(
    make_backend: BackendFactory, mock: MockServer, status: int, should_retry: str, attempts: int
) -> None:
    # OpenAI sends it, and its SDK follows it before looking at the status.
    headers = {"x-should-retry": should_retry}
    mock.fail_next(5, status=status, headers=headers, body={"error": {"message": "no"}})
    failure = await make_backend(max_attempts=3).generate(req(1))
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.status == status and failure.attempts == attempts


async def test_connection_refused_is_a_bounded_failure(transport: str, tmp_path: Path) -> None:

    cfg = MinimaLlmConfig(
        base_url="http://127.0.0.1:9",
        model="m",
        transport=transport,
        rpm=0,
        max_attempts=3,
        base_backoff_s=0.01,
        max_backoff_s=0.02,
    )
    backend = OpenAIMinimaLlm(cfg)
    try:
        failure = await asyncio.wait_for(backend.generate(req(1)), 10)
    finally:
        await backend.aclose()
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.error_type == "ConnectionError" and failure.attempts == 3


async def test_identical_requests_in_flight_share_one_call(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(latency_s=0.1)
    backend = make_backend()
    same = [req(i, text="the same question") for i in range(20)]
    results = await asyncio.gather(*(backend.generate(r) for r in same))
    assert mock.stats()["requests"] == 1
    assert [r.request_id for r in results] == [f"r{i}" for i in range(20)]
    assert {r.text for r in results} == {"mock reply: the same question"}  # type: ignore[union-attr]
    assert backend.snapshot().coalesced == 19


async def test_a_cancelled_owner_does_not_fail_the_requests_that_joined_it(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(latency_s=0.3)
    backend = make_backend()
    same = [req(i, text="asked three times") for i in range(3)]

    async def answer(i: int) -> object:
        # The first caller gives up early (its own timeout); the others wait.
        return await asyncio.wait_for(backend.generate(same[i]), 0.1 if i == 0 else 5.0)

    owner, *joiners = await asyncio.gather(*(answer(i) for i in range(3)), return_exceptions=True)
    assert isinstance(owner, asyncio.TimeoutError)  # not the builtin one before 3.11
    assert all(isinstance(r, MinimaLlmResponse) for r in joiners), joiners
    assert [r.request_id for r in joiners] == ["r1", "r2"]  # type: ignore[union-attr]
    # One joiner took the call over and the other joined it: two upstream calls in all.
    assert mock.stats()["requests"] == 2
    assert backend.snapshot().coalesced == 1


async def test_a_batch_survives_a_cancelled_owner_of_a_shared_call(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(latency_s=0.3)
    backend = make_backend()

    async def fn(item: tuple[int, float]) -> object:
        i, limit = item
        return await asyncio.wait_for(backend.generate(req(i, text="same prompt")), limit)

    results = await run_batched_callable(
        [(0, 0.1), (1, 5.0), (2, 5.0)], fn, BatchConfig(num_workers=3, **QUIET), progress=False
    )
    assert isinstance(results[0], MinimaLlmFailure)  # its own timeout, recorded as a failure
    assert all(isinstance(r, MinimaLlmResponse) for r in results[1:])


async def test_force_refresh_by_config_call_and_context(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend()
    await backend.generate(req(1))
    assert (await backend.generate(req(1))).cached  # type: ignore[union-attr]

    fresh = await backend.generate(req(1), force_refresh=True)
    assert isinstance(fresh, MinimaLlmResponse) and not fresh.cached

    token = set_force_refresh(True)
    try:
        assert not (await backend.generate(req(1))).cached  # type: ignore[union-attr]
    finally:
        reset_force_refresh(token)
    assert (await backend.generate(req(1))).cached  # type: ignore[union-attr]

    refreshing = make_backend(force_refresh=True)
    assert not (await refreshing.generate(req(1))).cached  # type: ignore[union-attr]
    assert mock.stats()["requests"] == 4


async def test_a_synonym_lookup_keeps_the_key_only_fields(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # The gateway keys each tenant's and each endpoint's answers apart with key_extra.
    backend = make_backend(model_synonyms={"m1": ["m2"]})
    await backend.call(req(1, model="m2"))
    await backend.call(req(2, model="m2"), key_extra={"tenant": "alice"})
    bob = await backend.call(req(1, model="m1"), key_extra={"tenant": "bob"})
    assert isinstance(bob, MinimaLlmResponse) and not bob.cached  # not the untenanted row
    alice = await backend.call(req(2, model="m1"), key_extra={"tenant": "alice"})
    assert isinstance(alice, MinimaLlmResponse) and alice.cache_source == "synonym"
    assert mock.stats()["requests"] == 3


async def test_a_synonym_hit_reports_the_same_model_on_its_first_replay_and_later_ones(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend(model_synonyms={"m1": ["m2"]})
    await backend.generate(req(1, model="m2"))
    first = await backend.generate(req(1, model="m1"))  # found under m2, copied as m1
    later = await backend.generate(req(1, model="m1"))
    assert isinstance(first, MinimaLlmResponse) and isinstance(later, MinimaLlmResponse)
    assert (first.cache_source, later.cache_source) == ("synonym", "primary")
    assert first.model == later.model == "m1"
    assert first.text == later.text and mock.stats()["requests"] == 1


async def test_a_no_store_call_answered_from_a_lookup_cache_leaves_the_primary_alone(
    make_backend: BackendFactory, mock: MockServer, tmp_path: Path
) -> None:
    archive = tmp_path / "archive"
    first = make_backend(cache_dir=str(archive))
    await first.generate(req(1))
    await first.aclose()
    primary = tmp_path / "primary"
    backend = make_backend(cache_dir=str(primary), cache_lookup_dirs=(str(archive),))
    hit = await backend.call(req(1), store=False)
    assert isinstance(hit, MinimaLlmResponse) and hit.cache_source == "lookup"
    await backend.aclose()
    # "store=False answers without writing the cache": a hit found elsewhere is not copied in.
    with closing(sqlite3.connect(primary / "minima_llm.db")) as conn:
        assert conn.execute("SELECT count(*) FROM cache").fetchone() == (0,)
    assert mock.stats()["requests"] == 1


async def test_run_batched_keeps_input_order_and_failures_in_place(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.fail_next(1, status=400)
    backend = make_backend(max_attempts=1)
    requests = [req(i) for i in range(50)]
    results = await backend.run_batched(requests)
    assert [r.request_id for r in results] == [r.request_id for r in requests]
    failures = [r for r in results if isinstance(r, MinimaLlmFailure)]
    assert len(failures) == 1
    texts = [r.text for r in results if isinstance(r, MinimaLlmResponse)]
    assert all(t.startswith("mock reply: question ") for t in texts) and len(texts) == 49
    again = await backend.run_batched(requests)
    assert sum(isinstance(r, MinimaLlmResponse) and r.cached for r in again) == 49


async def test_max_outstanding_bounds_concurrency(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(latency_s=0.05)
    backend = make_backend(max_outstanding=4)
    await asyncio.gather(*(backend.generate(req(i)) for i in range(20)))
    assert mock.stats()["peak_concurrency"] <= 4
    assert mock.stats()["requests"] == 20


async def test_learns_the_server_rate_limit_without_bouncing(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    mock.update_config(rpm=1200)  # 20/s, one second of burst
    backend = make_backend(max_outstanding=32)
    started = time.monotonic()
    results = await asyncio.gather(*(backend.generate(req(i)) for i in range(40)))
    elapsed = time.monotonic() - started
    assert all(isinstance(r, MinimaLlmResponse) for r in results)
    assert mock.stats()["rate_limited"] <= 1
    assert backend.upstream.pacer.server_rpm == 1200
    # 20 from the burst, then 20 at 20/s: about 1 s. The upper bound only catches a
    # bounce (a cooldown of seconds), with room for a machine busy with other work.
    assert 0.8 <= elapsed <= 5.0


async def test_gzip_request_bodies(make_backend: BackendFactory) -> None:
    result = await make_backend(compress_gzip=True).generate(req(1, text="squeeze me"))
    assert isinstance(result, MinimaLlmResponse) and result.text == "mock reply: squeeze me"


async def test_extra_parameters_reach_the_upstream_and_the_key(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    backend = make_backend()
    short = await backend.generate(req(1, text="one two three four five", max_tokens=2))
    assert isinstance(short, MinimaLlmResponse) and short.text == "mock reply:"
    plain = await backend.generate(req(1, text="one two three four five"))
    assert not plain.cached  # type: ignore[union-attr]
    with_extra = await backend.generate(
        req(1, text="one two three four five", extra={"top_p": 0.5})
    )
    assert not with_extra.cached  # type: ignore[union-attr]
    assert mock.stats()["requests"] == 3


async def test_per_request_model(make_backend: BackendFactory) -> None:
    result = await make_backend().generate(req(1, model="other-model"))
    assert isinstance(result, MinimaLlmResponse) and result.model == "other-model"
    assert result.raw is not None and result.raw["model"] == "other-model"


def test_one_backend_across_several_asyncio_runs(transport: str, tmp_path: Path) -> None:
    from minima_llm.testing import MockConfig, run_mock_server_in_thread

    with run_mock_server_in_thread(MockConfig()) as server:
        cfg = MinimaLlmConfig(
            base_url=server.url, model="m", cache_dir=str(tmp_path), rpm=0, transport=transport
        )
        backend = OpenAIMinimaLlm(cfg)
        first = asyncio.run(backend.generate(req(1)))
        second = asyncio.run(backend.generate(req(2)))
        replay = asyncio.run(backend.generate(req(1)))
        asyncio.run(backend.aclose())
    assert isinstance(first, MinimaLlmResponse) and isinstance(second, MinimaLlmResponse)
    assert isinstance(replay, MinimaLlmResponse) and replay.cached


async def test_without_cache_dir_nothing_is_cached(mock: MockServer, transport: str) -> None:

    backend = OpenAIMinimaLlm(
        MinimaLlmConfig(base_url=mock.url, model="m", rpm=0, transport=transport)
    )
    try:
        await backend.generate(req(1))
        again = await backend.generate(req(1))
    finally:
        await backend.aclose()
    assert not again.cached  # type: ignore[union-attr]
    assert mock.stats()["requests"] == 2


async def test_repeat_within_one_batch_is_a_hit_after_the_prefetch(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    from minima_llm import BatchConfig

    backend = make_backend(batch=BatchConfig(num_workers=1, heartbeat_s=0, stall_s=0))
    results = await backend.run_batched([req(1), req(2), req(1, text="question 1")])
    assert mock.stats()["requests"] == 2
    assert isinstance(results[2], MinimaLlmResponse) and results[2].cached
    assert results[2].request_id == "r1"


async def test_run_batched_progress_goes_where_the_caller_says(
    make_backend: BackendFactory, caplog: pytest.LogCaptureFixture
) -> None:
    import logging

    from minima_llm import BatchConfig

    backend = make_backend(batch=BatchConfig(num_workers=4, heartbeat_s=0, stall_s=0))
    logger = logging.getLogger("test.progress")
    with caplog.at_level(logging.INFO, logger="test.progress"):
        await backend.run_batched([req(i) for i in range(5)], progress=logger)
    assert any(r.getMessage().startswith("[batch] finished 5") for r in caplog.records)


async def test_lookup_many_answers_hits_like_generate_and_leaves_misses_alone(
    make_backend: BackendFactory, mock: MockServer, tmp_path: Path
) -> None:
    trace = tmp_path / "trace.jsonl"
    backend = make_backend(trace_file=str(trace))
    first = await backend.generate(req(1))
    assert isinstance(first, MinimaLlmResponse)
    before = backend.snapshot()
    answers = await backend.lookup_many([req(1), req(2)])
    hit, miss = answers
    assert isinstance(hit, MinimaLlmResponse) and hit.cached and hit.text == first.text
    assert hit.cache_source == "primary" and hit.usage == first.usage
    assert miss is None
    after = backend.snapshot()
    # The hit is counted as generate counts one; the miss is not counted at all.
    assert after.requests == before.requests + 1 and after.hits == before.hits + 1
    assert mock.stats()["requests"] == 1
    sources = [json.loads(line)["source"] for line in trace.read_text().splitlines()]
    assert sources == ["miss", "primary"]  # the miss looked up here left no line
    token = set_force_refresh(True)
    try:
        assert await backend.lookup_many([req(1)]) == [None]
    finally:
        reset_force_refresh(token)


async def test_non_ascii_questions_reach_the_upstream_intact(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # The request body is the key's canonical JSON, which escapes non-ASCII text.
    backend = make_backend()
    question = "Größe von 東京 — «naïve» 🙂?"
    answer = await backend.generate(req(1, text=question, temperature=0.5, max_tokens=64))
    assert isinstance(answer, MinimaLlmResponse)
    assert answer.text == f"mock reply: {question}"
    assert mock.stats()["requests"] == 1


async def test_a_redirect_is_a_failure_that_says_where_to_point(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    moved = "https://api.example.invalid/v1/chat/completions"
    mock.fail_next(1, status=301, headers={"Location": moved})
    backend = make_backend(max_attempts=5)
    failure = await backend.generate(req(1))
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.status == 301 and failure.attempts == 1  # not retried, not followed
    assert f"redirected to {moved}" in failure.message and "base_url" in failure.message
    assert mock.stats()["requests"] == 1


async def test_a_per_call_key_no_header_can_carry_is_a_failure_not_an_exception(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # A gateway passing its caller's key through: the transport must never see it.
    backend = make_backend()
    for key in ("sk-caf\u2019", "sk-\udcff", "sk-a\r\nX-Injected: 1"):
        failure = await backend.call(req(1), api_key=key)
        assert isinstance(failure, MinimaLlmFailure) and failure.error_type == "InvalidApiKey"
        assert failure.attempts == 0 and key not in failure.message
        opened = await backend.open_stream(req(2), api_key=key)
        assert isinstance(opened, MinimaLlmFailure) and opened.error_type == "InvalidApiKey"
    assert mock.stats()["requests"] == 0


async def test_a_cache_directory_deleted_mid_run_is_reported_and_answers_still_come(
    make_backend: BackendFactory, mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # SQLite would go on writing into the deleted file: every answer "cached", none kept.
    backend = make_backend(cache_dir=str(tmp_path / "cache"))
    assert isinstance(await backend.generate(req(1)), MinimaLlmResponse)
    shutil.rmtree(tmp_path / "cache")
    await asyncio.sleep(0.6)  # the writer looks at its file at most twice a second
    with caplog.at_level(logging.ERROR, logger="minima_llm"):
        answer = await backend.generate(req(2))
    assert isinstance(answer, MinimaLlmResponse) and answer.text == "mock reply: question 2"
    assert backend.stats.cache_errors == 1
    assert "was deleted or replaced" in caplog.text


def test_a_recurring_cache_fault_is_logged_once_per_period(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # A full disk fails every write of a batch; one line per answer buried the log.
    from minima_llm.calls import RepeatedError

    now = [100.0]
    repeated = RepeatedError(10.0, clock=lambda: now[0])
    with caplog.at_level(logging.ERROR, logger="minima_llm"):
        for _ in range(400):
            repeated.log("cache write failed: %s", "disk full")
            now[0] += 0.0625  # 25 s in all, in steps a float holds exactly
    lines = [r.getMessage() for r in caplog.records]
    assert lines == [
        "cache write failed: disk full",
        "cache write failed: disk full (159 more like it since the last such line)",
        "cache write failed: disk full (159 more like it since the last such line)",
    ]
    # Asked first whether a line is due, a caller builds only the lines written; the
    # ones it left out are counted all the same.
    caplog.clear()
    built = 0
    with caplog.at_level(logging.ERROR, logger="minima_llm"):
        for _ in range(400):
            if repeated.due():
                built += 1
                repeated.log("cache read failed: %s", "locked")
            now[0] += 0.0625
    assert built == 2  # at 130 s and 140 s
    assert [r.getMessage() for r in caplog.records] == [
        "cache read failed: locked (159 more like it since the last such line)"
    ] * 2


async def test_a_live_answer_keeps_the_upstreams_request_id_and_no_other_header(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    be = make_backend()
    answer = {
        "id": "c",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": "x"}}],
    }
    headers = {"X-Request-Id": "req_1", "openai-version": "2020-10-01", "x-other": "no"}
    mock.fail_next(1, status=200, body=answer, headers=headers)
    live = await be.generate(req(1))
    assert isinstance(live, MinimaLlmResponse) and not live.cached
    assert live.upstream_headers == {"x-request-id": "req_1", "openai-version": "2020-10-01"}
    hit = await be.generate(req(1))
    assert isinstance(hit, MinimaLlmResponse) and hit.cached and hit.upstream_headers is None


@pytest.mark.parametrize(
    ("text", "raw", "expected"),
    [
        ("a\ufffdb", '{"choices":[{"message":{"content":"a\\ud800b"}}]}', "a\ud800b"),
        ("a\ufffdb", '{"choices":[{"text":"a\\udc00b"}]}', "a\udc00b"),
        # The raw text differs beyond the surrogates (an older row, content parts): the row wins.
        ("a\ufffdb", '{"choices":[{"message":{"content":"other\\ud800"}}]}', "a\ufffdb"),
        ("a\ufffdb", '{"choices":[{"message":{"content":[{"type":"text"}]}}]}', "a\ufffdb"),
        ("a\ufffdb", '{"choices":[]}', "a\ufffdb"),
        ("a\ufffdb", "not json", "a\ufffdb"),
        ("a\ufffdb", None, "a\ufffdb"),
    ],
)
def test_the_text_of_a_row_comes_back_from_its_raw_body_only_where_the_file_lost_it(
    text: str, raw: str | None, expected: str
) -> None:
    from minima_llm.cache import CacheRow
    from minima_llm.calls import text_of_row

    row = CacheRow("k", text, raw, 0.0, "m", None)
    assert text_of_row(row, raw) == expected


async def test_learns_a_rate_from_refusals_when_the_server_states_no_limit(
    make_backend: BackendFactory, mock: MockServer
) -> None:
    # 429s with no x-ratelimit-* and no retry-after, as from many gateways: before, all
    # workers waited out one doubled pause, were released together and refused again.
    mock.update_config(rpm=6000, rate_limit_headers=0)  # 100/s, one second of burst
    backend = make_backend(max_outstanding=16, max_attempts=8)
    results = await asyncio.gather(*(backend.generate(req(i)) for i in range(200)))
    assert all(isinstance(r, MinimaLlmResponse) for r in results)
    stats = mock.stats()
    assert stats["rate_limited"] <= 0.15 * stats["requests"], stats
    pacer = backend.upstream.pacer
    assert pacer.server_rpm is None and pacer.learned_rpm is not None
    assert 600 <= pacer.learned_rpm <= 12_000
