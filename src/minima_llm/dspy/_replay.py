"""Cached replay without DSPy's call machinery, for the items of a batch the cache already holds.

On a cached answer, a ``dspy.Predict`` call spends most of its time in DSPy's
plumbing (callbacks, settings contexts, capability planning, input checks,
history), not in formatting or parsing. For a predictor whose call can be
reproduced exactly, ``run_dspy_batch`` takes the steps that decide the answer
itself: the adapter formats the prompt, the LM builds its request, and when the
backend's primary cache holds that request the backend answers it (counting and
tracing the hit as ``generate`` always does; the item's ``get_last_cached()`` is
set as the LM sets it). The answer then goes through DSPy's own pieces: the
LM's ``_process_completion``, the adapter's ``parse`` (filled in as
``_call_postprocess`` fills it; anything but plain text goes through
``_call_postprocess`` itself) and the predictor's ``_forward_postprocess``,
which builds the ``Prediction`` and records it in ``dspy.settings.trace``.

Everything else takes DSPy's own path: a miss, an unparseable answer (its
retries follow as usual), force refresh, a predictor other than a plain
``dspy.Predict`` or ``dspy.ChainOfThought``, demos, callbacks, usage tracking,
streaming, an adapter with a JSON fallback or native function calling, custom
DSPy field types, inputs DSPy would warn about, and ``n``, ``rollout_id`` or
tools in the LM kwargs. Not reproduced, by design: DSPy's LM history
(``dspy.inspect_history()``) has no entry for a replayed item, and neither has
the history of the predictor module, which ``run_dspy_batch`` never hands out;
``fast_replay=False`` keeps both.

The cache is probed a window of items at a time with the backend's
``lookup_many`` (one read per window; hits answered and counted as ``generate``
would, misses left untouched). Windows grow while they find answers; while they
come back empty the probing backs off, so a cold batch probes only a logarithmic
number of small windows.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, get_args

from ..backend import OpenAIMinimaLlm
from ..context import get_force_refresh
from ..types import MinimaLlmRequest
from ._compat import (
    ChainOfThought,
    ChatAdapter,
    DSPyType,
    Predict,
    input_type_fits,
    settings,
)
from ._inputs import input_values

log = logging.getLogger("minima_llm.dspy")

MIN_WINDOW = 64
MAX_WINDOW = 512
# LM kwargs handled in the code the replay skips: several samples, rollouts, tools.
_UNREPLAYABLE_KWARGS = (
    "n",
    "num_generations",
    "rollout_id",
    "tools",
    "tool_choice",
    "parallel_tool_calls",
    "force_refresh",
)
# Adapter steps the replay stands in for; an override of either could do anything.
_ADAPTER_STEPS = ("acall", "_call_preprocess")
# Call arguments dspy.Predict takes for itself: an input field so named never reaches the prompt.
_PREDICT_ARGUMENTS = frozenset({"signature", "demos", "config", "lm", "prediction", "_trace"})


@dataclass(frozen=True, slots=True)
class ReplayPlan:
    """How to stand in for a predictor: the ``Predict`` that calls the LM, and its LM kwargs."""

    predict: Any
    lm_kwargs: Mapping[str, Any]
    warn_on_type_mismatch: bool

    @property
    def signature(self) -> Any:
        """The signature the LM call is formatted and parsed with."""
        return self.predict.signature


def replay_plan(predictor: Any, adapter: Any, lm: Any, backend: Any) -> ReplayPlan | None:
    """The plan for ``predictor`` in the current DSPy context, or None where a replay would not be exact."""
    predict = _inner_predict(predictor)
    if predict is None:
        reason: str | None = (
            f"{type(predictor).__name__} is not dspy.Predict or dspy.ChainOfThought"
        )
    else:
        reason = next(_obstacles(predict, adapter, lm, backend), None)
    if reason is not None:
        log.debug("cached replay fast path off: %s", reason)
        return None
    current = settings()
    kwargs = dict(predict.config)
    return ReplayPlan(predict, kwargs, bool(getattr(current, "warn_on_type_mismatch", True)))


def _inner_predict(predictor: Any) -> Any:
    # Exact types only: a subclass may change forward/aforward in ways we cannot see.
    if type(predictor) is Predict:
        return predictor
    if type(predictor) is ChainOfThought and not predictor.callbacks:
        inner = getattr(predictor, "predict", None)
        return inner if type(inner) is Predict else None
    return None


def _obstacles(predict: Any, adapter: Any, lm: Any, backend: Any) -> Iterator[str]:
    """Why a replay of ``predict``'s call would not be exact, most basic reason first."""
    yield from _backend_obstacles(backend)
    yield from _context_obstacles(adapter, lm)
    yield from _adapter_obstacles(adapter)
    yield from _call_obstacles(predict, adapter, lm)


def _backend_obstacles(backend: Any) -> Iterator[str]:
    if not isinstance(backend, OpenAIMinimaLlm) or backend.cache.primary is None:
        yield "the backend has no primary cache to probe"
    elif backend.cfg.force_refresh or get_force_refresh():
        yield "force refresh is on"


