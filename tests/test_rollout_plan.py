"""The staged-rollout engine: stages, judging, halts, presence, operators, persistence."""

from __future__ import annotations

import json
from collections.abc import Iterable, Sequence
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from coordinator.delivery.tracker import DeviceState
from coordinator.errors import RolloutError
from coordinator.rollout.actions import (
    Action,
    RolloutState,
    SendDeploy,
    SendRollback,
    StageReleased,
    StateChanged,
)
from coordinator.rollout.devices import Marker, RolloutArtifact, RolloutDeviceState
from coordinator.rollout.engine import Rollout
from coordinator.rollout.health import P95_NOISE_MS, HealthSample, combine_baseline
from coordinator.rollout.policy import DEFAULT_MIN_FAILED_DEVICES, HealthPolicy, RolloutPolicy

ART = RolloutArtifact("digits", 3, "ab" * 32)
T0 = 1_700_000_000.0
IDS = tuple(f"d{i:02d}" for i in range(20))


def make(
    devices: Sequence[str] = IDS,
    *,
    online: Iterable[str] | None = None,
    seed: int = 7,
    canary: str = "2",
    waves: str = "50,100",
    soak: str = "60s",
    max_failure: str = "10%",
    min_reports: int = 1,
    rollback_on_halt: bool = True,
    install_timeout: str = "10m",
    health: HealthPolicy | None = None,
    min_failed_devices: int = 1,
) -> Rollout:
    policy = RolloutPolicy.parse(
        canary=canary,
        waves=waves,
        soak=soak,
        max_failure=max_failure,
        min_reports=min_reports,
        rollback_on_halt=rollback_on_halt,
        install_timeout=install_timeout,
        health=health,
        min_failed_devices=min_failed_devices,
    )
    return Rollout(
        rollout_id="r1",
        artifact=ART,
        policy=policy,
        devices=devices,
        online=set(devices if online is None else online),
        seed=seed,
        now=T0,
    )


def install(rollout: Rollout, ids: Iterable[str], now: float) -> list[Action]:
    actions: list[Action] = []
    for device_id in ids:
        actions += rollout.on_install_status(device_id, DeviceState.INSTALLED, now)
    return actions


def status(rollout: Rollout, device_id: str) -> str:
    device = rollout.device(device_id)
    assert device is not None
    return str(device.status)


def d05_away(**kwargs: Any) -> Rollout:
    """Seed 1's rollout of IDS, d05 (a canary device) gone offline before the start."""
    rollout = make(seed=1, **kwargs)
    assert "d05" in rollout.stage_devices(0)
    rollout.on_offline("d05", T0)
    return rollout


def started(**kwargs: Any) -> Rollout:
    rollout = make(**kwargs)
    rollout.start(T0)
    return rollout


# --------------------------------------------------------------------------- stages


def test_stages_of_twenty_devices() -> None:
    rollout = make()
    sizes = [len(rollout.stage_devices(i)) for i in range(rollout.stages)]
    assert sizes == [2, 8, 10]
    members = [d for i in range(rollout.stages) for d in rollout.stage_devices(i)]
    assert sorted(members) == list(IDS)
    assert rollout.state is RolloutState.CREATED
    assert rollout.stage == 0
    assert all(status(rollout, d) == "waiting" for d in IDS)


def test_stage_order_is_seeded_and_ignores_input_order() -> None:
    first = make(seed=1)
    again = make(list(reversed(IDS)), seed=1)
    other = make(seed=2)
    assert [first.stage_devices(i) for i in range(3)] == [again.stage_devices(i) for i in range(3)]
    assert [first.stage_devices(i) for i in range(3)] != [other.stage_devices(i) for i in range(3)]
    # Shuffled, not simply cut in id order.
    assert first.stage_devices(0) + first.stage_devices(1) != IDS[:10]


def test_single_device_rollout() -> None:
    rollout = make(["solo"])
    assert rollout.stages == 1
    assert rollout.start(T0)[-1] == SendDeploy(("solo",))
    install(rollout, ["solo"], T0 + 1)
    assert rollout.tick(T0 + 59) == []
    assert rollout.tick(T0 + 60) == [
        StateChanged(RolloutState.RUNNING, RolloutState.COMPLETED, "every stage passed")
    ]


def test_canary_percent_rounds_up() -> None:
    rollout = make(IDS[:15], canary="10%", waves="100")
    assert len(rollout.stage_devices(0)) == 2  # 1.5 devices
    assert len(rollout.stage_devices(1)) == 13


def test_creation_refuses_bad_input() -> None:
    with pytest.raises(RolloutError, match="no device"):
        make([])
    with pytest.raises(RolloutError, match="invalid device id"):
        make(["ok", "not ok"])
    with pytest.raises(RolloutError, match="sha256"):
        RolloutArtifact("digits", 3, "xyz")
    with pytest.raises(RolloutError, match="version"):
        RolloutArtifact("digits", -1, "ab" * 32)


# --------------------------------------------------------------------------- happy path


def test_happy_path_waits_for_each_soak() -> None:
    rollout = make()
    canary, wave1, wave2 = (rollout.stage_devices(i) for i in range(3))
    assert rollout.start(T0) == [
        StateChanged(RolloutState.CREATED, RolloutState.RUNNING, "started"),
        StageReleased(0, canary),
        SendDeploy(canary),
    ]
    assert all(status(rollout, d) == "pending" for d in canary)
    assert all(status(rollout, d) == "waiting" for d in wave1 + wave2)
    assert install(rollout, canary, T0 + 5) == []
    # All reports are in, but nothing advances before the soak has elapsed.
    assert rollout.tick(T0 + 30) == []
    assert rollout.tick(T0 + 59.9) == []
    assert rollout.stage == 0
    assert rollout.tick(T0 + 60) == [StageReleased(1, wave1), SendDeploy(wave1)]
    assert rollout.stage == 1
    install(rollout, wave1, T0 + 70)
    assert rollout.tick(T0 + 119) == []  # the soak counts from the release, at T0 + 60
    assert rollout.tick(T0 + 120) == [StageReleased(2, wave2), SendDeploy(wave2)]
    install(rollout, wave2, T0 + 130)
    assert rollout.tick(T0 + 179) == []
    assert rollout.tick(T0 + 180) == [
        StateChanged(RolloutState.RUNNING, RolloutState.COMPLETED, "every stage passed")
    ]
    assert rollout.state is RolloutState.COMPLETED
    assert rollout.tick(T0 + 1000) == []
    summary = rollout.summary()
    assert summary["counts"]["installed"] == 20
    assert summary["started_at"] == T0
    assert summary["finished_at"] == T0 + 180
    with pytest.raises(RolloutError, match="starts only once"):
        rollout.start(T0 + 1000)


def test_no_reports_no_advance() -> None:
    rollout = started()
    assert rollout.tick(T0 + 599) == []  # the install timeout is 600 s
    assert rollout.stage == 0


def test_zero_soak_advances_one_stage_per_tick() -> None:
    rollout = started(soak="0")
    install(rollout, rollout.stage_devices(0), T0)
    actions = rollout.tick(T0)
    assert actions[0] == StageReleased(1, rollout.stage_devices(1))
    assert rollout.tick(T0) == []  # the new stage has no report yet


# --------------------------------------------------------------------------- halts


