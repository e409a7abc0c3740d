"""A client for a provider's Files and Batches API (OpenAI's shape, which Parasail shares).

These calls are few (an upload, a create, a poll every ``poll_interval_s``, a
download), so they go through ``urllib`` on a worker thread rather than the
pooled transports: the management functions are synchronous, and one code path
serves them and the async batch mode alike. Each call retries what the live
path retries (429, 5xx, timeouts, lost connections) with the same backoff.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import random
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from .._version import USER_AGENT
from ..errors import MinimaLlmError
from ..resilience import backoff_delay, is_retryable_status, parse_retry_after
from ..upstream import SNIPPET

# No proxies from the environment: the live transports use none either, and a job
# must reach the same endpoint its requests would.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}))
# A management call or poll with MAX_ATTEMPTS=0 (unlimited) must still end.
DEFAULT_ATTEMPTS = 8


class BatchApiError(MinimaLlmError):
    """The batch API refused a call, or did not answer within the attempts allowed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


Sleep = Callable[[float], None]


class BatchApi:
    """Files and Batches calls against ``base_url`` (ending in ``/v1`` or not)."""

    def __init__(
        self,
        base_url: str,
        api_key: str | None,
        timeout_s: float = 60.0,
        *,
        attempts: int = DEFAULT_ATTEMPTS,
        base_backoff_s: float = 1.0,
        max_backoff_s: float = 30.0,
        jitter: float = 0.25,
        sleep: Sleep = time.sleep,
        rng: random.Random | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self._api_key = api_key
        self.timeout_s = timeout_s
        self.attempts = max(1, attempts)
        self.base_backoff_s = base_backoff_s
        self.max_backoff_s = max_backoff_s
        self.jitter = jitter
        self._sleep = sleep
        self._rng = rng or random.Random()

    def __repr__(self) -> str:
        return f"<BatchApi {self.base_url}>"

    # --- synchronous calls -------------------------------------------------------

    def upload(self, data: bytes, filename: str) -> dict[str, Any]:
        """Upload a JSONL file with purpose ``batch``; returns the file object."""
        boundary = uuid.uuid4().hex
        body = b"".join(
            [
                f'--{boundary}\r\nContent-Disposition: form-data; name="purpose"\r\n\r\nbatch\r\n'.encode(),
                f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{filename}"\r\n'.encode(),
                b"Content-Type: application/jsonl\r\n\r\n",
                data,
                f"\r\n--{boundary}--\r\n".encode(),
            ]
        )
        content_type = f"multipart/form-data; boundary={boundary}"
        return _object("POST /files", self._call("POST", "/files", body, content_type))

    def create(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """Start a batch over an uploaded file; returns the batch object.

        Retried only when the provider surely did not act (429, refused connection):
        after a timeout or a 5xx the batch may exist, and a second would be paid for.
        ``find`` looks for it on the next try.
        """
        payload: dict[str, Any] = {
            "input_file_id": input_file_id,
            "endpoint": endpoint,
            "completion_window": "24h",
        }
        if metadata:
            payload["metadata"] = dict(metadata)
        body = json.dumps(payload).encode()
        raw = self._call("POST", "/batches", body, "application/json", idempotent=False)
        return _object("POST /batches", raw)

    def find(self, input_file_id: str, pages: int = 10) -> dict[str, Any] | None:
        """The newest batch made from ``input_file_id``, among the last ``pages`` hundred."""
        after = ""
        for _ in range(pages):
            path = f"/batches?limit=100{after}"
            listing = _object(f"GET {path}", self._call("GET", path))
            data = listing.get("data")
            if not isinstance(data, list):
                return None
            for batch in data:
                if isinstance(batch, dict) and batch.get("input_file_id") == input_file_id:
                    return batch
            last = listing.get("last_id")
            if not listing.get("has_more") or not isinstance(last, str):
                return None
            after = f"&after={last}"
        return None

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch object as the provider sees it now."""
        path = f"/batches/{batch_id}"
        return _object(f"GET {path}", self._call("GET", path))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the provider to cancel a batch; returns the batch object."""
        path = f"/batches/{batch_id}/cancel"
        return _object(f"POST {path}", self._call("POST", path, b"", "application/json"))

    def content(self, file_id: str) -> bytes:
        """The bytes of a file (a batch's output or error file)."""
        return self._call("GET", f"/files/{file_id}/content")

    # --- the same, off the event loop ----------------------------------------------

    async def aupload(self, data: bytes, filename: str) -> dict[str, Any]:
        """``upload`` on a worker thread."""
        return await asyncio.to_thread(self.upload, data, filename)

    async def acreate(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """``create`` on a worker thread."""
        return await asyncio.to_thread(self.create, input_file_id, endpoint, metadata)

    async def afind(self, input_file_id: str) -> dict[str, Any] | None:
        """``find`` on a worker thread."""
        return await asyncio.to_thread(self.find, input_file_id)

    async def aget(self, batch_id: str) -> dict[str, Any]:
        """``get`` on a worker thread."""
        return await asyncio.to_thread(self.get, batch_id)

    async def acontent(self, file_id: str) -> bytes:
        """``content`` on a worker thread."""
        return await asyncio.to_thread(self.content, file_id)

    # --- plumbing --------------------------------------------------------------------

    def _call(
        self,
        method: str,
        path: str,
        body: bytes | None = None,
        content_type: str | None = None,
        idempotent: bool = True,
    ) -> bytes:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self._api_key:
            headers["Authorization"] = f"Bearer {self._api_key}"
        if content_type:
            headers["Content-Type"] = content_type
        url = self.base_url + path
        problem = ""
        for attempt in range(1, self.attempts + 1):
            retry_after: float | None = None
            request = urllib.request.Request(url, data=body, headers=headers, method=method)
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as resp:
                    return bytes(resp.read())
            except urllib.error.HTTPError as exc:
                try:
                    detail = exc.read()[:SNIPPET].decode("utf-8", "replace")
                except (OSError, http.client.HTTPException) as cut:
                    detail = f"(body unreadable: {cut!r})"  # the status still says what happened
                problem = f"HTTP {exc.code}: {detail}"
                if not is_retryable_status(exc.code) or (not idempotent and exc.code != 429):
                    raise BatchApiError(f"{method} {url}: {problem}", exc.code) from exc
                retry_after = parse_retry_after({k.lower(): v for k, v in exc.headers.items()})
            except (urllib.error.URLError, OSError, http.client.HTTPException) as exc:
                # Timeouts, refused or reset connections, cut bodies: the provider may be back soon.
                reason = getattr(exc, "reason", exc)
                problem = f"{type(exc).__name__}: {reason}"
                if not idempotent and not isinstance(reason, ConnectionRefusedError):
                    raise BatchApiError(
                        f"{method} {url}: {problem} (it may have been done)"
                    ) from exc
            if attempt < self.attempts:
                delay = backoff_delay(
                    attempt, self.base_backoff_s, self.max_backoff_s, self.jitter, self._rng
                )
                self._sleep(min(max(delay, retry_after or 0.0), self.max_backoff_s))
        raise BatchApiError(f"{method} {url}: no answer after {self.attempts} attempts ({problem})")


def _object(what: str, raw: bytes) -> dict[str, Any]:
    """The JSON object the batch API answered ``what`` with."""
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise BatchApiError(f"{what}: unreadable answer: {raw[:SNIPPET]!r}") from exc
    if not isinstance(parsed, dict):
        raise BatchApiError(f"{what}: expected a JSON object, got {raw[:SNIPPET]!r}")
    return parsed
