"""``fedge simulate --scenario drift|control``: the monitoring loop closed, in one process.

:func:`run_scenario` does, in order:

1. **Data** (:mod:`coordinator.sim.scenario_data`): digits in iid shards, one per
   agent; a seeded share of the agents (``shifted_share``) will be shifted.
2. **Serving model v1**: an MLP trained centrally on the training rows, packaged
   (int8, signed, with its reference profile) with a throwaway ``[fleet]`` key.
3. **Service**: an embedded broker (amqtt, loopback), the coordinator's
   :class:`~coordinator.service.fleet_service.FleetService` in this process (store
   in ``<out>/state.db``, the ``[fleet]`` key, fast drift and policy ticks), and one
   real :class:`~edge_agent.agent.Agent` per shard
   (:class:`~coordinator.sim.local_fleet.LocalFleet`, telemetry every ``tick_s``).
   v1 is uploaded and deployed to every agent through the service, and a retraining
   policy for it is set (drift PSI threshold for ``windows`` fleet scores; the
   candidate is compared with v1 on the held-out post-shift data).
4. **Ticks**: each ``tick_s`` every agent predicts ``rows_per_tick`` rows of its
   local data with :meth:`Agent.predict` (so its window summaries reflect real
   inputs). In the ``drift`` scenario, from ``shift_tick`` on the shifted agents'
   inputs and local training data are rotated. The service scores the summaries,
   its policy starts a federated run on the agents' (shifted) data, packages the
   candidate if it beats v1 and rolls it out with the health gate. Each tick the
   timeline records the fleet's drift score, the served version's accuracy on
   unshifted (``pre``) and shifted (``post``) test rows, and the events seen
   (``shift``, ``trigger``, ``run_start``, ``run_end``, ``rollout_start``,
   ``rollout_complete`` or ``rollout_halted``; the first of each kind). The drift
   run ends ``settle_ticks`` after the rollout completed (or after ``ticks``); the
   control run lasts ``ticks``.
5. **Report**: ``<out>/report.json`` (config, timeline, events, summary: detection
   delay in ticks and telemetry windows, seconds to rollout completion,
   accuracies before and after, drift alarms and retraining runs:
   ``false_alarms`` in the control run). ``recovered``: the served model's accuracy
   on the fleet's post-shift traffic (shifted rows for the shifted share of the
   devices, unshifted for the others) is within 2 points of v1's pre-shift
   accuracy; ``recovered_on_shifted_devices``: the same on shifted rows only (a
   stricter bar: the shifted devices hold only their share of the training data),
   and ``<out>/report.png`` (:func:`~coordinator.sim.report_plot.plot_timeline`).
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np

from compress.families import init_weights
from compress.fileio import atomic_write
from compress.keys import generate_signing_key, save_keypair
from compress.signing import TrustedKeys
from coordinator.delivery.fleet_statement import StatementSettings
from coordinator.delivery.packaging import LabelledData, package_weights
from coordinator.errors import RunError
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.monitoring.policy import Policy, RunSettings, drift_value
from coordinator.service.fleet_service import FleetService, ServiceSettings
from coordinator.service.operations import CLI_ACTOR, DeployRequest
from coordinator.service.retraining import ROLLING_OUT, TRAINING
from coordinator.service.store import Store
from coordinator.sim.embedded_broker import EmbeddedBroker
from coordinator.sim.local_fleet import LocalFleet
from coordinator.sim.report_plot import plot_timeline
from coordinator.sim.scenario_data import ScenarioData, scenario_data, shift, shift_shard
from edge_agent.config.agent import BrokerConfig
from edge_agent.errors import AgentError
from edge_agent.serving.server import LoadedModel
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.trainer import Dataset, TrainConfig

__all__ = ["SCENARIOS", "ScenarioConfig", "recovery", "run_scenario"]

logger = logging.getLogger(__name__)

SCENARIOS = ("drift", "control")
MODEL = "digits"
RECOVERY_POINTS = 2.0
"""Post-shift accuracy within this many points of the pre-shift level is a recovery."""

EventCallback = Callable[[str, dict[str, Any]], None]


@dataclass(frozen=True)
class ScenarioConfig:
    """A scenario run (see the module docstring).

    Attributes:
        out: The run directory (report, store, keys, data, agents).
        scenario: ``drift`` or ``control`` (no shift).
        agents: Real agents, one iid digits shard each.
        shifted_share: Share of the agents the shift hits (at least one).
        ticks: Most ticks of the run (the control run lasts exactly this).
        shift_tick: The tick the shift starts at (``drift``).
        tick_s: Seconds per tick, and the agents' telemetry interval.
        rows_per_tick: Prediction requests each agent serves per tick.
        settle_ticks: Ticks the drift run goes on after the rollout completed.
        rounds, epochs, lr, hidden: The retraining run (rounds x local epochs,
            learning rate, MLP hidden units); v1 is trained centrally with the
            same epoch budget (``rounds * epochs``).
        drift_psi, windows: The policy: fleet drift PSI threshold, and how many
            consecutive fleet scores must reach it.
        seed: Seed of the data split, the shifted agents, v1 and the traffic.
    """

    out: Path
    scenario: str = "drift"
    agents: int = 6
    shifted_share: float = 0.3
    ticks: int = 120
    shift_tick: int = 10
    tick_s: float = 1.0
    rows_per_tick: int = 100
    settle_ticks: int = 5
    rounds: int = 20
    epochs: int = 10
    lr: float = 0.1
    hidden: int = 64
    drift_psi: float = 0.25
    windows: int = 2
    seed: int = 0

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            RunError: an unknown scenario or an out-of-range value.
        """
        if self.scenario not in SCENARIOS:
            raise RunError(f"--scenario must be one of {', '.join(SCENARIOS)}, "
                           f"not {self.scenario!r}")  # fmt: skip
        if self.agents < 2 or self.ticks < 1 or self.rounds < 1 or self.rows_per_tick < 1:
            raise RunError("a scenario needs at least 2 agents, 1 tick, 1 round, 1 row per tick")
        if not 0.0 < self.shifted_share < 1.0:
            raise RunError(f"the shifted share must be in (0, 1), got {self.shifted_share}")
        if not 0 <= self.shift_tick < self.ticks:
            raise RunError(f"the shift tick must be in [0, {self.ticks}), got {self.shift_tick}")
        if self.tick_s <= 0:
            raise RunError(f"the tick must be positive, got {self.tick_s} s")

    def to_json(self) -> dict[str, Any]:
        """The settings, JSON-able."""
        return {**asdict(self), "out": str(self.out)}


