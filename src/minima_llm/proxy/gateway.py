"""The gateway's state: the backend it sends through, settings, metrics, log, key checks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import itertools
import re
import secrets
import time
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web

from .._version import USER_AGENT
from ..backend import OpenAIMinimaLlm
from ..types import MinimaLlmFailure
from ..upstream import UPSTREAM_DOWN
from .log import ProxyLog
from .metrics import GatewayMetrics
from .settings import ProxySettings

# Health checks hit the upstream at most this often, however often /health is polled.
HEALTH_TTL_S = 5.0
# How often the whole requests waiting on an answer are looked over for clients that left.
# One timer for them all, not one per request: most are answered in milliseconds.
SWEEP_S = 0.5
# What the sweep holds of a waiting whole request: its HTTP request (to see whether its
# client is still there), and the backend request and call options (for its cache key).
Waiting = tuple[web.Request, Any, dict[str, Any]]


def client_gone(request: web.Request) -> bool:
    """Whether the client of ``request`` has closed its connection."""
    transport = request.transport
    return transport is None or transport.is_closing()


def take_back_cancel(task: asyncio.Task[Any]) -> int:
    """Undo one ``cancel()`` of ``task`` (Python 3.11+); the cancellations still pending."""
    uncancel = getattr(task, "uncancel", None)
    return int(uncancel()) if uncancel is not None else 0


class ClientSweep:
    """Cancels the whole requests still waiting on an answer whose clients have left.

    aiohttp does not cancel a handler whose client left, and nothing is written to
    the client before the answer: without the sweep, a request nobody waits for any
    more would still queue for a slot and be sent upstream. A handler puts itself in
    ``waiting`` while it waits (a dict entry, no timer); one timer looks every
    ``SWEEP_S`` at the requests that were waiting at the look before too, so the
    many answered within ``SWEEP_S`` are never looked at, and a client gone is seen
    within two looks.
    """

    def __init__(
        self, key_of: Callable[[Any, Any], tuple[str, str]], metrics: GatewayMetrics
    ) -> None:
        self._key_of = key_of
        self._metrics = metrics
        self.waiting: dict[asyncio.Task[Any], Waiting] = {}
        # The requests waiting at the last look: the ones the next look looks at.
        self._seen: set[asyncio.Task[Any]] = set()
        # Requests whose client has left: True once cancelled, False while kept for
        # identical requests that share their call.
        self.left: dict[asyncio.Task[Any], bool] = {}
        self.timer: asyncio.TimerHandle | None = None

    def start(self) -> None:
        """Look in ``SWEEP_S`` (the caller has just added a request and no look is due)."""
        self.timer = asyncio.get_running_loop().call_later(SWEEP_S, self._look)

    def _look(self) -> None:
        self.timer = None
        waiting, left = self.waiting, self.left
        for task in [t for t in left if t not in waiting]:
            del left[task]  # answered or cancelled since
        seen = self._seen
        gone = [
            task
            for task in seen
            if task in waiting and task not in left and client_gone(waiting[task][0])
        ]
        for task in gone:
            left[task] = False
        self._metrics.client_disconnects += len(gone)
        if gone:
            self._cancel_abandoned()
        self._seen = set(waiting)
        if waiting:
            self.start()

    def _cancel_abandoned(self) -> None:
        """Cancel each request whose client left, unless a client still there asked the same.

        Identical requests share one call (the first one's): cancelling it would send
        the question of those still waiting again, so it is kept while any of them waits.
        """
        waiting, left = self.waiting, self.left
        present = {self._key(w) for task, w in waiting.items() if task not in left}
        for task, cancelled in list(left.items()):
            if not cancelled and self._key(waiting[task]) not in present:
                left[task] = True
                task.cancel()

    def _key(self, waiting: Waiting) -> str:
        _, request, options = waiting
        return self._key_of(request, options["key_extra"])[0]

    def took_back(self, task: asyncio.Task[Any]) -> bool:
        """Whether the cancellation ``task`` is handling is the sweep's alone (now taken back).

        Another one too (a shutdown stopping the request) must still end the task.
        """
        return self.left.get(task) is True and take_back_cancel(task) == 0

    def stop(self) -> None:
        """No more looks."""
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def __repr__(self) -> str:
        cancelled = sum(self.left.values())
        return (
            f"<ClientSweep waiting={len(self.waiting)} left={len(self.left)} cancelled={cancelled}>"
        )


# A caller's own X-Request-Id is taken as the request's id only if it is short and
# plain: it is written into log lines, and spaces or "=" there could forge their fields.
_CALLER_ID = re.compile(r"[A-Za-z0-9._:/-]{1,128}")


class RequestIds:
    """The id of each request: the caller's own ``X-Request-Id`` if usable, else one made here."""

    def __init__(self) -> None:
        # Random per process, so gateways behind one balancer never hand out the same id.
        self.prefix = f"mgw-{secrets.token_hex(4)}-"
        self._count = itertools.count(1)

    def of(self, request: web.Request) -> str:
        """The id for ``request``, which it is answered and logged with."""
        given = request.headers.get("x-request-id")
        if given and _CALLER_ID.fullmatch(given):
            return given
        return f"{self.prefix}{next(self._count):x}"


class Gateway:
    """Everything a request handler needs, shared by all requests of one app."""

    def __init__(
        self,
        backend: OpenAIMinimaLlm,
        settings: ProxySettings,
        metrics: GatewayMetrics | None = None,
        log: ProxyLog | None = None,
    ) -> None:
        self.backend = backend
        self.config = backend.cfg
        self.settings = settings
        backend.upstream.queue_limit = settings.max_queued
        backend.upstream.queue_wait_s = settings.max_queue_wait_s
        self.metrics = metrics or GatewayMetrics()
        if settings.breaker_failures:
            self.metrics.breaker = backend.upstream.use_breaker(
                settings.breaker_failures, settings.breaker_reset_s
            )
        self.log = log or ProxyLog(settings.log_every, settings.verbose)
        self._keys = [k.encode("utf-8") for k in settings.api_keys]
        self._health: tuple[float, dict[str, Any]] | None = None
        # The probe under way: concurrent polls share it rather than each opening a connection.
        self._probe: asyncio.Task[dict[str, Any]] | None = None
        self._session: aiohttp.ClientSession | None = None
        # The tasks answering requests right now: a shutdown stops those that overstay.
        self.answering: set[asyncio.Task[Any]] = set()
        self.cut_off_why: str | None = None  # set when a shutdown stops what still runs
        self.metrics.watch_in_flight(self.answering.__len__)
        upstream = backend.upstream
        self.metrics.watch_admission(lambda: (upstream.queued, upstream.refused))
        self.sweep = ClientSweep(backend.key_for, self.metrics)
        self.request_ids = RequestIds()
        self.route_paths: frozenset[str] = frozenset()  # the app's fixed paths, set by build_app

    def retry_after_s(self, failure: MinimaLlmFailure, api_key: str | None = None) -> float:
        """How long a caller refused with ``failure`` should wait: the breaker's or the cooldown's time.

        ``api_key`` is the caller's key when it is passed through, whose 429s it waits out.
        """
        upstream = self.backend.upstream
        if failure.error_type == UPSTREAM_DOWN and upstream.breaker is not None:
            return upstream.breaker.retry_in()
        return upstream.cooling_s(api_key)

    def key_is_valid(self, presented: str) -> bool:
        """Constant-time comparison against every configured key."""
        # aiohttp decodes header bytes that are not UTF-8 as surrogates; such a key is
        # wrong (401), not a reason to fail the request with a 500.
        candidate = presented.encode("utf-8", "surrogateescape")
        ok = False
        for key in self._keys:
            ok |= hmac.compare_digest(key, candidate)
        return ok

    @staticmethod
    def tenant_of(key: str) -> str:
        """A stable, non-reversible name for a key's cache partition."""
        # As in key_is_valid: a header that is not UTF-8 arrives with surrogates in it.
        return hashlib.sha256(key.encode("utf-8", "surrogateescape")).hexdigest()[:16]

    async def upstream_health(self) -> dict[str, Any]:
        """Whether the upstream answers ``GET /models`` (cached for a few seconds).

        One probe at a time: polls that come while it runs wait for its result (each
        poll is still bounded by the probe's timeout), so a herd of polls against a
        hanging upstream opens one connection, not one per poll.
        """
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_TTL_S:
            return self._health[1]
        probe = self._probe
        if probe is None:
            probe = self._probe = asyncio.ensure_future(self._check_upstream(now))
            probe.add_done_callback(self._probe_done)
        # Shielded: a poll cancelled (at shutdown, say) must not cancel the others' probe.
        return await asyncio.shield(probe)

    def _probe_done(self, probe: asyncio.Task[dict[str, Any]]) -> None:
        if self._probe is probe:
            self._probe = None
        if not probe.cancelled():
            probe.exception()  # retrieved here: the polls that awaited it may all have gone

    async def _check_upstream(self, now: float) -> dict[str, Any]:
        url = f"{self.config.base_url}/models"
        headers = {"Authorization": f"Bearer {self.config.api_key}"} if self.config.api_key else {}
        started = time.monotonic()
        result: dict[str, Any] = {"url": self.config.base_url, "reachable": False, "status": None}
        try:
            # The same client to the upstream as the backend's requests: our name, no cookies.
            session = self._session or aiohttp.ClientSession(
                headers={"User-Agent": USER_AGENT}, cookie_jar=aiohttp.DummyCookieJar()
            )
            self._session = session
            timeout = aiohttp.ClientTimeout(total=self.settings.health_check_timeout_s)
            # Through the proxy the backend's requests take, if any: a probe sent
            # directly would fail on a node that reaches the upstream only that way.
            proxy = self.backend.proxy
            if proxy is not None and proxy.headers and not url.startswith("https:"):
                headers.update(proxy.headers)  # a plain-http request carries them itself
            async with session.get(
                url,
                headers=headers,
                timeout=timeout,
                proxy=proxy.url if proxy else None,
                proxy_headers=proxy.headers if proxy else None,
            ) as resp:
                result["status"] = resp.status
                # Any HTTP answer means the server is up; 404 just means no /models route.
                result["reachable"] = resp.status < 500
            breaker = self.backend.upstream.breaker
            if result["reachable"] and breaker is not None:
                # Not a close (a model server's /models can answer while its engine is
                # stuck), but no reason to wait out the rest of a long open period.
                breaker.probe_now()
        # asyncio's, which before 3.11 is not the builtin TimeoutError.
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        self._health = (now, result)
        return result

    def cut_off(self, why: str = "shutting down") -> int:
        """Cancel every request still being answered; how many there were.

        Each request learns from ``took_back_cut_off`` that this cancellation was
        the shutdown's, so it can tell its client why instead of dropping the line.
        """
        self.cut_off_why = why
        tasks = [task for task in self.answering if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    def took_back_cut_off(self, task: asyncio.Task[Any] | None) -> str | None:
        """Why a cancelled request was stopped by ``cut_off`` (the cancellation then undone), else None."""
        why = self.cut_off_why
        if why is None or task is None:
            return None
        take_back_cancel(task)
        return why

    async def aclose(self) -> None:
        """Close the health-check session and the backend (flushing the cache)."""
        self.sweep.stop()
        probe = self._probe
        if probe is not None:
            probe.cancel()
            await asyncio.gather(probe, return_exceptions=True)
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.backend.aclose()

    def __repr__(self) -> str:
        return f"<Gateway {self.settings.host}:{self.settings.port} -> {self.config.base_url} {self.backend.stats!r}>"
