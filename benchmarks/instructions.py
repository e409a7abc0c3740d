"""Instructions per request, counted by callgrind: a measure the machine's noise cannot move.

``python -m benchmarks.instructions [--small N] [--large N] [SIDE ...]`` runs each side
(``bare``: the reference aiohttp client; ``client``: ``run_batched`` with the SQLite
cache; ``nocache``: the same without a cache) under ``valgrind --tool=callgrind``
against a mock running natively, once with ``--small`` and once with ``--large``
requests, and reports the difference divided by the difference in requests: start-up
and imports cancel out. The ``gateway``, ``gateway-hit`` and ``gateway-stream`` sides count the gateway
process instead (cache misses, then the same requests again as hits), driven by the
benchmarks' load generator at concurrency 64; ``callgrind_control`` zeroes and dumps
the counters around each run, so start-up is left out there too. Wall-clock ratios on a shared two-core machine move by 10-20%
from run to run; these counts repeat to within about 1%.

Counts are user-space instructions of the client process (all threads); time spent in
the kernel or waiting for the GIL is not counted, so they rank changes to the code, not
the machine's end-to-end speed. Expect about a minute per side.
"""

from __future__ import annotations

import argparse
import glob
import os
import shutil
import subprocess
import sys
import tempfile

from ._clients import (
    backend_config,
    bare_aiohttp,
    make_requests,
    payloads_of,
    run_bounded,
    subject_batch,
)
from ._gateway_proc import GatewayProcess
from ._loadgen import payloads, run
from ._mock import MockProcess

SIDES = ("bare", "client", "nocache", "gateway", "gateway-hit", "gateway-stream")
GATEWAY_SIDES = ("gateway", "gateway-hit", "gateway-stream")
GATEWAY_CONCURRENCY = 64
# Under callgrind the gateway runs some 50 times slower: imports alone take seconds.
GATEWAY_START_TIMEOUT_S = 180.0
WARMUP = 64
RUN_TIMEOUT_S = 900.0


def side(kind: str, url: str, count: int) -> None:
    """One side's run, in this process (the child valgrind watches)."""
    requests = make_requests(count, f"{kind}-{count}")
    warmup = make_requests(WARMUP, f"{kind}-warm")
    if kind == "bare":
        run_bounded(bare_aiohttp(url, payloads_of(requests), payloads_of(warmup)), RUN_TIMEOUT_S)
        return
    with tempfile.TemporaryDirectory(prefix="minima-instr-") as cache_dir:
        config = backend_config(url, None if kind == "nocache" else cache_dir, "aiohttp")
        run_bounded(subject_batch(config, requests, warmup), RUN_TIMEOUT_S)


def counted(kind: str, url: str, count: int) -> int:
    """Instructions of one child process running ``side(kind, url, count)``."""
    with tempfile.TemporaryDirectory(prefix="minima-callgrind-") as out:
        cmd = [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={out}/cg.%p",
            os.path.realpath(sys.executable),
            "-m",
            "benchmarks.instructions",
            "--child",
            kind,
            url,
            str(count),
        ]
        subprocess.run(cmd, check=True, capture_output=True, timeout=RUN_TIMEOUT_S)
        return _totals(glob.glob(f"{out}/cg.*"))


def _totals(paths: list[str]) -> int:
    """The instructions recorded in callgrind output files."""
    total = 0
    for path in paths:
        with open(path, encoding="utf-8", errors="replace") as fh:
            total += sum(int(line.split()[1]) for line in fh if line.startswith("totals:"))
    return total


class _CountedGateway(GatewayProcess):
    """The gateway under callgrind, counters zeroed and dumped on request."""

    name = "gateway under callgrind"
    start_timeout_s = GATEWAY_START_TIMEOUT_S

    def __init__(self, upstream: str, out: str) -> None:
        super().__init__(upstream)
        self._out = out
        self._dumps = 0

    def command(self) -> list[str]:
        """``valgrind --tool=callgrind`` around the usual gateway command."""
        return [
            "valgrind",
            "--tool=callgrind",
            f"--callgrind-out-file={self._out}/cg.%p",
            *super().command(),
        ]

    def _control(self, flag: str) -> None:
        cmd = ["callgrind_control", flag, str(self.pid)]
        subprocess.run(cmd, check=True, capture_output=True, timeout=60)

    def zero(self) -> None:
        """Forget everything counted so far."""
        self._control("--zero")

    def dump(self) -> int:
        """Instructions counted since the last ``zero``."""
        self._control("--dump")
        self._dumps += 1
        return _totals(glob.glob(f"{self._out}/cg.{self.pid}.{self._dumps}*"))


def gateway_counts(kind: str, url: str, small: int, large: int) -> float:
    """Gateway instructions per request: misses, ``gateway-hit`` repeats, ``gateway-stream`` streams."""
    counts: dict[int, int] = {}
    with (
        tempfile.TemporaryDirectory(prefix="minima-callgrind-") as out,
        _CountedGateway(url, out) as gateway,
    ):
        run(gateway.url, payloads(WARMUP), GATEWAY_CONCURRENCY, RUN_TIMEOUT_S)
        for count in (small, large):
            bodies = payloads(count, stream=kind == "gateway-stream")
            if kind == "gateway-hit":
                run(gateway.url, bodies, GATEWAY_CONCURRENCY, RUN_TIMEOUT_S)
            gateway.zero()
            run(gateway.url, bodies, GATEWAY_CONCURRENCY, RUN_TIMEOUT_S)
            counts[count] = gateway.dump()
    return (counts[large] - counts[small]) / (large - small)


def main(argv: list[str] | None = None) -> int:
    """Print instructions per request for each side, and each side against ``bare``."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.instructions")
    parser.add_argument("sides", nargs="*", help=f"some of {', '.join(SIDES)} (default: all)")
    parser.add_argument("--small", type=int, default=300, help="requests in the short run")
    parser.add_argument("--large", type=int, default=900, help="requests in the long run")
    parser.add_argument("--child", nargs=3, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        kind, url, count = args.child
        side(kind, url, int(count))
        return 0
    if shutil.which("valgrind") is None:
        print("valgrind is not installed (Debian: apt-get install valgrind)", file=sys.stderr)
        return 2
    if args.large <= args.small:
        parser.error("--large must be more than --small")
    unknown = sorted(set(args.sides) - set(SIDES))
    if unknown:
        parser.error(f"unknown side {unknown[0]!r}: choose from {', '.join(SIDES)}")
    per: dict[str, float] = {}
    with MockProcess() as mock:
        for kind in args.sides or SIDES:
            if kind in GATEWAY_SIDES:
                per[kind] = gateway_counts(kind, mock.url, args.small, args.large)
            else:
                extra = counted(kind, mock.url, args.large) - counted(kind, mock.url, args.small)
                per[kind] = extra / (args.large - args.small)
            compared = "bare" in per and kind not in GATEWAY_SIDES
            ratio = f"  ({per[kind] / per['bare']:.3f} x bare)" if compared else ""
            print(f"{kind:8} {per[kind]:>11,.0f} instructions/request{ratio}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
