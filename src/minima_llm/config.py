"""Configuration values: explicit, from the environment, from YAML or from a dict.

Every value is checked when the config is built; a bad one raises ``ConfigError``
naming the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import re
from collections.abc import Callable, Collection, Iterable, Mapping
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from .errors import ConfigError

TRANSPORTS = ("auto", "stdlib", "aiohttp", "asyncio")
# A per-request timeout past a day is a mistake, and sockets overflow on very large ones.
MAX_TIMEOUT_S = 86_400.0
# Far past any real completion (a long answer with logprobs is a few MiB), yet it stops a
# broken or hostile upstream (or a gzip bomb) from taking the process's memory.
DEFAULT_MAX_RESPONSE_BYTES = 256 * 2**20
_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"0", "false", "no", "off", ""}
_VERSION_SEGMENT = re.compile(r"/v\d+[a-z0-9]*$")


def _check_path(owner: Any, attr: str, name: str, note: str = "", kind: str = "directory") -> None:
    """A path field: None, a str or a PathLike, kept as an absolute str ("" stays "": off).

    Checked when the config is built: a number or bytes would otherwise pass until
    the backend is built, and fail there as a bare TypeError from pathlib.
    """
    value = getattr(owner, attr)
    allowed = f"a {kind} path or None {note}".rstrip()
    _check(value is None or isinstance(value, (str, os.PathLike)), name, value, allowed)
    if value is not None:
        object.__setattr__(owner, attr, _absolute(os.fspath(value), name))


def _absolute(path: str, name: str) -> str:
    """``path`` with ``~`` expanded, made absolute against the current directory now.

    The cache store opens and re-checks its file long after the config is built; a
    relative path read then follows a later ``os.chdir`` to another directory (and a
    false "cache file was deleted or replaced"). A YAML ``cache_dir: ~/cache`` (no
    shell to expand it) would otherwise be a directory named ``~`` under each job's
    working directory: every job of an array its own empty cache. Symlinks are left
    alone, and "" is no path: it means "none".
    """
    if not path:
        return path
    expanded = os.path.expanduser(path)
    # HOME unset and no passwd entry for this uid (a container's): expanduser gives up.
    _check(
        not expanded.startswith("~"),
        name,
        path,
        "a path whose ~ can be expanded (HOME is unset, or no such user)",
    )
    return os.path.abspath(expanded)


def _check(ok: bool, name: str, value: Any, allowed: str) -> None:
    if not ok:
        raise ConfigError(name, value, allowed)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _is_num(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _check_int(name: str, value: Any, minimum: int) -> None:
    _check(_is_int(value) and value >= minimum, name, value, f"an integer >= {minimum}")


def _as_declared(cls: type, name: str, value: Any) -> Any:
    """An int given for a float field, as a float: failure reports print timeout=60.0s."""
    if type(value) is int and name in _float_fields(cls):
        return float(value)
    return value


def _floats_as_declared(config: Any) -> None:
    for name in _float_fields(type(config)):
        object.__setattr__(config, name, _as_declared(type(config), name, getattr(config, name)))


def _float_fields(cls: Any) -> frozenset[str]:
    # Annotations are strings here (postponed evaluation): "float" is exactly the float fields.
    return frozenset(f.name for f in fields(cls) if f.type == "float")


def is_finite_number(value: Any) -> bool:
    """An int or float (never a bool) that is neither NaN nor infinite, nor past a float's range."""
    if not _is_num(value):
        return False
    try:
        return math.isfinite(value)
    except OverflowError:  # an int of hundreds of digits (YAML allows them)
        return False


def _check_float(name: str, value: Any, minimum: float, strict: bool = False) -> None:
    # Infinity passes a >= check, then overflows a timer or makes a wait unbounded.
    ok = is_finite_number(value)
    ok = ok and (value > minimum if strict else value >= minimum)
    _check(ok, name, value, f"a finite number {'>' if strict else '>='} {minimum}")


