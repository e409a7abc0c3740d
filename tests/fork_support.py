"""Running a test's function in a forked child, bounded so a hang fails the test."""

from __future__ import annotations

import json
import os
import signal
import time
import traceback
from collections.abc import Callable
from typing import Any

import pytest

NOBODY = 65534
# Python 3.12+ warns on fork() in a process with threads (pytest's, our stores'); the
# children here run only the test's function and leave through os._exit.
ALLOW_FORK = pytest.mark.filterwarnings("ignore:.*use of fork\\(\\):DeprecationWarning")
needs_fork = pytest.mark.skipif(not hasattr(os, "fork"), reason="needs os.fork")


def in_forked_child(
    fn: Callable[[], Any],
    uid: int | None = None,
    timeout: float = 30.0,
    *,
    gid: int | None = None,
    umask: int | None = None,
) -> Any:
    """``fn()``'s result (JSON) from a child made by ``os.fork``, run as ``uid`` if given.

    ``gid`` is the child's group (``uid``'s number if not given); ``umask`` its umask,
    which a test may not change in the runner's own process.
    """
    if not hasattr(os, "fork"):
        pytest.skip("needs os.fork")
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:
        try:
            os.close(read_end)
            os.write(write_end, json.dumps(_child(fn, uid, gid, umask)).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    deadline = time.monotonic() + timeout
    while os.waitpid(pid, os.WNOHANG) == (0, 0):
        if time.monotonic() > deadline:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            os.close(read_end)
            pytest.fail(f"the forked child was still running after {timeout}s")
        time.sleep(0.01)
    with os.fdopen(read_end, "rb") as answer:
        out = json.loads(answer.read() or b'{"error": "the child died without answering"}')
    if "skip" in out:
        pytest.skip(out["skip"])
    if "error" in out:
        pytest.fail(f"in the forked child: {out['error']}")
    return out["ok"]


def _child(
    fn: Callable[[], Any], uid: int | None, gid: int | None, umask: int | None
) -> dict[str, Any]:
    if umask is not None:
        os.umask(umask)
    if uid is not None:
        try:
            os.setgroups([])
            os.setgid(uid if gid is None else gid)
            os.setuid(uid)
        except OSError as exc:  # no CAP_SETUID, or a user namespace without that uid
            return {"skip": f"cannot become uid {uid}: {exc}"}
    try:
        return {"ok": fn()}
    except BaseException:
        return {"error": traceback.format_exc()}
