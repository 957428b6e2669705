"""The MQTT topic tree that the coordinator and the agents share.

Everything lives under one versioned root, :data:`ROOT` (``fedge/v1``)::

    fedge/v1/devices/{device_id}/status      agent -> coordinator, retained, Last Will
    fedge/v1/devices/{device_id}/cmd         coordinator -> agent: commands
    fedge/v1/devices/{device_id}/chunks      coordinator -> agent: chunk data
    fedge/v1/devices/{device_id}/events      agent -> coordinator: chunk requests,
                                             install status, update reports, errors,
                                             upload chunks
    fedge/v1/devices/{device_id}/telemetry   agent -> coordinator: telemetry batches
    fedge/v1/broadcast/{name}                coordinator -> every agent (fan-out, e.g.
                                             one round's global weights sent once)

The device id is also the device's MQTT username, so the broker ACL in
:data:`MOSQUITTO_ACL` confines each device to its own subtree, least privilege: it
may publish only on its own from-device channels (``status``, ``events``,
``telemetry``) and subscribe only to its own to-device channels (``cmd``,
``chunks``) and the broadcast subtree. The ACL lines are generated from
:attr:`Channel.direction`, so they cannot drift from the tree.

Authenticity: a message header's ``sender`` is self-declared and proves nothing by
itself. What a receiver can trust is the topic a message arrived on, because the
broker only lets the MQTT user ``X`` publish on ``fedge/v1/devices/X/...`` (topic ==
MQTT username) and only the ``coordinator`` user publish on to-device channels and
broadcasts; :func:`edge_agent.protocol.check_route` then requires ``sender`` to
match the topic. That is why the ACL must stay this tight: with ``readwrite`` on its
own subtree a device could publish (even retained) on its own ``cmd`` and ``chunks``
topics and hand itself forged "coordinator" commands. Signed artifacts are verified
on top of this, independently of the transport. Device ids and broadcast names follow one rule: 1-64
characters of ``[A-Za-z0-9_.-]``, starting with a letter or digit; so they never
contain ``/``, ``+`` or ``#`` and never start with ``.`` (safe as file names too).
``coordinator`` is reserved: it is the coordinator's MQTT username and the
``sender`` of every coordinator message, so no device may take it. Operators'
accounts with the coordinator's rights are ``coordinator@<name>``
(:func:`operator_account`): ``@`` is in no device id. The ACL cannot restrict MQTT
client ids: the broker must bind them to the username (``use_username_as_clientid``,
written by ``fedge broker config``), or a device could take the coordinator's.

Workflow:

* The agent subscribes to :func:`agent_subscriptions` (plus, while it expects one,
  a single broadcast topic) and publishes to
  ``device_topic(my_id, Channel.EVENTS)`` and friends; it sets its Last Will to an
  offline ``status`` message on ``device_topic(my_id, Channel.STATUS)``, retained.
* The coordinator subscribes to :func:`coordinator_subscriptions`, and for each
  incoming message calls :func:`parse_device_topic` (or :func:`parse_topic`) to
  learn which device and channel it came from;
  :func:`edge_agent.protocol.check_route` then checks the message against it.
* Publishing an empty retained payload on a status topic clears the retained
  presence of a removed device; decoders reject the empty payload, so receivers
  simply skip it.

Every function here is pure and raises :class:`~edge_agent.errors.TopicError` for a
topic outside the tree or an invalid device id.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from enum import StrEnum

from edge_agent.errors import TopicError

__all__ = [
    "BROADCAST_FILTER",
    "BROADCAST_PREFIX",
    "COORDINATOR_SENDER",
    "DEVICES_PREFIX",
    "KEYSET_BROADCAST",
    "MAX_TOPIC_CHARS",
    "MOSQUITTO_ACL",
    "OPERATOR_SEPARATOR",
    "ROOT",
    "BroadcastTopic",
    "Channel",
    "DeviceTopic",
    "Direction",
    "agent_subscriptions",
    "broadcast_topic",
    "coordinator_subscriptions",
    "device_topic",
    "is_valid_device_id",
    "mosquitto_acl",
    "operator_account",
    "parse_broadcast_topic",
    "parse_device_topic",
    "parse_topic",
    "statement_broadcast",
    "validate_device_id",
    "validate_fleet_id",
]

ROOT = "fedge/v1"
"""Versioned root of every fedge topic."""

DEVICES_PREFIX = f"{ROOT}/devices"
"""Parent of the per-device subtrees."""

BROADCAST_PREFIX = f"{ROOT}/broadcast"
"""Parent of the coordinator's fan-out topics."""

