"""Peak memory of a 100k-request batch, measured in a child process of its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from ._context import Context
from ._mock import MockProcess
from ._report import Row

LIMIT_MB = 300.0
CHILD_TIMEOUT_S = 240.0
ROOT = Path(__file__).resolve().parent.parent


def _child(url: str, count: int, baseline: bool) -> dict[str, Any]:
    cmd = [sys.executable, "-m", "benchmarks._memory_child", url, str(count)]
    cmd += ["--timeout", str(CHILD_TIMEOUT_S - 10)]
    if baseline:
        cmd.append("--baseline")
    proc = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=CHILD_TIMEOUT_S, check=False
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory child exited {proc.returncode}: {proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.strip().splitlines()[-1])
    return result


def memory_100k(ctx: Context) -> list[Row]:
    """Peak RSS of a live batch with the cache on; the baseline child is the reference."""
    count = 20_000 if ctx.quick else 100_000
    with MockProcess(cpus=ctx.mock_cpus) as mock:
        base = _child(mock.url, count, baseline=True)
        run = _child(mock.url, count, baseline=False)
    ctx.log(
        f"  baseline {base['maxrss_mb']:.0f} MB; batch {run['maxrss_mb']:.0f} MB, "
        f"{run['ok']:,}/{run['requests']:,} ok in {run['elapsed_s']:.1f}s "
        f"({run['ok'] / max(run['elapsed_s'], 1e-9):,.0f}/s)"
    )
    missing = run["requests"] - run["ok"]
    note = f"{count:,} requests" + (" (--quick: shrunk from 100,000)" if ctx.quick else "")
    note += f" at {run['ok'] / max(run['elapsed_s'], 1e-9):,.0f}/s"
    note += "; reference: same child, requests and backend built, batch not run"
    if missing:
        note += f"; {missing} requests failed"
    return [
        Row(
            "memory_100k" if not ctx.quick else "memory_100k (20k)",
            f"{run['maxrss_mb']:.0f} MB",
            f"{base['maxrss_mb']:.0f} MB",
            run["maxrss_mb"] / base["maxrss_mb"],
            f"< {LIMIT_MB:.0f} MB",
            run["maxrss_mb"] < LIMIT_MB and not missing,
            note,
        )
    ]
