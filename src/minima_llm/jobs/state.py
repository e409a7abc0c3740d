"""Local state files of provider batch jobs: what was submitted, where it stands.

One JSON file per job, ``{state_dir}/{prefix}-{digest16}.batch.json``, where the
digest covers the endpoint, the model and the sorted cache keys of the requests
sent. The file lists those keys, so a later run asking for any of them takes the
job over instead of paying for them again, whatever else it asks for; the file
stays after the answers are cached, as a record ``batch_status_overview`` shows.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ..errors import MinimaLlmError

log = logging.getLogger("minima_llm.jobs")

FORMAT = 1
SUFFIX = ".batch.json"
# The provider's statuses after which nothing more will happen to a batch; "lost" is
# ours, for a batch or file the provider no longer knows (404).
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled", "lost"})
# Terminal statuses that can still carry answers (a partial output file).
WITH_OUTPUT = frozenset({"completed", "expired", "cancelled"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")
_UNSAVED = frozenset({"path", "created_in_run", "taken_at"})


@dataclass
class JobState:
    """One provider batch job as this machine knows it."""

    prefix: str
    digest: str
    endpoint: str
    base_url: str
    model: str
    request_count: int
    batch_id: str | None = None
    input_file_id: str | None = None
    status: str = "new"
    request_counts: dict[str, int] = field(default_factory=dict)
    output_file_id: str | None = None
    error_file_id: str | None = None
    created_at: float = field(default_factory=time.time)
    updated_at: float = field(default_factory=time.time)
    # When every answer it gave was cached: a collected job is never taken over again.
    collected_at: float | None = None
    # The cache keys sent, one line each.
    keys: list[str] = field(default_factory=list)
    # Once it has ended and its files were read: the keys it answered.
    answered: list[str] | None = None
    # Keys whose answers some run has cached.
    delivered: list[str] = field(default_factory=list)
    # Why the provider refused the batch as a whole (validation errors).
    errors: list[str] = field(default_factory=list)
    # When someone cancelled it through the management functions: its lines stay unsent.
    cancel_requested_at: float | None = None
    # Which API key sent it (a hash): only that key's runs take it over.
    key_id: str | None = None
    path: Path | None = field(default=None, compare=False, repr=False)
    # Not saved: whether this process submitted the job (False: taken over from a file).
    created_in_run: bool | None = field(default=None, compare=False, repr=False)
    # Not saved: when this process took the job over (a cancel after that stops its resends).
    taken_at: float | None = field(default=None, compare=False, repr=False)

    @property
    def terminal(self) -> bool:
        """Whether the provider is done with this batch."""
        return self.status in TERMINAL

    def update(self, batch: dict[str, Any]) -> None:
        """Take status, counts and file ids from a batch object the provider sent."""
        status = batch.get("status")
        if isinstance(status, str):
            self.status = status
        counts = batch.get("request_counts")
        if isinstance(counts, dict):
            self.request_counts = {k: v for k, v in counts.items() if isinstance(v, int)}
        for name in ("output_file_id", "error_file_id", "input_file_id"):
            value = batch.get(name)
            if isinstance(value, str) and value:
                setattr(self, name, value)
        if isinstance(batch.get("id"), str):
            self.batch_id = batch["id"]
        errors = batch.get("errors")
        data = errors.get("data") if isinstance(errors, dict) else None
        if isinstance(data, list):
            self.errors = [str(e.get("message", e)) for e in data if isinstance(e, dict)]
        self.updated_at = time.time()

    def takes(self, wanted: set[str]) -> set[str]:
        """The keys among ``wanted`` this job can answer; reading its output again is free.

        A collected job still answers what it answered: a run that found those keys
        missing from the cache a moment before another run cached them must not pay.
        """
        if self.batch_id is None and not self.input_file_id:
            return set()
        if self.terminal:
            if self.status not in WITH_OUTPUT:
                return set()
            if self.answered is not None:
                return wanted.intersection(self.answered)
        return wanted.intersection(self.keys)

    def deliver(self, keys: set[str]) -> None:
        """Record answers cached; once all it answered are, the job is collected."""
        self.delivered = sorted(keys.union(self.delivered))
        if (
            self.terminal
            and self.answered is not None
            and set(self.answered) <= set(self.delivered)
        ):
            self.collected_at = time.time()

    def save(self) -> None:
        """Write the file atomically: a job killed mid-write leaves the old state, never half."""
        if self.path is None:
            raise ValueError("JobState.save needs a path")
        data = {k: v for k, v in dataclasses.asdict(self).items() if k not in _UNSAVED}
        data["format"] = FORMAT
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = _new_file_beside(self.path)
        try:
            with os.fdopen(fd, "w", encoding="utf-8") as fh:
                json.dump(data, fh, indent=2, sort_keys=True)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp, self.path)
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def counts(self) -> str:
        """``done/total done, failed failed``, as the provider last counted."""
        counts = self.request_counts
        total = counts.get("total", self.request_count)
        return f"{counts.get('completed', 0)}/{total} done, {counts.get('failed', 0)} failed"

    def summary(self) -> str:
        """One line for a status table."""
        collected = "collected" if self.collected_at else "not collected"
        return (
            f"{self.prefix:<20} {self.batch_id or '-':<32} {self.status:<12} "
            f"{self.counts()}, {collected}"
        )


def _new_file_beside(path: Path) -> tuple[int, Path]:
    """A new file next to ``path``, open for writing, with the mode new files get here.

    Not ``mkstemp``: it makes files 0600 whatever the umask, so in a state directory a
    lab shares (group-writable, umask 002) nobody else could read the job. Asking for
    0666 lets the kernel apply the umask, or the directory's default ACL, as it does
    for any file a program writes; reading the umask ourselves would race other threads.
    """
    tmp = path.with_name(f"{path.name}.{uuid.uuid4().hex}.tmp")
    return os.open(tmp, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o666), tmp


def digest_of(endpoint: str, model: str, keys: Iterable[str]) -> str:
    """What names a job: its endpoint, model and the set of requests in it."""
    h = hashlib.sha256(f"{endpoint}\n{model}\n".encode())
    for key in sorted(set(keys)):
        h.update(key.encode("ascii") + b"\n")
    return h.hexdigest()


def path_for(state_dir: str | os.PathLike[str], prefix: str, digest: str) -> Path:
    """The state file of the job named by ``prefix`` and ``digest``."""
    return Path(state_dir) / f"{_UNSAFE.sub('_', prefix)}-{digest[:16]}{SUFFIX}"


def repeat_path_for(path: Path) -> Path:
    """A state file for a second job of the same requests (force refresh), beside ``path``'s."""
    return path.with_name(path.name.removesuffix(SUFFIX) + f"-{time.time_ns()}{SUFFIX}")


