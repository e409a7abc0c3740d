"""run_dspy_batch: field matching, caching, parse retries, failures and the pending seam."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy_helpers import Backends, FakeBackend, quiet_batch
from pydantic import BaseModel

from minima_llm import MinimaLlmFailure, OpenAIMinimaLlm, ParasailBatchConfig
from minima_llm.dspy_adapter import (
    DSPyRetryConfig,
    Pending,
    is_pending,
    run_dspy_batch,
    run_dspy_batch_sync,
)
from minima_llm.testing import MockServer


class Judge(dspy.Signature):
    """Judge whether the passage answers the question."""

    question: str = dspy.InputField()
    passage: str = dspy.InputField()
    score: int = dspy.OutputField()
    relevant: bool = dspy.OutputField()

    @classmethod
    def convert_output(cls, prediction: Any, obj: Annotation) -> None:
        obj.score = prediction.score
        obj.relevant = prediction.relevant


class Annotation(BaseModel):
    question: str
    passage: str
    query_id: str = "q"
    score: int | None = None
    relevant: bool | None = None


def annotations(*questions: str) -> list[Annotation]:
    return [Annotation(question=q, passage=f"passage for {q}") for q in questions]


NO_RETRY = DSPyRetryConfig(parse_retries=0)


async def test_outputs_are_written_back_in_input_order(
    backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    items = annotations("a", "b", "c")
    results = await run_dspy_batch(Judge, items, Judge.convert_output, backend=backend)
    assert results == items  # the same objects, filled in, in input order
    assert all(1 <= item.score <= 5 and isinstance(item.relevant, bool) for item in items)
    assert mock.stats()["requests"] == 3


async def test_inputs_are_matched_by_name(fake: FakeBackend) -> None:
    fake.answer = "[[ ## reasoning ## ]]\nr\n[[ ## score ## ]]\n1\n[[ ## relevant ## ]]\nyes"
    item = Annotation(question="Why?", passage="Because.", query_id="SECRET-ID")
    await run_dspy_batch(Judge, [item], Judge.convert_output, backend=fake)
    prompt = fake.requests[0].messages[-1]["content"]
    assert "[[ ## question ## ]]\nWhy?" in prompt
    assert "[[ ## passage ## ]]\nBecause." in prompt
    assert "SECRET-ID" not in prompt
    assert (item.score, item.relevant) == (1, True)


async def test_a_rerun_is_served_from_the_cache(backends: Backends, mock: MockServer) -> None:
    first = await run_dspy_batch(
        Judge, annotations("x", "y"), Judge.convert_output, dspy.Predict, backends()
    )
    assert mock.stats()["requests"] == 2
    again = await run_dspy_batch(
        Judge, annotations("x", "y"), Judge.convert_output, dspy.Predict, backends()
    )
    assert mock.stats()["requests"] == 2
    assert [a.model_dump() for a in again] == [a.model_dump() for a in first]


async def test_flaky_answers_are_retried_with_new_samples(
    backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    items = annotations("fine", "FLAKY-2 twice bad")
    results = await run_dspy_batch(Judge, items, Judge.convert_output, backend=backend)
    assert results == items and items[1].score is not None
    assert mock.stats()["requests"] == 1 + 3  # the flaky item: two bad samples, then a good one


async def test_retries_of_a_rerun_replay_from_the_cache(
    backends: Backends, mock: MockServer
) -> None:
    questions = ("FLAKY-1 a", "FLAKY-3 b", "plain", "UNPARSEABLE c")
    retry = DSPyRetryConfig(parse_retries=3)
    first = await run_dspy_batch(
        Judge,
        annotations(*questions),
        Judge.convert_output,
        backend=backends(),
        retry=retry,
    )
    calls = mock.stats()["requests"]
    assert calls == 2 + 4 + 1 + 4
    mock.reset()  # forgets the flaky variants: only the cache can give the same answers
    again = await run_dspy_batch(
        Judge,
        annotations(*questions),
        Judge.convert_output,
        backend=backends(),
        retry=retry,
    )
    assert mock.stats()["requests"] == 0
    assert [dump(r) for r in again] == [dump(r) for r in first]


def dump(result: Any) -> Any:
    return (
        result.model_dump()
        if isinstance(result, BaseModel)
        else (result.error_type, result.attempts)
    )


async def test_a_cached_unparseable_answer_is_not_reused(
    backends: Backends, mock: MockServer
) -> None:
    await run_dspy_batch(
        Judge,
        annotations("FLAKY-1 x"),
        Judge.convert_output,
        backend=backends(),
        retry=NO_RETRY,
    )
    assert mock.stats()["requests"] == 1  # a bad answer, now in the cache
    results = await run_dspy_batch(
        Judge, annotations("FLAKY-1 x"), Judge.convert_output, backend=backends()
    )
    assert isinstance(results[0], Annotation) and results[0].score is not None
    assert mock.stats()["requests"] == 2  # the cached bad answer, then one fresh sample


async def test_an_unparseable_item_fails_alone(backend: OpenAIMinimaLlm, mock: MockServer) -> None:
    retry = DSPyRetryConfig(parse_retries=2)
    items = annotations("one", "UNPARSEABLE two", "three")
    results = await run_dspy_batch(Judge, items, Judge.convert_output, backend=backend, retry=retry)
    assert results[0] is items[0] and results[2] is items[2]
    failure = results[1]
    assert isinstance(failure, MinimaLlmFailure)
    assert (failure.request_id, failure.error_type, failure.attempts) == (
        "item-1",
        "AdapterParseError",
        3,
    )
    assert "ignores the requested format" in (failure.body_snippet or "")
    assert items[1].score is None
    assert mock.stats()["requests"] == 1 + 3 + 1


async def test_an_upstream_failure_lands_in_its_slot(
    backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    mock.fail_next(1, status=400)
    results = await run_dspy_batch(
        Judge, annotations("a"), Judge.convert_output, backend=backend, batch_config=quiet_batch()
    )
    assert isinstance(results[0], MinimaLlmFailure) and results[0].status == 400
    assert results[0].request_id == "item-0"


async def test_retry_samples_are_reproducible(fake: FakeBackend) -> None:
    fake.answer = "nothing useful"
    retry = DSPyRetryConfig(
        parse_retries=3, retry_temperature_max=0.6, retry_temperature_halflife=2.0
    )
    await run_dspy_batch(Judge, annotations("a"), Judge.convert_output, backend=fake, retry=retry)
    samples = [(r.temperature, (r.extra or {}).get("seed")) for r in fake.requests]
    assert samples == [(None, None), (0.2, 1), (0.3, 2), (0.36, 3)]
    assert fake.refreshes == [False] * 4  # each retry has its own key: no need to skip the cache


async def test_unseeded_retries_skip_the_cache_read(fake: FakeBackend) -> None:
    fake.answer = "nothing useful"
    retry = DSPyRetryConfig(parse_retries=2, retry_temperature_max=0.0, retry_seed=False)
    await run_dspy_batch(Judge, annotations("a"), Judge.convert_output, backend=fake, retry=retry)
    assert [(r.temperature, r.extra) for r in fake.requests] == [
        (None, None),
        (0.0, None),
        (0.0, None),
    ]
    assert fake.refreshes == [False, True, True]


async def test_pending_results_skip_parsing_and_conversion(fake: FakeBackend) -> None:
    fake.answer = lambda request: Pending(request.request_id)
    converted: list[Any] = []
    results = await run_dspy_batch(
        Judge, annotations("a", "b"), lambda pred, obj: converted.append(obj), backend=fake
    )
    assert all(is_pending(result) for result in results)
    assert converted == [] and len(fake.requests) == 2  # no parse retries either
    assert not fake.closed  # a backend passed in stays open


async def test_default_backend_comes_from_the_environment(
    mock: MockServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", mock.url)
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    monkeypatch.setenv("CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("BATCH_HEARTBEAT_S", "0")
    monkeypatch.setenv("DSPY_PARSE_RETRIES", "1")
    results = await run_dspy_batch(Judge, annotations("UNPARSEABLE"), Judge.convert_output)
    assert isinstance(results[0], MinimaLlmFailure) and results[0].attempts == 2
    assert (tmp_path / "minima_llm.db").exists()


async def test_sync_wrapper_refuses_a_running_loop() -> None:
    with pytest.raises(RuntimeError, match=r"use await run_dspy_batch"):
        run_dspy_batch_sync(Judge, [], Judge.convert_output)


def test_sync_wrapper_runs_without_a_loop() -> None:
    fake = FakeBackend(answer="[[ ## score ## ]]\n2\n\n[[ ## relevant ## ]]\nno")
    items = annotations("a")
    assert run_dspy_batch_sync(Judge, items, Judge.convert_output, dspy.Predict, fake) == items
    assert (items[0].score, items[0].relevant) == (2, False)


async def test_in_batch_mode_the_items_go_to_one_provider_job(
    backends: Backends, mock: MockServer
) -> None:
    # DSPy calls generate once per item: calls that arrive together share one job.
    batch_mode = ParasailBatchConfig(llm_batch_prefix="judge", poll_interval_s=0.01)
    items = annotations("a", "b", "c")
    results = await run_dspy_batch(
        Judge, items, Judge.convert_output, backend=backends(parasail=batch_mode)
    )
    assert results == items
    assert all(1 <= item.score <= 5 and isinstance(item.relevant, bool) for item in items)
    stats = mock.stats()
    assert stats["batch_lines"] == 3
    assert stats["by_route"].get("/v1/batches") == 1
    assert stats["by_route"].get("/v1/chat/completions", 0) == 0  # nothing sent live
