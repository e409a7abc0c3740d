"""The upstream's circuit breaker: misses fail at once while it is down, and flow again when it is back."""

from __future__ import annotations

import asyncio
import logging
from pathlib import Path
from urllib.parse import urlsplit

import openai
import pytest
from gateway_harness import Reply, closed_port_url, serve
from test_gateway_endpoints import _samples

from minima_llm.clock import FakeClock
from minima_llm.proxy import ProxySettings
from minima_llm.testing import MockConfig, MockServer


def unavailable(reply: Reply) -> bool:
    """A 503 in OpenAI's shape saying the upstream is not answering, with a Retry-After."""
    if reply.status != 503:
        return False
    error = reply.json()["error"]
    return (
        error["code"] == "upstream_unavailable"
        and error["type"] == "server_error"
        and error["message"].startswith("upstream unavailable: the upstream is down (last failure:")
        and int(reply.headers["Retry-After"]) >= 1
    )


async def test_once_tripped_misses_fail_at_once_and_hits_still_answer(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    settings = ProxySettings(port=0, breaker_failures=3, breaker_reset_s=30.0)
    # Each miss retries for long: without the breaker every one would take its 20 attempts.
    async with serve(
        mock.url, tmp_path, settings, max_attempts=20, base_backoff_s=0.02, max_backoff_s=0.02
    ) as gw:
        assert (await gw.chat("cached")).status == 200
        await mock.stop()
        caplog.set_level(logging.WARNING, logger="minima_llm")
        first = await gw.chat("first")
        assert unavailable(first)  # its own retries tripped it, then it was cut short
        assert 25 <= int(first.headers["Retry-After"]) <= 30
        later = await asyncio.gather(*(gw.chat(f"later {i}") for i in range(20)))
        hit = await gw.chat("cached")
        streamed_hit = await gw.chat("cached", stream=True)
        stream = await gw.chat("streamed", stream=True)
        metrics = (await gw.get("/metrics")).json()
        prometheus = _samples((await gw.get("/metrics/prometheus")).text)
        health = (await gw.get("/health")).json()
        sdk = openai.AsyncOpenAI(base_url=gw.url + "/v1", api_key="unused", max_retries=0)
        async with sdk:
            with pytest.raises(openai.InternalServerError) as refused:
                await sdk.chat.completions.create(
                    model="mock-model", messages=[{"role": "user", "content": "sdk"}]
                )
    assert all(unavailable(r) for r in later)
    assert hit.status == 200 and hit.cache == "hit"
    assert streamed_hit.status == 200 and streamed_hit.cache == "hit"
    assert unavailable(stream) and stream.headers["Content-Type"].startswith("application/json")
    assert refused.value.status_code == 503 and refused.value.code == "upstream_unavailable"
    assert metrics["breaker"] == {"state": "open", "opened": 1, "rejected": 22}
    assert prometheus[("minima_gateway_upstream_breaker_open", ())] == 1
    assert prometheus[("minima_gateway_breaker_opened_total", ())] == 1
    assert prometheus[("minima_gateway_breaker_rejected_total", ())] == 22
    assert health["status"] == "degraded" and health["upstream"]["breaker"] == "open"
    trips = [r.getMessage() for r in caplog.records if r.name == "minima_llm"]
    assert len(trips) == 1 and "failed 3 calls in a row" in trips[0]
    # The refusals themselves are one line, not one per request.
    refusals = [r for r in caplog.records if "UpstreamUnavailable" in r.getMessage()]
    assert len(refusals) == 1


async def test_when_the_upstream_is_back_the_probe_closes_it(tmp_path: Path) -> None:
    url = closed_port_url()
    clock = FakeClock()
    settings = ProxySettings(port=0, breaker_failures=2, breaker_reset_s=30.0)
    async with serve(url, tmp_path, settings, clock=clock, max_attempts=1) as gw:
        assert [(await gw.chat(f"down {i}")).status for i in range(3)] == [502, 502, 503]
        # Slow enough that the probe is still out when the others arrive.
        back = MockServer(MockConfig(latency_s=0.3))
        await back.start(port=urlsplit(url).port or 0)
        try:
            assert unavailable(await gw.chat("too soon"))  # within breaker_reset_s
            clock.advance(30.0)
            answers = await asyncio.gather(*(gw.chat(f"back {i}") for i in range(5)))
            # One probe went out; those that came while it was out were told to come
            # back in a second.
            assert back.stats()["requests"] == 1
            assert sum(r.status == 200 for r in answers) == 1
            waiting = [r for r in answers if r.status != 200]
            assert all(unavailable(r) and r.headers["Retry-After"] == "1" for r in waiting)
            assert [(await gw.chat(f"back {i}")).status for i in range(5)] == [200] * 5
            stream = await gw.chat("streamed", stream=True)
            health = (await gw.get("/health")).json()
        finally:
            await back.stop()
    assert stream.status == 200 and stream.events()[-1] == "[DONE]"
    assert health["status"] == "ok" and health["upstream"]["breaker"] == "closed"


async def test_a_health_check_that_reaches_the_upstream_lets_the_next_miss_probe(
    tmp_path: Path,
) -> None:
    # An idle gateway: without traffic no probe goes out, and after a long outage the
    # wait could be a minute; /health itself sees the upstream answer.
    url = closed_port_url()
    clock = FakeClock()
    settings = ProxySettings(port=0, breaker_failures=2, breaker_reset_s=600.0)
    async with serve(url, tmp_path, settings, clock=clock, max_attempts=1) as gw:
        assert [(await gw.chat(f"down {i}")).status for i in range(3)] == [502, 502, 503]
        back = MockServer()
        await back.start(port=urlsplit(url).port or 0)
        try:
            health = (await gw.get("/health")).json()
            prometheus = _samples((await gw.get("/metrics/prometheus")).text)
            answer = await gw.chat("after the health check")
        finally:
            await back.stop()
        breaker = gw.backend.upstream.breaker
    # Half-open, not closed: /models answering does not prove the chat route does.
    assert health["status"] == "ok" and health["upstream"]["breaker"] == "half-open"
    assert prometheus[("minima_gateway_upstream_breaker_open", ())] == 0
    assert answer.status == 200 and breaker is not None and breaker.state == "closed"


async def test_a_fronting_proxy_saying_bad_gateway_trips_it(
    mock: MockServer, tmp_path: Path
) -> None:
    settings = ProxySettings(port=0, breaker_failures=4)
    async with serve(mock.url, tmp_path, settings, max_attempts=2) as gw:
        mock.fail_next(4, status=502)
        replies = [await gw.chat(f"q{i}") for i in range(3)]
    assert [r.status for r in replies[:2]] == [502, 502]
    assert unavailable(replies[2])
    assert mock.stats()["requests"] == 4


async def test_overload_does_not_trip_it(mock: MockServer, tmp_path: Path) -> None:
    settings = ProxySettings(port=0, breaker_failures=2)
    async with serve(mock.url, tmp_path, settings, max_attempts=1) as gw:
        mock.fail_next(6, status=503)
        replies = [await gw.chat(f"q{i}") for i in range(6)]
        metrics = (await gw.get("/metrics")).json()
    assert [r.status for r in replies] == [503] * 6
    assert not any(unavailable(r) for r in replies)
    assert metrics["breaker"]["state"] == "closed"


async def test_with_the_breaker_off_every_miss_takes_its_retries(tmp_path: Path) -> None:
    settings = ProxySettings(port=0, breaker_failures=0)
    async with serve(closed_port_url(), tmp_path, settings, max_attempts=2) as gw:
        replies = [await gw.chat(f"q{i}") for i in range(8)]
        metrics = (await gw.get("/metrics")).json()
        prometheus = (await gw.get("/metrics/prometheus")).text
        health = (await gw.get("/health")).json()
    assert [r.status for r in replies] == [502] * 8
    assert metrics["breaker"] is None and "breaker" not in prometheus
    assert "breaker" not in health["upstream"] and gw.backend.upstream.breaker is None
