"""The one ``host:port`` parser (edge_agent/transport/address.py).

Its callers (broker URLs in tests/test_agent_config.py, the service's bind address in
tests/test_service_config.py) check their own prefixes; here is the grammar itself.
"""

from __future__ import annotations

import pytest

from edge_agent.errors import AddressError, ConfigError
from edge_agent.transport.address import check_host, parse_bind, split_host_port


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:8080", ("127.0.0.1", 8080)),
        ("localhost:8080", ("localhost", 8080)),
        ("[::1]:8080", ("::1", 8080)),
        ("0.0.0.0:0", ("0.0.0.0", 0)),
        ("edge-gw.local:65535", ("edge-gw.local", 65535)),
    ],
)
def test_parse_bind(text: str, expected: tuple[str, int]) -> None:
    assert parse_bind(text) == expected


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "expected HOST:PORT"),
        ("8080", "expected HOST:PORT"),
        (":8080", "expected HOST:PORT"),
        ("127.0.0.1:", "port must be a number"),
        ("127.0.0.1:http", "port must be a number"),
        ("127.0.0.1:+80", "port must be a number"),
        ("127.0.0.1: 80", "port must be a number"),
        ("127.0.0.1:65536", "port must be a number"),
        ("::1:8080", "IPv6 addresses in brackets"),
        ("[::1]8080", r"expected \[IPv6\]:PORT"),
        ("[::1:8080", r"expected \[IPv6\]:PORT"),
        ("[::1]", r"expected HOST:PORT"),
        ("[localhost]:8080", "not an IPv6 address"),
        ("bad_host!:80", "not a host name"),
        ("-host:80", "not a host name"),
        ("a..b:80", "not a host name"),
        ("x" * 64 + ":80", "not a host name"),
    ],
)
def test_parse_bind_errors(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message) as info:
        parse_bind(text)
    assert isinstance(info.value, AddressError)
    assert str(info.value).startswith(f"bind address {text[:80]!r}: ")


@pytest.mark.parametrize(
    ("text", "default_port", "expected"),
    [
        ("broker", 1883, ("broker", 1883)),
        ("my_broker:1884", 1883, ("my_broker", 1884)),
        ("[fe80::1]", 8883, ("fe80::1", 8883)),
        ("[fe80::1]:9000", 8883, ("fe80::1", 9000)),
        ("broker.example.net.:1", None, ("broker.example.net.", 1)),
    ],
)
def test_split_host_port_with_a_default_port(
    text: str, default_port: int | None, expected: tuple[str, int]
) -> None:
    assert split_host_port(text, default_port=default_port) == expected


def test_port_zero_only_where_the_caller_allows_it() -> None:
    with pytest.raises(AddressError, match="the port must be a number 1-65535, got port '0'"):
        split_host_port("h:0")
    assert split_host_port("h:0", min_port=0) == ("h", 0)


@pytest.mark.parametrize("host", ["::1", "fe80::1", "10.0.0.2", "broker", "Broker.local"])
def test_check_host_accepts(host: str) -> None:
    assert check_host(host) == host


@pytest.mark.parametrize(
    ("host", "message"),
    [
        ("", "is not a host name"),
        ("a b", "is not a host name"),
        ("[::1]", "is not an IPv6 address"),
        (":::x", "is not an IPv6 address"),
        ("a" * 254, "is not a host name"),
    ],
)
def test_check_host_rejects(host: str, message: str) -> None:
    with pytest.raises(AddressError, match=message):
        check_host(host)
