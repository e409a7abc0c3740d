"""Provider batch jobs (OpenAI / Parasail batch API): batch mode, state files, management."""

from .api import BatchApi, BatchApiError, ListingIncomplete
from .collector import JobCollector
from .lines import LineFailure, Outcome
from .manage import (
    CancelIncomplete,
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
    "CancelIncomplete",
    "JobCollector",
    "JobState",
    "LineFailure",
    "ListingIncomplete",
    "Outcome",
    "ProviderJobs",
    "batch_status_overview",
    "cancel_all_batches",
    "cancel_all_local_batches",
    "cancel_batch",
    "list_states_of",
    "split",
]
