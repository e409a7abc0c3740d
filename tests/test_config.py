"""Config: defaults, every environment variable, validation, dict/YAML loading, secrets."""

from __future__ import annotations

import dataclasses
import os
import re
from pathlib import Path
from typing import Any

import pytest

from minima_llm import BatchConfig, ConfigError, MinimaLlmConfig, ParasailBatchConfig
from minima_llm.config import normalize_base_url, synonym_groups

URL = "http://localhost:8000/v1"
SECRET = "sk-test-SECRET-4242"
BASE_ENV = {"OPENAI_BASE_URL": URL, "OPENAI_MODEL": "gpt-test"}


def make(**kwargs: Any) -> MinimaLlmConfig:
    return MinimaLlmConfig(**{"base_url": URL, "model": "gpt-test", **kwargs})


def env(**extra: str) -> MinimaLlmConfig:
    return MinimaLlmConfig.from_env(environ={**BASE_ENV, **extra})


def as_sets(groups: Any) -> dict[str, set[str]]:
    return {name: set(aliases) for name, aliases in groups.items()}


# --- defaults (reference 002's environment table) ---------------------------------

CLIENT_DEFAULTS = {
    "api_key": None,
    "cache_dir": None,
    "max_outstanding": 32,
    "rpm": 600,
    "timeout_s": 60.0,
    "max_attempts": 6,
    "base_backoff_s": 0.5,
    "max_backoff_s": 20.0,
    "jitter": 0.2,
    "cooldown_floor_s": 0.0,
    "cooldown_cap_s": 30.0,
    "cooldown_halflife_s": 20.0,
    "compress_gzip": False,
    "force_refresh": False,
    "trace_file": None,
    "model_synonyms": {},
    "cache_lookup_dirs": (),
    "transport": "auto",
    "max_response_bytes": 256 * 2**20,
}
BATCH_DEFAULTS = {
    "num_workers": 64,
    "max_failures": 25,
    "heartbeat_s": 10.0,
    "stall_s": 300.0,
    "print_first_failures": 5,
    "keep_failure_summaries": 20,
}


@pytest.mark.parametrize(("name", "expected"), CLIENT_DEFAULTS.items())
def test_explicit_construction_defaults(name: str, expected: object) -> None:
    assert getattr(make(), name) == expected


@pytest.mark.parametrize(("name", "expected"), BATCH_DEFAULTS.items())
def test_batch_defaults(name: str, expected: object) -> None:
    assert getattr(BatchConfig(), name) == expected
    assert getattr(make().batch, name) == expected


@pytest.mark.parametrize(("name", "expected"), {**CLIENT_DEFAULTS, **BATCH_DEFAULTS}.items())
def test_from_env_with_only_required_vars_gives_defaults(name: str, expected: object) -> None:
    cfg = env()
    value = getattr(cfg.batch, name) if name in BATCH_DEFAULTS else getattr(cfg, name)
    assert value == expected


def test_parasail_defaults() -> None:
    p = make().parasail
    assert p == ParasailBatchConfig(None, None, 30.0, 24.0)
    assert not p.enabled


def test_explicit_values_from_reference_example() -> None:
    cfg = MinimaLlmConfig(
        base_url=URL,
        model="gpt-3.5-turbo",
        api_key="sk-...",
        max_outstanding=8,
        rpm=120,
        timeout_s=5.0,
        batch=BatchConfig(num_workers=4, max_failures=None),
    )
    assert (cfg.model, cfg.max_outstanding, cfg.rpm, cfg.timeout_s) == (
        "gpt-3.5-turbo",
        8,
        120,
        5.0,
    )
    assert cfg.api_key == "sk-..."
    assert (cfg.batch.num_workers, cfg.batch.max_failures) == (4, None)


# --- from_env: every variable ---------------------------------------------------

ENV_CASES = [
    ("MAX_OUTSTANDING", "7", "max_outstanding", 7),
    ("RPM", "120", "rpm", 120),
    ("RPM", "0", "rpm", 0),
    ("TIMEOUT_S", "12.5", "timeout_s", 12.5),
    ("TIMEOUT_S", " 3 ", "timeout_s", 3.0),
    ("MAX_ATTEMPTS", "3", "max_attempts", 3),
    ("MAX_ATTEMPTS", "0", "max_attempts", 0),
    ("BASE_BACKOFF_S", "0.25", "base_backoff_s", 0.25),
    ("MAX_BACKOFF_S", "40", "max_backoff_s", 40.0),
    ("JITTER", "0", "jitter", 0.0),
    ("JITTER", "1.0", "jitter", 1.0),
    ("COOLDOWN_FLOOR_S", "1.5", "cooldown_floor_s", 1.5),
    ("COOLDOWN_CAP_S", "90", "cooldown_cap_s", 90.0),
    ("COOLDOWN_HALFLIFE_S", "5", "cooldown_halflife_s", 5.0),
    ("COMPRESS_GZIP", "1", "compress_gzip", True),
    ("COMPRESS_GZIP", "true", "compress_gzip", True),
    ("COMPRESS_GZIP", "YES", "compress_gzip", True),
    ("COMPRESS_GZIP", "on", "compress_gzip", True),
    ("COMPRESS_GZIP", "0", "compress_gzip", False),
    ("COMPRESS_GZIP", "False", "compress_gzip", False),
    ("CACHE_DIR", "/srv/cache", "cache_dir", "/srv/cache"),
    ("CACHE_DIR", " /srv/cache\r", "cache_dir", "/srv/cache"),
    ("CACHE_DIR", "", "cache_dir", None),
    ("CACHE_FORCE_REFRESH", "1", "force_refresh", True),
    ("CACHE_FORCE_REFRESH", "0", "force_refresh", False),
    ("MINIMA_TRACE_FILE", "/srv/trace.jsonl", "trace_file", "/srv/trace.jsonl"),
    ("MINIMA_TRACE_FILE", "", "trace_file", None),
    ("MINIMA_TRANSPORT", "stdlib", "transport", "stdlib"),
    ("MINIMA_TRANSPORT", "aiohttp", "transport", "aiohttp"),
    ("MINIMA_TRANSPORT", "auto", "transport", "auto"),
    ("MAX_RESPONSE_BYTES", "1048576", "max_response_bytes", 1_048_576),
    ("MAX_RESPONSE_BYTES", " 0 ", "max_response_bytes", 0),
    ("CACHE_LOOKUP_DIRS", "/a,/b", "cache_lookup_dirs", ("/a", "/b")),
    ("CACHE_LOOKUP_DIRS", f"/a{os.pathsep}/b", "cache_lookup_dirs", ("/a", "/b")),
    ("CACHE_LOOKUP_DIRS", f" /a , /b{os.pathsep}/c,, ", "cache_lookup_dirs", ("/a", "/b", "/c")),
    ("CACHE_LOOKUP_DIRS", "", "cache_lookup_dirs", ()),
    ("OPENAI_API_KEY", "sk-abc", "api_key", "sk-abc"),
    # A CRLF .env file or a job script's trailing blank is no part of the model's name.
    ("OPENAI_MODEL", "gpt-4o ", "model", "gpt-4o"),
    ("OPENAI_MODEL", "gpt-4o\r", "model", "gpt-4o"),
    ("OPENAI_MODEL", "\tgpt-4o\n", "model", "gpt-4o"),
    ("OPENAI_BASE_URL", f"{URL}\r", "base_url", URL),
]


