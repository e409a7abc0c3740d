"""Gateway configuration: the console script with a YAML file, and per-key cache partitions."""

from __future__ import annotations

import socket
import subprocess
from collections.abc import Callable
from pathlib import Path

import openai
import pytest
from _e2e_support import (
    API_KEY,
    MODEL,
    MockControl,
    Service,
    gateway_argv,
    gateway_env,
    http,
    user,
)

from forward_proxy import ForwardProxy, in_a_thread


def test_yaml_config_with_proxy_section(
    launch_gateway: Callable[..., Service],
    mock: MockControl,
    unique: Callable[[str], str],
    tmp_path: Path,
) -> None:
    cache_dir = tmp_path / "yaml-cache"
    config = tmp_path / "gateway.yml"
    config.write_text(
        f'base_url: "{mock.url}"\n'
        f'model: "{MODEL}"\n'
        f'api_key: "{API_KEY}"\n'
        f'cache_dir: "{cache_dir}"\n'
        "rpm: 0\n"
        "proxy:\n"
        '  api_keys: ["k-yaml"]\n'
        "  force_model: true\n",
        encoding="utf-8",
    )
    gw = launch_gateway("--config", str(config), script=True)
    assert "(forced)" in gw.output() and str(cache_dir) in gw.output()
    prompt = unique("configured by yaml")
    with openai.OpenAI(base_url=gw.url, api_key="k-yaml", max_retries=0) as client:
        resp = client.chat.completions.create(model="some-other-model", messages=user(prompt))
    assert resp.model == MODEL  # the mock names the model it was asked for: the forced one
    assert mock.stats()["by_route"] == {"/v1/chat/completions": 1}
    assert (cache_dir / "minima_llm.db").exists()
    with (
        openai.OpenAI(base_url=gw.url, api_key=API_KEY, max_retries=0) as client,
        pytest.raises(openai.AuthenticationError),
    ):
        client.models.list()


def test_cache_partitioned_by_api_key(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    gw = launch_gateway(MINIMA_PROXY_API_KEYS="k1,k2", MINIMA_PROXY_PARTITION_CACHE="1")
    prompt = unique("whose answer is this")
    labels = []
    for key in ("k1", "k2", "k1", "k2"):
        with openai.OpenAI(base_url=gw.url, api_key=key, max_retries=0) as client:
            raw = client.chat.completions.with_raw_response.create(
                model=MODEL, messages=user(prompt)
            )
        labels.append(raw.headers["x-minima-cache"])
    assert labels == ["miss", "miss", "hit", "hit"]
    assert mock.requests() == 2


def test_port_zero_is_announced_as_the_port_really_bound(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    gw = launch_gateway()  # every launch asks for port 0
    assert ":0/" not in gw.url
    with openai.OpenAI(base_url=gw.url, api_key="any", max_retries=0) as client:
        resp = client.chat.completions.create(model=MODEL, messages=user(unique("port zero")))
    assert resp.choices[0].message.content


def test_a_port_in_use_is_one_clear_line(mock: MockControl, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = subprocess.run(
            gateway_argv(port),
            env=gateway_env(mock.url, tmp_path / "cache"),
            capture_output=True,
            text=True,
            timeout=60,
        )
    assert done.returncode == 2
    assert f"minimallm-proxy: cannot listen on 127.0.0.1:{port}" in done.stderr
    assert "Traceback" not in done.stderr + done.stdout
    # It gave up before opening the cache.
    assert not (tmp_path / "cache").exists()


def test_a_gateway_reaching_its_upstream_through_an_http_proxy(
    launch_gateway: Callable[..., Service], mock: MockControl, unique: Callable[[str], str]
) -> None:
    # A node that reaches the model server only through the site's proxy: the name
    # "upstream.test" resolves nowhere, and only the proxy knows where it listens.
    port = int(mock.url.rsplit(":", 1)[1].split("/")[0])
    with in_a_thread(ForwardProxy({"upstream.test": ("127.0.0.1", port)})) as via:
        gw = launch_gateway(
            upstream=f"http://upstream.test:{port}/v1", HTTP_PROXY=via.url, NO_PROXY="", no_proxy=""
        )
        assert f"via proxy {via.url} (from HTTP_PROXY)" in gw.output()
        with openai.OpenAI(base_url=gw.url, api_key="k", max_retries=0) as client:
            resp = client.chat.completions.create(model=MODEL, messages=user(unique("proxied")))
        assert resp.choices[0].message.content
        health = http("GET", gw.root_url + "/health").json()
    assert health["upstream"]["reachable"] is True
    assert [s.method for s in via.seen] == ["POST", "GET"]