def test_halt_after_canary_rolls_back_the_installed_device() -> None:
    rollout = started()
    good, bad = rollout.stage_devices(0)
    assert rollout.on_install_status(good, DeviceState.INSTALLED, T0 + 5) == []
    actions = rollout.on_install_status(bad, DeviceState.FAILED, T0 + 6, error="bad_signature")
    assert actions == [
        StateChanged(RolloutState.RUNNING, RolloutState.HALTED, rollout.halt_reason or ""),
        SendRollback((good,), f"rollout r1 halted: {rollout.halt_reason}"),
    ]
    assert rollout.halt_reason == "1 of 2 devices of stage 0 failed; at most 10% may fail"
    assert status(rollout, good) == "reverting"
    assert status(rollout, bad) == "failed"
    assert rollout.device_states()[bad] == RolloutDeviceState(
        0, DeviceState.FAILED, "bad_signature", T0 + 6
    )
    # The device confirms; nothing else happens, ever.
    assert rollout.on_install_status(good, DeviceState.ROLLED_BACK, T0 + 7) == []
    assert status(rollout, good) == "reverted"
    assert rollout.tick(T0 + 10_000) == []
    assert rollout.on_online(good, T0 + 10_001) == []
    with pytest.raises(RolloutError, match=r"halted .*start a new rollout"):
        rollout.resume(T0 + 10_002, "alice")
    with pytest.raises(RolloutError):
        rollout.pause(T0 + 10_002, "alice")
    summary = rollout.summary()
    assert summary["state"] == "halted"
    assert summary["halt_reason"] == rollout.halt_reason
    assert summary["stage_details"][0]["failed"] == 1
    assert summary["stage_details"][0]["reported"] == 2


def test_a_halted_rollout_releases_nothing_however_long_it_waits() -> None:
    # What the real-broker halt tests no longer wait seconds to see.
    rollout = started(soak="1s")
    good, bad = rollout.stage_devices(0)
    later = rollout.stage_devices(1) + rollout.stage_devices(2)
    install(rollout, [good], T0 + 1)
    rollout.on_install_status(bad, DeviceState.FAILED, T0 + 2)
    assert rollout.state is RolloutState.HALTED
    assert rollout.on_install_status(good, DeviceState.ROLLED_BACK, T0 + 3) == []
    for seconds in (4, 5, 61, 3600, 86_400):  # many soaks, the install timeout, a day
        assert rollout.tick(T0 + seconds) == []
    assert rollout.on_offline(later[0], T0 + 86_401) == []
    assert rollout.on_online(later[0], T0 + 86_402) == []
    assert rollout.tick(T0 + 86_403) == []
    assert (rollout.state, rollout.stage) == (RolloutState.HALTED, 0)
    assert {status(rollout, d) for d in later} == {"waiting"}


def test_halt_without_rollback_policy() -> None:
    rollout = started(rollback_on_halt=False)
    good, bad = rollout.stage_devices(0)
    install(rollout, [good], T0 + 1)
    actions = rollout.on_install_status(bad, DeviceState.REJECTED, T0 + 2)
    assert [type(a) for a in actions] == [StateChanged]
    assert status(rollout, good) == "installed"


def test_failed_rollback_is_reported() -> None:
    rollout = started()
    good, bad = rollout.stage_devices(0)
    install(rollout, [good], T0 + 1)
    rollout.on_install_status(bad, DeviceState.FAILED, T0 + 2)
    rollout.on_install_status(good, DeviceState.FAILED, T0 + 3, error="no_previous_model")
    assert status(rollout, good) == "revert_failed"
    assert rollout.device_states()[good].detail == "no_previous_model"
    rollout.on_install_status(good, DeviceState.ROLLED_BACK, T0 + 4)
    assert status(rollout, good) == "reverted"


def test_early_halt_before_the_soak() -> None:
    # Stage 1 holds 8 devices; 25% allows 2 failures of 8, the third is one too many.
    rollout = started(max_failure="25%", soak="1h")
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 3600)
    wave = rollout.stage_devices(1)
    now = T0 + 3601
    assert rollout.on_install_status(wave[0], DeviceState.FAILED, now) == []
    assert rollout.on_install_status(wave[1], DeviceState.FAILED, now) == []
    install(rollout, wave[3:5], now)
    actions = rollout.on_install_status(wave[2], DeviceState.FAILED, now)
    assert actions[0] == StateChanged(
        RolloutState.RUNNING,
        RolloutState.HALTED,
        "3 of 8 devices of stage 1 failed; at most 25% may fail",
    )
    assert actions[1] == SendRollback(wave[3:5], f"rollout r1 halted: {rollout.halt_reason}")
    # The canary passed: it keeps the new version.
    assert all(status(rollout, d) == "installed" for d in rollout.stage_devices(0))


# ------------------------------------------------ halt rule: not one device alone
# Issue 17: with a canary of one and 0% failures allowed, one device reporting
# "failed" halted (and rolled back) every rollout it was part of. Now a stage fails
# only from min(min_failed_devices, stage size) failed devices (default 2).


def test_one_failing_device_does_not_halt_a_stage_of_many() -> None:
    rollout = started(max_failure="0%", min_failed_devices=DEFAULT_MIN_FAILED_DEVICES)
    canary = rollout.stage_devices(0)
    install(rollout, canary[:1], T0 + 1)
    # The hostile (or broken) device: its failure alone changes nothing...
    assert rollout.on_install_status(canary[1], DeviceState.FAILED, T0 + 2) == []
    assert rollout.state is RolloutState.RUNNING
    assert status(rollout, canary[0]) == "installed"
    # ...and after the soak the stage passes on the other device's success.
    actions = rollout.tick(T0 + 61)
    assert rollout.state is RolloutState.RUNNING
    assert rollout.stage == 1
    assert any(isinstance(a, SendDeploy) for a in actions)
    assert rollout.halt_reason is None


def test_two_failing_devices_halt_a_stage_with_the_default_rule() -> None:
    rollout = started(max_failure="0%", min_failed_devices=DEFAULT_MIN_FAILED_DEVICES)
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 61)
    wave = rollout.stage_devices(1)
    assert rollout.on_install_status(wave[0], DeviceState.FAILED, T0 + 62) == []
    actions = rollout.on_install_status(wave[1], DeviceState.FAILED, T0 + 62)
    assert actions[0] == StateChanged(
        RolloutState.RUNNING,
        RolloutState.HALTED,
        "2 of 8 devices of stage 1 failed; at most 0% may fail",
    )


def test_a_canary_of_one_that_fails_still_halts() -> None:
    rollout = started(canary="1", max_failure="0%", min_failed_devices=DEFAULT_MIN_FAILED_DEVICES)
    [device] = rollout.stage_devices(0)
    actions = rollout.on_install_status(device, DeviceState.FAILED, T0 + 1)
    assert actions == [
        StateChanged(
            RolloutState.RUNNING,
            RolloutState.HALTED,
            "1 of 1 devices of stage 0 failed; at most 0% may fail",
        )
    ]


def test_the_share_still_counts_above_the_device_floor() -> None:
    # Stage 1 of 8, 25% allowed: 2 failures reach the floor but not the share.
    rollout = started(max_failure="25%", min_failed_devices=2)
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 61)
    wave = rollout.stage_devices(1)
    for device in wave[:2]:
        assert rollout.on_install_status(device, DeviceState.FAILED, T0 + 62) == []
    install(rollout, wave[2:], T0 + 62)
    rollout.tick(T0 + 200)
    assert rollout.state is RolloutState.RUNNING
    assert rollout.stage == 2  # stage 1 passed with 2 of 8 failed