@pytest.mark.parametrize(("var", "text", "name", "expected"), ENV_CASES)
def test_from_env_client_variable(var: str, text: str, name: str, expected: object) -> None:
    assert getattr(env(**{var: text}), name) == expected


BATCH_ENV_CASES = [
    ("BATCH_NUM_WORKERS", "8", "num_workers", 8),
    ("BATCH_MAX_FAILURES", "10", "max_failures", 10),
    ("BATCH_MAX_FAILURES", "none", "max_failures", None),
    ("BATCH_MAX_FAILURES", "None", "max_failures", None),
    ("BATCH_MAX_FAILURES", "0", "max_failures", 0),
    ("BATCH_HEARTBEAT_S", "2.5", "heartbeat_s", 2.5),
    ("BATCH_STALL_S", "60", "stall_s", 60.0),
    ("BATCH_PRINT_FIRST_FAILURES", "0", "print_first_failures", 0),
    ("BATCH_KEEP_FAILURE_SUMMARIES", "3", "keep_failure_summaries", 3),
]


@pytest.mark.parametrize(("var", "text", "name", "expected"), BATCH_ENV_CASES)
def test_from_env_batch_variable(var: str, text: str, name: str, expected: object) -> None:
    cfg = env(**{var: text})
    assert getattr(cfg.batch, name) == expected
    assert getattr(BatchConfig.from_env({var: text}), name) == expected


def test_from_env_required_values_are_read() -> None:
    cfg = MinimaLlmConfig.from_env(
        environ={"OPENAI_BASE_URL": "https://api.example.com", "OPENAI_MODEL": "m-1"}
    )
    assert (cfg.base_url, cfg.model) == ("https://api.example.com/v1", "m-1")


@pytest.mark.parametrize(
    ("extra", "expected"),
    [
        ({}, None),
        ({"OPENAI_TOKEN": "tok-1"}, "tok-1"),
        ({"OPENAI_API_KEY": "key-1", "OPENAI_TOKEN": "tok-1"}, "key-1"),
        ({"OPENAI_API_KEY": "", "OPENAI_TOKEN": "tok-1"}, "tok-1"),
        # A blank key is an unset one (KEY=${KEY} with nothing in it, or a stray newline).
        ({"OPENAI_API_KEY": "   ", "OPENAI_TOKEN": "tok-1"}, "tok-1"),
        ({"OPENAI_API_KEY": "\n", "OPENAI_TOKEN": " tok-1\n"}, "tok-1"),
        ({"OPENAI_API_KEY": "   "}, None),
        ({"OPENAI_TOKEN": "\t"}, None),
    ],
)
def test_api_key_falls_back_to_openai_token(extra: dict[str, str], expected: str | None) -> None:
    assert env(**extra).api_key == expected


@pytest.mark.parametrize("missing", ["OPENAI_BASE_URL", "OPENAI_MODEL"])
@pytest.mark.parametrize("how", ["absent", "", "   ", "\r\n"])
def test_from_env_missing_required_variable(missing: str, how: str) -> None:
    environ = dict(BASE_ENV)
    if how == "absent":
        del environ[missing]
    else:
        environ[missing] = how
    with pytest.raises(ConfigError, match=missing) as info:
        MinimaLlmConfig.from_env(environ=environ)
    assert info.value.field == missing


def test_from_env_reads_os_environ_when_not_given(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("OPENAI_BASE_URL", "http://envhost:9000")
    monkeypatch.setenv("OPENAI_MODEL", "env-model")
    monkeypatch.setenv("RPM", "33")
    cfg = MinimaLlmConfig.from_env()
    assert (cfg.base_url, cfg.model, cfg.rpm) == ("http://envhost:9000/v1", "env-model", 33)


def test_from_env_ignores_unrelated_variables() -> None:
    assert env(HOME="/root", RPMX="fast", BATCH_FOO="x") == env()


# --- model synonyms ---------------------------------------------------------------

SYNONYM_CASES = [
    ("a=b|c,d=e", {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}, "d": {"e"}, "e": {"d"}}),
    ('{"a": ["b", "c"], "d": "e"}', {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}, "d": {"e"}, "e": {"d"}}),
    # Transitive: a~b and b~c puts all three in one group.
    ("a=b,b=c", {"a": {"b", "c"}, "b": {"a", "c"}, "c": {"a", "b"}}),
    ("x=z,y=z", {"x": {"y", "z"}, "y": {"x", "z"}, "z": {"x", "y"}}),
    (" gpt-4o = openai/gpt-4o | gpt4o ", {
        "gpt-4o": {"openai/gpt-4o", "gpt4o"},
        "openai/gpt-4o": {"gpt-4o", "gpt4o"},
        "gpt4o": {"gpt-4o", "openai/gpt-4o"},
    }),
    ("a=a", {}),
    ("", {}),
]  # fmt: skip


