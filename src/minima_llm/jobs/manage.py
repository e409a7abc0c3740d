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
from .api import BatchApi, BatchApiError
from .lock import held, lock_path
from .provider import api_of, state_dir_of
from .state import JobState, list_states, save_merged

log = logging.getLogger("minima_llm.jobs")


def _api_for(state: JobState, config: MinimaLlmConfig) -> BatchApi:
    """The API of the provider ``state``'s job was sent to."""
    return api_of(config, state.base_url)


def list_states_of(config: MinimaLlmConfig) -> list[JobState]:
    """The local batch jobs of ``config``'s state directory, oldest first."""
    return list_states(state_dir_of(config))


def batch_status_overview(
    config: MinimaLlmConfig, *, refresh: bool = True, out: TextIO | None = None
) -> list[JobState]:
    """Print the local batch jobs (asking the provider about unfinished ones) and return them."""
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
    """Cancel one batch at its provider by id; local state files that name it are updated."""
    local = [s for s in list_states(state_dir_of(config)) if s.batch_id == batch_id]
    api = _api_for(local[0], config) if local else api_of(config)
    answer = api.cancel(batch_id)
    for state in local:
        state.update(answer)
        state.cancel_requested_at = time.time()
        _save(state, config)
    log.info("batch %s: %s", batch_id, answer.get("status"))
    return answer


def cancel_all_batches(config: MinimaLlmConfig, prefix: str | None = None) -> list[str]:
    """Cancel every unfinished local batch job whose prefix is ``prefix`` (default: the config's)."""
    wanted = prefix if prefix is not None else config.parasail.llm_batch_prefix
    if not wanted:
        raise ValueError(
            "cancel_all_batches needs a prefix: pass one or set parasail.llm_batch_prefix"
        )
    states = list_states(state_dir_of(config), wanted)
    return _cancel(config, [s for s in states if s.prefix == wanted])


def cancel_all_local_batches(config: MinimaLlmConfig) -> list[str]:
    """Cancel every unfinished batch job that has a local state file, whatever its prefix."""
    return _cancel(config, list_states(state_dir_of(config)))


def _cancel(config: MinimaLlmConfig, states: list[JobState]) -> list[str]:
    """Cancel the unfinished ones among ``states``; the ids the provider accepted to cancel."""
    cancelled: list[str] = []
    for state in states:
        if state.terminal:
            continue
        api = _api_for(state, config)
        try:
            if not _located(state, api):
                continue
        except BatchApiError as exc:
            log.warning("%s: its batch could not be looked up: %s", state.path, exc)
            continue
        assert state.batch_id is not None
        if state.terminal:  # found finished: nothing to cancel, only the file to update
            _save(state, config)
            continue
        try:
            state.update(api.cancel(state.batch_id))
            state.cancel_requested_at = time.time()
            cancelled.append(state.batch_id)
        except BatchApiError as exc:
            # One refusal (it finished meanwhile, say) must not stop the others.
            log.warning("batch %s not cancelled: %s", state.batch_id, exc)
            try:
                state.update(api.get(state.batch_id))  # so the file says where it stands
            except BatchApiError:
                continue
        _save(state, config)
    return cancelled


def _save(state: JobState, config: MinimaLlmConfig) -> None:
    """Write what was learned of ``state`` into its file, under the state directory's lock."""
    with held(lock_path(state_dir_of(config))):
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
    found = api.find(state.input_file_id)
    if found is None:
        return False
    state.update(found)
    return bool(state.batch_id)
