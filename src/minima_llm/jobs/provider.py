"""Provider batch mode: send a batch's cache misses as batch-API jobs and wait for them.

``ProviderJobs.run`` takes the requests of one endpoint and model (cache key ->
upstream body) and returns each key's outcome: the upstream's completion or a
``LineFailure``. Requests an earlier job (this process's or another's, finished or
not) was sent and can still answer are taken from that job; only the rest are
uploaded as a new one. Every step is written to the job's state file, so a run
that is interrupted, or gives up after ``max_poll_hours``, loses nothing: the next
run asking for any of those requests takes the job over.

Two lock files keep two runs from submitting the same requests at once, and
neither is held while a poll waits. The state directory's lock covers reading and
writing state files, and a create (so a second run never creates the batch of a
file a first run is creating); an upload or a look-up can take minutes, so they
run outside it, under the lock of their job alone. A new job is recorded
(``uploading``) under the directory lock before its upload starts, so any run
that looks meanwhile waits on that job's lock rather than sending the same
requests again, and takes the job over (or, if its run died before recording the
upload, drops the record: nothing was created).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from pathlib import Path
from typing import Any, TypeVar

from ..cache import json_default
from ..clock import SYSTEM_CLOCK, Clock
from ..config import MinimaLlmConfig
from ..errors import ConfigError
from ..resilience import is_retryable_status
from ..upstream import Completion
from .api import DEFAULT_ATTEMPTS, FIND_PAGES, BatchApi, BatchApiError, ListingIncomplete
from .lines import MISSING, LineFailure, Outcome, read_lines
from .lock import STALE_S, lock_path, locked
from .state import (
    SUFFIX,
    JobNeedsAttention,
    JobState,
    digest_of,
    list_states,
    load,
    path_for,
    repeat_path_for,
    save_merged,
)

log = logging.getLogger("minima_llm.jobs")

# OpenAI's limits on one batch: requests, and bytes of its input file (200 MB, with room).
MAX_LINES = 50_000
MAX_BYTES = 190_000_000
# Endpoints the batch API accepts, by the backend's endpoint names.
BATCHABLE = ("chat/completions", "completions", "embeddings")

T = TypeVar("T")
Report = Callable[[str], None]
# What a provider without a usable GET /batches answers: a look-up can never succeed there.
_NO_LISTING = frozenset({400, 404, 405})
# Our status for a job recorded before its upload, whose run holds the job's lock.
UPLOADING = "uploading"
# A poll's progress is recorded only if the directory lock comes this soon: it is news
# the next poll (or run) learns again, never worth failing a job that is running.
PROGRESS_LOCK_WAIT_S = 2.0
# When the provider cannot date an input file: how far our clock may run ahead of its.
CLOCK_SKEW_S = 3600.0
# Take-over rounds in one call: each settles the jobs the one before found unsettled.
_ROUNDS = 8
# Caches the answers; True once every completion among them is committed.
Store = Callable[[dict[str, Outcome]], Awaitable[bool]]
# Which of these keys the cache already holds (answered some other way).
Cached = Callable[[list[str]], Awaitable[set[str]]]


def split(
    items: list[T], max_lines: int, max_bytes: int, size: Callable[[T], int]
) -> list[list[T]]:
    """``items`` in runs one job takes: at most ``max_lines``, and ``max_bytes`` by ``size``."""
    parts: list[list[T]] = [[]]
    total = 0
    for item in items:
        length = size(item)
        if parts[-1] and (len(parts[-1]) >= max_lines or total + length > max_bytes):
            parts.append([])
            total = 0
        parts[-1].append(item)
        total += length
    return [part for part in parts if part]


def key_id_of(api_key: str | None) -> str | None:
    """A name for an API key that reveals nothing of it (state files may be shared)."""
    return hashlib.sha256(api_key.encode()).hexdigest()[:16] if api_key else None


def find_batch_of(api: BatchApi, state: JobState, pages: int = FIND_PAGES) -> dict[str, Any] | None:
    """The batch made from ``state``'s uploaded file, or None if surely none was.

    The search ends at a batch older than the file, dated by the provider's own
    clock when it can say (``GET /files/{id}``), else by ours with room for skew.
    ``ListingIncomplete`` when it cannot tell.
    """
    file_id = state.input_file_id
    assert file_id is not None  # only a state with an uploaded file is looked up
    try:
        created = api.file(file_id).get("created_at")
    except BatchApiError as exc:
        if exc.status is None or is_retryable_status(exc.status):
            raise  # passing: the next try asks again
        created = None  # the provider cannot say (no such route, the file gone): our clock
    if isinstance(created, (int, float)) and not isinstance(created, bool):
        since = float(created)
    else:
        since = state.created_at - CLOCK_SKEW_S
    return api.find(file_id, since, pages)


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
        self.state_dir = Path(state_dir_of(config))
        self.base_url = config.base_url
        self.key_id = key_id_of(config.api_key)
        self.poll_interval_s = parasail.poll_interval_s
        self.max_wait_s = parasail.max_poll_hours * 3600.0
        # The most requests, and bytes of requests, one job takes; more become several jobs.
        self.max_lines = MAX_LINES
        self.max_bytes = MAX_BYTES
        # How long a run waits for the state directory's lock, and how many pages of
        # batches a look-up reads before it says it could not tell.
        self.lock_wait_s = STALE_S
        self.find_pages = FIND_PAGES
        self.api = api or api_of(config)
        self._clock = clock

    def __repr__(self) -> str:
        return f"<ProviderJobs prefix={self.prefix!r} state_dir={str(self.state_dir)!r}>"

    async def run(
        self,
        endpoint: str,
        model: str,
        bodies: Mapping[str, Mapping[str, Any]],
        *,
        report: Report | None = None,
        store: Store | None = None,
        fresh: bool = False,
        cached: Cached | None = None,
    ) -> dict[str, Outcome]:
        """Each key's outcome, from earlier jobs that can answer it or from a new one.

        ``store`` caches the answers; a job counts as collected (never taken over
        again) only once all it answered is stored. ``fresh`` sends everything in a
        new job (force refresh). ``cached`` tells which of a job's other answers are in
        the cache already, so a job whose answers all are counts as collected too.
        """
        # One bound for the whole call, resend round included.
        deadline = self._clock.monotonic() + self.max_wait_s
        args = (report, store, fresh, cached, deadline)
        outcomes = await self._run_once(endpoint, model, bodies, *args)
        again = {k: bodies[k] for k, o in outcomes.items() if isinstance(o, _Resend)}
        if again:
            # A job taken over ended before answering these (cancelled, expired, a 5xx
            # line): this run was asked for them, so they go in a job of their own.
            # Not fresh: another run resending the same lines has a job this one can share,
            # and take-over skips the jobs that left them unanswered.
            (report or log.info)(f"[batch-job] sending {len(again)} requests again")
            resent = await self._run_once(endpoint, model, again, *args)
            outcomes.update(resent)
        return _plain(outcomes)

    async def _run_once(
        self,
        endpoint: str,
        model: str,
        bodies: Mapping[str, Mapping[str, Any]],
        report: Report | None,
        store: Store | None,
        fresh: bool,
        cached: Cached | None,
        deadline: float,
    ) -> dict[str, Outcome | _Resend]:
        if not bodies:
            return {}
        say = report or log.info
        # Shielded: a run cancelled while it uploads or creates must still record (and
        # unlock) what the provider did, or the next run would pay for it again.
        choosing = asyncio.ensure_future(
            self._choose("/v1/" + endpoint, model, bodies, fresh, say, deadline)
        )
        try:
            taken = await asyncio.shield(choosing)
        except (BatchApiError, JobNeedsAttention, OSError) as exc:
            return dict.fromkeys(bodies, _failure(exc))
        finished = await asyncio.gather(
            *(self._finish(state, keys, endpoint, say, deadline) for state, keys in taken),
            return_exceptions=True,
        )
        outcomes: dict[str, Outcome | _Resend] = {}
        for (state, keys), result in zip(taken, finished, strict=True):
            if isinstance(result, BaseException):
                if not isinstance(result, (BatchApiError, OSError)):
                    raise result
                # The job may well be running: its state file stays for the next run.
                outcomes.update(dict.fromkeys(keys, _failure(result)))
                continue
            # Lines of a job taken over are sent again, unless someone cancelled it while
            # this run waited: a cancel is a wish to stop spending. (A run started after
            # the cancel was asked for the answers, and sends them.)
            cancelled = state.cancel_requested_at or 0.0
            resend = state.created_in_run is False and cancelled <= (state.taken_at or 0.0)
            for key, outcome in result.items():
                if resend and isinstance(outcome, LineFailure) and outcome.worth_resending:
                    outcomes[key] = _Resend(outcome)
                else:
                    outcomes[key] = outcome
        plain = _plain(outcomes)
        if store is not None and await store(plain):
            await self._delivered(taken, plain, cached)
        return outcomes

    async def _choose(
        self,
        url: str,
        model: str,
        bodies: Mapping[str, Mapping[str, Any]],
        fresh: bool,
        say: Report,
        deadline: float,
    ) -> list[tuple[JobState, set[str]]]:
        """The jobs that will answer ``bodies``: earlier ones taken over, and a new one for the rest.

        A job without a batch id is settled first (its run finishes, or this one
        looks it up), under its own lock, then the choice is made again: the new
        job is recorded only by a round that found every job it takes settled.
        """
        for _ in range(_ROUNDS):
            async with contextlib.AsyncExitStack() as stack:
                async with self._lock():
                    offered = (
                        []
                        if fresh
                        else await asyncio.to_thread(self._take_over, url, model, set(bodies))
                    )
                    unsettled = [s for s, _ in offered if s.batch_id is None]
                    rest = {k: bodies[k] for k in bodies if not any(k in ks for _, ks in offered)}
                    new = None
                    if rest and not unsettled:
                        new = await self._intend(stack, url, model, rest)
                if unsettled:
                    for state in unsettled:
                        await self._settle(state, say, deadline)
                    continue
                for state, keys in offered:
                    say(
                        f"[batch-job] {state.batch_id}: {len(keys)} requests from it, {state.status}"
                    )
                if new is not None:
                    await self._submit(new, rest, say)
                    offered.append((new, set(rest)))
                return offered
        raise BatchApiError(
            f"the batch state in {self.state_dir} kept changing while this run chose its jobs;"
            " run again"
        )

    def _lock(self, wait_s: float | None = None) -> contextlib.AbstractAsyncContextManager[None]:
        wait = self.lock_wait_s if wait_s is None else wait_s
        return locked(lock_path(self.state_dir), self._clock, wait)

    def _job_lock(self, path: Path, wait_s: float) -> contextlib.AbstractAsyncContextManager[None]:
        """The lock of one job's state file: held from its record to its create."""
        return locked(path.with_name(f".{path.name}.lock"), self._clock, wait_s)

    def _take_over(self, url: str, model: str, wanted: set[str]) -> list[tuple[JobState, set[str]]]:
        """Earlier jobs of this endpoint and model that can answer some of ``wanted``."""
        taken: list[tuple[JobState, set[str]]] = []
        # Another API key's job (a lab sharing a directory) is one this key cannot read:
        # the provider answers 404, which would look like a lost job.
        mine = (self.prefix, self.base_url, self.key_id, url, model)
        # Strict: a state file of this prefix that cannot be read may be a job holding
        # some of these requests, and sending them anyway could pay for them twice.
        for state in list_states(self.state_dir, self.prefix, strict=True):
            if (state.prefix, state.base_url, state.key_id, state.endpoint, state.model) != mine:
                continue
            if state.status == UPLOADING and state.batch_id is None and not state.input_file_id:
                keys = wanted.intersection(state.keys)  # a run is uploading it: wait for it
            else:
                keys = state.takes(wanted)
            if keys:
                state.created_in_run = False
                state.taken_at = time.time()
                taken.append((state, keys))
                wanted -= keys
        return taken

    async def _intend(
        self,
        stack: contextlib.AsyncExitStack,
        url: str,
        model: str,
        bodies: Mapping[str, Mapping[str, Any]],
    ) -> JobState:
        """Record a job about to be uploaded, its lock held until ``stack`` closes (directory lock held)."""
        digest = digest_of(url, model, bodies)
        path = path_for(self.state_dir, self.prefix, digest)
        if path.exists():
            # The same requests again (force refresh): the earlier job keeps its own file.
            path = repeat_path_for(path)
        try:
            await stack.enter_async_context(self._job_lock(path, 0.0))
        except BatchApiError:
            # A lock left on this name by a run that died, not yet known for dead.
            path = repeat_path_for(path)
            await stack.enter_async_context(self._job_lock(path, 0.0))
        state = JobState(self.prefix, digest, url, self.base_url, model, len(bodies), path=path)
        state.key_id = self.key_id
        state.keys = list(bodies)
        state.created_in_run = True
        state.status = UPLOADING
        # Taken before the record is written: whoever reads it finds its lock held.
        await asyncio.to_thread(state.save)
        return state

    async def _submit(
        self, state: JobState, bodies: Mapping[str, Mapping[str, Any]], say: Report
    ) -> None:
        """Upload a recorded job's requests and create its batch (the job's lock held)."""
        assert state.path is not None  # _intend gives it one
        lines = (
            # Compact, like the canonical JSON that run_batched sizes its jobs by.
            json.dumps(
                {"custom_id": key, "method": "POST", "url": state.endpoint, "body": body},
                separators=(",", ":"),
                default=json_default,  # messages may be any Mapping, as in a cache key
            )
            for key, body in bodies.items()
        )
        data = ("\n".join(lines) + "\n").encode("utf-8")
        try:
            file = await self.api.aupload(data, state.path.name.removesuffix(SUFFIX) + ".jsonl")
            file_id = _id_of(file, "file")
        except (BatchApiError, OSError):
            await self._forget(state)  # no batch can exist: the record goes
            raise
        state.input_file_id = file_id
        state.status = "uploaded"
        async with self._lock():
            # Saved before the create: a run killed during it leaves a file to look up.
            await asyncio.to_thread(state.save)
            await self._create(state, say, None)  # a new file: no batch can exist yet
        say(f"[batch-job] {state.batch_id}: submitted {len(bodies)} requests ({state.path.name})")

    async def _forget(self, state: JobState) -> None:
        """Remove the record of a job whose upload failed (its lock held)."""
        assert state.path is not None
        try:
            async with self._lock():
                await asyncio.to_thread(state.path.unlink, True)
        except (BatchApiError, OSError) as exc:
            # Left, it is taken for a run that died uploading, and dropped by the next.
            log.warning("%s: the record of a failed upload stays: %s", state.path, exc)

    async def _settle(self, state: JobState, say: Report, deadline: float) -> None:
        """Wait for the run submitting ``state``'s job, or finish what a run that died left."""
        assert state.path is not None  # read from a file
        wait = max(0.0, deadline - self._clock.monotonic())
        async with self._job_lock(state.path, wait):
            try:
                job = await asyncio.to_thread(load, state.path)
            except ValueError:
                return  # dropped meanwhile; the next take-over looks at the directory again
            if job.batch_id is not None:
                return  # its run created it
            if not job.input_file_id:
                # Its run stopped before recording the upload: no batch can exist.
                async with self._lock():
                    await asyncio.to_thread(state.path.unlink, True)
                say(f"[batch-job] {state.path.name}: its upload never finished; sending anew")
                return
            await self._created(job, say)

    async def _created(self, state: JobState, say: Report) -> bool:
        """Create the batch of a file an earlier run uploaded; False if the provider refuses."""
        file_id = state.input_file_id
        assert file_id is not None  # takes() only gets here with a file
        # A look-up that fails tells nothing of whether the earlier create worked, so the
        # state stays for the next run. A provider without a listing refuses every run
        # the same way: only a person can decide, so the error says what to do.
        try:
            found = await asyncio.to_thread(find_batch_of, self.api, state, self.find_pages)
        except ListingIncomplete as exc:
            raise JobNeedsAttention(
                f"{state.path}: its batch may have been created from file {file_id}, but the"
                f" provider's batch list could not tell ({exc}), so its requests are not sent"
                f" again. Look for a batch with input_file_id {file_id} at the provider: if"
                " there is one, put its id in the file's batch_id; if not, move the file"
                " aside to send the requests anew"
            ) from exc
        except BatchApiError as exc:
            if exc.status not in _NO_LISTING:
                raise  # passing, or the caller's to fix (a key refused): the next run looks again
            raise JobNeedsAttention(
                f"{state.path}: its batch may have been created, but the provider refused"
                f" to look it up ({exc}), so its requests are not sent again: move the file"
                " aside to send them anew"
            ) from exc
        async with self._lock():
            try:
                await self._create(state, say, found)
            except BatchApiError as exc:
                if exc.status is None or is_retryable_status(exc.status):
                    raise  # it may yet work: the state stays for the next run
                # A 4xx: the provider surely did nothing (its file is gone, say).
                state.status, state.errors = "failed", [str(exc)]
                await asyncio.to_thread(state.save)
                say(f"[batch-job] the upload in {state.path} was refused: {exc}")
                return False
        return True

    async def _create(self, state: JobState, say: Report, found: dict[str, Any] | None) -> None:
        """Create the batch of an uploaded file, unless an earlier try did (``found``; lock held)."""
        file_id = state.input_file_id
        assert file_id is not None  # takes() and _submit only get here with a file
        if found is None:
            metadata = {"minima_llm_prefix": self.prefix, "minima_llm_digest": state.digest[:16]}
            found = await self.api.acreate(file_id, state.endpoint, metadata)
        else:
            say(f"[batch-job] {found.get('id')}: found the batch an earlier try created")
        _id_of(found, "batch")
        state.update(found)
        await asyncio.to_thread(state.save)

    async def _finish(
        self, state: JobState, keys: set[str], endpoint: str, say: Report, deadline: float
    ) -> dict[str, Outcome]:
        """Wait for the job to end, then read the outcomes of ``keys`` from its files."""
        await self._wait(state, say, deadline)
        outcomes: dict[str, Outcome] = {}
        for file_id, kind in ((state.output_file_id, "output"), (state.error_file_id, "error")):
            if not file_id:
                continue
            try:
                read_lines(await self.api.acontent(file_id), endpoint, set(state.keys), outcomes)
            except BatchApiError as exc:
                if exc.status != 404:
                    raise
                say(f"[batch-job] {state.batch_id}: its {kind} file is gone ({exc})")
                gone = f"{kind} file {file_id} is gone"
                if gone not in state.errors:  # a rerun reads the job again: say it once
                    state.errors = [*state.errors, gone]
                if kind == "output":
                    # The answers are gone with it; only then is the whole job lost.
                    state.status, outcomes = "lost", {}
                    break
                # Only failures were in an error file: the answers already read stay.
        state.answered = sorted(k for k, o in outcomes.items() if isinstance(o, Completion))
        try:
            await self._save(state)
        except BatchApiError as exc:
            # The answers are in hand: losing them to a busy directory would pay twice.
            # A rerun reads the job again (free) and records it.
            log.warning("batch %s: its end was not recorded: %s", state.batch_id, exc)
        why = f" ({'; '.join(state.errors)})" if state.errors else ""
        missing = LineFailure(
            MISSING, f"batch {state.batch_id} ended {state.status} without answering this{why}"
        )
        return {key: outcomes.get(key, missing) for key in keys}

    async def _wait(self, state: JobState, say: Report, deadline: float) -> None:
        """Poll until the provider is done with the batch, or the run's ``deadline``."""
        started = deadline - self.max_wait_s
        last = ""
        batch_id = state.batch_id
        while not state.terminal and batch_id is not None:
            try:
                state.update(await self.api.aget(batch_id))
            except BatchApiError as exc:
                if exc.status == 404:
                    say(f"[batch-job] {batch_id}: the provider no longer knows this batch")
                    state.status = "lost"
                elif exc.status is not None and not is_retryable_status(exc.status):
                    raise
                else:
                    # An outage of the batch API is no reason to give up a job of hours.
                    say(f"[batch-job] {batch_id}: poll failed, trying again: {exc}")
            await self._save_progress(state)
            line = _progress(state)
            if line != last:
                say(line)
                last = line
            if state.terminal:
                break
            now = self._clock.monotonic()
            if now >= deadline:
                raise BatchApiError(
                    f"batch {batch_id} still {state.status} after {(now - started) / 3600:.2f} h "
                    f"(max_poll_hours); run again to resume it"
                )
            await self._clock.sleep(min(self.poll_interval_s, deadline - now))

    async def _save(self, state: JobState, delivered: set[str] | None = None) -> None:
        """Save (recording ``delivered`` answers) without undoing another run's deliveries."""
        async with self._lock():
            await asyncio.to_thread(save_merged, state, delivered)

    async def _save_progress(self, state: JobState) -> None:
        """Save what a poll learned, unless the directory lock is busy: then the next poll does."""
        try:
            async with self._lock(min(self.lock_wait_s, PROGRESS_LOCK_WAIT_S)):
                await asyncio.to_thread(save_merged, state, None)
        except BatchApiError as exc:  # only taking the lock raises it
            log.debug("batch %s: progress not saved, the state is busy: %s", state.batch_id, exc)

    async def _delivered(
        self,
        taken: list[tuple[JobState, set[str]]],
        outcomes: Mapping[str, Outcome],
        cached: Cached | None,
    ) -> None:
        """Record the answers now cached in each job's state file."""
        try:
            delivered: list[tuple[JobState, set[str]]] = []
            for state, keys in taken:
                answered = {k for k in keys if isinstance(outcomes.get(k), Completion)}
                rest = set(state.answered or ()) - answered - set(state.delivered)
                if rest and cached is not None:
                    # Answers of this job asked for by nobody now: cached by another route?
                    answered |= await cached(sorted(rest))
                delivered.append((state, answered))
            async with self._lock():  # once for all: a busy directory costs one wait
                for state, answered in delivered:
                    await asyncio.to_thread(save_merged, state, answered)
        except (BatchApiError, OSError) as exc:
            log.warning("batch state not updated (the answers are cached): %s", exc)


class _Resend:
    """An outcome from a job taken over that a new job should try again."""

    __slots__ = ("failure",)

    def __init__(self, failure: LineFailure) -> None:
        self.failure = failure


def _plain(outcomes: Mapping[str, Outcome | _Resend]) -> dict[str, Outcome]:
    """The outcomes with each resend mark taken off."""
    return {k: o.failure if isinstance(o, _Resend) else o for k, o in outcomes.items()}


def _progress(state: JobState) -> str:
    return f"[batch-job] {state.batch_id}: {state.status}, {state.counts()}"


def _failure(exc: BaseException) -> LineFailure:
    if isinstance(exc, BatchApiError):
        return LineFailure("BatchApiError", str(exc), exc.status)
    if isinstance(exc, JobNeedsAttention):
        return LineFailure("BatchStateError", str(exc))
    return LineFailure("BatchStateError", f"cannot keep the batch job's state: {exc}")


def _id_of(obj: dict[str, Any], kind: str) -> str:
    value = obj.get("id")
    if not isinstance(value, str) or not value:
        raise BatchApiError(f"the batch API answered a {kind} without an id: {obj!r:.300}")
    return value