def test_a_floor_of_one_restores_any_failure_halts() -> None:
    rollout = started(max_failure="0%", min_failed_devices=1)
    actions = rollout.on_install_status(rollout.stage_devices(0)[0], DeviceState.FAILED, T0 + 1)
    assert actions[0].new is RolloutState.HALTED  # type: ignore[union-attr]


def test_the_default_policy_has_a_floor_of_two_and_old_policies_keep_one() -> None:
    assert RolloutPolicy().min_failed_devices == DEFAULT_MIN_FAILED_DEVICES == 2
    policy = RolloutPolicy.parse(min_failed_devices=3)
    assert RolloutPolicy.from_json(policy.to_json()) == policy
    saved_before = {k: v for k, v in policy.to_json().items() if k != "min_failed_devices"}
    assert RolloutPolicy.from_json(saved_before).min_failed_devices == 1


@pytest.mark.parametrize("bad", [0, -1, True, 1.5])
def test_a_bad_floor_is_refused(bad: object) -> None:
    with pytest.raises(RolloutError, match="min failed devices"):
        RolloutPolicy(min_failed_devices=bad)  # type: ignore[arg-type]


def test_after_the_soak_waits_for_devices_that_may_still_report() -> None:
    # Stage 1 of 8, max 25%: 2 failed + 2 installed is 50% of the reports, but 4 are
    # still installing and could bring it to 25%.
    rollout = started(max_failure="25%")
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 60)
    wave = rollout.stage_devices(1)
    rollout.on_install_status(wave[0], DeviceState.FAILED, T0 + 61)
    rollout.on_install_status(wave[1], DeviceState.FAILED, T0 + 61)
    install(rollout, wave[2:4], T0 + 61)
    assert rollout.tick(T0 + 200) == []
    assert rollout.summary()["failure_rate"] == 0.5
    install(rollout, wave[4:], T0 + 201)
    assert rollout.tick(T0 + 202)[0] == StageReleased(2, rollout.stage_devices(2))


def test_after_the_soak_halts_when_no_device_can_report_any_more() -> None:
    rollout = started(max_failure="25%")
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 60)
    wave = rollout.stage_devices(1)
    rollout.on_install_status(wave[0], DeviceState.FAILED, T0 + 61)
    rollout.on_install_status(wave[1], DeviceState.FAILED, T0 + 61)
    install(rollout, wave[2:4], T0 + 61)
    for device_id in wave[4:]:
        rollout.on_offline(device_id, T0 + 62)
    actions = rollout.tick(T0 + 200)
    assert actions[0] == StateChanged(
        RolloutState.RUNNING,
        RolloutState.HALTED,
        "2 of 4 reporting devices of stage 1 failed after the soak; at most 25% may fail",
    )
    assert actions[1] == SendRollback(wave[2:4], f"rollout r1 halted: {rollout.halt_reason}")


def test_failures_of_earlier_stages_do_not_count() -> None:
    rollout = started(max_failure="0")
    canary = rollout.stage_devices(0)
    install(rollout, canary, T0 + 1)
    rollout.tick(T0 + 60)
    assert rollout.on_install_status(canary[0], DeviceState.ROLLED_BACK, T0 + 61) == []
    assert rollout.state is RolloutState.RUNNING


# --------------------------------------------------------------------------- health


def health(
    rollout: Rollout,
    device_id: str,
    now: float,
    *,
    version: int = 3,
    predictions: int = 1000,
    errors: int = 0,
    p95_ms: float = 10.0,
    model: str = "digits",
) -> list[Action]:
    return rollout.on_health(
        device_id,
        model=model,
        version=version,
        predictions=predictions,
        errors=errors,
        p95_ms=p95_ms,
        now=now,
    )


def canary_one(*, rollback_on_halt: bool = False, **kwargs: Any) -> tuple[Rollout, str]:
    rollout = make(canary="1", max_failure="0", rollback_on_halt=rollback_on_halt, **kwargs)
    (device_id,) = rollout.stage_devices(0)
    return rollout, device_id


def test_error_rate_increase_over_the_baseline_is_a_failure() -> None:
    rollout, dev = canary_one(rollback_on_halt=True)
    assert health(rollout, dev, T0, version=2, errors=10) == []  # baseline ~1%
    rollout.start(T0 + 1)
    install(rollout, [dev], T0 + 2)
    assert health(rollout, dev, T0 + 3, errors=50) == []  # ~4.8%: +3.8 points, allowed
    actions = health(rollout, dev, T0 + 4, errors=80)  # ~7.4%: +6.4 points
    assert status(rollout, dev) == "reverting"  # unhealthy, so the halt rolls it back
    device = rollout.device(dev)
    assert device is not None
    assert device.health_failed
    detail = rollout.device_states()[dev].detail
    assert detail is not None
    assert detail.startswith("unhealthy: error rate 7.4%")
    assert actions[0].__class__ is StateChanged
    assert actions[1] == SendRollback((dev,), f"rollout r1 halted: {rollout.halt_reason}")


def test_sub_millisecond_p95_jitter_is_not_a_failure() -> None:
    """A 50 µs model whose p95 doubles (scheduling noise) stays healthy; above 1 ms the
    ratio counts again."""
    rollout, dev = canary_one()
    health(rollout, dev, T0, version=2, p95_ms=0.05)
    rollout.start(T0 + 1)
    install(rollout, [dev], T0 + 2)
    assert health(rollout, dev, T0 + 3, p95_ms=0.1) == []
    assert health(rollout, dev, T0 + 4, p95_ms=P95_NOISE_MS) == []
    assert status(rollout, dev) == "installed"
    assert health(rollout, dev, T0 + 5, p95_ms=1.2) != []
    assert status(rollout, dev) == "unhealthy"


def test_p95_twice_the_baseline_is_a_failure() -> None:
    rollout, dev = canary_one()
    health(rollout, dev, T0, version=2, p95_ms=10.0)
    rollout.start(T0 + 1)
    install(rollout, [dev], T0 + 2)
    assert health(rollout, dev, T0 + 3, p95_ms=15.0) == []  # 1.5x allowed
    assert status(rollout, dev) == "installed"
    assert health(rollout, dev, T0 + 4, p95_ms=20.0) != []
    assert status(rollout, dev) == "unhealthy"
    assert rollout.state is RolloutState.HALTED
    # An unhealthy verdict is final for the device.
    health(rollout, dev, T0 + 5, p95_ms=1.0)
    device = rollout.device(dev)
    assert device is not None
    assert device.health_failed


