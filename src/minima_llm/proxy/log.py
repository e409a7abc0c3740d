"""The gateway's log: a line per live call and per failure, a summary of the rest every N requests."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.web import RequestPayloadError

from ..calls import RepeatedError

log = logging.getLogger("minima_llm.proxy")
LINE_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class LineFormatter(logging.Formatter):
    """``LINE_FORMAT`` with the date and time of day formatted once a second, not once a line.

    The gateway logs every upstream call; ``strftime`` was the largest part of that cost.
    """

    def __init__(self) -> None:
        super().__init__(LINE_FORMAT)
        self._second = -1
        self._stamp = ""

    def formatTime(self, record: logging.LogRecord, datefmt: str | None = None) -> str:
        """``YYYY-mm-dd HH:MM:SS,mmm`` in local time, as ``logging.Formatter`` writes it."""
        if datefmt is not None:
            return super().formatTime(record, datefmt)
        second = int(record.created)
        if second != self._second:
            self._stamp = time.strftime(self.default_time_format, self.converter(record.created))
            self._second = second
        return f"{self._stamp},{int(record.msecs):03d}"


_ANSWERS = frozenset({"hit", "miss", "refresh", "coalesced"})
SUMMARY_EVERY_S = 1.0
_ALWAYS_LOGGED = frozenset({"miss", "refresh", "failed", "refused"})
# Longest a caller's text (a model name, an upstream's message) is logged.
_FIELD_CHARS = 200
_DETAIL_CHARS = 1000


def loggable(text: str, limit: int = _FIELD_CHARS) -> str:
    """``text`` as one safe piece of a log line: control characters escaped, at most ``limit``.

    A model name is the caller's, and an error message may be the upstream's: a line
    break in either would let them write lines of their own into the operator's log.
    """
    if len(text) <= limit and text.isprintable():
        return text
    cut = text[:limit]
    shown = cut if cut.isprintable() else ascii(cut)[1:-1]
    return shown + "..." if len(text) > limit else shown


class ProxyLog:
    """Counts answers and writes what an operator wants to see, no more."""

    def __init__(
        self,
        every: int = 100,
        verbose: bool = False,
        logger: logging.Logger = log,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.every = every
        self.verbose = verbose
        self.logger = logger
        self._clock = clock
        self._summary_at = -float("inf")
        self._summary_owed = False  # a summary was left out: the next one due is written
        self.requests = self.hits = self.live = self.failed = self.joined = 0
        self.rejected = 0  # refused by the gateway itself: bad request, no key, no route
        # Refusals come in floods, thousands a second while the gateway is full, and
        # rejections whenever a client is misconfigured or something scans the port.
        self._refusals = RepeatedError(10.0, logger=logger, level=logging.WARNING)
        self._rejections = RepeatedError(10.0, logger=logger, level=logging.INFO)

    def _summary_due(self) -> bool:
        # Every N requests, but at most once a second: the counts are totals, so a line
        # left out loses nothing, and 7,000 hits (or refusals) a second made 70 lines.
        # Owed, it is written by the first request a second on, so a burst's last totals
        # are not left unsaid.
        now = self._clock()
        if now - self._summary_at < SUMMARY_EVERY_S:
            self._summary_owed = True
            return False
        self._summary_at, self._summary_owed = now, False
        return True

    def answered(
        self,
        result: str,
        route: str,
        model: str,
        status: int,
        latency_s: float,
        detail: str = "",
        request_id: str | None = None,
    ) -> None:
        """One request answered; ``result`` is hit, miss, refresh, coalesced, failed or refused.

        A refusal (admission) counts as failed; its lines are at most one per 10 s,
        each saying how many were left out.
        """
        self.requests += 1
        if result == "hit":
            self.hits += 1
        elif result in ("failed", "refused"):
            self.failed += 1
        elif result in ("miss", "refresh"):
            self.live += 1
        elif result == "coalesced":
            self.joined += 1
        if (result in _ALWAYS_LOGGED or self.verbose) and (
            # A flood of refusals builds only the lines that will be written.
            result != "refused" or self.verbose or self._refusals.due()
        ):
            named = f" id={request_id}" if request_id else ""
            line = (
                f"{route} model={loggable(model)} {result} {status} {latency_s * 1000:.0f}ms{named}"
            )
            line = f"{line} {loggable(detail, _DETAIL_CHARS)}" if detail else line
            if result == "refused" and not self.verbose:
                self._refusals.log("%s", line)
            else:
                level = logging.INFO if result in _ANSWERS else logging.WARNING
                self.logger.log(level, line)
        self._count()

    def rejected_request(
        self,
        method: str,
        path: str,
        status: int,
        latency_s: float,
        reason: str,
        request_id: str | None = None,
    ) -> None:
        """A request the gateway answered with an error of its own (400, 401, 404, 405, 413...).

        One line each with ``--verbose``; otherwise at most one per 10 s, each saying
        how many were left out, so a scanner or a broken client cannot flood the log.
        """
        self.requests += 1
        self.rejected += 1
        if not self.verbose and not self._rejections.due():
            self._count()
            return
        named = f" id={request_id}" if request_id else ""
        line = (
            f"{method} {loggable(path)} rejected {status} {latency_s * 1000:.0f}ms{named}"
            f" {loggable(reason, _DETAIL_CHARS)}"
        )
        if self.verbose:
            self.logger.info(line)
        else:
            self._rejections.log("%s", line)
        self._count()

    def served(
        self, method: str, path: str, status: int, latency_s: float, request_id: str | None = None
    ) -> None:
        """With ``--verbose``, a line for a request to a route that is not a model call (models, health, metrics)."""
        if self.verbose:
            named = f" id={request_id}" if request_id else ""
            self.logger.info(f"{method} {loggable(path)} {status} {latency_s * 1000:.0f}ms{named}")

    def _count(self) -> None:
        if (
            self.every
            and (self._summary_owed or self.requests % self.every == 0)
            and (self._summary_due())
        ):
            # Answers that joined an identical call in flight are neither hits nor calls;
            # named only when there are some, so the counts always add up.
            joined = f", {self.joined} joined a call in flight" if self.joined else ""
            rejected = f", {self.rejected} rejected" if self.rejected else ""
            self.logger.info(
                "%d requests: %d cache hits, %d llm calls, %d failed%s%s",
                self.requests,
                self.hits,
                self.live,
                self.failed,
                joined,
                rejected,
            )


class MalformedRequestFilter(logging.Filter):
    """Logs a request aiohttp could not parse as one line that quotes none of it.

    aiohttp's parser errors repeat the offending bytes (an over-long ``Authorization``
    header, say), and aiohttp logs them with a traceback; a caller's key must never
    reach the log, and a client's bad request is no error of the gateway's.
    """

    def filter(self, record: logging.LogRecord) -> bool:
        """Rewrite records carrying an HTTP parse error; let every other record through."""
        exc = record.exc_info[1] if record.exc_info else None
        if isinstance(exc, RequestPayloadError) and isinstance(exc.__cause__, HttpProcessingError):
            # A body that could not be decoded (bad gzip, say) was answered with a 400
            # already; aiohttp, draining the rest after the answer, meets the error again
            # and logs it as "Unhandled exception" with a traceback.
            record.msg = "a refused request body could not be drained: %s"
            record.args = (type(exc.__cause__).__name__,)
            record.exc_info = None
            record.exc_text = None
            record.levelno = logging.DEBUG
            record.levelname = logging.getLevelName(record.levelno)
            return True
        if isinstance(exc, HttpProcessingError):
            where = record.args[0] if isinstance(record.args, tuple) and record.args else "?"
            record.msg = "refused a malformed request from %s: %s (HTTP %s)"
            record.args = (where, type(exc).__name__, exc.code)
            record.exc_info = None
            record.exc_text = None
            # At most a warning: aiohttp logs a port scanner's noise at debug on purpose.
            record.levelno = min(record.levelno, logging.WARNING)
            record.levelname = logging.getLevelName(record.levelno)
        return True


def quiet_malformed_requests(logger: logging.Logger) -> None:
    """Install :class:`MalformedRequestFilter` on ``logger`` once."""
    if not any(isinstance(f, MalformedRequestFilter) for f in logger.filters):
        logger.addFilter(MalformedRequestFilter())
