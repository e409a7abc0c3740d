"""A lock file that keeps two runs from submitting the same requests at once.

Held while a run decides which jobs to take over and submits the rest, and while it
records what it collected: never while it waits on the provider. An ``O_EXCL``
create works across threads, processes and (unlike ``flock``) NFS, which SLURM
nodes often share state directories on. A holder that died leaves its file behind,
so a lock older than ``STALE_S`` is broken.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from .api import BatchApiError

# Long enough for the slowest step held under it (uploading a 200 MB file).
STALE_S = 900.0
_RETRY_S = 0.05
NAME = ".minima-batch.lock"


def lock_path(state_dir: str | os.PathLike[str]) -> Path:
    """The lock file of a state directory."""
    return Path(state_dir) / NAME


@contextlib.asynccontextmanager
async def locked(
    path: Path, clock: Clock = SYSTEM_CLOCK, wait_s: float = STALE_S
) -> AsyncIterator[None]:
    """Hold the lock file ``path`` for the block; waits at most ``wait_s`` for it."""
    deadline = clock.monotonic() + wait_s
    # File calls go to a thread: a state directory on NFS can take a while to answer.
    while not await asyncio.to_thread(_try_take, path):
        if clock.monotonic() >= deadline:
            raise BatchApiError(f"batch state is locked by {_holder(path)} ({path})")
        await clock.sleep(_RETRY_S)
    try:
        yield
    finally:
        await asyncio.to_thread(_release, path)


@contextlib.contextmanager
def held(path: Path, wait_s: float = STALE_S) -> Iterator[None]:
    """``locked`` for synchronous callers (the management functions)."""
    deadline = time.monotonic() + wait_s
    while not _try_take(path):
        if time.monotonic() >= deadline:
            raise BatchApiError(f"batch state is locked by {_holder(path)} ({path})")
        time.sleep(_RETRY_S)
    try:
        yield
    finally:
        _release(path)


def _try_take(path: Path) -> bool:
    """Create the lock file (breaking a stale one); False if someone else holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
        if _stale(path):
            _release(path)
            return _try_take(path)
        return False
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{socket.gethostname()} pid {os.getpid()}\n")
    return True


def _release(path: Path) -> None:
    with contextlib.suppress(FileNotFoundError):
        path.unlink()


def _stale(path: Path) -> bool:
    try:
        return time.time() - path.stat().st_mtime > STALE_S
    except FileNotFoundError:
        return True


def _holder(path: Path) -> str:
    try:
        return path.read_text().strip() or "another run"
    except OSError:
        return "another run"
