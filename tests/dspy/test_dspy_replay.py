"""The cached-replay fast path of run_dspy_batch: same answers as DSPy's path, none of its calls."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from pathlib import Path
from typing import Any

import dspy
import pytest
from dspy.clients.base_lm import GLOBAL_HISTORY
from dspy.utils.usage_tracker import track_usage
from dspy_helpers import Backends, FakeBackend
from pydantic import BaseModel

from minima_llm import MinimaLlmFailure, MinimaLlmResponse, OpenAIMinimaLlm, get_last_cached
from minima_llm.dspy._replay import CachedReplay, replay_plan
from minima_llm.dspy_adapter import (
    DSPyRetryConfig,
    MinimaLlmDSPyLM,
    TolerantChatAdapter,
    run_dspy_batch,
)
from minima_llm.testing import MockServer

NO_RETRY = DSPyRetryConfig(parse_retries=0)


class Judge(dspy.Signature):
    """Judge whether the passage answers the question."""

    question: str = dspy.InputField()
    passage: str = dspy.InputField()
    score: int = dspy.OutputField()
    relevant: bool = dspy.OutputField()


class Annotation(BaseModel):
    question: str
    passage: str
    score: int | None = None
    relevant: bool | None = None


def annotations(*questions: str) -> list[Annotation]:
    return [Annotation(question=q, passage=f"passage for {q}") for q in questions]


class Run:
    """One batch: the predictions it made, and whether each came from the cache."""

    def __init__(self) -> None:
        self.predictions: list[dict[str, Any]] = []
        self.cached: list[bool] = []

    def convert(self, prediction: Any, obj: Annotation) -> None:
        completions = prediction.completions
        self.predictions.append(
            {
                "fields": prediction.toDict(),
                "completions": {name: list(values) for name, values in completions.items()},
                "type": type(prediction),
            }
        )
        self.cached.append(get_last_cached())
        obj.score = prediction.score
        obj.relevant = prediction.relevant


async def replay(
    backend: OpenAIMinimaLlm,
    questions: tuple[str, ...],
    predictor: Callable[[Any], Any] = dspy.Predict,
    **kwargs: Any,
) -> tuple[Run, list[Any]]:
    run = Run()
    results = await run_dspy_batch(
        Judge, annotations(*questions), run.convert, predictor, backend, **kwargs
    )
    return run, results


def replayed(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.getMessage().startswith("<CachedReplay")]


def traced(trace: list[Any]) -> list[Any]:
    """What DSPy's trace says about each call: which predictor, its inputs, its outputs."""
    return sorted(
        (type(predictor).__name__, sorted(inputs.items()), sorted(prediction.toDict().items()))
        for predictor, inputs, prediction in trace
    )


def dump(results: list[Any]) -> list[Any]:
    return [
        r.model_dump()
        if isinstance(r, BaseModel)
        else (r.request_id, r.error_type, r.message, r.attempts, r.body_snippet)
        for r in results
    ]


QUESTIONS = ("what is one", "what is two", "what is three")


@pytest.fixture
def debug_log(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.DEBUG, logger="minima_llm.dspy")
    return caplog


@pytest.mark.parametrize("predictor", [dspy.Predict, dspy.ChainOfThought])
async def test_a_replay_predicts_what_dspys_path_predicts(
    backends: Backends, mock: MockServer, debug_log: pytest.LogCaptureFixture, predictor: Any
) -> None:
    await replay(backends(), QUESTIONS, predictor, retry=NO_RETRY)
    assert mock.stats()["requests"] == len(QUESTIONS)
    with dspy.context(trace=[]):
        slow, slow_results = await replay(backends(), QUESTIONS, predictor, fast_replay=False)
        slow_trace = traced(dspy.settings.trace)
    fast_backend = backends()
    with dspy.context(trace=[]):
        fast, fast_results = await replay(fast_backend, QUESTIONS, predictor)
        fast_trace = traced(dspy.settings.trace)
    assert fast.predictions == slow.predictions
    assert dump(fast_results) == dump(slow_results)
    assert fast_trace == slow_trace and len(fast_trace) == len(QUESTIONS)
    if predictor is dspy.ChainOfThought:
        assert all(p["fields"]["reasoning"] for p in fast.predictions)
    assert replayed(debug_log)[-1].startswith(f"<CachedReplay replayed=3 of {len(QUESTIONS)}")
    assert mock.stats()["requests"] == len(QUESTIONS)  # no upstream call on either replay
    stats = fast_backend.snapshot()
    assert (stats.requests, stats.live_calls, stats.cache_hits) == (3, 0, {"primary": 3})
    assert fast.cached == slow.cached == [True, True, True]


