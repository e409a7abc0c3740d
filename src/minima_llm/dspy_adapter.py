"""The DSPy integration under its documented name: ``from minima_llm.dspy_adapter import ...``.

Everything lives in :mod:`minima_llm.dspy`; see its docstring for retries and the
provider-batch seam.
"""

from .dspy import (
    ChatCompletion,
    DSPyRetryConfig,
    MinimaLlmDSPyError,
    MinimaLlmDSPyLM,
    Pending,
    PendingCall,
    PendingResult,
    RetrySample,
    TolerantChatAdapter,
    get_retry_sample,
    is_pending,
    reset_retry_seed,
    retry_temperature,
    run_dspy_batch,
    run_dspy_batch_sync,
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
