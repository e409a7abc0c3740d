"""Batch management: list local batch jobs and cancel them (reference 000's functions and CLI).

The state files name each job's provider (``base_url``), so a job is always asked
about, or cancelled at, the endpoint it was sent to; the config gives the key and
where the state files are.
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, TextIO

from ..config import MinimaLlmConfig
from .api import BatchApi, BatchApiError, quote_id
from .lock import STALE_S, held, lock_path
from .provider import api_of, find_batch_of, state_dir_of
from .state import JobState, list_states, save_merged

log = logging.getLogger("minima_llm.jobs")

# How long a cancel waits for the state directory's lock to record what it did.
LOCK_WAIT_S = STALE_S


class CancelIncomplete(BatchApiError):
    """Some jobs were not cancelled, or their cancel not recorded; every other job was.

    ``cancelled`` holds the batch ids the provider accepted to cancel, ``failures``
    one line for each job that went wrong.
    """

    def __init__(self, cancelled: list[str], failures: list[str]) -> None:
        done = ", ".join(cancelled) if cancelled else "none"
        super().__init__(
            f"{len(failures)} batch job(s) went wrong (cancelled: {done}): " + "; ".join(failures)
        )
        self.cancelled = cancelled
        self.failures = failures


def _api_for(state: JobState, config: MinimaLlmConfig) -> BatchApi:
    """The API of the provider ``state``'s job was sent to."""
    return api_of(config, state.base_url)


def _checked(config: Any, caller: str) -> MinimaLlmConfig:
    # A path or a dict passed where the config goes failed deep inside with an
    # AttributeError; say what is wanted instead.
    if not isinstance(config, MinimaLlmConfig):
        raise TypeError(
            f"{caller} takes a MinimaLlmConfig (MinimaLlmConfig.from_env(), .from_yaml(path)"
            f" or .from_dict(...)), not {type(config).__name__}"
        )
    return config


def list_states_of(config: MinimaLlmConfig) -> list[JobState]:
    """The local batch jobs of ``config``'s state directory (none without one), oldest first."""
    directory = config.parasail.state_dir or config.cache_dir
    return list_states(directory) if directory else []


def batch_status_overview(
    config: MinimaLlmConfig, *, refresh: bool = True, out: TextIO | None = None
) -> list[JobState]:
    """Print the local batch jobs (asking the provider about unfinished ones) and return them."""
    _checked(config, "batch_status_overview")
    stream = out if out is not None else sys.stdout
    directory = state_dir_of(config)
    states = list_states(directory)
    if not states:
        stream.write(f"No batch state files in {directory}\n")
        return []
    stream.write(f"Batch jobs in {directory}:\n")
    for state in states:
        note = ""
        if refresh and not state.terminal and (state.batch_id or state.input_file_id):
            try:
                api = _api_for(state, config)
                if _located(state, api):
                    assert state.batch_id is not None
                    state.update(api.get(state.batch_id))
                    _save(state, config)
            except BatchApiError as exc:
                note = f"  (status not refreshed: {exc})"
        stream.write(f"  {state.summary()}{note}\n")
    stream.flush()
    return states


def cancel_batch(batch_id: str, config: MinimaLlmConfig) -> dict[str, Any]:
    """Cancel one batch at its provider by id; local state files that name it are updated.

    Needs no state directory: without one (or a file naming the batch) it goes to
    the configured endpoint.
    """
    # Checked before matching: None would match every job without a batch id.
    quote_id(batch_id, "batch id")
    _checked(config, "cancel_batch")
    local = [s for s in list_states_of(config) if s.batch_id == batch_id]
    api = _api_for(local[0], config) if local else api_of(config)
    answer = api.cancel(batch_id)
    for state in local:
        state.update(answer)
        state.cancel_requested_at = time.time()
    failures = _record(config, local)
    if failures:
        raise CancelIncomplete([batch_id], failures)
    log.info("batch %s: %s", batch_id, answer.get("status"))
    return answer


