"""``minimallm-proxy`` and the bare relay, each in its own process in front of a mock."""

from __future__ import annotations

import os
import re
import socket
import sys
import tempfile

from ._mock import ServerProcess


def free_port() -> int:
    """A port nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


class GatewayProcess(ServerProcess):
    """The gateway with its own temporary cache, pointed at ``upstream``."""

    listening = re.compile(r"minimallm-proxy listening on (\S+)")
    name = "gateway"

    def __init__(self, upstream: str, max_outstanding: int = 64, cache: bool = True) -> None:
        self._dir = tempfile.TemporaryDirectory(prefix="minima-gw-bench-")
        env = {
            **os.environ,
            "OPENAI_BASE_URL": upstream,
            "OPENAI_MODEL": "mock-model",
            "OPENAI_API_KEY": "sk-bench",
            "RPM": "0",
            "MAX_OUTSTANDING": str(max_outstanding),
            "MINIMA_PROXY_LOG_EVERY": "0",
        }
        if cache:
            env["CACHE_DIR"] = self._dir.name
        super().__init__(env=env)

    def command(self) -> list[str]:
        """The gateway on a free port."""
        return [sys.executable, "-m", "minima_llm.proxy.cli", "--port", str(free_port())]

    def peak_rss_mb(self) -> float:
        """The gateway's peak resident memory so far (VmHWM)."""
        with open(f"/proc/{self.pid}/status", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024.0
        raise RuntimeError("VmHWM not found")

    def stop(self) -> None:
        """Stop the process and remove its cache."""
        super().stop()
        self._dir.cleanup()


class RelayProcess(ServerProcess):
    """``benchmarks._relay`` in front of ``upstream``: the floor the gateway is measured against."""

    listening = re.compile(r"relay listening on (\S+)")
    name = "relay"

    def __init__(self, upstream: str) -> None:
        super().__init__()
        self.upstream = upstream

    def command(self) -> list[str]:
        """The relay on a free port."""
        return [sys.executable, "-m", "benchmarks._relay", self.upstream]
