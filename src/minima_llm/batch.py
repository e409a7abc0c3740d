"""The batch runner and batch-job management, where the reference documents place them.

Reference 000 and 001 show ``minima_llm/batch.py`` in their module map, so
programs may import these names from here; they live in :mod:`minima_llm.runner`
and :mod:`minima_llm.jobs`.
"""

from .config import BatchConfig, ParasailBatchConfig
from .jobs import (
    BatchApiError,
    batch_status_overview,
    cancel_all_batches,
    cancel_all_local_batches,
    cancel_batch,
)
from .runner import run_batched_callable

__all__ = [
    "BatchApiError",
    "BatchConfig",
    "ParasailBatchConfig",
    "batch_status_overview",
    "cancel_all_batches",
    "cancel_all_local_batches",
    "cancel_batch",
    "run_batched_callable",
]