def cancel_all_batches(config: MinimaLlmConfig, prefix: str | None = None) -> list[str]:
    """Cancel every unfinished local batch job whose prefix is ``prefix`` (default: the config's)."""
    _checked(config, "cancel_all_batches")
    if prefix is not None and not isinstance(prefix, str):
        raise TypeError(f"cancel_all_batches: prefix must be a str, not {type(prefix).__name__}")
    wanted = prefix if prefix is not None else config.parasail.llm_batch_prefix
    if not wanted:
        raise ValueError(
            "cancel_all_batches needs a prefix: pass one or set parasail.llm_batch_prefix"
        )
    states = list_states(state_dir_of(config), wanted)
    return _cancel(config, [s for s in states if s.prefix == wanted])


def cancel_all_local_batches(config: MinimaLlmConfig) -> list[str]:
    """Cancel every unfinished batch job that has a local state file, whatever its prefix."""
    _checked(config, "cancel_all_local_batches")
    return _cancel(config, list_states(state_dir_of(config)))


def _cancel(config: MinimaLlmConfig, states: list[JobState]) -> list[str]:
    """Cancel the unfinished ones among ``states``; the ids the provider accepted to cancel.

    Every job is asked whatever happened to the others (one left running goes on
    costing), then all that was learned is recorded under one wait for the lock.
    ``CancelIncomplete`` lists what went wrong, after all that.
    """
    cancelled: list[str] = []
    failures: list[str] = []
    learned: list[JobState] = []
    for state in states:
        if state.terminal:
            continue
        try:
            changed, problem = _cancel_one(state, _api_for(state, config), cancelled)
        except BatchApiError as exc:
            changed, problem = False, f"{state.path}: its batch could not be looked up: {exc}"
        if changed:
            learned.append(state)
        if problem:
            failures.append(problem)
    failures.extend(_record(config, learned))
    if failures:
        raise CancelIncomplete(cancelled, failures)
    return cancelled


def _cancel_one(state: JobState, api: BatchApi, cancelled: list[str]) -> tuple[bool, str | None]:
    """Cancel ``state``'s job (its id goes in ``cancelled``): whether ``state`` changed, what failed."""
    if not _located(state, api):
        return False, None  # never created: nothing runs
    assert state.batch_id is not None
    if state.terminal:  # found finished: nothing to cancel, only the file to update
        return True, None
    try:
        state.update(api.cancel(state.batch_id))
    except BatchApiError as exc:
        # Refused because it finished meanwhile is no failure: ask where it stands.
        log.warning("batch %s not cancelled: %s", state.batch_id, exc)
        try:
            state.update(api.get(state.batch_id))
        except BatchApiError as again:
            return False, f"{state.batch_id}: not cancelled ({exc}), nor found ({again})"
        if state.terminal:
            return True, None
        return True, f"{state.batch_id}: not cancelled, still {state.status} ({exc})"
    state.cancel_requested_at = time.time()
    cancelled.append(state.batch_id)
    return True, None


def _record(config: MinimaLlmConfig, states: list[JobState]) -> list[str]:
    """Write what was learned of ``states`` into their files, under one wait for the lock.

    Returns one line for each file that could not be written: a cancel it misses
    cannot stop a run waiting on the job from sending its requests again.
    """
    if not states:
        return []
    unsaved = list(states)
    failures: list[str] = []
    try:
        with held(lock_path(state_dir_of(config)), LOCK_WAIT_S):
            while unsaved:
                state = unsaved.pop(0)
                try:
                    save_merged(state)
                except OSError as exc:
                    failures.append(
                        f"{state.batch_id}: its state file {state.path} not updated: {exc}"
                    )
    except BatchApiError as exc:  # the lock did not come
        failures.extend(
            f"{s.batch_id}: its state file {s.path} not updated: {exc}" for s in unsaved
        )
    return failures


def _save(state: JobState, config: MinimaLlmConfig) -> None:
    """Write what was learned of ``state`` into its file, under the state directory's lock."""
    with held(lock_path(state_dir_of(config)), LOCK_WAIT_S):
        save_merged(state)


def _located(state: JobState, api: BatchApi) -> bool:
    """Whether ``state`` names its batch, looking it up by input file if a create's answer was lost.

    A create that timed out (or a run killed during it) leaves a file uploaded and no
    batch id, though the provider may be running, and billing, that batch.
    """
    if state.batch_id:
        return True
    if not state.input_file_id:
        return False
    found = find_batch_of(api, state)
    if found is None:
        return False
    state.update(found)
    return bool(state.batch_id)
