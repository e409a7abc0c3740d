"""Which HTTP proxy a request goes through: the standard ``*_proxy`` variables, decided without I/O.

The OpenAI SDK (httpx), requests and curl all honour ``HTTPS_PROXY``, ``HTTP_PROXY``,
``ALL_PROXY`` and ``NO_PROXY``; compute nodes and corporate containers often reach
the internet only that way. The rules here follow that common convention:

- the lower-case name wins over the upper-case one, even set empty; ``HTTP_PROXY`` is ignored when
  ``REQUEST_METHOD`` is set (a CGI request can set it: "httpoxy");
- ``https_proxy`` serves https URLs and ``http_proxy`` http ones, ``all_proxy`` both;
- ``no_proxy`` lists hosts (``example.com`` also covers its subdomains, a leading
  ``.`` or ``*.`` is the same), ``host:port``, IP addresses, CIDR blocks, or ``*``;
- this host (``localhost``, 127.0.0.0/8, ``::1``, ``0.0.0.0``) is never proxied: a
  local model server beside a proxy meant for the internet is the usual set-up on a cluster.

Only ``http://`` proxies are supported (https targets tunnel through them with
``CONNECT``); a proxy's ``user:password`` becomes a ``Proxy-Authorization`` header.
"""

from __future__ import annotations

import base64
import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from urllib.parse import unquote, urlsplit

from ..errors import ConfigError, TransportError

__all__ = ["Proxy", "ProxyRules", "tunnel_refusal_in", "tunnel_refused", "via"]

_Network = ipaddress.IPv4Network | ipaddress.IPv6Network
_ALLOWED = (
    "http://[user:password@]host[:port], with / # ? @ in a password percent-encoded "
    "(https:// and socks proxies are not supported)"
)


@dataclass(frozen=True)
class Proxy:
    """An HTTP proxy: where it listens, the variable that named it, and its credentials."""

    host: str
    port: int
    variable: str
    credentials: tuple[str, str] | None = field(default=None, repr=False)

    @property
    def authorization(self) -> str | None:
        """The ``Proxy-Authorization`` value (Basic, UTF-8) for the credentials, or None."""
        if self.credentials is None:
            return None
        pair = ":".join(self.credentials).encode("utf-8")
        return "Basic " + base64.b64encode(pair).decode("ascii")

    @property
    def netloc(self) -> str:
        """``host:port`` (an IPv6 host in brackets)."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{host}:{self.port}"

    @property
    def url(self) -> str:
        """``http://host:port``, without the credentials (safe to log)."""
        return f"http://{self.netloc}"

    @property
    def headers(self) -> dict[str, str] | None:
        """What to send to the proxy itself (its credentials), or None."""
        return {"Proxy-Authorization": self.authorization} if self.authorization else None

    def __str__(self) -> str:
        return f"{self.url} (from {self.variable})"


@dataclass(frozen=True)
class _Unusable:
    """A proxy variable whose value cannot be used; the error names it when a request needs it."""

    variable: str
    shown: str

    def error(self) -> ConfigError:
        return ConfigError(self.variable, self.shown, _ALLOWED)


@dataclass(frozen=True)
class _Exempt:
    """One ``no_proxy`` entry: a domain (with its subdomains), an address block, or everything."""

    domain: str | None = None
    network: _Network | None = None
    port: int | None = None
    everything: bool = False

    def covers(
        self, host: str, address: ipaddress.IPv4Address | ipaddress.IPv6Address | None, port: int
    ) -> bool:
        if self.everything:
            return True
        if self.port is not None and self.port != port:
            return False
        if self.network is not None:
            return address is not None and address in self.network
        domain = self.domain or ""
        return host == domain or host.endswith("." + domain)


@dataclass(frozen=True)
class ProxyRules:
    """The proxy for each URL scheme and the hosts exempt from it; empty means no proxy at all."""

    by_scheme: Mapping[str, Proxy | _Unusable] = field(default_factory=dict)
    exempt: tuple[_Exempt, ...] = ()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ProxyRules:
        """The rules the ``*_proxy`` variables of ``environ`` (default ``os.environ``) give."""
        env = os.environ if environ is None else environ
        by_scheme: dict[str, Proxy | _Unusable] = {}
        shared = _variable(env, "all_proxy")
        for scheme in ("http", "https"):
            named = _variable(env, f"{scheme}_proxy") or shared
            if named is not None:
                by_scheme[scheme] = _parse_proxy(*named)
        no_proxy = _variable(env, "no_proxy")
        exempt = _parse_exempt(no_proxy[1]) if no_proxy else ()
        return cls(by_scheme, exempt)

    def __bool__(self) -> bool:
        return bool(self.by_scheme)

    def for_url(self, url: str) -> Proxy | None:
        """The proxy ``url`` goes through, or None to connect directly.

        Raises ``ConfigError`` naming the variable if it would need an unusable proxy.
        """
        parts = urlsplit(url)
        try:
            port = parts.port
        except ValueError as exc:
            raise TransportError("connect", f"bad port in {url!r}") from exc
        scheme = parts.scheme.lower()
        return self.for_origin(scheme, parts.hostname or "", port or _default_port(scheme))

    def for_origin(self, scheme: str, host: str, port: int) -> Proxy | None:
        """The proxy for requests to ``scheme://host:port``, or None to connect directly."""
        proxy = self.by_scheme.get(scheme)
        if proxy is None or self.bypasses(host, port):
            return None
        if isinstance(proxy, _Unusable):
            raise proxy.error()
        return proxy

    def bypasses(self, host: str, port: int) -> bool:
        """Whether ``host:port`` is reached directly: loopback, or listed in ``no_proxy``."""
        host = host.lower().strip("[]").rstrip(".")
        address = _address(host)
        if address is not None and _local(address):
            return True
        if host == "localhost" or host.endswith(".localhost"):
            return True
        return any(rule.covers(host, address, port) for rule in self.exempt)


