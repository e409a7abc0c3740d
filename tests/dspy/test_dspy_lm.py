"""MinimaLlmDSPyLM: real DSPy predictors against the mock server over HTTP."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any, Literal

import dspy
import pytest
from dspy_helpers import Backends, FakeBackend, backend_config

from minima_llm import (
    MinimaLlmFailure,
    MinimaLlmRequest,
    OpenAIMinimaLlm,
    get_last_cached,
    reset_force_refresh,
    set_force_refresh,
)
from minima_llm.dspy._compat import require
from minima_llm.dspy_adapter import (
    MinimaLlmDSPyLM,
    TolerantChatAdapter,
    reset_retry_seed,
    set_retry_seed,
)
from minima_llm.testing import MockServer, run_mock_server_in_thread


class Rate(dspy.Signature):
    """Rate how well the passage answers the question."""

    question: str = dspy.InputField()
    passage: str = dspy.InputField()
    score: int = dspy.OutputField(desc="0 to 5")
    relevant: bool = dspy.OutputField()
    label: Literal["good", "bad"] = dspy.OutputField()
    keywords: list[str] = dspy.OutputField()


def context(lm: MinimaLlmDSPyLM) -> Any:
    return dspy.context(lm=lm, adapter=TolerantChatAdapter())


@pytest.mark.parametrize("module", [dspy.Predict, dspy.ChainOfThought])
async def test_predictors_round_trip(
    module: type, backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    lm = MinimaLlmDSPyLM(backend)
    with context(lm):
        pred = await module(Rate).acall(question="why?", passage="because")
    assert 1 <= pred.score <= 5
    assert isinstance(pred.relevant, bool)
    assert pred.label in ("good", "bad")
    assert len(pred.keywords) == 2
    if module is dspy.ChainOfThought:
        assert pred.reasoning.startswith("mock reasoning")
    assert mock.stats()["requests"] == 1


async def test_second_run_comes_from_the_cache(backends: Backends, mock: MockServer) -> None:
    first = MinimaLlmDSPyLM(backends())
    with context(first):
        cold = [await dspy.Predict(Rate).acall(question=f"q{i}", passage="p") for i in range(3)]
    assert mock.stats()["requests"] == 3
    assert get_last_cached() is False
    again = MinimaLlmDSPyLM(backends())
    with context(again):
        warm = [await dspy.Predict(Rate).acall(question=f"q{i}", passage="p") for i in range(3)]
    assert mock.stats()["requests"] == 3
    assert get_last_cached() is True
    assert [p.toDict() for p in warm] == [p.toDict() for p in cold]
    assert all(entry["response"].cache_hit for entry in again.history)


async def test_history_and_usage_tracking_see_the_calls(backend: OpenAIMinimaLlm) -> None:
    lm = MinimaLlmDSPyLM(backend)
    with context(lm), dspy.context(track_usage=True):
        pred = await dspy.Predict(Rate).acall(question="q", passage="p")
    assert len(lm.history) == 1
    entry = lm.history[0]
    assert entry["messages"][0]["role"] == "system"
    assert entry["outputs"][0].startswith("[[ ## score ## ]]")
    assert entry["usage"]["prompt_tokens"] > 0
    assert entry["response"].usage == entry["usage"]
    usage = pred.get_lm_usage()
    assert usage["mock-model"]["completion_tokens"] == entry["usage"]["completion_tokens"]


async def test_generation_params_reach_the_request_and_the_cache_key(
    backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    lm = MinimaLlmDSPyLM(backend, temperature=0.0, max_tokens=500)
    predict = dspy.Predict(Rate)
    with context(lm):
        await predict.acall(question="q", passage="p")
        await predict.acall(question="q", passage="p", config={"temperature": 0.7})
        await predict.acall(question="q", passage="p", config={"stop": ["\n\n\n"], "top_p": 0.5})
        await predict.acall(question="q", passage="p", config={"temperature": 0.7})
    assert mock.stats()["requests"] == 3  # the repeat of the second call is a cache hit


async def test_params_are_sorted_into_fields_and_extra(fake: FakeBackend) -> None:
    fake.answer = "x"
    lm = MinimaLlmDSPyLM(fake, temperature=0.2, max_tokens=64)
    schema = {"type": "json_object"}
    outputs = await lm.acall(
        messages=[{"role": "user", "content": "hi"}],
        n=2,
        stop=["END"],
        response_format=schema,
        cache=True,
        num_retries=9,
        rollout_id=4,
        top_p=None,
    )
    assert outputs == ["x"]
    request = fake.requests[0]
    assert (request.temperature, request.max_tokens) == (0.2, 64)
    assert request.extra == {"n": 2, "stop": ["END"], "response_format": schema}
    await lm.acall("plain prompt")
    assert fake.requests[1].messages == [{"role": "user", "content": "plain prompt"}]
    assert fake.requests[1].extra is None


async def test_a_copy_with_another_model_asks_that_model(fake: FakeBackend) -> None:
    fake.answer = "x"
    lm = MinimaLlmDSPyLM(fake, model="m1")
    other = lm.copy(model="m2")
    await other.acall("which model?")
    await lm.acall("which model?")
    assert [r.model for r in fake.requests] == ["m2", "m1"]
    default = MinimaLlmDSPyLM(fake)  # the backend's own model, sent as None
    await default.acall("and now?")
    await default.copy(model="m3").acall("and now?")
    assert [r.model for r in fake.requests[2:]] == [None, "m3"]


def test_dspy_lm_switches_get_a_clear_answer(fake: FakeBackend) -> None:
    # Moved over from dspy.LM(..., cache=False), they failed with "got multiple values".
    with pytest.raises(ValueError, match="force_refresh"):
        MinimaLlmDSPyLM(fake, cache=False)
    assert MinimaLlmDSPyLM(fake, model_type="chat").model_type == "chat"
    with pytest.raises(ValueError, match="chat completions only"):
        MinimaLlmDSPyLM(fake, model_type="text")


async def test_retry_seed_and_force_refresh_come_from_context(fake: FakeBackend) -> None:
    lm = MinimaLlmDSPyLM(fake, temperature=0.0)
    seed = set_retry_seed(3, temperature=0.25)
    refresh = set_force_refresh(True)
    try:
        await lm.acall("hi")
    finally:
        reset_force_refresh(refresh)
        reset_retry_seed(seed)
    await lm.acall("hi")
    first, second = fake.requests
    assert (first.temperature, first.extra) == (0.25, {"seed": 3})
    assert (second.temperature, second.extra) == (0.0, None)
    assert fake.refreshes == [True, False]


async def test_rollout_id_joins_the_cache_key_but_is_not_sent(
    backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    lm = MinimaLlmDSPyLM(backend, temperature=1.0)
    for rollout in (1, 2, 1):
        await lm.acall("hello", rollout_id=rollout)
    assert mock.stats()["requests"] == 2  # rollouts 1 and 2; the second 1 is a cache hit


async def test_a_failure_becomes_an_exception_with_its_details(
    backend: OpenAIMinimaLlm, mock: MockServer
) -> None:
    mock.fail_next(1, status=400, body={"error": {"message": "bad request"}})
    lm = MinimaLlmDSPyLM(backend)
    with context(lm), pytest.raises(dspy.LMError) as caught:
        await dspy.Predict(Rate).acall(question="q", passage="p")
    failure = caught.value.failure
    assert isinstance(failure, MinimaLlmFailure)
    assert failure.status == 400
    assert "status=400" in str(caught.value)
    assert caught.value.status == 400


async def test_sync_call_inside_a_running_loop_is_refused(fake: FakeBackend) -> None:
    lm = MinimaLlmDSPyLM(fake)
    with pytest.raises(RuntimeError, match="called synchronously inside a running event loop"):
        lm("hi")
    with context(lm), pytest.raises(RuntimeError, match=r"await predictor\.acall"):
        dspy.Predict(Rate)(question="q", passage="p")
    assert fake.requests == []


def test_sync_calls_and_configure_work_without_a_loop(tmp_path: Path) -> None:
    with run_mock_server_in_thread() as mock:
        backend = OpenAIMinimaLlm(backend_config(mock.url, tmp_path))
        lm = MinimaLlmDSPyLM(backend)
        dspy.configure(lm=lm, adapter=TolerantChatAdapter())
        try:
            predict = dspy.ChainOfThought(Rate)
            sync = predict(question="q", passage="p")
            again = asyncio.run(predict.acall(question="q", passage="p"))
            assert lm.forward("raw").choices[0]["message"]["content"].startswith("mock reply")
        finally:
            dspy.configure(lm=None, adapter=None)
            asyncio.run(backend.aclose())
        assert sync.toDict() == again.toDict()
        assert mock.stats()["requests"] == 2


def test_a_missing_dspy_name_is_reported_with_the_version() -> None:
    with pytest.raises(ImportError, match=r"Could not locate DSPy BaseLM \(dspy 3\."):
        require("BaseLM", ("no_such_module:BaseLM", "dspy:NoSuchName"))


async def test_the_lm_is_a_dspy_base_lm(fake: FakeBackend) -> None:
    lm = MinimaLlmDSPyLM(fake, model="judge")
    assert isinstance(lm, dspy.BaseLM)
    assert lm.model == "judge"
    await lm.acall("hi")
    assert fake.requests[0].model == "judge"
    assert "judge" in repr(lm)
    assert MinimaLlmDSPyLM(fake).model == "minima-llm"


async def test_a_request_carries_the_backend_model(backend: OpenAIMinimaLlm) -> None:
    lm = MinimaLlmDSPyLM(backend)
    assert lm.model == "mock-model"
    assert await lm.acall("hi") and lm.history[-1]["response"].response.model == "mock-model"
    response = await lm.aforward(messages=[{"role": "user", "content": "ECHO:hi"}])
    assert response.choices[0]["message"]["content"] == "hi"
    assert response.model == "mock-model"
    assert isinstance(response.response.request_id, str)
    assert MinimaLlmRequest  # the request type is public


class CountingCallback(dspy.utils.BaseCallback):
    def __init__(self) -> None:
        self.starts: list[dict[str, Any]] = []
        self.ends: list[Any] = []

    def on_lm_start(self, call_id: str, instance: Any, inputs: dict[str, Any]) -> None:
        self.starts.append(inputs)

    def on_lm_end(self, call_id: str, outputs: Any, exception: Exception | None = None) -> None:
        self.ends.append(outputs)


async def test_dspy_callbacks_see_each_call_once(fake: FakeBackend) -> None:
    callback = CountingCallback()
    lm = MinimaLlmDSPyLM(fake, callbacks=[callback])
    outputs = await lm.acall(messages=[{"role": "user", "content": "hi"}])
    assert len(callback.starts) == 1 and callback.ends == [outputs]
