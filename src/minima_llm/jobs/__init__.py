"""Provider batch jobs (OpenAI / Parasail batch API): batch mode, state files, management."""

from .api import BatchApi, BatchApiError
from .manage import (
    batch_status_overview,
    cancel_all_batches,
    cancel_all_local_batches,
    cancel_batch,
)
from .provider import BATCHABLE, MAX_LINES, JobCollector, LineFailure, ProviderJobs
from .state import JobState

__all__ = [
    "BATCHABLE",
    "MAX_LINES",
    "BatchApi",
    "BatchApiError",
    "JobCollector",
    "JobState",
    "LineFailure",
    "ProviderJobs",
    "batch_status_overview",
    "cancel_all_batches",
    "cancel_all_local_batches",
    "cancel_batch",
]
