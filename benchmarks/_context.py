"""What every benchmark is handed: the run's size, where the mock runs, where to log."""

from __future__ import annotations

import os
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field


@dataclass
class Context:
    """Settings shared by the benchmarks of one run."""

    quick: bool = False
    mock_cpus: set[int] | None = None
    # Every CPU this run may use; set when the client is pinned to some of them.
    all_cpus: set[int] | None = None
    started: float = field(default_factory=time.monotonic)

    def log(self, line: str) -> None:
        """A progress line on stdout, stamped with seconds since the run began."""
        print(f"[{time.monotonic() - self.started:6.1f}s] {line}", file=sys.stdout, flush=True)

    @contextmanager
    def unpinned(self) -> Iterator[None]:
        """This process, and every server it starts meanwhile, free to use every CPU.

        The gateway benchmarks run three processes (load generator, gateway, mock) on
        two cores: pinning would put two of them on one core. Children inherit the
        affinity they are started with, so this must wrap their start.
        """
        if self.all_cpus is None:
            yield
            return
        pinned = os.sched_getaffinity(0)
        os.sched_setaffinity(0, self.all_cpus)
        try:
            yield
        finally:
            os.sched_setaffinity(0, pinned)
