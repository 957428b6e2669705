"""``fedge simulate``: a whole fleet on one machine, from data to a rolled-out model.

:func:`run_simulation` does, in order:

1. **Broker**: an :class:`~coordinator.sim.embedded_broker.EmbeddedBroker` (amqtt,
   loopback, free port), or the ``broker`` URL given (mosquitto, a cluster).
2. **Keys**: a throwaway Ed25519 key pair in ``<out>/keys`` (the agents trust it).
3. **Data** (:func:`~coordinator.sim.fleet_data.fleet_data`): the dataset (``auto``,
   ``digits``, ``synthetic[:n,f,c]``, a real dataset shipped in a package such as
   ``digits-images``, ``mnist``, ``japanese-vowels``, ``ucr-anomaly``, ``diabetes``, or a
   ``.npz`` with ``x`` (n, ...) and ``y`` (labels, targets, or none for
   reconstruction); ``auto`` and a bare ``synthetic`` are sized for the fleet) split
   into training and test data (seeded), the training part partitioned over the agents
   (``iid``, ``dirichlet:A``, ``shards:K`` or ``natural``) into
   ``<out>/data/shard<i>/local.npz``; the test part is the coordinator's
   (``<out>/data/test.npz``). What was chosen is the ``data`` entry of the report.
   **Model** (:class:`~coordinator.sim.sim_model.SimModel`): ``--model`` is a built-in
   family (``mlp``, ``softmax``) or a PyTorch factory ``module:function`` (importable
   from the current directory) or ``zoo:<name>``; its task is ``--task``, else the
   dataset's.
4. **Agents**: one real :class:`~edge_agent.agent.Agent` per shard
   (:class:`~coordinator.sim.local_fleet.LocalFleet`), each with its own MQTT connection
   and data directory under ``<out>/agents``.
5. **Rounds**: :func:`~coordinator.federated.runs.run_training` with the chosen strategy
   and codec (with ``robust``, every update clipped to the round's median norm and
   weight, as ``fedge train --robust``); with ``dropout`` > 0, that share of the
   agents (seeded) drops its connection while each round trains, and comes back by
   itself.
6. **Package**: the final global weights (kept as ``<out>/artifacts/final-weights.npz``)
   -> ONNX -> int8 (calibrated on a sample of the training data, gated against fp32 on
   the test set by the task's metric) -> signed artifact in ``<out>/artifacts``.
7. **Roll out**: to one canary agent first, then, if it installed, to the others in
   waves of 50; then every agent must serve the new version.
8. **Report**: ``<out>/report.json`` and ``<out>/report.png``. Besides the rounds, the
   report holds the task's metrics of the final model (``final_metrics``) and of the
   centralized baseline (``centralized_metrics``: the same model trained on the union
   of the shards with the same epoch budget).

Progress is reported through an ``on_event(kind, data)`` callback, so the CLI can draw
it and tests can ignore it.
"""

from __future__ import annotations

import json
import logging
import random
import resource
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.codecs import layout_of, parse_codec, update_nbytes_fp32
from compress.fileio import atomic_write
from compress.keys import SigningKey, generate_signing_key, save_keypair
from compress.lineage import Trigger
from coordinator.delivery.deliveries import Artifact, Deliveries
from coordinator.delivery.packaging import PackageResult
from coordinator.delivery.tracker import DeploymentTracker, DeviceState
from coordinator.errors import RunError
from coordinator.federated.lineage import lineage_for_run
from coordinator.federated.models import PRIMARY_METRIC
from coordinator.federated.runs import RoundReport, RunConfig, RunResult, run_training
from coordinator.federated.strategies import StrategyArgs, build_strategy
from coordinator.link.fleet import Target
from coordinator.link.hub import HubConfig, MqttHub
from coordinator.link.port import Hub
from coordinator.sim.embedded_broker import EmbeddedBroker
from coordinator.sim.fleet_data import FleetData, fleet_data
from coordinator.sim.local_fleet import LocalFleet, save_shards
from coordinator.sim.report_plot import plot_report
from coordinator.sim.sim_model import BUILTIN_FAMILIES, SimModel
from edge_agent.config.agent import BrokerConfig
from edge_agent.protocol import DEFAULT_LIMITS, TaskAck, UpdateReport, encode
from edge_agent.training.model_spec import check_task, parse_model_spec
from edge_agent.training.trainer import OPTIMIZERS, TrainConfig

