"""``minimallm-proxy`` configuration: environment, YAML ``proxy:`` section, flags, exposure check."""

from __future__ import annotations

import argparse
import asyncio
import os
from pathlib import Path
from typing import Any

import pytest

from minima_llm import MinimaLlmConfig, OpenAIMinimaLlm
from minima_llm.errors import ConfigError, MinimaLlmError
from minima_llm.proxy import Gateway, ProxySettings, cli


@pytest.fixture(autouse=True)
def clean_env(monkeypatch: pytest.MonkeyPatch) -> None:
    """No stray configuration from the machine running the tests."""
    for name in list(os.environ):
        if name.startswith(("MINIMA_PROXY_", "OPENAI_")) or name in ("CACHE_DIR", "RPM"):
            monkeypatch.delenv(name)


def args(*argv: str) -> argparse.Namespace:
    return cli._parser().parse_args(list(argv))


def write_yaml(tmp_path: Path, text: str) -> str:
    path = tmp_path / "gateway.yaml"
    path.write_text(text, encoding="utf-8")
    return str(path)


def test_from_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://upstream.test/v1")
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    monkeypatch.setenv("OPENAI_API_KEY", "sk-upstream")
    monkeypatch.setenv("CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("MINIMA_PROXY_API_KEYS", "k1, k2")
    monkeypatch.setenv("MINIMA_PROXY_LOG_EVERY", "7")
    monkeypatch.setenv("MINIMA_PROXY_PARTITION_CACHE", "true")
    config, settings = cli.load(args())
    assert (config.model, config.api_key, config.cache_dir) == (
        "env-model",
        "sk-upstream",
        str(tmp_path),
    )
    assert config.base_url.startswith("http://upstream.test")
    assert settings.api_keys == ("k1", "k2") and settings.log_every == 7
    assert settings.partition_cache_by_key
    assert (settings.host, settings.port) == ("127.0.0.1", 8990)


@pytest.mark.parametrize(
    ("given", "used"),
    [(None, "asyncio"), ("auto", "asyncio"), ("aiohttp", "aiohttp"), ("stdlib", "stdlib")],
)
def test_the_upstream_transport_is_asyncio_unless_one_is_named(
    monkeypatch: pytest.MonkeyPatch, given: str | None, used: str
) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://upstream.test/v1")
    monkeypatch.setenv("OPENAI_MODEL", "m")
    if given is None:
        monkeypatch.delenv("MINIMA_TRANSPORT", raising=False)
    else:
        monkeypatch.setenv("MINIMA_TRANSPORT", given)
    config, _ = cli.load(args())
    assert config.transport == used


def test_environment_must_name_the_upstream() -> None:
    with pytest.raises(ConfigError) as info:
        cli.load(args())
    assert info.value.field == "OPENAI_BASE_URL"


YAML = """\
base_url: http://yaml-upstream.test/v1
model: yaml-model
rpm: 0
proxy:
  port: 9001
  api_keys: [ya, yb]
  verbose: true
  strict_params: true
"""


def test_a_batch_mode_config_is_answered_live(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # One config file may serve batch runs and the gateway; apps cannot wait hours.
    path = write_yaml(tmp_path, YAML + "parasail:\n  llm_batch_prefix: nightly\n")
    config, _ = cli.load(args("-c", path))
    assert not config.parasail.enabled
    assert OpenAIMinimaLlm(config).jobs is None
    assert "answers live" in caplog.text


def test_from_yaml_with_a_proxy_section(tmp_path: Path) -> None:
    config, settings = cli.load(args("--config", write_yaml(tmp_path, YAML)))
    assert config.model == "yaml-model" and config.rpm == 0
    assert settings.port == 9001 and settings.api_keys == ("ya", "yb")
    assert settings.verbose and settings.strict_params and not settings.force_model


def test_flags_override(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, YAML)
    _, settings = cli.load(args("-c", path, "--host", "0.0.0.0", "--port", "9100", "--force-model"))
    assert (settings.host, settings.port, settings.force_model) == ("0.0.0.0", 9100, True)
    assert settings.api_keys == ("ya", "yb")  # keys configured, so 0.0.0.0 is allowed


def test_environment_keys_apply_over_yaml(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("MINIMA_PROXY_API_KEYS", "from-env")
    _, settings = cli.load(args("-c", write_yaml(tmp_path, YAML)))
    assert settings.api_keys == ("from-env",)


def test_open_host_without_keys_is_refused(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "base_url: http://u.test/v1\nmodel: m\n")
    with pytest.raises(ConfigError) as info:
        cli.load(args("-c", path, "--host", "0.0.0.0"))
    assert info.value.field == "proxy.host" and "0.0.0.0" in str(info.value)
    _, settings = cli.load(args("-c", path, "--host", "0.0.0.0", "--allow-unauthenticated"))
    assert settings.allow_unauthenticated
    _, settings = cli.load(args("-c", path, "--host", "::1"))
    assert settings.host == "::1"


@pytest.mark.parametrize(
    ("proxy", "error"),
    [
        ("proxy:\n  bogus: 1\n", ConfigError),
        ("proxy: [1, 2]\n", MinimaLlmError),
        ("proxy:\n  port: nine\n", ConfigError),
        ("proxy:\n  api_keys: 12345\n", ConfigError),
        ('proxy:\n  host: 0.0.0.0\n  allow_unauthenticated: "false"\n', ConfigError),
    ],
)
def test_bad_proxy_section(tmp_path: Path, proxy: str, error: type[Exception]) -> None:
    path = write_yaml(tmp_path, "base_url: http://u.test/v1\nmodel: m\n" + proxy)
    with pytest.raises(error):
        cli.load(args("-c", path))


def test_main_reports_bad_config_without_starting(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    path = write_yaml(tmp_path, "base_url: http://u.test/v1\nmodel: m\n")
    assert cli.main(["-c", path, "--host", "0.0.0.0"]) == 2
    assert "proxy.host" in capsys.readouterr().err


def test_empty_keys_line_means_no_keys(tmp_path: Path) -> None:
    path = write_yaml(tmp_path, "base_url: http://u.test/v1\nmodel: m\nproxy:\n  api_keys:\n")
    _, settings = cli.load(args("-c", path))
    assert settings.api_keys == () and not settings.auth_enabled


class _NoSignalHandlers(asyncio.SelectorEventLoop):
    """A loop like Windows' Proactor: signal handlers are not implemented."""

    def add_signal_handler(self, sig: int, callback: Any, *args: Any) -> None:
        raise NotImplementedError


def test_the_shutdown_deadline_holds_on_a_loop_without_signal_handlers() -> None:
    # The hook raised out of aiohttp's shutdown there, skipping the cleanup that flushes the cache.
    gateway = Gateway(
        OpenAIMinimaLlm(MinimaLlmConfig(base_url="http://x/v1", model="m")), ProxySettings()
    )
    loop = _NoSignalHandlers()

    async def overstays() -> None:
        gateway.answering.add(asyncio.current_task())  # type: ignore[arg-type]
        await asyncio.sleep(30)

    async def shut_down() -> None:
        task = asyncio.ensure_future(overstays())
        await asyncio.sleep(0)
        await cli._drain(gateway, 0.05)
        with pytest.raises(asyncio.CancelledError):
            await asyncio.wait_for(task, 5)

    try:
        loop.run_until_complete(shut_down())
    finally:
        loop.close()
