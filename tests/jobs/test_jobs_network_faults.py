"""Batch jobs when the provider's network misbehaves: redirects, long listings, a busy lock.

Over real HTTP on 127.0.0.1: the mock behind ``Proxy`` (see ``jobs_support``), whose
``fault`` plays the provider's odd answers, and a second ``Proxy`` standing for a
storage host of another origin (a presigned, S3-style download URL).
"""

from __future__ import annotations

import asyncio
import logging
import re
import secrets
import sys
import textwrap
import time
from collections.abc import AsyncIterator, Callable
from pathlib import Path

import pytest
from aiohttp import web
from jobs_support import (
    BATCHES,
    CONTENT,
    FILES,
    Factory,
    Fault,
    Proxy,
    error_types,
    questions,
    quietly,
    replies,
    route,
    texts,
)

from minima_llm.jobs import BatchApi, BatchApiError
from minima_llm.jobs.api import MAX_REDIRECTS
from minima_llm.jobs.lock import lock_path, locked
from minima_llm.jobs.state import list_states
from minima_llm.testing import MockServer

KEY = "sk-test-not-for-anyone-else"
LISTING = "/v1/batches"  # GET: one page of the batch list


async def eventually(condition: Callable[[], bool], within_s: float = 5.0) -> None:
    """Wait until ``condition()`` holds; fail the test if it does not within ``within_s``."""
    deadline = time.monotonic() + within_s
    while not condition():
        assert time.monotonic() < deadline, f"still not {condition}"
        await asyncio.sleep(0.01)


def downloading(request: web.Request) -> bool:
    return request.method == "GET" and re.fullmatch(CONTENT, request.path) is not None


# --- 1. a result download that redirects -----------------------------------------------------


class Storage:
    """A storage host serving presigned URLs; like S3 it refuses a request with a second credential."""

    def __init__(self, server: Proxy) -> None:
        self.root = server.url.removesuffix("/v1")
        self.blobs: dict[str, bytes] = {}
        self.credentials: list[str | None] = []  # the Authorization header of each request
        server.fault = self.serve

    def presign(self, blob: bytes, root: str | None = None) -> str:
        """A URL that serves ``blob``, on this host or on another that passes ``serve`` on."""
        token = secrets.token_hex(8)
        self.blobs[token] = blob
        return f"{root or self.root}/bucket/{token}?X-Amz-Signature=abc"

    async def serve(self, request: web.Request, body: bytes) -> web.Response:
        self.credentials.append(request.headers.get("Authorization"))
        if request.headers.get("Authorization"):
            message = "<Error><Code>InvalidArgument</Code><Message>Only one auth mechanism allowed"
            return web.Response(status=400, text=message, content_type="application/xml")
        blob = self.blobs.get(request.path.rsplit("/", 1)[-1])
        return web.Response(status=403) if blob is None else web.Response(body=blob)


@pytest.fixture
async def storage(mock: MockServer) -> AsyncIterator[Storage]:
    async with Proxy(mock.url) as server:
        yield Storage(server)


def presigning(
    proxy: Proxy, storage: Storage, credentials: list[str | None], root: str | None = None
) -> Fault:
    """Answer each download with a 302 to a presigned URL, as Parasail-style providers do."""

    async def fault(request: web.Request, body: bytes) -> web.Response | None:
        if request.path.startswith("/bucket/"):
            return await storage.serve(request, body)  # the provider's host serves it too
        if not downloading(request):
            return None
        credentials.append(request.headers.get("Authorization"))
        answer = await proxy.forward(request, body)
        assert isinstance(answer.body, bytes)
        location = storage.presign(answer.body, root)
        return web.Response(status=302, headers={"Location": location})

    return fault


async def test_a_download_redirected_to_another_host_is_followed_without_the_api_key(
    make: Factory, proxy: Proxy, storage: Storage
) -> None:
    at_provider: list[str | None] = []
    proxy.fault = presigning(proxy, storage, at_provider)

    results = await quietly(make(base_url=proxy.url, api_key=KEY), questions(0, 1, 2))

    assert texts(results) == replies(range(3))
    assert at_provider == [f"Bearer {KEY}"]  # the provider's own origin gets the key...
    assert storage.credentials == [None]  # ...the storage host never sees it


