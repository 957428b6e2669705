"""The per-device state machine of one deployment."""

from __future__ import annotations

import json

import pytest

from coordinator.delivery.tracker import (
    SETTLED_STATES,
    TERMINAL_STATES,
    DeploymentTracker,
    DeployResult,
    DeviceProgress,
    DeviceState,
)
from edge_agent.protocol import InstallState, InstallStatus

DEP = "dep-1"


def tracker(
    online: tuple[str, ...] = ("a", "b"), offline: tuple[str, ...] = ()
) -> DeploymentTracker:
    return DeploymentTracker(
        deployment_id=DEP, model="digits", version=3, online=online, offline=offline, now=0.0
    )


def report(
    state: InstallState,
    *,
    deployment_id: str = DEP,
    model: str | None = None,
    version: int | None = None,
    chunks_held: int = 0,
    chunks_total: int = 0,
    error_code: str | None = None,
    reason: str | None = None,
) -> InstallStatus:
    return InstallStatus(
        deployment_id=deployment_id,
        state=state,
        model=model,
        version=version,
        chunks_held=chunks_held,
        chunks_total=chunks_total,
        error_code=error_code,
        reason=reason,
    )


def state(t: DeploymentTracker, device_id: str) -> DeviceState:
    p = t.get(device_id)
    assert p is not None
    return p.state


def test_initial_states() -> None:
    t = tracker(online=("b", "a"), offline=("c",))
    assert [(p.device_id, p.state) for p in t.progress()] == [
        ("a", DeviceState.PENDING),
        ("b", DeviceState.PENDING),
        ("c", DeviceState.OFFLINE),
    ]
    assert all(p.updated_at == 0.0 for p in t.progress())
    assert not t.settled
    assert not t.succeeded


def test_duplicate_ids_are_kept_once_and_overlap_is_refused() -> None:
    assert len(tracker(online=("a", "a")).progress()) == 1
    with pytest.raises(ValueError, match="a"):
        tracker(online=("a",), offline=("a",))


def test_state_sets() -> None:
    assert DeviceState.OFFLINE not in TERMINAL_STATES
    assert DeviceState.OFFLINE in SETTLED_STATES
    assert DeviceState.TIMED_OUT in TERMINAL_STATES
    assert DeviceState.PENDING not in SETTLED_STATES
    # every install state has a device state of the same name
    assert {str(s) for s in InstallState} <= {str(s) for s in DeviceState}


def test_happy_path_to_installed() -> None:
    t = tracker(online=("a",))
    assert t.on_status("a", report(InstallState.ACCEPTED, model="digits", version=3), 1)
    assert t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=3, chunks_total=10), 2)
    p = t.get("a")
    assert p is not None
    assert (p.state, p.chunks_held, p.chunks_total, p.version, p.updated_at) == (
        DeviceState.DOWNLOADING,
        3,
        10,
        3,
        2,
    )
    assert t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=10, chunks_total=10), 3)
    assert t.on_status("a", report(InstallState.VERIFYING), 4)
    assert t.on_status("a", report(InstallState.INSTALLING), 5)
    assert not t.summary()["settled"]  # (a property read mypy would narrow)
    assert t.on_status("a", report(InstallState.INSTALLED, version=3), 6)
    p = t.get("a")
    assert p is not None
    assert p.state is DeviceState.INSTALLED
    assert (p.chunks_held, p.chunks_total) == (10, 10)  # kept when later reports omit them
    assert t.settled
    assert t.succeeded


def test_other_deployment_and_unknown_device_are_ignored() -> None:
    t = tracker(online=("a",))
    assert not t.on_status("a", report(InstallState.INSTALLED, deployment_id="dep-2"), 1)
    assert not t.on_status("zz", report(InstallState.INSTALLED), 1)
    assert state(t, "a") is DeviceState.PENDING
    assert t.get("zz") is None


def test_duplicate_report_changes_nothing_and_keeps_updated_at() -> None:
    t = tracker(online=("a",))
    assert t.on_status("a", report(InstallState.ACCEPTED), 1)
    assert not t.on_status("a", report(InstallState.ACCEPTED), 5)
    p = t.get("a")
    assert p is not None
    assert p.updated_at == 1


def test_stale_earlier_stage_is_ignored() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.VERIFYING), 1)
    assert not t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=9, chunks_total=10), 2)
    assert not t.on_status("a", report(InstallState.ACCEPTED), 2)
    assert state(t, "a") is DeviceState.VERIFYING


def test_stale_download_report_with_fewer_chunks_is_ignored() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=7, chunks_total=10), 1)
    assert not t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=5, chunks_total=10), 2)
    p = t.get("a")
    assert p is not None
    assert p.chunks_held == 7
    # a different transfer size is a new transfer: taken as reported
    assert t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=1, chunks_total=20), 3)


