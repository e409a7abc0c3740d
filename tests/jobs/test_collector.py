"""The collector on its own: grouping, size bound, refresh groups, keys already on their way."""

from __future__ import annotations

import asyncio
from typing import Any

from minima_llm.jobs import JobCollector, Outcome
from minima_llm.jobs.lines import LineFailure


class Runs:
    """A ``run`` for the collector that records each job and waits until released."""

    def __init__(self) -> None:
        self.jobs: list[tuple[str, str, list[str], bool]] = []
        self.release = asyncio.Event()
        self.started = asyncio.Event()

    async def __call__(
        self, endpoint: str, model: str, items: dict[str, Any], fresh: bool
    ) -> dict[str, Outcome]:
        self.jobs.append((endpoint, model, sorted(items), fresh))
        self.started.set()
        await self.release.wait()
        return {key: LineFailure("Done", key) for key in items}


async def test_calls_close_together_share_a_job_and_refreshes_get_their_own() -> None:
    runs = Runs()
    runs.release.set()
    collector: JobCollector[int] = JobCollector(runs, max_lines=10, collect_s=0.01)
    outcomes = await asyncio.gather(
        collector.submit("chat", "m", "a", 1),
        collector.submit("chat", "m", "b", 2),
        collector.submit("chat", "m", "a", 3, fresh=True),
        collector.submit("chat", "other", "c", 4),
    )
    assert sorted(runs.jobs) == [
        ("chat", "m", ["a"], True),
        ("chat", "m", ["a", "b"], False),
        ("chat", "other", ["c"], False),
    ]
    assert [o.message for o in outcomes if isinstance(o, LineFailure)] == ["a", "b", "a", "c"]


async def test_a_key_in_a_running_job_is_not_sent_again_when_its_first_caller_left() -> None:
    runs = Runs()
    collector: JobCollector[int] = JobCollector(runs, max_lines=10, collect_s=0.01)
    first = asyncio.ensure_future(collector.submit("chat", "m", "a", 1))
    await asyncio.wait_for(runs.started.wait(), 5)
    first.cancel()  # the job runs on; a joiner of the cancelled call asks again
    again = asyncio.ensure_future(collector.submit("chat", "m", "a", 1))
    await asyncio.sleep(0.05)
    runs.release.set()
    outcome = await asyncio.wait_for(again, 5)
    assert isinstance(outcome, LineFailure) and outcome.message == "a"
    assert len(runs.jobs) == 1


async def test_a_full_group_is_sent_at_once() -> None:
    runs = Runs()
    runs.release.set()
    collector: JobCollector[int] = JobCollector(runs, max_lines=2, collect_s=5.0)
    await asyncio.wait_for(
        asyncio.gather(*(collector.submit("chat", "m", k, 0) for k in "abcd")), 2
    )
    assert [job[2] for job in runs.jobs] == [["a", "b"], ["c", "d"]]