@pytest.mark.parametrize(("text", "expected"), SYNONYM_CASES)
def test_model_synonyms_from_env(text: str, expected: dict[str, set[str]]) -> None:
    assert as_sets(env(MODEL_SYNONYMS=text).model_synonyms) == expected


@pytest.mark.parametrize(
    "spec",
    [{"a": ["b"], "c": "b"}, {"a": ("b", "c")}, "a=b|c", '{"c": ["a", "b"]}'],
)
def test_synonyms_are_symmetric_and_transitive(spec: Any) -> None:
    groups = synonym_groups(spec)
    assert set(groups) == {"a", "b", "c"}
    for name, aliases in groups.items():
        assert name not in aliases
        for alias in aliases:
            assert name in groups[alias]
            assert set(groups[alias]) | {alias} == set(aliases) | {name}


def test_synonyms_given_as_mapping_to_constructor() -> None:
    cfg = make(model_synonyms={"m1": ["m2"]})
    assert as_sets(cfg.model_synonyms) == {"m1": {"m2"}, "m2": {"m1"}}


@pytest.mark.parametrize("text", ["a", "a=", "=b", "a=b,c", "{not json", '["a", "b"]'])
def test_bad_model_synonyms(text: str) -> None:
    with pytest.raises(ConfigError, match="MODEL_SYNONYMS"):
        env(MODEL_SYNONYMS=text)


@pytest.mark.parametrize(
    "spec", [{"a": [""]}, {"a": [3]}, {"a": 3}, {"a": ["b", None]}, ["a", "b"]]
)
def test_bad_model_synonyms_mapping(spec: Any) -> None:
    with pytest.raises(ConfigError, match="model_synonyms"):
        make(model_synonyms=spec)


# --- validation ------------------------------------------------------------------

INVALID = [
    ("rpm", -1),
    ("rpm", 1.5),
    ("max_outstanding", 0),
    ("timeout_s", 0),
    ("timeout_s", -1.0),
    ("timeout_s", "60"),
    ("max_attempts", -1),
    ("base_backoff_s", -0.1),
    ("jitter", 1.5),
    ("jitter", -0.1),
    ("cooldown_floor_s", -1.0),
    ("cooldown_halflife_s", 0.0),
    ("compress_gzip", "yes"),
    ("force_refresh", 1),
    ("transport", "curl"),
    ("max_response_bytes", -1),
    ("max_response_bytes", True),
    ("max_response_bytes", 1.5),
    ("max_response_bytes", "1024"),
    ("max_response_bytes", None),
    ("base_url", ""),
    ("base_url", "localhost:8000"),
    ("base_url", "http://"),
    ("base_url", "http://127.0.0.1:99999/v1"),
    ("base_url", "http://host:abc/v1"),
    ("base_url", "http://host:0/v1"),
    ("base_url", "http://[::1/v1"),
    ("base_url", "http://127.0.0.1:8000 /v1"),
    ("base_url", "http://host/v1\n"),
    ("timeout_s", 1e10),
    ("timeout_s", 10**400),  # past a float's range: YAML reads such digits as an int
    ("model", ""),
    ("model", "   "),
    ("model", "\t\r\n"),
    ("cache_lookup_dirs", b"/a"),
    ("cache_lookup_dirs", [1]),
    ("cache_lookup_dirs", 5),
]


@pytest.mark.parametrize(("name", "value"), INVALID)
def test_invalid_field_raises_config_error_naming_field_and_value(name: str, value: object) -> None:
    kwargs: dict[str, Any] = {"base_url": URL, "model": "gpt-test", name: value}
    with pytest.raises(ConfigError) as info:
        MinimaLlmConfig(**kwargs)
    assert isinstance(info.value, ValueError)
    assert info.value.field == name
    assert name in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(
    ("kwargs", "name", "value"),
    [
        ({"base_backoff_s": 5.0, "max_backoff_s": 1.0}, "max_backoff_s", 1.0),
        ({"cooldown_floor_s": 10.0, "cooldown_cap_s": 5.0}, "cooldown_cap_s", 5.0),
    ],
)
def test_invalid_field_pairs(kwargs: dict[str, float], name: str, value: float) -> None:
    with pytest.raises(ConfigError) as info:
        make(**kwargs)
    assert info.value.field == name
    assert f"{name}={value!r}" in str(info.value)


@pytest.mark.parametrize(
    ("environ", "name", "value", "other"),
    [
        # Each variable set alone, against the other's default: the error names it.
        ({"BASE_BACKOFF_S": "30"}, "BASE_BACKOFF_S", 30.0, "at most max_backoff_s (20.0)"),
        ({"MAX_BACKOFF_S": "0.1"}, "MAX_BACKOFF_S", 0.1, "at least base_backoff_s (0.5)"),
        ({"COOLDOWN_FLOOR_S": "40"}, "COOLDOWN_FLOOR_S", 40.0, "at most cooldown_cap_s (30.0)"),
    ],
)
def test_a_pair_out_of_order_names_the_value_that_was_set(
    environ: dict[str, str], name: str, value: float, other: str
) -> None:
    with pytest.raises(ConfigError) as info:
        env(**environ)
    assert (info.value.field, info.value.value) == (name, value)
    assert str(info.value) == f"invalid {name}={value!r}: {other}"


def test_explicit_model_is_kept_as_given() -> None:
    # Only the environment is stripped; a program's own model name is its cache key.
    assert make(model=" m\n").model == " m\n"