BROADCAST_FILTER = f"{BROADCAST_PREFIX}/#"
"""Subscription filter that matches every broadcast topic."""

COORDINATOR_SENDER = "coordinator"
"""The ``sender`` of coordinator messages and its MQTT username; reserved."""

MAX_TOPIC_CHARS = 256
"""Longest topic :func:`parse_topic` looks at (real fedge topics are far shorter)."""

_NAME_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_FLEET_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,47}")

KEYSET_BROADCAST = "keyset"
"""The broadcast name of the retained key-set chain (devices read it; only the
coordinator's accounts publish it)."""

STATEMENT_PREFIX = "fleet."
"""Broadcast names of fleet statements: ``fleet.<fleet id>`` (retained)."""


class Direction(StrEnum):
    """Which way a channel's messages flow."""

    TO_DEVICE = "to_device"
    FROM_DEVICE = "from_device"


class Channel(StrEnum):
    """The last level of a per-device topic."""

    STATUS = "status"
    CMD = "cmd"
    CHUNKS = "chunks"
    EVENTS = "events"
    TELEMETRY = "telemetry"

    @property
    def direction(self) -> Direction:
        """Whether the coordinator (to_device) or the agent (from_device) publishes."""
        if self in (Channel.CMD, Channel.CHUNKS):
            return Direction.TO_DEVICE
        return Direction.FROM_DEVICE

    @property
    def retained(self) -> bool:
        """Whether messages on this channel are published with the retain flag."""
        return self is Channel.STATUS


def _device_acl_lines() -> str:
    """One mosquitto ``pattern`` line per channel, from the channel's direction."""
    return "\n".join(
        f"pattern {'read' if channel.direction is Direction.TO_DEVICE else 'write'} "
        f"{DEVICES_PREFIX}/%u/{channel.value}"
        for channel in Channel
    )


OPERATOR_SEPARATOR = "@"
"""Joins ``coordinator`` and an operator name into an operator account
(``coordinator@laptop``); no device id contains it, so no device id is an account."""