@dataclass
class BatchConfig:
    """How the batch runner drives work: workers, progress, failure limits.

    Mutable on purpose: programs written for minima-llm set
    ``config.batch.max_failures = 10`` before a run. Every assignment is validated.
    """

    num_workers: int = 64
    max_failures: int | None = 25
    heartbeat_s: float = 10.0
    stall_s: float = 300.0
    print_first_failures: int = 5
    keep_failure_summaries: int = 20

    def __setattr__(self, name: str, value: Any) -> None:
        # A misspelt field (``config.batch.max_failure = 10``) would otherwise be
        # stored and silently ignored by the runner.
        if name not in _BATCH_FIELDS:
            raise AttributeError(f"BatchConfig has no field {name!r}")
        if name == "max_failures" and isinstance(value, str) and value.strip().lower() == "none":
            value = None  # YAML reads none as a string; the env var spells "never" so too
        _validate_batch_field(name, value)
        super().__setattr__(name, _as_declared(BatchConfig, name, value))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> BatchConfig:
        """Read the ``BATCH_*`` variables; unset ones keep their defaults."""
        env = os.environ if environ is None else environ
        return cls(**_env_kwargs(env, _BATCH_ENV))

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> BatchConfig:
        """Build from a mapping of field names; unknown keys are an error."""
        return cls(**known_keys(cls, data, "batch"))


_BATCH_FIELDS = frozenset(f.name for f in fields(BatchConfig))


def _validate_batch_field(name: str, value: Any) -> None:
    if name == "num_workers":
        _check_int(name, value, 1)
    elif name == "max_failures":
        _check(
            value is None or (_is_int(value) and value >= 0), name, value, "None or an integer >= 0"
        )
    elif name in ("heartbeat_s", "stall_s"):
        _check_float(name, value, 0.0)
    elif name in ("print_first_failures", "keep_failure_summaries"):
        _check_int(name, value, 0)


@dataclass(frozen=True)
class ParasailBatchConfig:
    """Settings for provider batch jobs (OpenAI / Parasail batch API)."""

    llm_batch_prefix: str | None = None
    state_dir: str | None = None
    poll_interval_s: float = 30.0
    max_poll_hours: float = 24.0

    def __post_init__(self) -> None:
        _check(
            self.llm_batch_prefix is None or isinstance(self.llm_batch_prefix, str),
            "parasail.llm_batch_prefix",
            self.llm_batch_prefix,
            "a string or None",
        )
        _check_path(self, "state_dir", "parasail.state_dir", "(None: cache_dir)")
        _check_float("parasail.poll_interval_s", self.poll_interval_s, 0.0, strict=True)
        _check_float("parasail.max_poll_hours", self.max_poll_hours, 0.0, strict=True)
        _floats_as_declared(self)

    @property
    def enabled(self) -> bool:
        """Batch mode is on when a prefix names the job's state files."""
        return bool(self.llm_batch_prefix)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> ParasailBatchConfig:
        """Build from a mapping of field names; unknown keys are an error."""
        return cls(**known_keys(cls, data, "parasail"))