def test_failure_outcomes_carry_code_and_reason() -> None:
    t = tracker(online=("a", "b", "c"))
    t.on_status("a", report(InstallState.FAILED, error_code="io_error", reason="disk full"), 1)
    t.on_status("b", report(InstallState.REJECTED, error_code="rollback", reason="v3 <= v5"), 1)
    t.on_status("c", report(InstallState.ROLLED_BACK, error_code="health_check", version=2), 1)
    a, b, c = t.progress()
    assert (a.state, a.error_code, a.reason) == (DeviceState.FAILED, "io_error", "disk full")
    assert (b.state, b.error_code) == (DeviceState.REJECTED, "rollback")
    assert (c.state, c.version) == (DeviceState.ROLLED_BACK, 2)
    assert t.settled
    assert not t.succeeded


def test_stale_progress_after_terminal_is_ignored() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.FAILED, error_code="io_error"), 1)
    for stage in (InstallState.ACCEPTED, InstallState.DOWNLOADING, InstallState.INSTALLING):
        assert not t.on_status("a", report(stage), 2)
    assert state(t, "a") is DeviceState.FAILED


@pytest.mark.parametrize("first", [InstallState.FAILED, InstallState.REJECTED])
def test_installed_after_failure_is_accepted_and_clears_error(first: InstallState) -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(first, error_code="io_error", reason="flaky"), 1)
    assert t.on_status("a", report(InstallState.INSTALLED, version=3), 2)
    p = t.get("a")
    assert p is not None
    assert (p.state, p.error_code, p.reason) == (DeviceState.INSTALLED, None, None)
    assert t.succeeded


def test_installed_is_undone_only_by_rollback() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.INSTALLED), 1)
    assert not t.on_status("a", report(InstallState.FAILED), 2)
    assert not t.on_status("a", report(InstallState.REJECTED, error_code="rollback"), 2)
    assert not t.on_status("a", report(InstallState.DOWNLOADING), 2)
    assert state(t, "a") is DeviceState.INSTALLED
    assert t.on_status("a", report(InstallState.ROLLED_BACK, error_code="health_check"), 3)
    assert state(t, "a") is DeviceState.ROLLED_BACK
    assert not t.succeeded


def test_rolled_back_is_like_failed_a_retry_may_install() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.ROLLED_BACK), 1)
    for s in (InstallState.FAILED, InstallState.ACCEPTED, InstallState.DOWNLOADING):
        assert not t.on_status("a", report(s), 2)
    assert t.get("a").state is DeviceState.ROLLED_BACK  # type: ignore[union-attr]
    assert t.on_status("a", report(InstallState.INSTALLED), 3)
    assert t.get("a").state is DeviceState.INSTALLED  # type: ignore[union-attr]


def test_failure_states_do_not_replace_each_other_but_refresh_details() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.FAILED, reason="first"), 1)
    assert not t.on_status("a", report(InstallState.REJECTED), 2)
    assert t.on_status("a", report(InstallState.FAILED, reason="second"), 3)
    p = t.get("a")
    assert p is not None
    assert (p.state, p.reason, p.updated_at) == (DeviceState.FAILED, "second", 3)


def test_offline_online_cycle() -> None:
    t = tracker(online=("a", "b"))
    t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=4, chunks_total=10), 1)
    assert t.on_offline("a", 2)
    p = t.get("a")
    assert p is not None
    assert (p.state, p.chunks_held) == (DeviceState.OFFLINE, 4)
    assert not t.on_offline("a", 3)  # already offline
    assert t.on_online("a", 4)
    assert state(t, "a") is DeviceState.PENDING
    assert not t.on_online("a", 5)  # not offline: nothing to resend
    assert not t.on_online("b", 5)


def test_offline_does_not_touch_outcomes_or_unknown_devices() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.INSTALLED), 1)
    assert not t.on_offline("a", 2)
    assert state(t, "a") is DeviceState.INSTALLED
    assert not t.on_offline("zz", 2)
    assert not t.on_online("zz", 2)


def test_offline_device_takes_outcomes_but_not_stale_stages() -> None:
    t = tracker(online=("a", "b"))
    t.on_offline("a", 1)
    t.on_offline("b", 1)
    assert not t.on_status("a", report(InstallState.DOWNLOADING, chunks_held=5, chunks_total=9), 2)
    assert state(t, "a") is DeviceState.OFFLINE
    assert t.on_status("a", report(InstallState.INSTALLED), 3)
    assert t.on_status("b", report(InstallState.FAILED), 3)
    assert state(t, "a") is DeviceState.INSTALLED
    assert state(t, "b") is DeviceState.FAILED


def test_settled_and_succeeded_with_offline_devices() -> None:
    t = tracker(online=("a",), offline=("b",))
    assert not t.summary()["settled"]
    t.on_status("a", report(InstallState.INSTALLED), 1)
    assert t.settled
    assert t.succeeded  # b gets it when it comes back


