"""Config paths are absolute from construction on, so a later ``os.chdir`` cannot move them."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from minima_llm import (
    ConfigError,
    MinimaLlmConfig,
    MinimaLlmRequest,
    MinimaLlmResponse,
    OpenAIMinimaLlm,
    ParasailBatchConfig,
)
from minima_llm.testing import MockServer

URL = "http://localhost:8000/v1"

# Each path field, read back as a str (the lookup dirs as their only entry).
READ: dict[str, Callable[[MinimaLlmConfig], Any]] = {
    "cache_dir": lambda cfg: cfg.cache_dir,
    "trace_file": lambda cfg: cfg.trace_file,
    "cache_lookup_dirs": lambda cfg: cfg.cache_lookup_dirs[0],
    "parasail.state_dir": lambda cfg: cfg.parasail.state_dir,
}


def build(name: str, value: Any) -> MinimaLlmConfig:
    if name == "parasail.state_dir":
        return MinimaLlmConfig(
            base_url=URL, model="m", parasail=ParasailBatchConfig(state_dir=value)
        )
    if name == "cache_lookup_dirs":
        return MinimaLlmConfig(base_url=URL, model="m", cache_lookup_dirs=[value])
    return MinimaLlmConfig(base_url=URL, model="m", **{name: value})


@pytest.mark.parametrize("name", READ)
@pytest.mark.parametrize("given", ["rel", "./rel", Path("rel")])
def test_a_relative_path_stays_where_the_config_was_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str, given: Any
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    cfg = build(name, given)
    monkeypatch.chdir(tmp_path / "b")
    value = READ[name](cfg)
    assert value == str(tmp_path / "a" / "rel")
    assert type(value) is str
    # A copy made after the chdir keeps the first directory too.
    assert READ[name](cfg.replace(rpm=1)) == value


@pytest.mark.parametrize("name", READ)
def test_a_tilde_is_the_home_directory(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, name: str
) -> None:
    # YAML has no shell to expand it: "~/llm-cache" must not be a directory named "~".
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.chdir(tmp_path)
    assert READ[name](build(name, "~/llm-cache")) == str(tmp_path / "home" / "llm-cache")


def test_a_tilde_from_yaml_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("HOME", str(tmp_path))
    (tmp_path / "config.yml").write_text(f'base_url: "{URL}"\nmodel: m\ncache_dir: ~/c\n')
    environ = {"OPENAI_BASE_URL": URL, "OPENAI_MODEL": "m", "CACHE_LOOKUP_DIRS": "~/a:~/b"}
    assert MinimaLlmConfig.from_yaml(tmp_path / "config.yml").cache_dir == str(tmp_path / "c")
    assert MinimaLlmConfig.from_env(environ).cache_lookup_dirs == (
        str(tmp_path / "a"),
        str(tmp_path / "b"),
    )


def test_a_tilde_that_cannot_be_expanded_fails_naming_the_field() -> None:
    with pytest.raises(ConfigError) as caught:
        MinimaLlmConfig(base_url=URL, model="m", cache_dir="~no-such-user-4711/cache")
    assert caught.value.field == "cache_dir"
    assert "~ can be expanded" in caught.value.allowed


def test_cache_path_is_absolute_after_a_chdir(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = MinimaLlmConfig(base_url=URL, model="m", cache_dir="relcache")
    monkeypatch.chdir("/")
    assert cfg.cache_path == tmp_path / "relcache" / "minima_llm.db"


def test_every_way_of_building_gives_the_same_absolute_paths(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    environ = {
        "OPENAI_BASE_URL": URL,
        "OPENAI_MODEL": "m",
        "CACHE_DIR": "c",
        "MINIMA_TRACE_FILE": "t.jsonl",
        "CACHE_LOOKUP_DIRS": "l1,./l2",
    }
    data = {
        "base_url": URL,
        "model": "m",
        "cache_dir": "c",
        "trace_file": "t.jsonl",
        "cache_lookup_dirs": ["l1", "./l2"],
    }
    yaml_text = "".join(f"{k}: {v!r}\n" for k, v in data.items() if k != "cache_lookup_dirs")
    (tmp_path / "config.yml").write_text(yaml_text + "cache_lookup_dirs: [l1, ./l2]\n")
    built = [
        MinimaLlmConfig.from_env(environ),
        MinimaLlmConfig.from_dict(data),
        MinimaLlmConfig.from_yaml(tmp_path / "config.yml"),
        MinimaLlmConfig(**data),
    ]
    for cfg in built:
        assert cfg.cache_dir == str(tmp_path / "c")
        assert cfg.trace_file == str(tmp_path / "t.jsonl")
        assert cfg.cache_lookup_dirs == (str(tmp_path / "l1"), str(tmp_path / "l2"))


def test_a_yaml_state_dir_is_absolute(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "config.yml"
    path.write_text(f"base_url: {URL}\nmodel: m\nparasail:\n  state_dir: ./batch-state\n")
    assert MinimaLlmConfig.from_yaml(path).parasail.state_dir == str(tmp_path / "batch-state")


def test_symlinks_are_not_resolved(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # A shared cache reached through a link keeps the name the user gave it.
    (tmp_path / "real").mkdir()
    (tmp_path / "link").symlink_to(tmp_path / "real")
    monkeypatch.chdir(tmp_path)
    assert MinimaLlmConfig(base_url=URL, model="m", cache_dir="link").cache_dir == str(
        tmp_path / "link"
    )


def test_absolute_paths_are_kept(tmp_path: Path) -> None:
    assert build("cache_dir", str(tmp_path)).cache_dir == str(tmp_path)


@pytest.mark.parametrize("name", ["cache_dir", "trace_file", "parasail.state_dir"])
def test_an_empty_path_still_means_none(tmp_path: Path, name: str) -> None:
    # "" turned the cache (or the trace) off; made absolute it would be the current directory.
    assert READ[name](build(name, "")) == ""
    assert build("cache_dir", "").cache_path is None


@pytest.mark.parametrize("value", [5, b"trace.jsonl", ["t.jsonl"]])
def test_a_trace_file_that_is_no_path_fails_when_the_config_is_built(value: Any) -> None:
    # An int went on to the trace writer's open(), which writes to that file descriptor.
    with pytest.raises(ConfigError) as info:
        build("trace_file", value)
    assert (info.value.field, info.value.value) == ("trace_file", value)
    assert "a file path or None" in str(info.value)


async def test_a_backend_keeps_its_cache_across_a_chdir(
    mock: MockServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    monkeypatch.chdir(tmp_path / "a")
    backend = OpenAIMinimaLlm(
        MinimaLlmConfig(base_url=mock.url, model="mock-model", cache_dir="relcache", rpm=0)
    )
    request = MinimaLlmRequest("q1", [{"role": "user", "content": "hello"}])
    try:
        first = await backend.generate(request)
        # A backend reopens its store after a close (the next asyncio.run(), say).
        await backend.aclose()
        monkeypatch.chdir(tmp_path / "b")
        again = await backend.generate(request)
    finally:
        await backend.aclose()
    assert isinstance(first, MinimaLlmResponse) and isinstance(again, MinimaLlmResponse)
    assert again.cached and again.text == first.text
    assert (tmp_path / "a" / "relcache" / "minima_llm.db").exists()
    assert not (tmp_path / "b" / "relcache").exists()
