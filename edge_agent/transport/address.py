"""The one ``host:port`` parser of the project.

Every address a user types goes through :func:`split_host_port`: the broker URL's
``HOST[:PORT]`` (:func:`edge_agent.config.agent.parse_broker_url`), the agent's
``--http`` address, the coordinator service's ``--bind`` (both through
:func:`parse_bind`), and a broker host on its own (:func:`check_host`). One grammar,
one set of messages:

* a host is a name (labels of letters, digits, ``_`` and ``-``, at most 253
  characters), an IPv4 address, or an IPv6 address in brackets (``[::1]``);
* the port is digits only, at most 5, within ``min_port``-65535; it may be left out
  only where the caller has a default (a broker URL's 1883 / 8883).

The functions are pure (text in, values or :class:`AddressError` out); the reason in
the error is written to follow a caller's prefix (``bind address '...': <reason>``).
"""

from __future__ import annotations

import ipaddress
import re

from edge_agent.errors import AddressError

__all__ = ["AddressError", "check_host", "parse_bind", "split_host_port"]

MAX_PORT = 65535
"""Highest TCP port."""

_LABEL = r"[A-Za-z0-9_](?:[A-Za-z0-9_-]{0,61}[A-Za-z0-9_])?"
_HOSTNAME_RE = re.compile(rf"(?=.{{1,253}}$){_LABEL}(?:\.{_LABEL})*\.?")
_PORT_RE = re.compile(r"[0-9]{1,5}")
_EXAMPLE = "e.g. 127.0.0.1:8080"
_V6_EXAMPLE = "e.g. [::1]:8080"


def split_host_port(
    text: str, *, default_port: int | None = None, min_port: int = 1
) -> tuple[str, int]:
    """Split ``HOST:PORT`` (or ``HOST`` when ``default_port`` is given).

    Args:
        text: The address, e.g. ``broker.local:1883``, ``[fe80::1]:8080``.
        default_port: The port when the text has none; None makes the port required.
        min_port: The lowest port accepted (0 lets a listener pick a free port).

    Returns:
        ``(host, port)``; an IPv6 host without its brackets.

    Raises:
        AddressError: the reason the text is not such an address.
    """
    port_form = ":PORT" if default_port is None else "[:PORT]"
    if text.startswith("["):
        end = text.find("]")
        if end < 0:
            raise AddressError(
                f"unclosed '[' around an IPv6 address; expected [IPv6]{port_form}, {_V6_EXAMPLE}"
            )
        host, rest = text[1:end], text[end + 1 :]
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{host[:64]!r} is not an IPv6 address") from None
        if rest and not rest.startswith(":"):
            raise AddressError(
                f"unexpected text after ']'; expected [IPv6]{port_form}, {_V6_EXAMPLE}"
            )
        port_text: str | None = rest[1:] if rest else None
    else:
        if text.count(":") > 1:
            raise AddressError(
                f"put IPv6 addresses in brackets, {_V6_EXAMPLE} "
                "(an IPv6 address goes in brackets so its colons are not read as the port)"
            )
        host, sep, after = text.partition(":")
        port_text = after if sep else None
        if not host:
            raise AddressError(f"no host; expected HOST{port_form}, {_EXAMPLE}")
        check_host(host)
    if port_text is None:
        if default_port is None:
            raise AddressError(f"expected HOST:PORT, {_EXAMPLE} (no port)")
        return host, default_port
    if _PORT_RE.fullmatch(port_text) is None or not min_port <= int(port_text) <= MAX_PORT:
        raise AddressError(
            f"the port must be a number {min_port}-{MAX_PORT}, got port {port_text[:20]!r}"
        )
    return host, int(port_text)


def check_host(host: str) -> str:
    """Check a host given on its own: a name, an IPv4 or an IPv6 address (no brackets).

    Returns:
        The host, unchanged.

    Raises:
        AddressError: it is none of these.
    """
    if ":" in host:
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise AddressError(f"{host[:64]!r} is not an IPv6 address") from None
        return host
    if _HOSTNAME_RE.fullmatch(host) is None:
        raise AddressError(f"{host[:64]!r} is not a host name or IPv4 address")
    return host


def parse_bind(text: str) -> tuple[str, int]:
    """Parse the address a server listens on: ``HOST:PORT``, port 0-65535.

    Accepted forms: ``127.0.0.1:8080``, ``localhost:8080``, ``[::1]:8080``; port 0
    asks the system for a free port.

    Args:
        text: The address, e.g. from a command-line option.

    Returns:
        ``(host, port)``, with the brackets of an IPv6 address removed.

    Raises:
        AddressError: the text is not ``HOST:PORT`` of that form, with the text and
            the reason in the message.
    """
    try:
        return split_host_port(text, min_port=0)
    except AddressError as exc:
        raise AddressError(f"bind address {text[:80]!r}: {exc}") from None