def test_boundary_values_are_accepted() -> None:
    cfg = make(
        max_response_bytes=0,
        rpm=0,
        max_attempts=0,
        jitter=1.0,
        base_backoff_s=0.0,
        max_backoff_s=0.0,
        cooldown_floor_s=5.0,
        cooldown_cap_s=5.0,
        timeout_s=0.001,
    )
    assert (cfg.rpm, cfg.max_attempts, cfg.cooldown_cap_s) == (0, 0, 5.0)
    assert cfg.max_response_bytes == 0


def test_max_response_bytes_error_says_what_is_allowed() -> None:
    with pytest.raises(ConfigError) as info:
        make(max_response_bytes=-5)
    assert info.value.field == "max_response_bytes"
    assert "integer >= 0" in info.value.allowed and "0 means no cap" in info.value.allowed


def test_max_response_bytes_from_dict_yaml_and_repr(tmp_path: Path) -> None:
    data = {"base_url": URL, "model": "m", "max_response_bytes": 4096}
    assert MinimaLlmConfig.from_dict(data).max_response_bytes == 4096
    cfg = MinimaLlmConfig.from_yaml(
        write(tmp_path, f"base_url: {URL}\nmodel: m\nmax_response_bytes: 0\n")
    )
    assert cfg.max_response_bytes == 0
    assert "max_response_bytes=0" in repr(cfg)
    assert cfg.replace(max_response_bytes=1).max_response_bytes == 1
    with pytest.raises(ConfigError, match="max_response_bytes"):
        cfg.replace(max_response_bytes=-1)


BATCH_INVALID = [
    ("num_workers", 0),
    ("num_workers", -3),
    ("num_workers", 2.0),
    ("num_workers", True),
    ("max_failures", -1),
    ("max_failures", "10"),
    ("heartbeat_s", -1.0),
    ("stall_s", "300"),
    ("print_first_failures", -1),
    ("keep_failure_summaries", 1.5),
]


@pytest.mark.parametrize(("name", "value"), BATCH_INVALID)
def test_invalid_batch_field_on_construction(name: str, value: object) -> None:
    with pytest.raises(ConfigError) as info:
        BatchConfig(**{name: value})
    assert name in str(info.value)
    assert repr(value) in str(info.value)


@pytest.mark.parametrize(("name", "value"), BATCH_INVALID)
def test_invalid_batch_assignment_is_rejected_and_leaves_old_value(
    name: str, value: object
) -> None:
    cfg = make()
    before = getattr(cfg.batch, name)
    with pytest.raises(ConfigError, match=name):
        setattr(cfg.batch, name, value)
    assert getattr(cfg.batch, name) == before


@pytest.mark.parametrize(
    ("name", "value"),
    [("max_failures", 10), ("max_failures", None), ("num_workers", 1), ("heartbeat_s", 0.5)],
)
def test_batch_config_is_mutable(name: str, value: object) -> None:
    cfg = make()
    setattr(cfg.batch, name, value)
    assert getattr(cfg.batch, name) == value
    assert getattr(cfg, name) == value  # the convenience property follows


def test_batch_config_rejects_misspelt_field() -> None:
    batch = BatchConfig()
    with pytest.raises(AttributeError, match="max_failure"):
        batch.max_failure = 10  # type: ignore[attr-defined]
    assert batch.max_failures == 25


ENV_INVALID = [
    ("RPM", "fast"),
    ("RPM", "600.0"),
    ("RPM", "-5"),
    ("MAX_OUTSTANDING", "many"),
    ("TIMEOUT_S", "soon"),
    ("TIMEOUT_S", "0"),
    ("MAX_ATTEMPTS", "-1"),
    ("JITTER", "1.5"),
    ("BASE_BACKOFF_S", "slow"),
    ("COOLDOWN_CAP_S", "x"),
    ("COMPRESS_GZIP", "maybe"),
    ("CACHE_FORCE_REFRESH", "2"),
    ("MINIMA_TRANSPORT", "curl"),
    ("MAX_RESPONSE_BYTES", "256MiB"),
    ("MAX_RESPONSE_BYTES", "1e6"),
    ("MAX_RESPONSE_BYTES", "-1"),
    ("BATCH_NUM_WORKERS", "0"),
    ("BATCH_NUM_WORKERS", "lots"),
    ("BATCH_MAX_FAILURES", "some"),
    ("BATCH_HEARTBEAT_S", "-1"),
    ("BATCH_STALL_S", "never"),
]


@pytest.mark.parametrize(("var", "text"), ENV_INVALID)
def test_invalid_env_values(var: str, text: str) -> None:
    # Named by the variable, unparsable or out of range alike: that is what the user set.
    with pytest.raises(ConfigError) as info:
        env(**{var: text})
    assert info.value.field == var
    message = str(info.value)
    assert var in message and text in message


def test_a_yaml_key_left_to_the_environment_is_named_by_its_variable(tmp_path: Path) -> None:
    text = "base_url: http://u.test/v1\nmodel: m\nbatch:\n  stall_s: 5\n"
    path = write(tmp_path, text)
    for environ, named in (
        ({"TIMEOUT_S": "0"}, "TIMEOUT_S"),
        ({"BATCH_NUM_WORKERS": "0"}, "BATCH_NUM_WORKERS"),
    ):
        with pytest.raises(ConfigError) as info:
            MinimaLlmConfig.from_yaml(path, environ=environ)
        assert info.value.field == named
    with pytest.raises(ConfigError) as info:  # the file's own value: named by its key
        MinimaLlmConfig.from_yaml(write(tmp_path, text + "timeout_s: 0\n"), environ={})
    assert info.value.field == "timeout_s"
    no_url = write(tmp_path, "model: m\n")
    with pytest.raises(ConfigError) as info:
        MinimaLlmConfig.from_yaml(no_url, environ={"OPENAI_BASE_URL": "ftp://h/v1"})
    assert info.value.field == "OPENAI_BASE_URL"


