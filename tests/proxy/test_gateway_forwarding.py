"""What reaches the upstream: the caller's parameters as sent, though the cache key normalises them."""

from __future__ import annotations

from pathlib import Path

from gateway_harness import MODEL, serve

from minima_llm.proxy.settings import ProxySettings
from minima_llm.testing import MockServer


async def test_parameters_reach_the_upstream_under_the_callers_names(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat(
            "forward me", max_completion_tokens=50, user="alice", top_p=1, presence_penalty=0
        )
        assert reply.status == 200
        sent = mock.last_body
        # max_completion_tokens stays itself: newer OpenAI models refuse max_tokens.
        assert sent["max_completion_tokens"] == 50 and "max_tokens" not in sent
        # Left out of the key, not out of the request: servers may have defaults of their own.
        assert (sent["user"], sent["top_p"], sent["presence_penalty"]) == ("alice", 1, 0)
        assert sent["model"] == MODEL


async def test_the_normalised_key_still_joins_both_spellings(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        first = await gw.chat("same limit", max_completion_tokens=7, user="alice")
        second = await gw.chat("same limit", max_tokens=7, user="bob", top_p=1)
        assert (first.cache, second.cache) == ("miss", "hit")
        assert mock.stats()["requests"] == 1


async def test_stream_flags_are_the_gateways_own(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path) as gw:
        reply = await gw.chat(
            "stream me", stream=True, user="carol", cache={"no-store": True}, seed=3
        )
        assert reply.status == 200
        sent = mock.last_body
        assert sent["stream"] is True
        # Usage is always asked for, so the cached answer carries it.
        assert sent["stream_options"] == {"include_usage": True}
        assert "cache" not in sent
        assert (sent["user"], sent["seed"]) == ("carol", 3)


async def test_a_plain_body_is_sent_as_the_request_rebuilt(
    mock: MockServer, tmp_path: Path
) -> None:
    async with serve(mock.url, tmp_path) as gw:
        await gw.chat("plain", temperature=0, max_tokens=5)
        sent = mock.last_body
        assert sent["messages"] == [{"role": "user", "content": "plain"}]
        assert (sent["temperature"], sent["max_tokens"], sent["model"]) == (0, 5, MODEL)


async def test_a_forced_model_replaces_the_callers(mock: MockServer, tmp_path: Path) -> None:
    async with serve(mock.url, tmp_path, ProxySettings(port=0, force_model=True)) as gw:
        await gw.chat("forced", model="someone-elses-model", user="dave")
        assert mock.last_body["model"] == MODEL
        assert mock.last_body["user"] == "dave"