def operator_account(name: str) -> str:
    """The MQTT username of an extra coordinator account: ``coordinator@<name>``.

    A broker that binds client ids to usernames (``use_username_as_clientid``)
    lets one connection per username exist: a second connection as ``coordinator``
    would disconnect the coordinator service and, with a clean session, discard its
    persistent one. An operator's one-shot commands (``fedge deploy --broker``)
    therefore connect with an account of their own, with the coordinator's rights.

    Args:
        name: 1-64 of ``[A-Za-z0-9_.-]``, starting with a letter or digit.

    Returns:
        ``coordinator@<name>``; never a valid device id (``@`` is not allowed in one).

    Raises:
        TopicError: The name breaks the rule.
    """
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise TopicError(
            f"invalid operator name {str(name)[:80]!r}: want 1-64 of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return f"{COORDINATOR_SENDER}{OPERATOR_SEPARATOR}{name}"


def mosquitto_acl(operators: Iterable[str] = ()) -> str:
    """The least-privilege mosquitto ``acl_file``, generated from :class:`Channel`.

    Args:
        operators: Operator names; each gets the account :func:`operator_account`
            with the coordinator's rights (read and write the whole tree).

    Returns:
        The ACL text: the device ``pattern`` lines, then one ``user`` section for
        ``coordinator`` and one per operator account.

    Raises:
        TopicError: An operator name breaks the rule.
    """
    accounts = (COORDINATOR_SENDER, *dict.fromkeys(operator_account(n) for n in operators))
    sections = "\n".join(f"user {account}\ntopic readwrite {ROOT}/#" for account in accounts)
    return f"""\
# fedge broker ACL (mosquitto acl_file). MQTT username == device id.
# Least privilege: a device may only publish (write) on its own from-device
# channels and only subscribe (read) to its own to-device channels and the
# broadcast subtree, so it cannot forge coordinator messages, not even to itself.
# 'pattern' lines apply to every authenticated client; plain 'topic' lines before
# the first 'user' line would apply to anonymous clients only.
{_device_acl_lines()}
pattern read {BROADCAST_FILTER}

# The coordinator's accounts (the service's 'coordinator', operators'
# 'coordinator@<name>') see and write the whole tree.
{sections}
"""


MOSQUITTO_ACL = mosquitto_acl()
"""A least-privilege mosquitto ``acl_file`` (:func:`mosquitto_acl` with no operators).

Each device (MQTT username == device id) may ``write`` only its own from-device
channels (``status``, ``events``, ``telemetry``) and ``read`` only its own
to-device channels (``cmd``, ``chunks``) and :data:`BROADCAST_FILTER`; the
``coordinator`` account reads and writes all of ``fedge/v1/#``. Run the broker with
``allow_anonymous false`` and a password file, or none of this holds.
"""


@dataclass(frozen=True, slots=True)
class DeviceTopic:
    """A parsed per-device topic.

    Attributes:
        device_id: The device whose subtree the topic is in.
        channel: The channel (last topic level).
    """

    device_id: str
    channel: Channel

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{DEVICES_PREFIX}/{self.device_id}/{self.channel.value}"


@dataclass(frozen=True, slots=True)
class BroadcastTopic:
    """A parsed broadcast topic.

    Attributes:
        name: The broadcast name (last topic level).
    """

    name: str

    @property
    def topic(self) -> str:
        """The topic string."""
        return f"{BROADCAST_PREFIX}/{self.name}"


def is_valid_device_id(device_id: object) -> bool:
    """Tell whether a value is an acceptable device id.

    Args:
        device_id: Any value.

    Returns:
        True for a str of 1-64 ``[A-Za-z0-9_.-]`` characters starting with a letter
        or digit, other than the reserved ``coordinator``.
    """
    return (
        isinstance(device_id, str)
        and _NAME_RE.fullmatch(device_id) is not None
        and device_id != COORDINATOR_SENDER
    )


def validate_device_id(device_id: object) -> str:
    """Check a device id and return it.

    Args:
        device_id: The candidate id (usually the MQTT username).

    Returns:
        The same id, typed as str.

    Raises:
        TopicError: The id breaks the device id rule or is ``coordinator``.
    """
    if not isinstance(device_id, str):
        raise TopicError(f"device id must be a str, got {type(device_id).__name__}")
    if device_id == COORDINATOR_SENDER:
        raise TopicError(f"device id {COORDINATOR_SENDER!r} is reserved")
    if _NAME_RE.fullmatch(device_id) is None:
        raise TopicError(
            f"invalid device id {device_id[:80]!r}: want 1-64 of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return device_id


def validate_fleet_id(fleet: object) -> str:
    """Check a fleet id and return it.

    Args:
        fleet: The candidate id.

    Returns:
        The same id: 1-48 of ``[A-Za-z0-9_.-]``, starting with a letter or digit (so
        ``fleet.<id>`` is a valid broadcast name).

    Raises:
        TopicError: The id breaks the rule.
    """
    if not isinstance(fleet, str) or _FLEET_RE.fullmatch(fleet) is None:
        raise TopicError(
            f"invalid fleet id {str(fleet)[:80]!r}: want 1-48 of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return fleet


def statement_broadcast(fleet: str) -> str:
    """The broadcast name of ``fleet``'s retained fleet statement (``fleet.<id>``).

    Raises:
        TopicError: The fleet id is invalid.
    """
    return f"{STATEMENT_PREFIX}{validate_fleet_id(fleet)}"


def _validate_broadcast_name(name: object) -> str:
    if not isinstance(name, str) or _NAME_RE.fullmatch(name) is None:
        raise TopicError(
            f"invalid broadcast name {str(name)[:80]!r}: want 1-64 of [A-Za-z0-9_.-], "
            "starting with a letter or digit"
        )
    return name


def device_topic(device_id: str, channel: Channel) -> str:
    """Build a per-device topic.

    Args:
        device_id: The device (its MQTT username).
        channel: The channel.

    Returns:
        ``fedge/v1/devices/{device_id}/{channel}``.

    Raises:
        TopicError: The device id is invalid or ``channel`` is not a :class:`Channel`.
    """
    validate_device_id(device_id)
    if not isinstance(channel, Channel):
        raise TopicError(f"not a Channel: {channel!r}")
    return f"{DEVICES_PREFIX}/{device_id}/{channel.value}"


def broadcast_topic(name: str) -> str:
    """Build a broadcast topic.

    Args:
        name: The broadcast name (same rule as device ids, ``coordinator`` allowed).

    Returns:
        ``fedge/v1/broadcast/{name}``.

    Raises:
        TopicError: The name is invalid.
    """
    return f"{BROADCAST_PREFIX}/{_validate_broadcast_name(name)}"


def parse_topic(topic: str) -> DeviceTopic | BroadcastTopic:
    """Parse any fedge topic a message can arrive on.

    Args:
        topic: A concrete topic (no wildcards), as delivered by the broker.

    Returns:
        A :class:`DeviceTopic` or a :class:`BroadcastTopic`.

    Raises:
        TopicError: The topic is not a str, is too long, has wildcards, lies outside
            the tree, has extra or missing levels, an unknown channel, or an invalid
            device id or broadcast name.
    """
    if not isinstance(topic, str):
        raise TopicError(f"topic must be a str, got {type(topic).__name__}")
    if len(topic) > MAX_TOPIC_CHARS:
        raise TopicError(f"topic longer than {MAX_TOPIC_CHARS} characters")
    levels = topic.split("/")
    if len(levels) == 5 and f"{levels[0]}/{levels[1]}/{levels[2]}" == DEVICES_PREFIX:
        device_id = validate_device_id(levels[3])
        try:
            channel = Channel(levels[4])
        except ValueError:
            raise TopicError(f"unknown channel {levels[4][:80]!r} in topic") from None
        return DeviceTopic(device_id, channel)
    if len(levels) == 4 and f"{levels[0]}/{levels[1]}/{levels[2]}" == BROADCAST_PREFIX:
        return BroadcastTopic(_validate_broadcast_name(levels[3]))
    raise TopicError(f"topic outside the fedge tree: {topic[:80]!r}")


def parse_device_topic(topic: str) -> tuple[str, Channel]:
    """Parse a per-device topic.

    Args:
        topic: A concrete topic, e.g. ``fedge/v1/devices/pi-7/events``.

    Returns:
        ``(device_id, channel)``.

    Raises:
        TopicError: The topic is not a valid per-device topic (broadcast topics
            included).
    """
    parsed = parse_topic(topic)
    if not isinstance(parsed, DeviceTopic):
        raise TopicError(f"not a per-device topic: {topic[:80]!r}")
    return parsed.device_id, parsed.channel


def parse_broadcast_topic(topic: str) -> str:
    """Parse a broadcast topic.

    Args:
        topic: A concrete topic, e.g. ``fedge/v1/broadcast/round-12``.

    Returns:
        The broadcast name.

    Raises:
        TopicError: The topic is not a valid broadcast topic.
    """
    parsed = parse_topic(topic)
    if not isinstance(parsed, BroadcastTopic):
        raise TopicError(f"not a broadcast topic: {topic[:80]!r}")
    return parsed.name


def coordinator_subscriptions() -> tuple[str, ...]:
    """Subscription filters the coordinator needs.

    Returns:
        ``fedge/v1/devices/+/{channel}`` for every from-device channel.
    """
    return tuple(
        f"{DEVICES_PREFIX}/+/{channel.value}"
        for channel in Channel
        if channel.direction is Direction.FROM_DEVICE
    )


def agent_subscriptions(device_id: str, *, broadcast: bool = True) -> tuple[str, ...]:
    """Subscription filters an agent needs.

    Args:
        device_id: The agent's device id.
        broadcast: Whether to include :data:`BROADCAST_FILTER` (every broadcast).
            The agent itself passes False and subscribes to one broadcast topic at
            a time, when it expects one (the transfer it accepted), so a device is
            not sent payloads meant for other devices.

    Returns:
        The device's to-device topics, plus :data:`BROADCAST_FILTER` if asked.

    Raises:
        TopicError: The device id is invalid.
    """
    validate_device_id(device_id)
    own = tuple(
        device_topic(device_id, channel)
        for channel in Channel
        if channel.direction is Direction.TO_DEVICE
    )
    return (*own, BROADCAST_FILTER) if broadcast else own