def test_a_url_refused_for_its_scheme_or_port_still_masks_a_password() -> None:
    for url in (
        "ftp://me:hunter2@host/v1",
        "http://me:hunter2@host:99999/v1",
        # A raw /, ? or # in a password ends urlsplit's authority before the @.
        "http://me:hun/ter2@host/v1",
        "http://me:hun?ter2@host/v1",
        "http://me:hun#ter2@host/v1",
        "http:/me:hunter2@host/v1",
    ):
        with pytest.raises(ConfigError) as info:
            make(base_url=url)
        assert "ter2" not in str(info.value) and "***@host" in str(info.value), url
    with pytest.raises(ConfigError) as info:
        env(OPENAI_BASE_URL="ftp://me:hunter2@host/v1")
    assert info.value.field == "OPENAI_BASE_URL" and "hunter2" not in str(info.value)


def test_max_backoff_below_base_from_env() -> None:
    with pytest.raises(ConfigError, match="MAX_BACKOFF_S"):
        env(BASE_BACKOFF_S="5", MAX_BACKOFF_S="1")


def test_cooldown_cap_below_floor_from_env() -> None:
    with pytest.raises(ConfigError, match="COOLDOWN_CAP_S"):
        env(COOLDOWN_FLOOR_S="10", COOLDOWN_CAP_S="2")


def test_config_is_frozen() -> None:
    cfg = make()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.rpm = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.parasail.poll_interval_s = 1.0  # type: ignore[misc]


def test_replace_validates_and_copies_batch() -> None:
    cfg = make(rpm=10)
    copy = cfg.replace(rpm=20)
    assert (cfg.rpm, copy.rpm) == (10, 20)
    copy.batch.max_failures = 1
    assert cfg.batch.max_failures == 25
    with pytest.raises(ConfigError, match="rpm"):
        cfg.replace(rpm=-1)


# --- from_dict / from_yaml -----------------------------------------------------------


def test_from_dict_with_nested_sections() -> None:
    cfg = MinimaLlmConfig.from_dict(
        {
            "base_url": URL,
            "model": "m",
            "rpm": 0,
            "cache_lookup_dirs": ["/x", Path("/y")],
            "batch": {"num_workers": 4, "max_failures": None},
            "parasail": {"llm_batch_prefix": "proj", "poll_interval_s": 5},
        }
    )
    assert cfg.rpm == 0
    assert cfg.cache_lookup_dirs == ("/x", "/y")
    assert cfg.batch == BatchConfig(num_workers=4, max_failures=None)
    assert cfg.parasail == ParasailBatchConfig(llm_batch_prefix="proj", poll_interval_s=5)
    assert cfg.parasail.enabled


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"bogus": 1}, "config.bogus"),
        ({"batch": {"workers": 3}}, "batch.workers"),
        ({"parasail": {"prefix": "p"}}, "parasail.prefix"),
        ({"batch": {"num_workers": 0}}, "num_workers"),
        ({"parasail": {"poll_interval_s": 0}}, "parasail.poll_interval_s"),
    ],
)
def test_from_dict_errors(data: dict[str, Any], field: str) -> None:
    with pytest.raises(ConfigError) as info:
        MinimaLlmConfig.from_dict({"base_url": URL, "model": "m", **data})
    assert info.value.field == field
    assert field in str(info.value)


@pytest.mark.parametrize("missing", ["base_url", "model"])
def test_from_dict_missing_required_key(missing: str) -> None:
    data = {"base_url": URL, "model": "m"}
    del data[missing]
    with pytest.raises(ConfigError, match=missing):
        MinimaLlmConfig.from_dict(data)


def test_batch_and_parasail_from_dict() -> None:
    assert BatchConfig.from_dict({"stall_s": 1.0}).stall_s == 1.0
    assert ParasailBatchConfig.from_dict({"state_dir": "/s"}).state_dir == "/s"
    with pytest.raises(ConfigError, match=r"batch\.nope"):
        BatchConfig.from_dict({"nope": 1})


@pytest.mark.parametrize("value", [5, 1.5, True, ["/state"], b"/state", {"dir": "/state"}])
def test_a_state_dir_that_is_no_path_fails_when_the_config_is_built(value: Any) -> None:
    # It used to pass, and fail later as a bare TypeError when the backend was built.
    with pytest.raises(ConfigError) as info:
        ParasailBatchConfig(llm_batch_prefix="p", state_dir=value)
    assert (info.value.field, info.value.value) == ("parasail.state_dir", value)
    assert "a directory path or None" in str(info.value)
    with pytest.raises(ConfigError, match=r"parasail\.state_dir"):
        MinimaLlmConfig.from_dict({"base_url": URL, "model": "m", "parasail": {"state_dir": value}})


def test_a_state_dir_given_as_a_path_is_kept_as_a_string() -> None:
    assert ParasailBatchConfig(state_dir=Path("/tmp/state")).state_dir == "/tmp/state"


REFERENCE_YAML = """\
base_url: "https://api.openai.com/v1"
model: "gpt-4"
api_key: "sk-..."
cache_dir: "./cache"

# Optional batch settings
batch:
  num_workers: 64
  max_failures: 25
  heartbeat_s: 10.0

parasail:
  llm_batch_prefix: "my-project"  # Prefix for batch state files
  state_dir: "./batch-state"      # Directory for state files (defaults to cache_dir)
  poll_interval_s: 30             # How often to poll for completion
  max_poll_hours: 24              # Maximum time to wait
"""


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "config.yml"
    path.write_text(text, encoding="utf-8")
    return path


def test_from_yaml_reference_example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, REFERENCE_YAML))
    assert cfg.base_url == "https://api.openai.com/v1"
    assert (cfg.model, cfg.api_key) == ("gpt-4", "sk-...")
    assert cfg.cache_dir == str(tmp_path / "cache")
    assert cfg.batch == BatchConfig(num_workers=64, max_failures=25, heartbeat_s=10.0)
    assert cfg.parasail == ParasailBatchConfig(
        "my-project", str(tmp_path / "batch-state"), 30.0, 24.0
    )
    assert cfg.parasail.enabled


