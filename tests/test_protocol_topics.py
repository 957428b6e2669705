"""Tests for the topic tree (edge_agent.protocol.topics)."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from edge_agent.errors import TopicError
from edge_agent.protocol import (
    BROADCAST_FILTER,
    MOSQUITTO_ACL,
    BroadcastTopic,
    Channel,
    DeviceTopic,
    Direction,
    agent_subscriptions,
    broadcast_topic,
    coordinator_subscriptions,
    device_topic,
    is_valid_device_id,
    parse_broadcast_topic,
    parse_device_topic,
    parse_topic,
    validate_device_id,
)

DEVICE_IDS = st.from_regex(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}", fullmatch=True).filter(
    lambda s: s != "coordinator"
)


def test_channel_directions_and_retain() -> None:
    assert {c for c in Channel if c.direction is Direction.TO_DEVICE} == {
        Channel.CMD,
        Channel.CHUNKS,
    }
    assert {c for c in Channel if c.direction is Direction.FROM_DEVICE} == {
        Channel.STATUS,
        Channel.EVENTS,
        Channel.TELEMETRY,
    }
    assert [c for c in Channel if c.retained] == [Channel.STATUS]


@pytest.mark.parametrize("channel", list(Channel))
def test_device_topic_round_trip(channel: Channel) -> None:
    topic = device_topic("pi-7", channel)
    assert topic == f"fedge/v1/devices/pi-7/{channel.value}"
    assert parse_device_topic(topic) == ("pi-7", channel)
    assert parse_topic(topic) == DeviceTopic("pi-7", channel)
    assert DeviceTopic("pi-7", channel).topic == topic


def test_broadcast_topic_round_trip() -> None:
    topic = broadcast_topic("round-12")
    assert topic == "fedge/v1/broadcast/round-12"
    assert parse_broadcast_topic(topic) == "round-12"
    assert parse_topic(topic) == BroadcastTopic("round-12")
    assert BroadcastTopic("round-12").topic == topic


@pytest.mark.parametrize(
    "device_id",
    ["a", "0", "pi-7", "Pi_7.local", "a" * 64, "9-._"],
)
def test_valid_device_ids(device_id: str) -> None:
    assert validate_device_id(device_id) == device_id
    assert is_valid_device_id(device_id)


@pytest.mark.parametrize(
    "device_id",
    [
        "",
        "a" * 65,
        "-pi",
        ".pi",
        "_pi",
        "..",
        "pi/7",
        "pi+",
        "pi#",
        "pi 7",
        "pï",
        "pi\x00",
        "coordinator",
        b"pi",
        None,
        7,
    ],
)
def test_invalid_device_ids(device_id: object) -> None:
    assert not is_valid_device_id(device_id)
    with pytest.raises(TopicError):
        validate_device_id(device_id)


def test_device_topic_rejects_bad_input() -> None:
    with pytest.raises(TopicError):
        device_topic("bad/id", Channel.CMD)
    with pytest.raises(TopicError):
        device_topic("pi", "cmd")  # type: ignore[arg-type]
    with pytest.raises(TopicError):
        broadcast_topic("a/b")
    with pytest.raises(TopicError):
        broadcast_topic("")


@pytest.mark.parametrize(
    "topic",
    [
        "",
        "fedge",
        "fedge/v1",
        "fedge/v1/devices",
        "fedge/v1/devices/pi",
        "fedge/v1/devices/pi/",
        "fedge/v1/devices/pi/unknown",
        "fedge/v1/devices/pi/cmd/extra",
        "fedge/v1/devices/+/cmd",
        "fedge/v1/devices/#",
        "fedge/v1/devices/coordinator/events",
        "fedge/v1/devices//cmd",
        "/fedge/v1/devices/pi/cmd",
        "fedge/v2/devices/pi/cmd",
        "FEDGE/v1/devices/pi/cmd",
        "fedge/v1/devices/pi/CMD",
        "fedge/v1/broadcast",
        "fedge/v1/broadcast/",
        "fedge/v1/broadcast/#",
        "fedge/v1/broadcast/a/b",
        "fedge/v1/other/pi/cmd",
        "fedge/v1/devices/" + "a" * 300 + "/cmd",
    ],
)
def test_parse_topic_rejects(topic: str) -> None:
    with pytest.raises(TopicError):
        parse_topic(topic)


def test_parse_topic_rejects_non_str() -> None:
    with pytest.raises(TopicError):
        parse_topic(b"fedge/v1/devices/pi/cmd")  # type: ignore[arg-type]


def test_parse_device_topic_rejects_broadcast_and_vice_versa() -> None:
    with pytest.raises(TopicError):
        parse_device_topic("fedge/v1/broadcast/round-1")
    with pytest.raises(TopicError):
        parse_broadcast_topic("fedge/v1/devices/pi/cmd")


def test_subscriptions() -> None:
    assert coordinator_subscriptions() == (
        "fedge/v1/devices/+/status",
        "fedge/v1/devices/+/events",
        "fedge/v1/devices/+/telemetry",
    )
    assert agent_subscriptions("pi-7") == (
        "fedge/v1/devices/pi-7/cmd",
        "fedge/v1/devices/pi-7/chunks",
        BROADCAST_FILTER,
    )
    assert agent_subscriptions("pi-7", broadcast=False) == (
        "fedge/v1/devices/pi-7/cmd",
        "fedge/v1/devices/pi-7/chunks",
    )
    with pytest.raises(TopicError):
        agent_subscriptions("pi/7")


def test_acl_mentions_the_device_pattern_and_broadcast() -> None:
    lines = MOSQUITTO_ACL.splitlines()
    # Least privilege (was "pattern readwrite fedge/v1/devices/%u/#").
    assert "pattern write fedge/v1/devices/%u/events" in lines
    assert "pattern read fedge/v1/devices/%u/cmd" in lines
    assert "pattern read fedge/v1/broadcast/#" in lines
    assert "user coordinator" in lines


def test_acl_is_least_privilege_and_follows_channel_directions() -> None:
    rules = [line.split() for line in MOSQUITTO_ACL.splitlines() if line and line[0] != "#"]
    device_rules = {(rule[1], rule[2]) for rule in rules if rule[0] == "pattern"}
    assert device_rules == {
        ("write", "fedge/v1/devices/%u/status"),
        ("write", "fedge/v1/devices/%u/events"),
        ("write", "fedge/v1/devices/%u/telemetry"),
        ("read", "fedge/v1/devices/%u/cmd"),
        ("read", "fedge/v1/devices/%u/chunks"),
        ("read", BROADCAST_FILTER),
    }
    for channel in Channel:
        access = "read" if channel.direction is Direction.TO_DEVICE else "write"
        assert ["pattern", access, f"fedge/v1/devices/%u/{channel.value}"] in rules
    # Nothing grants a device readwrite or a wildcard over its own subtree.
    assert not any(rule[1] == "readwrite" for rule in rules if rule[0] == "pattern")
    assert not any(rule[2].endswith("%u/#") for rule in rules if rule[0] == "pattern")
    # Only the coordinator account (the one 'user' section) writes the whole tree.
    assert rules[-2:] == [["user", "coordinator"], ["topic", "readwrite", "fedge/v1/#"]]


@settings(max_examples=300, deadline=None)
@given(DEVICE_IDS, st.sampled_from(list(Channel)))
def test_any_valid_device_id_round_trips(device_id: str, channel: Channel) -> None:
    assert parse_device_topic(device_topic(device_id, channel)) == (device_id, channel)


@settings(max_examples=500, deadline=None)
@given(st.text(max_size=120) | st.from_regex(r"fedge/v1/(devices|broadcast)/.{0,20}(/.{0,10})?"))
def test_parse_topic_raises_only_topic_error(topic: str) -> None:
    try:
        parsed = parse_topic(topic)
    except TopicError:  # any other exception fails the test
        return
    assert parsed.topic == topic