def _context_obstacles(adapter: Any, lm: Any) -> Iterator[str]:
    current = settings()
    if current.lm is not lm or current.adapter is not adapter:
        yield "the DSPy context has another LM or adapter"
    if any(getattr(owner, "callbacks", None) for owner in (current, lm, adapter)):
        yield "DSPy callbacks are configured"
    watched = (getattr(current, name, None) for name in ("usage_tracker", "send_stream"))
    if getattr(current, "track_usage", False) or any(w is not None for w in watched):
        yield "DSPy tracks usage or streams"


def _adapter_obstacles(adapter: Any) -> Iterator[str]:
    if not isinstance(adapter, ChatAdapter) or any(
        getattr(type(adapter), step, None) is not getattr(ChatAdapter, step, None)
        for step in _ADAPTER_STEPS
    ):
        yield "the adapter is not a ChatAdapter with DSPy's own call steps"
    elif getattr(adapter, "use_json_adapter_fallback", True) or getattr(
        adapter, "use_native_function_calling", True
    ):
        yield "the adapter falls back to JSON or calls functions natively"


def _call_obstacles(predict: Any, adapter: Any, lm: Any) -> Iterator[str]:
    if (
        predict.demos
        or predict.lm is not None
        or predict.callbacks
        or getattr(predict, "fields", None)
    ):
        yield "the predictor has demos, its own LM, callbacks or decision criteria"
    steps = (
        (adapter, "_call_postprocess"),
        (lm, "_process_completion"),
        (predict, "_forward_postprocess"),
    )
    if not all(hasattr(owner, step) for owner, step in steps):
        yield "this DSPy lacks the answer-shaping steps the replay reuses"
    signature = predict.signature
    if any(_custom_type(info.annotation) for info in signature.output_fields.values()):
        yield "an output field has a custom DSPy type"
    if _PREDICT_ARGUMENTS.intersection(signature.input_fields):
        yield "an input field is named like one of dspy.Predict's own arguments"
    kwargs = {**lm.kwargs, **predict.config}
    if any(kwargs.get(name) is not None for name in _UNREPLAYABLE_KWARGS):
        yield "the LM kwargs ask for several samples, a rollout or tools"


def _custom_type(annotation: Any) -> bool:
    """Whether ``annotation`` is or contains a DSPy ``Type`` (tool calls, citations, reasoning, ...)."""
    if DSPyType is None:
        return False
    try:
        if isinstance(annotation, type) and issubclass(annotation, DSPyType):
            return True
    except TypeError:
        pass  # a generic alias posing as a class: its arguments are checked below
    return any(_custom_type(arg) for arg in get_args(annotation))


def _unwrapped(method: Any) -> Any:
    return getattr(method, "__wrapped__", method)


def _fallback(info: Any) -> Any:
    return None if info.is_required() else info.get_default(call_default_factory=True)


def _isinstance_fits(value: Any, annotation: Any) -> bool:
    return isinstance(annotation, type) and isinstance(value, annotation)


@dataclass(slots=True)
class _Hit:
    inputs: dict[str, Any]
    request: MinimaLlmRequest
    result: Any = None


