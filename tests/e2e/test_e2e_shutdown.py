"""SIGTERM to the gateway: stop taking connections, finish what is in flight, exit 0."""

from __future__ import annotations

import signal
import socket
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import openai
from _e2e_support import API_KEY, MODEL, MockControl, Service, expected_reply, user

EXIT_BOUND_S = 10.0


def _sdk(service: Service) -> openai.OpenAI:
    return openai.OpenAI(base_url=service.url, api_key=API_KEY, max_retries=0, timeout=15.0)


def _refuses_connections(service: Service, until: Future[Any], bound: float = 2.0) -> bool:
    """Whether the port stops accepting before ``until`` completes (or ``bound`` passes)."""
    port = int(service.root_url.rsplit(":", 1)[1])
    deadline = time.monotonic() + bound
    while time.monotonic() < deadline and not until.done():
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                pass
        except OSError:
            return True
        time.sleep(0.02)
    return False


def test_sigterm_finishes_the_request_in_flight(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    gw = launch_gateway()
    mock.configure(latency_s=1.0)
    prompt = unique("finish me")
    with _sdk(gw) as client, ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.chat.completions.with_raw_response.create, model=MODEL, messages=user(prompt)
        )
        mock.wait_in_flight(1)
        gw.signal(signal.SIGTERM)
        refused = _refuses_connections(gw, future)
        raw = future.result(timeout=EXIT_BOUND_S)
    assert raw.status_code == 200
    assert raw.parse().choices[0].message.content == expected_reply(prompt)
    assert refused, "the gateway kept accepting connections after SIGTERM"
    assert gw.proc.wait(timeout=EXIT_BOUND_S) == 0, gw.output()


def test_sigterm_finishes_the_stream_in_flight(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    gw = launch_gateway()
    mock.configure(stream_chunk_delay_s=0.1)
    prompt = unique("a slow stream of several words")
    with (
        _sdk(gw) as client,
        client.chat.completions.create(model=MODEL, messages=user(prompt), stream=True) as stream,
    ):
        chunks = [next(stream)]
        gw.signal(signal.SIGTERM)
        chunks.extend(stream)
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == expected_reply(prompt)
    assert gw.proc.wait(timeout=EXIT_BOUND_S) == 0, gw.output()


LONG = " ".join(f"word{i}" for i in range(40))  # some 12 s of chunks at 0.3 s each


def _slow_stream(
    gw: Service, mock: MockControl, prompt: str, signals: int = 1
) -> tuple[int, float, Exception | None]:
    """Read a stream while ``gw`` gets ``signals`` SIGTERMs, a chunk apart: chunks, seconds, the error that ended it."""
    mock.configure(stream_chunk_delay_s=0.3)
    chunks = 0
    started = time.monotonic()
    with (
        _sdk(gw) as client,
        client.chat.completions.create(model=MODEL, messages=user(prompt), stream=True) as stream,
    ):
        try:
            for _ in stream:
                chunks += 1
                if chunks <= signals:
                    gw.signal(signal.SIGTERM)
        except (openai.APIError, httpx.HTTPError) as exc:
            return chunks, time.monotonic() - started, exc
    return chunks, time.monotonic() - started, None


def _with_shutdown_timeout(
    launch_gateway: Callable[..., Service], mock: MockControl, tmp_path: Path, seconds: float
) -> Service:
    config = tmp_path / "gateway.yml"
    config.write_text(
        f'base_url: "{mock.url}"\nmodel: "{MODEL}"\napi_key: "{API_KEY}"\nrpm: 0\n'
        f"proxy:\n  shutdown_timeout_s: {seconds}\n",
        encoding="utf-8",
    )
    return launch_gateway("--config", str(config))


def _told_shutting_down(error: Exception | None) -> bool:
    """Ended by the gateway's error event (the SDK raises it), not by a broken connection."""
    return isinstance(error, openai.APIError) and "shutting down" in str(error)


def test_a_stream_that_outlasts_the_shutdown_timeout_is_stopped_at_it(
    launch_gateway: Callable[..., Service],
    mock: MockControl,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    # aiohttp alone let a stream run for twice the timeout: it waits, asks the handler
    # to stop (which a handler writing to its client never notices), then waits again.
    gw = _with_shutdown_timeout(launch_gateway, mock, tmp_path, 2.0)
    chunks, elapsed, cut = _slow_stream(gw, mock, unique(LONG))
    assert _told_shutting_down(cut), cut
    assert 2 <= chunks < 30
    assert gw.proc.wait(timeout=EXIT_BOUND_S) == 0, gw.output()
    assert elapsed < 3.5, f"the stream ran {elapsed:.1f}s after a 2 s shutdown timeout"
    assert "stopped 1 request(s) still running after 2s" in gw.output()
    assert "shutting down: no new connections; 1 request(s) in flight get up to 2s" in gw.output()
    assert "stopped by the shutdown (still running after 2s) mid-stream" in gw.output()


def test_a_request_that_outlasts_the_shutdown_timeout_gets_a_503(
    launch_gateway: Callable[..., Service],
    mock: MockControl,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    gw = _with_shutdown_timeout(launch_gateway, mock, tmp_path, 1.0)
    mock.configure(latency_s=6.0)
    with _sdk(gw) as client, ThreadPoolExecutor(1) as pool:
        future = pool.submit(
            client.chat.completions.create, model=MODEL, messages=user(unique("too slow"))
        )
        mock.wait_in_flight(1)
        gw.signal(signal.SIGTERM)
        try:
            future.result(timeout=EXIT_BOUND_S)
        except openai.APIStatusError as exc:
            refused = exc
        else:
            raise AssertionError("a request cut off by the shutdown was answered")
    assert refused.status_code == 503
    assert refused.body["code"] == "server_shutting_down"  # type: ignore[index]
    assert gw.proc.wait(timeout=EXIT_BOUND_S) == 0, gw.output()


def test_a_second_sigterm_stops_what_is_in_flight_and_exits_cleanly(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    gw = launch_gateway()  # with the default 30 s timeout, only the second signal ends it soon
    chunks, elapsed, cut = _slow_stream(gw, mock, unique(LONG), signals=2)
    assert _told_shutting_down(cut), cut
    assert chunks < 30 and elapsed < 5
    assert gw.proc.wait(timeout=EXIT_BOUND_S) == 0, gw.output()
    assert "Traceback" not in gw.output(), gw.output()
    assert "stopped 1 request(s) second signal" in gw.output()
