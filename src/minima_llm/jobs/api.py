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
import urllib.parse
import urllib.request
import uuid
from collections.abc import Callable, Mapping
from typing import IO, Any

from .._version import USER_AGENT
from ..errors import ConfigError, MinimaLlmError, TransportError
from ..http import ProxyRules, tunnel_refusal_in
from ..resilience import backoff_delay, is_retryable_status, parse_retry_after
from ..upstream import SNIPPET


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Hands every 30x back to the caller, which decides whether to follow it.

    urllib's own handler forwards ``Authorization`` to whatever host ``Location``
    names: the key would reach a third party, and a presigned (S3-style) URL
    refuses a request carrying a second credential with a 400.
    """

    def redirect_request(
        self,
        req: urllib.request.Request,
        fp: IO[bytes],
        code: int,
        msg: str,
        headers: Any,
        newurl: str,
    ) -> urllib.request.Request | None:
        return None


# urllib's own proxy handling is off: each request is routed by ``ProxyRules``, the
# live transports' rules, so a job reaches its endpoint the way its requests would.
_OPENER = urllib.request.build_opener(urllib.request.ProxyHandler({}), _NoRedirects())
# A management call or poll with MAX_ATTEMPTS=0 (unlimited) must still end.
DEFAULT_ATTEMPTS = 8
# How many ``Location`` hops a file download follows (a provider's presigned URL is one).
MAX_REDIRECTS = 5
# Pages of 100 batches a look-up reads at most before saying it could not tell.
FIND_PAGES = 100
_REDIRECTS = frozenset({301, 302, 303, 307, 308})
# Query parameters that make a URL carry its own credential: S3 and GCS presigned URLs,
# CloudFront signed URLs, Azure SAS. S3 answers 400 to a second one (Authorization).
_SIGNATURES = frozenset(
    {"x-amz-signature", "x-amz-credential", "x-goog-signature", "x-goog-credential"}
    | {"signature", "sig"}
)
_DEFAULT_PORTS = {"http": 80, "https": 443}


class BatchApiError(MinimaLlmError):
    """The batch API refused a call, or did not answer within the attempts allowed."""

    def __init__(self, message: str, status: int | None = None) -> None:
        super().__init__(message)
        self.status = status


class ListingIncomplete(BatchApiError):
    """A look-up by input file could not tell whether the batch exists (see ``BatchApi.find``)."""


Sleep = Callable[[float], None]


class _Moved:
    """A 30x answer that was not followed: its status and the URL it points to."""

    __slots__ = ("location", "status")

    def __init__(self, status: int, location: str) -> None:
        self.status = status
        self.location = location


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
        proxies: ProxyRules | None = None,
    ) -> None:
        base = base_url.rstrip("/")
        self.base_url = base if base.endswith("/v1") else base + "/v1"
        self.proxies = ProxyRules.from_environ() if proxies is None else proxies
        self.proxies.for_url(self.base_url)  # an unusable proxy variable fails here, named
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

    def find(
        self, input_file_id: str, since: float | None = None, pages: int = FIND_PAGES
    ) -> dict[str, Any] | None:
        """The batch made from ``input_file_id``, or None if surely none was.

        The listing is newest first, and a batch of the file is newer than the file:
        a batch created before ``since`` (the file's upload, by the provider's clock)
        or the end of the listing proves there is none. ``ListingIncomplete`` when
        neither is reached within ``pages`` pages, or the provider ignores ``after``:
        "not found" would then be a guess, and acting on it could pay twice.
        """
        quote_id(input_file_id, "input file id")
        after: str | None = None
        seen: set[str] = set()
        for _ in range(pages):
            path = "/batches?limit=100" + (
                f"&after={urllib.parse.quote(after, safe='')}" if after else ""
            )
            listing = _object(f"GET {path}", self._call("GET", path))
            data = listing.get("data")
            if not isinstance(data, list):
                raise ListingIncomplete(f"GET {path}: the answer holds no list of batches")
            batches = [b for b in data if isinstance(b, dict)]
            for batch in batches:
                if batch.get("input_file_id") == input_file_id:
                    return batch
            if since is not None and any(_older(batch, since) for batch in batches):
                return None
            if not listing.get("has_more"):
                return None
            last = listing.get("last_id") or (batches[-1].get("id") if batches else None)
            if not isinstance(last, str) or not last:
                raise ListingIncomplete(f"GET {path}: says there is more but names no last id")
            if last in seen:
                raise ListingIncomplete(
                    f"GET {path}: answered a page it had answered before (the provider"
                    " seems to ignore after=), so the listing cannot be read to its end"
                )
            seen.add(last)
            after = last
        raise ListingIncomplete(
            f"read {pages} pages of batches without reaching one older than file"
            f" {input_file_id}, or the end of the listing"
        )

    def file(self, file_id: str) -> dict[str, Any]:
        """The file object (its ``created_at`` dates the upload by the provider's clock)."""
        path = f"/files/{quote_id(file_id, 'file id')}"
        return _object(f"GET {path}", self._call("GET", path))

    def get(self, batch_id: str) -> dict[str, Any]:
        """The batch object as the provider sees it now."""
        path = f"/batches/{quote_id(batch_id, 'batch id')}"
        return _object(f"GET {path}", self._call("GET", path))

    def cancel(self, batch_id: str) -> dict[str, Any]:
        """Ask the provider to cancel a batch; returns the batch object."""
        path = f"/batches/{quote_id(batch_id, 'batch id')}/cancel"
        return _object(f"POST {path}", self._call("POST", path, b"", "application/json"))

    def content(self, file_id: str) -> bytes:
        """The bytes of a file (a batch's output or error file), following redirects by hand.

        Providers answer with a 30x to a presigned URL on a storage host; the key
        goes only to ``base_url``'s origin (scheme, host, port), never to that host,
        and never with a URL that carries its own signature.
        """
        first = url = f"{self.base_url}/files/{quote_id(file_id, 'file id')}/content"
        for _ in range(MAX_REDIRECTS):
            answer = self._send("GET", url)
            if not isinstance(answer, _Moved):
                return answer
            url = _target(url, answer)
        answer = self._send("GET", url)
        if isinstance(answer, _Moved):
            raise BatchApiError(
                f"GET {first}: more than {MAX_REDIRECTS} redirects (the last to {url})",
                answer.status,
            )
        return answer

    # --- the same, off the event loop ----------------------------------------------

    async def aupload(self, data: bytes, filename: str) -> dict[str, Any]:
        """``upload`` on a worker thread."""
        return await asyncio.to_thread(self.upload, data, filename)

    async def acreate(
        self, input_file_id: str, endpoint: str, metadata: Mapping[str, str] | None = None
    ) -> dict[str, Any]:
        """``create`` on a worker thread."""
        return await asyncio.to_thread(self.create, input_file_id, endpoint, metadata)

    async def afind(
        self, input_file_id: str, since: float | None = None, pages: int = FIND_PAGES
    ) -> dict[str, Any] | None:
        """``find`` on a worker thread."""
        return await asyncio.to_thread(self.find, input_file_id, since, pages)

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
        url = self.base_url + path
        answer = self._send(method, url, body, content_type, idempotent)
        if isinstance(answer, _Moved):
            # Only a download is followed: a moved API route is a misconfigured base_url.
            raise BatchApiError(
                f"{method} {url}: HTTP {answer.status}: redirected to {answer.location}"
                " (not followed: only file downloads are)",
                answer.status,
            )
        return answer

    def _send(
        self,
        method: str,
        url: str,
        body: bytes | None = None,
        content_type: str | None = None,
        idempotent: bool = True,
    ) -> bytes | _Moved:
        headers = {"User-Agent": USER_AGENT, "Accept": "application/json"}
        if self._api_key and _origin(url) == _origin(self.base_url) and not _presigned(url):
            headers["Authorization"] = f"Bearer {self._api_key}"
        if content_type:
            headers["Content-Type"] = content_type
        try:
            proxy = self.proxies.for_url(url)
        except (ConfigError, TransportError) as exc:
            raise BatchApiError(f"{method} {url}: {exc}") from exc
        if proxy is not None and proxy.authorization:
            # urllib sends it in the CONNECT of an https request, never to the origin.
            headers["Proxy-Authorization"] = proxy.authorization
        problem = ""
        for attempt in range(1, self.attempts + 1):
            retry_after: float | None = None
            request = urllib.request.Request(url, data=body, headers=headers, method=method)
            if proxy is not None:
                request.set_proxy(proxy.netloc, "http")
            try:
                with _OPENER.open(request, timeout=self.timeout_s) as resp:
                    return bytes(resp.read())
            except urllib.error.HTTPError as exc:
                location = exc.headers.get("Location") if exc.headers else None
                if exc.code in _REDIRECTS and location:
                    exc.close()
                    return _Moved(exc.code, location)
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
                if proxy is not None:
                    problem += f" (via proxy {proxy})"
                    refused = tunnel_refusal_in(reason)
                    if refused is not None and refused.kind == "proxy":
                        # The proxy's verdict, and the request never reached the provider.
                        raise BatchApiError(
                            f"{method} {url}: {refused} (via proxy {proxy})"
                        ) from exc
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


def quote_id(value: object, what: str) -> str:
    """``value`` (an id) quoted as one URL path segment; ``ValueError`` unless a non-empty string.

    Unquoted, an id such as ``batch_x/../../files`` would reach another route, and
    ``None`` would be sent as the batch ``None``.
    """
    if not isinstance(value, str) or not value or value in (".", ".."):
        raise ValueError(f"a {what} must be a non-empty string other than . or .., got {value!r}")
    return urllib.parse.quote(value, safe="")


def _origin(url: str) -> tuple[str, str, int | None]:
    """Scheme, host and port of ``url``, the port spelled out even when it is the default."""
    parts = urllib.parse.urlsplit(url)
    scheme = parts.scheme.lower()
    try:
        port = parts.port or _DEFAULT_PORTS.get(scheme)
    except ValueError:  # a port that is not a number: no origin to share credentials with
        port = -1
    return scheme, (parts.hostname or "").lower(), port


def _presigned(url: str) -> bool:
    """Whether ``url`` carries a credential of its own (a presigned download URL)."""
    query = urllib.parse.parse_qs(urllib.parse.urlsplit(url).query, keep_blank_values=True)
    return any(name.lower() in _SIGNATURES for name in query)


def _target(url: str, moved: _Moved) -> str:
    """Where a redirect from ``url`` leads; only http(s): urllib would also open ``file:``."""
    target = urllib.parse.urljoin(url, moved.location)
    if urllib.parse.urlsplit(target).scheme.lower() not in _DEFAULT_PORTS:
        raise BatchApiError(
            f"GET {url}: HTTP {moved.status}: redirected to {moved.location}, not an http(s) URL",
            moved.status,
        )
    return target


def _older(batch: Mapping[str, Any], since: float) -> bool:
    """Whether ``batch`` was created before ``since``."""
    created = batch.get("created_at")
    return isinstance(created, (int, float)) and not isinstance(created, bool) and created < since


def _object(what: str, raw: bytes) -> dict[str, Any]:
    """The JSON object the batch API answered ``what`` with."""
    try:
        parsed = json.loads(raw)
    except ValueError as exc:
        raise BatchApiError(f"{what}: unreadable answer: {raw[:SNIPPET]!r}") from exc
    if not isinstance(parsed, dict):
        raise BatchApiError(f"{what}: expected a JSON object, got {raw[:SNIPPET]!r}")
    return parsed