def test_the_baseline_is_the_median_of_the_last_five_windows() -> None:
    rollout, dev = canary_one()
    for index, p95 in enumerate([90.0, 10.0, 11.0, 500.0, 9.0, 10.0]):  # the first drops out
        health(rollout, dev, T0 + index, version=2, p95_ms=p95, errors=index)
    device = rollout.device(dev)
    assert device is not None
    assert [w.p95_ms for w in device.baseline_windows] == [10.0, 11.0, 500.0, 9.0, 10.0]
    assert device.baseline == combine_baseline(device.baseline_windows)
    assert device.baseline is not None
    assert (device.baseline.p95_ms, device.baseline.errors) == (10.0, 1 + 2 + 3 + 4 + 5)
    assert device.baseline.predictions == 5000
    rollout.start(T0 + 10)
    install(rollout, [dev], T0 + 11)
    assert health(rollout, dev, T0 + 12, p95_ms=15.0) == []  # 1.5x the median, not of 500
    assert health(rollout, dev, T0 + 13, p95_ms=16.0) != []
    assert status(rollout, dev) == "unhealthy"


def test_windows_of_another_old_version_restart_the_baseline() -> None:
    rollout, dev = canary_one()
    health(rollout, dev, T0, version=1, p95_ms=100.0)
    health(rollout, dev, T0 + 1, version=2, p95_ms=10.0)
    device = rollout.device(dev)
    assert device is not None
    assert [w.version for w in device.baseline_windows] == [2]
    assert combine_baseline([HealthSample(2, 0, 5, 0.0, T0)]).p95_ms == 0.0  # no latency


def test_a_snapshot_without_baseline_windows_still_restores() -> None:
    rollout, dev = canary_one()
    health(rollout, dev, T0, version=2, p95_ms=10.0)
    snapshot = json.loads(json.dumps(rollout.snapshot()))
    for device in snapshot["devices"]:  # as saved before the windows were kept
        windows = device.pop("baseline_windows")
        device["baseline"] = windows[0] if windows else None
    restored = Rollout.restore(snapshot)
    assert restored.snapshot() == rollout.snapshot()


def test_without_baseline_only_the_absolute_error_rate_is_judged() -> None:
    rollout, dev = canary_one()
    rollout.start(T0)
    install(rollout, [dev], T0 + 1)
    assert health(rollout, dev, T0 + 2, p95_ms=10_000.0, errors=50) == []  # 4.8%, slow
    assert status(rollout, dev) == "installed"
    health(rollout, dev, T0 + 3, errors=60)  # 5.7% > 5%
    assert status(rollout, dev) == "unhealthy"


def test_a_model_failing_every_call_is_judged() -> None:
    rollout, dev = canary_one()
    rollout.start(T0)
    install(rollout, [dev], T0 + 1)
    health(rollout, dev, T0 + 2, predictions=0, errors=5)
    assert status(rollout, dev) == "unhealthy"


def test_small_windows_other_models_and_bad_figures_are_ignored() -> None:
    rollout, dev = canary_one(health=HealthPolicy(min_predictions=100))
    rollout.start(T0)
    install(rollout, [dev], T0 + 1)
    before = rollout.snapshot()
    assert health(rollout, dev, T0 + 2, predictions=50, errors=49) == []
    assert health(rollout, dev, T0 + 2, model="other", errors=900) == []
    assert health(rollout, dev, T0 + 2, errors=-1) == []
    assert health(rollout, dev, T0 + 2, p95_ms=float("nan")) == []
    assert health(rollout, "stranger", T0 + 2, errors=900) == []
    assert rollout.snapshot() == before


def test_require_health_waits_for_a_healthy_window() -> None:
    rollout, dev = canary_one(health=HealthPolicy(require_health=True))
    rollout.start(T0)
    install(rollout, [dev], T0 + 1)
    assert rollout.tick(T0 + 600) == []
    assert rollout.summary()["stage_details"][0]["reported"] == 0
    health(rollout, dev, T0 + 601)
    assert rollout.tick(T0 + 602)[0] == StageReleased(1, rollout.stage_devices(1))


def test_without_require_health_an_installed_device_counts_at_once() -> None:
    rollout, dev = canary_one()
    rollout.start(T0)
    install(rollout, [dev], T0 + 1)
    assert rollout.tick(T0 + 60)[0] == StageReleased(1, rollout.stage_devices(1))


def test_health_of_a_device_not_installed_yet_is_ignored() -> None:
    rollout, dev = canary_one()
    rollout.start(T0)
    assert health(rollout, dev, T0 + 1, errors=900) == []
    install(rollout, [dev], T0 + 2)
    assert status(rollout, dev) == "installed"


# --------------------------------------------------------------------------- min_reports


def test_min_reports_waits() -> None:
    rollout = started(canary="3", min_reports=2)
    canary = rollout.stage_devices(0)
    install(rollout, canary[:1], T0 + 1)
    assert rollout.tick(T0 + 599) == []
    install(rollout, canary[1:2], T0 + 599)
    assert rollout.tick(T0 + 599)[0] == StageReleased(1, rollout.stage_devices(1))


def test_min_reports_is_capped_at_the_stage_size() -> None:
    rollout = started(canary="2", min_reports=10)
    install(rollout, rollout.stage_devices(0), T0 + 1)
    assert rollout.tick(T0 + 60)[0] == StageReleased(1, rollout.stage_devices(1))


# --------------------------------------------------------------------------- presence


def test_offline_devices_do_not_count_and_catch_up() -> None:
    rollout = make(online={"d03"}, seed=1, max_failure="0")
    canary = rollout.stage_devices(0)
    assert "d03" in canary  # the one online device goes first
    (away,) = set(canary) - {"d03"}
    actions = rollout.start(T0)
    assert actions[1:] == [StageReleased(0, canary), SendDeploy(("d03",))]
    assert status(rollout, away) == "offline"
    install(rollout, ["d03"], T0 + 1)
    assert rollout.tick(T0 + 60)[0] == StageReleased(1, rollout.stage_devices(1))
    # The offline canary device catches up when it comes back, even after the stage.
    assert rollout.on_online(away, T0 + 61) == [SendDeploy((away,))]
    assert status(rollout, away) == "pending"
    assert rollout.on_online(away, T0 + 62) == []  # already online
    assert rollout.on_install_status(away, DeviceState.FAILED, T0 + 63) == []  # earlier stage


def test_online_devices_come_first_in_a_seeded_order() -> None:
    present = set(IDS[5:15])
    rollout = make(online=present, seed=3)
    stages = [rollout.stage_devices(i) for i in range(rollout.stages)]
    assert set(stages[0]) | set(stages[1]) == present  # canary 2 + wave of 8
    assert set(stages[2]) == set(IDS) - present
    order = [d for stage in stages for d in stage]
    same = make(online=present, seed=3)
    assert [d for i in range(same.stages) for d in same.stage_devices(i)] == order
    other = make(online=present, seed=4)
    assert [d for i in range(other.stages) for d in other.stage_devices(i)] != order


def test_a_canary_of_offline_devices_waits_for_them() -> None:
    rollout = started(online=())
    assert rollout.tick(T0 + 86_400) == []
    assert rollout.state is RolloutState.RUNNING
    assert rollout.stage == 0
    canary = rollout.stage_devices(0)
    assert rollout.on_online(canary[0], T0 + 86_401) == [SendDeploy((canary[0],))]
    install(rollout, canary[:1], T0 + 86_402)
    assert rollout.tick(T0 + 86_403)[0] == StageReleased(1, rollout.stage_devices(1))


