"""DSPy integration: an LM backed by minima-llm, a tolerant ChatAdapter, and batch helpers.

Needs the ``dspy`` extra (``pip install 'minima-llm[dspy]'``); ``import minima_llm``
never imports DSPy. The public names are re-exported by ``minima_llm.dspy_adapter``.

Retries of unparseable answers (``run_dspy_batch``) re-sample reproducibly: retry
``n`` sends seed ``n`` and temperature ``retry_temperature(n)``, so each retry
has its own cache key and a rerun replays every attempt from the cache.

Cached replay: ``run_dspy_batch`` answers items already in the backend's cache
without DSPy's call machinery when it can reproduce the call exactly (see
``_replay``); ``fast_replay=False`` turns that off.

Provider-batch seam: a backend in collection mode may return, instead of a
response, any object with ``pending = True`` (see :class:`PendingResult`). The
LM raises :class:`PendingCall` for it, which unwinds DSPy before any parsing,
and ``run_dspy_batch`` puts the placeholder in that item's slot without calling
``convert_output``. A second pass, once the provider job is done and its answers
are in the cache, runs the same batch and gets real results.
"""

from ._adapter import TolerantChatAdapter
from ._batch import run_dspy_batch, run_dspy_batch_sync
from ._lm import ChatCompletion, MinimaLlmDSPyError, MinimaLlmDSPyLM
from ._pending import Pending, PendingCall, PendingResult, is_pending
from ._retry import (
    DSPyRetryConfig,
    RetrySample,
    get_retry_sample,
    reset_retry_seed,
    retry_temperature,
    set_retry_seed,
)

__all__ = [
    "ChatCompletion",
    "DSPyRetryConfig",
    "MinimaLlmDSPyError",
    "MinimaLlmDSPyLM",
    "Pending",
    "PendingCall",
    "PendingResult",
    "RetrySample",
    "TolerantChatAdapter",
    "get_retry_sample",
    "is_pending",
    "reset_retry_seed",
    "retry_temperature",
    "run_dspy_batch",
    "run_dspy_batch_sync",
    "set_retry_seed",
]