def test_not_succeeded_when_every_device_is_offline() -> None:
    t = tracker(online=(), offline=("a", "b"))
    assert t.settled
    assert not t.succeeded
    t2 = tracker(online=("a",))
    t2.on_offline("a", 1)
    assert t2.settled
    assert not t2.succeeded


def test_empty_deployment_is_settled_not_succeeded() -> None:
    t = tracker(online=())
    assert t.settled
    assert not t.succeeded


def test_expire_before_deadline_does_nothing() -> None:
    t = tracker(online=("a",))
    assert t.expire(99, deadline=100) == []
    assert state(t, "a") is DeviceState.PENDING


def test_expire_times_out_unsettled_only() -> None:
    t = tracker(online=("a", "b", "c"), offline=("d",))
    t.on_status("a", report(InstallState.INSTALLED), 1)
    t.on_status("b", report(InstallState.DOWNLOADING, chunks_held=2, chunks_total=10), 1)
    assert t.expire(100, deadline=100) == ["b", "c"]
    a, b, c, d = t.progress()
    assert a.state is DeviceState.INSTALLED
    assert (b.state, b.chunks_held, b.updated_at) == (DeviceState.TIMED_OUT, 2, 100)
    assert b.reason == "still downloading at the deadline"
    assert c.state is DeviceState.TIMED_OUT
    assert d.state is DeviceState.OFFLINE
    assert t.settled
    assert not t.succeeded
    assert t.expire(200, deadline=100) == []


def test_late_outcome_replaces_timeout_but_late_stage_does_not() -> None:
    t = tracker(online=("a", "b"))
    t.expire(10, deadline=10)
    assert not t.on_status("a", report(InstallState.INSTALLING), 11)
    assert state(t, "a") is DeviceState.TIMED_OUT
    assert t.on_status("a", report(InstallState.INSTALLED), 12)
    assert t.on_status("b", report(InstallState.REJECTED, error_code="expired"), 12)
    assert state(t, "a") is DeviceState.INSTALLED
    p = t.get("a")
    assert p is not None
    assert p.reason is None


def test_counts() -> None:
    t = tracker(online=("a", "b", "c"), offline=("d",))
    t.on_status("a", report(InstallState.INSTALLED), 1)
    t.on_status("b", report(InstallState.INSTALLED), 1)
    counts = t.counts()
    assert set(counts) == set(DeviceState)
    assert counts[DeviceState.INSTALLED] == 2
    assert counts[DeviceState.PENDING] == 1
    assert counts[DeviceState.OFFLINE] == 1
    assert counts[DeviceState.FAILED] == 0
    assert sum(counts.values()) == 4


def test_summary_is_json_able_and_complete() -> None:
    t = tracker(online=("a",), offline=("b",))
    t.on_status(
        "a",
        report(InstallState.DOWNLOADING, chunks_held=1, chunks_total=2, version=3),
        1.5,
    )
    summary = json.loads(json.dumps(t.summary()))
    assert summary["deployment_id"] == DEP
    assert summary["model"] == "digits"
    assert summary["version"] == 3
    assert summary["succeeded"] is False
    assert summary["settled"] is False
    assert summary["counts"]["downloading"] == 1
    assert summary["counts"]["offline"] == 1
    assert summary["devices"][0] == {
        "device_id": "a",
        "state": "downloading",
        "chunks_held": 1,
        "chunks_total": 2,
        "version": 3,
        "error_code": None,
        "reason": None,
        "updated_at": 1.5,
    }
    assert summary["devices"][1]["state"] == "offline"


def test_result_is_a_frozen_snapshot() -> None:
    t = tracker(online=("a",))
    result = t.result()
    t.on_status("a", report(InstallState.INSTALLED), 1)
    assert isinstance(result, DeployResult)
    assert result.succeeded is False
    assert result.devices[0].state is DeviceState.PENDING
    assert t.result().succeeded is True
    assert t.result().counts()[DeviceState.INSTALLED] == 1
    with pytest.raises(AttributeError):
        result.succeeded = True  # type: ignore[misc]
    with pytest.raises(AttributeError):
        result.devices[0].state = DeviceState.FAILED  # type: ignore[misc]


def test_result_to_json_matches_summary_without_settled() -> None:
    t = tracker(online=("a",))
    t.on_status("a", report(InstallState.INSTALLED), 1)
    doc = t.result().to_json()
    summary = t.summary()
    assert summary.pop("settled") is True
    assert doc == summary
    assert json.loads(json.dumps(doc)) == doc


def test_device_progress_defaults() -> None:
    p = DeviceProgress("a", DeviceState.PENDING)
    assert (p.chunks_held, p.chunks_total, p.version, p.error_code, p.reason) == (
        0,
        0,
        None,
        None,
        None,
    )
