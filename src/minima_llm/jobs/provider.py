"""Provider batch mode: send a batch's cache misses as one batch-API job and wait for it.

``ProviderJobs.run`` takes the requests of one endpoint and model (cache key ->
upstream body), and returns each key's outcome: the upstream's completion or a
``LineFailure``. The flow is upload, create, poll, download, with a state file
written at every step, so a run that is interrupted (or times out after
``max_poll_hours``) and started again with the same requests picks the job up
where it stood instead of paying for it twice.

``JobCollector`` serves single calls (``generate`` under batch mode, e.g. from
DSPy): calls that arrive close together become one job.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Generic, TypeVar

from ..clock import SYSTEM_CLOCK, Clock
from ..config import MinimaLlmConfig
from ..errors import ConfigError
from ..upstream import TEXT_OF, Completion
from .api import DEFAULT_ATTEMPTS, BatchApi, BatchApiError
from .state import WITH_OUTPUT, JobState, digest_of, load, path_for

log = logging.getLogger("minima_llm.jobs")

# Calls to ``generate`` that arrive within this long of each other share one job,
# and a job waits at most MAX_COLLECT_S for calls that keep coming.
COLLECT_S = 0.5
MAX_COLLECT_S = 10.0
# OpenAI's limit on requests in one batch; a bigger set of misses becomes several jobs.
MAX_LINES = 50_000
# Endpoints the batch API accepts, by the backend's endpoint names.
BATCHABLE = ("chat/completions", "completions", "embeddings")
_SNIPPET = 300
# The error type of a request the job ended without answering at all.
MISSING = "BatchMissing"
T = TypeVar("T")


@dataclass(frozen=True)
class LineFailure:
    """A request the job did not answer: an error line, a missing line, or a job that failed."""

    error_type: str
    message: str
    status: int | None = None
    snippet: str | None = None


Outcome = Completion | LineFailure
Report = Callable[[str], None]
Store = Callable[[dict[str, Outcome]], Awaitable[None]]


def state_dir_of(config: MinimaLlmConfig) -> str:
    """Where batch state files live: ``parasail.state_dir``, else ``cache_dir``."""
    directory = config.parasail.state_dir or config.cache_dir
    if not directory:
        raise ConfigError(
            "parasail.state_dir",
            config.parasail.state_dir,
            "batch mode keeps job state on disk: set parasail.state_dir or cache_dir",
        )
    return directory


def api_of(config: MinimaLlmConfig, base_url: str | None = None) -> BatchApi:
    """The batch API client with ``config``'s key and retry settings, at its or another endpoint."""
    return BatchApi(
        base_url or config.base_url,
        config.api_key,
        config.timeout_s,
        attempts=config.max_attempts or DEFAULT_ATTEMPTS,
        base_backoff_s=config.base_backoff_s,
        max_backoff_s=config.max_backoff_s,
        jitter=config.jitter,
    )


