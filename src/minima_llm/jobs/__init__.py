"""Provider batch jobs (OpenAI / Parasail batch API): batch mode, state files, management."""

from .api import BatchApi, BatchApiError
from .collector import JobCollector
from .lines import LineFailure, Outcome
from .manage import (
    batch_status_overview,
    cancel_all_batches,
    cancel_all_local_batches,
    cancel_batch,
    list_states_of,
)
from .provider import BATCHABLE, ProviderJobs, split
from .state import JobState

__all__ = [
    "BATCHABLE",
    "BatchApi",
    "BatchApiError",
    "JobCollector",
    "JobState",
    "LineFailure",
    "Outcome",
    "ProviderJobs",
    "batch_status_overview",
    "cancel_all_batches",
    "cancel_all_local_batches",
    "cancel_batch",
    "list_states_of",
    "split",
]