def test_from_yaml_other_fields(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_TOKEN", raising=False)
    text = (
        "base_url: http://h:1/\nmodel: m\nforce_refresh: true\nrpm: 0\n"
        "model_synonyms: {a: [b]}\ncache_lookup_dirs: [/x, /y]\nbatch: {max_failures: null}\n"
    )
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, text))
    assert cfg.base_url == "http://h:1/v1"
    assert cfg.force_refresh is True
    assert cfg.rpm == 0
    assert cfg.api_key is None
    assert as_sets(cfg.model_synonyms) == {"a": {"b"}, "b": {"a"}}
    assert cfg.cache_lookup_dirs == ("/x", "/y")
    assert cfg.batch.max_failures is None


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        (f'cache_lookup_dirs: "/a{os.pathsep}/b"', ("/a", "/b")),
        ('cache_lookup_dirs: "/a, /b"', ("/a", "/b")),
        ("cache_lookup_dirs: /a", ("/a",)),
        ('cache_lookup_dirs: ""', ()),
    ],
)
def test_from_yaml_lookup_dirs_as_the_variable_spells_them(
    tmp_path: Path, line: str, expected: tuple[str, ...]
) -> None:
    # README: YAML takes what the variable takes; model_synonyms already took its string.
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, f"base_url: {URL}\nmodel: m\n{line}\n"))
    assert cfg.cache_lookup_dirs == expected


@pytest.mark.parametrize(
    ("data", "field", "hint"),
    [
        ({"minima_transport": "stdlib"}, "config.minima_transport", "is transport)"),
        ({"cache_force_refresh": True}, "config.cache_force_refresh", "is force_refresh)"),
        ({"minima_trace_file": "t"}, "config.minima_trace_file", "is trace_file)"),
        ({"openai_api_key": SECRET}, "config.openai_api_key", "is api_key)"),
        ({"batch_num_workers": 4}, "config.batch_num_workers", "num_workers in the batch:"),
        ({"batch": {"batch_stall_s": 4}}, "batch.batch_stall_s", "BATCH_STALL_S is stall_s)"),
    ],
)
def test_a_key_spelt_as_its_variable_is_told_its_name(
    data: dict[str, Any], field: str, hint: str
) -> None:
    with pytest.raises(ConfigError) as info:
        MinimaLlmConfig.from_dict({"base_url": URL, "model": "m", **data})
    assert info.value.field == field
    assert hint in str(info.value)
    assert SECRET not in str(info.value)


def test_from_yaml_blank_api_key_falls_back_to_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.setenv("OPENAI_TOKEN", "tok")
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, f'base_url: {URL}\nmodel: m\napi_key: "  "\n'))
    assert cfg.api_key == "tok"


def test_from_yaml_empty_list_entry_means_none(tmp_path: Path) -> None:
    text = f"base_url: {URL}\nmodel: m\ncache_lookup_dirs:\nmodel_synonyms:\n"
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, text))
    assert cfg.cache_lookup_dirs == ()
    assert cfg.model_synonyms == {}


def test_from_yaml_empty_sections_mean_the_defaults(tmp_path: Path) -> None:
    text = f"base_url: {URL}\nmodel: m\nbatch:\nparasail:\n"
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, text))
    assert cfg.batch == BatchConfig() and cfg.parasail == ParasailBatchConfig()


def test_an_empty_batch_section_sets_no_key_so_batch_variables_apply(tmp_path: Path) -> None:
    env = {"BATCH_NUM_WORKERS": "7"}
    for section in ("batch:\n", "batch: null\n", "batch: {}\n"):
        text = f"base_url: {URL}\nmodel: m\n{section}"
        assert MinimaLlmConfig.from_yaml(write(tmp_path, text), environ=env).batch.num_workers == 7


def test_from_yaml_max_failures_none_as_the_env_var_spells_it(tmp_path: Path) -> None:
    text = f"base_url: {URL}\nmodel: m\nbatch:\n  max_failures: none\n"
    assert MinimaLlmConfig.from_yaml(write(tmp_path, text)).batch.max_failures is None


def test_from_yaml_that_is_not_utf8_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "latin1.yaml"
    path.write_bytes(f"base_url: {URL}\nmodel: caf\xe9\n".encode("latin-1"))
    with pytest.raises(ConfigError, match="UTF-8"):
        MinimaLlmConfig.from_yaml(path)


def test_whole_numbers_for_float_fields_become_floats(tmp_path: Path) -> None:
    # Failure reports print timeout=60.0s (reference 002), not the 60s an int would give.
    text = f"base_url: {URL}\nmodel: m\ntimeout_s: 60\nbatch:\n  stall_s: 10\n"
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, text))
    assert type(cfg.timeout_s) is float and type(cfg.batch.stall_s) is float
    assert type(ParasailBatchConfig(poll_interval_s=5).poll_interval_s) is float
    assert type(cfg.max_outstanding) is int and cfg.batch.num_workers == 64


@pytest.mark.parametrize(
    ("environ", "expected"),
    [({"OPENAI_API_KEY": "from-env"}, "from-env"), ({"OPENAI_TOKEN": "tok"}, "tok")],
)
def test_from_yaml_api_key_falls_back_to_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, environ: dict[str, str], expected: str
) -> None:
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    monkeypatch.delenv("OPENAI_TOKEN", raising=False)
    for var, value in environ.items():
        monkeypatch.setenv(var, value)
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, f"base_url: {URL}\nmodel: m\n"))
    assert cfg.api_key == expected


@pytest.mark.parametrize(
    ("text", "field"),
    [
        (f"base_url: {URL}\nmodel: m\nbogus: 1\n", "config.bogus"),
        (f"base_url: {URL}\nmodel: m\nparasail: {{poll: 1}}\n", "parasail.poll"),
        (f"base_url: {URL}\nmodel: m\nrpm: -3\n", "rpm"),
        ("- a\n- b\n", "yaml"),
        ("model: m\n", "config.base_url"),
    ],
)
def test_from_yaml_errors(tmp_path: Path, text: str, field: str) -> None:
    with pytest.raises(ConfigError) as info:
        MinimaLlmConfig.from_yaml(write(tmp_path, text), environ={})
    assert info.value.field == field


