"""``run_dspy_batch``: one DSPy predictor over many pydantic objects, through the batch runner."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from typing import Any, TypeVar

from ..backend import OpenAIMinimaLlm
from ..config import BatchConfig
from ..context import reset_force_refresh, set_force_refresh
from ..progress import ProgressTarget
from ..runner import run_batched_callable
from ..types import AsyncMinimaLlmBackend, MinimaLlmFailure
from ._adapter import TolerantChatAdapter
from ._compat import AdapterParseError, ChainOfThought, context, locate
from ._inputs import input_values
from ._lm import MinimaLlmDSPyError, MinimaLlmDSPyLM
from ._pending import PendingCall, PendingResult, is_pending
from ._replay import CachedReplay, replay_plan
from ._retry import DSPyRetryConfig, reset_retry_seed, set_retry_seed

log = logging.getLogger("minima_llm.dspy")
ItemT = TypeVar("ItemT")

_ensure_signature = locate("ensure_signature", ("dspy.signatures.signature:ensure_signature",))


class _ItemRunner:
    """Predict one object, retrying unparseable answers with fresh, reproducible samples."""

    def __init__(
        self,
        predictor: Any,
        input_names: Sequence[str],
        convert_output: Callable[[Any, Any], Any],
        retry: DSPyRetryConfig,
        replay: CachedReplay | None = None,
    ) -> None:
        self.predictor = predictor
        self.input_names = tuple(input_names)
        self.convert_output = convert_output
        self.retry = retry
        self.replay = replay

    async def __call__(self, item: tuple[int, Any]) -> Any:
        index, obj = item
        try:
            prediction = await self._replay_or_predict(index, obj)
        except MinimaLlmDSPyError as exc:
            return replace(exc.failure, request_id=_item_id(index, obj))
        except PendingCall as exc:
            return exc.result  # collection pass: nothing to parse or convert yet
        except AdapterParseError as exc:
            return self._parse_failure(index, obj, exc)
        self.convert_output(prediction, obj)
        return obj

    async def _replay_or_predict(self, index: int, obj: Any) -> Any:
        first = 0
        if self.replay is not None:
            try:
                prediction = await self.replay(index)
            except AdapterParseError:
                if self.retry.parse_retries == 0:
                    raise
                # The replay was attempt 0 (its hit is counted): DSPy's path takes the retries.
                log.debug("unparseable cached answer, retry 1 of %d", self.retry.parse_retries)
                first = 1
            else:
                if prediction is not None:
                    return prediction
        return await self._predict(input_values(obj, self.input_names), first)

    async def _predict(self, inputs: dict[str, Any], first: int = 0) -> Any:
        attempts = self.retry.parse_retries + 1
        for attempt in range(first, attempts):
            sample = self.retry.sample(attempt)
            seed_token = set_retry_seed(sample.seed, sample.temperature) if sample else None
            # A seeded retry has a cache key of its own, so a rerun replays it; without
            # a seed the key may repeat an attempt that already failed: skip the read.
            refresh_token = set_force_refresh(True) if sample and sample.seed is None else None
            try:
                return await self.predictor.acall(**inputs)
            except AdapterParseError:
                if attempt == attempts - 1:
                    raise
                log.debug("unparseable answer, retry %d of %d", attempt + 1, attempts - 1)
            finally:
                if refresh_token is not None:
                    reset_force_refresh(refresh_token)
                if seed_token is not None:
                    reset_retry_seed(seed_token)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _parse_failure(self, index: int, obj: Any, exc: Any) -> MinimaLlmFailure:
        response = str(getattr(exc, "lm_response", "") or "")
        return MinimaLlmFailure(
            request_id=_item_id(index, obj),
            error_type=type(exc).__name__,
            message=str(exc).split("\n", 1)[0] or "the answer could not be parsed",
            attempts=self.retry.parse_retries + 1,
            body_snippet=response[:300],
        )


def _item_id(index: int, obj: Any) -> str:
    return str(getattr(obj, "request_id", None) or f"item-{index}")


async def run_dspy_batch(
    signature: Any,
    annotations: Sequence[ItemT],
    convert_output: Callable[[Any, ItemT], Any],
    predictor_class: Callable[[Any], Any] = ChainOfThought,
    backend: AsyncMinimaLlmBackend | None = None,
    *,
    adapter: Any = None,
    retry: DSPyRetryConfig | None = None,
    batch_config: BatchConfig | None = None,
    progress: ProgressTarget = None,
    lm_kwargs: Mapping[str, Any] | None = None,
    fast_replay: bool = True,
) -> list[ItemT | MinimaLlmFailure | PendingResult]:
    """Run ``predictor_class(signature)`` on every object; results in input order.

    Input fields are read from each object by name; ``convert_output(prediction,
    obj)`` writes the outputs back and the object takes its slot. An item whose
    answer stays unparseable after ``retry.parse_retries`` retries, or whose
    call failed, gets a ``MinimaLlmFailure``; one queued for a provider batch
    gets its ``PendingResult``. Without ``backend`` one is made from the
    environment and closed afterwards. ``adapter`` defaults to
    :class:`TolerantChatAdapter`, ``retry`` to ``DSPyRetryConfig.from_env()``.

    ``fast_replay`` (on by default) answers items whose request is already in
    the backend's cache without DSPy's call machinery: same predictions, trace,
    hit counts and retries in well under half the time. Only calls it can reproduce
    exactly qualify (plain ``dspy.Predict``/``dspy.ChainOfThought``, no demos
    or callbacks; see ``minima_llm.dspy._replay``); the rest take DSPy's path.
    Replayed items leave no entry in DSPy's LM history (``dspy.inspect_history``);
    pass ``fast_replay=False`` to keep one.
    """
    owned = backend is None
    backend = backend if backend is not None else OpenAIMinimaLlm.from_env()
    replay: CachedReplay | None = None
    try:
        signature = _ensure_signature(signature) if _ensure_signature else signature
        predictor = predictor_class(signature)
        lm = MinimaLlmDSPyLM(backend, **dict(lm_kwargs or {}))
        adapter = adapter if adapter is not None else TolerantChatAdapter()
        items = list(annotations)
        with context(lm=lm, adapter=adapter):
            plan = replay_plan(predictor, adapter, lm, backend) if fast_replay else None
            if plan is not None and isinstance(backend, OpenAIMinimaLlm):  # as the plan checked
                replay = CachedReplay(plan, lm, adapter, backend, items)
            runner = _ItemRunner(
                predictor,
                list(signature.input_fields),
                convert_output,
                retry or DSPyRetryConfig.from_env(),
                replay,
            )
            results = await run_batched_callable(
                list(enumerate(items)),
                runner,
                batch_config or _batch_config(backend),
                progress=progress,
                stats=getattr(backend, "snapshot", None),
            )
    finally:
        if replay is not None:
            replay.close()
            log.debug("%r", replay)
        if owned:
            await backend.aclose()
    # An item's own object is no placeholder; skipping it spares pydantic's slow missing-attribute path.
    pending = sum(
        1
        for obj, result in zip(items, results, strict=True)
        if result is not obj and is_pending(result)
    )
    if pending:
        log.info("%d of %d items queued for a provider batch (pending)", pending, len(results))
    return results


def run_dspy_batch_sync(*args: Any, **kwargs: Any) -> list[Any]:
    """:func:`run_dspy_batch` for code without an event loop; refuses to run inside one."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(run_dspy_batch(*args, **kwargs))
    raise RuntimeError(
        "run_dspy_batch_sync was called inside a running event loop; "
        "use await run_dspy_batch(...) instead"
    )


def _batch_config(backend: AsyncMinimaLlmBackend) -> BatchConfig:
    config = getattr(backend, "cfg", None)
    batch = getattr(config, "batch", None)
    return batch if isinstance(batch, BatchConfig) else BatchConfig.from_env()