# How http.client reports a CONNECT the proxy answered with anything but 200.
_TUNNEL_FAILED = re.compile(r"Tunnel connection failed: (\d{3})")


def tunnel_refused(status: int, reason: str) -> TransportError:
    """The error for a ``CONNECT`` the proxy answered with ``status``.

    A 4xx is the proxy's own verdict (407: wrong credentials, 403: site blocked):
    kind ``proxy``, not retried, so a wrong password is not tried again and again
    (a directory-backed proxy may lock the account) and no breaker takes the
    upstream for down. A 5xx means the proxy could not reach the upstream: ``connect``.
    """
    kind = "proxy" if 400 <= status < 500 else "connect"
    return TransportError(kind, f"the proxy answered CONNECT with HTTP {status} {reason}".rstrip())


def tunnel_refusal_in(exc: BaseException) -> TransportError | None:
    """``tunnel_refused`` for http.client's ``OSError("Tunnel connection failed: NNN ...")``."""
    match = _TUNNEL_FAILED.match(str(exc)) if isinstance(exc, OSError) else None
    if match is None:
        return None
    return tunnel_refused(int(match.group(1)), str(exc)[match.end() :].strip())


def via(error: BaseException, proxy: Proxy | None) -> BaseException:
    """A transport's ``error``, saying which proxy the request went through, if any."""
    if proxy is None or not isinstance(error, TransportError):
        return error
    return TransportError(error.kind, f"{error} (via proxy {proxy})")


def _variable(env: Mapping[str, str], name: str) -> tuple[str, str] | None:
    """(variable, value) from ``name``, else ``NAME``; None if unset or blank.

    The lower-case name wins even when blank, as for urllib, requests and httpx:
    ``https_proxy= cmd`` turns a proxy off for one command.
    """
    if name in env:
        value = env[name].strip()
        return (name, value) if value else None
    # httpoxy: in a CGI request, HTTP_PROXY is the client's "Proxy:" header, not a setting.
    if name == "http_proxy" and "REQUEST_METHOD" in env:
        return None
    value = env.get(name.upper(), "").strip()
    return (name.upper(), value) if value else None


def _parse_proxy(variable: str, value: str) -> Proxy | _Unusable:
    # curl and requests take a bare "host:port" as an http proxy.
    text = value if "://" in value else f"http://{value}"
    parts = urlsplit(text)
    unusable = _Unusable(variable, _masked(parts.scheme, parts.hostname, value))
    try:
        port = parts.port or 80
    except ValueError:
        return unusable
    if parts.scheme.lower() != "http" or not parts.hostname:
        return unusable
    if "@" in value and parts.username is None:
        # A password with a bare "/" or "#" ends the authority early: the host parsed
        # would be part of the credentials. Percent-encode them (%2F, %23).
        return unusable
    credentials = None
    if parts.username is not None:
        user = unquote(parts.username)
        if ":" in user:  # Basic auth cannot carry it: the first colon ends the user
            return unusable
        credentials = (user, unquote(parts.password or ""))
    return Proxy(parts.hostname, port, variable, credentials)


def _masked(scheme: str, host: str | None, value: str) -> str:
    """The value as an error may show it: without the password a proxy URL may carry."""
    if "@" not in value:
        return value
    # The host after the last "@": what urlsplit calls the host may be part of a password.
    after = value.rpartition("@")[2].split("/", 1)[0]
    return f"{scheme or 'http'}://***@{after or host or '?'}"


def _parse_exempt(text: str) -> tuple[_Exempt, ...]:
    rules: list[_Exempt] = []
    for entry in text.replace(",", " ").split():
        entry = entry.lower()
        if entry == "*":
            rules.append(_Exempt(everything=True))
            continue
        # httpx's documented form names a URL: its host (and port) is what counts here.
        entry = entry.split("://", 1)[1].rstrip("/") if "://" in entry else entry
        host, port = _split_port(entry)
        try:
            network = ipaddress.ip_network(host, strict=False)
        except ValueError:
            domain = host.removeprefix("*").lstrip(".").rstrip(".")
            if domain:
                rules.append(_Exempt(domain=domain, port=port))
        else:
            rules.append(_Exempt(network=network, port=port))
    return tuple(rules)


def _split_port(entry: str) -> tuple[str, int | None]:
    """``host:port``, ``[v6]:port``, or a bare host, address or block (whose colons are not a port)."""
    if entry.startswith("["):
        host, _, rest = entry[1:].partition("]")
        port = rest.removeprefix(":")
        return host, int(port) if port.isdigit() else None
    host, colon, port = entry.rpartition(":")
    if colon and port.isdigit() and ":" not in host:
        return host, int(port)
    return entry, None


def _local(address: ipaddress.IPv4Address | ipaddress.IPv6Address) -> bool:
    """Loopback, or the unspecified address (0.0.0.0, ::: what vLLM prints), which is this host."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return address.is_loopback or address.is_unspecified


def _address(host: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(host.partition("%")[0])
    except ValueError:
        return None


def _default_port(scheme: str) -> int:
    return 443 if scheme == "https" else 80