def _train_v1(config: ScenarioConfig, data: ScenarioData) -> dict[str, Any]:
    """The serving model: the MLP trained centrally on every training row (pre-shift)."""
    layers = [data.x_train.shape[1], config.hidden, 10]
    weights = init_weights("mlp", layers, np.random.default_rng(config.seed))
    train = TrainConfig(epochs=config.rounds * config.epochs, lr=config.lr, batch_size=16,
                        seed=config.seed)  # fmt: skip
    fitted = trainer_for("mlp").fit(weights, Dataset.from_arrays(data.x_train, data.y_train),
                                    train, train.rng("v1"))  # fmt: skip
    return dict(fitted.weights)


def _accuracy(agent_model: LoadedModel, data: LabelledData) -> float:
    """Accuracy of a served model (its runtime, not :meth:`Agent.predict`: the
    evaluation must not enter the device's summaries)."""
    scores = np.asarray(agent_model.runtime.predict(data.x))
    return float(np.mean(scores.argmax(axis=1) == data.y))


class _Timeline:
    """Per-tick records and events, read from the service and the agents."""

    def __init__(self, service: FleetService, fleet: LocalFleet, data: ScenarioData,
                 config: ScenarioConfig, emit: EventCallback) -> None:  # fmt: skip
        self.service, self.fleet, self.data, self.config, self.emit = (
            service, fleet, data, config, emit)  # fmt: skip
        self.ticks: list[dict[str, Any]] = []
        self.events: list[dict[str, Any]] = []
        self._accuracy: dict[int, tuple[float, float]] = {}
        self._seen: set[str] = set()
        self.started = time.monotonic()
        self.refused = 0

    def event(self, tick: int, kind: str, **detail: Any) -> None:
        if kind in self._seen:
            return
        self._seen.add(kind)
        entry = {"tick": tick, "t_s": round(time.monotonic() - self.started, 2), "event": kind,
                 **detail}  # fmt: skip
        self.events.append(entry)
        logger.info("scenario %s: tick %d: %s %s", self.config.scenario, tick, kind, detail)
        self.emit("event", entry)

    def served(self) -> tuple[int | None, float | None, float | None]:
        """The version most agents serve and its accuracy on pre/post test rows."""
        models = [a.model for a in self.fleet.agents if a.model is not None]
        if not models:
            return None, None, None
        versions = [m.version for m in models]
        version = max(set(versions), key=versions.count)
        if version not in self._accuracy:
            model = next(m for m in models if m.version == version)
            self._accuracy[version] = (_accuracy(model, self.data.pre),
                                       _accuracy(model, self.data.post))  # fmt: skip
        pre, post = self._accuracy[version]
        return version, pre, post

    def record(self, tick: int) -> None:
        """The tick's drift score, served accuracy and the retraining's progress."""
        version, pre, post = self.served()
        score = None
        if version is not None:
            history = self.service.store.drift_history(model=MODEL, version=version, limit=1)
            score = history[0] if history else None
        for row in self.service.retrainings(policy=MODEL):
            self.event(tick, "trigger", run_id=row.run_id, value=row.trigger.get("value"))
            self.event(tick, "run_start", run_id=row.run_id)
            if row.state != TRAINING:
                self.event(tick, "run_end", state=row.state,
                           candidate=row.detail.get("candidate_metric"),
                           serving=row.detail.get("serving_metric"))  # fmt: skip
            rollout_id = row.detail.get("rollout_id")
            if row.state == ROLLING_OUT and rollout_id:
                self.event(tick, "rollout_start", rollout_id=rollout_id)
                rollout = self.service.rollout(rollout_id).rollout
                if rollout.state == "completed":
                    self.event(tick, "rollout_complete", rollout_id=rollout_id)
                elif rollout.state == "halted":
                    self.event(tick, "rollout_halted", rollout_id=rollout_id)
        self.ticks.append({
            "tick": tick, "t_s": round(time.monotonic() - self.started, 2),
            "serving_version": version, "accuracy_pre": pre, "accuracy_post": post,
            "drift": None if score is None else round(drift_value(score), 4),
            "severity": None if score is None else score.severity,
        })  # fmt: skip

    def at(self, kind: str) -> dict[str, Any] | None:
        return next((e for e in self.events if e["event"] == kind), None)