__all__ = [
    "SimulationConfig",
    "SimulationReport",
    "run_simulation",
]

logger = logging.getLogger(__name__)

EventCallback = Callable[[str, dict[str, Any]], None]
MODEL_NAME = "simulated"
ROLLOUT_WAVE = 50
"""Agents updated at once after the canary: every agent of a simulation shares this
machine's cores, and a model's health check has a latency bound."""
MAX_AGENTS = 2000
"""Agents one simulation process runs. Their connections share a few epoll network
threads, but each agent keeps its own worker thread, data directory and model
session (about 0.6 MB): a bound that keeps a typo from exhausting the machine."""
FILES_PER_AGENT = 7
"""Open files budgeted per agent: its socket, its telemetry spool's database (three:
the file, its WAL and its shared-memory index), plus files it opens while installing."""


@dataclass(frozen=True)
class SimulationConfig:
    """A simulation, as ``fedge simulate`` describes it (see the module docstring)."""

    out: Path
    agents: int = 20
    rounds: int = 10
    dataset: str = "auto"
    partition: str = "dirichlet:0.5"
    strategy: str = "fedavg"
    strategy_args: StrategyArgs = field(default_factory=dict)
    codec: str = "fp32"
    dropout: float = 0.0
    broker: str | None = None
    broker_password_format: str | None = None
    seed: int = 0
    hidden: int = 64
    epochs: int = 2
    lr: float = 0.05
    batch_size: int = 16
    round_timeout_s: float = 30.0
    model: str = "mlp"
    task: str | None = None
    optimizer: str = "sgd"
    robust: bool = False

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            RunError: an out-of-range value.
            CodecError: an invalid codec spec.
            UnknownModelError: ``model`` is neither a built-in family nor a spec.
            TrainConfigError: an unknown task.
        """
        if self.agents < 1 or self.rounds < 1:
            raise RunError("--agents and --rounds must be at least 1")
        if self.agents > MAX_AGENTS:
            raise RunError(
                f"one simulation runs at most {MAX_AGENTS} agents (asked for {self.agents}); "
                "for more, run several simulations against one broker"
            )
        if not 0.0 <= self.dropout < 1.0:
            raise RunError(f"--dropout must be in [0, 1), got {self.dropout}")
        parse_codec(self.codec)
        if self.model not in BUILTIN_FAMILIES:
            parse_model_spec(self.model)
        if self.task is not None:
            check_task(self.task)
        if self.optimizer not in OPTIMIZERS:
            raise RunError(f"--optimizer must be one of {', '.join(OPTIMIZERS)}")
        TrainConfig(epochs=self.epochs, lr=self.lr, batch_size=self.batch_size)

    def to_json(self) -> dict[str, Any]:
        """The settings, JSON-able (paths as text)."""
        data = asdict(self)
        data["out"] = str(self.out)
        data.pop("broker_password_format")
        return data


@dataclass
class SimulationReport:
    """What ``report.json`` holds (see :meth:`to_json`)."""

    config: SimulationConfig
    data: FleetData
    model: SimModel
    result: RunResult
    final_metrics: dict[str, float]
    centralized_metrics: dict[str, float]
    fp32_uplink_bytes_per_round: float
    rollout: dict[str, Any]
    timings: dict[str, float]
    broker: str
    artifact: str
    weights: str
    packaging: dict[str, Any]

    @property
    def centralized_accuracy(self) -> float | None:
        """The centralized baseline's accuracy (None for tasks other than classification)."""
        return self.centralized_metrics.get("accuracy")

    def to_json(self) -> dict[str, Any]:
        """The report: config, rounds, metrics, bytes, rollout, timings."""
        body = self.result.to_json()
        rounds = self.result.rounds
        return {
            "config": self.config.to_json(),
            "data": self.data.to_json(),
            "model": self.config.model,
            "task": self.model.model.task,
            "metric": PRIMARY_METRIC[self.model.model.task],
            "rounds": body["rounds"],
            "final_accuracy": body["final_accuracy"],
            "centralized_accuracy": self.centralized_accuracy,
            "final_metrics": self.final_metrics,
            "centralized_metrics": self.centralized_metrics,
            "fp32_uplink_bytes_per_round": self.fp32_uplink_bytes_per_round,
            "uplink_bytes_per_round": statistics.mean(r.uplink_bytes for r in rounds),
            "downlink_bytes_per_round": statistics.mean(r.downlink_bytes for r in rounds),
            "seconds_per_round": statistics.mean(r.seconds for r in rounds),
            "rounds_ok": body["rounds_ok"],
            "rounds_failed": body["rounds_failed"],
            "rollout": self.rollout,
            "timings": self.timings,
            "broker": self.broker,
            "artifact": self.artifact,
            "weights": self.weights,
            "packaging": self.packaging,
        }


