"""Local state files of provider batch jobs: what was submitted, where it stands.

One JSON file per job, ``{state_dir}/{prefix}-{digest16}.batch.json``, where the
digest covers the endpoint, the model and the sorted cache keys of the requests
sent. Rerunning the same batch finds its file and resumes the job instead of
paying for a second one; the file stays after the answers are cached, as a record
``batch_status_overview`` can show.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

log = logging.getLogger("minima_llm.jobs")

FORMAT = 1
SUFFIX = ".batch.json"
# The provider's statuses after which nothing more will happen to a batch.
TERMINAL = frozenset({"completed", "failed", "expired", "cancelled"})
# Terminal statuses that can still carry answers (a partial output file).
WITH_OUTPUT = frozenset({"completed", "expired", "cancelled"})
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]")


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
    # When its answers were handed over (and cached): a collected job is never resumed.
    collected_at: float | None = None
    path: Path | None = field(default=None, compare=False, repr=False)

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
        self.updated_at = time.time()

    def save(self) -> None:
        """Write the file atomically: a job killed mid-write leaves the old state, never half."""
        if self.path is None:
            raise ValueError("JobState.save needs a path")
        data = {k: v for k, v in dataclasses.asdict(self).items() if k != "path"}
        data["format"] = FORMAT
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=self.path.name, suffix=".tmp", dir=self.path.parent)
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

    def summary(self) -> str:
        """One line for a status table."""
        counts = self.request_counts
        done = counts.get("completed", 0)
        failed = counts.get("failed", 0)
        total = counts.get("total", self.request_count)
        collected = "collected" if self.collected_at else "not collected"
        return (
            f"{self.prefix:<20} {self.batch_id or '-':<32} {self.status:<12} "
            f"{done}/{total} done, {failed} failed, {collected}"
        )


def digest_of(endpoint: str, model: str, keys: Iterable[str]) -> str:
    """What names a job: its endpoint, model and the set of requests in it."""
    h = hashlib.sha256(f"{endpoint}\n{model}\n".encode())
    for key in sorted(set(keys)):
        h.update(key.encode("ascii") + b"\n")
    return h.hexdigest()


def path_for(state_dir: str | os.PathLike[str], prefix: str, digest: str) -> Path:
    """The state file of the job named by ``prefix`` and ``digest``."""
    return Path(state_dir) / f"{_UNSAFE.sub('_', prefix)}-{digest[:16]}{SUFFIX}"


def load(path: Path) -> JobState:
    """Read one state file; ``ValueError`` if it is not one of ours."""
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise ValueError(f"cannot read batch state {path}: {exc}") from exc
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise ValueError(f"{path} is not a minima-llm batch state file (format {FORMAT})")
    names = {f.name for f in dataclasses.fields(JobState)} - {"path"}
    try:
        state = JobState(**{k: v for k, v in data.items() if k in names})
    except TypeError as exc:
        raise ValueError(f"batch state {path} is incomplete: {exc}") from exc
    state.path = path
    return state


def list_states(state_dir: str | os.PathLike[str]) -> list[JobState]:
    """Every readable state file in ``state_dir``, oldest first; unreadable ones are logged."""
    directory = Path(state_dir)
    if not directory.is_dir():
        return []
    states = []
    for path in sorted(directory.glob(f"*{SUFFIX}")):
        try:
            states.append(load(path))
        except ValueError as exc:
            log.warning("%s", exc)
    states.sort(key=lambda s: s.created_at)
    return states
