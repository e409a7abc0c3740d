"""A batch's output and error files, read into one outcome per request."""

from __future__ import annotations

import json
import logging
from collections.abc import Callable, Container
from dataclasses import dataclass
from typing import Any

from ..resilience import is_retryable_status
from ..upstream import SNIPPET, TEXT_OF, Completion

log = logging.getLogger("minima_llm.jobs")

# The error type of a request the job ended without answering.
MISSING = "BatchMissing"
# Error codes a provider gives lines it never ran (OpenAI's batch output spec).
_NOT_RUN = frozenset({"batch_expired", "batch_cancelled"})


@dataclass(frozen=True)
class LineFailure:
    """A request the job did not answer: an error line, a missing line, or a job that failed."""

    error_type: str
    message: str
    status: int | None = None
    snippet: str | None = None

    @property
    def worth_resending(self) -> bool:
        """Whether another job could answer it: never run, or refused for a passing reason."""
        if self.error_type == MISSING:
            return True
        return self.error_type == "BatchRequestError" and (
            self.status is not None and is_retryable_status(self.status)
        )


Outcome = Completion | LineFailure


def read_lines(
    data: bytes, endpoint: str, wanted: Container[str], outcomes: dict[str, Outcome]
) -> None:
    """Parse an output or error file into ``outcomes``; lines for keys not wanted are skipped."""
    text_of = TEXT_OF[endpoint]
    for number, raw in enumerate(data.decode("utf-8", "replace").splitlines(), 1):
        if not raw.strip():
            continue
        try:
            line = json.loads(raw)
            key = line["custom_id"]
        except (ValueError, KeyError, TypeError):
            log.warning("batch output line %d unreadable: %.200s", number, raw)
            continue
        if key in wanted:
            outcome = _outcome(line, text_of)
            # A key answered twice (output and error file, say) keeps an answer it has:
            # a paid-for completion is never dropped for a failure of the same request.
            if isinstance(outcome, Completion) or not isinstance(outcomes.get(key), Completion):
                outcomes[key] = outcome


def _outcome(line: dict[str, Any], text_of: Callable[[dict[str, Any]], str]) -> Outcome:
    response = line.get("response") or {}
    status = response.get("status_code") if isinstance(response, dict) else None
    body = response.get("body") if isinstance(response, dict) else None
    if isinstance(status, int) and 200 <= status < 300 and isinstance(body, dict):
        try:
            text = json.dumps(body)
            return Completion(text, body, text_of(body))
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            return LineFailure("MalformedResponse", f"unreadable answer: {exc!r}", status)
    error = line.get("error")
    if isinstance(body, dict) and isinstance(body.get("error"), dict):
        error = body["error"]
    code = error.get("code") if isinstance(error, dict) else None
    message = error.get("message") if isinstance(error, dict) else None
    snippet = json.dumps(error)[:SNIPPET] if error is not None else None
    if code in _NOT_RUN:
        return LineFailure(MISSING, str(message or code), None, snippet)
    return LineFailure(
        "BatchRequestError",
        str(message or f"the batch answered this request with status {status}"),
        status if isinstance(status, int) else None,
        snippet,
    )
