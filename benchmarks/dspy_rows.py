"""The DSPy benchmark (``dspy_overhead``) as rows of the suite's table."""

from __future__ import annotations

from . import dspy_overhead
from ._context import Context
from ._report import Row


def dspy_batch(ctx: Context) -> list[Row]:
    """A ``dspy.Predict`` batch: adapter overhead per item, and cached replay against cold."""
    got = dspy_overhead.run(ctx.quick, ctx.mock_cpus)
    items = got["items"]
    upstream = got["cached_upstream_calls"]
    ok = got["parsed_cold"] == items and got["parsed_cached"] == items and upstream == 0
    return [
        Row(
            "dspy_adapter_overhead",
            f"{got['overhead_cpu_us_per_item']:.0f} us CPU/item",
            f"{got['direct_cpu_us_per_item']:.0f} us CPU/item (backend.generate)",
            None,
            "reported",
            ok,
            f"{items:,} dspy.Predict items, 0 ms upstream; wall {got['dspy_cold_us_per_item']:.0f} "
            f"vs {got['direct_us_per_item']:.0f} us/item",
        ),
        Row(
            "dspy_cached_replay",
            f"{got['dspy_cached_wall_s']:.2f} s",
            f"{got['dspy_cold_wall_s']:.2f} s (cold)",
            got["cached_over_cold"],
            "ratio < 0.15",
            bool(got["meets_target"]) and ok,
            f"{items:,} items replayed with {upstream} upstream calls; "
            f"replay CPU {got['dspy_cached_cpu_us_per_item']:.0f} us/item "
            f"(DSPy's own path: {got['dspy_cached_slow_path_cpu_us_per_item']:.0f})",
        ),
    ]
