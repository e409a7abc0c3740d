"""The gateway's state: the backend it sends through, settings, metrics, log, key checks."""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import time
from typing import Any

import aiohttp

from .._version import USER_AGENT
from ..backend import OpenAIMinimaLlm
from .log import ProxyLog
from .metrics import GatewayMetrics
from .settings import ProxySettings

# Health checks hit the upstream at most this often, however often /health is polled.
HEALTH_TTL_S = 5.0


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
        self.metrics = metrics or GatewayMetrics()
        self.log = log or ProxyLog(settings.log_every, settings.verbose)
        self._keys = [k.encode("utf-8") for k in settings.api_keys]
        self._health: tuple[float, dict[str, Any]] | None = None
        self._session: aiohttp.ClientSession | None = None
        # The tasks answering requests right now: a shutdown stops those that overstay.
        self.answering: set[asyncio.Task[Any]] = set()
        self.metrics.watch_in_flight(self.answering.__len__)

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
        """Whether the upstream answers ``GET /models`` (cached for a few seconds)."""
        now = time.monotonic()
        if self._health is not None and now - self._health[0] < HEALTH_TTL_S:
            return self._health[1]
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
            async with session.get(url, headers=headers, timeout=timeout) as resp:
                result["status"] = resp.status
                # Any HTTP answer means the server is up; 404 just means no /models route.
                result["reachable"] = resp.status < 500
        # asyncio's, which before 3.11 is not the builtin TimeoutError.
        except (aiohttp.ClientError, asyncio.TimeoutError) as exc:
            result["error"] = f"{type(exc).__name__}: {exc}"
        result["latency_ms"] = round((time.monotonic() - started) * 1000, 1)
        self._health = (now, result)
        return result

    def cut_off(self) -> int:
        """Cancel every request still being answered; how many there were."""
        tasks = [task for task in self.answering if not task.done()]
        for task in tasks:
            task.cancel()
        return len(tasks)

    async def aclose(self) -> None:
        """Close the health-check session and the backend (flushing the cache)."""
        if self._session is not None:
            await self._session.close()
            self._session = None
        await self.backend.aclose()

    def __repr__(self) -> str:
        return f"<Gateway {self.settings.host}:{self.settings.port} -> {self.config.base_url} {self.backend.stats!r}>"