class ProviderJobs:
    """Runs provider batch jobs for one backend's configuration."""

    def __init__(
        self, config: MinimaLlmConfig, api: BatchApi | None = None, clock: Clock = SYSTEM_CLOCK
    ) -> None:
        parasail = config.parasail
        self.prefix = parasail.llm_batch_prefix or "minima-llm"
        self.state_dir = state_dir_of(config)
        self.base_url = config.base_url
        self.poll_interval_s = parasail.poll_interval_s
        self.max_wait_s = parasail.max_poll_hours * 3600.0
        # The most requests one job takes; run_batched splits bigger sets of misses.
        self.max_lines = MAX_LINES
        self.api = api or api_of(config)
        self._clock = clock

    def __repr__(self) -> str:
        return f"<ProviderJobs prefix={self.prefix!r} state_dir={self.state_dir!r}>"

    async def run(
        self,
        endpoint: str,
        model: str,
        bodies: Mapping[str, Mapping[str, Any]],
        report: Report | None = None,
        store: Store | None = None,
        fresh: bool = False,
    ) -> dict[str, Outcome]:
        """Each key's outcome after one job over ``bodies`` (cache key -> upstream body).

        ``store`` writes the answers (to the cache) before the job counts as collected;
        a collected job is never resumed, so a rerun sends what it did not answer.
        ``fresh`` starts a new job even if one for the same requests could be resumed
        (force refresh).
        """
        if not bodies:
            return {}
        say = report or log.info
        digest = digest_of(endpoint, model, bodies)
        path = path_for(self.state_dir, self.prefix, digest)
        state = None if fresh else self._resumable(path)
        resumed = state is not None and state.batch_id is not None
        try:
            if state is None or state.batch_id is None:
                state = await self._submit(path, digest, endpoint, model, bodies, state)
                say(f"[batch-job] {state.batch_id}: submitted {len(bodies)} requests ({path.name})")
            else:
                say(
                    f"[batch-job] {state.batch_id}: resuming, last seen {state.status} ({path.name})"
                )
            await self._wait(state, say)
            outcomes = await self._collect(state, endpoint, bodies)
        except BatchApiError as exc:
            # The job may well be running: its state file stays, and the next run resumes it.
            failure = LineFailure("BatchApiError", str(exc), exc.status)
            return {key: failure for key in bodies}
        if store is not None:
            await store(outcomes)
        state.collected_at = time.time()
        state.save()
        left = {k: bodies[k] for k, o in outcomes.items() if _unanswered(o)}
        if resumed and left:
            # The job this run took over ended (cancelled, expired) before answering
            # these: the run was asked for them, so they go in a job of their own now.
            say(f"[batch-job] {state.batch_id}: ended {state.status}; sending {len(left)} again")
            outcomes.update(await self.run(endpoint, model, left, report, store))
        return outcomes

    def _resumable(self, path: Path) -> JobState | None:
        """The job in ``path`` if it can still give answers, else None (a new one is needed)."""
        if not path.exists():
            return None
        try:
            state = load(path)
        except ValueError as exc:
            log.warning("%s; starting a new job", exc)
            return None
        if state.base_url != self.base_url:
            log.warning(
                "batch state %s belongs to %s, not %s; starting a new job",
                path.name,
                state.base_url,
                self.base_url,
            )
            return None
        if state.batch_id is None and state.input_file_id is not None:
            return state  # uploaded, but the create failed: the file can still be used
        if state.collected_at is not None or state.batch_id is None:
            # Its answers are cached: what is asked again is what it did not answer.
            return None
        if state.terminal and state.status not in WITH_OUTPUT:
            log.info("batch state %s: job %s, starting a new one", path.name, state.status)
            return None
        return state

    async def _submit(
        self,
        path: Path,
        digest: str,
        endpoint: str,
        model: str,
        bodies: Mapping[str, Mapping[str, Any]],
        uploaded: JobState | None = None,
    ) -> JobState:
        """Upload the requests (unless ``uploaded`` holds a file already) and create the batch."""
        url = "/v1/" + endpoint
        state = uploaded or JobState(
            self.prefix, digest, url, self.base_url, model, len(bodies), path=path
        )
        if state.input_file_id is None:
            lines = (
                json.dumps({"custom_id": key, "method": "POST", "url": url, "body": body})
                for key, body in bodies.items()
            )
            data = ("\n".join(lines) + "\n").encode("utf-8")
            file = await self.api.aupload(data, path.name.replace(".batch.json", ".jsonl"))
            state.input_file_id = _id_of(file, "file")
            state.status = "uploaded"
            state.save()
        metadata = {"minima_llm_prefix": self.prefix, "minima_llm_digest": digest[:16]}
        state.update(await self.api.acreate(state.input_file_id, url, metadata))
        state.save()
        return state

    async def _wait(self, state: JobState, say: Report) -> None:
        """Poll until the provider is done with the batch, or ``max_poll_hours`` have passed."""
        started = self._clock.monotonic()
        last = ""
        while not state.terminal:
            state.update(await self.api.aget(_need(state.batch_id)))
            state.save()
            counts = state.request_counts
            line = (
                f"[batch-job] {state.batch_id}: {state.status}, "
                f"{counts.get('completed', 0)}/{counts.get('total', state.request_count)} done, "
                f"{counts.get('failed', 0)} failed"
            )
            if line != last:
                say(line)
                last = line
            if state.terminal:
                break
            waited = self._clock.monotonic() - started
            if waited >= self.max_wait_s:
                raise BatchApiError(
                    f"batch {state.batch_id} still {state.status} after "
                    f"{waited / 3600:.2f} h (max_poll_hours); run again to resume it"
                )
            await self._clock.sleep(min(self.poll_interval_s, self.max_wait_s - waited))

    async def _collect(
        self, state: JobState, endpoint: str, bodies: Mapping[str, Mapping[str, Any]]
    ) -> dict[str, Outcome]:
        outcomes: dict[str, Outcome] = {}
        for file_id in (state.output_file_id, state.error_file_id):
            if file_id:
                _read_lines(await self.api.acontent(file_id), endpoint, bodies, outcomes)
        missing = LineFailure(
            MISSING,
            f"batch {state.batch_id} ended {state.status} without an answer for this request",
        )
        return {key: outcomes.get(key, missing) for key in bodies}


