"""Pure decisions of the gateway: request normalisation, failure statuses, settings."""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

import pytest
from multidict import CIMultiDict
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from minima_llm import MinimaLlmFailure
from minima_llm.cache import cache_key
from minima_llm.deadline import bounded
from minima_llm.errors import ConfigError
from minima_llm.flight import Broadcast
from minima_llm.live_streams import ChunkStream
from minima_llm.proxy import GatewayMetrics, ProxySettings
from minima_llm.proxy.errors import RequestError, failure_response, failure_status
from minima_llm.proxy.handlers import _upstream_s
from minima_llm.proxy.normalize import CHAT, COMPLETIONS, EMBEDDINGS, Parsed, key_extra, parse_body
from minima_llm.types import Usage

MSGS = [{"role": "user", "content": "hi"}]


def parse(
    body: Any,
    endpoint: str = CHAT,
    *,
    strict: bool = False,
    force_model: bool = False,
    headers: dict[str, str] | None = None,
) -> Parsed:
    return parse_body(
        endpoint, body, "default-model", force_model, strict, CIMultiDict(headers or {})
    )


def key(parsed: Parsed) -> str:
    r = parsed.request
    return cache_key(r.model or "", r.messages, r.temperature, r.max_tokens, r.extra)[0]


# Pairs of bodies that ask the same question, so must share one cache key.
SAME_KEY = [
    pytest.param(
        {"model": "m", "messages": MSGS, "temperature": 0.5, "seed": 7, "stop": ["x"]},
        {"stop": ["x"], "seed": 7, "temperature": 0.5, "messages": MSGS, "model": "m"},
        id="json-key-order",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS, "response_format": {"type": "json_object", "a": 1}},
        {"messages": MSGS, "response_format": {"a": 1, "type": "json_object"}, "model": "m"},
        id="nested-key-order",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS},
        {"model": "m", "messages": MSGS, "stream": True},
        id="stream",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS},
        {"model": "m", "messages": MSGS, "stream": True, "stream_options": {"include_usage": True}},
        id="stream_options",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS},
        {"model": "m", "messages": MSGS, "user": "alice"},
        id="user",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS},
        {
            "model": "m",
            "messages": MSGS,
            "safety_identifier": "hashed-end-user",
            "prompt_cache_key": "tenant-7",
            "prompt_cache_retention": "24h",
            "metadata": {"run": "2026-12-03-a"},
            "store": False,
            "service_tier": "auto",
        },
        id="who-asks-and-billing",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS},
        {"model": "m", "messages": MSGS, "cache": {"no-store": True}},
        id="cache-directive",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS},
        {
            "model": "m",
            "messages": MSGS,
            "n": 1,
            "top_p": 1,
            "presence_penalty": 0,
            "frequency_penalty": 0.0,
            "logprobs": False,
            "seed": None,
            "stop": None,
            "response_format": {"type": "text"},
            "parallel_tool_calls": True,
        },
        id="openai-defaults",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS, "max_tokens": 64},
        {"model": "m", "messages": MSGS, "max_completion_tokens": 64},
        id="max_completion_tokens",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS, "max_tokens": 64},
        {"model": "m", "messages": MSGS, "max_tokens": 64, "max_completion_tokens": 64},
        id="both-token-limits-alike",
    ),
    pytest.param(
        {"model": "m", "messages": MSGS, "temperature": 0},
        {"model": "m", "messages": MSGS, "temperature": 0.0},
        id="temperature-int-or-float",
    ),
    pytest.param(
        {"messages": MSGS}, {"model": "default-model", "messages": MSGS}, id="default-model"
    ),
]


@pytest.mark.parametrize(("a", "b"), SAME_KEY)
def test_same_question_same_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    assert key(parse(a)) == key(parse(b))


