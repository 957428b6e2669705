"""The retraining policy: when the fleet's drift should start a federated run (pure).

The operator sets one :class:`Policy` per model (``fedge policy set NAME ...``); the
service keeps it in the store and, every few seconds, asks :func:`decide` whether
to start a retraining run for that model now. This module does no I/O and reads no
clock: the caller passes the fleet's drift history, the runs the policy already
started and ``now``, so the tests drive it with a fake clock.

How :func:`decide` reads the history (fleet-wide scores of the model's serving
version, :class:`~coordinator.monitoring.scores.DriftScore`, any order):

1. **Hysteresis.** Only the latest ``windows`` scores count, and *every one* of
   them must be above the threshold: a single noisy score never triggers. A score
   is above the threshold when its drift value (the PSI of the signal its severity
   comes from: the largest feature PSI, the confidence PSI or the class PSI) is at
   least ``drift_psi``, or its severity is at least ``drift_severity``.
2. **Too few rows never trigger.** A score whose severity is ``insufficient`` (fewer
   than 500 effective rows behind it) breaks the streak whatever its numbers say.
3. **Feedback accuracy.** With ``accuracy_drop`` set, a labelled-feedback accuracy
   that fell that many points (0..100 scale) below the serving model's triggers
   too (the caller passes both figures; None when there is no feedback).
4. **Cooldown and budget.** No run starts within ``cooldown_s`` of the policy's
   previous run, nor once ``max_runs_per_day`` runs started in the last 24 hours;
   the decision then says so (``reason``) without starting anything.

A :class:`Decision` is ``none`` or ``start_run``; a ``start_run`` carries the
``trigger`` (policy name, what fired, the drift value and severity, the scores'
times) that the service records with the run, the audit log and, later, the
retrained artifact's lineage.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from coordinator.errors import PolicyError
from coordinator.monitoring.scores import CLASSES, CONFIDENCE, DriftScore

__all__ = [
    "DEFAULT_SOAK_S",
    "NONE",
    "SEVERITIES",
    "START_RUN",
    "Decision",
    "Policy",
    "RunSettings",
    "decide",
    "drift_value",
    "trigger_reason",
]

NONE = "none"
"""Decision: do nothing now."""
START_RUN = "start_run"
"""Decision: start a retraining run now."""
SEVERITIES = ("moderate", "major")
"""Severities a policy may use as its threshold, mildest first."""
_RANK = {"none": 0, "moderate": 1, "major": 2}
_DAY_S = 86400.0
DEFAULT_SOAK_S = 60.0
"""Default soak of each stage of a retrained model's rollout (as ``fedge rollout create``)."""
_MAX_WINDOWS = 1000
_MAX_ROUNDS = 1000