def _name_pattern(prefix: str) -> re.Pattern[str]:
    # The names path_for and repeat_path_for give: 16 hex digits, then maybe a
    # -<time_ns> tail. So "a-b"'s files never match prefix "a", and a repeat job is
    # found as surely as the first (missing it would pay for its requests again).
    return re.compile(
        rf"{re.escape(_UNSAFE.sub('_', prefix))}-[0-9a-f]{{16}}(-\d+)?{re.escape(SUFFIX)}"
    )


def load(path: Path) -> JobState:
    """Read one state file; ``ValueError`` if it is not one of ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read batch state {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a minima-llm batch state file (format {FORMAT})")
    names = {f.name for f in dataclasses.fields(JobState)} - _UNSAVED
    try:
        state = JobState(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"batch state {path} is incomplete: {exc}") from exc
    # Every saved field has a check: a field added without one fails here, in the tests.
    saved = [f.name for f in dataclasses.fields(JobState) if f.name not in _UNSAVED]
    wrong = [name for name in saved if not _FIELD_CHECKS[name](getattr(state, name))]
    if wrong:
        raise ValueError(f"batch state {path} has fields of the wrong type: {', '.join(wrong)}")
    state.path = path
    return state


def save_merged(state: JobState, delivered: set[str] | None = None) -> None:
    """Save ``state`` without undoing deliveries another run recorded meanwhile (lock held)."""
    if state.path is not None and state.path.exists():
        try:
            disk = load(state.path)
        except ValueError:
            pass
        else:
            state.delivered = sorted(set(state.delivered).union(disk.delivered))
            state.collected_at = state.collected_at or disk.collected_at
            state.cancel_requested_at = state.cancel_requested_at or disk.cancel_requested_at
            if state.answered is None:
                state.answered = disk.answered
    if delivered is not None:
        state.deliver(delivered)
    state.save()


def _str(v: Any) -> bool:
    return isinstance(v, str)


def _opt_str(v: Any) -> bool:
    return v is None or isinstance(v, str)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _opt_number(v: Any) -> bool:
    return v is None or _number(v)


def _strs(v: Any) -> bool:
    return isinstance(v, list) and all(isinstance(x, str) for x in v)


# A file another version (or a hand) wrote wrongly must be skipped, not break every run.
_FIELD_CHECKS: dict[str, Any] = {
    "prefix": _str,
    "digest": _str,
    "endpoint": _str,
    "base_url": _str,
    "model": _str,
    "request_count": lambda v: isinstance(v, int) and not isinstance(v, bool),
    "batch_id": _opt_str,
    "input_file_id": _opt_str,
    "status": _str,
    "request_counts": lambda v: isinstance(v, dict),
    "output_file_id": _opt_str,
    "error_file_id": _opt_str,
    "created_at": _number,
    "updated_at": _number,
    "collected_at": _opt_number,
    "keys": _strs,
    "answered": lambda v: v is None or _strs(v),
    "delivered": _strs,
    "errors": _strs,
    "cancel_requested_at": _opt_number,
    "key_id": _opt_str,
}


class JobNeedsAttention(MinimaLlmError):
    """A state file of the prefix cannot be trusted to say what its job holds.

    Sending its requests anyway might pay for them twice, so nothing is sent until
    someone moves the file aside (the message names it).
    """


def list_states(
    state_dir: str | os.PathLike[str], prefix: str | None = None, strict: bool = False
) -> list[JobState]:
    """Every readable state file in ``state_dir``, oldest first; unreadable ones are logged.

    With ``prefix``, only files named for it are read (a file holds up to 50,000 keys,
    and a lab's shared directory many prefixes' jobs); the caller still compares each
    state's own ``prefix``, as two prefixes may share a file-name form. ``strict``
    raises ``JobNeedsAttention`` naming every unreadable file instead of stepping over them.
    """
    directory = Path(state_dir)
    if not directory.is_dir():
        return []
    paths = sorted(directory.glob(f"*{SUFFIX}"))
    if prefix is not None:
        named = _name_pattern(prefix)
        paths = [p for p in paths if named.fullmatch(p.name)]
    states = []
    unreadable = []
    for path in paths:
        try:
            states.append(load(path))
        except ValueError as exc:
            log.warning("%s", exc)
            unreadable.append(str(exc))
    if strict and unreadable:
        raise JobNeedsAttention(
            f"{'; '.join(unreadable)}. Such a file may name a job that already has these"
            " requests, so none is sent: move it aside, or delete it, to send them anew"
        )
    states.sort(key=lambda s: s.created_at)
    return states