def test_a_later_stage_of_offline_devices_waits_for_their_reports() -> None:
    rollout = started(online=IDS[:10], min_reports=3)
    install(rollout, rollout.stage_devices(0), T0 + 1)
    assert rollout.tick(T0 + 60)[0] == StageReleased(1, rollout.stage_devices(1))
    install(rollout, rollout.stage_devices(1), T0 + 61)
    last = rollout.stage_devices(2)
    assert set(last) == set(IDS[10:])
    assert rollout.tick(T0 + 121) == [StageReleased(2, last)]  # nobody online to deploy to
    assert rollout.tick(T0 + 86_400) == []  # no report, no pass
    for device_id in last[:3]:
        assert rollout.on_online(device_id, T0 + 86_401) == [SendDeploy((device_id,))]
    install(rollout, last[:2], T0 + 86_402)
    assert rollout.tick(T0 + 86_403) == []  # 2 of the 3 reports asked for
    install(rollout, last[2:3], T0 + 86_404)
    assert rollout.tick(T0 + 86_405) == [
        StateChanged(RolloutState.RUNNING, RolloutState.COMPLETED, "every stage passed")
    ]
    assert rollout.on_online(last[3], T0 + 86_406) == [SendDeploy((last[3],))]  # catch-up


def test_device_dropping_out_mid_install_is_resent_on_reconnect() -> None:
    rollout = started()
    dev = rollout.stage_devices(0)[0]
    rollout.on_install_status(dev, DeviceState.DOWNLOADING, T0 + 1)
    rollout.on_offline(dev, T0 + 2)
    assert status(rollout, dev) == "offline"
    # A stage report sent before the drop is stale.
    assert rollout.on_install_status(dev, DeviceState.INSTALLING, T0 + 3) == []
    assert status(rollout, dev) == "offline"
    assert rollout.on_online(dev, T0 + 4) == [SendDeploy((dev,))]
    assert status(rollout, dev) == "pending"


def test_an_installed_device_going_offline_keeps_its_report() -> None:
    rollout = started()
    canary = rollout.stage_devices(0)
    install(rollout, canary, T0 + 1)
    rollout.on_offline(canary[0], T0 + 2)
    assert status(rollout, canary[0]) == "installed"
    assert rollout.on_online(canary[0], T0 + 3) == []
    assert rollout.tick(T0 + 60)[0] == StageReleased(1, rollout.stage_devices(1))


# --------------------------------------------------------------------------- timeouts


def test_install_timeout_counts_as_failure() -> None:
    rollout = started(install_timeout="5m", max_failure="0", soak="1h")
    good, slow = rollout.stage_devices(0)
    install(rollout, [good], T0 + 1)
    rollout.on_install_status(slow, DeviceState.DOWNLOADING, T0 + 2)
    assert rollout.tick(T0 + 299) == []
    assert status(rollout, slow) == "downloading"
    actions = rollout.tick(T0 + 300)
    assert status(rollout, slow) == "timed_out"
    assert rollout.device_states()[slow].detail == "still downloading 300s after the deploy"
    assert actions[0] == StateChanged(
        RolloutState.RUNNING,
        RolloutState.HALTED,
        "1 of 2 devices of stage 0 failed; at most 0% may fail",
    )
    assert actions[1] == SendRollback((good,), f"rollout r1 halted: {rollout.halt_reason}")
    # It finally installs: the rollout stays halted and rolls it back too.
    assert rollout.on_install_status(slow, DeviceState.INSTALLED, T0 + 400) == [
        SendRollback((slow,), f"rollout r1 halted: {rollout.halt_reason}")
    ]
    assert status(rollout, slow) == "reverting"


def test_offline_devices_do_not_time_out_and_the_timer_restarts_on_resend() -> None:
    rollout = started(install_timeout="5m", canary="1", max_failure="100%")
    dev = rollout.stage_devices(0)[0]
    rollout.on_offline(dev, T0 + 10)
    rollout.tick(T0 + 1000)
    assert status(rollout, dev) == "offline"
    rollout.on_online(dev, T0 + 1001)
    rollout.tick(T0 + 1300)
    assert status(rollout, dev) == "pending"
    rollout.tick(T0 + 1301)
    assert status(rollout, dev) == "timed_out"
    # A timed-out device that reconnects gets the deploy again; its answer counts.
    rollout.on_offline(dev, T0 + 1302)
    assert rollout.on_online(dev, T0 + 1303) == [SendDeploy((dev,))]
    install(rollout, [dev], T0 + 1304)
    assert status(rollout, dev) == "installed"


# --------------------------------------------------------------------------- operators


def test_pause_stops_advancing_and_resume_continues() -> None:
    rollout = d05_away()
    rollout.start(T0)
    other = next(d for d in rollout.stage_devices(0) if d != "d05")
    install(rollout, [other], T0 + 1)
    assert rollout.pause(T0 + 2, "alice") == [
        StateChanged(RolloutState.RUNNING, RolloutState.PAUSED, "paused by alice")
    ]
    assert rollout.pause(T0 + 3, "alice") == []
    assert rollout.tick(T0 + 600) == []
    assert rollout.stage == 0
    # Catch-ups of the released stage continue while paused.
    assert rollout.on_online("d05", T0 + 601) == [SendDeploy(("d05",))]
    assert rollout.resume(T0 + 602, "bob") == [
        StateChanged(RolloutState.PAUSED, RolloutState.RUNNING, "resumed by bob")
    ]
    assert rollout.resume(T0 + 603, "bob") == []
    assert rollout.tick(T0 + 604)[0] == StageReleased(1, rollout.stage_devices(1))


def test_a_paused_rollout_releases_no_wave_however_long_it_waits() -> None:
    # What the real-broker pause test no longer waits seconds to see: the canary
    # installs while paused, its soak passes many times, and no wave goes out.
    rollout = started(soak="1s")
    canary, wave1 = rollout.stage_devices(0), rollout.stage_devices(1)
    rollout.pause(T0 + 0.5, "alice")
    assert install(rollout, canary, T0 + 1) == []
    for seconds in (2, 3, 4, 601, 3600, 86_400):  # many soaks, the install timeout, a day
        assert rollout.tick(T0 + seconds) == []
    assert (rollout.state, rollout.stage) == (RolloutState.PAUSED, 0)
    assert {status(rollout, d) for d in canary} == {"installed"}
    assert {status(rollout, d) for d in wave1} == {"waiting"}
    rollout.resume(T0 + 86_401, "bob")
    assert rollout.tick(T0 + 86_402) == [StageReleased(1, wave1), SendDeploy(wave1)]


def test_a_paused_rollout_still_halts() -> None:
    rollout = started()
    rollout.pause(T0 + 1, "alice")
    dev = rollout.stage_devices(0)[0]
    actions = rollout.on_install_status(dev, DeviceState.FAILED, T0 + 2)
    assert actions[0].__class__ is StateChanged
    assert rollout.state is RolloutState.HALTED


def test_pause_and_resume_need_a_started_rollout() -> None:
    rollout = make()
    with pytest.raises(RolloutError, match="cannot pause"):
        rollout.pause(T0, "alice")
    with pytest.raises(RolloutError, match="only a paused rollout resumes"):
        rollout.resume(T0, "alice")


