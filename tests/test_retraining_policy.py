"""The retraining policy engine (coordinator.monitoring.policy): pure, fake clock."""

from __future__ import annotations

import random

import pytest

from coordinator.errors import PolicyError
from coordinator.monitoring.policy import NONE, START_RUN, Policy, RunSettings, decide
from coordinator.monitoring.scores import FLEET, DriftScore


def _score(at: float, psi: float, severity: str | None = None, **kw: object) -> DriftScore:
    if severity is None:
        severity = "major" if psi >= 0.25 else "moderate" if psi >= 0.1 else "none"
    return DriftScore(
        scope=FLEET,
        device_id=None,
        model="m",
        version=1,
        at=at,
        windows=6,
        n=5000,
        psi_max=psi,
        js_max=psi / 4,
        severity=severity,
        devices=("d1",),
        **kw,  # type: ignore[arg-type]
    )


POLICY = Policy("m", drift_psi=0.25, windows=3, cooldown_s=600.0, max_runs_per_day=2)


def test_n_consecutive_scores_above_threshold_start_a_run() -> None:
    history = [_score(10.0 * i, 0.4) for i in range(3)]
    decision = decide(POLICY, history, now=100.0)
    assert decision.action == START_RUN
    assert decision.trigger["policy"] == "m"
    assert decision.trigger["kind"] == "drift"
    assert decision.trigger["value"] == pytest.approx(0.4)
    assert decision.trigger["since"] == 0.0
    assert decision.trigger["at"] == 20.0


def test_hysteresis_one_spike_or_a_broken_streak_does_not_trigger() -> None:
    assert decide(POLICY, [_score(0, 0.01), _score(10, 0.9)], now=20).action == NONE
    broken = [_score(0, 0.4), _score(10, 0.05), _score(20, 0.4), _score(30, 0.4)]
    assert decide(POLICY, broken, now=40).action == NONE
    # the history's order does not matter: the latest three count
    assert decide(POLICY, [*reversed(broken), _score(40, 0.3)], now=50).action == START_RUN


def test_insufficient_severity_never_triggers_whatever_its_psi() -> None:
    history = [_score(10.0 * i, 5.0, severity="insufficient") for i in range(10)]
    assert decide(POLICY, history, now=200).action == NONE
    by_severity = Policy("m", drift_severity="moderate", windows=2)
    assert decide(by_severity, history, now=200).action == NONE


def test_severity_threshold_and_confidence_signal() -> None:
    policy = Policy("m", drift_severity="major", windows=2)
    assert decide(policy, [_score(0, 0.2), _score(1, 0.2)], now=2).action == NONE
    label_free = [
        _score(t, 0.02, severity="major", signal="confidence", confidence_psi=0.6) for t in (0, 1)
    ]
    decision = decide(policy, label_free, now=2)
    assert decision.action == START_RUN
    assert decision.trigger["signal"] == "confidence"
    assert decision.trigger["value"] == pytest.approx(0.6)  # the confidence PSI, not psi_max
    assert decide(Policy("m", drift_psi=0.5, windows=2), label_free, now=2).action == START_RUN


def test_cooldown_after_a_run_and_daily_budget() -> None:
    history = [_score(1000.0 + i, 0.5) for i in range(3)]
    cooling = decide(POLICY, history, now=1100.0, runs_started=[900.0])
    assert cooling.action == NONE
    assert "cooling down" in cooling.reason
    assert decide(POLICY, history, now=1600.0, runs_started=[900.0]).action == START_RUN
    spent = decide(POLICY, history, now=5000.0, runs_started=[100.0, 900.0])
    assert spent.action == NONE
    assert "24 h" in spent.reason
    assert decide(POLICY, history, now=90000.0, runs_started=[100.0, 900.0]).action == START_RUN


def test_feedback_accuracy_drop() -> None:
    policy = Policy("m", accuracy_drop=5.0)
    assert decide(policy, [], now=0, accuracy=0.91, serving_accuracy=0.93).action == NONE
    decision = decide(policy, [], now=0, accuracy=0.85, serving_accuracy=0.93)
    assert decision.action == START_RUN
    assert decision.trigger["drop_points"] == pytest.approx(8.0)
    assert decide(policy, [], now=0).action == NONE  # no feedback: no trigger


def test_control_noise_never_triggers() -> None:
    """Unshifted fleets: PSI around its small-sample bias, now and then one moderate score."""
    rng = random.Random(18)
    history: list[DriftScore] = []
    for i in range(2000):
        psi = abs(rng.gauss(0.03, 0.02))
        if rng.random() < 0.02:  # a rare noisy spike
            psi = rng.uniform(0.25, 0.4)
        history.append(_score(float(i), psi))
        assert decide(POLICY, history[-10:], now=float(i)).action == NONE


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({}, "no trigger"),
        ({"drift_psi": 0.0}, "drift_psi"),
        ({"drift_psi": float("nan")}, "drift_psi"),
        ({"drift_severity": "insufficient"}, "drift_severity"),
        ({"drift_psi": 0.2, "windows": 0}, "windows"),
        ({"drift_psi": 0.2, "cooldown_s": -1.0}, "cooldown_s"),
        ({"drift_psi": 0.2, "soak_s": float("inf")}, "soak_s"),
        ({"drift_psi": 0.2, "run": RunSettings(rounds=0)}, "run.rounds"),
        ({"drift_psi": 0.2, "run": RunSettings(clients=2, min_clients=3)}, "run.min_clients"),
        ({"drift_psi": 0.2, "run": RunSettings(config={"clients_per_round": 3})}, "run.clients"),
    ],
)
def test_invalid_policies_are_refused(fields: dict[str, object], message: str) -> None:
    with pytest.raises(PolicyError, match=message):
        Policy("m", **fields)  # type: ignore[arg-type]


def test_round_trip() -> None:
    policy = Policy(
        "m",
        drift_psi=0.3,
        drift_severity="major",
        accuracy_drop=2.0,
        require_approval=True,
        run=RunSettings(rounds=3, clients=4, config={"features": 8, "classes": 3}),
    )
    assert Policy.from_dict(policy.to_dict()) == policy
    with pytest.raises(PolicyError, match="malformed"):
        Policy.from_dict({"drift_psi": 0.3})
