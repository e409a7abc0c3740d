"""The mock server's Files and Batches API over real HTTP on 127.0.0.1."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import openai
import pytest

from minima_llm.testing import MockConfig, MockServer
from minima_llm.testing._batches import BatchStore, Build
from minima_llm.testing._embeddings import render_embeddings
from minima_llm.testing._replies import parse_chat, parse_completion

CHAT_URL = "/v1/chat/completions"
CHAT = {"model": "gpt-test", "messages": [{"role": "user", "content": "say hello"}]}
INFERENCE = {"/v1/chat/completions", "/v1/completions", "/v1/embeddings"}


@pytest.fixture
async def http() -> AsyncIterator[aiohttp.ClientSession]:
    async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
        yield session


def compact(obj: Any) -> bytes:
    """JSON the way the mock re-serialises a line's body, so live answers hash the same."""
    return json.dumps(obj, separators=(",", ":")).encode()


def jsonl(*items: Any) -> bytes:
    return b"".join((item if isinstance(item, bytes) else compact(item)) + b"\n" for item in items)


def task(custom_id: str, body: Any, url: str = CHAT_URL) -> dict[str, Any]:
    return {"custom_id": custom_id, "method": "POST", "url": url, "body": body}


async def call(
    http: aiohttp.ClientSession, method: str, url: str, **kwargs: Any
) -> tuple[int, Any]:
    async with http.request(method, url, **kwargs) as response:
        return response.status, await response.json(content_type=None)


async def upload(
    http: aiohttp.ClientSession, base: str, content: bytes, purpose: str = "batch"
) -> tuple[int, Any]:
    form = aiohttp.FormData()
    form.add_field("purpose", purpose)
    form.add_field("file", content, filename="in.jsonl", content_type="application/jsonl")
    return await call(http, "POST", base + "/files", data=form)


async def create(
    http: aiohttp.ClientSession, base: str, content: bytes, endpoint: str = CHAT_URL
) -> dict[str, Any]:
    status, file = await upload(http, base, content)
    assert status == 200, file
    body = {"input_file_id": file["id"], "endpoint": endpoint, "completion_window": "24h"}
    status, batch = await call(http, "POST", base + "/batches", json=body)
    assert status == 200, batch
    return batch  # type: ignore[no-any-return]


async def poll(http: aiohttp.ClientSession, base: str, batch_id: str) -> dict[str, Any]:
    status, batch = await call(http, "GET", f"{base}/batches/{batch_id}")
    assert status == 200, batch
    return batch  # type: ignore[no-any-return]


async def content_lines(
    http: aiohttp.ClientSession, base: str, file_id: str
) -> list[dict[str, Any]]:
    async with http.get(f"{base}/files/{file_id}/content") as response:
        assert response.status == 200
        assert response.content_type == "application/octet-stream"
        return [json.loads(line) for line in (await response.read()).splitlines()]