@dataclass(frozen=True)
class MinimaLlmConfig:
    """Where to send requests, how hard to push, how to retry, where to cache."""

    base_url: str
    model: str
    api_key: str | None = field(default=None, repr=False)
    cache_dir: str | None = None
    max_outstanding: int = 32
    rpm: int = 600
    timeout_s: float = 60.0
    max_attempts: int = 6
    base_backoff_s: float = 0.5
    max_backoff_s: float = 20.0
    jitter: float = 0.2
    cooldown_floor_s: float = 0.0
    cooldown_cap_s: float = 30.0
    cooldown_halflife_s: float = 20.0
    compress_gzip: bool = False
    force_refresh: bool = False
    # The tracer is switched on from outside whatever builds the config (reference 000:
    # "MINIMA_TRACE_FILE=trace.jsonl python my_script.py"); trace_file=None turns it off.
    trace_file: str | None = field(default_factory=lambda: _trace_file_from_env(os.environ))
    model_synonyms: Mapping[str, tuple[str, ...]] = field(default_factory=dict)
    cache_lookup_dirs: tuple[str, ...] = ()
    memory_cache_entries: int = 0
    transport: str = "auto"
    max_response_bytes: int = DEFAULT_MAX_RESPONSE_BYTES
    batch: BatchConfig = field(default_factory=BatchConfig)
    parasail: ParasailBatchConfig = field(default_factory=ParasailBatchConfig)

    def __post_init__(self) -> None:
        _check(
            isinstance(self.base_url, str) and bool(self.base_url),
            "base_url",
            self.base_url,
            "a non-empty http(s) URL",
        )
        # Every refusal shows the URL with any user:password@ masked: a password there
        # must not reach a log through a scheme or port error either.
        shown = _masked_url(self.base_url)
        _check(
            self.base_url.startswith(("http://", "https://")),
            "base_url",
            shown,
            "a URL starting with http:// or https://",
        )
        _check(
            _is_sendable_url(self.base_url),
            "base_url",
            shown,
            "an http(s) URL with a host, a port from 1 to 65535 if any, and no spaces",
        )
        _check_url_parts(self.base_url)
        object.__setattr__(self, "base_url", normalize_base_url(self.base_url))
        _check(
            # Not stripped: a program passing a model gets exactly that model in its keys.
            isinstance(self.model, str) and bool(self.model.strip()),
            "model",
            self.model,
            "a model name that is not blank",
        )
        _check(
            self.api_key is None or isinstance(self.api_key, str),
            "api_key",
            "<hidden>",
            "a string or None",
        )
        if self.api_key is not None:
            # A key read from a file or $(cat key) keeps its newline; no key has one.
            object.__setattr__(self, "api_key", self.api_key.strip())
            _check(
                is_header_safe(self.api_key),
                "api_key",
                "<hidden>",
                "printable ASCII characters (it is sent in an HTTP header)",
            )
        _check_path(self, "cache_dir", "cache_dir")
        _check_path(self, "trace_file", "trace_file", kind="file")
        _check_int("max_outstanding", self.max_outstanding, 1)
        _check_int("memory_cache_entries", self.memory_cache_entries, 0)
        _check_int("rpm", self.rpm, 0)
        _check_float("timeout_s", self.timeout_s, 0.0, strict=True)
        _check(
            self.timeout_s <= MAX_TIMEOUT_S,
            "timeout_s",
            self.timeout_s,
            f"at most {MAX_TIMEOUT_S:g} seconds (a day)",
        )
        _check_int("max_attempts", self.max_attempts, 0)
        _check_float("base_backoff_s", self.base_backoff_s, 0.0)
        _check_float("max_backoff_s", self.max_backoff_s, 0.0)
        _check_not_above(self, "base_backoff_s", "max_backoff_s")
        _check(
            _is_num(self.jitter) and 0.0 <= self.jitter <= 1.0,
            "jitter",
            self.jitter,
            "a number from 0 to 1",
        )
        _check_float("cooldown_floor_s", self.cooldown_floor_s, 0.0)
        _check_float("cooldown_cap_s", self.cooldown_cap_s, 0.0)
        _check_not_above(self, "cooldown_floor_s", "cooldown_cap_s")
        _check_float("cooldown_halflife_s", self.cooldown_halflife_s, 0.0, strict=True)
        _check(
            isinstance(self.compress_gzip, bool),
            "compress_gzip",
            self.compress_gzip,
            "true or false",
        )
        _check(
            isinstance(self.force_refresh, bool),
            "force_refresh",
            self.force_refresh,
            "true or false",
        )
        _check(
            self.transport in TRANSPORTS,
            "transport",
            self.transport,
            f"one of {', '.join(TRANSPORTS)}",
        )
        _check(
            _is_int(self.max_response_bytes) and self.max_response_bytes >= 0,
            "max_response_bytes",
            self.max_response_bytes,
            "an integer >= 0 (bytes of one answer, decompressed; 0 means no cap)",
        )
        _floats_as_declared(self)
        object.__setattr__(self, "model_synonyms", synonym_groups(self.model_synonyms))
        object.__setattr__(self, "cache_lookup_dirs", _lookup_dirs(self.cache_lookup_dirs))
        # An empty "batch:" or "parasail:" section in YAML is None: the defaults, as for
        # an empty cache_lookup_dirs.
        if self.batch is None:
            object.__setattr__(self, "batch", BatchConfig())
        if self.parasail is None:
            object.__setattr__(self, "parasail", ParasailBatchConfig())
        if isinstance(self.batch, Mapping):
            object.__setattr__(self, "batch", BatchConfig.from_dict(self.batch))
        _check(isinstance(self.batch, BatchConfig), "batch", self.batch, "a BatchConfig")
        if isinstance(self.parasail, Mapping):
            object.__setattr__(self, "parasail", ParasailBatchConfig.from_dict(self.parasail))
        _check(
            isinstance(self.parasail, ParasailBatchConfig),
            "parasail",
            self.parasail,
            "a ParasailBatchConfig",
        )

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "api_key"
        )
        key = "'***'" if self.api_key else "None"
        return f"MinimaLlmConfig({shown}, api_key={key})"

    # Convenience views of the batch settings, kept for programs written against minima-llm.
    @property
    def num_workers(self) -> int:
        """``batch.num_workers``."""
        return self.batch.num_workers

    @property
    def max_failures(self) -> int | None:
        """``batch.max_failures``."""
        return self.batch.max_failures

    @property
    def heartbeat_s(self) -> float:
        """``batch.heartbeat_s``."""
        return self.batch.heartbeat_s

    @property
    def stall_s(self) -> float:
        """``batch.stall_s``."""
        return self.batch.stall_s

    @property
    def print_first_failures(self) -> int:
        """``batch.print_first_failures``."""
        return self.batch.print_first_failures

    @property
    def keep_failure_summaries(self) -> int:
        """``batch.keep_failure_summaries``."""
        return self.batch.keep_failure_summaries

    @property
    def chat_completions_url(self) -> str:
        """The full URL of the chat completions endpoint."""
        return self.base_url + "/chat/completions"

    @property
    def cache_path(self) -> Path | None:
        """``{cache_dir}/minima_llm.db``, or None when caching is off."""
        return Path(self.cache_dir) / "minima_llm.db" if self.cache_dir else None

    def replace(self, **changes: Any) -> MinimaLlmConfig:
        """A copy with some fields changed (validated like a new config).

        The mutable ``batch`` is copied too, so changing the copy's batch settings
        does not change this config's.
        """
        changes.setdefault("batch", dataclasses.replace(self.batch))
        return dataclasses.replace(self, **changes)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> MinimaLlmConfig:
        """Read every documented environment variable, with its documented default."""
        env = os.environ if environ is None else environ
        kwargs: dict[str, Any] = {}
        for var in ("OPENAI_BASE_URL", "OPENAI_MODEL"):
            if not env_set(env, var):
                raise ConfigError(var, env.get(var), "set this environment variable")
        # Stripped as every other variable is: "gpt-4o\r" from a CRLF .env file, or
        # "gpt-4o " from a job script, would be another model in every cache key.
        kwargs["base_url"] = env["OPENAI_BASE_URL"].strip()
        kwargs["model"] = env["OPENAI_MODEL"].strip()
        kwargs["api_key"] = _env_api_key(env)
        kwargs.update(_env_kwargs(env, _CLIENT_ENV))
        try:
            kwargs["batch"] = BatchConfig.from_env(env)
            return cls(**kwargs)
        except ConfigError as exc:
            raise _blame_variable(exc, env, _VARIABLE_OF) from None

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> MinimaLlmConfig:
        """Build from a mapping of field names (nested ``batch`` and ``parasail`` mappings)."""
        return cls(**known_keys(cls, data, "config"))

    @classmethod
    def from_yaml(
        cls, path: str | os.PathLike[str], environ: Mapping[str, str] | None = None
    ) -> MinimaLlmConfig:
        """Load a YAML file over the environment: a key the file leaves out takes its variable.

        As in minima-llm 0.2.x, so a file can hold what a project shares while a job
        script or a node sets the rest (``CACHE_DIR``, ``CACHE_FORCE_REFRESH``,
        ``OPENAI_API_KEY``). What the file says wins, and a variable for a key it sets
        is not read at all. A top-level ``proxy:`` section belongs to the gateway and
        is skipped here.
        """
        env = os.environ if environ is None else environ
        data = {k: v for k, v in read_yaml(path).items() if k not in _OTHER_SECTIONS}
        key = data.get("api_key")
        if not key or (isinstance(key, str) and not key.strip()):
            data["api_key"] = _env_api_key(env)
        client = _env_kwargs(env, _CLIENT_ENV, skip=data)
        for var, name in (("OPENAI_BASE_URL", "base_url"), ("OPENAI_MODEL", "model")):
            if name not in data and env_set(env, var):
                client[name] = env[var].strip()
        # The fields the environment gave: an error in one names its variable.
        from_env = {name: _VARIABLE_OF[name] for name in client}
        data = {**client, **data}
        batch = _env_kwargs(env, _BATCH_ENV, skip=data.get("batch") or {})
        if batch and (data.get("batch") is None or isinstance(data["batch"], Mapping)):
            data["batch"] = {**batch, **(data.get("batch") or {})}
            from_env.update((name, _VARIABLE_OF[name]) for name in batch)
        try:
            return cls.from_dict(data)
        except ConfigError as exc:
            raise _blame_variable(exc, env, from_env) from None


