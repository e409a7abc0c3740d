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

if sys.version_info >= (3, 11):
    from typing import Self
else:  # pragma: no cover
    from typing_extensions import Self

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


def process_cpu_s(pid: int) -> float:
    """User plus system CPU seconds a process has used so far, all its threads."""
    with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    # Fields 14 and 15 of proc(5), utime and stime, counted after the command name.
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class ServerProcess:
    """A server as a child process; a context manager.

    Entering starts ``command()`` and reads the URL from its ``listening`` line
    (bounded wait); leaving terminates it, then kills it if it does not stop in time.
    """

    listening = _LISTENING
    name = "server"
    start_timeout_s = _START_TIMEOUT_S

    def __init__(self, cpus: set[int] | None = None, env: dict[str, str] | None = None) -> None:
        self.cpus = cpus
        self.env = env
        self.url = ""
        self.pid = 0
        self._proc: subprocess.Popen[str] | None = None
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()

    def command(self) -> list[str]:
        """The command line to start."""
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"<{type(self).__name__} pid={self.pid or None} url={self.url or '-'}>"

    @property
    def root_url(self) -> str:
        """``http://host:port`` without ``/v1``."""
        return self.url.removesuffix("/v1")

    def start(self) -> ServerProcess:
        """Start the server and wait for its listening line."""
        self._proc = subprocess.Popen(
            self.command(),
            stdout=subprocess.PIPE,
            stderr=self._stderr,
            text=True,
            bufsize=1,
            env=self.env,
        )
        self.pid = self._proc.pid
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
        deadline = time.monotonic() + self.start_timeout_s
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = proc.stdout.readline()
                if not line:  # EOF: the process died before listening
                    break
                match = self.listening.search(line)
                if match:
                    return match.group(1)
        self._stderr.seek(0)
        raise RuntimeError(
            f"{self.name} did not report listening within {self.start_timeout_s}s: "
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

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()


class MockProcess(ServerProcess):
    """``python -m minima_llm.testing --port 0 ...``."""

    name = "mock server"

    def __init__(self, *args: str, cpus: set[int] | None = None) -> None:
        super().__init__(cpus)
        self.args = args

    def command(self) -> list[str]:
        """The mock on a free port with the given flags."""
        return [sys.executable, "-m", "minima_llm.testing", "--port", "0", *self.args]

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
