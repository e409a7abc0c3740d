"""Gateway settings: where to listen, who may call, and how requests are limited."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

from ..config import is_finite_number, known_keys
from ..errors import ConfigError

DEFAULT_PORT = 8990
_ON = frozenset({"1", "true", "yes", "on"})
_OFF = frozenset({"0", "false", "no", "off"})
DEFAULT_MAX_BODY = 8 * 1024 * 1024
# As many waiting requests as Envoy's default for pending requests: past it, a burst
# is refused with a 503 at once instead of queueing for minutes.
DEFAULT_MAX_QUEUED = 1024
_FLAGS = (
    "allow_unauthenticated",
    "partition_cache_by_key",
    "pass_through_client_key",
    "force_model",
    "strict_params",
    "verbose",
)


@dataclass(frozen=True)
class ProxySettings:
    """Settings for ``minimallm-proxy``; the upstream side is a ``MinimaLlmConfig``."""

    host: str = "127.0.0.1"
    port: int = DEFAULT_PORT
    api_keys: tuple[str, ...] = field(default=(), repr=False)
    allow_unauthenticated: bool = False
    partition_cache_by_key: bool = False
    pass_through_client_key: bool = False
    force_model: bool = False
    strict_params: bool = False
    max_body_bytes: int = DEFAULT_MAX_BODY
    # Requests that may wait for an upstream turn (cooldown, pacing or an in-flight slot);
    # a cache miss arriving when that many wait is answered 503 with Retry-After.
    max_queued: int = DEFAULT_MAX_QUEUED
    # How long an admitted cache miss may wait for its turn upstream before that 503.
    max_queue_wait_s: float = 60.0
    # After this many calls in a row find the upstream down (0: never), misses are
    # answered 503 at once instead of after their retries, and one call probes it after
    # breaker_reset_s (doubling, up to a minute, while the probes fail).
    breaker_failures: int = 5
    breaker_reset_s: float = 5.0
    log_every: int = 100
    verbose: bool = False
    shutdown_timeout_s: float = 30.0
    health_check_timeout_s: float = 2.0
    # How long the gateway waits on a client: for the rest of a request body, and for a
    # stream's reader to take data it has not taken. A client past it is disconnected.
    client_timeout_s: float = 60.0
    # Web pages allowed to call the gateway from a browser (CORS), as origins
    # ("https://app.example.com") or "*" for any; none by default, as browsers then refuse.
    cors_origins: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        object.__setattr__(self, "api_keys", _keys(self.api_keys))
        object.__setattr__(self, "cors_origins", _origins(self.cors_origins))
        if not isinstance(self.host, str) or not self.host:
            raise ConfigError("proxy.host", self.host, "a host name or IP address")
        for name in _FLAGS:
            # A quoted YAML "false" is a truthy string; allow_unauthenticated must not guess.
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"proxy.{name}", getattr(self, name), "true or false")
        _check_int("proxy.port", self.port, 0, 65535)
        _check_int("proxy.max_body_bytes", self.max_body_bytes, 1024, 2**31)
        _check_int("proxy.max_queued", self.max_queued, 1, 2**31)
        _check_int("proxy.log_every", self.log_every, 0, 2**31)
        _check_int("proxy.breaker_failures", self.breaker_failures, 0, 2**31)
        # An hour at most: a value meant in milliseconds would otherwise stop all
        # traffic for days after one outage.
        if is_finite_number(self.breaker_reset_s) and self.breaker_reset_s > 3600:
            raise ConfigError("proxy.breaker_reset_s", self.breaker_reset_s, "at most 3600 seconds")
        for name in (
            "shutdown_timeout_s",
            "health_check_timeout_s",
            "client_timeout_s",
            "max_queue_wait_s",
            "breaker_reset_s",
        ):
            value = getattr(self, name)
            # NaN passes no comparison and fires a timer at once; infinity never fires.
            if not is_finite_number(value) or value <= 0:
                raise ConfigError(f"proxy.{name}", value, "a finite number > 0")
        if self.partition_cache_by_key and not self.api_keys:
            raise ConfigError(
                "proxy.partition_cache_by_key", True, "needs proxy.api_keys to partition by"
            )

    @property
    def auth_enabled(self) -> bool:
        """Whether callers must present one of ``api_keys``."""
        return bool(self.api_keys)

    def check_exposure(self) -> None:
        """Refuse to listen beyond loopback, or to let any web page call, without API keys unless explicitly allowed."""
        if self.auth_enabled or self.allow_unauthenticated:
            return
        if "*" in self.cors_origins:
            # A browser is a local program: with any origin allowed, any page the user
            # opens reaches a loopback gateway too, and spends its upstream key.
            raise ConfigError(
                "proxy.cors_origins",
                "*",
                "the origins of the pages meant to call, unless API keys are configured"
                " (MINIMA_PROXY_API_KEYS) or --allow-unauthenticated is given",
            )
        if is_loopback(self.host):
            return
        raise ConfigError(
            "proxy.host",
            self.host,
            "a loopback address unless API keys are configured (MINIMA_PROXY_API_KEYS) "
            "or --allow-unauthenticated is given",
        )

    def __repr__(self) -> str:
        shown = ", ".join(
            f"{f.name}={getattr(self, f.name)!r}" for f in fields(self) if f.name != "api_keys"
        )
        return f"ProxySettings({shown}, api_keys=<{len(self.api_keys)} keys>)"

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any]) -> ProxySettings:
        """Build from a YAML ``proxy:`` section; unknown keys are an error."""
        return cls(**known_keys(cls, data, "proxy"))

    @staticmethod
    def env_overrides(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
        """Settings given by ``MINIMA_PROXY_*`` environment variables."""
        env = os.environ if environ is None else environ
        out: dict[str, Any] = {}
        if env.get("MINIMA_PROXY_API_KEYS"):
            out["api_keys"] = _split_keys(env["MINIMA_PROXY_API_KEYS"])
        if env.get("MINIMA_PROXY_CORS_ORIGINS"):
            try:
                out["cors_origins"] = _origins(env["MINIMA_PROXY_CORS_ORIGINS"])
            except ConfigError as exc:
                raise ConfigError("MINIMA_PROXY_CORS_ORIGINS", exc.value, exc.allowed) from None
        numbers: tuple[tuple[str, str, Callable[[str], Any], str], ...] = (
            ("MINIMA_PROXY_MAX_BODY_BYTES", "max_body_bytes", int, "an integer"),
            ("MINIMA_PROXY_MAX_QUEUED", "max_queued", int, "an integer"),
            ("MINIMA_PROXY_LOG_EVERY", "log_every", int, "an integer"),
            ("MINIMA_PROXY_CLIENT_TIMEOUT_S", "client_timeout_s", float, "a number"),
            ("MINIMA_PROXY_MAX_QUEUE_WAIT_S", "max_queue_wait_s", float, "a number"),
            ("MINIMA_PROXY_BREAKER_FAILURES", "breaker_failures", int, "an integer"),
            ("MINIMA_PROXY_BREAKER_RESET_S", "breaker_reset_s", float, "a number"),
        )
        for var, name, parse, allowed in numbers:
            if env.get(var):
                try:
                    out[name] = parse(env[var])
                except ValueError as exc:
                    raise ConfigError(var, env[var], allowed) from exc
        for var, name in (
            ("MINIMA_PROXY_PARTITION_CACHE", "partition_cache_by_key"),
            ("MINIMA_PROXY_PASS_THROUGH_KEY", "pass_through_client_key"),
            ("MINIMA_PROXY_STRICT_PARAMS", "strict_params"),
        ):
            if env.get(var):
                word = env[var].strip().lower()
                if word not in _ON and word not in _OFF:
                    # A typo must not quietly mean "off": partitioning guards tenants' answers.
                    raise ConfigError(var, env[var], "one of 1/0, true/false, yes/no, on/off")
                out[name] = word in _ON
        return out


def is_loopback(host: str) -> bool:
    """Whether ``host`` only accepts local connections."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _keys(value: Any) -> tuple[str, ...]:
    if value is None:  # what YAML gives for an empty "api_keys:" line
        return ()
    if isinstance(value, str):
        return _split_keys(value)
    keys = tuple(value) if isinstance(value, (list, tuple, set, frozenset)) else None
    if keys is None or not all(isinstance(k, str) and k for k in keys):
        raise ConfigError("proxy.api_keys", "<hidden>", "a list of non-empty strings")
    return keys