DIFFERENT_KEY = [
    pytest.param({"temperature": 0.5}, {"temperature": 0.7}, id="temperature"),
    pytest.param({}, {"n": 2}, id="n"),
    pytest.param({}, {"top_p": 0.9}, id="top_p"),
    pytest.param({}, {"seed": 1}, id="seed"),
    pytest.param({}, {"model": "other"}, id="model"),
    pytest.param({"max_tokens": 5}, {"max_tokens": 6}, id="max_tokens"),
    # The server may apply either limit: a 2-token answer must not serve max_tokens=100.
    pytest.param(
        {"max_tokens": 100},
        {"max_tokens": 100, "max_completion_tokens": 2},
        id="both-token-limits",
    ),
    pytest.param(
        {"max_completion_tokens": 2},
        {"max_tokens": 100, "max_completion_tokens": 2},
        id="both-token-limits-other-way",
    ),
]


@pytest.mark.parametrize(("a", "b"), DIFFERENT_KEY)
def test_different_question_different_key(a: dict[str, Any], b: dict[str, Any]) -> None:
    base = {"model": "m", "messages": MSGS}
    assert key(parse({**base, **a})) != key(parse({**base, **b}))


def test_client_library_key_matches() -> None:
    """A chat body keys exactly like the client's own request with the same fields."""
    parsed = parse({"model": "m", "messages": MSGS, "temperature": 0, "max_tokens": 9, "user": "u"})
    assert parsed.request.extra == {}
    assert key(parsed) == cache_key("m", MSGS, 0.0, 9, None)[0]


def test_parameters_kept_for_the_upstream() -> None:
    parsed = parse({"model": "m", "messages": MSGS, "top_p": 0.5, "n": 1, "tools": [{"x": 1}]})
    assert parsed.request.extra == {"top_p": 0.5, "tools": [{"x": 1}]}
    assert parsed.request.max_tokens is None and parsed.request.temperature is None


@pytest.mark.parametrize(
    ("extra", "stream", "include_usage"),
    [
        ({}, False, True),
        ({"stream": False}, False, True),
        ({"stream": True}, True, False),
        ({"stream": True, "stream_options": {"include_usage": True}}, True, True),
        ({"stream": True, "stream_options": {"include_usage": False}}, True, False),
        ({"stream": None}, False, True),
    ],
)
def test_stream_flags(extra: dict[str, Any], stream: bool, include_usage: bool) -> None:
    parsed = parse({"model": "m", "messages": MSGS, **extra})
    assert (parsed.stream, parsed.include_usage) == (stream, include_usage)


@pytest.mark.parametrize(
    ("headers", "cache", "no_cache", "no_store"),
    [
        ({}, None, False, False),
        ({"Cache-Control": "no-cache"}, None, True, False),
        ({"cache-control": "no-store"}, None, False, True),
        ({"Cache-Control": "No-Cache, no-store"}, None, True, True),
        ({"Cache-Control": "max-age=0"}, None, False, False),
        ({}, {"no-cache": True}, True, False),
        ({}, {"no_store": True}, False, True),
        ({}, {"no-cache": False}, False, False),
    ],
)
def test_cache_directives(
    headers: dict[str, str], cache: Any, no_cache: bool, no_store: bool
) -> None:
    body: dict[str, Any] = {"model": "m", "messages": MSGS}
    if cache is not None:
        body["cache"] = cache
    parsed = parse(body, headers=headers)
    assert (parsed.no_cache, parsed.no_store) == (no_cache, no_store)


def test_force_model_and_default_model() -> None:
    assert parse({"model": "x", "messages": MSGS}, force_model=True).model == "default-model"
    assert parse({"messages": MSGS}).request.model == "default-model"
    assert parse({"model": "x", "messages": MSGS}).request.model == "x"


