"""What every benchmark is handed: the run's size, where the mock runs, where to log."""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field


@dataclass
class Context:
    """Settings shared by the benchmarks of one run."""

    quick: bool = False
    mock_cpus: set[int] | None = None
    started: float = field(default_factory=time.monotonic)

    def log(self, line: str) -> None:
        """A progress line on stdout, stamped with seconds since the run began."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {line}", file=sys.stdout, flush=True)