def test_abort_without_rollback() -> None:
    rollout = started()
    canary = rollout.stage_devices(0)
    install(rollout, canary[:1], T0 + 1)
    rollout.on_offline(canary[1], T0 + 2)
    assert rollout.abort(T0 + 3, "alice") == [
        StateChanged(RolloutState.RUNNING, RolloutState.ABORTED, "aborted by alice")
    ]
    assert rollout.abort(T0 + 4, "alice") == []
    assert rollout.on_online(canary[1], T0 + 5) == []  # no catch-up
    assert rollout.tick(T0 + 600) == []
    assert status(rollout, canary[0]) == "installed"
    assert rollout.add_device("late", T0 + 601, online=True) == []
    assert rollout.device("late") is None
    with pytest.raises(RolloutError):
        rollout.resume(T0 + 602, "alice")
    with pytest.raises(RolloutError):
        rollout.start(T0 + 602)


def test_abort_with_rollback_reverts_every_installed_device() -> None:
    rollout = started()
    canary = rollout.stage_devices(0)
    install(rollout, canary, T0 + 1)
    rollout.tick(T0 + 60)
    wave = rollout.stage_devices(1)
    install(rollout, wave[:3], T0 + 61)
    rollout.on_offline(wave[0], T0 + 62)
    reason = "rollout r1 aborted by alice"
    assert rollout.abort(T0 + 63, "alice", rollback=True) == [
        StateChanged(RolloutState.RUNNING, RolloutState.ABORTED, "aborted by alice"),
        SendRollback(tuple(sorted([*canary, *wave[1:3]])), reason),
    ]
    assert status(rollout, wave[0]) == "reverting"
    assert rollout.on_online(wave[0], T0 + 64) == [SendRollback((wave[0],), reason)]
    # A device still installing gets its rollback once it reports installed.
    assert rollout.on_install_status(wave[4], DeviceState.INSTALLED, T0 + 65) == [
        SendRollback((wave[4],), reason)
    ]
    # Waiting devices of the unreleased stage are untouched.
    assert all(status(rollout, d) == "waiting" for d in rollout.stage_devices(2))


def test_abort_of_an_aborted_rollout_may_still_roll_back() -> None:
    rollout = started()
    canary = rollout.stage_devices(0)
    install(rollout, canary, T0 + 1)
    rollout.abort(T0 + 2, "alice")
    assert rollout.abort(T0 + 3, "alice", rollback=True) == [
        SendRollback(canary, "rollout r1 aborted by alice")
    ]
    assert rollout.abort(T0 + 4, "alice", rollback=True) == []


def test_abort_after_a_halt_rolls_back_earlier_stages() -> None:
    rollout = started()
    canary = rollout.stage_devices(0)
    install(rollout, canary, T0 + 1)
    rollout.tick(T0 + 60)
    wave = rollout.stage_devices(1)
    install(rollout, wave[:1], T0 + 61)
    rollout.on_install_status(wave[1], DeviceState.FAILED, T0 + 62)
    assert rollout.state is RolloutState.HALTED
    assert status(rollout, wave[0]) == "reverting"
    actions = rollout.abort(T0 + 63, "alice", rollback=True)
    assert actions == [
        StateChanged(RolloutState.HALTED, RolloutState.ABORTED, "aborted by alice"),
        SendRollback(canary, "rollout r1 aborted by alice"),
    ]


def test_abort_of_a_completed_rollout_is_refused() -> None:
    rollout = make(["solo"])
    rollout.start(T0)
    install(rollout, ["solo"], T0)
    rollout.tick(T0 + 60)
    with pytest.raises(RolloutError, match="completed"):
        rollout.abort(T0 + 61, "alice")


def test_abort_before_start() -> None:
    rollout = make()
    assert rollout.abort(T0, "alice", rollback=True) == [
        StateChanged(RolloutState.CREATED, RolloutState.ABORTED, "aborted by alice")
    ]


# --------------------------------------------------------------------------- late devices


def test_late_device_during_the_canary_joins_the_first_wave() -> None:
    rollout = started()
    assert rollout.add_device("late", T0 + 1, online=True) == []
    assert status(rollout, "late") == "waiting"
    assert "late" in rollout.stage_devices(1)
    assert rollout.add_device("late", T0 + 2, online=True) == []  # idempotent
    install(rollout, rollout.stage_devices(0), T0 + 3)
    actions = rollout.tick(T0 + 60)
    assert actions[1] == SendDeploy(rollout.stage_devices(1))
    assert "late" in actions[1].device_ids
    assert len(rollout.stage_devices(1)) == 9


def test_late_device_past_the_canary_is_deployed_and_restarts_the_soak() -> None:
    rollout = started()
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 60)
    install(rollout, rollout.stage_devices(1), T0 + 61)
    assert rollout.add_device("late", T0 + 100, online=True) == [SendDeploy(("late",))]
    assert "late" in rollout.stage_devices(1)
    assert rollout.tick(T0 + 120) == []  # would have advanced without the newcomer
    install(rollout, ["late"], T0 + 121)
    assert rollout.tick(T0 + 159) == []
    assert rollout.tick(T0 + 160)[0] == StageReleased(2, rollout.stage_devices(2))


def test_late_offline_device_catches_up() -> None:
    rollout = started()
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 60)
    assert rollout.add_device("late", T0 + 61, online=False) == []
    assert status(rollout, "late") == "offline"
    assert rollout.on_online("late", T0 + 62) == [SendDeploy(("late",))]


def test_late_device_of_a_single_stage_rollout_joins_the_canary() -> None:
    rollout = make(["solo"])
    assert rollout.add_device("late", T0, online=True) == []
    assert rollout.stage_devices(0) == ("late", "solo")
    assert rollout.start(T0 + 1)[-1] == SendDeploy(("late", "solo"))


def test_completed_rollout_deploys_to_late_devices_and_halted_ignores_them() -> None:
    rollout = make(["solo"])
    rollout.start(T0)
    install(rollout, ["solo"], T0)
    rollout.tick(T0 + 60)
    assert rollout.add_device("late", T0 + 61, online=True) == [SendDeploy(("late",))]
    assert rollout.state is RolloutState.COMPLETED
    halted = started()
    halted.on_install_status(halted.stage_devices(0)[0], DeviceState.FAILED, T0 + 1)
    assert halted.add_device("late", T0 + 2, online=True) == []
    assert halted.device("late") is None


def test_add_device_refuses_an_invalid_id() -> None:
    with pytest.raises(RolloutError, match="invalid device id"):
        started().add_device("bad id", T0, online=True)


# --------------------------------------------------------------------------- reports


def test_events_for_unknown_devices_are_ignored() -> None:
    rollout = started()
    before = rollout.snapshot()
    assert rollout.on_install_status("stranger", DeviceState.INSTALLED, T0 + 1) == []
    assert rollout.on_online("stranger", T0 + 1) == []
    assert rollout.on_offline("stranger", T0 + 1) == []
    assert health(rollout, "stranger", T0 + 1, version=2) == []
    assert rollout.snapshot() == before


def test_reports_from_waiting_devices_and_coordinator_states_are_ignored() -> None:
    rollout = started()
    waiting = rollout.stage_devices(1)[0]
    dev = rollout.stage_devices(0)[0]
    before = rollout.snapshot()
    assert rollout.on_install_status(waiting, DeviceState.INSTALLED, T0 + 1) == []
    for state in (DeviceState.PENDING, DeviceState.OFFLINE, DeviceState.TIMED_OUT):
        assert rollout.on_install_status(dev, state, T0 + 1) == []
    assert rollout.snapshot() == before