INVALID = [
    (CHAT, [1, 2], None),
    (CHAT, {"model": "m"}, "messages"),
    (CHAT, {"messages": "hi"}, "messages"),
    (CHAT, {"messages": []}, "messages"),
    (CHAT, {"messages": ["hi"]}, "messages[0]"),
    (CHAT, {"messages": [{"content": "no role"}]}, "messages[0]"),
    (CHAT, {"messages": [{"role": "user", "content": 5}]}, "messages[0].content"),
    (CHAT, {"messages": MSGS, "model": 5}, "model"),
    (CHAT, {"messages": MSGS, "temperature": 2.5}, "temperature"),
    (CHAT, {"messages": MSGS, "temperature": -0.1}, "temperature"),
    (CHAT, {"messages": MSGS, "temperature": "hot"}, "temperature"),
    (CHAT, {"messages": MSGS, "temperature": True}, "temperature"),
    (CHAT, {"messages": MSGS, "max_tokens": 0}, "max_tokens"),
    (CHAT, {"messages": MSGS, "max_tokens": "10"}, "max_tokens"),
    (CHAT, {"messages": MSGS, "max_tokens": 1.5}, "max_tokens"),
    (CHAT, {"messages": MSGS, "max_completion_tokens": 0}, "max_completion_tokens"),
    (CHAT, {"messages": MSGS, "stream": "yes"}, "stream"),
    (CHAT, {"messages": MSGS, "stream": True, "stream_options": "x"}, "stream_options"),
    (CHAT, {"messages": MSGS, "cache": "no-cache"}, "cache"),
    (CHAT, {"messages": MSGS, "cache": {"no-cache": "false"}}, "cache.no-cache"),
    (CHAT, {"messages": MSGS, "cache": {"no_store": 1}}, "cache.no_store"),
    (CHAT, {"messages": MSGS, "cache": {"no-cache": True, "no_cache": "x"}}, "cache.no_cache"),
    (COMPLETIONS, {"model": "m"}, "prompt"),
    (COMPLETIONS, {"model": "m", "prompt": []}, "prompt"),  # "" is valid: a new document
    (EMBEDDINGS, {"model": "m"}, "input"),
    (EMBEDDINGS, {"model": "m", "input": []}, "input"),
    (EMBEDDINGS, {"model": "m", "input": "x", "stream": True}, "stream"),
]


@pytest.mark.parametrize(("endpoint", "body", "param"), INVALID)
def test_invalid_bodies(endpoint: str, body: Any, param: str | None) -> None:
    with pytest.raises(RequestError) as info:
        parse(body, endpoint)
    assert info.value.status == 400
    assert info.value.param == param
    assert str(info.value)


def test_valid_completions_and_embeddings() -> None:
    text = parse({"model": "m", "prompt": "p", "echo": False, "stream": True}, COMPLETIONS)
    assert text.request.messages == [] and text.request.extra == {"prompt": "p"} and text.stream
    emb = parse({"model": "m", "input": ["a"], "encoding_format": "float"}, EMBEDDINGS)
    assert emb.request.extra == {"input": ["a"]}


def test_strict_mode_rejects_unknown_parameters() -> None:
    body = {"model": "m", "messages": MSGS, "top_k": 5}
    assert parse(body).request.extra == {"top_k": 5}  # lenient: passed to the upstream
    with pytest.raises(RequestError) as info:
        parse(body, strict=True)
    assert (info.value.status, info.value.param) == (400, "top_k")
    known = {"model": "m", "messages": MSGS, "user": "u", "seed": 1, "stream": False}
    assert parse(known, strict=True).request.extra == {"seed": 1}
    current = {  # parameters of OpenAI's chat completions API added in 2025
        "verbosity": "low",
        "web_search_options": {},
        "safety_identifier": "s",
        "prompt_cache_key": "k",
        "prompt_cache_retention": "in_memory",
    }
    assert parse({**known, **current}, strict=True).request.extra == {
        "seed": 1,
        "verbosity": "low",
        "web_search_options": {},
    }
    with pytest.raises(RequestError) as info:
        parse({"model": "m", "input": "x", "messages": MSGS}, EMBEDDINGS, strict=True)
    assert info.value.param == "messages"


def test_strict_mode_refuses_stream_options_without_a_stream() -> None:
    options = {"stream_options": {"include_usage": True}}
    body = {"model": "m", "messages": MSGS, **options}
    assert not parse(body).stream  # lenient: a whole answer, as a server that ignores it gives
    with pytest.raises(RequestError) as info:
        parse(body, strict=True)
    assert (info.value.status, info.value.param) == (400, "stream_options")
    assert parse({**body, "stream": True}, strict=True).include_usage
    assert not parse({**body, "stream_options": None}, strict=True).stream


