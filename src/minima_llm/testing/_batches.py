"""OpenAI's Files and Batches API, in memory, so provider-batch clients can be tested over HTTP.

Nothing runs in the background: each read of a batch moves it on by the clock.
A valid batch reads ``validating`` in the answer that creates it, ``in_progress``
afterwards and ``completed`` once ``batch_delay_s`` (the value in force at the
read) has passed since creation. Its lines are answered at that moment by the
build functions the live endpoints use, so a body gets the live endpoint's
non-streamed answer (``stream`` is ignored). Batch lines move only the
``batch_lines`` counter, never the live inference counters.

A chat line whose messages contain ``[mock:batch-error]`` fails with a 500, for
tests of per-line failures.
"""

from __future__ import annotations

import json
import secrets
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from aiohttp import BodyPartReader, web

from ._config import MockConfig
from ._replies import Reply, RequestError, dumps, error_body, load_object, render
from ._stats import MockStats

Build = Callable[[bytes, str], Reply | bytes]
Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]

ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
BATCH_ERROR_MARKER = "[mock:batch-error]"
_MARKER_BYTES = BATCH_ERROR_MARKER.encode()
_WINDOW_S = 24 * 60 * 60
_TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
_TIMESTAMPS = (
    "in_progress_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)
_SERVER_ERROR = json.loads(
    error_body("mock: injected batch line failure", type="server_error", code="server_error")
)


class NotFoundError(RequestError):
    """An id names no stored file or batch; answered with a 404."""


class LineError(RequestError):
    """One line of a batch input file is invalid; it fails the whole batch."""

    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message, param)
        self.code = code


