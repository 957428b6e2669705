"""What a federated run reports: one :class:`RoundReport` per round, a :class:`RunResult`.

The same fields everywhere rounds are reported (``fedge train``'s live view and
``--json``, the service's ``fedge rounds status``, the simulator): a round's figures
are gathered phase by phase from the grid's
:class:`~coordinator.federated.tasks.PhaseStats` (:meth:`RoundReport.add_phase`) and
turned into JSON by :meth:`RoundReport.to_json`. Pure values: no I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from coordinator.federated.models import Weights
from coordinator.federated.tasks import PhaseStats

__all__ = ["RoundReport", "RunResult"]


@dataclass
class RoundReport:
    """One round's outcome and figures.

    Attributes:
        round: 1-based round number.
        status: ``ok`` or ``failed``.
        reason: Why it failed (empty when ok).
        accuracy: Accuracy after the round (coordinator-side on ``eval_data``,
            else example-weighted federated evaluation), None if not measured.
        loss: The task's loss after the round, likewise (cross-entropy, MSE, or
            the reconstruction error of normal examples).
        metrics: Every metric measured after the round (coordinator-side:
            ``accuracy``/``mse``, ``mae``/``auc`` and ``loss`` by task; federated:
            the averages the devices reported); empty if not measured.
        clients: Accepted updates aggregated.
        sampled: Devices given a train task.
        uplink_bytes: MQTT payload bytes received for the round (reports, acks,
            uploads, chunk requests).
        downlink_bytes: MQTT payload bytes published for it (tasks, weight chunks;
            a broadcast chunk counts once).
        rejected: Rejected updates by reason.
        failures: Tasks that devices reported failed, by code.
        dropped: Sampled devices that went offline during the round.
        timed_out: Tasks without an answer by the deadline.
        late: Replies to earlier rounds' tasks (dropped).
        clipped_examples: Reports whose example count was over what the device
            announced (or the cap) and was clipped to it.
        eval_clients: Devices whose evaluation counted (federated evaluation).
        seconds: Wall time of the round.
    """

    round: int
    status: str = "ok"
    reason: str = ""
    accuracy: float | None = None
    loss: float | None = None
    metrics: dict[str, float] = field(default_factory=dict)
    clients: int = 0
    sampled: int = 0
    uplink_bytes: int = 0
    downlink_bytes: int = 0
    rejected: dict[str, int] = field(default_factory=dict)
    failures: dict[str, int] = field(default_factory=dict)
    dropped: int = 0
    timed_out: int = 0
    late: int = 0
    clipped_examples: int = 0
    eval_clients: int = 0
    seconds: float = 0.0

    def add_phase(self, stats: PhaseStats) -> None:
        """Add one phase's figures to the round's."""
        self.uplink_bytes += stats.uplink_bytes
        self.downlink_bytes += stats.downlink_bytes
        self.late += stats.late
        self.clipped_examples += stats.clipped_examples
        for reason, count in stats.rejected.items():
            self.rejected[reason] = self.rejected.get(reason, 0) + count
        for code, count in stats.failures.items():
            self.failures[code] = self.failures.get(code, 0) + count
        self.dropped += stats.outcomes.get("offline", 0)
        self.timed_out += stats.outcomes.get("timed_out", 0)

    def to_json(self) -> dict[str, Any]:
        """The JSON form (the same fields wherever rounds are reported)."""
        return {
            "round": self.round,
            "status": self.status,
            "reason": self.reason,
            "accuracy": self.accuracy,
            "loss": self.loss,
            "metrics": dict(self.metrics),
            "clients": self.clients,
            "sampled": self.sampled,
            "uplink_bytes": self.uplink_bytes,
            "downlink_bytes": self.downlink_bytes,
            "rejected": dict(self.rejected),
            "failures": dict(self.failures),
            "dropped": self.dropped,
            "timed_out": self.timed_out,
            "late": self.late,
            "clipped_examples": self.clipped_examples,
            "eval_clients": self.eval_clients,
            "seconds": round(self.seconds, 3),
        }


@dataclass
class RunResult:
    """A whole run: its rounds and the final global weights."""

    rounds: list[RoundReport]
    weights: Weights

    @property
    def final_accuracy(self) -> float | None:
        """Accuracy after the last round that measured one."""
        for report in reversed(self.rounds):
            if report.accuracy is not None:
                return report.accuracy
        return None

    @property
    def final_metrics(self) -> dict[str, float]:
        """The metrics of the last round that measured any (empty if none did)."""
        for report in reversed(self.rounds):
            if report.metrics:
                return dict(report.metrics)
        return {}

    def to_json(self) -> dict[str, Any]:
        """``{"rounds": [...], "final_accuracy": ..., "final_metrics": {...}}`` plus totals."""
        ok = [r for r in self.rounds if r.status == "ok"]
        return {
            "rounds": [r.to_json() for r in self.rounds],
            "final_accuracy": self.final_accuracy,
            "final_metrics": self.final_metrics,
            "rounds_ok": len(ok),
            "rounds_failed": len(self.rounds) - len(ok),
            "uplink_bytes": sum(r.uplink_bytes for r in self.rounds),
            "downlink_bytes": sum(r.downlink_bytes for r in self.rounds),
        }