@dataclass(frozen=True)
class RunSettings:
    """The federated run a trigger starts (what ``fedge rounds start`` would take).

    Attributes:
        rounds: Rounds of the run.
        clients: Devices asked per round (``clients_per_round``).
        min_clients: Fewest accepted updates for a round to count.
        strategy: Aggregation strategy name.
        codec: Update codec.
        round_timeout_s: Seconds a round may take.
        config: Further run settings (``features``, ``classes``, ``train``...), as
            :class:`~coordinator.service.operations.RunRequest` ``config``.
    """

    rounds: int = 5
    clients: int = 10
    min_clients: int = 2
    strategy: str = "fedavg"
    codec: str = "fp32"
    round_timeout_s: float = 60.0
    config: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Policy:
    """When and how to retrain one model.

    Attributes:
        name: The model's name (one policy per model).
        drift_psi: Trigger when the fleet's drift value reaches this PSI.
        drift_severity: Or when the fleet's severity reaches this one
            (``moderate`` or ``major``). At least one of the two, or
            ``accuracy_drop``, must be set.
        windows: Consecutive fleet scores that must all be above the threshold.
        accuracy_drop: Trigger when feedback accuracy falls this many points
            below the serving model's; None: not used.
        cooldown_s: Seconds after a run before another may start.
        max_runs_per_day: Runs the policy may start in any 24 hours.
        require_approval: Wait for ``fedge policy approve RUN`` before rolling
            the retrained model out.
        soak_s: How long each stage of the retrained model's staged rollout must
            run healthy before the next (the rollout's ``soak``).
        holdout: Labelled held-out data on the coordinator (an ``.npz`` with ``x``
            and ``y``) the candidate and the serving model are compared on; None:
            a trained candidate is not evaluated, packaged nor rolled out.
        run: The run to start.
    """

    name: str
    drift_psi: float | None = None
    drift_severity: str | None = None
    windows: int = 3
    accuracy_drop: float | None = None
    cooldown_s: float = 3600.0
    max_runs_per_day: int = 2
    require_approval: bool = False
    soak_s: float = DEFAULT_SOAK_S
    holdout: str | None = None
    run: RunSettings = field(default_factory=RunSettings)

    def __post_init__(self) -> None:
        """Refuse a policy that could never trigger, or would trigger on anything.

        Raises:
            PolicyError: as said, naming the field.
        """
        if not self.name or len(self.name) > 128 or not self.name.isprintable():
            raise PolicyError(f"policy name must be 1-128 printable characters: {self.name!r}")
        if self.drift_psi is None and self.drift_severity is None and self.accuracy_drop is None:
            raise PolicyError(
                f"policy {self.name!r} has no trigger: set drift_psi, drift_severity "
                "or accuracy_drop"
            )
        _positive("drift_psi", self.drift_psi, upper=100.0)
        _positive("accuracy_drop", self.accuracy_drop, upper=100.0)
        if self.drift_severity is not None and self.drift_severity not in SEVERITIES:
            raise PolicyError(
                f"drift_severity must be one of {SEVERITIES}: {self.drift_severity!r}"
            )
        _count("windows", self.windows, 1, _MAX_WINDOWS)
        _count("max_runs_per_day", self.max_runs_per_day, 1, 1000)
        if not _finite(self.cooldown_s) or not 0 <= self.cooldown_s <= 30 * _DAY_S:
            raise PolicyError(f"cooldown_s must be 0..{30 * _DAY_S:.0f} s: {self.cooldown_s!r}")
        if not _finite(self.soak_s) or not 0 <= self.soak_s <= _DAY_S:
            raise PolicyError(f"soak_s must be 0..{_DAY_S:.0f} s: {self.soak_s!r}")
        run = self.run
        _count("run.rounds", run.rounds, 1, _MAX_ROUNDS)
        _count("run.clients", run.clients, 1, 100000)
        _count("run.min_clients", run.min_clients, 1, run.clients)
        if not _finite(run.round_timeout_s) or run.round_timeout_s <= 0:
            raise PolicyError(f"run.round_timeout_s must be > 0: {run.round_timeout_s!r}")
        if self.holdout is not None and (not isinstance(self.holdout, str) or not self.holdout):
            raise PolicyError(f"holdout must be a file path: {self.holdout!r}")
        if "clients_per_round" in run.config:
            raise PolicyError("run.config must not set clients_per_round: use run.clients")

    def to_dict(self) -> dict[str, Any]:
        """The policy as a JSON-able dict (the store's column, the API's body)."""
        return {
            "name": self.name,
            "drift_psi": self.drift_psi,
            "drift_severity": self.drift_severity,
            "windows": self.windows,
            "accuracy_drop": self.accuracy_drop,
            "cooldown_s": self.cooldown_s,
            "max_runs_per_day": self.max_runs_per_day,
            "require_approval": self.require_approval,
            "soak_s": self.soak_s,
            "holdout": self.holdout,
            "run": {
                "rounds": self.run.rounds,
                "clients": self.run.clients,
                "min_clients": self.run.min_clients,
                "strategy": self.run.strategy,
                "codec": self.run.codec,
                "round_timeout_s": self.run.round_timeout_s,
                "config": dict(self.run.config),
            },
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> Policy:
        """Read back what :meth:`to_dict` wrote.

        Raises:
            PolicyError: a field is missing or has the wrong type or value.
        """
        try:
            run = data.get("run") or {}
            return cls(
                name=str(data["name"]),
                drift_psi=_opt_float(data.get("drift_psi")),
                drift_severity=data.get("drift_severity"),
                windows=int(data.get("windows", 3)),
                accuracy_drop=_opt_float(data.get("accuracy_drop")),
                cooldown_s=float(data.get("cooldown_s", 3600.0)),
                max_runs_per_day=int(data.get("max_runs_per_day", 2)),
                require_approval=bool(data.get("require_approval", False)),
                soak_s=float(data.get("soak_s", DEFAULT_SOAK_S)),
                holdout=data.get("holdout"),
                run=RunSettings(
                    rounds=int(run.get("rounds", 5)),
                    clients=int(run.get("clients", 10)),
                    min_clients=int(run.get("min_clients", 2)),
                    strategy=str(run.get("strategy", "fedavg")),
                    codec=str(run.get("codec", "fp32")),
                    round_timeout_s=float(run.get("round_timeout_s", 60.0)),
                    config=dict(run.get("config") or {}),
                ),
            )
        except (KeyError, TypeError, ValueError, AttributeError) as exc:
            raise PolicyError(f"malformed policy: {exc!r}") from None


@dataclass(frozen=True)
class Decision:
    """What :func:`decide` concluded.

    Attributes:
        action: :data:`NONE` or :data:`START_RUN`.
        reason: Why, in words (shown in logs and the audit log).
        trigger: For :data:`START_RUN`: what fired (``policy``, ``kind``
            ``drift`` or ``accuracy``, ``value``, ``threshold``, ``severity``,
            ``model``, ``version``, ``at``...), to record with the run and its
            artifact's lineage; empty for :data:`NONE`.
    """

    action: str
    reason: str
    trigger: dict[str, Any] = field(default_factory=dict)


def drift_value(score: DriftScore) -> float:
    """The PSI of the shift a score's severity comes from (features, confidence, classes)."""
    if score.signal == CONFIDENCE and score.confidence_psi is not None:
        return score.confidence_psi
    if score.signal == CLASSES and score.classes_psi is not None:
        return score.classes_psi
    return score.psi_max


def _above(policy: Policy, score: DriftScore) -> bool:
    if score.severity not in _RANK:  # insufficient (or unknown): never a trigger
        return False
    value = drift_value(score)
    if policy.drift_psi is not None and _finite(value) and value >= policy.drift_psi:
        return True
    return (
        policy.drift_severity is not None and _RANK[score.severity] >= _RANK[policy.drift_severity]
    )


def _drift_trigger(policy: Policy, history: Sequence[DriftScore]) -> dict[str, Any] | None:
    if policy.drift_psi is None and policy.drift_severity is None:
        return None
    latest = sorted(history, key=lambda s: s.at, reverse=True)[: policy.windows]
    if len(latest) < policy.windows or not all(_above(policy, s) for s in latest):
        return None
    newest = latest[0]
    return {
        "kind": "drift",
        "model": newest.model,
        "version": newest.version,
        "value": drift_value(newest),
        "signal": newest.signal,
        "severity": newest.severity,
        "threshold": policy.drift_psi,
        "threshold_severity": policy.drift_severity,
        "windows": policy.windows,
        "since": latest[-1].at,
        "at": newest.at,
        "top": [f.index for f in newest.top],
        "devices": list(newest.devices),
    }


def _accuracy_trigger(
    policy: Policy, accuracy: float | None, serving_accuracy: float | None
) -> dict[str, Any] | None:
    if policy.accuracy_drop is None or accuracy is None or serving_accuracy is None:
        return None
    if not (_finite(accuracy) and _finite(serving_accuracy)):
        return None
    drop = (serving_accuracy - accuracy) * 100.0
    if drop < policy.accuracy_drop:
        return None
    return {
        "kind": "accuracy",
        "value": accuracy,
        "serving": serving_accuracy,
        "drop_points": drop,
        "threshold": policy.accuracy_drop,
    }


def decide(
    policy: Policy,
    history: Sequence[DriftScore],
    now: float,
    *,
    runs_started: Sequence[float] = (),
    accuracy: float | None = None,
    serving_accuracy: float | None = None,
) -> Decision:
    """Whether ``policy`` starts a retraining run at ``now``.

    Args:
        policy: The operator's policy.
        history: Fleet-wide drift scores of the model's serving version (any
            order; only the latest ``policy.windows`` count).
        now: The caller's clock, unix seconds.
        runs_started: When this policy's previous runs started.
        accuracy: Accuracy on recent labelled feedback (0..1), if any.
        serving_accuracy: The serving model's accuracy it is compared with (0..1).

    Returns:
        :data:`START_RUN` with the trigger, or :data:`NONE` with the reason.
    """
    trigger = _drift_trigger(policy, history) or _accuracy_trigger(
        policy, accuracy, serving_accuracy
    )
    if trigger is None:
        return Decision(NONE, "below threshold")
    if runs_started:
        last = max(runs_started)
        if now - last < policy.cooldown_s:
            wait = policy.cooldown_s - (now - last)
            return Decision(NONE, f"cooling down: {wait:.0f} s before the next run may start")
        today = sum(1 for at in runs_started if now - at < _DAY_S)
        if today >= policy.max_runs_per_day:
            return Decision(NONE, f"{today} runs in the last 24 h (max_runs_per_day)")
    trigger = {"policy": policy.name, **trigger}
    return Decision(START_RUN, trigger_reason(trigger), trigger)


def trigger_reason(trigger: Mapping[str, Any]) -> str:
    """One line saying why a trigger (:func:`decide`'s) fired: the decision's reason,
    and the reason a retrained model's lineage records."""
    if trigger.get("kind") == "drift":
        return (
            f"fleet drift {float(trigger['value']):.3f} ({trigger.get('severity')}, "
            f"{trigger.get('signal')}) above threshold for {trigger.get('windows')} "
            "consecutive scores"
        )
    return f"feedback accuracy dropped {float(trigger.get('drop_points', 0.0)):.1f} points"


def _finite(value: float) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _opt_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _positive(name: str, value: float | None, *, upper: float) -> None:
    if value is not None and (not _finite(value) or not 0 < value <= upper):
        raise PolicyError(f"{name} must be a number in (0, {upper:g}]: {value!r}")


def _count(name: str, value: int, low: int, high: int) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
        raise PolicyError(f"{name} must be an integer in {low}..{high}: {value!r}")