def _unanswered(outcome: Outcome) -> bool:
    return isinstance(outcome, LineFailure) and outcome.error_type == MISSING


def _read_lines(
    data: bytes,
    endpoint: str,
    bodies: Mapping[str, Mapping[str, Any]],
    outcomes: dict[str, Outcome],
) -> None:
    """Parse an output or error file into ``outcomes``; lines for keys not asked for are ignored."""
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
        if key not in bodies:
            continue
        outcomes[key] = _outcome(line, text_of)


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
    message = error.get("message") if isinstance(error, dict) else None
    snippet = json.dumps(error)[:_SNIPPET] if error is not None else None
    return LineFailure(
        "BatchRequestError",
        str(message or f"the batch answered this request with status {status}"),
        status if isinstance(status, int) else None,
        snippet,
    )


def _id_of(obj: dict[str, Any], kind: str) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not value:
        raise BatchApiError(f"the batch API answered a {kind} without an id: {obj!r:.300}")
    return value


def _need(batch_id: str | None) -> str:
    if batch_id is None:  # _submit and _resumable never leave a job without one
        raise BatchApiError("batch state has no batch id")
    return batch_id


@dataclass
class _Waiting(Generic[T]):
    key: str
    item: T
    future: asyncio.Future[Outcome]


class JobCollector(Generic[T]):
    """Gathers single calls made close together into one job per endpoint and model.

    ``run(endpoint, model, items)`` runs the job over ``items`` (cache key -> whatever
    the caller needs to build and store the request) and returns each key's outcome.
    """

    def __init__(
        self,
        run: Callable[[str, str, dict[str, T]], Awaitable[dict[str, Outcome]]],
        collect_s: float = COLLECT_S,
    ) -> None:
        self._run = run
        self.collect_s = collect_s
        self._pending: dict[tuple[str, str], list[_Waiting[T]]] = {}
        self._flushers: set[asyncio.Task[None]] = set()

    async def submit(self, endpoint: str, model: str, key: str, item: T) -> Outcome:
        """The outcome of this request, once the job it joins has ended."""
        loop = asyncio.get_running_loop()
        waiting = _Waiting(key, item, loop.create_future())
        group = self._pending.setdefault((endpoint, model), [])
        group.append(waiting)
        if len(group) == 1:
            task = loop.create_task(self._flush_later(endpoint, model))
            self._flushers.add(task)
            task.add_done_callback(self._flushers.discard)
        return await asyncio.shield(waiting.future)

    async def _flush_later(self, endpoint: str, model: str) -> None:
        group_key = (endpoint, model)
        group = self._pending[group_key]
        try:
            # Wait while calls keep coming (a DSPy batch hands them over one worker at a
            # time), within a bound, and no further than one job can hold.
            deadline = time.monotonic() + MAX_COLLECT_S
            seen = -1
            while seen != len(group) and len(group) < MAX_LINES and time.monotonic() < deadline:
                seen = len(group)
                await asyncio.sleep(self.collect_s)
            del self._pending[group_key]
            items = {w.key: w.item for w in group}
            try:
                outcomes = await self._run(endpoint, model, items)
            except Exception as exc:
                log.error("batch job failed: %s", exc, exc_info=exc)
                outcomes = {k: LineFailure(type(exc).__name__, str(exc)) for k in items}
            for w in group:
                if not w.future.done():
                    w.future.set_result(outcomes[w.key])
        finally:
            # Cancelled (its loop closing, say): no waiter may be left on a group nobody flushes.
            if self._pending.get(group_key) is group:
                del self._pending[group_key]
            for w in group:
                if not w.future.done():
                    w.future.cancel()
