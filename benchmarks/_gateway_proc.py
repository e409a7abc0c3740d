"""``minimallm-proxy`` in its own process, in front of a mock, for the gateway benchmarks."""

from __future__ import annotations

import os
import re
import selectors
import socket
import subprocess
import sys
import tempfile
import time
from types import TracebackType

_LISTENING = re.compile(r"minimallm-proxy listening on (\S+)")
_START_TIMEOUT_S = 30.0
_STOP_TIMEOUT_S = 10.0


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GatewayProcess:
    """The gateway as a child process; a context manager that starts and stops it (bounded)."""

    def __init__(self, upstream: str, max_outstanding: int = 64, cache: bool = True) -> None:
        self.upstream = upstream
        self.max_outstanding = max_outstanding
        self.cache = cache
        self.url = ""
        self.pid = 0
        self._proc: subprocess.Popen[str] | None = None
        self._dir = tempfile.TemporaryDirectory(prefix="minima-gw-bench-")
        self._stderr = tempfile.TemporaryFile(mode="w+")  # noqa: SIM115 - closed in stop()

    def start(self) -> GatewayProcess:
        """Start and wait for the listening line."""
        env = {
            **os.environ,
            "OPENAI_BASE_URL": self.upstream,
            "OPENAI_MODEL": "mock-model",
            "OPENAI_API_KEY": "sk-bench",
            "RPM": "0",
            "MAX_OUTSTANDING": str(self.max_outstanding),
            "MINIMA_PROXY_LOG_EVERY": "0",
        }
        if self.cache:
            env["CACHE_DIR"] = self._dir.name
        cmd = [sys.executable, "-m", "minima_llm.proxy.cli", "--port", str(free_port())]
        self._proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=self._stderr, text=True, bufsize=1, env=env
        )
        self.pid = self._proc.pid
        try:
            self.url = self._wait_listening(self._proc)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_listening(self, proc: subprocess.Popen[str]) -> str:
        assert proc.stdout is not None
        deadline = time.monotonic() + _START_TIMEOUT_S
        with selectors.DefaultSelector() as sel:
            sel.register(proc.stdout, selectors.EVENT_READ)
            while (left := deadline - time.monotonic()) > 0:
                if not sel.select(left):
                    break
                line = proc.stdout.readline()
                if not line:
                    break
                match = _LISTENING.search(line)
                if match:
                    return match.group(1)
        self._stderr.seek(0)
        raise RuntimeError(f"gateway did not start: {self._stderr.read()[-2000:]}")

    def peak_rss_mb(self) -> float:
        """The gateway's peak resident memory so far (VmHWM)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("VmHWM not found")

    def stop(self) -> None:
        """SIGTERM, then SIGKILL if it lingers."""
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
        self._dir.cleanup()

    def __enter__(self) -> GatewayProcess:
        return self.start()

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