async def test_a_presigned_url_on_the_provider_s_own_host_gets_no_api_key_either(
    make: Factory, proxy: Proxy, storage: Storage
) -> None:
    # The URL carries its own signature: S3 refuses a request with a second credential.
    at_provider: list[str | None] = []
    proxy.fault = presigning(proxy, storage, at_provider, root=proxy.url.removesuffix("/v1"))

    results = await quietly(make(base_url=proxy.url, api_key=KEY), questions(0, 1))

    assert texts(results) == replies((0, 1))
    assert at_provider == [f"Bearer {KEY}"]
    assert storage.credentials == [None]
    assert proxy.count("GET", r"/bucket/\w+") == 1


async def test_a_download_redirected_within_the_provider_s_origin_keeps_the_api_key(
    make: Factory, proxy: Proxy
) -> None:
    blobs: dict[str, bytes] = {}

    async def fault(request: web.Request, body: bytes) -> web.Response | None:
        if downloading(request):
            answer = await proxy.forward(request, body)
            assert isinstance(answer.body, bytes)
            token = secrets.token_hex(8)
            blobs[token] = answer.body
            return web.Response(status=307, headers={"Location": f"../../downloads/{token}"})
        if request.path.startswith("/v1/downloads/"):
            if request.headers.get("Authorization") != f"Bearer {KEY}":
                return web.Response(status=401)
            return web.Response(body=blobs[request.path.rsplit("/", 1)[-1]])
        return None

    proxy.fault = fault

    results = await quietly(make(base_url=proxy.url, api_key=KEY), questions(0, 1))

    assert texts(results) == replies((0, 1))
    assert proxy.count("GET", r"/v1/downloads/\w+") == 1


async def test_a_download_that_redirects_forever_fails_after_max_redirects(proxy: Proxy) -> None:
    async def loop(request: web.Request, body: bytes) -> web.Response | None:
        return (
            web.Response(status=302, headers={"Location": request.path})
            if downloading(request)
            else None
        )

    proxy.fault = loop
    api = BatchApi(proxy.url, KEY, attempts=1)

    with pytest.raises(BatchApiError, match=f"more than {MAX_REDIRECTS} redirects") as caught:
        await asyncio.to_thread(api.content, "file-abc")

    assert caught.value.status == 302
    assert proxy.count("GET", CONTENT) == MAX_REDIRECTS + 1


async def test_a_download_redirected_to_a_local_file_is_refused(proxy: Proxy) -> None:
    # urllib would open file: URLs too; a provider's answer must never read this machine.
    async def to_a_file(request: web.Request, body: bytes) -> web.Response | None:
        location = "file:///etc/hostname"
        return (
            web.Response(status=302, headers={"Location": location})
            if downloading(request)
            else None
        )

    proxy.fault = to_a_file
    api = BatchApi(proxy.url, KEY, attempts=1)

    with pytest.raises(BatchApiError, match="not an http"):
        await asyncio.to_thread(api.content, "file-abc")


async def test_an_api_call_that_redirects_is_not_followed(proxy: Proxy, storage: Storage) -> None:
    async def moved(request: web.Request, body: bytes) -> web.Response:
        return web.Response(status=307, headers={"Location": storage.presign(b"{}")})

    proxy.fault = moved
    api = BatchApi(proxy.url, KEY, attempts=1)

    with pytest.raises(BatchApiError, match="not followed") as caught:
        await asyncio.to_thread(api.get, "batch_abc")

    assert caught.value.status == 307
    assert storage.credentials == []  # the key went nowhere else


# --- 2. looking up a batch whose create answer was lost ---------------------------------------


def losing_the_create(proxy: Proxy, made: bool = True) -> Fault:
    """The first create's answer is a 500; the provider made the batch (``made``) or not."""

    async def fault(request: web.Request, body: bytes) -> web.Response | None:
        if (request.method, request.path) != ("POST", BATCHES) or proxy.count("POST", BATCHES) > 1:
            return None
        if made:
            await proxy.forward(request, body)
        return web.json_response({"error": {"message": "try later"}}, status=500)

    return fault


async def lost_create(make: Factory, proxy: Proxy, tmp_path: Path, made: bool = True) -> str:
    """A first run whose create answer was lost, leaving its upload to look up; its file id."""
    proxy.fault = losing_the_create(proxy, made)
    first = await quietly(make(base_url=proxy.url, max_attempts=1), questions(0, 1))
    assert error_types(first) == {"BatchApiError"}
    (left,) = list_states(tmp_path / "cache")
    assert (left.status, left.batch_id) == ("uploaded", None)
    assert left.input_file_id is not None
    proxy.fault = None
    return left.input_file_id


