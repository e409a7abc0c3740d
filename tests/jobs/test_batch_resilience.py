"""Batch mode under trouble: threads, take-over by key, late and cut answers, a broken cache.

Each test pins a fix a reviewer's reproduction called for, over real HTTP on
127.0.0.1. The mock injects faults on live inference routes only, so faults on the
Files and Batches routes come from ``Proxy``: a small aiohttp app in front of the
mock that forwards every request unless the test's ``fault`` answers it.
"""

from __future__ import annotations

import asyncio
import io
import json
import re
import threading
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jobs_support import (
    BAD,
    CONTENT,
    FILES,
    GIVE_UP,
    POLL,
    SLOW,
    Factory,
    Proxy,
    assert_split_by_bytes,
    config,
    error_types,
    parasail,
    questions,
    quietly,
    replies,
    route,
    texts,
)

from minima_llm import (
    MinimaLlmFailure,
    MinimaLlmRequest,
    MinimaLlmResult,
    OpenAIMinimaLlm,
    ParasailBatchConfig,
    batch_status_overview,
)
from minima_llm.cache.memory import MemoryStore
from minima_llm.cache.prompt import PromptCache
from minima_llm.cache.store import CacheRow
from minima_llm.cli import main
from minima_llm.jobs import JobState, LineFailure
from minima_llm.jobs.lines import MISSING, read_lines
from minima_llm.jobs.state import list_states
from minima_llm.testing import MockConfig, MockServer, run_mock_server_in_thread
from minima_llm.upstream import Completion

CHAT = "chat/completions"


def giving_up() -> ParasailBatchConfig:
    return parasail(max_poll_hours=GIVE_UP)


# --- a proxy for faults on the batch routes ----------------------------------------------


def unavailable() -> web.Response:
    return web.json_response({"error": {"message": "batch API down"}}, status=503)


async def cut_short(request: web.Request) -> web.StreamResponse:
    """A 200 that promises 1000 bytes, sends 17 and hangs up: ``IncompleteRead`` in urllib."""
    resp = web.StreamResponse(headers={"Content-Length": "1000"})
    await resp.prepare(request)
    await resp.write(b'{"custom_id": "x"')
    assert request.transport is not None
    request.transport.close()
    return resp


# --- threads, each with its own event loop ----------------------------------------------


def test_threads_each_running_their_own_loop_all_get_answers(tmp_path: Path) -> None:
    # DSPy's synchronous LM: every worker thread calls asyncio.run(generate(...)).
    with run_mock_server_in_thread(MockConfig()) as server:
        backend = OpenAIMinimaLlm(config(server.url, tmp_path / "cache", parasail=parasail()))
        results: dict[int, MinimaLlmResult] = {}

        def ask(n: int) -> None:
            results[n] = asyncio.run(backend.generate(questions(n)[0]))

        threads = [threading.Thread(target=ask, args=(n,), daemon=True) for n in range(4)]
        started = time.monotonic()
        try:
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(timeout=max(0.0, started + 5.0 - time.monotonic()))
            elapsed = time.monotonic() - started
        finally:
            asyncio.run(backend.aclose())

    assert [t.is_alive() for t in threads] == [False] * 4
    assert elapsed < 2.5  # one collect window and a poll or two, not a hang
    assert texts(results[n] for n in range(4)) == replies(range(4))