def _failure(error_type: str, status: int | None, snippet: str | None = None) -> MinimaLlmFailure:
    return MinimaLlmFailure("r", error_type, "msg", 3, status=status, body_snippet=snippet)


@pytest.mark.parametrize(
    ("error_type", "status", "answer"),
    [
        ("TimeoutError", 408, 504),
        ("TimeoutError", None, 504),
        ("ConnectionError", None, 502),
        ("ConnectionResetError", None, 502),
        ("HTTPError", 503, 503),
        ("HTTPError", 504, 504),
        ("HTTPError", 500, 502),
        ("HTTPError", 502, 502),
        ("HTTPError", 429, 429),
        ("HTTPError", 400, 400),
        ("HTTPError", 401, 401),
        ("HTTPError", 404, 404),
        ("MalformedResponse", 200, 502),
    ],
)
def test_failure_status(error_type: str, status: int | None, answer: int) -> None:
    assert failure_status(_failure(error_type, status)) == answer


def test_a_refusal_passes_the_upstreams_error_object_through() -> None:
    snippet = json.dumps(
        {
            "error": {
                "message": "This model's maximum context length is 8192 tokens.",
                "type": "invalid_request_error",
                "param": "messages",
                "code": "context_length_exceeded",
            }
        }
    )
    resp = failure_response(_failure("HTTPError", 400, snippet))
    assert resp.status == 400
    assert resp.text is not None
    # Exactly what the upstream said, so SDK users can branch on the code.
    assert json.loads(resp.text) == json.loads(snippet)


