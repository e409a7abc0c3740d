"""The DSPy integration's public names are pinned; ``import minima_llm`` stays free of DSPy."""

from __future__ import annotations

import subprocess
import sys

import minima_llm.dspy
import minima_llm.dspy_adapter

PINNED = [
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


def test_all_is_pinned() -> None:
    assert minima_llm.dspy_adapter.__all__ == PINNED
    assert minima_llm.dspy.__all__ == PINNED
    for name in PINNED:
        assert getattr(minima_llm.dspy_adapter, name) is getattr(minima_llm.dspy, name)


def test_core_import_does_not_import_dspy() -> None:
    code = "import sys, minima_llm; print('dspy' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