class CachedReplay:
    """Predicts the batch's cached items the way DSPy would, without DSPy's call wrappers."""

    def __init__(
        self,
        plan: ReplayPlan,
        lm: Any,
        adapter: Any,
        backend: OpenAIMinimaLlm,
        items: Sequence[Any],
    ) -> None:
        self.plan = plan
        self.lm = lm
        self.adapter = adapter
        self.backend = backend
        self.items = items
        self.replayed = 0
        self.probed = 0
        self._inputs = {name: info.annotation for name, info in plan.signature.input_fields.items()}
        self._outputs = tuple(plan.signature.output_fields.items())
        self._fits = input_type_fits or _isinstance_fits
        self._merged_kwargs = {**lm.kwargs, **plan.lm_kwargs}
        # The plan rules out callbacks, so DSPy's callback wrappers would only pass the call on.
        self._format = _unwrapped(type(adapter).format)
        self._parse = _unwrapped(type(adapter).parse)
        self._starts: list[int] = []  # first item of each window, ascending
        self._probes: list[asyncio.Future[dict[int, _Hit]]] = []
        self._next = 0  # first item no window covers yet
        self._size = MIN_WINDOW
        self._skip = 0  # items the next window leaves to DSPy unprobed
        self._empty_in_a_row = 0

    async def __call__(self, index: int) -> Any | None:
        """Item ``index``'s prediction from the cache, or None when DSPy must make the call.

        The item's inputs are read when its window is probed, shortly before its turn.

        Raises what DSPy's call would: ``AdapterParseError`` for an answer that
        cannot be parsed, ``MinimaLlmDSPyError`` or ``PendingCall`` from the LM.
        The backend answered the hit when its window was probed (and counted it
        then); the item's ``get_last_cached()`` is set here, as the LM would.
        """
        if get_force_refresh():
            return None
        hit = await self._hit(index)
        if hit is None:
            return None
        lm, signature = self.lm, self.plan.signature
        completion = lm.completion_of(hit.result)
        # DSPy's own shaping of the answer into outputs, without the history entry.
        outputs = lm._process_completion(completion, self._merged_kwargs)
        if all(type(output) is str and output for output in outputs):
            # What DSPy's _call_postprocess does with plain answers, minus its per-call field scans.
            parse = self._parse
            values = [self._filled(parse(self.adapter, signature, output)) for output in outputs]
        else:
            kwargs = dict(self.plan.lm_kwargs)
            values = self.adapter._call_postprocess(signature, signature, outputs, lm, kwargs)
        self.replayed += 1
        # DSPy's own last step: the Prediction, and its entry in dspy.settings.trace.
        return self.plan.predict._forward_postprocess(values, signature, **hit.inputs)

    def _filled(self, parsed: Mapping[str, Any]) -> dict[str, Any]:
        """Every output field in signature order: parsed, else its default, else None (as DSPy fills them)."""
        return {
            name: parsed[name] if name in parsed else _fallback(info)
            for name, info in self._outputs
        }

    async def _hit(self, index: int) -> _Hit | None:
        if index >= self._next:
            self._open(index)
        probe = self._probes[bisect.bisect_right(self._starts, index) - 1]
        # Shielded: a worker cancelled while waiting must not cancel its window's probe.
        hits = probe.result() if probe.done() else await asyncio.shield(probe)
        return hits.pop(index, None)

    def _open(self, start: int) -> None:
        """The window of items from ``start``: probed, or left to DSPy while the cache has been cold."""
        probe: asyncio.Future[dict[int, _Hit]]
        if self._skip:
            size, self._skip = self._skip, 0
            probe = asyncio.get_running_loop().create_future()
            probe.set_result({})
        else:
            size = self._size
            probe = asyncio.ensure_future(self._probe(start, min(start + size, len(self.items))))
        self._starts.append(start)
        self._probes.append(probe)
        self._next = start + size

    async def _probe(self, start: int, stop: int) -> dict[int, _Hit]:
        self.probed += 1
        found: dict[int, _Hit] = {}
        for index in range(start, stop):
            prepared = self._prepare(index)
            if prepared is not None:
                found[index] = prepared
        answers = await self._lookup([hit.request for hit in found.values()])
        hits: dict[int, _Hit] = {}
        for (index, hit), answer in zip(found.items(), answers, strict=True):
            if answer is not None:
                hit.result = answer
                hits[index] = hit
        self._learn(bool(hits))
        return hits

    async def _lookup(self, requests: list[MinimaLlmRequest]) -> list[Any]:
        """The backend's cached answers, each hit counted and traced as ``generate`` does."""
        if not requests:
            return []
        try:
            return await self.backend.lookup_many(requests)
        except Exception as exc:
            log.warning("cache lookup failed, these items take DSPy's path: %s", exc)
            return [None] * len(requests)

    def _prepare(self, index: int) -> _Hit | None:
        """Item ``index``'s request and cache key, as DSPy's call would build them."""
        inputs = input_values(self.items[index], tuple(self._inputs))
        if not self._takes(inputs):
            return None
        try:
            messages = self._format(self.adapter, self.plan.signature, [], inputs)
            request, _ = self.lm.request_for(None, messages, self.plan.lm_kwargs)
        except Exception as exc:
            # DSPy's own call will meet the same problem and report it for this item.
            log.debug("item %d left to DSPy, its prompt could not be built: %s", index, exc)
            return None
        return _Hit(inputs, request)

    def _takes(self, inputs: Mapping[str, Any]) -> bool:
        """Whether DSPy would take ``inputs`` as they are: all present, none it would warn about."""
        if len(inputs) != len(self._inputs):
            return False
        if not self.plan.warn_on_type_mismatch:
            return True
        annotations, fits = self._inputs, self._fits
        return all(
            v is None or type(v) is annotations[k] or fits(v, annotations[k])
            for k, v in inputs.items()
        )

    def _learn(self, hit: bool) -> None:
        # Each batch read and the runner behind it cost the same for 64 items or 512,
        # so windows grow while they find answers. A window without any answer points
        # at a cold cache: after k of them in a row, the next 2**k - 1 minimum windows'
        # worth of items go straight to DSPy, so a cold batch probes only O(log n) windows.
        if hit:
            self._empty_in_a_row = 0
            self._size = min(self._size * 2, MAX_WINDOW)
            return
        self._empty_in_a_row += 1
        self._size = MIN_WINDOW
        self._skip = MIN_WINDOW * (2**self._empty_in_a_row - 1)

    def close(self) -> None:
        """Cancel probes nobody waits for any more (a batch that stopped early)."""
        for probe in self._probes:
            probe.cancel()

    def __repr__(self) -> str:
        return (
            f"<CachedReplay replayed={self.replayed} of {len(self.items)}"
            f" windows probed={self.probed} of {len(self._probes)}>"
        )
