"""Batch mode when runs overlap: take-over races, cancels, the lock file, refused uploads.

Each test pins a fix a second review's reproduction called for, over real HTTP on
127.0.0.1, with bounded waits. Faults on the Files and Batches routes come from
``Proxy``, an aiohttp app in front of the mock that forwards every request unless
the test's ``fault`` answers it (as in ``test_batch_resilience``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import errno
import io
import json
import logging
import os
import re
import socket
import subprocess
import threading
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from aiohttp import web
from jobs_support import (
    BAD,
    BATCHES,
    FILES,
    GIVE_UP,
    POLL,
    SLOW,
    Factory,
    Proxy,
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
    cancel_all_local_batches,
)
from minima_llm.cache.memory import MemoryStore
from minima_llm.cache.prompt import PromptCache
from minima_llm.cache.store import CacheRow
from minima_llm.clock import FakeClock
from minima_llm.jobs import BatchApi, BatchApiError, JobState, LineFailure, ProviderJobs
from minima_llm.jobs import lock as lock_module
from minima_llm.jobs.lines import MISSING
from minima_llm.jobs.lock import held, lock_path, locked
from minima_llm.jobs.state import list_states
from minima_llm.testing import MockConfig, MockServer, run_mock_server_in_thread
from minima_llm.upstream import Completion

HOST = socket.gethostname()


async def eventually(condition: Callable[[], bool], within_s: float = 3.0) -> None:
    """Wait until ``condition()`` holds; fail the test if it does not within ``within_s``."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"still not {condition}"
        await asyncio.sleep(0.01)


async def given_up(make: Factory, mock: MockServer, requests: list[MinimaLlmRequest]) -> None:
    """A first run that gives up on its job and leaves it running, uncollected."""
    mock.update_config(batch_delay_s=SLOW)
    assert error_types(
        await quietly(make(parasail=parasail(max_poll_hours=GIVE_UP)), requests)
    ) == {"BatchApiError"}


# --- a proxy for faults on the batch routes ----------------------------------------------


def creating(request: web.Request) -> bool:
    return (request.method, request.path) == ("POST", BATCHES)


# --- 1. a job collected between a run's cache check and its take-over -------------------


class LateStore(MemoryStore):
    """A store whose reads answer what it held, but only once ``until()`` holds.

    The run reading it sees misses, then reaches the take-over after another run
    has collected the job: the window a slow cache read opens in real life.
    """

    def __init__(self, until: Callable[[], bool]) -> None:
        super().__init__()
        self.until = until

    async def get_many(self, keys: Any) -> dict[str, CacheRow]:
        found = await super().get_many(keys)
        await eventually(self.until)
        return found