async def test_misses_take_dspys_path(
    backends: Backends, mock: MockServer, debug_log: pytest.LogCaptureFixture
) -> None:
    await replay(backends(), QUESTIONS[:2], retry=NO_RETRY)
    backend = backends()
    run, results = await replay(backend, QUESTIONS)
    assert replayed(debug_log)[-1].startswith("<CachedReplay replayed=2 of 3")
    assert mock.stats()["requests"] == 3  # the new item alone went upstream
    assert backend.snapshot().live_calls == 1
    assert run.cached == [True, True, False]
    fresh, fresh_results = await replay(backends(cache_dir=None), QUESTIONS, fast_replay=False)
    assert run.predictions == fresh.predictions
    assert dump(results) == dump(fresh_results)


async def test_switched_off_every_item_takes_dspys_path(
    backends: Backends, mock: MockServer, debug_log: pytest.LogCaptureFixture
) -> None:
    await replay(backends(), QUESTIONS, retry=NO_RETRY)
    debug_log.clear()
    before = len(GLOBAL_HISTORY)
    run, _ = await replay(backends(), QUESTIONS, fast_replay=False)
    assert len(GLOBAL_HISTORY) == before + len(QUESTIONS)  # DSPy's path keeps its LM history
    assert replayed(debug_log) == []
    assert run.cached == [True, True, True] and mock.stats()["requests"] == len(QUESTIONS)


async def test_an_unparseable_cached_answer_is_retried_like_dspys_path(
    tmp_path: Path, mock: MockServer
) -> None:
    outcomes = []
    for fast in (True, False):
        made = Backends(mock.url, tmp_path / f"cache-{fast}")
        mock.reset()
        await replay(made(), ("FLAKY-1 x", "fine"), retry=NO_RETRY)  # caches a bad answer
        backend = made()
        run, results = await replay(backend, ("FLAKY-1 x", "fine"), fast_replay=fast)
        stats = backend.snapshot()
        outcomes.append(
            (run.predictions, dump(results), mock.stats()["requests"], stats.cache_hits)
        )
        await made.aclose()
    assert outcomes[0] == outcomes[1]
    assert outcomes[0][2] == 2 + 1  # the cold run, then one fresh sample for the bad answer


@pytest.mark.parametrize(
    "retry",
    [NO_RETRY, DSPyRetryConfig(parse_retries=1, retry_seed=False, retry_temperature_max=0.0)],
)
async def test_an_unparseable_cached_answer_fails_like_dspys_path(
    tmp_path: Path, mock: MockServer, retry: DSPyRetryConfig
) -> None:
    outcomes = []
    for fast in (True, False):
        made = Backends(mock.url, tmp_path / f"cache-{fast}")
        mock.reset()
        await replay(made(), ("UNPARSEABLE x",), retry=NO_RETRY)
        backend = made()
        _, results = await replay(backend, ("UNPARSEABLE x",), retry=retry, fast_replay=fast)
        assert isinstance(results[0], MinimaLlmFailure)
        outcomes.append((dump(results), mock.stats()["requests"], backend.snapshot().cache_hits))
        await made.aclose()
    assert outcomes[0] == outcomes[1]
    # The unseeded retry repeats the request, so it skips the cache read and goes upstream.
    assert outcomes[0][1] == 1 + retry.parse_retries


class Reasoned(dspy.Signature):
    question: str = dspy.InputField()
    answer: dspy.Reasoning = dspy.OutputField()


class Configured(dspy.Signature):
    config: str = dspy.InputField()  # dspy.Predict takes config= for itself
    answer: str = dspy.OutputField()


def _with_callback(signature: Any) -> Any:
    return dspy.Predict(signature, callbacks=[dspy.utils.callback.BaseCallback()])