def test_stale_and_duplicate_reports() -> None:
    rollout = started(max_failure="50%")
    dev = rollout.stage_devices(0)[0]
    rollout.on_install_status(dev, DeviceState.INSTALLING, T0 + 1)
    rollout.on_install_status(dev, DeviceState.DOWNLOADING, T0 + 2)  # stale
    assert status(rollout, dev) == "installing"
    install(rollout, [dev], T0 + 3)
    before = rollout.snapshot()
    assert install(rollout, [dev], T0 + 4) == []  # duplicate: nothing changes
    assert rollout.snapshot() == before
    # A failure after the install comes from a duplicate deploy: ignored.
    rollout.on_install_status(dev, DeviceState.FAILED, T0 + 5)
    assert status(rollout, dev) == "installed"
    device = rollout.device(dev)
    assert device is not None
    assert device.installed_at == T0 + 3


def test_installed_overrides_an_earlier_failure() -> None:
    rollout = started(max_failure="50%", soak="1h")
    dev = rollout.stage_devices(0)[0]
    rollout.on_install_status(dev, DeviceState.FAILED, T0 + 1, error="disk_full")
    assert rollout.summary()["failure_rate"] == 1.0
    install(rollout, [dev], T0 + 2)
    assert status(rollout, dev) == "installed"
    assert rollout.device_states()[dev].detail is None
    assert rollout.summary()["failure_rate"] == 0.0


# --------------------------------------------------------------------------- summary


def test_summary_and_rows() -> None:
    rollout = started()
    canary = rollout.stage_devices(0)
    install(rollout, canary[:1], T0 + 1)
    summary = rollout.summary()
    assert summary["state"] == "running"
    assert summary["stage"] == 0
    assert summary["stages"] == 3
    assert summary["counts"]["waiting"] == 18
    assert summary["counts"]["installed"] == 1
    assert summary["counts"]["pending"] == 1
    assert sum(summary["counts"].values()) == 20
    assert summary["failure_rate"] == 0.0
    assert summary["stage_details"][0] == {
        "stage": 0,
        "size": 2,
        "released_at": T0,
        "reported": 1,
        "failed": 0,
        "failure_rate": 0.0,
        "counts": {"installed": 1, "pending": 1},
    }
    assert summary["stage_details"][1]["failure_rate"] is None
    assert summary["artifact"] == {"model": "digits", "version": 3, "sha256": "ab" * 32}
    json.dumps(summary, allow_nan=False)
    rows = rollout.device_states()
    assert list(rows) == sorted(IDS)
    assert rows[canary[0]] == RolloutDeviceState(0, DeviceState.INSTALLED, None, T0 + 1)
    assert rows[rollout.stage_devices(2)[0]].state is Marker.WAITING


def test_actions_to_json() -> None:
    assert SendDeploy(("a", "b")).to_json() == {"type": "deploy", "device_ids": ["a", "b"]}
    assert SendRollback(("a",), "why").to_json() == {
        "type": "rollback",
        "device_ids": ["a"],
        "reason": "why",
    }
    assert StateChanged(RolloutState.RUNNING, RolloutState.PAUSED, "x").to_json() == {
        "type": "state_changed",
        "old": "running",
        "new": "paused",
        "reason": "x",
    }
    assert StageReleased(1, ("a",)).to_json() == {
        "type": "stage_released",
        "stage": 1,
        "device_ids": ["a"],
    }


# --------------------------------------------------------------------------- persistence


def round_trip(rollout: Rollout) -> Rollout:
    text = json.dumps(rollout.snapshot(), allow_nan=False)
    restored = Rollout.restore(json.loads(text))
    assert restored.snapshot() == rollout.snapshot()
    return restored


def test_snapshot_is_sorted_and_versioned() -> None:
    rollout = started()
    snapshot = rollout.snapshot()
    assert snapshot["format"] == 1
    assert list(snapshot) == sorted(snapshot)
    assert json.dumps(snapshot, sort_keys=True) == json.dumps(snapshot)


def test_restore_mid_rollout_continues_identically() -> None:
    wave = make(seed=1).stage_devices(1)

    def scenario(restore_at: int | None) -> list[object]:
        rollout = d05_away(max_failure="20%")
        steps: list[Any] = [
            lambda r: r.start(T0),
            lambda r: health(r, "d05", T0 + 1, version=2, errors=5, p95_ms=8.0),
            lambda r: install(r, ["d11"], T0 + 2),
            lambda r: r.tick(T0 + 60),
            lambda r: r.on_online("d05", T0 + 61),
            lambda r: install(r, wave[:5], T0 + 62),
            lambda r: r.pause(T0 + 63, "alice"),
            lambda r: r.add_device("late", T0 + 64, online=True),
            lambda r: r.resume(T0 + 65, "alice"),
            lambda r: r.on_install_status(wave[5], DeviceState.FAILED, T0 + 66),
            lambda r: r.on_offline(wave[7], T0 + 70),
            lambda r: r.tick(T0 + 122),
            lambda r: r.on_online(wave[7], T0 + 130),
            lambda r: r.tick(T0 + 200),
            lambda r: health(r, "d05", T0 + 201, errors=100, p95_ms=8.0),
            lambda r: (r.tick(T0 + 700), status(r, wave[7]), status(r, "d05")),
            lambda r: (r.tick(T0 + 730), status(r, wave[7])),
            lambda r: r.tick(T0 + 800),
        ]
        out = []
        for index, step in enumerate(steps):
            if index == restore_at:
                rollout = round_trip(rollout)
            out.append(step(rollout))
        return out

    expected = scenario(None)
    assert expected[4] == [SendDeploy(("d05",))]
    assert expected[7] == [SendDeploy(("late",))]
    assert expected[11] == []  # the newcomer restarted the soak at T0 + 64
    assert expected[12] == [SendDeploy((wave[7],))]
    assert expected[13][0] == StageReleased(2, make(seed=1).stage_devices(2))  # type: ignore[index]
    # The catch-up restarted wave[7]'s install timer; d05 (deployed at T0 + 61, still
    # pending: its window was ignored) timed out.
    assert expected[15] == ([], "pending", "timed_out")
    assert expected[16] == ([], "timed_out")
    assert expected[17][0].new is RolloutState.HALTED  # type: ignore[index]
    for index in range(len(expected)):
        assert scenario(index) == expected


def test_resume_after_restart_reissues_deploys_and_rollbacks() -> None:
    rollout = started(max_failure="30%")
    install(rollout, rollout.stage_devices(0), T0 + 1)
    rollout.tick(T0 + 60)
    wave = rollout.stage_devices(1)
    install(rollout, wave[:2], T0 + 61)
    rollout.on_install_status(wave[2], DeviceState.DOWNLOADING, T0 + 61)
    rollout.on_install_status(wave[3], DeviceState.FAILED, T0 + 61)
    rollout.on_offline(wave[4], T0 + 61)
    restored = round_trip(rollout)
    # Meanwhile wave[5] went away and wave[4] came back.
    online = set(IDS) - {wave[5]}
    actions = restored.resume_after_restart(T0 + 62, online)
    assert actions == [SendDeploy(tuple(sorted([wave[2], wave[4], wave[6], wave[7]])))]
    assert status(restored, wave[5]) == "offline"
    assert status(restored, wave[4]) == "pending"
    assert restored.resume_after_restart(T0 + 63, online) == actions  # safe to repeat