# What a browser sends as Origin: a scheme, a host and maybe a port; no path, no slash.
_ORIGIN = re.compile(
    r"https?://[A-Za-z0-9.\-]+(:[0-9]{1,5})?|https?://\[[0-9A-Fa-f:.]+\](:[0-9]{1,5})?"
)


def _origins(value: Any) -> tuple[str, ...]:
    """Allowed CORS origins, lower-cased as browsers send them; "*" for any."""
    if value is None:
        return ()
    items = value.split(",") if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not all(isinstance(o, str) for o in items):
        raise ConfigError(
            "proxy.cors_origins", value, "a list of origins, or a comma-separated string"
        )
    origins = []
    for item in items:
        origin = item.strip().rstrip("/").lower()
        if not origin:
            continue
        if origin != "*" and not _ORIGIN.fullmatch(origin):
            raise ConfigError(
                "proxy.cors_origins",
                item,
                "an origin such as https://app.example.com (scheme, host, optional port; no path),"
                " or *",
            )
        origins.append(origin)
    return tuple(origins)


def _split_keys(text: str) -> tuple[str, ...]:
    return tuple(k.strip() for k in text.split(",") if k.strip())


def _check_int(name: str, value: Any, low: int, high: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise ConfigError(name, value, f"an integer from {low} to {high}")