async def test_a_job_collected_after_a_run_read_the_cache_still_answers_that_run(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    requests = questions(0, 1, 2)
    await given_up(make, mock, requests)
    mock.update_config(batch_delay_s=0)

    def collected() -> bool:
        return all(s.collected_at is not None for s in list_states(tmp_path / "cache"))

    late = make(cache=PromptCache(LateStore(collected)))

    both = await asyncio.gather(quietly(make(), requests), quietly(late, requests))

    assert [texts(results) for results in both] == [replies(range(3))] * 2
    assert [r.cached for r in both[1]] == [False] * 3  # from the job, not from a cache
    assert (route(mock, FILES), mock.stats()["batch_lines"]) == (1, 3)
    assert len(list_states(tmp_path / "cache")) == 1


def test_threads_asking_the_same_question_a_little_apart_share_one_upload(
    tmp_path: Path,
) -> None:
    # DSPy: each thread calls asyncio.run(generate(...)). The second misses the cache while
    # the first one's job runs; its collector flushes after that job was collected.
    with run_mock_server_in_thread(MockConfig(batch_delay_s=SLOW)) as server:
        backend = OpenAIMinimaLlm(config(server.url, tmp_path / "cache", parasail=parasail()))
        results: dict[str, MinimaLlmResult] = {}

        def ask(name: str) -> None:
            results[name] = asyncio.run(backend.generate(questions(7)[0]))

        threads = {n: threading.Thread(target=ask, args=(n,), daemon=True) for n in ("t1", "t2")}
        try:
            threads["t1"].start()
            asyncio.run(
                eventually(lambda: any(s.batch_id for s in list_states(tmp_path / "cache")))
            )
            threads["t2"].start()
            asyncio.run(eventually(lambda: backend.snapshot().requests == 2))
            time.sleep(0.15)  # t2 has found the cache empty (its flush is 0.5 s away)
            server.set_config(batch_delay_s=0)  # t1's job ends and is collected
            for thread in threads.values():
                thread.join(timeout=5)
        finally:
            asyncio.run(backend.aclose())
        stats = server.stats()

    assert [t.is_alive() for t in threads.values()] == [False, False]
    assert texts(results.values()) == replies((7, 7))
    assert [r.cached for r in results.values()] == [False, False]  # type: ignore[union-attr]
    assert (stats["by_route"].get(FILES), stats["batch_lines"]) == (1, 1)


# --- 2. two runs resending the same failed line --------------------------------------------


async def test_two_runs_taking_over_a_job_with_a_5xx_line_share_one_resend_job(
    make: Factory, mock: MockServer, proxy: Proxy
) -> None:
    requests = [*questions(0), MinimaLlmRequest("bad", [{"role": "user", "content": BAD}])]
    await given_up(lambda **kw: make(base_url=proxy.url, **kw), mock, requests)
    progress = [io.StringIO(), io.StringIO()]
    runs = [
        asyncio.ensure_future(quietly(make(base_url=proxy.url), requests, out)) for out in progress
    ]
    await eventually(lambda: all("requests from it" in p.getvalue() for p in progress))
    mock.update_config(batch_delay_s=0.3)  # the job ends; the resend job runs 0.3 s

    for results in await asyncio.gather(*runs):
        assert texts(results[:1]) == replies((0,))
        assert (results[1].error_type, results[1].status) == ("BatchRequestError", 500)

    assert all("sending 1 requests again" in p.getvalue() for p in progress)
    assert (proxy.count("POST", FILES), proxy.count("POST", BATCHES)) == (2, 2)
    assert mock.stats()["batch_lines"] == 3  # the 5xx line ran twice in all, not three times


# --- 3. a run cancelled while its create is in flight ----------------------------------------


async def test_a_run_cancelled_during_its_create_keeps_the_lock_until_the_create_returns(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    async def slow_first_create(request: web.Request, body: bytes) -> None:
        if creating(request) and proxy.count("POST", BATCHES) == 1:
            await asyncio.sleep(0.4)  # a slow provider: the batch is made after this

    proxy.fault = slow_first_create
    requests = questions(0, 1, 2)
    lock = lock_path(tmp_path / "cache")
    first = asyncio.ensure_future(make(base_url=proxy.url).run_batched(requests, progress=False))
    await eventually(lambda: proxy.count("POST", BATCHES) == 1)
    later = asyncio.ensure_future(quietly(make(base_url=proxy.url), requests))
    await asyncio.sleep(0.05)  # the later run waits on the lock

    first.cancel()
    with pytest.raises(asyncio.CancelledError):
        await first

    assert lock.exists()  # held for the create the cancelled run started
    assert texts(await later) == replies(range(3))
    assert (proxy.count("POST", FILES), proxy.count("POST", BATCHES)) == (1, 1)
    assert mock.stats()["batch_lines"] == 3
    assert not lock.exists()
    (state,) = list_states(tmp_path / "cache")
    assert state.batch_id is not None and state.collected_at is not None


# --- 4. the lock file --------------------------------------------------------------------------


def lock_text(pid: int | str, token: str, host: str = HOST) -> str:
    return f"{host} {pid} {token}\n"


def age(path: Path, seconds: float) -> None:
    then = time.time() - seconds
    os.utime(path, (then, then))


async def test_a_release_leaves_a_lock_file_another_holder_wrote(tmp_path: Path) -> None:
    # The holder was taken for dead (a long stall) and another run took the lock meanwhile.
    path = lock_path(tmp_path)
    foreign = lock_text(os.getpid(), "someone-else")
    with held(path):
        path.write_text(foreign)
    assert path.read_text() == foreign
    path.unlink()
    async with locked(path):
        path.write_text(foreign)
    assert path.read_text() == foreign


def test_a_lock_file_naming_a_live_holder_is_waited_for(tmp_path: Path) -> None:
    path = lock_path(tmp_path)
    path.write_text(lock_text(os.getpid(), "someone-else"))
    holder = f"locked by {HOST} pid {os.getpid()}"
    with pytest.raises(BatchApiError, match=holder), held(path, wait_s=0.1):
        pass


def test_a_lock_file_naming_a_dead_pid_on_this_host_is_broken_at_once(tmp_path: Path) -> None:
    dead = subprocess.Popen(["true"])
    dead.wait()
    path = lock_path(tmp_path)
    path.write_text(lock_text(dead.pid, "gone"))
    started = time.monotonic()
    with held(path, wait_s=1.0):
        assert f" {os.getpid()} " in path.read_text()
    assert time.monotonic() - started < 0.5
    assert not path.exists()


def test_a_lock_file_untouched_for_stale_s_is_broken(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_module, "STALE_S", 0.5)
    path = lock_path(tmp_path)
    path.write_text(lock_text(1, "elsewhere", host="another-node"))  # its pid cannot be asked
    with pytest.raises(BatchApiError), held(path, wait_s=0.1):
        pass
    age(path, 1.0)
    with held(path, wait_s=0.1):
        assert f" {os.getpid()} " in path.read_text()


async def test_a_held_lock_is_touched_every_touch_s(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_module, "TOUCH_S", 0.05)
    path = lock_path(tmp_path)
    async with locked(path):
        age(path, 100)
        await eventually(lambda: time.time() - path.stat().st_mtime < 50, within_s=1.0)


async def test_a_slow_upload_keeps_the_lock_fresh_so_no_second_run_submits(
    make: Factory, mock: MockServer, proxy: Proxy, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(lock_module, "STALE_S", 0.3)
    monkeypatch.setattr(lock_module, "TOUCH_S", 0.05)

    async def slow_upload(request: web.Request, body: bytes) -> None:
        if (request.method, request.path) == ("POST", FILES):
            await asyncio.sleep(0.7)  # longer than STALE_S

    proxy.fault = slow_upload
    requests = questions(0, 1, 2)

    async def later() -> list[Any]:
        await asyncio.sleep(0.1)
        return await quietly(make(base_url=proxy.url), requests)

    both = await asyncio.gather(quietly(make(base_url=proxy.url), requests), later())

    assert [texts(results) for results in both] == [replies(range(3))] * 2
    assert (proxy.count("POST", FILES), proxy.count("POST", BATCHES)) == (1, 1)


class InlineExecutor(concurrent.futures.ThreadPoolExecutor):
    """Runs each job at once on the caller's thread: a take is done before its await returns."""

    def submit(self, fn: Any, /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        future: concurrent.futures.Future[Any] = concurrent.futures.Future()
        try:
            future.set_result(fn(*args, **kwargs))
        except BaseException as exc:
            future.set_exception(exc)
        return future


async def test_a_task_cancelled_while_its_take_runs_leaves_no_lock_file(tmp_path: Path) -> None:
    # The take is a file call on a worker thread: it creates the file even if the task
    # awaiting it is cancelled first. The inline executor makes that the certain order.
    asyncio.get_running_loop().set_default_executor(InlineExecutor())
    path = lock_path(tmp_path)
    entered = False

    async def user() -> None:
        nonlocal entered
        async with locked(path):
            entered = True
            await asyncio.sleep(10)

    task = asyncio.ensure_future(user())
    for _ in range(100):  # loop turns, not time: cancel as soon as the file is there
        if path.exists():
            break
        await asyncio.sleep(0)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task

    assert not entered
    assert not path.exists()


async def test_a_task_cancelled_while_waiting_for_the_lock_leaves_the_holder_s_file(
    tmp_path: Path,
) -> None:
    path = lock_path(tmp_path)
    foreign = lock_text(os.getpid(), "holder")
    path.write_text(foreign)

    async def wait_for_it() -> None:
        async with locked(path):
            pytest.fail("took a lock someone holds")

    with pytest.raises(asyncio.TimeoutError):  # TimeoutError itself from 3.11 on
        await asyncio.wait_for(wait_for_it(), 0.2)
    assert path.read_text() == foreign
    path.unlink()
    async with locked(path):
        pass
    assert not path.exists()


def test_many_takers_of_one_stale_lock_hold_it_one_at_a_time(tmp_path: Path) -> None:
    takers = 8
    inside, most = 0, 0
    won: list[int] = []
    count = threading.Lock()
    barrier = threading.Barrier(takers)

    def take(path: Path) -> None:
        nonlocal inside, most
        barrier.wait(timeout=5)
        with contextlib.suppress(BatchApiError), held(path, wait_s=0):  # one try: the break races
            with count:
                inside += 1
                most = max(most, inside)
                won.append(1)
            time.sleep(0.005)
            with count:
                inside -= 1

    for trial in range(40):  # about 7 in 10 trials show two holders
        path = lock_path(tmp_path / str(trial))
        path.parent.mkdir()
        path.write_text(lock_text(1, "gone", host="another-node"))
        age(path, 2 * lock_module.STALE_S)
        wins_before = len(won)
        threads = [threading.Thread(target=take, args=(path,)) for _ in range(takers)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(timeout=5)
        assert most == 1, f"trial {trial}: {most} holders at once"
        # The stale lock was broken; a taker that came after the holder left may win too.
        assert len(won) > wins_before


def reader_waiting(fifo: Path) -> int:
    """A write end of the named pipe, once a reader has opened it (bounded wait)."""
    deadline = time.monotonic() + 2
    while True:
        try:
            return os.open(fifo, os.O_WRONLY | os.O_NONBLOCK)
        except OSError as exc:  # ENXIO: no reader yet
            if exc.errno != errno.ENXIO or time.monotonic() > deadline:
                raise
            time.sleep(0.005)


def breaking(path: Path) -> tuple[threading.Thread, list[bool]]:
    """A taker trying once, in a thread; its list says whether it got the lock."""
    got: list[bool] = []

    def take() -> None:
        with contextlib.suppress(BatchApiError), held(path, wait_s=0):
            got.append(True)

    thread = threading.Thread(target=take, daemon=True)
    thread.start()
    return thread, got


def stale_pipe(path: Path) -> None:
    # A named pipe as the lock file pauses a taker in each read of it, so a test can act
    # between the taker's look at a lock and what it does about it.
    os.mkfifo(path)
    age(path, 10 * lock_module.STALE_S)


def test_a_lock_retaken_after_a_breaker_looked_at_it_is_left_to_its_holder(
    tmp_path: Path,
) -> None:
    path = lock_path(tmp_path)
    stale_pipe(path)
    breaker, got = breaking(path)
    fd = reader_waiting(path)  # the breaker has seen an old lock and reads who holds it
    path.unlink()  # meanwhile its holder's lock was broken and taken by another run: us
    with held(path, wait_s=0):
        mine = path.read_text()
        os.write(fd, lock_text(1, "gone", host="another-node").encode())
        os.close(fd)
        breaker.join(timeout=2)
        assert not breaker.is_alive() and got == []
        assert path.read_text() == mine
    assert not list(tmp_path.iterdir())


# --- 5. an upload whose create is refused for good -------------------------------------------


@pytest.mark.parametrize("status", [400, 404])
async def test_an_upload_whose_create_is_refused_is_failed_and_its_keys_sent_anew(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path, status: int
) -> None:
    refused: list[str] = []

    async def refuse_the_first_file(request: web.Request, body: bytes) -> web.Response | None:
        if not creating(request):
            return None
        file_id = json.loads(body)["input_file_id"]
        refused[:] = refused or [file_id]
        if file_id != refused[0]:
            return None
        message = f"No such File object: {file_id}"
        return web.json_response({"error": {"message": message}}, status=status)

    proxy.fault = refuse_the_first_file
    first = await quietly(make(base_url=proxy.url), questions(0))
    assert error_types(first) == {"BatchApiError"}
    (left,) = list_states(tmp_path / "cache")
    assert (left.status, left.batch_id) == ("uploaded", None)

    results = await quietly(make(base_url=proxy.url), questions(*range(5)))

    assert texts(results) == replies(range(5))  # the refused one's key and four others
    states = {s.input_file_id: s for s in list_states(tmp_path / "cache")}
    failed = states.pop(left.input_file_id)
    assert failed.status == "failed" and f"HTTP {status}" in failed.errors[0]
    assert failed.takes(set(failed.keys)) == set()
    (new,) = states.values()
    assert set(failed.keys) < set(new.keys) and new.status == "completed"
    assert (proxy.count("POST", FILES), proxy.count("POST", BATCHES)) == (2, 3)
    assert mock.stats()["batch_lines"] == 5


# --- 6. a cancel while a run waits on the job it took over -----------------------------------


async def test_a_cancel_stops_the_resend_of_a_waiting_run_but_not_of_a_later_one(
    make: Factory, mock: MockServer, proxy: Proxy
) -> None:
    requests = questions(*range(5))
    await given_up(lambda **kw: make(base_url=proxy.url, **kw), mock, requests)
    polls_down = False

    async def down(request: web.Request, body: bytes) -> web.Response | None:
        if polls_down and re.fullmatch(POLL, request.path) and request.method == "GET":
            return web.json_response({"error": {"message": "batch API down"}}, status=503)
        return None

    proxy.fault = down
    early, late = io.StringIO(), io.StringIO()
    waiting = make(base_url=proxy.url, max_attempts=2)
    first = asyncio.ensure_future(quietly(waiting, requests, early))
    await eventually(lambda: "in_progress" in early.getvalue())  # taken over and polled
    polls_down = True  # neither run sees the cancel land until the later run has taken over
    assert await asyncio.to_thread(cancel_all_local_batches, waiting.config)
    mock.update_config(batch_delay_s=0)
    second = asyncio.ensure_future(
        quietly(make(base_url=proxy.url, max_attempts=2), requests, late)
    )
    await eventually(lambda: "5 requests from it" in late.getvalue())
    polls_down = False

    stopped, resent = await asyncio.gather(first, second)

    assert error_types(stopped) == {MISSING}
    assert all("ended cancelled" in r.message for r in stopped)
    # Not "again" alone: a poll of the outage says "poll failed, trying again".
    assert "requests again" not in early.getvalue()
    assert texts(resent) == replies(range(5))
    assert "sending 5 requests again" in late.getvalue()
    assert proxy.count("POST", FILES) == 2  # the job given up on, and the later resend
    assert mock.stats()["batch_lines"] == 5


# --- 7. an error answer whose body is cut short ----------------------------------------------


async def cut_503(request: web.Request) -> web.StreamResponse:
    """A 503 that promises 1000 bytes, sends 10 and hangs up: ``exc.read()`` fails."""
    resp = web.StreamResponse(status=503, headers={"Content-Length": "1000"})
    await resp.prepare(request)
    await resp.write(b'{"error": ')
    assert request.transport is not None
    request.transport.close()
    return resp


async def test_a_503_poll_answer_with_a_cut_body_is_retried_like_any_503(
    make: Factory, proxy: Proxy
) -> None:
    async def cut(request: web.Request, body: bytes) -> web.StreamResponse | None:
        polled = request.method == "GET" and re.fullmatch(POLL, request.path)
        return await cut_503(request) if polled and proxy.count("GET", POLL) <= 3 else None

    proxy.fault = cut
    progress = io.StringIO()

    results = await quietly(make(base_url=proxy.url, max_attempts=2), questions(0, 1), progress)

    assert texts(results) == replies((0, 1))
    assert proxy.count("GET", POLL) > 3
    assert "poll failed, trying again" in progress.getvalue()
    assert proxy.count("POST", FILES) == 1


async def test_an_error_answer_always_cut_is_a_batch_api_error_naming_its_status(
    proxy: Proxy,
) -> None:
    async def cut(request: web.Request, body: bytes) -> web.StreamResponse:
        return await cut_503(request)

    proxy.fault = cut
    api = BatchApi(proxy.url, None, 5.0, attempts=3, sleep=lambda _: None)

    with pytest.raises(BatchApiError, match=r"3 attempts \(HTTP 503: \(body unreadable"):
        await api.aget("batch_x")
    assert proxy.count("GET", POLL) == 3


# --- 8. a state file with a field of the wrong type --------------------------------------------


def write_state(directory: Path, base_url: str, **fields: Any) -> Path:
    """A state file a batch-mode run on ``base_url`` would look at, with ``fields`` changed."""
    state = JobState("p", "f" * 64, "/v1/chat/completions", base_url, "mock-model", 1)
    state.path = directory / "p-ffffffffffffffff.batch.json"
    state.batch_id, state.keys = "batch_old", ["k"]
    state.save()
    data = json.loads(state.path.read_text())
    state.path.write_text(json.dumps({**data, **fields}))
    return state.path


@pytest.mark.parametrize(
    "fields",
    [
        {"keys": None},
        {"keys": "k"},
        {"delivered": None},
        {"answered": 5},
        {"errors": {}},
        {"request_counts": []},
        {"created_at": "yesterday"},
        {"cancel_requested_at": "soon"},
    ],
    ids=lambda f: "-".join(f"{k}={v!r}" for k, v in f.items()),
)
async def test_a_state_file_with_a_field_of_the_wrong_type_stops_its_prefix_from_paying_twice(
    make: Factory,
    mock: MockServer,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    fields: dict[str, Any],
) -> None:
    cache = tmp_path / "cache"
    cache.mkdir()
    bad = write_state(cache, mock.url, **fields)
    with caplog.at_level(logging.WARNING, logger="minima_llm.jobs"):
        assert list_states(cache) == []  # the overview steps over it, saying so
    assert bad.name in caplog.text
    # It may be a job holding these very requests: a run of its prefix sends nothing,
    # fails each request naming the file, and goes on once the file is moved aside.
    refused = await quietly(make(), questions(0, 1))
    assert error_types(refused) == {"BatchStateError"}
    assert all(bad.name in r.message and "move it aside" in r.message for r in refused)
    assert route(mock, FILES) == 0
    bad.rename(bad.with_suffix(".broken"))
    assert texts(await quietly(make(), questions(0, 1))) == replies((0, 1))
    assert len(list_states(cache)) == 1


# --- 9. the JSONL lines and the size estimate ---------------------------------------------------


FEW_SHOT = [
    {"role": "user" if i % 2 == 0 else "assistant", "content": f"few-shot example {i:04d} ab"}
    for i in range(100)
]


async def test_job_lines_are_compact_and_within_run_batched_s_size_estimate(
    make: Factory, tmp_path: Path
) -> None:
    requests = [
        *questions(0),
        MinimaLlmRequest("few-shot", FEW_SHOT, temperature=0.0, max_tokens=256),
        MinimaLlmRequest("extra", FEW_SHOT[:9], extra={"top_p": 0.5, "stop": ["\n", "x y"]}),
    ]
    backend = make()
    jobs = backend.jobs
    assert jobs is not None

    assert len(texts(await quietly(backend, requests))) == 3

    (state,) = list_states(tmp_path / "cache")
    assert state.input_file_id is not None
    lines = (await jobs.api.acontent(state.input_file_id)).decode().splitlines(keepends=True)
    # run_batched sizes a job by each request's canonical JSON plus 200 bytes a line.
    estimate = {backend.key_for(r)[0]: len(backend.key_for(r)[1]) + 200 for r in requests}
    assert len(lines) == len(estimate)
    for line in lines:
        parsed = json.loads(line)
        assert line == json.dumps(parsed, separators=(",", ":")) + "\n"
        assert len(line.encode()) <= estimate[parsed["custom_id"]]


async def test_a_message_that_is_a_mapping_but_not_a_dict_can_be_sent_in_a_job(
    make: Factory,
) -> None:
    message = types.MappingProxyType({"role": "user", "content": "question 0"})
    request = MinimaLlmRequest("frozen", [message])

    results = await quietly(make(), [request])

    assert not isinstance(results[0], MinimaLlmFailure), results[0]
    assert texts(results) == replies((0,))


# --- 10. one max_poll_hours for a whole call ---------------------------------------------------


async def test_the_resend_round_shares_the_call_s_max_poll_hours(
    mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    limit_s = 50.0
    clock = FakeClock()
    cfg = config(
        proxy.url,
        tmp_path / "cache",
        parasail=parasail(max_poll_hours=limit_s / 3600, poll_interval_s=1.0),
    )
    jobs = ProviderJobs(cfg, clock=clock)
    bodies = {
        key: {"model": "mock-model", "messages": [{"role": "user", "content": text}]}
        for key, text in (("k-ok", "fine"), ("k-bad", f"fails {BAD}"))
    }
    mock.update_config(batch_delay_s=SLOW)
    first = await jobs.run("chat/completions", "mock-model", bodies)  # gives up, leaves its job
    assert {o.error_type for o in first.values() if isinstance(o, LineFailure)} == {"BatchApiError"}
    (left,) = list_states(tmp_path / "cache")
    mock.update_config(batch_delay_s=0)
    polls: dict[str, int] = {}

    async def slow_progress(request: web.Request, body: bytes) -> web.StreamResponse | None:
        # The job taken over answers "in_progress" to its first 20 polls (20 s of the
        # fake clock); the resend job never finishes.
        if request.method != "GET" or not re.fullmatch(POLL, request.path):
            return None
        batch_id = request.path.rsplit("/", 1)[1]
        polls[batch_id] = polls.get(batch_id, 0) + 1
        answer = await proxy.forward(request, body)
        if batch_id == left.batch_id and polls[batch_id] > 20:
            return answer
        assert answer.body is not None
        batch = json.loads(bytes(answer.body))
        return web.json_response({**batch, "status": "in_progress", "output_file_id": None})

    proxy.fault = slow_progress
    started = clock.monotonic()

    second = await jobs.run("chat/completions", "mock-model", bodies)

    assert isinstance(second["k-ok"], Completion)  # from the job taken over
    resent = second["k-bad"]
    assert isinstance(resent, LineFailure) and "max_poll_hours" in resent.message
    assert len(polls) == 2  # the job taken over, then the resend job
    # Without one bound the resend round would wait its own 50 s after the first 20.
    assert clock.monotonic() - started <= limit_s + 1.0


# --- 11. a state directory shared by several API keys -------------------------------------------


async def test_a_job_of_another_api_key_is_not_taken_over(
    make: Factory, mock: MockServer, tmp_path: Path
) -> None:
    # A lab sharing one project directory, each with a key of their own: a real provider
    # answers 404 for another key's batch, which would mark the job lost for its owner.
    mock.update_config(batch_delay_s=SLOW)
    mine = await quietly(
        make(api_key="sk-alice", parasail=parasail(max_poll_hours=GIVE_UP)), questions(0, 1)
    )
    assert error_types(mine) == {"BatchApiError"}  # left running
    mock.update_config(batch_delay_s=0)

    theirs = await quietly(make(api_key="sk-bob"), questions(0, 1))
    again = await quietly(make(api_key="sk-alice"), questions(0, 1))

    assert texts(theirs) == texts(again) == replies([0, 1])
    assert route(mock, FILES) == 2  # Alice's job, taken over by Alice; Bob's own
    states = list_states(tmp_path / "cache")
    assert len({s.key_id for s in states}) == 2
    assert all("sk-" not in s.path.read_text() for s in states if s.path)  # no key on disk
