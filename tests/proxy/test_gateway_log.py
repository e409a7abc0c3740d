"""The operator's log: a line per live call and per failure, a summary every N requests."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
from gateway_harness import chat_body, eventually, serve

from minima_llm.proxy import ProxySettings
from minima_llm.proxy.log import ProxyLog
from minima_llm.testing import MockServer

LOGGER = "minima_llm.proxy"


def lines(caplog: pytest.LogCaptureFixture) -> list[tuple[int, str]]:
    return [(r.levelno, r.getMessage()) for r in caplog.records if r.name == LOGGER]


@pytest.mark.parametrize(
    ("verbose", "expected"),
    [
        (
            False,
            [
                (logging.INFO, "/r model=m miss 200 10ms a"),
                (logging.WARNING, "/r model=m failed 502 30ms boom"),
                (logging.INFO, "/r model=m refresh 200 10ms"),
                (logging.INFO, "4 requests: 1 cache hits, 2 llm calls, 1 failed"),
            ],
        ),
        (
            True,
            [
                (logging.INFO, "/r model=m miss 200 10ms a"),
                (logging.INFO, "/r model=m hit 200 20ms"),
                (logging.WARNING, "/r model=m failed 502 30ms boom"),
                (logging.INFO, "/r model=m refresh 200 10ms"),
                (logging.INFO, "4 requests: 1 cache hits, 2 llm calls, 1 failed"),
                (logging.INFO, "/r model=m coalesced 200 10ms"),
            ],
        ),
    ],
)
def test_proxy_log_lines(
    caplog: pytest.LogCaptureFixture, verbose: bool, expected: list[tuple[int, str]]
) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    log = ProxyLog(every=4, verbose=verbose)
    log.answered("miss", "/r", "m", 200, 0.01, "a")
    log.answered("hit", "/r", "m", 200, 0.02)
    log.answered("failed", "/r", "m", 502, 0.03, "boom")
    log.answered("refresh", "/r", "m", 200, 0.01)
    log.answered("coalesced", "/r", "m", 200, 0.01)
    assert lines(caplog) == expected


def test_summary_counts_add_up_with_joined_answers(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    log = ProxyLog(every=3)
    log.answered("miss", "/r", "m", 200, 0.01)
    log.answered("coalesced", "/r", "m", 200, 0.01)
    log.answered("coalesced", "/r", "m", 200, 0.01)
    assert lines(caplog)[-1] == (
        logging.INFO,
        "3 requests: 0 cache hits, 1 llm calls, 0 failed, 2 joined a call in flight",
    )


def test_summary_can_be_turned_off(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    log = ProxyLog(every=0)
    for _ in range(5):
        log.answered("hit", "/r", "m", 200, 0.0)
    assert lines(caplog) == []


@pytest.mark.parametrize("verbose", [False, True])
async def test_gateway_log(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture, verbose: bool
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = ProxySettings(port=0, log_every=5, verbose=verbose)
    async with serve(mock.url, tmp_path, settings, max_attempts=1) as gw:
        await gw.chat("logged")  # live
        await gw.chat("logged")  # hit
        await gw.chat("logged", stream=True)  # hit, replayed
        mock.fail_next(1, status=500)
        await gw.chat("fails")  # failed
        mock.fail_next(1, mode="truncate_stream")
        await gw.chat("cut short on the way", stream=True)  # failed mid-stream
        await gw.get("/health")  # not an answer: not counted
    got = [text for _, text in lines(caplog)]
    other = [t for t in got if t.startswith("GET /health 200 ")]
    assert len(other) == (1 if verbose else 0)  # --verbose: a line for every request
    got = [t for t in got if t not in other]
    live = [t for t in got if " miss " in t]
    assert len(live) == 1 and live[0].startswith("/v1/chat/completions model=mock-model miss 200")
    failed = [t for t in got if " failed " in t]
    assert len(failed) == 2
    assert "HTTPError" in failed[0] and " 502 " in failed[0]
    assert "stream interrupted" in failed[1]
    hits = [t for t in got if " hit " in t]
    assert len(hits) == (2 if verbose else 0)
    assert got[-1] == "5 requests: 2 cache hits, 1 llm calls, 2 failed"
    assert len(got) == len(live) + len(failed) + len(hits) + 1


async def test_a_stream_whose_opener_left_is_logged_as_the_llm_call_it_was(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # The opener leaves mid-stream, a coalesced reader reads it to the end: the upstream
    # answered in full (cached, counted in the metrics), so the log must say so too.
    caplog.set_level(logging.INFO, logger=LOGGER)
    mock.update_config(stream_chunk_delay_s=0.01)
    text = " ".join(f"w{i}" for i in range(40))
    settings = ProxySettings(port=0, log_every=2)
    async with serve(mock.url, tmp_path, settings) as gw:
        url = gw.url + "/v1/chat/completions"
        opener = await gw.http.post(url, json=chat_body(text, stream=True))
        assert (await opener.content.readline()).startswith(b"data: ")
        async with gw.http.post(url, json=chat_body(text, stream=True)) as follower:
            assert (await follower.content.readline()).startswith(b"data: ")
            opener.close()
            assert (await follower.read()).decode().rstrip().endswith("[DONE]")
        metrics = gw.gateway.metrics
        assert await eventually(lambda: metrics.coalesced == 1 and metrics.client_disconnects == 1)
        assert metrics.snapshot(gw.backend.snapshot())["cache"]["miss"] == 1
    got = [text for _, text in lines(caplog)]
    live = [t for t in got if " miss " in t]
    assert len(live) == 1 and "client left" in live[0]
    assert got[-1] == "2 requests: 0 cache hits, 1 llm calls, 0 failed, 1 joined a call in flight"


async def test_an_interrupted_stream_is_one_warning(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    async with serve(mock.url, tmp_path, max_attempts=1) as gw:
        mock.fail_next(1, mode="truncate_stream")
        reply = await gw.chat("cut short", stream=True)
        assert reply.status == 200 and "upstream_error" in reply.text
    warnings = [
        (r.name, r.getMessage())
        for r in caplog.records
        if r.levelno >= logging.WARNING and "interrupted" in r.getMessage()
    ]
    assert len(warnings) == 1, warnings
    name, message = warnings[0]
    assert name == LOGGER and "stream interrupted, not cached" in message


def test_refusals_are_logged_once_in_a_while_and_counted(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG, logger=LOGGER)
    log = ProxyLog(every=5)
    for _ in range(5):
        log.answered("refused", "/r", "m", 503, 0.0, "QueueFull: full")
    assert lines(caplog) == [
        (logging.WARNING, "/r model=m refused 503 0ms QueueFull: full"),
        (logging.INFO, "5 requests: 0 cache hits, 0 llm calls, 5 failed"),
    ]


def test_the_summary_comes_every_n_requests_but_at_most_once_a_second(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # 7,000 hits a second with the default N of 100 wrote 70 summaries a second.
    caplog.set_level(logging.INFO, logger=LOGGER)
    now = [100.0]
    log = ProxyLog(every=10, clock=lambda: now[0])
    for _ in range(50):
        log.answered("hit", "/r", "m", 200, 0.0)
    now[0] += 1.0
    for _ in range(10):
        log.answered("hit", "/r", "m", 200, 0.0)
    now[0] += 1.0
    log.answered("miss", "/r", "m", 200, 0.0)
    summaries = [m for _, m in lines(caplog) if "requests:" in m]
    # Those left out are owed: the first request a second later writes the totals.
    assert summaries == [
        "10 requests: 10 cache hits, 0 llm calls, 0 failed",
        "51 requests: 51 cache hits, 0 llm calls, 0 failed",
        "61 requests: 60 cache hits, 1 llm calls, 0 failed",
    ]


def test_a_callers_text_cannot_write_lines_of_its_own(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    forged = "m\n2026-12-03 13:00:00,000 INFO minima_llm.proxy: 100 requests: 100 cache hits"
    log = ProxyLog(every=0)
    log.answered("miss", "/r", forged, 200, 0.0, "upstream said\r\nX: y")
    log.answered("miss", "/r", "x" * 5000, 200, 0.0)
    log.answered("miss", "/r", "modèle-✓", 200, 0.0)  # printable: as sent
    (first, long, plain) = [m for _, m in lines(caplog)]
    assert "\n" not in first and "\r" not in first
    assert first.startswith("/r model=m\\n2026-12-03") and first.endswith("upstream said\\r\\nX: y")
    assert len(long) < 300 and long.startswith("/r model=" + "x" * 200 + "... miss")
    assert plain.startswith("/r model=modèle-✓ miss")


def test_rejections_are_logged_counted_and_summarised(caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    log = ProxyLog(every=4)
    log.rejected_request("POST", "/v1/chat/completions", 400, 0.001, "bad JSON", "id-1")
    log.rejected_request("GET", "/nope", 404, 0.0, "Not Found")  # within 10 s: counted
    log.answered("miss", "/r", "m", 200, 0.0)
    log.rejected_request("POST", "/r", 401, 0.0, "no API key")
    assert [m for _, m in lines(caplog)] == [
        "POST /v1/chat/completions rejected 400 1ms id=id-1 bad JSON",
        "/r model=m miss 200 0ms",
        "4 requests: 0 cache hits, 1 llm calls, 0 failed, 3 rejected",
    ]
    caplog.clear()
    verbose = ProxyLog(every=0, verbose=True)
    for status in (400, 404, 401):
        verbose.rejected_request("POST", "/r", status, 0.0, "why")
    assert len(lines(caplog)) == 3


async def test_the_gateways_own_errors_reach_the_log(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    settings = ProxySettings(port=0, log_every=3, verbose=True, api_keys=("sk-gw-right",))
    right = {"Authorization": "Bearer sk-gw-right"}
    async with serve(mock.url, tmp_path, settings) as gw:
        bad = await gw.request("POST", "/v1/chat/completions", headers=right, data=b"{nope")
        missing = await gw.chat("x")
        wrong = await gw.chat("x", headers={"Authorization": "Bearer sk-no"})
        assert (bad.status, missing.status, wrong.status) == (400, 401, 401)
        assert (await gw.get("/v1/models", headers=right)).status == 200
    got = [m for _, m in lines(caplog)]
    rejected = [m for m in got if " rejected " in m]
    assert [m.split()[:4] for m in rejected] == [
        ["POST", "/v1/chat/completions", "rejected", "400"],
        ["POST", "/v1/chat/completions", "rejected", "401"],
        ["POST", "/v1/chat/completions", "rejected", "401"],
    ]
    assert "not valid JSON" in rejected[0]
    assert "no API key" in rejected[1] and "wrong API key" in rejected[2]
    assert not any("sk-no" in m or "sk-gw-right" in m for m in got)
    assert any(m.startswith("GET /v1/models 200 ") for m in got)
    assert "3 requests: 0 cache hits, 0 llm calls, 0 failed, 3 rejected" in got


async def test_a_failure_line_says_what_the_upstream_said(
    mock: MockServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger=LOGGER)
    overflow = {
        "error": {
            "message": "This model's maximum context length is 8192 tokens.\nReduce it.",
            "type": "invalid_request_error",
            "code": "context_length_exceeded",
        }
    }
    async with serve(mock.url, tmp_path, max_attempts=1) as gw:
        mock.fail_next(1, status=400, body=overflow)
        assert (await gw.chat("too long")).status == 400
        mock.fail_next(1, status=500, body="<html>upstream\n  fell over</html>")
        assert (await gw.chat("boom")).status == 502
    failed = [m for _, m in lines(caplog) if " failed " in m]
    assert failed[0].endswith(
        "HTTPError: HTTP 400 (context_length_exceeded: This model's maximum context"
        " length is 8192 tokens. Reduce it.)"
    )
    assert "HTTPError: HTTP 500 (<html>upstream fell over</html>)" in failed[1]
