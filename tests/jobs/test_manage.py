"""Batch management against the mock: list local jobs, refresh them, cancel them; the CLI.

The management functions are synchronous (urllib) and the mock runs on the test's
event loop, so they are called on a worker thread.
"""

from __future__ import annotations

import asyncio
import io
import logging
from pathlib import Path
from typing import Any

import pytest

from backend_support import FAST
from forward_proxy import ForwardProxy, free_refused_tunnels
from minima_llm import (
    MinimaLlmConfig,
    ParasailBatchConfig,
    batch_status_overview,
    cancel_all_batches,
    cancel_all_local_batches,
    cancel_batch,
)
from minima_llm.cli import main
from minima_llm.clock import SYSTEM_CLOCK, Clock, FakeClock
from minima_llm.errors import ConfigError
from minima_llm.jobs import BatchApi, BatchApiError, JobState, LineFailure, ProviderJobs
from minima_llm.jobs import manage as manage_module
from minima_llm.jobs.lock import lock_path, locked
from minima_llm.jobs.manage import CancelIncomplete
from minima_llm.jobs.state import list_states
from minima_llm.testing import MockServer

LINE = b'{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}\n'

SLOW = 60.0  # batch_delay_s that keeps a batch in_progress for the whole test
CHAT = "chat/completions"


@pytest.fixture
def cache_dir(tmp_path: Path) -> Path:
    return tmp_path / "cache"


@pytest.fixture
def cfg(mock: MockServer, cache_dir: Path) -> MinimaLlmConfig:
    """A config on the mock without a batch prefix (management needs none)."""
    return MinimaLlmConfig(
        base_url=mock.url, model="mock-model", cache_dir=str(cache_dir), max_attempts=2, **FAST
    )


async def submit(cfg: MinimaLlmConfig, prefix: str, *questions: str, wait: bool = False) -> str:
    """Send a job with one line per question; its batch id.

    Without ``wait`` it is left running: a fake clock makes ``max_poll_hours`` pass
    at once, as for a run that gave up and left its state file to resume.
    """
    if wait:
        parasail = ParasailBatchConfig(llm_batch_prefix=prefix, poll_interval_s=0.01)
        clock: Clock = SYSTEM_CLOCK
    else:
        parasail = ParasailBatchConfig(llm_batch_prefix=prefix, max_poll_hours=1e-6)
        clock = FakeClock()
    jobs = ProviderJobs(cfg.replace(parasail=parasail), clock=clock)
    bodies = {
        f"{prefix}-{q}": {"model": "mock-model", "messages": [{"role": "user", "content": q}]}
        for q in questions
    }
    outcomes = await jobs.run(CHAT, "mock-model", bodies, report=lambda _: None)
    gave_up = [o for o in outcomes.values() if isinstance(o, LineFailure)]
    assert len(gave_up) == (0 if wait else len(bodies)), outcomes
    (state,) = [s for s in list_states(jobs.state_dir) if set(s.keys) == set(bodies)]
    assert state.batch_id is not None
    return state.batch_id


@pytest.fixture
async def running_job(mock: MockServer, cfg: MinimaLlmConfig) -> str:
    """The batch id of a one-line job with prefix ``p`` left in progress (the mock is slow)."""
    mock.update_config(batch_delay_s=SLOW)
    return await submit(cfg, "p", "a")


def the_line(text: str, batch_id: str) -> str:
    """The one line of ``text`` that names ``batch_id``."""
    (line,) = [x for x in text.splitlines() if batch_id in x]
    return line


def local(cache_dir: Path, batch_id: str) -> JobState:
    (state,) = [s for s in list_states(cache_dir) if s.batch_id == batch_id]
    return state


async def remote_status(mock: MockServer, batch_id: str) -> str:
    batch = await asyncio.to_thread(BatchApi(mock.url, None).get, batch_id)
    return str(batch["status"])


