"""Which proxy a URL goes through, from the ``*_proxy`` variables: a table of cases, no I/O."""

from __future__ import annotations

import pytest

from minima_llm.errors import ConfigError
from minima_llm.http import ProxyRules

CORP = "http://proxy.corp:3128"


@pytest.mark.parametrize(
    ("env", "url", "expected"),
    [
        ({}, "https://api.openai.com/v1", None),
        (
            {"HTTPS_PROXY": CORP},
            "https://api.openai.com/v1",
            "http://proxy.corp:3128 (from HTTPS_PROXY)",
        ),
        (
            {"https_proxy": CORP, "HTTPS_PROXY": "http://other:1"},
            "https://a.io",
            "http://proxy.corp:3128 (from https_proxy)",
        ),
        ({"HTTPS_PROXY": CORP}, "http://a.io/v1", None),  # https_proxy is for https only
        ({"HTTP_PROXY": CORP}, "http://a.io/v1", "http://proxy.corp:3128 (from HTTP_PROXY)"),
        ({"ALL_PROXY": CORP}, "https://a.io", "http://proxy.corp:3128 (from ALL_PROXY)"),
        (
            {"ALL_PROXY": "http://all:1", "HTTPS_PROXY": CORP},
            "https://a.io",
            "http://proxy.corp:3128 (from HTTPS_PROXY)",
        ),
        ({"HTTPS_PROXY": "  "}, "https://a.io", None),  # blank is unset
        (
            {"HTTPS_PROXY": "proxy.corp:8080"},
            "https://a.io",
            "http://proxy.corp:8080 (from HTTPS_PROXY)",
        ),
        (
            {"HTTPS_PROXY": "http://proxy.corp"},
            "https://a.io",
            "http://proxy.corp:80 (from HTTPS_PROXY)",
        ),
        (
            {"HTTPS_PROXY": "http://[fd00::1]:3128"},
            "https://a.io",
            "http://[fd00::1]:3128 (from HTTPS_PROXY)",
        ),
        # httpoxy: in a CGI request HTTP_PROXY comes from the client's "Proxy:" header.
        ({"HTTP_PROXY": CORP, "REQUEST_METHOD": "GET"}, "http://a.io", None),
        (
            {"http_proxy": CORP, "REQUEST_METHOD": "GET"},
            "http://a.io",
            "http://proxy.corp:3128 (from http_proxy)",
        ),
        # Set empty, the lower-case name still wins: "https_proxy= cmd" turns it off.
        ({"https_proxy": "", "HTTPS_PROXY": CORP}, "https://a.io", None),
    ],
)
def test_which_proxy(env: dict[str, str], url: str, expected: str | None) -> None:
    proxy = ProxyRules.from_environ(env).for_url(url)
    assert (str(proxy) if proxy else None) == expected


@pytest.mark.parametrize(
    ("no_proxy", "url", "direct"),
    [
        ("", "https://api.openai.com", False),
        ("*", "https://api.openai.com", True),
        ("openai.com", "https://api.openai.com", True),
        ("openai.com", "https://openai.com", True),
        ("openai.com", "https://notopenai.com", False),
        (".openai.com", "https://api.openai.com", True),
        ("*.openai.com", "https://api.openai.com", True),
        ("OpenAI.COM", "https://API.openai.com", True),
        ("a.io, b.io", "https://b.io", True),
        ("a.io b.io", "https://b.io", True),
        ("b.io:8443", "https://b.io:8443", True),
        ("b.io:8443", "https://b.io", False),
        ("10.0.0.0/8", "http://10.1.2.3:8000", True),
        ("10.0.0.0/8", "http://11.1.2.3:8000", False),
        ("10.1.2.3", "http://10.1.2.3:8000", True),
        ("fd00::/8", "http://[fd00::5]:8000", True),
        ("[fd00::5]:8000", "http://[fd00::5]:8000", True),
        ("gpu-node-12", "http://gpu-node-12:8000/v1", True),
        ("gpu-node-12", "http://gpu-node-13:8000/v1", False),
        # Loopback never goes through a proxy, listed or not.
        ("", "http://127.0.0.1:8000", True),
        ("", "http://127.8.0.1:8000", True),
        ("", "http://localhost:8000", True),
        ("", "http://vllm.localhost:8000", True),
        ("", "http://[::1]:8000", True),
        ("", "http://0.0.0.0:8000/v1", True),  # what vLLM prints as its address
        ("", "http://[::]:8000", True),
        ("", "http://[::ffff:127.0.0.1]:8000", True),
        ("", "http://vllm.localhost.:8000", True),
        # httpx documents URLs in NO_PROXY.
        ("https://a.io", "https://a.io/v1", True),
        ("http://10.1.2.3:8000", "http://10.1.2.3:8000/v1", True),
    ],
)
def test_no_proxy(no_proxy: str, url: str, direct: bool) -> None:
    env = {"HTTPS_PROXY": CORP, "HTTP_PROXY": CORP, "NO_PROXY": no_proxy}
    assert (ProxyRules.from_environ(env).for_url(url) is None) is direct