def test_from_yaml_takes_what_the_file_leaves_out_from_the_environment(tmp_path: Path) -> None:
    # As minima-llm 0.2.x did: the file holds the project's settings, the job the rest.
    env = {
        "OPENAI_BASE_URL": "http://from-env:1/v1",
        "OPENAI_MODEL": "env-model",
        "CACHE_DIR": str(tmp_path / "env-cache"),
        "CACHE_FORCE_REFRESH": "1",
        "RPM": "not a number",  # the file sets rpm: this variable is never read
        "BATCH_NUM_WORKERS": "7",
        "BATCH_HEARTBEAT_S": "not read either",
    }
    text = "model: file-model\nrpm: 30\nbatch:\n  heartbeat_s: 5\n"
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, text), environ=env)
    assert (cfg.base_url, cfg.model, cfg.rpm) == ("http://from-env:1/v1", "file-model", 30)
    assert cfg.cache_dir == str(tmp_path / "env-cache") and cfg.force_refresh
    assert (cfg.batch.num_workers, cfg.batch.heartbeat_s) == (7, 5.0)
    # What the file says wins, an explicit null included.
    text = (
        f"base_url: {URL}\nmodel: m\ncache_dir: null\nforce_refresh: false\n"
        "batch:\n  heartbeat_s: 1\n"
    )
    with pytest.raises(ConfigError) as info:  # a bad variable for a key left out is an error
        MinimaLlmConfig.from_yaml(write(tmp_path, text), environ=env)
    assert info.value.field == "RPM"
    cfg = MinimaLlmConfig.from_yaml(write(tmp_path, text + "rpm: 0\n"), environ=env)
    assert (cfg.base_url, cfg.cache_dir, cfg.force_refresh) == (URL, None, False)


