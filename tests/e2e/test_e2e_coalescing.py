"""Identical requests in flight at once, from one client process through the gateway process,
reach the upstream process once."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import openai
from _e2e_support import MODEL, MockControl, Service, expected_reply, http, user

CONCURRENCY = 50


async def test_concurrent_identical_requests_reach_upstream_once(
    aclient: openai.AsyncOpenAI,
    gateway: Service,
    mock: MockControl,
    unique: Callable[[str], str],
) -> None:
    mock.configure(latency_s=0.2)
    prompt = unique("everyone asks this")
    before = http("GET", gateway.root_url + "/metrics").json()["coalesced"]
    raws = await asyncio.gather(
        *(
            aclient.chat.completions.with_raw_response.create(model=MODEL, messages=user(prompt))
            for _ in range(CONCURRENCY)
        )
    )
    assert mock.requests() == 1
    texts = {raw.parse().choices[0].message.content for raw in raws}
    assert texts == {expected_reply(prompt)}
    labels = [raw.headers["x-minima-cache"] for raw in raws]
    assert set(labels) <= {"miss", "hit"}
    # Joiners are labelled "miss" too (the answer was not cached when they asked):
    # every miss but the one that went upstream was coalesced.
    after = http("GET", gateway.root_url + "/metrics").json()["coalesced"]
    assert after - before == labels.count("miss") - 1


async def test_concurrent_identical_streams_reach_upstream_once(
    aclient: openai.AsyncOpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    mock.configure(latency_s=0.2, stream_chunk_delay_s=0.01)
    prompt = unique("everyone streams this")

    async def stream_text() -> str:
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=user(prompt), stream=True
        )
        return "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])

    texts = await asyncio.gather(*(stream_text() for _ in range(20)))
    assert texts == [expected_reply(prompt)] * 20
    assert mock.requests() == 1


async def test_late_joiner_of_a_live_stream_gets_the_whole_answer(
    aclient: openai.AsyncOpenAI, mock: MockControl, unique: Callable[[str], str]
) -> None:
    mock.configure(stream_chunk_delay_s=0.05)
    prompt = unique("the second reader joins after a few words of this answer")
    usage = {"stream_options": {"include_usage": True}}
    first = await aclient.chat.completions.create(
        model=MODEL, messages=user(prompt), stream=True, **usage
    )
    chunks = [await first.__anext__() for _ in range(3)]
    raw = await aclient.chat.completions.with_raw_response.create(
        model=MODEL, messages=user(prompt), stream=True, **usage
    )
    assert raw.headers["x-minima-cache"] == "miss"  # joined the live stream, not the cache
    chunks += [c async for c in first]
    late = [c async for c in raw.parse()]
    for run in (chunks, late):
        assert "".join(c.choices[0].delta.content or "" for c in run if c.choices) == (
            expected_reply(prompt)
        )
        assert run[-1].usage is not None and run[-1].choices == []
    assert mock.requests() == 1