@pytest.mark.parametrize(
    ("endpoint", "body"),
    [
        (CHAT_URL, {**CHAT, "max_tokens": 1}),
        ("/v1/completions", {"prompt": ["one two", "three"], "n": 2}),
        ("/v1/embeddings", {"input": ["a b", "c"], "dimensions": 4}),
    ],
)
async def test_batch_runs_to_completed_with_the_live_endpoints_answers(
    mock: MockServer, http: aiohttp.ClientSession, endpoint: str, body: dict[str, Any]
) -> None:
    other = {**body, "user": "second"}
    created = await create(
        http, mock.url, jsonl(task("a", body, endpoint), task("b", other, endpoint)), endpoint
    )
    assert created["status"] == "validating"
    assert created["id"].startswith("batch_")
    assert created["expires_at"] == created["created_at"] + 86400
    assert (created["output_file_id"], created["errors"], created["completed_at"]) == (None,) * 3
    batch = await poll(http, mock.url, created["id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 2, "completed": 2, "failed": 0}
    assert batch["error_file_id"] is None
    assert isinstance(batch["completed_at"], int)
    status, output = await call(http, "GET", f"{mock.url}/files/{batch['output_file_id']}")
    assert (status, output["object"], output["purpose"]) == (200, "file", "batch_output")
    lines = await content_lines(http, mock.url, batch["output_file_id"])
    assert [line["custom_id"] for line in lines] == ["a", "b"]
    assert all(line["id"].startswith("batch_req_") and line["error"] is None for line in lines)
    assert {line["response"]["status_code"] for line in lines} == {200}
    # The batch answered its lines without touching the live routes' counters.
    stats = mock.stats()
    assert stats["batch_lines"] == 2
    assert not INFERENCE & set(stats["by_route"])
    for line, sent in zip(lines, (body, other), strict=True):
        status, live = await call(
            http, "POST", mock.url + endpoint.removeprefix("/v1"), data=compact(sent)
        )
        assert status == 200
        assert line["response"]["body"] == live


async def test_a_stream_request_in_a_batch_gets_the_non_streamed_body(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    streamed = {**CHAT, "stream": True, "stream_options": {"include_usage": True}}
    batch = await poll(
        http, mock.url, (await create(http, mock.url, jsonl(task("s", streamed))))["id"]
    )
    [line] = await content_lines(http, mock.url, batch["output_file_id"])
    _, live = await call(http, "POST", mock.url + "/chat/completions", data=compact(CHAT))
    answer = line["response"]["body"]
    assert answer["object"] == "chat.completion"
    assert (answer["choices"], answer["usage"]) == (live["choices"], live["usage"])


async def test_batch_delay_keeps_it_in_progress_until_the_delay_passes(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.update_config(batch_delay_s=0.5)
    created = await create(http, mock.url, jsonl(task("a", CHAT)))
    running = await poll(http, mock.url, created["id"])
    assert running["status"] == "in_progress"
    assert isinstance(running["in_progress_at"], int)
    assert running["output_file_id"] is None
    assert running["request_counts"] == {"total": 1, "completed": 0, "failed": 0}
    assert mock.stats()["batch_lines"] == 0
    await asyncio.sleep(0.55)
    done = await poll(http, mock.url, created["id"])
    assert done["status"] == "completed"
    assert mock.stats()["batch_lines"] == 1


async def test_batch_delay_changed_through_the_control_route_moves_running_batches(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    status, config = await call(
        http, "POST", mock.root_url + "/_mock/config", json={"batch_delay_s": 3600}
    )
    assert (status, config["batch_delay_s"]) == (200, 3600.0)
    created = await create(http, mock.url, jsonl(task("a", CHAT)))
    assert (await poll(http, mock.url, created["id"]))["status"] == "in_progress"
    status, _ = await call(
        http, "POST", mock.root_url + "/_mock/config", json={"batch_delay_s": -1}
    )
    assert status == 400
    await call(http, "POST", mock.root_url + "/_mock/config", json={"batch_delay_s": 0})
    assert (await poll(http, mock.url, created["id"]))["status"] == "completed"


def test_batch_store_completes_exactly_when_the_delay_has_passed() -> None:
    now = [100.0]
    config = MockConfig(batch_delay_s=10)
    builds: dict[str, Build] = {
        CHAT_URL: parse_chat,
        "/v1/completions": parse_completion,
        "/v1/embeddings": render_embeddings,
    }
    store = BatchStore(builds, lambda: config, clock=lambda: now[0], wall=lambda: 1_000.5)
    source = store.add_file(jsonl(task("a", CHAT)), "in.jsonl")
    batch = store.create(
        {"input_file_id": source.id, "endpoint": CHAT_URL, "completion_window": "24h"}
    )
    assert (batch.created_at, batch.status) == (1_000, "validating")
    now[0] = 109.999
    assert store.batch(batch.id).status == "in_progress"
    now[0] = 110.0
    assert store.batch(batch.id).status == "completed"
    assert store.lines == 1
    assert repr(store) == "<BatchStore files=2 batches=1 lines=1>"


async def test_invalid_lines_fail_the_batch_naming_each_line(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    content = jsonl(
        task("ok", CHAT),
        b"{not json",
        b"   ",
        [1, 2],
        {"method": "POST", "url": CHAT_URL, "body": CHAT},
        {**task("m", CHAT), "method": "GET"},
        task("u", {"input": "x"}, "/v1/embeddings"),
        {**task("b", CHAT), "body": "text"},
    )
    batch = await create(http, mock.url, content)
    assert batch["status"] == "failed"
    assert isinstance(batch["failed_at"], int)
    errors = batch["errors"]
    assert errors["object"] == "list"
    assert [(e["line"], e["code"]) for e in errors["data"]] == [
        (2, "invalid_json_line"),
        (4, "invalid_json_line"),
        (5, "missing_required_parameter"),
        (6, "invalid_method"),
        (7, "mismatched_endpoint"),
        (8, "invalid_body"),
    ]
    again = await poll(http, mock.url, batch["id"])
    assert (again["status"], again["output_file_id"], again["error_file_id"]) == (
        "failed",
        None,
        None,
    )
    assert mock.stats()["batch_lines"] == 0


@pytest.mark.parametrize(
    ("content", "expected"),
    [
        (
            jsonl(task("same", CHAT), task("other", CHAT), task("same", CHAT)),
            [(3, "duplicate_custom_id")],
        ),
        (b"\n  \n", [(None, "empty_file")]),
        (b"\xff\xfe", [(None, "invalid_file")]),
    ],
)
async def test_duplicate_ids_empty_and_binary_files_fail_the_batch(
    mock: MockServer, http: aiohttp.ClientSession, content: bytes, expected: list[Any]
) -> None:
    batch = await create(http, mock.url, content)
    assert batch["status"] == "failed"
    assert [(e["line"], e["code"]) for e in batch["errors"]["data"]] == expected


async def test_file_upload_errors(mock: MockServer, http: aiohttp.ClientSession) -> None:
    status, body = await upload(http, mock.url, b"{}", purpose="fine-tune")
    assert (status, body["error"]["param"]) == (400, "purpose")
    form = aiohttp.FormData()
    form.add_field("purpose", "batch")
    status, body = await call(http, "POST", mock.url + "/files", data=form)
    assert (status, body["error"]["type"]) == (400, "invalid_request_error")
    status, body = await call(http, "POST", mock.url + "/files", json={"purpose": "batch"})
    assert status == 400 and "multipart" in body["error"]["message"]
    headers = {"Content-Type": "multipart/form-data; boundary=xyz"}
    status, body = await call(http, "POST", mock.url + "/files", data=b"junk", headers=headers)
    assert status == 400 and "multipart" in body["error"]["message"]
    for path in ("/files/file-nope", "/files/file-nope/content"):
        status, body = await call(http, "GET", mock.url + path)
        assert status == 404 and "file-nope" in body["error"]["message"]


@pytest.mark.parametrize(
    ("change", "status", "param"),
    [
        ({"input_file_id": "file-nope"}, 404, "file_id"),
        ({"input_file_id": None}, 400, "input_file_id"),
        ({"endpoint": "/v1/responses"}, 400, "endpoint"),
        ({"completion_window": "1h"}, 400, "completion_window"),
        ({"metadata": {"k": 1}}, 400, "metadata"),
    ],
)
async def test_batch_creation_errors(
    mock: MockServer, http: aiohttp.ClientSession, change: dict[str, Any], status: int, param: str
) -> None:
    _, file = await upload(http, mock.url, jsonl(task("a", CHAT)))
    body = {"input_file_id": file["id"], "endpoint": CHAT_URL, "completion_window": "24h", **change}
    got, answer = await call(http, "POST", mock.url + "/batches", json=body)
    assert (got, answer["error"]["param"]) == (status, param)


async def test_malformed_batch_bodies_and_output_files_as_input_get_400s(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    for raw in (b"{broken", b"[1]"):
        status, body = await call(http, "POST", mock.url + "/batches", data=raw)
        assert status == 400 and body["error"]["type"] == "invalid_request_error"
    done = await poll(http, mock.url, (await create(http, mock.url, jsonl(task("a", CHAT))))["id"])
    body = {
        "input_file_id": done["output_file_id"],
        "endpoint": CHAT_URL,
        "completion_window": "24h",
    }
    status, answer = await call(http, "POST", mock.url + "/batches", json=body)
    assert (status, answer["error"]["param"]) == (400, "input_file_id")


async def test_failing_lines_go_to_the_error_file_and_the_counts(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    marked = {"messages": [{"role": "user", "content": "hi [mock:batch-error]"}]}
    content = jsonl(task("ok", CHAT), task("boom", marked), task("bad", {"messages": []}))
    batch = await poll(http, mock.url, (await create(http, mock.url, content))["id"])
    assert batch["status"] == "completed"
    assert batch["request_counts"] == {"total": 3, "completed": 1, "failed": 2}
    [good] = await content_lines(http, mock.url, batch["output_file_id"])
    assert good["custom_id"] == "ok"
    errors = {
        line["custom_id"]: line
        for line in await content_lines(http, mock.url, batch["error_file_id"])
    }
    assert errors["boom"]["response"]["status_code"] == 500
    assert errors["boom"]["response"]["body"]["error"]["type"] == "server_error"
    assert errors["bad"]["response"]["status_code"] == 400
    assert errors["bad"]["response"]["body"]["error"]["param"] == "messages"
    assert mock.stats()["batch_lines"] == 3
    only_failures = await poll(
        http, mock.url, (await create(http, mock.url, jsonl(task("x", marked))))["id"]
    )
    assert only_failures["output_file_id"] is None
    assert only_failures["error_file_id"] is not None


async def test_cancel_a_running_batch_and_not_a_finished_one(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    mock.update_config(batch_delay_s=3600)
    running = await create(http, mock.url, jsonl(task("a", CHAT)))
    status, cancelling = await call(http, "POST", f"{mock.url}/batches/{running['id']}/cancel")
    assert (status, cancelling["status"]) == (200, "cancelling")
    assert isinstance(cancelling["cancelling_at"], int)
    mock.update_config(batch_delay_s=0)
    cancelled = await poll(http, mock.url, running["id"])
    assert cancelled["status"] == "cancelled"
    assert isinstance(cancelled["cancelled_at"], int)
    assert (cancelled["output_file_id"], cancelled["completed_at"]) == (None, None)
    assert mock.stats()["batch_lines"] == 0
    finished = await poll(
        http, mock.url, (await create(http, mock.url, jsonl(task("a", CHAT))))["id"]
    )
    failed = await create(http, mock.url, b"{bad")
    for batch_id in (running["id"], finished["id"], failed["id"]):
        status, body = await call(http, "POST", f"{mock.url}/batches/{batch_id}/cancel")
        assert status == 400 and "Cannot cancel" in body["error"]["message"]
    status, _ = await call(http, "POST", mock.url + "/batches/batch_nope/cancel")
    assert status == 404


async def test_list_batches_newest_first_with_limit_and_after(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    ids = [(await create(http, mock.url, jsonl(task("a", CHAT))))["id"] for _ in range(3)]
    status, page = await call(http, "GET", mock.url + "/batches?limit=2")
    assert status == 200 and page["object"] == "list"
    assert [b["id"] for b in page["data"]] == [ids[2], ids[1]]
    assert (page["first_id"], page["last_id"], page["has_more"]) == (ids[2], ids[1], True)
    assert {b["status"] for b in page["data"]} == {"completed"}
    _, rest = await call(http, "GET", f"{mock.url}/batches?limit=2&after={ids[1]}")
    assert ([b["id"] for b in rest["data"]], rest["has_more"]) == ([ids[0]], False)
    _, everything = await call(http, "GET", mock.root_url + "/batches")
    assert [b["id"] for b in everything["data"]] == ids[::-1]
    _, empty = await call(http, "GET", f"{mock.url}/batches?after={ids[0]}")
    assert (empty["data"], empty["first_id"], empty["has_more"]) == ([], None, False)
    for query in ("limit=0", "limit=101", "limit=x"):
        status, body = await call(http, "GET", f"{mock.url}/batches?{query}")
        assert (status, body["error"]["param"]) == (400, "limit")
    status, _ = await call(http, "GET", mock.url + "/batches?after=batch_nope")
    assert status == 404


async def test_bare_and_v1_paths_share_state_and_stats_count_batch_routes(
    mock: MockServer, http: aiohttp.ClientSession
) -> None:
    batch = await create(http, mock.root_url, jsonl(task("a", CHAT), task("b", CHAT)))
    done = await poll(http, mock.url, batch["id"])
    assert (await poll(http, mock.root_url, batch["id"]))["status"] == "completed"
    assert len(await content_lines(http, mock.root_url, done["output_file_id"])) == 2
    stats = mock.stats()
    assert stats["by_route"] == {
        "/v1/files": 1,
        "/v1/batches": 1,
        "/v1/batches/{batch_id}": 2,
        "/v1/files/{file_id}/content": 1,
    }
    assert (stats["requests"], stats["by_status"], stats["batch_lines"]) == (5, {"200": 5}, 2)
    _, over_http = await call(http, "GET", mock.root_url + "/_mock/stats")
    assert over_http["batch_lines"] == 2
    mock.reset()
    assert mock.stats()["batch_lines"] == 0
    status, _ = await call(http, "GET", f"{mock.url}/batches/{batch['id']}")
    assert status == 404


async def test_the_openai_client_drives_the_batch_api(mock: MockServer) -> None:
    async with openai.AsyncOpenAI(base_url=mock.url, api_key="test", max_retries=0) as client:
        file = await client.files.create(file=("in.jsonl", jsonl(task("a", CHAT))), purpose="batch")
        assert (file.purpose, file.status) == ("batch", "processed")
        batch = await client.batches.create(
            input_file_id=file.id,
            endpoint="/v1/chat/completions",
            completion_window="24h",
            metadata={"run": "1"},
        )
        assert (batch.status, batch.metadata) == ("validating", {"run": "1"})
        batch = await client.batches.retrieve(batch.id)
        assert batch.status == "completed" and batch.output_file_id is not None
        text = (await client.files.content(batch.output_file_id)).text
        body = json.loads(text)["response"]["body"]
        assert body["choices"][0]["message"]["content"] == "mock reply: say hello"
        listed = await client.batches.list(limit=1)
        assert [b.id for b in listed.data] == [batch.id]
        with pytest.raises(openai.BadRequestError):
            await client.batches.cancel(batch.id)