async def other_batches(mock: MockServer, count: int) -> None:
    """``count`` batches of someone else's file, made at the provider now (newest last)."""
    api = BatchApi(mock.url, None)
    line = (
        b'{"custom_id":"o","method":"POST","url":"/v1/chat/completions","body":{"messages":[]}}\n'
    )

    def make_them() -> None:
        file = api.upload(line, "other.jsonl")
        for _ in range(count):
            api.create(file["id"], "/v1/chat/completions")

    await asyncio.to_thread(make_them)


async def test_a_lost_create_is_found_behind_more_than_a_thousand_newer_batches(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    # Another evaluation of the lab (or generate()'s many small jobs) made 1050 batches
    # since: the look-up must page past them rather than take "not seen" for "never made".
    await lost_create(make, proxy, tmp_path)
    await other_batches(mock, 1050)

    again = await quietly(make(base_url=proxy.url), questions(0, 1))

    assert texts(again) == replies((0, 1))
    assert proxy.count("POST", BATCHES) == 1  # paid once
    assert proxy.count("GET", LISTING) == 11


async def test_a_provider_that_ignores_after_is_a_job_needing_attention_not_a_second_batch(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    file_id = await lost_create(make, proxy, tmp_path)
    await other_batches(mock, 150)

    async def ignoring_after(request: web.Request, body: bytes) -> web.Response | None:
        if (request.method, request.path) != ("GET", LISTING) or "after" not in request.query:
            return None
        query = {k: v for k, v in request.query.items() if k != "after"}
        return await proxy.forward(request.clone(rel_url=request.rel_url.with_query(query)), body)

    proxy.fault = ignoring_after

    again = await quietly(make(base_url=proxy.url), questions(0, 1))

    assert error_types(again) == {"BatchStateError"}
    assert all(file_id in r.message and "after=" in r.message for r in again)
    assert proxy.count("POST", BATCHES) == 1
    assert proxy.count("GET", LISTING) == 2  # the second page was the first again: stop


async def test_a_look_up_that_runs_out_of_pages_is_a_job_needing_attention(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    file_id = await lost_create(make, proxy, tmp_path)
    await other_batches(mock, 150)
    backend = make(base_url=proxy.url)
    backend.jobs.find_pages = 1  # type: ignore[union-attr]

    again = await quietly(backend, questions(0, 1))

    assert error_types(again) == {"BatchStateError"}
    (message,) = {r.message for r in again}
    assert f"input_file_id {file_id}" in message and "1 pages" in message
    assert proxy.count("POST", BATCHES) == 1
    (left,) = list_states(tmp_path / "cache")
    assert (left.status, left.batch_id) == ("uploaded", None)  # kept for someone to decide


async def test_a_look_up_stops_at_the_first_batch_older_than_the_upload(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    # The listing is newest first, and the provider dates batches to the second: a
    # batch older than the file proves the lost create never made one.
    await other_batches(mock, 150)
    await asyncio.sleep(1.1)
    await lost_create(make, proxy, tmp_path, made=False)
    await other_batches(mock, 120)

    again = await quietly(make(base_url=proxy.url), questions(0, 1))

    assert texts(again) == replies((0, 1))
    assert proxy.count("GET", LISTING) == 2  # 100 newer, then 20 newer and an older one
    assert proxy.count("POST", BATCHES) == 2  # the lost one, which made nothing, and this one


# --- 3. the state directory's lock and network calls -----------------------------------------


async def test_an_upload_runs_without_the_state_directory_lock_once_its_job_is_recorded(
    make: Factory, proxy: Proxy, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    during: list[tuple[bool, list[str]]] = []

    async def look(request: web.Request, body: bytes) -> None:
        if (request.method, request.path) == ("POST", FILES):
            during.append(
                (lock_path(directory).exists(), [s.status for s in list_states(directory)])
            )

    proxy.fault = look

    assert texts(await quietly(make(base_url=proxy.url), questions(0, 1))) == replies((0, 1))
    assert during == [(False, ["uploading"])]
    assert not lock_path(directory).exists()
    assert [p.name for p in directory.iterdir() if p.name.endswith(".lock")] == []


async def test_a_slow_upload_of_one_run_does_not_hold_up_another_run_s_job(
    make: Factory, mock: MockServer, proxy: Proxy
) -> None:
    mock.update_config(batch_delay_s=0.5)
    released = asyncio.Event()

    async def second_upload_waits(request: web.Request, body: bytes) -> None:
        if (request.method, request.path) == ("POST", FILES) and proxy.count("POST", FILES) == 2:
            await asyncio.wait_for(released.wait(), 10)

    proxy.fault = second_upload_waits
    first = asyncio.ensure_future(quietly(make(base_url=proxy.url), questions(0, 1)))
    await eventually(lambda: proxy.count("POST", BATCHES) == 1)
    second = asyncio.ensure_future(quietly(make(base_url=proxy.url), questions(2, 3)))
    await eventually(lambda: proxy.count("POST", FILES) == 2)

    try:
        # Polled, saved and collected while the other run is still uploading.
        assert texts(await asyncio.wait_for(first, 5)) == replies((0, 1))
    finally:
        released.set()
    assert texts(await second) == replies((2, 3))


async def test_polls_while_another_holds_the_lock_skip_their_saves_and_the_answers_come(
    make: Factory, mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    directory = tmp_path / "cache"
    mock.update_config(batch_delay_s=0.5)
    backend = make()
    backend.jobs.lock_wait_s = 0.2  # type: ignore[union-attr]
    run = asyncio.ensure_future(quietly(backend, questions(0, 1)))
    await eventually(lambda: any(s.batch_id for s in list_states(directory)))

    with caplog.at_level(logging.DEBUG, logger="minima_llm.jobs"):
        async with locked(lock_path(directory)):  # another holder, throughout
            results = await asyncio.wait_for(run, 5)

    assert texts(results) == replies((0, 1))
    assert any("progress not saved" in r.getMessage() for r in caplog.records)
    # Nothing lost: the answers are cached, and the job's file is there for a rerun.
    assert [r.cached for r in await quietly(make(), questions(0, 1))] == [True, True]
    assert route(mock, "/v1/files") == 1


CLIENT = """
import asyncio, sys
from minima_llm import BatchConfig, MinimaLlmConfig, MinimaLlmRequest, OpenAIMinimaLlm
from minima_llm import ParasailBatchConfig

async def main():
    config = MinimaLlmConfig(
        base_url=sys.argv[1], model="mock-model", cache_dir=sys.argv[2],
        batch=BatchConfig(num_workers=16, heartbeat_s=0, stall_s=0),
        parasail=ParasailBatchConfig(llm_batch_prefix="p", poll_interval_s=0.05),
    )
    requests = [
        MinimaLlmRequest(f"q{n}", [{"role": "user", "content": f"question {n}"}]) for n in (0, 1)
    ]
    await OpenAIMinimaLlm(config).run_batched(requests, progress=False)

asyncio.run(main())
"""


async def test_a_record_left_by_a_run_killed_during_its_upload_is_dropped_and_sent_once(
    make: Factory, mock: MockServer, proxy: Proxy, tmp_path: Path
) -> None:
    directory = tmp_path / "cache"
    released = asyncio.Event()

    async def first_upload_hangs(request: web.Request, body: bytes) -> None:
        if (request.method, request.path) == ("POST", FILES) and proxy.count("POST", FILES) == 1:
            await asyncio.wait_for(released.wait(), 10)

    proxy.fault = first_upload_hangs
    killed = await asyncio.create_subprocess_exec(
        sys.executable, "-c", textwrap.dedent(CLIENT), proxy.url, str(directory)
    )
    try:
        await eventually(lambda: proxy.count("POST", FILES) == 1, within_s=20)
    finally:
        killed.kill()  # SIGKILL: no cleanup runs, as when a SLURM job is killed
        await killed.wait()
    (left,) = list_states(directory)
    assert (left.status, left.input_file_id) == ("uploading", None)  # its lock names a dead pid

    try:
        again = await quietly(make(base_url=proxy.url), questions(0, 1))
    finally:
        released.set()

    assert texts(again) == replies((0, 1))
    assert (route(mock, "/v1/files"), mock.stats()["batch_lines"]) == (1, 2)
    (state,) = list_states(directory)
    assert state.batch_id is not None and state.status == "completed"