def _traffic(fleet: LocalFleet, data: ScenarioData, *, shifted: bool,
             rng: np.random.Generator, rows: int, timeline: _Timeline) -> None:  # fmt: skip
    """One tick of predictions: every agent predicts ``rows`` rows of its local data,
    one request each (the rollout's health gate compares per-request latency)."""
    for index, agent in enumerate(fleet.agents):
        x, _y = data.streams[index]
        batch = x[rng.integers(0, len(x), rows)]
        if shifted and index in data.shifted:
            batch = shift(batch)
        for row in batch:  # one request per row, as a device serves them
            try:
                agent.predict(row[np.newaxis])
            except AgentError as exc:  # e.g. no model while one installs
                timeline.refused += 1
                logger.debug("scenario: %s refused a prediction: %s", agent.device_id, exc)


def _deploy_v1(service: FleetService, fleet: LocalFleet, artifact: bytes, agents: int) -> None:
    """Upload v1, wait for the agents, deploy it and wait until all serve it.

    Raises:
        RunError: the agents did not come online or did not install v1.
    """
    row = service.upload_artifact(artifact, actor=CLI_ACTOR)
    _wait(lambda: sum(r.can_train for r in service.hub.fleet()) >= agents, 60.0, "agents online")
    deployment = service.deploy(DeployRequest(row.sha256, timeout_s=60.0), actor=CLI_ACTOR)
    deployment_id = deployment.result.deployment_id
    _wait(lambda: service.deployment(deployment_id).done, 90.0, "v1 deployed")
    _wait(lambda: all(a.model is not None and a.model.version == 1 for a in fleet.agents),
          30.0, "every agent serving v1")  # fmt: skip