@dataclass(slots=True)
class StoredFile:
    """An uploaded or produced file and its bytes."""

    id: str
    filename: str
    purpose: str
    content: bytes
    created_at: int

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI file object."""
        return {
            "id": self.id,
            "object": "file",
            "bytes": len(self.content),
            "created_at": self.created_at,
            "filename": self.filename,
            "purpose": self.purpose,
            "status": "processed",
        }


@dataclass(slots=True)
class Batch:
    """One batch: its requests until they are answered, then its counts and result files."""

    id: str
    endpoint: str
    input_file_id: str
    metadata: dict[str, str] | None
    created_at: int
    started: float
    requests: list[tuple[str, dict[str, Any]]]
    status: str = "validating"
    errors: dict[str, Any] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    counts: dict[str, int] = field(default_factory=dict)
    times: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """The OpenAI batch object."""
        return {
            "id": self.id,
            "object": "batch",
            "endpoint": self.endpoint,
            "errors": self.errors,
            "input_file_id": self.input_file_id,
            "completion_window": "24h",
            "status": self.status,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "created_at": self.created_at,
            "expires_at": self.created_at + _WINDOW_S,
            **{name: self.times.get(name) for name in _TIMESTAMPS},
            "request_counts": {"total": 0, "completed": 0, "failed": 0, **self.counts},
            "metadata": self.metadata,
        }


class BatchStore:
    """The files and batches of one mock server, and how many batch lines it has answered."""

    def __init__(
        self,
        builds: Mapping[str, Build],
        config: Callable[[], MockConfig],
        *,
        clock: Callable[[], float] = time.monotonic,
        wall: Callable[[], float] = time.time,
    ) -> None:
        self._builds = builds
        self._config = config
        self._clock = clock
        self._wall = wall
        self.reset()

    def __repr__(self) -> str:
        return (
            f"<BatchStore files={len(self._files)} batches={len(self._batches)} lines={self.lines}>"
        )

    def reset(self) -> None:
        """Forget every file and batch and zero the line counter."""
        self._files: dict[str, StoredFile] = {}
        # Insertion order is creation order, which listing reverses.
        self._batches: dict[str, Batch] = {}
        self.lines = 0

    def add_file(self, content: bytes, filename: str, purpose: str = "batch") -> StoredFile:
        """Store ``content`` as a new file."""
        stored = StoredFile(_new_id("file-"), filename, purpose, content, self._now())
        self._files[stored.id] = stored
        return stored

    def file(self, file_id: str) -> StoredFile:
        """The file ``file_id``, or :class:`NotFoundError`."""
        stored = self._files.get(file_id)
        if stored is None:
            raise NotFoundError(f"No such File object: {file_id}", "file_id")
        return stored

    def create(self, payload: Mapping[str, Any]) -> Batch:
        """Validate a ``POST /batches`` body and its input file; a bad file fails the batch."""
        file_id, endpoint, metadata = _create_fields(payload)
        source = self.file(file_id)
        if source.purpose != "batch":
            raise RequestError("the input file's purpose must be 'batch'", "input_file_id")
        requests, errors = parse_input(source.content, endpoint)
        now = self._now()
        batch = Batch(
            id=_new_id("batch_"),
            endpoint=endpoint,
            input_file_id=file_id,
            metadata=metadata,
            created_at=now,
            started=self._clock(),
            requests=requests,
        )
        if errors:
            batch.status, batch.requests = "failed", []
            batch.errors = {"object": "list", "data": errors}
            batch.times["failed_at"] = now
        else:
            batch.counts["total"] = len(requests)
        self._batches[batch.id] = batch
        return batch

    def batch(self, batch_id: str) -> Batch:
        """The batch ``batch_id``, moved on to its current status, or :class:`NotFoundError`."""
        batch = self._batches.get(batch_id)
        if batch is None:
            raise NotFoundError(f"No such Batch object: {batch_id}", "batch_id")
        self._advance(batch)
        return batch

    def cancel(self, batch_id: str) -> Batch:
        """Start cancelling a running batch; it reads ``cancelled``, without output, afterwards."""
        batch = self.batch(batch_id)
        if batch.status in _TERMINAL:
            raise RequestError(f"Cannot cancel a batch with status {batch.status!r}", "batch_id")
        batch.status, batch.requests = "cancelling", []
        batch.times["cancelling_at"] = self._now()
        return batch

    def page(self, limit: int, after: str | None) -> dict[str, Any]:
        """One page of ``GET /batches``: newest first, starting after the batch ``after``."""
        newest = list(reversed(self._batches))
        if after is not None:
            if after not in self._batches:
                raise NotFoundError(f"No such Batch object: {after}", "after")
            newest = newest[newest.index(after) + 1 :]
        data = [self.batch(batch_id).to_dict() for batch_id in newest[:limit]]
        return {
            "object": "list",
            "data": data,
            "first_id": data[0]["id"] if data else None,
            "last_id": data[-1]["id"] if data else None,
            "has_more": len(newest) > limit,
        }

    def _now(self) -> int:
        return int(self._wall())

    def _advance(self, batch: Batch) -> None:
        if batch.status == "validating":
            batch.status = "in_progress"
            batch.times["in_progress_at"] = self._now()
        elif batch.status == "cancelling":
            batch.status = "cancelled"
            batch.times["cancelled_at"] = self._now()
        config = self._config()
        if batch.status == "in_progress" and self._clock() - batch.started >= config.batch_delay_s:
            self._finish(batch, config.model)

    def _finish(self, batch: Batch, model: str) -> None:
        done: list[bytes] = []
        failed: list[bytes] = []
        for custom_id, body in batch.requests:
            status, answer = self._answer(batch.endpoint, body, model)
            (done if status == 200 else failed).append(_result_line(custom_id, status, answer))
        self.lines += len(batch.requests)
        if done:
            batch.output_file_id = self._output(batch, "output", done)
        if failed:
            batch.error_file_id = self._output(batch, "error", failed)
        batch.counts.update(completed=len(done), failed=len(failed))
        batch.status, batch.requests = "completed", []
        batch.times["finalizing_at"] = batch.times["completed_at"] = self._now()

    def _answer(self, endpoint: str, body: dict[str, Any], model: str) -> tuple[int, Any]:
        try:
            result = self._builds[endpoint](dumps(body), model)
        except RequestError as exc:
            return 400, json.loads(error_body(exc.message, param=exc.param))
        # Serialised, a string holding the marker still holds it: JSON escapes none of it.
        if endpoint == ENDPOINTS[0] and _MARKER_BYTES in dumps(body.get("messages")):
            return 500, _SERVER_ERROR
        # render() never streams, which is what a batch line asking for a stream gets.
        return 200, json.loads(result if isinstance(result, bytes) else render(result))

    def _output(self, batch: Batch, kind: str, lines: list[bytes]) -> str:
        return self.add_file(b"".join(lines), f"{batch.id}_{kind}.jsonl", "batch_output").id


def parse_input(
    content: bytes, endpoint: str
) -> tuple[list[tuple[str, dict[str, Any]]], list[dict[str, Any]]]:
    """The ``(custom_id, body)`` of each request in a JSONL input file, and its line errors."""
    try:
        text = content.decode()
    except UnicodeDecodeError:
        return [], [_error(LineError("invalid_file", "the input file is not UTF-8 text"), None)]
    requests: list[tuple[str, dict[str, Any]]] = []
    errors: list[dict[str, Any]] = []
    seen: set[str] = set()
    for number, line in enumerate(text.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            requests.append(_request(line, endpoint, seen))
        except LineError as exc:
            errors.append(_error(exc, number))
    if not requests and not errors:
        errors.append(_error(LineError("empty_file", "the input file has no requests"), None))
    return requests, errors


def _request(line: str, endpoint: str, seen: set[str]) -> tuple[str, dict[str, Any]]:
    try:
        item = json.loads(line)
    except ValueError:
        raise LineError("invalid_json_line", "this line is not valid JSON") from None
    if not isinstance(item, dict):
        raise LineError("invalid_json_line", "each line must be a JSON object")
    custom_id = item.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise LineError("missing_required_parameter", "'custom_id' must be a string", "custom_id")
    if custom_id in seen:
        raise LineError(
            "duplicate_custom_id", f"custom_id {custom_id!r} is a duplicate", "custom_id"
        )
    seen.add(custom_id)
    if item.get("method") != "POST":
        raise LineError("invalid_method", "'method' must be 'POST'", "method")
    if item.get("url") != endpoint:
        raise LineError("mismatched_endpoint", f"'url' must be the batch's {endpoint}", "url")
    body = item.get("body")
    if not isinstance(body, dict):
        raise LineError("invalid_body", "'body' must be a JSON object", "body")
    return custom_id, body


def _error(exc: LineError, line: int | None) -> dict[str, Any]:
    return {"code": exc.code, "message": exc.message, "param": exc.param, "line": line}


def _result_line(custom_id: str, status: int, body: Any) -> bytes:
    response = {"status_code": status, "request_id": secrets.token_hex(16), "body": body}
    line = {"id": _new_id("batch_req_"), "custom_id": custom_id}
    return dumps({**line, "response": response, "error": None}) + b"\n"


def _create_fields(payload: Mapping[str, Any]) -> tuple[str, str, dict[str, str] | None]:
    """``input_file_id``, ``endpoint`` and ``metadata`` of a ``POST /batches`` body, checked."""
    file_id = payload.get("input_file_id")
    if not isinstance(file_id, str) or not file_id:
        raise RequestError("'input_file_id' must be a non-empty string", "input_file_id")
    endpoint = payload.get("endpoint")
    if not isinstance(endpoint, str) or endpoint not in ENDPOINTS:
        raise RequestError(f"'endpoint' must be one of {', '.join(ENDPOINTS)}", "endpoint")
    if payload.get("completion_window") != "24h":
        raise RequestError("'completion_window' must be '24h'", "completion_window")
    metadata = payload.get("metadata")
    if metadata is not None and not (
        isinstance(metadata, dict)
        and all(isinstance(k, str) and isinstance(v, str) for k, v in metadata.items())
    ):
        raise RequestError("'metadata' must be an object of strings", "metadata")
    return file_id, endpoint, metadata


def _new_id(prefix: str) -> str:
    return prefix + secrets.token_hex(12)


def _limit(value: str | None) -> int:
    if value is None:
        return 20
    if not value.isdigit() or not 1 <= int(value) <= 100:
        raise RequestError("'limit' must be an integer between 1 and 100", "limit")
    return int(value)


async def _upload(request: web.Request) -> tuple[str | None, bytes | None, str]:
    """``purpose``, the file's bytes and its name from a multipart upload."""
    if request.content_type != "multipart/form-data":
        raise RequestError("the body must be multipart/form-data with 'purpose' and 'file'")
    purpose, content, filename = None, None, "upload.jsonl"
    try:
        reader = await request.multipart()
        while (part := await reader.next()) is not None:
            if not isinstance(part, BodyPartReader):
                continue  # a nested multipart is no field OpenAI defines
            if part.name == "purpose":
                purpose = await part.text()
            elif part.name == "file":
                content, filename = await part.read(), part.filename or filename
    except (ValueError, LookupError) as exc:  # LookupError: a part names an unknown charset
        raise RequestError(f"malformed multipart body: {exc}") from exc
    return purpose, content, filename