# --- take-over by key -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("rerun", "new"), [((1, 2, 3, 4, 5), (4, 5)), ((2, 1), ())], ids=["more", "fewer"]
)
async def test_a_rerun_takes_the_job_over_by_key_and_sends_only_new_questions(
    make: Factory,
    mock: MockServer,
    tmp_path: Path,
    rerun: tuple[int, ...],
    new: tuple[int, ...],
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    gave_up = await quietly(make(parasail=giving_up()), questions(0, 1, 2, 3))
    assert error_types(gave_up) == {"BatchApiError"}
    (left,) = list_states(tmp_path / "cache")
    await make(live=True).generate(questions(0)[0])  # meanwhile a normal run caches one answer
    mock.update_config(batch_delay_s=0)
    backend = make(parasail=giving_up())

    results = await quietly(backend, questions(*rerun))

    assert texts(results) == replies(rerun)
    assert route(mock, FILES) == 1 + bool(new)
    assert mock.stats()["batch_lines"] == 4 + len(new)  # the first job's lines ran once
    states = list_states(tmp_path / "cache")
    assert states[0].batch_id == left.batch_id
    assert [set(s.keys) for s in states[1:]] == (
        [{backend.key_for(r)[0] for r in questions(*new)}] if new else []
    )


async def test_take_over_by_key_across_chunks_of_max_lines(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    first = make(parasail=giving_up())
    first.jobs.max_lines = 3  # type: ignore[union-attr]
    assert error_types(await quietly(first, questions(*range(6)))) == {"BatchApiError"}
    assert [s.request_count for s in list_states(tmp_path / "cache")] == [3, 3]
    await make(live=True).generate(questions(0)[0])
    mock.update_config(batch_delay_s=0)
    second = make(parasail=giving_up())
    second.jobs.max_lines = 3  # type: ignore[union-attr]

    # Five misses now chunk as (1, 2, 3) and (4, 5): the first chunk spans both old jobs.
    results = await quietly(second, questions(*range(6)))

    assert texts(results) == replies(range(6))
    assert (route(mock, FILES), mock.stats()["batch_lines"]) == (2, 6)
    assert len(list_states(tmp_path / "cache")) == 2


async def test_generate_calls_arriving_in_two_waves_take_the_job_over(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    first = make(parasail=giving_up())
    first.jobs.max_lines = 4  # type: ignore[union-attr]  # a full group is sent at once
    gave_up = await asyncio.gather(*(first.generate(r) for r in questions(0, 1, 2, 3)))
    assert error_types(gave_up) == {"BatchApiError"}
    mock.update_config(batch_delay_s=0)
    second = make()
    second.jobs.max_lines = 2  # type: ignore[union-attr]

    waves = []
    for wave in ((0, 1), (2, 3)):  # a DSPy program: the second half after a slower step
        waves += await asyncio.gather(*(second.generate(r) for r in questions(*wave)))

    assert texts(waves) == replies(range(4))
    assert (route(mock, FILES), route(mock, "/v1/batches")) == (1, 1)
    assert mock.stats()["batch_lines"] == 4
    (state,) = list_states(tmp_path / "cache")
    assert state.collected_at is not None and len(state.delivered) == 4


# --- submitting: late answers, two runs at once, force refresh -----------------------------


async def test_a_late_create_answer_is_not_retried_and_the_rerun_finds_the_batch(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    async def late_first_create(request: web.Request, body: bytes) -> web.Response | None:
        first = (request.method, request.path) == ("POST", "/v1/batches")
        if not first or proxy.count("POST", "/v1/batches") != 1:
            return None
        answer = await proxy.forward(request, body)  # the provider has created it...
        await asyncio.sleep(0.4)  # ...but its answer comes after the client's timeout
        return answer

    proxy.fault = late_first_create
    backend = make(base_url=proxy.url, timeout_s=0.2)

    first = await quietly(backend, questions(0, 1))

    assert error_types(first) == {"BatchApiError"}
    assert all("may have been done" in r.message for r in first)
    (left,) = list_states(tmp_path / "cache")
    assert (left.status, left.batch_id) == ("uploaded", None)
    second = await quietly(backend, questions(0, 1))
    assert texts(second) == replies((0, 1))
    assert proxy.count("POST", "/v1/batches") == 1
    assert proxy.count("GET", "/v1/batches") >= 1  # find() looked it up by its input file
    assert (route(mock, FILES), mock.stats()["batch_lines"]) == (1, 2)
    (done,) = list_states(tmp_path / "cache")
    assert done.status == "completed" and done.input_file_id == left.input_file_id


@pytest.mark.parametrize("status", [400, 404, 405])
async def test_a_look_up_refused_leaves_the_job_for_the_next_run_not_sent_again(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path, status: int
) -> None:
    # The create's answer was lost (a 500 after the batch was made); the next run's
    # look-up for it is refused. That says nothing of the create: never pay twice.
    async def faults(request: web.Request, body: bytes) -> web.Response | None:
        if (request.method, request.path) == ("POST", "/v1/batches"):
            await proxy.forward(request, body)
            return web.json_response(api_error("try later"), status=500)
        if (request.method, request.path) == ("GET", "/v1/batches"):
            return web.json_response(api_error("no listing here"), status=status)
        return None

    proxy.fault = faults
    backend = make(base_url=proxy.url, max_attempts=1)
    await quietly(backend, questions(0, 1))
    again = await quietly(backend, questions(0, 1))

    (left,) = list_states(tmp_path / "cache")
    assert (left.status, left.batch_id) == ("uploaded", None)  # still there to be found
    assert proxy.count("POST", "/v1/files") == 1  # nothing uploaded a second time
    # Refused for good, the look-up would refuse every run: each is told what to do.
    assert error_types(again) == {"BatchStateError"}
    assert left.path is not None
    assert all(left.path.name in r.message and "move the file aside" in r.message for r in again)


async def test_two_runs_on_one_state_dir_share_one_upload_and_one_batch(
    make: Factory, mock: MockServer
) -> None:
    mock.update_config(batch_delay_s=0.3)  # both are still waiting when the second one looks
    requests = questions(*range(5))

    both = await asyncio.gather(quietly(make(), requests), quietly(make(), requests))

    assert [texts(results) for results in both] == [replies(range(5))] * 2
    assert (route(mock, FILES), route(mock, "/v1/batches")) == (1, 1)
    assert mock.stats()["batch_lines"] == 5


async def test_force_refresh_keeps_the_earlier_job_state_file(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    backend = make(parasail=giving_up(), force_refresh=True)
    await quietly(backend, questions(0, 1))
    (left,) = list_states(tmp_path / "cache")
    mock.update_config(batch_delay_s=0)

    assert texts(await quietly(backend, questions(0, 1))) == replies((0, 1))

    states = list_states(tmp_path / "cache")
    assert [s.batch_id for s in states][:1] == [left.batch_id]
    assert len({s.batch_id for s in states}) == len({s.path for s in states}) == 2
    assert states[0].status == "in_progress"  # still a job someone may need to cancel
    out = io.StringIO()
    batch_status_overview(backend.config, refresh=False, out=out)
    assert all(f" {s.batch_id} " in out.getvalue() for s in states)


# --- waiting and collecting --------------------------------------------------------------


class BreakableStore(MemoryStore):
    """A memory store whose writes fail while ``broken`` (a full disk, a read-only file)."""

    broken = True

    async def put_many(self, rows: Iterable[CacheRow]) -> None:
        if self.broken:
            raise OSError(28, "No space left on device")
        await super().put_many(rows)


async def test_answers_a_broken_cache_lost_are_read_from_the_job_again(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    store = BreakableStore()
    backend = make(cache=PromptCache(store))
    requests = questions(0, 1)
    assert texts(await quietly(backend, requests)) == replies((0, 1))  # the caller still gets them
    (state,) = list_states(tmp_path / "cache")
    assert (state.status, state.collected_at, state.delivered) == ("completed", None, [])
    store.broken = False
    reads = route(mock, "/v1/files/{file_id}/content")

    assert texts(await quietly(backend, requests)) == replies((0, 1))

    assert route(mock, FILES) == 1
    assert route(mock, "/v1/files/{file_id}/content") == reads + 1
    assert mock.stats()["batch_lines"] == 2
    assert len(store) == 2
    (state,) = list_states(tmp_path / "cache")
    assert state.collected_at is not None


async def test_a_poll_outage_longer_than_the_retry_budget_is_waited_out(
    make: Factory, mock: MockServer, proxy: Proxy
) -> None:
    outage = 6  # failed GETs: three polls of max_attempts=2 each

    async def down(request: web.Request, body: bytes) -> web.Response | None:
        polled = re.fullmatch(POLL, request.path) is not None
        return unavailable() if polled and proxy.count("GET", POLL) <= outage else None

    proxy.fault = down
    backend = make(base_url=proxy.url, max_attempts=2)
    progress = io.StringIO()

    results = await asyncio.wait_for(backend.run_batched(questions(0, 1), progress=progress), 5)

    assert texts(results) == replies((0, 1))
    assert proxy.count("GET", POLL) > outage
    assert progress.getvalue().count("poll failed, trying again") == outage // 2
    assert route(mock, FILES) == 1


async def test_a_job_the_provider_no_longer_knows_is_lost_and_sent_again(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    backend = make(parasail=giving_up())
    await quietly(backend, questions(0, 1))
    (left,) = list_states(tmp_path / "cache")
    mock.reset()  # its files and batches are gone (another key, the retention period)
    mock.update_config(batch_delay_s=0)

    results = await quietly(backend, questions(0, 1))

    assert texts(results) == replies((0, 1))
    assert (route(mock, FILES), mock.stats()["batch_lines"]) == (1, 2)
    states = {s.batch_id: s for s in list_states(tmp_path / "cache")}
    assert len(states) == 2
    lost = states.pop(left.batch_id)
    assert lost.status == "lost" and lost.takes(set(lost.keys)) == set()
    assert [s.status for s in states.values()] == ["completed"]


async def test_a_missing_error_file_keeps_the_answers_of_the_output_file(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    async def error_file_gone(request: web.Request, body: bytes) -> web.Response | None:
        if request.method == "GET" and request.path.endswith("/content"):
            answer = await proxy.forward(request, body)
            content = answer.body if isinstance(answer.body, bytes) else b""
            if b"choices" not in content:  # the error file: only the failed line is in it
                return web.json_response(api_error("no such file"), status=404)
            return answer
        return None

    proxy.fault = error_file_gone
    backend = make(base_url=proxy.url)
    asked = [*questions(0, 1, 2), MinimaLlmRequest("bad", [{"role": "user", "content": BAD}])]
    results = await quietly(backend, asked)

    assert texts(results[:3]) == replies((0, 1, 2))  # the output file's answers are kept
    assert isinstance(results[3], MinimaLlmFailure)
    (state,) = list_states(tmp_path / "cache")
    assert state.status != "lost" and any("error file" in e for e in state.errors)
    again = await quietly(backend, questions(0, 1, 2))
    assert texts(again) == replies((0, 1, 2)) and mock.stats()["batch_lines"] == 4


@pytest.mark.parametrize(
    ("method", "path", "cuts"),
    [("GET", CONTENT, 1), ("GET", POLL, 1), ("POST", FILES, 1)],
    ids=["content", "poll", "upload"],
)
async def test_a_body_cut_short_on_a_batch_route_is_retried(
    make: Factory, mock: MockServer, proxy: Proxy, method: str, path: str, cuts: int
) -> None:
    async def cut(request: web.Request, body: bytes) -> web.StreamResponse | None:
        hit = request.method == method and re.fullmatch(path, request.path)
        return await cut_short(request) if hit and proxy.count(method, path) <= cuts else None

    proxy.fault = cut

    results = await quietly(make(base_url=proxy.url, max_attempts=3), questions(0, 1))

    assert texts(results) == replies((0, 1))
    assert proxy.count(method, path) == cuts + 1
    assert route(mock, FILES) == 1


async def test_a_body_always_cut_short_is_a_failure_not_an_exception(
    make: Factory, proxy: Proxy
) -> None:
    async def cut(request: web.Request, body: bytes) -> web.StreamResponse | None:
        return await cut_short(request) if re.fullmatch(CONTENT, request.path) else None

    proxy.fault = cut

    results = await quietly(make(base_url=proxy.url, max_attempts=3), questions(0, 1))

    assert error_types(results) == {"BatchApiError"}
    assert all("IncompleteRead" in r.message and "3 attempts" in r.message for r in results)
    assert proxy.count("GET", CONTENT) == 3


# --- reading a job's outcome --------------------------------------------------------------


def result_line(key: str, status: int | None, body: Any = None, error: Any = None) -> str:
    response = None if status is None else {"status_code": status, "body": body}
    return json.dumps({"id": f"req-{key}", "custom_id": key, "response": response, "error": error})


def api_error(message: str, code: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": "error", "code": code}}


COMPLETION = {"choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}}]}
LINES = {
    # OpenAI's batch output spec: lines a job never ran carry these codes and no response.
    "expired": result_line("expired", None, error={"code": "batch_expired", "message": "late"}),
    "cancelled": result_line("cancelled", None, error={"code": "batch_cancelled"}),
    "refused": result_line("refused", 400, api_error("bad max_tokens", "invalid_value")),
    "failed": result_line("failed", 500, api_error("server error")),
    "limited": result_line("limited", 429, api_error("slow down")),
    "answered": result_line("answered", 200, COMPLETION),
}


@pytest.mark.parametrize(
    ("key", "error_type", "status", "resend"),
    [
        ("expired", MISSING, None, True),
        ("cancelled", MISSING, None, True),
        ("refused", "BatchRequestError", 400, False),
        ("failed", "BatchRequestError", 500, True),
        ("limited", "BatchRequestError", 429, True),
    ],
)
def test_a_line_failure_says_whether_another_job_could_answer_it(
    key: str, error_type: str, status: int | None, resend: bool
) -> None:
    outcomes: dict[str, Any] = {}

    read_lines("\n".join(LINES.values()).encode(), CHAT, {key, "answered"}, outcomes)

    assert set(outcomes) == {key, "answered"}
    failure = outcomes[key]
    assert isinstance(failure, LineFailure)
    assert (failure.error_type, failure.status, failure.worth_resending) == (
        error_type,
        status,
        resend,
    )
    assert isinstance(outcomes["answered"], Completion) and outcomes["answered"].text == "hi"


def test_the_codes_of_lines_never_run_keep_their_message() -> None:
    outcomes: dict[str, Any] = {}

    read_lines(LINES["expired"].encode() + b"\n", CHAT, {"expired"}, outcomes)

    assert outcomes["expired"].message == "late"
    assert "batch_expired" in (outcomes["expired"].snippet or "")


def test_a_key_answered_and_failed_keeps_its_answer() -> None:
    # Output file first, then the error file; a provider that lists one request in both
    # must not cost us the completion already paid for.
    outcomes: dict[str, Any] = {}
    answered = result_line("k", 200, COMPLETION)
    failed = result_line("k", 500, api_error("server error"))
    read_lines(answered.encode(), CHAT, {"k"}, outcomes)
    read_lines(failed.encode(), CHAT, {"k"}, outcomes)
    assert isinstance(outcomes["k"], Completion)
    later: dict[str, Any] = {}
    read_lines(f"{failed}\n{answered}".encode(), CHAT, {"k"}, later)
    assert isinstance(later["k"], Completion)


def test_a_failed_batch_keeps_its_errors_in_the_state_file(tmp_path: Path) -> None:
    state = JobState("p", "0" * 64, "/v1/" + CHAT, "http://127.0.0.1:1/v1", "m", 2)
    state.path = tmp_path / "p.batch.json"
    errors = [
        {"code": "invalid_json_line", "message": "line 1 is not JSON", "line": 1},
        {"code": "mismatched_endpoint", "message": "wrong url", "line": 2},
    ]

    state.update({"id": "b", "status": "failed", "errors": {"object": "list", "data": errors}})
    state.save()

    assert state.errors == ["line 1 is not JSON", "wrong url"]
    assert state.terminal and state.takes({"a"}) == set()
    (loaded,) = list_states(tmp_path)
    assert loaded.errors == state.errors


async def test_a_batch_that_fails_validation_says_why_in_each_failure(
    make: Factory, proxy: Proxy, tmp_path: Path
) -> None:
    async def wrong_endpoint(request: web.Request, body: bytes) -> web.Response | None:
        # Each line now names another endpoint than the batch: the mock fails it as OpenAI does.
        if (request.method, request.path) != ("POST", FILES):
            return None
        wrong = body.replace(b'"url":"/v1/chat/completions"', b'"url":"/v1/completions"')
        assert wrong != body
        return await proxy.forward(request, wrong)

    proxy.fault = wrong_endpoint

    results = await quietly(make(base_url=proxy.url), questions(0, 1))

    why = "'url' must be the batch's /v1/chat/completions"
    (state,) = list_states(tmp_path / "cache")
    assert (state.status, state.errors) == ("failed", [why, why])
    assert all(isinstance(r, MinimaLlmFailure) for r in results)
    assert all(f"{state.batch_id} ended failed" in r.message for r in results)
    assert all(why in r.message for r in results)


# --- how requests are split into jobs, and traced ------------------------------------------


async def test_concurrent_generate_calls_keep_to_max_lines(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    backend = make()
    backend.jobs.max_lines = 3  # type: ignore[union-attr]  # before the first call makes the collector

    results = await asyncio.gather(*(backend.generate(r) for r in questions(*range(7))))

    assert texts(results) == replies(range(7))
    assert sorted(s.request_count for s in list_states(tmp_path / "cache")) == [1, 3, 3]
    assert (route(mock, FILES), mock.stats()["batch_lines"]) == (3, 7)


async def test_run_batched_splits_a_job_by_bytes(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    backend = make()
    jobs = backend.jobs
    assert jobs is not None
    jobs.max_bytes = 700

    results = await quietly(backend, questions(*range(5)))

    assert texts(results) == replies(range(5))
    states = await assert_split_by_bytes(tmp_path / "cache", jobs, 5)
    assert route(mock, FILES) == len(states)


async def test_answers_from_a_job_are_traced_like_live_misses(
    make: Factory, tmp_path: Path
) -> None:
    traced = {}
    for mode in ("live", "batch"):
        trace = tmp_path / f"{mode}.jsonl"
        backend = make(live=mode == "live", cache_dir=tmp_path / mode, trace_file=str(trace))
        texts(await quietly(backend, questions(0, 1, 0)))
        await backend.aclose()
        lines = [json.loads(line) for line in trace.read_text().splitlines()]
        traced[mode] = sorted((line["key"], line["source"]) for line in lines)

    assert len(traced["batch"]) == 3
    assert traced["batch"] == traced["live"]


# --- the command line ---------------------------------------------------------------------


def test_cli_cancel_remote_without_an_endpoint_says_so_at_once(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for var in ("OPENAI_BASE_URL", "OPENAI_MODEL", "OPENAI_API_KEY", "OPENAI_TOKEN"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("CACHE_DIR", str(tmp_path / "cache"))
    started = time.monotonic()

    code = main(["batch-status", "--cancel-remote", "batch_x"])

    assert time.monotonic() - started < 0.5  # no retries against an address that cannot resolve
    assert code == 2
    err = capsys.readouterr().err
    assert err.startswith("minima-llm: ") and "OPENAI_BASE_URL" in err and "batch_x" in err


# --- bugs still open --------------------------------------------------------------------------


async def test_a_line_resent_from_a_taken_over_job_leaves_the_other_answers(
    make: Factory, mock: MockServer
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    requests = [*questions(0), MinimaLlmRequest("bad", [{"role": "user", "content": BAD}])]
    await quietly(make(parasail=giving_up()), requests)
    mock.update_config(batch_delay_s=0)

    results = await quietly(make(), requests)

    assert texts(results[:1]) == replies((0,))
    assert isinstance(results[1], MinimaLlmFailure)
    assert (results[1].error_type, results[1].status) == ("BatchRequestError", 500)
    assert route(mock, FILES) == 2  # the 500 line was sent again, in a job of its own


async def test_a_job_whose_every_answer_is_cached_counts_as_collected(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    mock.update_config(batch_delay_s=SLOW)
    await quietly(make(parasail=giving_up()), questions(0, 1, 2))
    await make(live=True).generate(questions(0)[0])
    mock.update_config(batch_delay_s=0)

    assert texts(await quietly(make(), questions(0, 1, 2))) == replies(range(3))

    (state,) = list_states(tmp_path / "cache")
    assert state.answered is not None and len(state.answered) == 3
    assert state.collected_at is not None
