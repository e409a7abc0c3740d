"""A lock file that keeps two runs from submitting the same requests at once.

Held while a run decides which jobs to take over and submits the rest, and while it
records what it collected: never while it waits on the provider. An ``O_EXCL``
create works across threads, processes and (unlike ``flock``) NFS, which SLURM
nodes often share state directories on. The file names its holder (host, pid, a
token and its PID namespace); a holder refreshes its time stamp while it works, so a
file left by a holder that died is recognised (its pid is gone on this host and in
this PID namespace, or its time stamp is older than ``STALE_S``) and broken, and a
release removes only the holder's own file.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import sys
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

from ..clock import SYSTEM_CLOCK, Clock
from .api import BatchApiError

NAME = ".minima-batch.lock"
# A holder touches its file this often; one untouched for STALE_S has no live holder.
TOUCH_S = 30.0
STALE_S = 300.0
_RETRY_S = 0.05
BREAK_STALE_S = 10.0
_HOST = socket.gethostname()
# Lock files are created with the mode the umask gives (0664 under umask 002): a lab
# member breaking a dead run's lock in a shared directory hard-links it back if its
# holder woke, which fs.protected_hardlinks refuses for a file one cannot write.
_MODE = 0o666


def lock_path(state_dir: str | os.PathLike[str]) -> Path:
    """The lock file of a state directory."""
    return Path(state_dir) / NAME


@contextlib.asynccontextmanager
async def locked(
    path: Path, clock: Clock = SYSTEM_CLOCK, wait_s: float = STALE_S
) -> AsyncIterator[None]:
    """Hold the lock file ``path`` for the block; waits at most ``wait_s`` for it."""
    token = uuid.uuid4().hex
    deadline = clock.monotonic() + wait_s
    while not await _uncancelled(
        asyncio.ensure_future(asyncio.to_thread(_try_take, path, token)), path, token
    ):
        if clock.monotonic() >= deadline:
            raise BatchApiError(f"batch state is locked by {_holder(path)} ({path})")
        await clock.sleep(_RETRY_S)
    toucher = asyncio.ensure_future(_keep_fresh(path, token))
    try:
        yield
    finally:
        toucher.cancel()
        # File calls go to a thread: a state directory on NFS can take a while to answer.
        await asyncio.shield(asyncio.to_thread(_release, path, token))


@contextlib.contextmanager
def held(path: Path, wait_s: float = STALE_S) -> Iterator[None]:
    """``locked`` for synchronous callers (the management functions)."""
    token = uuid.uuid4().hex
    deadline = time.monotonic() + wait_s
    while not _try_take(path, token):
        if time.monotonic() >= deadline:
            raise BatchApiError(f"batch state is locked by {_holder(path)} ({path})")
        time.sleep(_RETRY_S)
    try:
        yield
    finally:
        _release(path, token)


async def _uncancelled(taking: asyncio.Future[bool], path: Path, token: str) -> bool:
    """Await a take; if cancelled meanwhile, undo a take that succeeded, then re-raise."""
    try:
        return await asyncio.shield(taking)
    except asyncio.CancelledError:
        if await taking:
            await asyncio.to_thread(_release, path, token)
        raise


async def _keep_fresh(path: Path, token: str) -> None:
    """Touch the lock while it is held, so a long upload does not look like a dead holder."""
    while True:
        await asyncio.sleep(TOUCH_S)
        await asyncio.to_thread(_touch, path, token)


def _touch(path: Path, token: str) -> None:
    if _owner(path) == token:
        with contextlib.suppress(OSError):
            os.utime(path)


def _try_take(path: Path, token: str) -> bool:
    """Create the lock file (breaking an abandoned one); False if someone else holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    try:
        fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _MODE)
    except FileExistsError:
        if not _abandoned(path) or not _break(path):
            return False
        return _try_take(path, token)
    with os.fdopen(fd, "w") as fh:
        fh.write(f"{_HOST} {os.getpid()} {token} {pid_namespace()}\n")
    return True


def _break(path: Path) -> bool:
    """Remove an abandoned lock; True if it is gone. One breaker at a time.

    Breakers take a second lock file first and look again under it: a breaker that
    judged the lock abandoned just before another broke it and took it fresh sees
    the fresh one and leaves it alone.
    """
    breaking = path.with_name(path.name + ".breaking")
    try:
        fd = os.open(breaking, os.O_CREAT | os.O_EXCL | os.O_WRONLY, _MODE)
    except FileExistsError:
        with contextlib.suppress(FileNotFoundError):
            # A breaker holds it for microseconds; one this old died holding it.
            if time.time() - breaking.stat().st_mtime > BREAK_STALE_S:
                breaking.unlink()
        return False
    os.close(fd)
    try:
        if not path.exists():
            return True  # freed meanwhile: nothing to remove (and no one's lock to remove)
        if not _abandoned(path):
            return False  # another breaker broke it and took it fresh
        # Moved aside and looked at again, so what is removed is surely the dead lock.
        aside = path.with_name(f"{path.name}.{uuid.uuid4().hex}.broken")
        try:
            os.rename(path, aside)
        except FileNotFoundError:
            return True
        if not _abandoned(aside):  # its holder woke and touched it: give it back
            with contextlib.suppress(FileExistsError):
                os.link(aside, path)
            aside.unlink()
            return False
        aside.unlink()
        return True
    finally:
        with contextlib.suppress(FileNotFoundError):
            breaking.unlink()


def _release(path: Path, token: str) -> None:
    if _owner(path) == token:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


def _fields(path: Path) -> list[str]:
    try:
        return path.read_text().split()
    except OSError:
        return []


def _owner(path: Path) -> str | None:
    fields = _fields(path)
    return fields[2] if len(fields) in (3, 4) else None


def pid_namespace() -> str:
    """This process's PID namespace (the inode of /proc/self/ns/pid); "-" where none exist.

    Read on each use, not at import: a child forked after ``unshare`` is in another.
    """
    try:
        return str(os.stat("/proc/self/ns/pid").st_ino)
    except OSError:
        # Linux with /proc hidden: unknown ("?"), which matches no lock, not even its own kind.
        return "?" if sys.platform.startswith("linux") else "-"


def pid_is_comparable(fields: list[str], host: str, namespace: str) -> bool:
    """Whether the pid in a lock's ``fields`` names a process ``host``'s ``namespace`` can see.

    Containers may share a hostname yet each number their processes from 1: a live
    holder's pid asked about in another PID namespace looks dead. A lock written
    before the namespace was recorded (three fields) is judged as it was then.
    """
    if len(fields) not in (3, 4) or not fields[1].isdigit() or fields[0] != host:
        return False
    return len(fields) == 3 or (fields[3] == namespace and namespace != "?")


def _abandoned(path: Path) -> bool:
    """Whether the lock's holder is gone: a dead pid here, or no touch for STALE_S.

    "Here" is this host and PID namespace; elsewhere only the time stamp can tell.
    """
    try:
        age = time.time() - path.stat().st_mtime
    except FileNotFoundError:
        return True
    fields = _fields(path)
    if pid_is_comparable(fields, _HOST, pid_namespace()):
        try:
            os.kill(int(fields[1]), 0)
        except ProcessLookupError:
            return True
        except PermissionError:
            pass  # alive, someone else's
    return age > STALE_S


def _holder(path: Path) -> str:
    fields = _fields(path)
    return f"{fields[0]} pid {fields[1]}" if len(fields) >= 2 else "another run"