def add_batch_routes(app: web.Application, store: BatchStore, stats: MockStats) -> None:
    """Mount ``/files`` and ``/batches`` on ``app``, each with and without ``/v1``."""

    async def post_file(request: web.Request) -> Any:
        purpose, content, filename = await _upload(request)
        if purpose != "batch":
            raise RequestError("'purpose' must be 'batch'", "purpose")
        if content is None:
            raise RequestError("a 'file' field is required", "file")
        return store.add_file(content, filename).to_dict()

    async def get_file(request: web.Request) -> Any:
        return store.file(request.match_info["file_id"]).to_dict()

    async def get_content(request: web.Request) -> Any:
        content = store.file(request.match_info["file_id"]).content
        return web.Response(body=content, content_type="application/octet-stream")

    async def post_batch(request: web.Request) -> Any:
        return store.create(load_object(await request.read())).to_dict()

    async def get_batch(request: web.Request) -> Any:
        return store.batch(request.match_info["batch_id"]).to_dict()

    async def cancel_batch(request: web.Request) -> Any:
        return store.cancel(request.match_info["batch_id"]).to_dict()

    async def list_batches(request: web.Request) -> Any:
        return store.page(_limit(request.query.get("limit")), request.query.get("after"))

    for method, path, handle in (
        ("POST", "/files", post_file),
        ("GET", "/files/{file_id}", get_file),
        ("GET", "/files/{file_id}/content", get_content),
        ("POST", "/batches", post_batch),
        ("GET", "/batches", list_batches),
        ("GET", "/batches/{batch_id}", get_batch),
        ("POST", "/batches/{batch_id}/cancel", cancel_batch),
    ):
        handler = _counted(stats, "/v1" + path, handle)
        for prefix in ("", "/v1"):
            app.router.add_route(method, prefix + path, handler)


def _counted(
    stats: MockStats, route: str, handle: Callable[[web.Request], Awaitable[Any]]
) -> Handler:
    """Wrap ``handle``: count the request under ``route``, send its result as JSON, errors as 4xx."""

    async def handler(request: web.Request) -> web.StreamResponse:
        stats.request(route)
        try:
            result = await handle(request)
        except RequestError as exc:
            status = 404 if isinstance(exc, NotFoundError) else 400
            result = web.Response(
                status=status,
                body=error_body(exc.message, param=exc.param),
                content_type="application/json",
            )
        if not isinstance(result, web.Response):
            result = web.Response(body=dumps(result), content_type="application/json")
        stats.answered(result.status)
        return result

    return handler