def test_the_trace_file_variable_applies_however_the_config_is_built(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("MINIMA_TRACE_FILE", str(trace))
    assert MinimaLlmConfig(base_url=URL, model="m").trace_file == str(trace)
    assert MinimaLlmConfig.from_dict({"base_url": URL, "model": "m"}).trace_file == str(trace)
    assert MinimaLlmConfig(base_url=URL, model="m", trace_file=None).trace_file is None
    monkeypatch.setenv("MINIMA_TRACE_FILE", " ")
    assert MinimaLlmConfig(base_url=URL, model="m").trace_file is None


@pytest.mark.parametrize(
    "text",
    [
        f'base_url: {URL}\nmodel: m\napi_key: "{SECRET}\nrpm: 3\n',  # unclosed quote
        f"base_url: {URL}\nmodel: m\napi_key: {SECRET}\n\trpm: 3\n",  # a tab indent
        f"base_url: {URL}\nmodel: m\napi_key: {SECRET}\n  rpm: : 3\n",
        f"base_url: {URL}\nmodel: m\napi_key: *{SECRET}\n",  # PyYAML quotes an alias name
        f"base_url: {URL}\nmodel: m\napi_key: !{SECRET} x\n",  # and a tag
    ],
)
def test_from_yaml_syntax_error_is_a_config_error_without_the_key(
    tmp_path: Path, text: str
) -> None:
    # Callers catch ConfigError (a ValueError) for bad config; PyYAML's own errors are neither.
    with pytest.raises(ConfigError) as info:
        MinimaLlmConfig.from_yaml(write(tmp_path, text))
    assert info.value.field == "yaml" and "line" in str(info.value)
    assert SECRET not in str(info.value)


# --- convenience properties and URLs --------------------------------------------------


@pytest.mark.parametrize("name", BATCH_DEFAULTS)
def test_convenience_properties_read_batch(name: str) -> None:
    batch = BatchConfig(
        num_workers=3,
        max_failures=4,
        heartbeat_s=5.0,
        stall_s=6.0,
        print_first_failures=7,
        keep_failure_summaries=8,
    )
    cfg = make(batch=batch)
    assert getattr(cfg, name) == getattr(batch, name)
    assert getattr(cfg, name) != BATCH_DEFAULTS[name]


@pytest.mark.parametrize(
    ("given", "expected"),
    [
        ("http://localhost:8000", "http://localhost:8000/v1"),
        ("http://localhost:8000/", "http://localhost:8000/v1"),
        ("http://localhost:8000/v1", "http://localhost:8000/v1"),
        ("http://localhost:8000/v1/", "http://localhost:8000/v1"),
        ("http://localhost:8000/v1//", "http://localhost:8000/v1"),
        ("https://api.openai.com/v1", "https://api.openai.com/v1"),
        ("https://host/openai/v2", "https://host/openai/v2"),
        ("https://host/api", "https://host/api/v1"),
    ],
)
def test_base_url_normalisation(given: str, expected: str) -> None:
    assert normalize_base_url(given) == expected
    cfg = MinimaLlmConfig(base_url=given, model="m")
    assert cfg.base_url == expected
    assert cfg.chat_completions_url == expected + "/chat/completions"


@pytest.mark.parametrize(
    ("dirs", "expected"),
    [
        (None, ()),
        ([], ()),
        (["/a", Path("/b")], ("/a", "/b")),
        (iter(["/c"]), ("/c",)),
        ("/a,/b", ("/a", "/b")),
        (f" /a{os.pathsep}/b ,", ("/a", "/b")),
        ("", ()),
    ],
)
def test_cache_lookup_dirs_forms(dirs: Any, expected: tuple[str, ...]) -> None:
    assert make(cache_lookup_dirs=dirs).cache_lookup_dirs == expected


def test_cache_path() -> None:
    assert make().cache_path is None
    assert make(cache_dir=Path("/tmp/c")).cache_path == Path("/tmp/c/minima_llm.db")
    assert make(cache_dir=Path("/tmp/c")).cache_dir == "/tmp/c"


# --- secrets ---------------------------------------------------------------------------


def test_api_key_is_masked_in_repr() -> None:
    cfg = make(api_key=SECRET)
    for text in (repr(cfg), str(cfg), repr(cfg.replace(rpm=1))):
        assert SECRET not in text
        assert "api_key='***'" in text
    assert "api_key=None" in repr(make())


@pytest.mark.parametrize(
    "build",
    [
        lambda: make(api_key=12345),
        lambda: make(api_key=SECRET, rpm=-1),
        lambda: make(api_key=SECRET, base_url="ftp://x"),
        lambda: make(api_key=SECRET + "\x01"),
        lambda: make(api_key=SECRET + "\u2019"),
        lambda: make(api_key=f"Bearer {SECRET}\r\nX-Injected: 1"),
        lambda: MinimaLlmConfig.from_dict({"base_url": URL, "model": "m", "apikey": SECRET}),
        lambda: MinimaLlmConfig.from_dict({"model": "m", "api_key": SECRET}),
        lambda: MinimaLlmConfig.from_env(
            environ={**BASE_ENV, "OPENAI_API_KEY": SECRET, "JITTER": "9"}
        ),
        lambda: MinimaLlmConfig.from_env(environ={"OPENAI_API_KEY": SECRET}),
    ],
)
def test_api_key_never_in_config_errors(build: Any) -> None:
    with pytest.raises(ConfigError) as info:
        build()
    assert SECRET not in str(info.value)
    assert "12345" not in str(info.value)
    assert SECRET not in repr(info.value.value)


@pytest.mark.parametrize(
    "var",
    [
        "RPM",
        "MAX_ATTEMPTS",
        "TIMEOUT_S",
        "MAX_OUTSTANDING",
        "JITTER",
        "CACHE_DIR",
        "MAX_RESPONSE_BYTES",
        "BATCH_NUM_WORKERS",
        "BATCH_MAX_FAILURES",
        "BATCH_HEARTBEAT_S",
    ],
)
@pytest.mark.parametrize("value", ["", "  "])
def test_an_empty_variable_means_unset(var: str, value: str) -> None:
    # KEY=${KEY} lines in compose files and job scripts set empty strings.
    assert env(**{var: value}) == env()


def test_an_empty_max_failures_keeps_the_default_not_none() -> None:
    assert env(BATCH_MAX_FAILURES="").batch.max_failures == 25
    assert env(BATCH_MAX_FAILURES="none").batch.max_failures is None


@pytest.mark.parametrize(
    "field",
    [
        "timeout_s",
        "base_backoff_s",
        "max_backoff_s",
        "cooldown_floor_s",
        "cooldown_cap_s",
        "cooldown_halflife_s",
    ],
)
@pytest.mark.parametrize("value", [float("inf"), float("-inf"), 1e400])
def test_an_infinite_value_is_refused_at_construction(field: str, value: float) -> None:
    with pytest.raises(ConfigError, match=rf"{field}=.*a finite number"):
        MinimaLlmConfig(base_url=URL, model="m", **{field: value})


@pytest.mark.parametrize("var", ["TIMEOUT_S", "MAX_BACKOFF_S", "COOLDOWN_CAP_S", "BATCH_STALL_S"])
def test_an_infinite_variable_is_refused(var: str) -> None:
    with pytest.raises(ConfigError, match="finite"):
        env(**{var: "inf"})


def test_api_key_read_from_a_file_loses_its_newline() -> None:
    assert make(api_key=f"  {SECRET}\n").api_key == SECRET
    env = {**BASE_ENV, "OPENAI_API_KEY": f"{SECRET}\n"}
    assert MinimaLlmConfig.from_env(environ=env).api_key == SECRET


@pytest.mark.parametrize(
    "url",
    [
        "http://h/deploy?api-version=2024-06-01",  # the path would land inside the query
        "http://h/v1#frag",
        "http://h/v1?",
    ],
)
def test_a_base_url_with_a_query_or_fragment_is_refused(url: str) -> None:
    with pytest.raises(ConfigError, match=r"without \?query or #fragment") as info:
        make(base_url=url)
    assert info.value.field == "base_url"
    assert "2024" not in info.value.value and "frag" not in info.value.value  # a key, maybe


@pytest.mark.parametrize(
    "url", ["http://user:pw-secret@h/v1", "https://user@h", "http://:pw-secret@h"]
)
def test_a_base_url_with_credentials_is_refused_without_showing_them(url: str) -> None:
    with pytest.raises(ConfigError, match="without user:password@") as info:
        make(base_url=url)
    assert "pw-secret" not in str(info.value) and "user" not in str(info.value.value)


def test_base_urls_that_are_valid_stay_valid() -> None:
    for url in ("http://[::1]:8000/v1", "https://api.example.com", "http://h:65535/v1/"):
        assert make(base_url=url).base_url.endswith("/v1")


# --- the README says what the code does ------------------------------------------------

README = (Path(__file__).parent.parent / "README.md").read_text(encoding="utf-8")


def test_readme_names_the_yaml_key_of_every_variable() -> None:
    # It said "the same names in lower case", which three client variables are not.
    sentence = README[README.index("YAML (and `from_dict`)") :].split(";")[0]
    keys_part, vars_part = sentence.split("except ")[1].split("(")
    exceptions = dict(
        zip(re.findall(r"`(\w+)`", vars_part), re.findall(r"`(\w+)`", keys_part), strict=True)
    )
    table = re.findall(r"^\| (`[A-Z_]+`[^|]*)\|", README, flags=re.MULTILINE)
    variables = {v for cell in table for v in re.findall(r"`([A-Z_]+)`", cell)}
    assert "CACHE_FORCE_REFRESH" in variables and "BATCH_STALL_S" in variables
    names = {f.name for f in dataclasses.fields(MinimaLlmConfig)}
    batch_names = {f.name for f in dataclasses.fields(BatchConfig)}
    for var in variables - {"OPENAI_TOKEN"}:  # the fallback of OPENAI_API_KEY
        if var.startswith("BATCH_"):
            assert var.removeprefix("BATCH_").lower() in batch_names, var
        else:
            assert exceptions.get(var, var.lower()) in names, var
