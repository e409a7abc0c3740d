"""Request counters for ``GET /_mock/stats``: plain ints, touched only by the server's loop."""

from __future__ import annotations

from typing import Any


class MockStats:
    """What the mock server has answered since start or the last reset.

    ``by_status`` counts responses actually completed, so aborted connections
    appear only under ``resets``.
    """

    __slots__ = (
        "by_route",
        "by_status",
        "concurrency",
        "failures",
        "malformed",
        "overloaded",
        "peak_concurrency",
        "rate_limited",
        "requests",
        "resets",
        "streams",
        "timeouts",
    )

    def __init__(self) -> None:
        self.concurrency = 0
        self.reset()

    def __repr__(self) -> str:
        return (
            f"<MockStats requests={self.requests} in_flight={self.concurrency} "
            f"peak={self.peak_concurrency} 429={self.rate_limited} 503={self.overloaded}>"
        )

    def reset(self) -> None:
        """Zero the counters; the in-flight gauge keeps counting live requests."""
        self.requests = 0
        self.by_route: dict[str, int] = {}
        self.by_status: dict[int, int] = {}
        self.rate_limited = 0
        self.overloaded = 0
        self.failures = 0
        self.resets = 0
        self.malformed = 0
        self.timeouts = 0
        self.streams = 0
        self.peak_concurrency = self.concurrency

    def request(self, route: str) -> None:
        """Count a request arriving on ``route``."""
        self.requests += 1
        self.by_route[route] = self.by_route.get(route, 0) + 1

    def answered(self, status: int) -> None:
        """Count a response sent with ``status``."""
        self.by_status[status] = self.by_status.get(status, 0) + 1

    def enter(self) -> None:
        """Count a request as in flight."""
        self.concurrency += 1
        if self.concurrency > self.peak_concurrency:
            self.peak_concurrency = self.concurrency

    def snapshot(self) -> dict[str, Any]:
        """The counters as a JSON-ready dict."""
        return {
            "requests": self.requests,
            "by_route": dict(self.by_route),
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "rate_limited": self.rate_limited,
            "overloaded": self.overloaded,
            "failures": self.failures,
            "resets": self.resets,
            "malformed": self.malformed,
            "timeouts": self.timeouts,
            "streams": self.streams,
            "concurrency": self.concurrency,
            "peak_concurrency": self.peak_concurrency,
        }