def _train_config(config: SimulationConfig, *, epochs: int) -> TrainConfig:
    """The local training settings of the run (``epochs`` per round, or the budget)."""
    return TrainConfig(
        epochs=epochs, lr=config.lr, batch_size=config.batch_size,
        optimizer=config.optimizer, seed=config.seed,  # type: ignore[arg-type]
    )  # fmt: skip


def _packaging_json(result: PackageResult) -> dict[str, Any]:
    """What packaging measured, for ``report.json``."""
    out: dict[str, Any] = {
        "metric_name": result.metric_name,
        "fp32_metric": result.fp32_metric,
        "packaged_metric": result.packaged_metric,
        "fp32_bytes": result.fp32_bytes,
        "packaged_bytes": result.packaged_bytes,
        "quantization": result.manifest.quantization,
    }
    if result.anomaly_threshold is not None:
        out["anomaly_threshold"] = result.anomaly_threshold
    if result.manifest.lineage is not None:
        out["lineage"] = result.manifest.lineage.to_dict()
    return out


def _fp32_report_bytes(weights: dict[str, npt.NDArray[np.float32]]) -> int:
    """MQTT bytes one device sends per round with the fp32 codec (ack + report)."""
    payload = np.zeros(2 + update_nbytes_fp32(layout_of(weights)), dtype=np.uint8)
    task_id = "0" * 32
    report = UpdateReport(
        round_id="r1", task_id=task_id, num_examples=100, codec="fp32",
        metrics={"train_loss": 0.5, "train_accuracy": 0.5, "train_seconds": 0.1},
        arrays={"update": payload},
    )  # fmt: skip
    ack = TaskAck(round_id="r1", task_id=task_id)
    limits = DEFAULT_LIMITS
    return sum(len(encode(m, sender="sim00", sent_at=0.0, limits=limits)) for m in (ack, report))


# ---------------------------------------------------------------------- running


@contextmanager
def _broker(config: SimulationConfig) -> Iterator[str]:
    if config.broker is not None:
        yield config.broker
        return
    with EmbeddedBroker() as embedded:
        yield embedded.url


class _Dropout:
    """Drops a seeded share of the agents' connections while each round trains."""

    def __init__(self, fleet: LocalFleet, share: float, seed: int) -> None:
        self.fleet = fleet
        self.share = share
        self.rng = random.Random(seed)  # noqa: S311 - simulation, not secrets
        self.dropped: dict[int, list[str]] = {}

    def __call__(self, report: RoundReport, what: str) -> None:
        if self.share <= 0 or report.round in self.dropped or not what.startswith("training"):
            return
        victims = [a for a in self.fleet.agents if self.rng.random() < self.share]
        self.dropped[report.round] = [a.device_id for a in victims]
        for agent in victims:
            agent.drop_connection()