def test_lower_case_no_proxy_wins() -> None:
    env = {"HTTPS_PROXY": CORP, "no_proxy": "a.io", "NO_PROXY": "b.io"}
    rules = ProxyRules.from_environ(env)
    assert rules.for_url("https://a.io") is None
    assert rules.for_url("https://b.io") is not None


def test_credentials_become_a_basic_header_and_stay_out_of_repr() -> None:
    env = {"HTTPS_PROXY": "http://al%40ice:s%3Acret@proxy.corp:3128"}
    proxy = ProxyRules.from_environ(env).for_url("https://a.io")
    assert proxy is not None
    # "al@ice:s:cret", percent-decoded, in base64.
    assert proxy.authorization == "Basic YWxAaWNlOnM6Y3JldA=="
    assert proxy.headers == {"Proxy-Authorization": "Basic YWxAaWNlOnM6Y3JldA=="}
    for shown in (repr(proxy), str(proxy), proxy.url):
        assert "cret" not in shown and "YWxA" not in shown
    assert ProxyRules.from_environ({"HTTPS_PROXY": CORP}).for_url("https://a.io").headers is None  # type: ignore[union-attr]


@pytest.mark.parametrize(
    ("value", "shown"),
    [
        ("socks5://127.0.0.1:1080", "socks5://127.0.0.1:1080"),
        ("https://proxy.corp:443", "https://proxy.corp:443"),
        ("http://proxy.corp:99999", "http://proxy.corp:99999"),
        ("http://", "http://"),
        ("socks5h://user:hunter2@proxy.corp:1080", "socks5h://***@proxy.corp:1080"),
        # A bare "/" in the password ends the authority early: "ada" would be the host.
        ("http://ada:12/34@proxy.corp:3128", "http://***@proxy.corp:3128"),
    ],
)
def test_an_unusable_proxy_is_refused_naming_the_variable(value: str, shown: str) -> None:
    rules = ProxyRules.from_environ({"ALL_PROXY": value})
    with pytest.raises(ConfigError) as caught:
        rules.for_url("https://api.openai.com/v1")
    assert caught.value.field == "ALL_PROXY"
    assert caught.value.value == shown
    assert "hunter2" not in str(caught.value) and "ada:12" not in str(caught.value)
    assert "http://" in caught.value.allowed


def test_an_unusable_proxy_does_not_matter_where_it_is_not_used() -> None:
    # A SOCKS ALL_PROXY set for other tools must not stop a client of a local server.
    rules = ProxyRules.from_environ({"ALL_PROXY": "socks5://127.0.0.1:1080", "NO_PROXY": "gpu1"})
    assert rules.for_url("http://127.0.0.1:8000/v1") is None
    assert rules.for_url("http://gpu1:8000/v1") is None


def test_rules_are_false_without_any_proxy() -> None:
    assert not ProxyRules.from_environ({"NO_PROXY": "*"})
    assert ProxyRules.from_environ({"HTTP_PROXY": CORP})
