"""The mock server in its own process, so client and server each get a core."""

from __future__ import annotations

import json
import os
import re
import selectors
import subprocess
import sys
import tempfile
import time
import urllib.request
from types import TracebackType
from typing import Any

_LISTENING = re.compile(r"mock server listening on (\S+)")
_START_TIMEOUT_S = 20.0
_STOP_TIMEOUT_S = 5.0
_CONTROL_TIMEOUT_S = 10.0


def pin_cores() -> tuple[set[int], set[int]] | None:
    """Split the CPUs: the last one for the mock, the rest for the client (None if < 2)."""
    try:
        cpus = sorted(os.sched_getaffinity(0))
    except AttributeError:  # not Linux: leave scheduling to the OS
        return None
    if len(cpus) < 2:
        return None
    return set(cpus[:-1]), {cpus[-1]}


class MockProcess:
    """``python -m minima_llm.testing --port 0 ...`` as a child process; a context manager.

    Entering starts it and reads its ``listening on`` line (bounded wait); leaving
    terminates it, then kills it if it does not stop in time.
    """

    def __init__(self, *args: str, cpus: set[int] | None = None) -> None:
        self.args = args
        self.cpus = cpus
        self.url = ""
        self._proc: subprocess.Popen[str] | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()

    def __repr__(self) -> str:
        pid = self._proc.pid if self._proc else None
        return f"<MockProcess pid={pid} url={self.url or '-'} args={' '.join(self.args)}>"

    @property
    def root_url(self) -> str:
        """``http://host:port`` without ``/v1``."""
        return self.url.removesuffix("/v1")

    def start(self) -> MockProcess:
        """Start the server and wait for its listening line."""
        cmd = [sys.executable, "-m", "minima_llm.testing", "--port", "0", *self.args]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1
        )
        if self.cpus:
            os.sched_setaffinity(self._proc.pid, self.cpus)
        try:
            self.url = self._read_listening_line(self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _read_listening_line(self, proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = proc.stdout.readline()
                if not line:  # EOF: the process died before listening
                    break
                match = _LISTENING.search(line)
                if match:
                    return match.group(1)
        self._stderr.seek(0)
        raise RuntimeError(
            f"mock server did not report listening within {_START_TIMEOUT_S}s: "
            f"{self._stderr.read()[-2000:]}"
        )

    def stop(self) -> None:
        """Terminate the process (kill it if it lingers) and release its pipes."""
        proc, self._proc = self._proc, None
        if proc is not None:
            if proc.poll() is None:
                proc.terminate()
                try:
                    proc.wait(_STOP_TIMEOUT_S)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait(_STOP_TIMEOUT_S)
            if proc.stdout is not None:
                proc.stdout.close()
        self._stderr.close()

    def stats(self) -> dict[str, Any]:
        """``GET /_mock/stats``."""
        return self._call("GET", "/_mock/stats")

    def reset(self) -> dict[str, Any]:
        """``POST /_mock/reset``: zero the counters and refill the rate bucket."""
        return self._call("POST", "/_mock/reset", b"{}")

    def _call(self, method: str, path: str, body: bytes | None = None) -> dict[str, Any]:
        req = urllib.request.Request(self.root_url + path, data=body, method=method)
        req.add_header("Content-Type", "application/json")
        with urllib.request.urlopen(req, timeout=_CONTROL_TIMEOUT_S) as resp:
            result: dict[str, Any] = json.loads(resp.read())
        return result

    def __enter__(self) -> MockProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
