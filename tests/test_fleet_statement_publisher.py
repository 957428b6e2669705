"""The coordinator's fleet statement publisher, on the in-memory hub with a fake clock.

What a device does with the statement is :mod:`compress.statement`'s
:func:`verify_statement` and :func:`check_targeted`: the tests check the published
statements with exactly those, as a device of the fleet would.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import replace
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from compress.errors import NotTargetedError, ReplayedStatementError, StaleStatementError
from compress.keys import SigningKey
from compress.manifest import Manifest
from compress.signing import TrustedKeys, sign_manifest
from compress.statement import FleetStatement, SignedStatement, check_targeted, verify_statement
from compress.statement import Target as StatementTarget
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.fleet_statement import (
    KEPT_PREVIOUS,
    StatementBook,
    StatementPublisher,
    StatementSettings,
    load_book,
    next_version,
)
from coordinator.errors import FleetStatementError, TargetError
from coordinator.link.fleet import Target
from coordinator.link.memory import MemoryHub
from edge_agent.protocol import Channel, Deploy, Rollback, Status, device_topic
from edge_agent.protocol.messages_fleet import FleetStatementMessage
from edge_agent.protocol.topics import broadcast_topic, statement_broadcast
from tests.clock_support import ManualClock
from tests.conftest import PAYLOAD, make_manifest
from tests.fleet_support import wait_for

FLEET = "plant-a"
TOPIC = broadcast_topic(statement_broadcast(FLEET))
START = datetime(2026, 11, 22, 12, 0, 0, tzinfo=UTC).timestamp()
LIFETIME = 3600.0


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(START)


@pytest.fixture
def hub(clock: ManualClock) -> MemoryHub:
    instance = MemoryHub(clock=clock)
    instance.start()
    for device_id in ("d0", "d1"):
        instance.receive(device_id, Status(online=True, agent_version="0.1.0"))
    return instance


@pytest.fixture
def settings(signing_key: SigningKey, tmp_path: Path) -> StatementSettings:
    return StatementSettings(FLEET, (signing_key,), LIFETIME, tmp_path / "fleet.json")


@pytest.fixture
def publisher(
    hub: MemoryHub, settings: StatementSettings, clock: ManualClock
) -> Iterator[StatementPublisher]:
    """A publisher whose thread stays idle: the test calls refresh_if_due itself."""
    instance = StatementPublisher(hub, settings, clock=clock, check_s=3600.0)
    instance.start()
    yield instance
    instance.stop()


def statements(hub: MemoryHub) -> list[SignedStatement]:
    found = []
    for published in hub.published:
        if published.topic == TOPIC:
            assert published.retained
            message = published.envelope().message
            assert isinstance(message, FleetStatementMessage)
            found.append(SignedStatement.from_bytes(message.statement))
    return found


def as_device(
    signed: SignedStatement, key: SigningKey, now: float, last: int | None = None
) -> FleetStatement:
    """What a device of the fleet trusting ``key`` makes of a statement."""
    trusted = TrustedKeys.of([key.public_key], 1)
    when = datetime.fromtimestamp(now, UTC)
    return verify_statement(signed, trusted, fleet=FLEET, now=when, last_version=last)


def artifact(manifest: Manifest, key: SigningKey) -> Artifact:
    return Artifact(sign_manifest(manifest, [key]), PAYLOAD)


def test_start_publishes_a_retained_statement_a_device_accepts(
    hub: MemoryHub, publisher: StatementPublisher, signing_key: SigningKey, clock: ManualClock
) -> None:
    [signed] = statements(hub)
    statement = as_device(signed, signing_key, clock.now)
    assert statement.fleet == FLEET
    assert statement.targets == {}
    assert statement.version >= int(START * 1000)
    assert statement.expires.timestamp() == START + LIFETIME
    assert publisher.current == signed


def test_a_deploy_is_named_before_its_command_goes_out(
    hub: MemoryHub, publisher: StatementPublisher, signing_key: SigningKey, clock: ManualClock
) -> None:
    sent = artifact(make_manifest(), signing_key)
    with Deliveries(hub, accept_wait_s=0.01) as deliveries:
        deliveries.announce_with(publisher)
        deliveries.deploy(sent, Target.parse("all"))
    topics = [p.topic for p in hub.published]
    first_deploy = topics.index(device_topic("d0", Channel.CMD))
    assert TOPIC in topics[:first_deploy]  # the statement went out first
    named = as_device(statements(hub)[-1], signing_key, clock.now)
    check_targeted(named, sent.manifest)  # a device of the fleet installs it
    # ...and nothing else: an old manifest of another name, or an older version.
    for other in (make_manifest(name="digits-canary", version=1), make_manifest(version=2)):
        with pytest.raises(NotTargetedError):
            check_targeted(named, other)


def test_a_deploy_to_no_device_names_nothing(
    hub: MemoryHub, publisher: StatementPublisher, signing_key: SigningKey
) -> None:
    with Deliveries(hub, accept_wait_s=0.01) as deliveries:
        deliveries.announce_with(publisher)
        with pytest.raises(TargetError):
            deliveries.deploy(artifact(make_manifest(), signing_key), Target.parse("tag:none"))
    assert len(statements(hub)) == 1  # only the one of start()
    assert publisher.targets() == {}


def test_the_statement_is_republished_at_half_its_lifetime(
    hub: MemoryHub, publisher: StatementPublisher, signing_key: SigningKey, clock: ManualClock
) -> None:
    clock.now += LIFETIME / 2 - 1
    assert not publisher.refresh_if_due()
    clock.now += 1
    assert publisher.refresh_if_due()
    first, second = statements(hub)
    old = as_device(first, signing_key, START)
    new = as_device(second, signing_key, clock.now, last=old.version)
    assert new.expires.timestamp() == clock.now + LIFETIME
    # A device that kept only the first one is stale after its expiry; a replay of it
    # is refused by a device that holds the second.
    with pytest.raises(StaleStatementError):
        as_device(first, signing_key, START + LIFETIME)
    with pytest.raises(ReplayedStatementError):
        as_device(first, signing_key, clock.now, last=new.version)


def test_the_refresh_thread_and_a_reconnection_publish_on_their_own(
    hub: MemoryHub, settings: StatementSettings, clock: ManualClock
) -> None:
    publisher = StatementPublisher(hub, settings, clock=clock, check_s=0.02)
    publisher.start()
    try:
        hub.reconnect()
        wait_for(lambda: len(statements(hub)) == 2, what="republished on reconnection")
        clock.now += LIFETIME / 2
        wait_for(lambda: len(statements(hub)) == 3, what="refreshed by the thread")
    finally:
        publisher.stop()
    hub.reconnect()  # stopped: no longer listening
    clock.now += LIFETIME
    assert len(statements(hub)) == 3


def test_a_statement_that_could_not_go_out_is_retried(
    hub: MemoryHub, publisher: StatementPublisher, signing_key: SigningKey, clock: ManualClock
) -> None:
    hub.stop()  # disconnected
    publisher.before_deploy(make_manifest())
    assert len(statements(hub)) == 1
    hub.start()
    assert publisher.refresh_if_due()  # at once, not after half a lifetime
    check_targeted(as_device(statements(hub)[-1], signing_key, clock.now), make_manifest())


def test_a_rollback_names_the_previous_target_once(
    hub: MemoryHub,
    publisher: StatementPublisher,
    signing_key: SigningKey,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    v2, v3 = make_manifest(version=2), make_manifest(version=3)
    with Deliveries(hub, accept_wait_s=0.01) as deliveries:
        deliveries.announce_with(publisher)
        deliveries.deploy(artifact(v2, signing_key), Target.parse("all"))
        deliveries.deploy(artifact(v3, signing_key), Target.parse("all"))
        hub.clear_published()
        deliveries.rollback(Target.parse("all"), "digits")
        topics = [p.topic for p in hub.published]
        assert topics.index(TOPIC) < topics.index(device_topic("d0", Channel.CMD))
        assert isinstance(hub.commands("d0")[-1].message, Rollback)
        check_targeted(as_device(statements(hub)[-1], signing_key, clock.now), v2)
        with caplog.at_level(logging.INFO, "coordinator.delivery.fleet_statement"):
            deliveries.rollback(Target.parse("all"), "digits")  # a rollout's second rollback
        assert len(statements(hub)) == 1
        assert "leaves the statement as it is" in caplog.text
        deliveries.rollback(Target.parse("all"), "never-deployed")
        assert len(statements(hub)) == 1


def test_versions_and_targets_survive_a_restart_even_if_the_clock_goes_back(
    hub: MemoryHub, settings: StatementSettings, signing_key: SigningKey, clock: ManualClock
) -> None:
    first = StatementPublisher(hub, settings, clock=clock)
    first.start()
    first.before_deploy(make_manifest())
    first.stop()
    last = as_device(statements(hub)[-1], signing_key, clock.now)
    clock.now -= 3600  # a clock set back an hour
    again = StatementPublisher(hub, settings, clock=clock)
    again.start()
    again.stop()
    resumed = as_device(statements(hub)[-1], signing_key, clock.now, last=last.version)
    assert resumed.targets == last.targets
    assert resumed.version == last.version + 1


def test_a_broken_or_foreign_state_file_is_a_typed_error(
    settings: StatementSettings, tmp_path: Path
) -> None:
    assert settings.state_file is not None
    settings.state_file.write_text("{not json")
    with pytest.raises(FleetStatementError, match="unreadable fleet statement state"):
        load_book(settings.state_file, FLEET)
    settings.state_file.write_bytes(StatementBook("other").to_json())
    with pytest.raises(FleetStatementError, match="for fleet 'other'"):
        load_book(settings.state_file, FLEET)
    assert load_book(tmp_path / "none.json", FLEET) == StatementBook(FLEET)


def test_the_book_keeps_a_bounded_history() -> None:
    book = StatementBook(FLEET)
    for version in range(1, KEPT_PREVIOUS + 5):
        assert book.name("m", StatementTarget(version, "a" * 64))
    assert not book.name("m", StatementTarget(KEPT_PREVIOUS + 4, "a" * 64))
    assert len(book.previous["m"]) == KEPT_PREVIOUS
    assert StatementBook.from_json(book.to_json(), FLEET) == book


def test_next_version_grows_with_the_clock_and_past_it() -> None:
    assert next_version(0, 1000.0) == 1_000_000
    assert next_version(5_000_000, 1000.0) == 5_000_001


@pytest.mark.parametrize(
    ("changes", "message"),
    [
        ({"fleet": "bad/id"}, "invalid fleet id"),
        ({"keys": ()}, "no signing key"),
        ({"lifetime_s": 1.0}, "lifetime must be"),
        ({"lifetime_s": 10 * 365 * 86400.0}, "lifetime must be"),
    ],
)
def test_bad_settings_are_refused(
    settings: StatementSettings, changes: dict[str, Any], message: str
) -> None:
    with pytest.raises(FleetStatementError, match=message):
        replace(settings, **changes)


def test_deliveries_without_an_announcer_publish_no_statement(
    hub: MemoryHub, signing_key: SigningKey
) -> None:
    with Deliveries(hub, accept_wait_s=0.01) as deliveries:
        deliveries.deploy(artifact(make_manifest(), signing_key), Target.parse("all"))
    assert all(not isinstance(p.envelope().message, FleetStatementMessage) for p in hub.published)
    assert any(isinstance(e.message, Deploy) for e in hub.commands("d0"))
    assert not any(p.retained for p in hub.published)


def test_a_state_file_that_cannot_be_written_stops_the_deploy_with_a_logged_error(
    hub: MemoryHub,
    signing_key: SigningKey,
    tmp_path: Path,
    clock: ManualClock,
    caplog: pytest.LogCaptureFixture,
) -> None:
    blocked = tmp_path / "not-a-dir"
    blocked.write_text("")
    settings = StatementSettings(FLEET, (signing_key,), LIFETIME, blocked / "state.json")
    publisher = StatementPublisher(hub, settings, clock=clock)
    with Deliveries(hub, accept_wait_s=0.01) as deliveries:
        deliveries.announce_with(publisher)
        with pytest.raises(FleetStatementError, match="cannot save the statement state"):
            deliveries.deploy(artifact(make_manifest(), signing_key), Target.parse("all"))
    assert "statement not published" in caplog.text
    assert hub.commands("d0") == []  # no deploy went out unnamed
    assert publisher.targets() == {}  # and a later statement will not name it
