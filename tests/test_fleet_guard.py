"""The device's fleet statement: accepted, kept across restarts, replays refused, stale.

Pure logic with a fake clock; the end-to-end behaviour (real mosquitto, real agent
processes) is in tests/test_fleet_statement_mqtt.py.
"""

from __future__ import annotations

import logging
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from compress.errors import NoStatementError, NotTargetedError, StaleStatementError
from compress.keys import SigningKey, generate_signing_key
from compress.signing import TrustedKeys
from compress.statement import FleetStatement, Target, sign_statement
from edge_agent.ota.fleet_guard import STATEMENT_FILE, FleetGuard
from edge_agent.protocol import FleetStatementMessage, broadcast_topic
from tests.clock_support import ManualClock
from tests.conftest import NOW, make_manifest

KEY = generate_signing_key()
TRUSTED = TrustedKeys.of([KEY.public_key])
MANIFEST = make_manifest()


def message(
    version: int, *, key: SigningKey = KEY, lifetime_s: int = 60, **kw: Any
) -> FleetStatementMessage:
    fields: dict[str, Any] = {
        "fleet": "plant-a",
        "version": version,
        "issued": NOW,
        "targets": {"digits": Target(MANIFEST.version, MANIFEST.sha256)},
    }
    fields.update(kw)
    fields["expires"] = fields["issued"] + timedelta(seconds=lifetime_s)
    return FleetStatementMessage(
        statement=sign_statement(FleetStatement(**fields), [key]).to_bytes()
    )


@pytest.fixture
def clock() -> ManualClock:
    return ManualClock(NOW.timestamp())


def guard(data_dir: Path, clock: ManualClock, fleet: str | None = "plant-a") -> FleetGuard:
    return FleetGuard(fleet, data_dir, trusted=lambda: TRUSTED, clock=clock)


def test_a_statement_is_accepted_kept_and_vouches_for_what_it_names(
    tmp_path: Path, clock: ManualClock
) -> None:
    fleet = guard(tmp_path, clock)
    assert fleet.subscriptions() == (broadcast_topic("fleet.plant-a"),)
    assert fleet.wants_broadcast("fleet.plant-a")
    assert not fleet.wants_broadcast("fleet.plant-b")
    assert fleet.on_statement(message(3))
    fleet.require_targeted(MANIFEST, NOW)
    with pytest.raises(NotTargetedError):
        fleet.require_targeted(make_manifest(name="digits-canary", version=1), NOW)
    assert (tmp_path / STATEMENT_FILE).read_bytes() == message(3).statement
    assert fleet.to_json() == {
        "fleet": "plant-a",
        "statement_version": 3,
        "statement_expires": "2026-11-22T12:01:00Z",
        "stale": False,
    }


def test_the_retained_statement_again_is_ignored_quietly(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = guard(tmp_path, clock)
    assert fleet.on_statement(message(3))
    with caplog.at_level(logging.INFO, logger="edge_agent.ota.fleet_guard"):
        assert not fleet.on_statement(message(3))  # a reconnect re-delivers it
    assert caplog.records == []


def test_a_replayed_older_statement_is_refused_even_after_a_restart(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    fleet = guard(tmp_path, clock)
    old, new = message(3, targets={}), message(4)
    assert fleet.on_statement(old)
    assert fleet.on_statement(new)
    restarted = guard(tmp_path, clock)
    assert restarted.held is not None
    assert restarted.held.version == 4
    with caplog.at_level(logging.WARNING, logger="edge_agent.ota.fleet_guard"):
        assert not restarted.on_statement(old)
    assert "refused a fleet statement: replayed_statement" in caplog.text
    restarted.require_targeted(MANIFEST, NOW)  # still the newer one


def test_an_expired_kept_statement_still_sets_the_version_floor(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    assert guard(tmp_path, clock).on_statement(message(5))
    clock.now += 3600
    restarted = guard(tmp_path, clock)
    assert restarted.stale()
    with caplog.at_level(logging.WARNING, logger="edge_agent.ota.fleet_guard"):
        assert not restarted.on_statement(
            message(5, issued=NOW + timedelta(hours=1), lifetime_s=7200)
        )
    assert "replayed_statement" in caplog.text
    assert restarted.on_statement(message(6, lifetime_s=7200))
    assert not restarted.stale()


@pytest.mark.parametrize(
    ("bad", "code"),
    [
        (lambda: message(3, key=generate_signing_key()), "unknown_key"),
        (lambda: message(3, fleet="plant-b"), "wrong_fleet"),
        (lambda: message(3, issued=NOW - timedelta(hours=2), lifetime_s=60), "stale_statement"),
        (lambda: FleetStatementMessage(statement=b"FFS1 garbage"), "bad_statement"),
    ],
)
def test_bad_statements_are_refused_with_a_logged_code(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture, bad: Any, code: str
) -> None:
    fleet = guard(tmp_path, clock)
    with caplog.at_level(logging.WARNING, logger="edge_agent.ota.fleet_guard"):
        assert not fleet.on_statement(bad())
    assert f"refused a fleet statement: {code}" in caplog.text
    assert fleet.held is None
    assert not (tmp_path / STATEMENT_FILE).exists()


def test_stale_without_a_statement_and_after_expiry(tmp_path: Path, clock: ManualClock) -> None:
    fleet = guard(tmp_path, clock)
    assert fleet.stale()
    assert fleet.seconds_to_expiry() is None
    with pytest.raises(NoStatementError):
        fleet.require_targeted(MANIFEST, NOW)
    assert fleet.stale_changed()  # stale from the start: announced once
    assert not fleet.stale_changed()

    assert fleet.on_statement(message(1, lifetime_s=3))
    assert not fleet.stale()
    assert fleet.stale_changed()
    assert fleet.seconds_to_expiry() == 3.0
    clock.now += 2.5
    assert fleet.seconds_to_expiry() == 0.5
    assert not fleet.stale_changed()
    clock.now += 0.5
    assert fleet.stale()
    assert fleet.seconds_to_expiry() is None
    assert fleet.stale_changed()
    with pytest.raises(StaleStatementError):
        fleet.require_targeted(MANIFEST, NOW + timedelta(seconds=3))


def test_a_damaged_kept_statement_is_ignored_and_logged(
    tmp_path: Path, clock: ManualClock, caplog: pytest.LogCaptureFixture
) -> None:
    path = tmp_path / STATEMENT_FILE
    path.parent.mkdir()
    path.write_bytes(message(3, key=generate_signing_key()).statement)  # planted
    with caplog.at_level(logging.ERROR, logger="edge_agent.ota.fleet_guard"):
        fleet = guard(tmp_path, clock)
    assert fleet.held is None
    assert "ignoring the kept fleet statement" in caplog.text


def test_without_a_fleet_nothing_changes(tmp_path: Path, clock: ManualClock) -> None:
    fleet = guard(tmp_path, clock, fleet=None)
    assert not fleet.enabled
    assert fleet.subscriptions() == ()
    assert not fleet.wants_broadcast("fleet.plant-a")
    assert not fleet.stale()
    assert not fleet.stale_changed()
    assert fleet.seconds_to_expiry() is None
    assert not fleet.on_statement(message(1))
    assert not (tmp_path / STATEMENT_FILE).exists()