def test_resume_after_restart_reissues_pending_rollbacks() -> None:
    rollout = started()
    good, bad = rollout.stage_devices(0)
    install(rollout, [good], T0 + 1)
    rollout.on_install_status(bad, DeviceState.FAILED, T0 + 2)
    restored = round_trip(rollout)
    reason = f"rollout r1 halted: {rollout.halt_reason}"
    assert restored.resume_after_restart(T0 + 3, set(IDS)) == [SendRollback((good,), reason)]
    assert restored.resume_after_restart(T0 + 4, set(IDS) - {good}) == []
    restored.on_install_status(good, DeviceState.ROLLED_BACK, T0 + 5)
    assert restored.resume_after_restart(T0 + 6, set(IDS)) == []


def test_resume_after_restart_before_start_only_updates_presence() -> None:
    rollout = make(seed=1)
    canary = rollout.stage_devices(0)
    assert rollout.resume_after_restart(T0, set(IDS) - {canary[0]}) == []
    assert all(status(rollout, d) == "waiting" for d in IDS)
    device = rollout.device(canary[0])
    assert device is not None
    assert not device.online
    assert rollout.start(T0 + 1)[1:] == [StageReleased(0, canary), SendDeploy(canary[1:])]


@pytest.mark.parametrize(
    "mutate",
    [
        lambda s: s.update(format=2),
        lambda s: s.pop("devices"),
        lambda s: s.update(state="exploded"),
        lambda s: s.update(stage=9),
        lambda s: s["devices"][0].update(install="sideways"),
        lambda s: s["devices"][0].update(released_at="yesterday"),
        lambda s: s.update(order=["x"]),
        lambda s: s["artifact"].update(sha256="nope"),
    ],
)
def test_restore_refuses_malformed_snapshots(mutate: Any) -> None:
    snapshot = json.loads(json.dumps(started().snapshot()))
    mutate(snapshot)
    with pytest.raises(RolloutError):
        Rollout.restore(snapshot)


def test_restore_refuses_something_else() -> None:
    with pytest.raises(RolloutError, match="format"):
        Rollout.restore({"rollout_id": "r1"})


# --------------------------------------------------------------------------- properties

PROP_IDS = ("a", "b", "c", "d", "e", "f")
_device = st.sampled_from([*PROP_IDS, "n1", "n2", "zz"])
_reports = [DeviceState.INSTALLED] * 14 + [
    DeviceState.FAILED,
    DeviceState.ROLLED_BACK,
    DeviceState.DOWNLOADING,
    *DeviceState,
]
_tick = st.tuples(st.just("tick"), st.sampled_from([0.5, 5.0, 31.0, 31.0, 90.0]))
# Reports and telemetry name a device by slot: mostly one of the current stage.
_slot = st.integers(0, 9)
_status = st.tuples(st.just("status"), _slot, st.sampled_from(_reports))
# Weighted towards what moves a rollout (reports and time); operators act rarely.
_events = st.one_of(
    _tick,
    _tick,
    _status,
    _status,
    _status,
    st.tuples(
        st.just("health"),
        _slot,
        st.sampled_from([2, 3]),
        st.integers(0, 20),
        st.integers(0, 5),
        st.sampled_from([5.0, 10.0, 30.0]),
    ),
    st.tuples(st.sampled_from(["online", "offline"]), _device),
    st.tuples(st.just("install_stage")),
    st.tuples(st.just("add"), st.sampled_from(["n1", "n2"]), st.booleans()),
    st.tuples(
        st.sampled_from(["pause", "resume", "resume", "restart", "restart", "abort"]),
        st.booleans(),
        st.frozensets(st.sampled_from(PROP_IDS)),
    ),
)


def _pick(rollout: Rollout, slot: int) -> str:
    """Resolve a slot to a device id, the same way for equal states."""
    if slot < 6:
        stage = rollout.stage_devices(rollout.stage)
        return stage[slot % len(stage)]
    if slot < 9:
        everyone = sorted(d.device_id for d in rollout.devices())
        return everyone[slot % len(everyone)]
    return "zz"


def _apply(rollout: Rollout, event: tuple[Any, ...], now: float) -> object:
    kind = event[0]
    if kind in ("status", "health"):
        event = (kind, _pick(rollout, event[1]), *event[2:])
    try:
        if kind == "tick":
            return rollout.tick(now)
        if kind == "install_stage":
            return install(rollout, rollout.stage_devices(rollout.stage), now)
        if kind == "status":
            return rollout.on_install_status(event[1], event[2], now, error="e")
        if kind == "health":
            _, device_id, version, predictions, errors, p95 = event
            return rollout.on_health(
                device_id,
                model="digits",
                version=version,
                predictions=predictions,
                errors=errors,
                p95_ms=p95,
                now=now,
            )
        if kind == "online":
            return rollout.on_online(event[1], now)
        if kind == "offline":
            return rollout.on_offline(event[1], now)
        if kind == "add":
            return rollout.add_device(event[1], now, online=event[2])
        if kind == "pause":
            return rollout.pause(now, "op")
        if kind == "resume":
            return rollout.resume(now, "op")
        if kind == "abort":
            return rollout.abort(now, "op", rollback=event[1])
        return rollout.resume_after_restart(now, event[2])
    except RolloutError as exc:
        return ("error", str(exc))


def _check_invariants(rollout: Rollout, result: object) -> None:
    if isinstance(result, list):
        for action in result:
            if isinstance(action, SendDeploy | SendRollback | StageReleased):
                assert action.device_ids
                assert list(action.device_ids) == sorted(set(action.device_ids))
            if isinstance(action, SendDeploy):
                for device_id in action.device_ids:
                    device = rollout.device(device_id)
                    assert device is not None
                    assert device.marker is None
                    assert device.online
    summary = rollout.summary()
    assert sum(summary["counts"].values()) == len(rollout.devices())
    assert sum(s["size"] for s in summary["stage_details"]) == len(rollout.devices())
    json.dumps(summary, allow_nan=False)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    events=st.lists(_events, min_size=10, max_size=80),
    split=st.integers(0, 80),
    seed=st.integers(0, 3),
    rollback_on_halt=st.booleans(),
    require_health=st.booleans(),
    offline=st.frozensets(st.sampled_from(PROP_IDS), max_size=3),
)
def test_restore_at_any_point_continues_identically(
    events: list[tuple[Any, ...]],
    split: int,
    seed: int,
    rollback_on_halt: bool,
    require_health: bool,
    offline: frozenset[str],
) -> None:
    def fresh() -> Rollout:
        rollout = make(
            PROP_IDS,
            online=set(PROP_IDS) - offline,
            seed=seed,
            canary="2",
            waves="50,100",
            soak="30s",
            max_failure="50%",
            rollback_on_halt=rollback_on_halt,
            install_timeout="200s",
            health=HealthPolicy(require_health=require_health, min_predictions=2),
        )
        rollout.start(T0)
        return rollout

    plain, restored = fresh(), fresh()
    now = T0
    for index, event in enumerate(events):
        now += event[1] if event[0] == "tick" else 1.0
        if index == split:
            restored = round_trip(restored)
        expected = _apply(plain, event, now)
        assert _apply(restored, event, now) == expected
        _check_invariants(plain, expected)
    assert restored.snapshot() == plain.snapshot()
    round_trip(plain)