def _raise_open_files_limit(agents: int) -> None:
    """One socket per agent: raise the soft limit on open files as far as needed.

    Raises:
        RunError: the hard limit is too low for this many agents.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = FILES_PER_AGENT * agents + 256
    if soft >= wanted:
        return
    if hard != resource.RLIM_INFINITY and hard < wanted:
        raise RunError(
            f"{agents} agents need about {wanted} open files, and this process may open "
            f"at most {hard} (ulimit -Hn); raise the limit or run fewer agents"
        )
    resource.setrlimit(resource.RLIMIT_NOFILE, (wanted, hard))


def _rollout(
    hub: Hub,
    fleet: LocalFleet,
    artifact: Artifact,
    on_event: EventCallback,
    timeout: float,
) -> dict[str, Any]:
    """Canary first, then waves of :data:`ROLLOUT_WAVE`; then check every agent serves it.

    Agents that dropped their connection in the last round are waited for (they
    reconnect by themselves) so the whole fleet is targeted.
    """
    ids = [a.device_id for a in fleet.agents]
    try:
        fleet.wait_eligible(hub, len(ids), timeout=timeout)
    except RunError:
        logger.warning("not every agent is back online; rolling out to those that are")
    online = {r.device_id for r in hub.fleet() if r.online}
    ids = sorted(ids, key=lambda device_id: device_id not in online)  # a canary that is up
    rest = ids[1:]
    waves = [rest[i : i + ROLLOUT_WAVE] for i in range(0, len(rest), ROLLOUT_WAVE)]
    stages = [("canary", ids[:1]), *((f"wave {n}", wave) for n, wave in enumerate(waves, 1))]
    installed: list[str] = []
    outcome: dict[str, Any] = {"version": artifact.manifest.version, "agents_total": len(ids)}
    with Deliveries(hub) as deliveries:
        for stage, devices in stages:
            if not devices:
                continue
            on_event("rollout", {"stage": stage, "done": 0, "total": len(devices)})
            stage_started = time.monotonic()
            delivery = deliveries.deploy(artifact, Target.parse("device:" + ",".join(devices)))

            def progress(
                tracker: DeploymentTracker, stage: str = stage, total: int = len(devices)
            ) -> None:
                done = sum(1 for p in tracker.progress() if p.state is DeviceState.INSTALLED)
                on_event("rollout", {"stage": stage, "done": done, "total": total})

            result = deliveries.wait(delivery, timeout=timeout, on_change=progress)
            stage_ok = [d.device_id for d in result.devices if d.state is DeviceState.INSTALLED]
            installed += stage_ok
            outcome["stages"] = [*outcome.get("stages", []), {
                "stage": stage, "targeted": len(devices), "installed": len(stage_ok),
                "seconds": round(time.monotonic() - stage_started, 3),
            }]  # fmt: skip
            if stage == "canary":
                outcome["canary_installed"] = len(stage_ok)
            if stage == "canary" and not result.succeeded:
                outcome["halted"] = "the canary did not install the model"
                break
    version = artifact.manifest.version
    serving = [
        a.device_id for a in fleet.agents if a.model is not None and a.model.version == version
    ]
    outcome["agents_updated"] = len(serving)
    outcome["all_serving"] = len(serving) == len(ids)
    return outcome


def _train(
    hub: MqttHub,
    config: SimulationConfig,
    sim: SimModel,
    weights: dict[str, npt.NDArray[np.float32]],
    *,
    dropout: _Dropout,
    on_round: Callable[[RoundReport, str], None] | None,
) -> RunResult:
    def round_event(report: RoundReport, what: str) -> None:
        dropout(report, what)
        if on_round is not None:
            on_round(report, what)

    training = RunConfig(
        model=MODEL_NAME,
        family=sim.model.family,
        model_def=sim.model if sim.model.is_torch else None,
        initial_weights=weights,
        rounds=config.rounds,
        clients_per_round=config.agents,
        min_clients=max(1, config.agents // 2),
        round_timeout_s=config.round_timeout_s,
        codec=config.codec,
        train_config=_train_config(config, epochs=config.epochs).to_mapping(),
        eval_data=sim.test,
        seed=config.seed,
        robust=config.robust,
    )
    strategy = build_strategy(config.strategy, config.strategy_args, federated_eval=False)
    return run_training(hub, strategy, training, on_round=round_event)


def _package(
    config: SimulationConfig, sim: SimModel, result: RunResult, key: SigningKey
) -> tuple[Path, Path, PackageResult]:
    """Keep the final weights and package them: (artifact, weights file, packaging figures)."""
    artifact_path = config.out / "artifacts" / f"{MODEL_NAME}-v1.fedge"
    artifact_path.parent.mkdir(parents=True, exist_ok=True)
    weights_path = artifact_path.parent / "final-weights.npz"
    final: dict[str, Any] = dict(result.weights)
    np.savez(weights_path, **final)
    packaged = sim.package(
        result.weights, name=MODEL_NAME, version=1, keys=[key], out=artifact_path,
        now=datetime.now(UTC), seed=config.seed,
        metadata={"trained": "fedge simulate", "model": config.model},
        lineage=lineage_for_run(result, trigger=Trigger.manual(), parent=None,
                                strategy=config.strategy, codec=config.codec),
    )  # fmt: skip
    return artifact_path, weights_path, packaged


def _prepare_data(config: SimulationConfig) -> tuple[FleetData, SimModel, list[Path]]:
    """Load and partition the data, choose the model, write the shards and the test set."""
    data = fleet_data(
        config.dataset, config.partition, config.agents, config.seed,
        task=None if config.task is None else check_task(config.task),
    )  # fmt: skip
    sim = SimModel.choose(config.model, config.task, data, hidden=config.hidden)
    shards = save_shards(sim.rows(data.x), data.y, data.parts, config.out / "data")
    test = sim.test
    np.savez(config.out / "data" / "test.npz", x=test.x, y=test.y)
    return data, sim, shards


def run_simulation(
    config: SimulationConfig,
    *,
    on_event: EventCallback | None = None,
    on_round: Callable[[RoundReport, str], None] | None = None,
) -> SimulationReport:
    """Run a whole simulation (see the module docstring) and write its report.

    Raises:
        RunError: bad settings or data, or no agent came online.
        CoordinatorError: the embedded broker did not start.
        BrokerError: the given broker cannot be reached.
        UnknownModelError: the model's factory cannot be imported.
        AccuracyDropError: the int8 model fails the task's quality gate.
    """
    emit = on_event or (lambda _kind, _data: None)
    out = config.out
    out.mkdir(parents=True, exist_ok=True)
    timings: dict[str, float] = {}
    started = time.monotonic()

    _raise_open_files_limit(config.agents)
    data, sim, shards = _prepare_data(config)
    key = generate_signing_key()
    _private, public = save_keypair(key, out / "keys", overwrite=True)
    weights = sim.initial_weights(config.seed)
    allowed = [sim.model.spec] if sim.model.is_torch else []

    with _broker(config) as url:

        def broker_for(user: str) -> BrokerConfig:
            fmt = config.broker_password_format
            secret = fmt.format(user=user) if fmt else None
            return BrokerConfig.from_url(url, username=user, password=secret)

        emit("phase", {"name": "agents", "broker": url})
        # The coordinator connects first: with hundreds of agents connecting at once,
        # a late connect competes with all of them.
        hub = MqttHub(HubConfig(broker=broker_for("coordinator")))
        hub.start(timeout=30.0)
        try:
            # A 5 s stall timeout (the agents' default): with hundreds of agents
            # installing at once on a few cores, 1 s made them re-request chunks in a storm.
            # One torch thread per agent: the simulated agents share this machine's cores.
            with LocalFleet.start(shards, broker_for=broker_for, trust=[public],
                                  root=out / "agents", stall_timeout_s=5.0,
                                  telemetry_interval_s=30.0, models=allowed,
                                  torch_threads=1) as fleet:  # fmt: skip
                fleet.wait_eligible(hub, config.agents, timeout=60 + config.agents / 10)
                timings["setup_s"] = time.monotonic() - started
                emit("phase", {"name": "rounds"})
                dropout = _Dropout(fleet, config.dropout, config.seed)
                t0 = time.monotonic()
                result = _train(hub, config, sim, weights, dropout=dropout, on_round=on_round)
                timings["rounds_s"] = time.monotonic() - t0

                emit("phase", {"name": "package"})
                artifact_path, weights_path, packaged = _package(config, sim, result, key)
                emit("phase", {"name": "rollout"})
                t0 = time.monotonic()
                rollout = _rollout(hub, fleet, Artifact.load(artifact_path), emit,
                                   timeout=60 + config.agents / 5)  # fmt: skip
                timings["rollout_s"] = time.monotonic() - t0
                rollout["dropped_per_round"] = {str(k): len(v) for k, v in dropout.dropped.items()}
        finally:
            hub.stop()

    emit("phase", {"name": "centralized baseline"})
    t0 = time.monotonic()
    budget = _train_config(config, epochs=min(config.rounds * config.epochs, 1000))
    centralized = sim.centralized(weights, budget)
    timings["centralized_s"] = time.monotonic() - t0
    clients = [r.clients for r in result.rounds if r.clients] or [config.agents]
    report = SimulationReport(
        config=config,
        data=data,
        model=sim,
        result=result,
        final_metrics=sim.evaluate(result.weights),
        centralized_metrics=centralized,
        fp32_uplink_bytes_per_round=_fp32_report_bytes(weights) * statistics.mean(clients),
        rollout=rollout,
        timings={**timings, "total_s": time.monotonic() - started},
        broker="embedded amqtt" if config.broker is None else config.broker,
        artifact=str(artifact_path),
        weights=str(weights_path),
        packaging=_packaging_json(packaged),
    )
    body = report.to_json()
    atomic_write(out / "report.json", (json.dumps(body, indent=2) + "\n").encode())
    plot_report(body, out / "report.png")
    return report