def _wait(done: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if time.monotonic() > deadline:
            logger.error("scenario: timed out waiting for %s", what)
            raise RunError(f"scenario: timed out after {timeout:.0f} s waiting for {what}")
        time.sleep(0.1)


def _policy(config: ScenarioConfig, data: ScenarioData) -> Policy:
    train = {"epochs": config.epochs, "lr": config.lr, "batch_size": 16}
    run = RunSettings(rounds=config.rounds, clients=config.agents,
                      min_clients=max(1, config.agents - 1), round_timeout_s=60.0,
                      config={"features": 64, "classes": 10, "hidden": [config.hidden],
                              "train": train})  # fmt: skip
    return Policy(MODEL, drift_psi=config.drift_psi, windows=config.windows,
                  holdout=str(data.holdout), soak_s=2.0, run=run)  # fmt: skip


def _summary(
    config: ScenarioConfig, timeline: _Timeline, v1: tuple[float, float]
) -> dict[str, Any]:
    """Detection delay, rollout time, accuracies, alarms (see the module docstring)."""
    shift_event, trigger = timeline.at("shift"), timeline.at("trigger")
    complete = timeline.at("rollout_complete")
    # An alarm: a fleet score the policy counts as above its threshold.
    alarms = [t for t in timeline.ticks if t["drift"] is not None
              and t["severity"] != "insufficient" and t["drift"] >= config.drift_psi]  # fmt: skip
    last = timeline.ticks[-1] if timeline.ticks else {}
    out: dict[str, Any] = {
        "accuracy_pre_shift_v1": v1[0],
        "accuracy_post_shift_v1": v1[1],
        "final_version": last.get("serving_version"),
        "accuracy_pre_final": last.get("accuracy_pre"),
        "accuracy_post_final": last.get("accuracy_post"),
        "drift_alarm_ticks": len(alarms),
        "retraining_runs": len(timeline.service.retrainings(policy=MODEL)),
        "refused_predictions": timeline.refused,
    }
    if config.scenario == "control":
        out["false_alarms"] = out["retraining_runs"] + (1 if alarms else 0)
        return out
    if shift_event and trigger:
        ticks = trigger["tick"] - shift_event["tick"]
        out["detection_ticks"] = ticks
        out["detection_windows"] = ticks  # one telemetry window per tick
        out["detection_s"] = round(trigger["t_s"] - shift_event["t_s"], 2)
    if shift_event and complete:
        out["rollout_complete_s"] = round(complete["t_s"] - shift_event["t_s"], 2)
    pre, post = out["accuracy_pre_final"], out["accuracy_post_final"]
    if complete and pre is not None and post is not None:
        share = len(timeline.data.shifted) / config.agents
        out.update(recovery(v1[0], pre=pre, post=post, shifted_share=share))
    else:
        out["recovered"] = out["recovered_on_shifted_devices"] = False
    return out


def recovery(v1_pre: float, *, pre: float, post: float, shifted_share: float) -> dict[str, Any]:
    """Did the final model recover? Its accuracy on the fleet's post-shift traffic
    (``post`` on the shifted share of the devices, ``pre`` on the others: every
    device serves as many requests), and on shifted rows alone, against v1's
    pre-shift accuracy ``v1_pre``, within :data:`RECOVERY_POINTS`."""
    fleet = shifted_share * post + (1 - shifted_share) * pre
    return {
        "accuracy_post_shift_fleet_final": fleet,
        "recovered": 100 * (v1_pre - fleet) <= RECOVERY_POINTS + 1e-9,
        "recovered_on_shifted_devices": 100 * (v1_pre - post) <= RECOVERY_POINTS + 1e-9,
    }


def run_scenario(
    config: ScenarioConfig, *, on_event: EventCallback | None = None
) -> dict[str, Any]:
    """Run a scenario (see the module docstring); returns the ``report.json`` body.

    Raises:
        RunError: bad settings, or the fleet did not come up or take v1.
        CoordinatorError: the embedded broker did not start.
    """
    emit = on_event or (lambda _kind, _data: None)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    data = scenario_data(out / "data", agents=config.agents, shifted_share=config.shifted_share,
                         seed=config.seed)  # fmt: skip
    key = generate_signing_key()
    _private, public = save_keypair(key, out / "keys", overwrite=True)
    emit("phase", {"name": "serving model"})
    (out / "artifacts").mkdir(exist_ok=True)
    v1 = package_weights("mlp", _train_v1(config, data), name=MODEL, version=1, keys=[key],
                         out=out / "artifacts" / f"{MODEL}-v1.fedge",
                         evaluation=LabelledData(data.x_train, data.y_train),
                         now=datetime.now(UTC))  # fmt: skip
    settings = ServiceSettings(fleet=StatementSettings("sim-fleet", (key,)),
                               retraining_every_s=0.5, drift_fleet_every_s=config.tick_s,
                               rollout_tick_s=0.5)  # fmt: skip
    rng = np.random.default_rng(config.seed + 1)
    with EmbeddedBroker() as broker:
        hub = MqttHub(HubConfig(broker=BrokerConfig.from_url(broker.url, username="coordinator")))
        service = FleetService(Store.open(out / "state.db"), hub,
                               TrustedKeys.of([key.public_key]), settings=settings)  # fmt: skip
        service.start()
        try:
            with LocalFleet.start(data.shards, root=out / "agents", trust=[public],
                                  broker_for=lambda user: BrokerConfig.from_url(broker.url,
                                                                                username=user),
                                  stall_timeout_s=5.0,
                                  telemetry_interval_s=config.tick_s) as fleet:  # fmt: skip
                emit("phase", {"name": "deploy v1"})
                _deploy_v1(service, fleet, v1.path.read_bytes(), config.agents)
                service.set_policy(_policy(config, data), actor=CLI_ACTOR)
                timeline = _Timeline(service, fleet, data, config, emit)
                v1_accuracy = timeline.served()[1:]
                emit("phase", {"name": "ticks"})
                done_at: int | None = None
                for tick in range(config.ticks):
                    shifted = config.scenario == "drift" and tick >= config.shift_tick
                    if shifted and tick == config.shift_tick:
                        for index in data.shifted:
                            shift_shard(data.shards[index], *data.streams[index])
                        timeline.event(tick, "shift", devices=[fleet.agents[i].device_id
                                                               for i in data.shifted])  # fmt: skip
                    _traffic(
                        fleet,
                        data,
                        shifted=shifted,
                        rng=rng,
                        rows=config.rows_per_tick,
                        timeline=timeline,
                    )
                    timeline.record(tick)
                    if done_at is None and timeline.at("rollout_complete"):
                        done_at = tick
                    if done_at is not None and tick - done_at >= config.settle_ticks:
                        break
                    next_at = timeline.started + (tick + 1) * config.tick_s
                    time.sleep(max(0.0, next_at - time.monotonic()))
                summary = _summary(config, timeline, (v1_accuracy[0] or 0.0,
                                                      v1_accuracy[1] or 0.0))  # fmt: skip
        finally:
            service.stop()
            service.store.close()
    report = {
        "scenario": config.scenario, "config": config.to_json(), "model": MODEL,
        "shift": "rotate 90 degrees (inputs and local training data)",
        "shifted_devices": [f"sim{i:02d}" for i in data.shifted],
        "policy": {"drift_psi": config.drift_psi, "windows": config.windows},
        "ticks_run": len(timeline.ticks), "summary": summary,
        "events": timeline.events, "timeline": timeline.ticks,
    }  # fmt: skip
    atomic_write(out / "report.json", (json.dumps(report, indent=2) + "\n").encode())
    plot_timeline(report, out / "report.png")
    return report