# Sections of a config file that other parts of the package read.
_OTHER_SECTIONS = ("proxy",)


def read_yaml(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The top-level mapping of a YAML config file."""
    try:
        import yaml
    except ImportError as exc:
        raise ImportError("YAML config needs PyYAML: pip install 'minima-llm[yaml]'") from exc
    with open(path, encoding="utf-8") as fh:
        try:
            data = yaml.safe_load(fh) or {}
        except yaml.YAMLError as exc:
            raise ConfigError("yaml", os.fspath(path), f"valid YAML ({_where(exc)})") from exc
        except UnicodeDecodeError as exc:
            raise ConfigError("yaml", os.fspath(path), f"UTF-8 text ({exc.reason})") from exc
    if not isinstance(data, Mapping):
        raise ConfigError("yaml", os.fspath(path), "a mapping of config fields at the top level")
    return dict(data)


def _where(exc: Exception) -> str:
    """Where PyYAML stopped, and nothing of what it read there.

    Its messages quote tokens of the broken line ("found undefined alias
    'sk-...'"), and that line may hold the API key.
    """
    mark = getattr(exc, "problem_mark", None) or getattr(exc, "context_mark", None)
    kind = type(exc).__name__
    return f"{kind} at line {mark.line + 1}, column {mark.column + 1}" if mark else kind


def _lookup_dirs(dirs: Any) -> tuple[str, ...]:
    # None is what YAML gives for an empty "cache_lookup_dirs:" line.
    dirs = () if dirs is None else dirs
    # A string is the variable's form ("/a:/b"), in YAML as in CACHE_LOOKUP_DIRS; never
    # its characters, which is what iterating it would give.
    if isinstance(dirs, str):
        items, ok = _split_dirs(dirs), True
    else:
        ok = isinstance(dirs, Iterable) and not isinstance(dirs, bytes)
        # A blank entry would be the current directory at each open: dropped, as in the string.
        items = tuple(d for d in dirs if not (isinstance(d, str) and not d.strip())) if ok else ()
    _check(
        ok and all(isinstance(d, (str, os.PathLike)) for d in items),
        "cache_lookup_dirs",
        dirs,
        f"a list of directory paths, or one string of them separated by ',' or {os.pathsep!r}",
    )
    return tuple(_absolute(os.fspath(d), "cache_lookup_dirs") for d in items)


def _split_dirs(text: str) -> tuple[str, ...]:
    """The directories in a ``,``- or ``os.pathsep``-separated list, blanks dropped."""
    parts: Iterable[str] = (p for chunk in text.split(",") for p in chunk.split(os.pathsep))
    return tuple(p.strip() for p in parts if p.strip())


def _check_not_above(config: Any, low: str, high: str) -> None:
    """``low`` <= ``high``; the error names the field moved off its default, and both values.

    A ``BASE_BACKOFF_S=30`` alone used to be reported as a bad ``max_backoff_s``,
    a value the user never set.
    """
    low_value, high_value = getattr(config, low), getattr(config, high)
    if low_value <= high_value:
        return
    defaults = {f.name: f.default for f in fields(config)}
    if high_value == defaults[high] and low_value != defaults[low]:
        raise ConfigError(low, low_value, f"at most {high} ({high_value})")
    raise ConfigError(high, high_value, f"at least {low} ({low_value})")


def is_header_safe(value: str) -> bool:
    """Whether ``value`` can go in an HTTP header unchanged by any transport: printable ASCII."""
    return value.isascii() and value.isprintable()


def _is_sendable_url(url: str) -> bool:
    if any(c.isspace() or not c.isprintable() for c in url):
        return False
    try:
        parts = urlsplit(url)
        port = parts.port  # raises ValueError for a port that is not a number or past 65535
    except ValueError:
        return False
    return bool(parts.hostname) and port != 0


def _check_url_parts(url: str) -> None:
    """Refuse what a base URL cannot carry: the endpoint path is appended to it."""
    parts = urlsplit(url)
    if parts.username is not None or parts.password is not None:
        # The transports would differ (aiohttp sends it as Basic auth, the others drop it).
        raise ConfigError(
            "base_url", _masked_url(url), "a URL without user:password@ (the key goes in api_key)"
        )
    if parts.query or parts.fragment or url.endswith(("?", "#")):
        # "/chat/completions" would land inside the query ("?api-version=1/v1/chat/...").
        # Shown without it: a query may carry a key ("?key=...").
        cut = min(i for i in (url.find("?"), url.find("#"), len(url)) if i >= 0)
        raise ConfigError(
            "base_url",
            url[:cut] + url[cut : cut + 1] + "...",
            "a URL without ?query or #fragment (the endpoint path is appended to it)",
        )


def _masked_url(url: str) -> str:
    """``url`` with everything between its scheme and its last ``@`` as ``***``.

    Not by ``urlsplit``'s authority: a raw password holding ``/``, ``?`` or ``#``
    ends the authority early, and ``http:/user:pw@host`` has none at all.
    """
    if "@" not in url:
        return url
    scheme, colon, rest = url.partition(":")
    if not colon or not scheme.isalpha():
        return "***@" + url.rpartition("@")[2]
    slashes = len(rest) - len(rest.lstrip("/\\"))
    return f"{scheme}:{rest[:slashes]}***@{rest.rpartition('@')[2]}"


def normalize_base_url(url: str) -> str:
    """Strip trailing slashes and add ``/v1`` unless the path already ends in a version."""
    url = url.rstrip("/")
    return url if _VERSION_SEGMENT.search(url) else url + "/v1"


def synonym_groups(spec: Mapping[str, Any] | str | None) -> dict[str, tuple[str, ...]]:
    """Normalise model synonyms so every name maps to all its equivalents.

    Accepts a mapping ``{name: alias | [aliases]}`` or the env form
    ``"a=b|c,d=e"`` (or a JSON object). Synonymy is symmetric and transitive.
    """
    if spec is None or spec == "":
        return {}
    if isinstance(spec, str):
        spec = _parse_synonym_string(spec)
    _check(isinstance(spec, Mapping), "model_synonyms", spec, "a mapping of model -> aliases")
    parent: dict[str, str] = {}

    def find(x: str) -> str:
        while parent.setdefault(x, x) != x:
            x = parent[x]
        return x

    for name, aliases in spec.items():
        alias_list = _alias_list(aliases)
        for alias in alias_list:
            _check(
                isinstance(alias, str) and bool(alias),
                "model_synonyms",
                spec,
                "model names as strings",
            )
            parent[find(alias)] = find(str(name))
        find(str(name))
    groups: dict[str, list[str]] = {}
    for name in parent:
        groups.setdefault(find(name), []).append(name)
    return {
        name: tuple(other for other in members if other != name)
        for members in groups.values()
        for name in members
        if len(members) > 1
    }


def _alias_list(aliases: Any) -> list[Any]:
    """One alias, several, or None; anything else is returned as is for the caller to reject."""
    if aliases is None:
        return []
    if isinstance(aliases, str) or not isinstance(aliases, Iterable):
        return [aliases]
    return list(aliases)


def _parse_synonym_string(text: str) -> Mapping[str, Any]:
    text = text.strip()
    if text.startswith("{"):
        try:
            parsed = json.loads(text)
        except json.JSONDecodeError as exc:
            raise ConfigError("MODEL_SYNONYMS", text, "a JSON object or 'a=b|c,d=e'") from exc
        if not isinstance(parsed, dict):
            raise ConfigError("MODEL_SYNONYMS", text, "a JSON object or 'a=b|c,d=e'")
        return parsed
    result: dict[str, list[str]] = {}
    for part in filter(None, (p.strip() for p in text.split(","))):
        name, sep, aliases = part.partition("=")
        if not sep or not name.strip() or not aliases.strip():
            raise ConfigError("MODEL_SYNONYMS", text, "comma-separated 'model=alias|alias' pairs")
        result.setdefault(name.strip(), []).extend(
            a.strip() for a in aliases.split("|") if a.strip()
        )
    return result


def known_keys(cls: type, data: Mapping[str, Any], where: str) -> dict[str, Any]:
    """``data`` as keyword arguments of dataclass ``cls``; an unknown or missing key is a ``ConfigError``."""
    allowed = {f.name for f in fields(cls)}
    unknown = sorted(set(data) - allowed)
    if unknown:
        known = _key_for_variable(where, unknown[0]) or ", ".join(sorted(allowed))
        # The value is not echoed: a misspelt key ("openai_api_key") may hold a secret.
        raise ConfigError(f"{where}.{unknown[0]}", "<hidden>", f"a known key ({known})")
    required = [
        f.name
        for f in fields(cls)
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]
    for name in required:
        if name not in data:
            raise ConfigError(f"{where}.{name}", None, "a value (this key is required)")
    return dict(data)


def _trace_file_from_env(env: Mapping[str, str]) -> str | None:
    return env["MINIMA_TRACE_FILE"].strip() if env_set(env, "MINIMA_TRACE_FILE") else None


def _env_kwargs(
    env: Mapping[str, str],
    table: tuple[tuple[str, str, Callable[[str, str], Any]], ...],
    skip: Collection[str] = (),
) -> dict[str, Any]:
    """The fields ``table`` maps from the variables set in ``env``, except those in ``skip``."""
    return {
        name: parse(var, env[var])
        for var, name, parse in table
        if name not in skip and env_set(env, var)
    }


def _blame_variable(
    exc: ConfigError, env: Mapping[str, str], names: Mapping[str, str]
) -> ConfigError:
    """``exc`` naming the variable its value came from, when ``names`` maps its field to one set in ``env``.

    The value stays the one checked, as the field's own error showed it (credentials
    in a URL masked).
    """
    var = names.get(exc.field)
    if var is None or not env_set(env, var):
        return exc
    return ConfigError(var, exc.value, exc.allowed)


def _key_for_variable(where: str, key: str) -> str | None:
    """The key to write for one spelt as its variable in lower case (``minima_transport``).

    Most keys are their variable's name in lower case, so such a spelling is a likely
    mistake; the key list alone does not say which key holds that variable's value.
    """
    batch = {var: name for var, name, _ in _BATCH_ENV}
    if where == "batch":
        names = batch
    elif where == "config":
        client = {var: name for var, name, _ in _CLIENT_ENV}
        in_section = {var: f"{name} in the batch: section" for var, name in batch.items()}
        names = {**_REQUIRED_ENV, **client, **in_section}
    else:
        return None
    var = key.upper()
    return f"the key for {var} is {names[var]}" if var in names else None


def _env_api_key(env: Mapping[str, str]) -> str | None:
    """``OPENAI_API_KEY``, else ``OPENAI_TOKEN``; a blank one counts as unset."""
    return next((env[v] for v in ("OPENAI_API_KEY", "OPENAI_TOKEN") if env_set(env, v)), None)


def env_set(env: Mapping[str, str], var: str) -> bool:
    """Whether ``var`` is set to something other than blanks.

    ``KEY=`` lines in compose files and job scripts (``RPM=${RPM}`` with RPM unset)
    mean "not set", as in minima-llm 0.2.x.
    """
    return bool(env.get(var, "").strip())


def _env_int(var: str, text: str) -> int:
    try:
        return int(text.strip())
    except ValueError as exc:
        raise ConfigError(var, text, "an integer") from exc


def _env_float(var: str, text: str) -> float:
    try:
        return float(text.strip())
    except ValueError as exc:
        raise ConfigError(var, text, "a number") from exc


def _env_bool(var: str, text: str) -> bool:
    low = text.strip().lower()
    if low in _TRUE:
        return True
    if low in _FALSE:
        return False
    raise ConfigError(var, text, "one of 1/0, true/false, yes/no, on/off")


def _env_opt_str(var: str, text: str) -> str | None:
    return text.strip() or None


def _env_opt_int(var: str, text: str) -> int | None:
    return None if text.strip().lower() in ("none", "") else _env_int(var, text)


def _env_dirs(var: str, text: str) -> tuple[str, ...]:
    return _split_dirs(text)


def _env_str(var: str, text: str) -> str:
    return text.strip()


_REQUIRED_ENV = {
    "OPENAI_BASE_URL": "base_url",
    "OPENAI_MODEL": "model",
    "OPENAI_API_KEY": "api_key",
    "OPENAI_TOKEN": "api_key",
}

_CLIENT_ENV = (
    ("CACHE_DIR", "cache_dir", _env_opt_str),
    ("MAX_OUTSTANDING", "max_outstanding", _env_int),
    ("RPM", "rpm", _env_int),
    ("TIMEOUT_S", "timeout_s", _env_float),
    ("MAX_ATTEMPTS", "max_attempts", _env_int),
    ("BASE_BACKOFF_S", "base_backoff_s", _env_float),
    ("MAX_BACKOFF_S", "max_backoff_s", _env_float),
    ("JITTER", "jitter", _env_float),
    ("COOLDOWN_FLOOR_S", "cooldown_floor_s", _env_float),
    ("COOLDOWN_CAP_S", "cooldown_cap_s", _env_float),
    ("COOLDOWN_HALFLIFE_S", "cooldown_halflife_s", _env_float),
    ("COMPRESS_GZIP", "compress_gzip", _env_bool),
    ("CACHE_FORCE_REFRESH", "force_refresh", _env_bool),
    ("MINIMA_TRACE_FILE", "trace_file", _env_opt_str),
    ("MODEL_SYNONYMS", "model_synonyms", _env_str),
    ("CACHE_LOOKUP_DIRS", "cache_lookup_dirs", _env_dirs),
    ("MEMORY_CACHE_ENTRIES", "memory_cache_entries", _env_int),
    ("MINIMA_TRANSPORT", "transport", _env_str),
    ("MAX_RESPONSE_BYTES", "max_response_bytes", _env_int),
)

_BATCH_ENV = (
    ("BATCH_NUM_WORKERS", "num_workers", _env_int),
    ("BATCH_MAX_FAILURES", "max_failures", _env_opt_int),
    ("BATCH_HEARTBEAT_S", "heartbeat_s", _env_float),
    ("BATCH_STALL_S", "stall_s", _env_float),
    ("BATCH_PRINT_FIRST_FAILURES", "print_first_failures", _env_int),
    ("BATCH_KEEP_FAILURE_SUMMARIES", "keep_failure_summaries", _env_int),
)

# The variable each field is read from (the batch section's field names included: no
# name is in both tables). The API key is left out: its errors never show its value.
_VARIABLE_OF = {
    "base_url": "OPENAI_BASE_URL",
    "model": "OPENAI_MODEL",
    **{name: var for var, name, _ in _CLIENT_ENV + _BATCH_ENV},
}
