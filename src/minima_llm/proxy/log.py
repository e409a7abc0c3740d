"""The gateway's log: a line per live call and per failure, a summary of the rest every N requests."""

from __future__ import annotations

import logging

log = logging.getLogger("minima_llm.proxy")


class ProxyLog:
    """Counts answers and writes what an operator wants to see, no more."""

    def __init__(
        self, every: int = 100, verbose: bool = False, logger: logging.Logger = log
    ) -> None:
        self.every = every
        self.verbose = verbose
        self.logger = logger
        self.requests = self.hits = self.live = self.failed = self.joined = 0

    def answered(
        self, result: str, route: str, model: str, status: int, latency_s: float, detail: str = ""
    ) -> None:
        """One request answered; ``result`` is hit, miss, refresh, coalesced or failed."""
        self.requests += 1
        if result == "hit":
            self.hits += 1
        elif result == "failed":
            self.failed += 1
        elif result in ("miss", "refresh"):
            self.live += 1
        elif result == "coalesced":
            self.joined += 1
        line = f"{route} model={model} {result} {status} {latency_s * 1000:.0f}ms {detail}".rstrip()
        if result in ("miss", "refresh", "failed") or self.verbose:
            self.logger.log(logging.WARNING if result == "failed" else logging.INFO, line)
        if self.every and self.requests % self.every == 0:
            # Answers that joined an identical call in flight are neither hits nor calls;
            # named only when there are some, so the counts always add up.
            joined = f", {self.joined} joined a call in flight" if self.joined else ""
            self.logger.info(
                "%d requests: %d cache hits, %d llm calls, %d failed%s",
                self.requests,
                self.hits,
                self.live,
                self.failed,
                joined,
            )