def _with_demos(signature: Any) -> Any:
    predictor = dspy.Predict(signature)
    predictor.demos = [{"question": "q", "passage": "p", "score": 1, "relevant": True}]
    return predictor


class Custom(dspy.Predict):
    pass


PLANS: list[tuple[str, Callable[[Any], Any], Any, dict[str, Any], bool]] = [
    ("Predict", dspy.Predict, TolerantChatAdapter(), {}, True),
    ("ChainOfThought", dspy.ChainOfThought, TolerantChatAdapter(), {}, True),
    ("configured Predict", functools.partial(dspy.Predict, temperature=0.3), None, {}, True),
    ("a Predict subclass", Custom, TolerantChatAdapter(), {}, False),
    ("demos", _with_demos, TolerantChatAdapter(), {}, False),
    ("callbacks", _with_callback, TolerantChatAdapter(), {}, False),
    ("JSON fallback", dspy.Predict, dspy.ChatAdapter(), {}, False),
    ("JSONAdapter", dspy.Predict, dspy.JSONAdapter(), {}, False),
    ("several samples", dspy.Predict, TolerantChatAdapter(), {"n": 2}, False),
    ("a rollout", dspy.Predict, TolerantChatAdapter(), {"rollout_id": 1}, False),
]


@pytest.mark.parametrize(("why", "make", "adapter", "lm_kwargs", "planned"), PLANS)
async def test_only_calls_it_can_reproduce_are_replayed(
    backend: OpenAIMinimaLlm,
    why: str,
    make: Callable[[Any], Any],
    adapter: Any,
    lm_kwargs: dict[str, Any],
    planned: bool,
) -> None:
    adapter = adapter if adapter is not None else TolerantChatAdapter()
    lm = MinimaLlmDSPyLM(backend, **lm_kwargs)
    with dspy.context(lm=lm, adapter=adapter):
        assert (replay_plan(make(Judge), adapter, lm, backend) is not None) is planned, why


async def test_custom_types_tracking_and_other_backends_are_not_replayed(
    backends: Backends, fake: FakeBackend
) -> None:
    adapter = TolerantChatAdapter()
    backend = backends()
    lm = MinimaLlmDSPyLM(backend)
    with dspy.context(lm=lm, adapter=adapter):
        assert replay_plan(dspy.Predict(Reasoned), adapter, lm, backend) is None
        assert replay_plan(dspy.Predict(Configured), adapter, lm, backend) is None
        with dspy.context(track_usage=True):
            assert replay_plan(dspy.Predict(Judge), adapter, lm, backend) is None
        with track_usage():
            assert replay_plan(dspy.Predict(Judge), adapter, lm, backend) is None
        refreshing = backends(force_refresh=True)
        assert replay_plan(dspy.Predict(Judge), adapter, lm, refreshing) is None
        assert replay_plan(dspy.Predict(Judge), adapter, lm, backends(cache_dir=None)) is None
    fake_lm = MinimaLlmDSPyLM(fake)
    with dspy.context(lm=fake_lm, adapter=adapter):
        assert replay_plan(dspy.Predict(Judge), adapter, fake_lm, fake) is None


async def test_probing_answers_hits_as_generate_does(backends: Backends, mock: MockServer) -> None:
    await replay(backends(), QUESTIONS, retry=NO_RETRY)
    backend = backends()
    adapter, lm = TolerantChatAdapter(), MinimaLlmDSPyLM(backend)
    with dspy.context(lm=lm, adapter=adapter):
        plan = replay_plan(dspy.Predict(Judge), adapter, lm, backend)
        assert plan is not None
        cached = CachedReplay(plan, lm, adapter, backend, annotations(*QUESTIONS))
        probed = await cached._probe(0, len(QUESTIONS))
        through_generate = [await backend.generate(hit.request) for hit in probed.values()]
    assert sorted(probed) == list(range(len(QUESTIONS)))
    assert [(h.result.text, h.result.cached) for h in probed.values()] == [
        (r.text, r.cached) for r in through_generate if isinstance(r, MinimaLlmResponse)
    ]
    assert backend.snapshot().cache_hits == {"primary": 2 * len(QUESTIONS)}
    assert mock.stats()["requests"] == len(QUESTIONS)