def route(mock: MockServer, name: str) -> int:
    return int(mock.stats()["by_route"].get(name, 0))


GET = "/v1/batches/{batch_id}"
CANCEL = "/v1/batches/{batch_id}/cancel"


# --- batch_status_overview ---------------------------------------------------------------


async def test_overview_of_an_empty_dir_says_so(cfg: MinimaLlmConfig, cache_dir: Path) -> None:
    out = io.StringIO()

    states = await asyncio.to_thread(batch_status_overview, cfg, out=out)

    assert states == []
    assert out.getvalue() == f"No batch state files in {cache_dir}\n"


async def test_overview_refreshes_an_unfinished_job_from_the_provider(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    batch_id = await submit(cfg, "nightly", "a", "b", "c")
    assert local(cache_dir, batch_id).status == "in_progress"
    mock.update_config(batch_delay_s=0)
    out = io.StringIO()

    (state,) = await asyncio.to_thread(batch_status_overview, cfg, out=out)

    assert state.status == "completed"
    assert local(cache_dir, batch_id).status == "completed"  # saved, not only shown
    line = the_line(out.getvalue(), batch_id)
    assert line.split()[:5] == ["nightly", batch_id, "completed", "3/3", "done,"]
    assert out.getvalue().startswith(f"Batch jobs in {cache_dir}:\n")


async def test_overview_lists_every_job(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    done = await submit(cfg, "first", "a", wait=True)
    mock.update_config(batch_delay_s=SLOW)
    running = await submit(cfg, "second", "b", "c")
    out = io.StringIO()

    states = await asyncio.to_thread(batch_status_overview, cfg, out=out)

    assert [(s.batch_id, s.status) for s in states] == [
        (done, "completed"),
        (running, "in_progress"),
    ]
    lines = out.getvalue().splitlines()[1:]
    assert [x.split()[:3] for x in lines] == [
        ["first", done, "completed"],
        ["second", running, "in_progress"],
    ]
    assert lines[0].endswith("1/1 done, 0 failed, not collected")  # nothing cached it
    assert lines[1].endswith("0/2 done, 0 failed, not collected")


async def test_overview_asks_only_about_unfinished_jobs(
    mock: MockServer, cfg: MinimaLlmConfig
) -> None:
    await submit(cfg, "done", "a", wait=True)
    mock.update_config(batch_delay_s=SLOW)
    await submit(cfg, "running", "b")
    before = route(mock, GET)

    await asyncio.to_thread(batch_status_overview, cfg, out=io.StringIO())

    assert route(mock, GET) == before + 1


async def test_overview_without_refresh_asks_nothing(
    running_job: str, mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    batch_id = running_job
    mock.update_config(batch_delay_s=0)
    before = mock.stats()["requests"]
    out = io.StringIO()

    (state,) = await asyncio.to_thread(batch_status_overview, cfg, refresh=False, out=out)

    assert mock.stats()["requests"] == before
    assert state.status == "in_progress"
    assert f"{batch_id}" in out.getvalue() and "in_progress" in out.getvalue()


async def test_overview_notes_a_status_it_could_not_refresh(
    running_job: str, mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    batch_id = running_job
    mock.reset()  # the provider no longer knows the batch: 404
    out = io.StringIO()

    (state,) = await asyncio.to_thread(batch_status_overview, cfg, out=out)

    assert state.status == "in_progress"
    line = the_line(out.getvalue(), batch_id)
    assert "status not refreshed" in line and "404" in line
    assert local(cache_dir, batch_id).status == "in_progress"


# --- cancelling ------------------------------------------------------------------------------


async def test_cancel_batch_cancels_at_the_provider_and_in_the_state_file(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    batch_id = await submit(cfg, "p", "a", "b")

    answer = await asyncio.to_thread(cancel_batch, batch_id, cfg)

    assert answer["id"] == batch_id
    assert answer["status"] in ("cancelling", "cancelled")
    assert local(cache_dir, batch_id).status == answer["status"]
    assert await remote_status(mock, batch_id) == "cancelled"
    (state,) = await asyncio.to_thread(batch_status_overview, cfg, out=io.StringIO())
    assert state.status == "cancelled"
    assert local(cache_dir, batch_id).terminal


async def test_cancel_batch_without_a_state_file_goes_to_the_configured_endpoint(
    mock: MockServer, cfg: MinimaLlmConfig
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    api = BatchApi(mock.url, None)
    line = (
        b'{"custom_id":"x","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}\n'
    )
    uploaded = await asyncio.to_thread(api.upload, line, "x.jsonl")
    batch = await asyncio.to_thread(api.create, uploaded["id"], "/v1/chat/completions")

    answer = await asyncio.to_thread(cancel_batch, batch["id"], cfg)

    assert answer["status"] == "cancelling"
    assert await remote_status(mock, batch["id"]) == "cancelled"


async def test_cancel_batch_of_an_unknown_id_raises(mock: MockServer, cfg: MinimaLlmConfig) -> None:
    with pytest.raises(BatchApiError) as caught:
        await asyncio.to_thread(cancel_batch, "batch_nope", cfg)

    assert caught.value.status == 404


async def test_cancel_all_batches_cancels_only_that_prefix(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    mine = {await submit(cfg, "mine", "a"), await submit(cfg, "mine", "b")}
    theirs = await submit(cfg, "theirs", "c")

    cancelled = await asyncio.to_thread(cancel_all_batches, cfg, prefix="mine")

    assert set(cancelled) == mine
    assert route(mock, CANCEL) == 2
    assert {await remote_status(mock, b) for b in mine} == {"cancelled"}
    assert await remote_status(mock, theirs) == "in_progress"
    assert local(cache_dir, theirs).status == "in_progress"


async def test_cancel_all_batches_defaults_to_the_configured_prefix(
    mock: MockServer, cfg: MinimaLlmConfig
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    other = await submit(cfg, "other", "a")
    mine = await submit(cfg, "mine", "b")
    configured = cfg.replace(parasail=ParasailBatchConfig(llm_batch_prefix="mine"))

    assert await asyncio.to_thread(cancel_all_batches, configured) == [mine]
    assert await remote_status(mock, other) == "in_progress"


async def test_a_job_whose_create_answer_was_lost_is_found_and_cancelled(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    # A create that timed out leaves the file uploaded and no batch id, while the
    # provider runs (and bills) the batch: the tools must find it by its input file.
    mock.update_config(batch_delay_s=SLOW)
    batch_id = await submit(cfg, "mine", "a")
    state = local(cache_dir, batch_id)
    state.batch_id, state.status = None, "uploaded"
    state.save()
    out = io.StringIO()

    await asyncio.to_thread(batch_status_overview, cfg, out=out)
    assert the_line(out.getvalue(), batch_id)  # refreshed: named by its batch again

    state.batch_id, state.status = None, "uploaded"
    state.save()
    assert await asyncio.to_thread(cancel_all_batches, cfg, prefix="mine") == [batch_id]
    assert await remote_status(mock, batch_id) == "cancelled"
    assert local(cache_dir, batch_id).status in ("cancelling", "cancelled")


async def test_a_repeat_job_of_a_prefix_is_cancelled_by_that_prefix(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    # The second job for one set of requests has a -<time_ns> tail on its file name.
    mock.update_config(batch_delay_s=SLOW)
    batch_id = await submit(cfg, "mine", "a")
    path = local(cache_dir, batch_id).path
    assert path is not None
    path.rename(path.with_name(path.name.replace(".batch.json", "-1764612345678901234.batch.json")))

    assert await asyncio.to_thread(cancel_all_batches, cfg, prefix="mine") == [batch_id]


def test_cancel_all_batches_needs_a_prefix(cfg: MinimaLlmConfig) -> None:
    with pytest.raises(ValueError, match="prefix"):
        cancel_all_batches(cfg)


async def test_cancel_all_local_batches_cancels_unfinished_and_skips_finished(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    finished = await submit(cfg, "a", "x", wait=True)
    mock.update_config(batch_delay_s=SLOW)
    running = {await submit(cfg, "a", "y"), await submit(cfg, "b", "z")}

    cancelled = await asyncio.to_thread(cancel_all_local_batches, cfg)

    assert set(cancelled) == running
    assert route(mock, CANCEL) == 2  # the finished one was not even asked about
    assert local(cache_dir, finished).status == "completed"
    assert {await remote_status(mock, b) for b in running} == {"cancelled"}


async def test_a_batch_that_finished_meanwhile_is_logged_and_the_rest_cancelled(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path, caplog: pytest.LogCaptureFixture
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    early = await submit(cfg, "p", "a")
    late = await submit(cfg, "p", "b")
    # The provider finishes ``early``; its state file still says in_progress.
    mock.update_config(batch_delay_s=0)
    assert await remote_status(mock, early) == "completed"
    mock.update_config(batch_delay_s=SLOW)

    with caplog.at_level(logging.WARNING, logger="minima_llm.jobs"):
        cancelled = await asyncio.to_thread(cancel_all_local_batches, cfg)

    assert cancelled == [late]
    assert await remote_status(mock, late) == "cancelled"
    (warning,) = [r for r in caplog.records if early in r.getMessage()]
    assert warning.levelno == logging.WARNING
    assert "not cancelled" in warning.getMessage()
    assert local(cache_dir, early).status == "completed"  # asked again after the refusal


# --- cancelling when something goes wrong ------------------------------------------------------


async def test_every_job_is_cancelled_though_the_state_directory_stays_locked(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A run uploading a big job (or a stalled NFS) holds the lock: the cancels cannot be
    # recorded, but each job must still be cancelled at the provider, where it costs.
    mock.update_config(batch_delay_s=SLOW)
    running = {await submit(cfg, "a", "x"), await submit(cfg, "b", "y")}
    monkeypatch.setattr(manage_module, "LOCK_WAIT_S", 0.2)

    async with locked(lock_path(cache_dir)):
        with pytest.raises(CancelIncomplete) as caught:
            await asyncio.to_thread(cancel_all_local_batches, cfg)

    assert set(caught.value.cancelled) == running
    assert {await remote_status(mock, b) for b in running} == {"cancelled"}
    assert len(caught.value.failures) == 2
    assert all("not updated" in failure for failure in caught.value.failures)
    assert isinstance(caught.value, BatchApiError)  # what a lock wait raised before
    # Once the lock is free, a second try records where the jobs stand.
    assert await asyncio.to_thread(cancel_all_local_batches, cfg) == []
    assert {local(cache_dir, b).status for b in running} == {"cancelled"}


async def test_a_job_that_cannot_be_cancelled_is_reported_after_the_others_are_cancelled(
    mock: MockServer, cfg: MinimaLlmConfig, cache_dir: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    forgotten = await submit(cfg, "a", "x")
    running = await submit(cfg, "b", "y")
    state = local(cache_dir, forgotten)
    state.batch_id = "batch_the_provider_forgot"  # 404 to a cancel and to a look
    state.save()

    with pytest.raises(CancelIncomplete) as caught:
        await asyncio.to_thread(cancel_all_local_batches, cfg)

    assert caught.value.cancelled == [running]
    (failure,) = caught.value.failures
    assert failure.startswith("batch_the_provider_forgot: not cancelled") and "404" in failure
    assert await remote_status(mock, running) == "cancelled"
    assert local(cache_dir, running).cancel_requested_at is not None


async def test_cancel_batch_whose_cancel_cannot_be_recorded_says_it_was_cancelled(
    running_job: str,
    mock: MockServer,
    cfg: MinimaLlmConfig,
    cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(manage_module, "LOCK_WAIT_S", 0.2)

    async with locked(lock_path(cache_dir)):
        with pytest.raises(CancelIncomplete) as caught:
            await asyncio.to_thread(cancel_batch, running_job, cfg)

    assert caught.value.cancelled == [running_job]
    assert await remote_status(mock, running_job) == "cancelled"
    assert local(cache_dir, running_job).status == "in_progress"  # as the error says


@pytest.mark.parametrize("bad", ["", None, ".."])
async def test_cancel_batch_refuses_a_missing_id_without_asking_the_provider(
    running_job: str, mock: MockServer, cfg: MinimaLlmConfig, bad: str
) -> None:
    before = mock.stats()["requests"]

    with pytest.raises(ValueError, match="batch id must be a non-empty string"):
        await asyncio.to_thread(cancel_batch, bad, cfg)

    assert mock.stats()["requests"] == before
    assert await remote_status(mock, running_job) == "in_progress"


async def test_an_id_goes_into_the_url_as_one_quoted_path_segment(
    mock: MockServer, cfg: MinimaLlmConfig
) -> None:
    with pytest.raises(BatchApiError) as caught:
        await asyncio.to_thread(cancel_batch, "batch_x/../../files", cfg)

    assert caught.value.status == 404
    assert "No such Batch object: batch_x/../../files" in str(caught.value)
    assert mock.stats()["by_route"] == {CANCEL: 1}  # that route, and no other
    with pytest.raises(BatchApiError, match="No such Batch object: a/b"):
        await asyncio.to_thread(BatchApi(mock.url, None).get, "a/b")


async def test_cancel_batch_needs_no_state_directory(
    running_job: str, mock: MockServer, cfg: MinimaLlmConfig
) -> None:
    # Cancelling by remote id needs nothing local: a config without a cache does it.
    answer = await asyncio.to_thread(cancel_batch, running_job, cfg.replace(cache_dir=None))

    assert answer["status"] == "cancelling"
    assert await remote_status(mock, running_job) == "cancelled"


# --- the command line -----------------------------------------------------------------------


@pytest.fixture
def env_cache_dir(monkeypatch: pytest.MonkeyPatch, cache_dir: Path) -> Path:
    """Only CACHE_DIR in the environment: no endpoint, no model."""
    for var in ("OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY", "OPENAI_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CACHE_DIR", str(cache_dir))
    return cache_dir


def yaml_config(path: Path, mock: MockServer, cache_dir: Path) -> str:
    path.write_text(f"base_url: {mock.url}\nmodel: mock-model\ncache_dir: {cache_dir}\n")
    return str(path)


async def cli(*argv: str) -> int:
    return await asyncio.to_thread(main, ["batch-status", *argv])


async def test_cli_lists_jobs_from_a_yaml_config(
    running_job: str,
    mock: MockServer,
    cfg: MinimaLlmConfig,
    cache_dir: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch_id = running_job
    config_file = yaml_config(tmp_path / "minima.yaml", mock, cache_dir)

    for flag in ("--config", "-c"):
        assert await cli(flag, config_file) == 0
        out = capsys.readouterr().out
        assert f"Batch jobs in {cache_dir}:" in out
        assert batch_id in out and "in_progress" in out


async def test_cli_lists_jobs_with_only_cache_dir_in_the_environment(
    running_job: str,
    mock: MockServer,
    cfg: MinimaLlmConfig,
    env_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch_id = running_job
    mock.update_config(batch_delay_s=0)

    assert await cli() == 0

    # Refreshed at the endpoint the state file names, though none is configured.
    line = the_line(capsys.readouterr().out, batch_id)
    assert "completed" in line


async def test_cli_takes_blank_endpoint_and_model_variables_as_unset(
    running_job: str,
    mock: MockServer,
    env_cache_dir: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    # "OPENAI_MODEL=${MODEL}" in a job script with MODEL unset: still only CACHE_DIR needed.
    monkeypatch.setenv("OPENAI_MODEL", "  ")
    monkeypatch.setenv("OPENAI_BASE_URL", "")
    assert await cli("--no-refresh") == 0
    assert running_job in capsys.readouterr().out


async def test_cli_no_refresh_shows_the_state_files_as_they_are(
    running_job: str,
    mock: MockServer,
    cfg: MinimaLlmConfig,
    env_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch_id = running_job
    mock.update_config(batch_delay_s=0)
    before = mock.stats()["requests"]

    assert await cli("--no-refresh") == 0

    line = the_line(capsys.readouterr().out, batch_id)
    assert "in_progress" in line
    assert mock.stats()["requests"] == before


async def test_cli_with_no_state_files(
    env_cache_dir: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert await cli() == 0
    assert capsys.readouterr().out == f"No batch state files in {env_cache_dir}\n"


async def test_cli_cancel_remote(
    running_job: str,
    mock: MockServer,
    cfg: MinimaLlmConfig,
    env_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    batch_id = running_job

    assert await cli("--cancel-remote", batch_id) == 0

    assert capsys.readouterr().out == f"{batch_id}: cancelling\n"
    assert await remote_status(mock, batch_id) == "cancelled"
    assert local(env_cache_dir, batch_id).status == "cancelling"


async def test_cli_cancel_remote_of_an_unknown_id_exits_2(
    mock: MockServer, cache_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config_file = yaml_config(tmp_path / "minima.yaml", mock, cache_dir)

    assert await cli("-c", config_file, "--cancel-remote", "batch_nope") == 2

    captured = capsys.readouterr()
    assert captured.err.startswith("minima-llm: ")
    assert "404" in captured.err and "Traceback" not in captured.err


async def test_cli_cancel_prefix(
    mock: MockServer,
    cfg: MinimaLlmConfig,
    env_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    mine = await submit(cfg, "mine", "a")
    theirs = await submit(cfg, "theirs", "b")

    assert await cli("--cancel", "mine") == 0

    out = capsys.readouterr().out
    assert out.startswith(f"cancelled 1 batch job(s)\n  {mine}\n")
    assert await remote_status(mock, mine) == "cancelled"
    assert await remote_status(mock, theirs) == "in_progress"
    assert f"Batch jobs in {env_cache_dir}:" in out  # the overview follows


async def test_cli_cancel_names_longer_prefixes_when_none_is_exact(
    mock: MockServer,
    cfg: MinimaLlmConfig,
    env_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    run = await submit(cfg, "exp_run1", "a")

    assert await cli("--cancel", "exp") == 0  # a prefix names its jobs exactly

    out = capsys.readouterr().out
    assert out.startswith("cancelled 0 batch job(s)\n")
    assert "unfinished jobs have these prefixes that begin with it: exp_run1" in out
    assert await remote_status(mock, run) == "in_progress"


async def test_cli_cancel_all(
    mock: MockServer,
    cfg: MinimaLlmConfig,
    env_cache_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    running = {await submit(cfg, "a", "x"), await submit(cfg, "b", "y")}

    assert await cli("--cancel-all") == 0

    out = capsys.readouterr().out
    assert out.startswith("cancelled 2 batch job(s)\n")
    assert {await remote_status(mock, b) for b in running} == {"cancelled"}
    assert {s.status for s in list_states(env_cache_dir)} == {"cancelled"}


def test_cli_cancel_flags_are_mutually_exclusive(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exc:
        main(["batch-status", "--cancel", "p", "--cancel-all"])
    assert exc.value.code == 2
    assert "not allowed with" in capsys.readouterr().err


async def test_cli_cancel_remote_without_a_cache_dir(
    running_job: str,
    mock: MockServer,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for var in ("CACHE_DIR", "OPENAI_MODEL", "OPENAI_API_KEY", "OPENAI_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("OPENAI_BASE_URL", mock.url)

    assert await cli("--cancel-remote", running_job) == 0

    assert capsys.readouterr().out == f"{running_job}: cancelling\n"
    assert await remote_status(mock, running_job) == "cancelled"
    # With no endpoint either, it says what is missing.
    monkeypatch.delenv("OPENAI_BASE_URL")
    assert await cli("--cancel-remote", running_job) == 2
    assert "set OPENAI_BASE_URL" in capsys.readouterr().err


@pytest.mark.parametrize(
    "call",
    [
        lambda: batch_status_overview("config.yml"),  # type: ignore[arg-type]
        lambda: cancel_all_local_batches({"cache_dir": "x"}),  # type: ignore[arg-type]
        lambda: cancel_all_batches(None),  # type: ignore[arg-type]
        lambda: cancel_batch("batch_1", "config.yml"),  # type: ignore[arg-type]
    ],
)
def test_a_management_call_given_no_config_says_what_it_takes(call: Any) -> None:
    with pytest.raises(TypeError, match="takes a MinimaLlmConfig"):
        call()


def test_cancel_all_batches_refuses_a_prefix_that_is_no_string(tmp_path: Path) -> None:
    config = MinimaLlmConfig(base_url="http://127.0.0.1:9/v1", model="m", cache_dir=str(tmp_path))
    with pytest.raises(TypeError, match="prefix must be a str"):
        cancel_all_batches(config, prefix=3)  # type: ignore[arg-type]


async def test_batch_api_calls_go_through_the_proxy_the_environment_names(
    mock: MockServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = int(mock.url.rsplit(":", 1)[1].split("/")[0])
    async with ForwardProxy({"batches.test": ("127.0.0.1", port)}, credentials="ada:pw") as via:
        monkeypatch.setenv("HTTP_PROXY", via.url.replace("//", "//ada:pw@"))
        api = BatchApi(f"http://batches.test:{port}/v1", None)
        uploaded = await asyncio.to_thread(api.upload, LINE, "x.jsonl")
        batch = await asyncio.to_thread(api.create, uploaded["id"], "/v1/chat/completions")
        assert (await asyncio.to_thread(api.get, batch["id"]))["id"] == batch["id"]
    assert [s.method for s in via.seen] == ["POST", "POST", "GET"]
    assert {s.proxy_authorization for s in via.seen} == {"Basic YWRhOnB3"}
    assert "proxy-authorization" not in mock.last_headers


async def test_a_batch_api_behind_a_proxy_that_is_down_names_it(
    monkeypatch: pytest.MonkeyPatch, taken_port: int
) -> None:
    monkeypatch.setenv("HTTPS_PROXY", "http://127.0.0.1:1")
    api = BatchApi("https://batches.test/v1", None, attempts=1)
    with pytest.raises(BatchApiError) as caught:
        await asyncio.to_thread(api.get, "batch_x")
    assert "via proxy http://127.0.0.1:1 (from HTTPS_PROXY)" in str(caught.value)


def test_a_batch_api_with_an_unusable_proxy_fails_at_construction(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("ALL_PROXY", "socks5://127.0.0.1:1080")
    with pytest.raises(ConfigError) as caught:
        BatchApi("https://batches.test/v1", None)
    assert caught.value.field == "ALL_PROXY"


async def test_a_batch_api_call_refused_by_the_proxy_is_not_retried(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    async with ForwardProxy(credentials="ada:pw") as via:
        monkeypatch.setenv("HTTPS_PROXY", via.url.replace("//", "//ada:wrong@"))
        api = BatchApi("https://batches.test/v1", None, sleep=lambda _: None)
        with pytest.raises(BatchApiError) as caught:
            await asyncio.to_thread(api.create, "file-1", "/v1/chat/completions")
    free_refused_tunnels()
    assert [s.method for s in via.seen] == ["CONNECT"]
    assert "HTTP 407" in str(caught.value) and "may have been done" not in str(caught.value)