def test_a_failure_after_retries_says_so_and_keeps_the_upstreams_code() -> None:
    snippet = (
        '{"error": {"message": "engine overloaded", "type": "server_error", "code": "overloaded"}}'
    )
    resp = failure_response(_failure("HTTPError", 500, snippet))
    assert resp.status == 502 and resp.text is not None
    error = json.loads(resp.text)["error"]
    assert error["message"].startswith("upstream HTTPError after")
    assert "engine overloaded" in error["message"]
    assert (error["type"], error["code"]) == ("upstream_error", "overloaded")
    html = failure_response(_failure("HTTPError", 500, "<html>bad gateway</html>"))
    assert (
        html.text is not None
        and "<html>bad gateway</html>" in json.loads(html.text)["error"]["message"]
    )
    down = failure_response(_failure("ConnectionError", None))
    assert down.status == 502 and down.text is not None and '"upstream_error"' in down.text


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"port": -1}, "proxy.port"),
        ({"port": 70000}, "proxy.port"),
        ({"port": "80"}, "proxy.port"),
        ({"port": True}, "proxy.port"),
        ({"max_body_bytes": 10}, "proxy.max_body_bytes"),
        ({"max_queued": 0}, "proxy.max_queued"),
        ({"max_queued": 1.5}, "proxy.max_queued"),
        ({"max_queue_wait_s": 0}, "proxy.max_queue_wait_s"),
        ({"max_queue_wait_s": float("inf")}, "proxy.max_queue_wait_s"),
        ({"log_every": -1}, "proxy.log_every"),
        ({"breaker_failures": -1}, "proxy.breaker_failures"),
        ({"breaker_failures": 2.5}, "proxy.breaker_failures"),
        ({"breaker_reset_s": 0}, "proxy.breaker_reset_s"),
        ({"breaker_reset_s": 3601}, "proxy.breaker_reset_s"),
        ({"breaker_reset_s": float("nan")}, "proxy.breaker_reset_s"),
        ({"shutdown_timeout_s": 0}, "proxy.shutdown_timeout_s"),
        ({"health_check_timeout_s": -1}, "proxy.health_check_timeout_s"),
        ({"client_timeout_s": 0}, "proxy.client_timeout_s"),
        ({"client_timeout_s": float("nan")}, "proxy.client_timeout_s"),
        ({"shutdown_timeout_s": float("inf")}, "proxy.shutdown_timeout_s"),
        ({"client_timeout_s": 10**400}, "proxy.client_timeout_s"),
        ({"client_timeout_s": "60"}, "proxy.client_timeout_s"),
        ({"api_keys": ("good-secret-1", "")}, "proxy.api_keys"),
        ({"partition_cache_by_key": True}, "proxy.partition_cache_by_key"),
        ({"api_keys": 123}, "proxy.api_keys"),
        ({"api_keys": ("good-secret-1", 5)}, "proxy.api_keys"),
        ({"allow_unauthenticated": "false"}, "proxy.allow_unauthenticated"),
        ({"verbose": 1}, "proxy.verbose"),
        ({"host": ""}, "proxy.host"),
        ({"host": None}, "proxy.host"),
    ],
)
def test_settings_validation(kwargs: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        ProxySettings(**kwargs)
    assert info.value.field == field
    assert "good-secret-1" not in str(info.value)


def test_settings_values() -> None:
    assert ProxySettings(api_keys="a, b,,c ").api_keys == ("a", "b", "c")  # type: ignore[arg-type]
    assert ProxySettings(api_keys=["x"]).api_keys == ("x",)  # type: ignore[arg-type]
    assert ProxySettings(api_keys=None).api_keys == ()  # type: ignore[arg-type]
    assert not ProxySettings().auth_enabled and ProxySettings(api_keys=("k",)).auth_enabled
    with pytest.raises(ConfigError) as info:
        ProxySettings.from_mapping({"port": 1, "bogus": 2})
    assert info.value.field == "proxy.bogus"
    with pytest.raises(ConfigError) as info:
        # A misspelt api_keys holds keys: the error names the field, never the value.
        ProxySettings.from_mapping({"api_key": ["sk-typo-secret"]})
    assert info.value.field == "proxy.api_key" and "api_keys" in str(info.value)
    assert "sk-typo-secret" not in str(info.value)
    env = {
        "MINIMA_PROXY_API_KEYS": "k1,k2",
        "MINIMA_PROXY_LOG_EVERY": "7",
        "MINIMA_PROXY_STRICT_PARAMS": "yes",
        "MINIMA_PROXY_PASS_THROUGH_KEY": "0",
        "MINIMA_PROXY_CLIENT_TIMEOUT_S": "2.5",
        "MINIMA_PROXY_MAX_QUEUED": "50",
        "MINIMA_PROXY_MAX_QUEUE_WAIT_S": "7.5",
        "MINIMA_PROXY_BREAKER_FAILURES": "0",
        "MINIMA_PROXY_BREAKER_RESET_S": "2.5",
    }
    assert ProxySettings.env_overrides(env) == {
        "api_keys": ("k1", "k2"),
        "log_every": 7,
        "max_queued": 50,
        "max_queue_wait_s": 7.5,
        "breaker_failures": 0,
        "breaker_reset_s": 2.5,
        "client_timeout_s": 2.5,
        "strict_params": True,
        "pass_through_client_key": False,
    }
    with pytest.raises(ConfigError):
        ProxySettings.env_overrides({"MINIMA_PROXY_MAX_BODY_BYTES": "lots"})
    with pytest.raises(ConfigError) as timeout:
        ProxySettings.env_overrides({"MINIMA_PROXY_CLIENT_TIMEOUT_S": "soon"})
    assert timeout.value.field == "MINIMA_PROXY_CLIENT_TIMEOUT_S"
    with pytest.raises(ConfigError) as typo:
        ProxySettings.env_overrides({"MINIMA_PROXY_PARTITION_CACHE": "ture"})
    assert typo.value.field == "MINIMA_PROXY_PARTITION_CACHE"


def test_repr_hides_keys() -> None:
    settings = ProxySettings(api_keys=("sk-secret-one", "sk-secret-two"), port=9000)
    text = repr(settings)
    assert "sk-secret" not in text and "<2 keys>" in text and "port=9000" in text
    assert "sk-secret" not in str(settings)


@pytest.mark.parametrize(
    ("host", "keys", "allow", "refused"),
    [
        ("0.0.0.0", (), False, True),
        ("0.0.0.0", ("k",), False, False),
        ("0.0.0.0", (), True, False),
        ("::", (), False, True),
        ("192.168.1.5", (), False, True),
        ("example.com", (), False, True),
        ("127.0.0.1", (), False, False),
        ("127.0.0.2", (), False, False),
        ("::1", (), False, False),
        ("localhost", (), False, False),
    ],
)
def test_check_exposure(host: str, keys: tuple[str, ...], allow: bool, refused: bool) -> None:
    settings = ProxySettings(host=host, api_keys=keys, allow_unauthenticated=allow)
    if not refused:
        settings.check_exposure()
        return
    with pytest.raises(ConfigError) as info:
        settings.check_exposure()
    assert info.value.field == "proxy.host"


def test_a_registry_refuses_a_second_gateways_metrics() -> None:
    # Two gateways' series in one registry would be scraped as duplicates.
    registry = CollectorRegistry()
    GatewayMetrics(registry)
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        GatewayMetrics(registry)


def test_prometheus_series_follow_the_counters() -> None:
    metrics = GatewayMetrics()
    metrics.count_request("/v1/chat/completions", 200)
    metrics.count_request("/v1/chat/completions", 200)
    metrics.count_answer("miss", Usage(5, 7), "upstream", 0.005)  # on a bucket's bound
    metrics.count_answer("hit", Usage(5, 7), "cache")
    samples = {
        (s.name, tuple(sorted(s.labels.items()))): s.value
        for family in text_string_to_metric_families(metrics.exposition().decode())
        for s in family.samples
    }
    route = (("route", "/v1/chat/completions"), ("status", "200"))
    assert samples[("minima_gateway_requests_total", route)] == 2
    assert (
        samples[("minima_gateway_tokens_total", (("kind", "completion"), ("source", "cache")))] == 7
    )
    bucket = "minima_gateway_upstream_latency_seconds_bucket"
    assert samples[(bucket, (("le", "0.005"),))] == 1  # le is inclusive
    assert samples[(bucket, (("le", "+Inf"),))] == 1
    assert samples[("minima_gateway_upstream_latency_seconds_count", ())] == 1


def test_a_streams_upstream_time_ends_when_its_upstream_ended() -> None:
    # A reader dropped long after its stream ended (it stopped reading) must not put
    # its own hold time into the upstream latency histogram.
    flight = Broadcast()
    stream = ChunkStream("r", flight.follow())
    started = time.monotonic() - 5.0
    flight.finish()
    time.sleep(0.05)
    assert 5.0 <= _upstream_s(stream, started) < 5.04
    still_open = ChunkStream("r", Broadcast().follow())
    assert _upstream_s(still_open, started) >= 5.05  # not ended: until now


async def test_bounded_times_out_and_lets_other_cancellations_through() -> None:
    with pytest.raises(asyncio.TimeoutError):
        await bounded(asyncio.sleep(10), 0.05)
    assert await bounded(asyncio.sleep(0, "done"), 1.0) == "done"
    waiting = asyncio.ensure_future(bounded(asyncio.sleep(10), 5.0))
    await asyncio.sleep(0.01)
    waiting.cancel()  # a shutdown, say: it must stay a cancellation, never a timeout
    with pytest.raises(asyncio.CancelledError):
        await waiting


@pytest.mark.parametrize(
    ("field", "partition"),
    [("tenant", key_extra(CHAT, "0123456789abcdef")), ("endpoint", key_extra(COMPLETIONS, None))],
)
def test_a_body_cannot_name_a_key_only_field(field: str, partition: dict[str, str] | None) -> None:
    # A keyless body with "tenant": <a tenant's id> used to be keyed exactly as that
    # tenant's own request, and was answered from its partition.
    assert partition is not None
    base = {"model": "m", "messages": MSGS}
    forged = parse({**base, field: partition[field]})
    r = forged.request
    keyed = cache_key(r.model or "", r.messages, r.temperature, r.max_tokens, r.extra)[0]
    real = parse(base).request
    extra = {**(real.extra or {}), **partition}
    owned = cache_key(real.model or "", real.messages, real.temperature, real.max_tokens, extra)[0]
    assert keyed != owned
    assert (
        forged.payload is None or forged.payload[field] == partition[field]
    )  # still sent as given
