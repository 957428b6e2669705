"""Federated training runs: rounds of a Flower strategy over the fleet.

:func:`run_training` drives ``rounds`` rounds through an
:class:`~coordinator.federated.grid.MqttGrid` on a started
:class:`~coordinator.link.port.Hub`. Each round:

1. **Sample.** The eligible devices are those online that report local training
   data (``train_examples > 0``) and, for a PyTorch model, list its spec in their
   status (``train_models``: torch installed and the model allowed there); a device
   that does not list it is never sampled. With fewer than ``min_clients`` the run
   waits (up to ``round_timeout_s``) and otherwise records the round as failed and
   goes on. ``clients_per_round`` of them are drawn with a seeded RNG; the strategy
   is offered exactly those.
2. **Train.** ``strategy.configure_train`` -> ``grid.send_and_receive`` (the weights
   go out once, each device trains and sends an encoded update; the grid bounds
   each update's example count by what its device announced when sampled, rejects
   norm outliers and, with ``robust``, clips to the round's medians:
   :mod:`coordinator.federated.round_screen`) -> ``strategy.aggregate_train``.
   A round with fewer accepted updates than ``min_clients`` (devices killed
   mid-round, stragglers past the deadline, rejected updates) fails cleanly: the
   global weights stay as they were and the next round proceeds.
3. **Evaluate.** With ``eval_data``, the global model is evaluated here
   (:func:`~coordinator.federated.models.evaluate_model`: the round's ``metrics``,
   its ``loss`` and, for classification, its ``accuracy``); otherwise
   ``configure_evaluate`` / ``aggregate_evaluate`` give the example-weighted
   averages of what the devices measured on their held-out data.

What is trained is :attr:`RunConfig.model_def`
(:class:`~coordinator.federated.models.ModelDef`; None: the built-in ``family``,
classification). A PyTorch run refuses to start (:class:`RunError`) when devices
that could train are online but none of them lists its spec
(:func:`check_fleet_can_train`).

Each round yields a :class:`~coordinator.federated.reports.RoundReport` (re-exported
here, with :class:`~coordinator.federated.reports.RunResult`) with the same fields
everywhere rounds are reported (the CLI's live view and ``--json``, the service and
the simulator): ``round``, ``accuracy``, ``loss``, ``metrics``, ``clients``,
``uplink_bytes``, ``downlink_bytes``, plus status and counts.

Stopping: with ``stop`` (a ``threading.Event``) set, no further round starts, the
phase going on stops waiting within a quarter of a second, and that round ends
``failed`` with reason :data:`STOPPED` (its updates are not aggregated, so the
global weights stay those of the last completed round).

Determinism: the device sample uses ``random.Random(seed)``; Flower's own sampling
(``random.sample``) is seeded with the same seed at the start of a run, and device
training is seeded from the task's config (``seed``) and the round.
"""

from __future__ import annotations

import logging
import math
import random
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp.strategy import Strategy

from compress.codecs import parse_codec
from compress.families import FAMILIES
from coordinator.delivery.packaging import LabelledData
from coordinator.errors import RunError
from coordinator.federated.grid import MqttGrid
from coordinator.federated.models import (
    ModelDef,
    Weights,
    check_eval_data,
    clamp_statistics,
    evaluate_model,
)
from coordinator.federated.reports import RoundReport, RunResult
from coordinator.federated.round_screen import (
    DEFAULT_MAX_EXAMPLES_PER_UPDATE,
    DEFAULT_NORM_MULTIPLE,
)
from coordinator.federated.tasks import GridSettings
from coordinator.federated.update_check import DEFAULT_MAX_UPDATE_NORM, MAX_EXAMPLES
from coordinator.link.fleet import DeviceRecord
from coordinator.link.port import Hub

__all__ = [
    "STOPPED",
    "RoundReport",
    "RunConfig",
    "RunResult",
    "check_fleet_can_train",
    "evaluate_weights",
    "run_training",
]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class RunConfig:
    """A federated run, as ``fedge train`` describes it.

    Attributes:
        model: Model name (devices keep per-model state, e.g. error feedback).
        family: ``softmax``, ``mlp`` or ``torch`` (then ``model_def`` is needed).
        initial_weights: The starting global weights (W0, b0, ...).
        rounds: Rounds to run.
        clients_per_round: Devices sampled per round.
        min_clients: Fewest accepted updates for a round to count.
        round_timeout_s: Deadline of each phase (train, evaluate), and the longest
            wait for enough devices at the start of a round.
        codec: Update codec spec (``fp32``, ``fp16``, ``int8``, ``topk:D``,
            ``topk:D+int8``...).
        train_config: Sent to devices with each task (epochs, lr, batch_size...).
        eval_data: Held-out data evaluated on the coordinator after each round;
            None: federated evaluation on the devices.
        seed: Seeds device sampling and Flower's sampling.
        max_update_norm: Updates with a larger L2 norm are rejected.
        max_examples_per_update: An update weighs at most this many examples (and
            never more than its device announced when sampled).
        norm_multiple: Updates whose norm is over this multiple of the round's
            median update norm are rejected (with 3 or more updates; ``inf``: off).
        robust: Clip each update to the round's median norm and its weight to the
            median weight before the strategy aggregates
            (:mod:`coordinator.federated.round_screen`).
        gather_s: Longest wait for acknowledgements before weights are pushed.
        model_def: What is trained (spec, task, shapes); None: the built-in
            ``family`` for classification.
        upload_budget_bytes: Most bytes of chunked uploads one device may have in
            flight; None for 4x the largest update the model allows.
        upload_dir: Where chunked uploads are spooled on disk while they arrive;
            None for a per-user directory in the system's temporary directory.
    """

    model: str
    family: str
    initial_weights: Mapping[str, npt.NDArray[np.float32]]
    rounds: int = 20
    clients_per_round: int = 10
    min_clients: int = 2
    round_timeout_s: float = 60.0
    codec: str = "fp32"
    train_config: Mapping[str, int | float | str | bool] = field(default_factory=dict)
    eval_data: LabelledData | None = None
    seed: int = 0
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM
    max_examples_per_update: int = DEFAULT_MAX_EXAMPLES_PER_UPDATE
    norm_multiple: float = DEFAULT_NORM_MULTIPLE
    robust: bool = False
    gather_s: float = 3.0
    model_def: ModelDef | None = None
    upload_budget_bytes: int | None = None
    upload_dir: Path | None = None

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            RunError: out-of-range counts, timeouts or update norm bound, a
                ``model_def`` of another family, evaluation data that does not fit
                the model.
            CodecError: an invalid codec spec.
        """
        if self.model_def is not None and self.model_def.family != self.family:
            raise RunError(
                f"family {self.family!r} differs from the model's ({self.model_def.family!r})"
            )
        if self.model_def is None and self.family not in FAMILIES:
            raise RunError(f"family {self.family!r} needs a model_def")
        if self.eval_data is not None:
            check_eval_data(self.definition, self.eval_data)
        if self.rounds < 1:
            raise RunError("rounds must be at least 1")
        if not 1 <= self.min_clients <= self.clients_per_round:
            raise RunError(
                f"need 1 <= min_clients ({self.min_clients}) <= clients_per_round "
                f"({self.clients_per_round})"
            )
        if not self.round_timeout_s > 0 or not self.gather_s > 0:
            raise RunError("timeouts must be positive")
        if not 0 < self.max_update_norm < math.inf:
            raise RunError(
                f"max_update_norm must be positive and finite, got {self.max_update_norm}"
            )
        if not 1 <= self.max_examples_per_update <= MAX_EXAMPLES:
            raise RunError(
                f"max_examples_per_update must be in 1..{MAX_EXAMPLES}, "
                f"got {self.max_examples_per_update}"
            )
        if not self.norm_multiple >= 1:
            raise RunError(f"norm_multiple must be at least 1, got {self.norm_multiple}")
        if self.upload_budget_bytes is not None and self.upload_budget_bytes < 1:
            raise RunError(f"upload_budget_bytes must be positive, got {self.upload_budget_bytes}")
        parse_codec(self.codec)

    @property
    def definition(self) -> ModelDef:
        """The model trained: :attr:`model_def`, else the built-in ``family``."""
        return self.model_def or ModelDef(self.family)


RoundCallback = Callable[[RoundReport, str], None]
"""Progress: the round's report so far and what is happening (``waiting``,
``training 3/10``, ``evaluating``, ``done``)."""


def evaluate_weights(
    family: str, weights: Mapping[str, npt.ArrayLike], data: LabelledData
) -> tuple[float, float]:
    """Accuracy and mean cross-entropy of a built-in family's model on labelled data
    (:func:`~coordinator.federated.models.evaluate_model` for any model).

    Raises:
        FamilyError: the weights do not fit the family or the data.
        RunError: labels out of range.
    """
    metrics = evaluate_model(ModelDef(family), weights, data)
    return metrics["accuracy"], metrics["loss"]


def check_fleet_can_train(hub: Hub, model: ModelDef) -> None:
    """Refuse a PyTorch run that no device with data online can train.

    Devices that could train (online, with data) but do not list the model's spec
    in their status lack PyTorch or do not allow the model. With none online the
    run may still wait for devices; built-in families pass.

    Raises:
        RunError: devices are online, none lists the spec.
    """
    if not model.is_torch:
        return
    online = [r for r in hub.fleet() if r.can_train]
    if online and not any(r.can_train_model(model.spec) for r in online):
        raise RunError(
            f"no online device can train {model.spec}: {len(online)} online device(s) lack "
            f"it (install fedge[torch] on the device and allow the model: [training] models "
            f"= [...] or an entry point in fedge.models)"
        )


def _to_record(weights: Mapping[str, npt.NDArray[np.float32]]) -> ArrayRecord:
    return ArrayRecord({name: Array(np.asarray(value)) for name, value in weights.items()})


def _from_record(record: ArrayRecord) -> Weights:
    return {name: np.asarray(array.numpy(), dtype=np.float32) for name, array in record.items()}


STOPPED = "stopped"
"""Reason of the round a ``stop`` cut short."""


class _Run:
    """One run's state (see :func:`run_training`)."""

    def __init__(
        self,
        hub: Hub,
        strategy: Strategy,
        config: RunConfig,
        on_round: RoundCallback | None,
        stop: threading.Event,
    ) -> None:
        self.hub = hub
        self.stop = stop
        self.strategy = strategy
        self.config = config
        self.on_round = on_round
        self.rng = random.Random(config.seed)  # noqa: S311 - sampling, not secrets
        self.model = config.definition
        settings = GridSettings(
            model=config.model,
            family=config.family,
            codec=parse_codec(config.codec),
            gather_s=config.gather_s,
            max_update_norm=config.max_update_norm,
            max_examples_per_update=config.max_examples_per_update,
            norm_multiple=config.norm_multiple,
            robust=config.robust,
            model_spec=self.model.spec,
            task=self.model.task,
            model_args=self.model.model_args(),
            upload_budget_bytes=config.upload_budget_bytes,
            upload_dir=config.upload_dir,
        )
        self.grid = MqttGrid(hub, settings, cancel=stop)

    def show(self, report: RoundReport, what: str) -> None:
        if self.on_round is not None:
            self.on_round(report, what)

    def eligible(self) -> list[DeviceRecord]:
        return [r for r in self.hub.fleet() if r.can_train_model(self.model.spec)]

    def wait_for_devices(self, report: RoundReport) -> list[DeviceRecord]:
        deadline = time.monotonic() + self.config.round_timeout_s
        while True:
            devices = self.eligible()
            if (
                len(devices) >= self.config.min_clients
                or time.monotonic() >= deadline
                or self.stop.is_set()
            ):
                return devices
            self.show(report, f"waiting for devices ({len(devices)}/{self.config.min_clients})")
            time.sleep(0.2)

    def sample(self, devices: list[DeviceRecord]) -> dict[str, int]:
        """The sampled devices, with the example counts they announced."""
        announced = {d.device_id: d.train_examples for d in devices}
        ids = sorted(announced)
        chosen = sorted(self.rng.sample(ids, min(self.config.clients_per_round, len(ids))))
        return {device_id: announced[device_id] for device_id in chosen}

    def phase(
        self, report: RoundReport, label: str, devices: dict[str, int], make: Callable[[], Any]
    ) -> list[Message]:
        """One send_and_receive over ``devices`` (id -> announced ``train_examples``).

        Raises:
            RunError: the strategy needs more nodes than ``devices``.
        """
        needed = _min_nodes(self.strategy, train=label == "training")
        if needed > len(devices):
            raise RunError(
                f"the strategy needs {needed} nodes for {label}, this round has {len(devices)}"
            )
        deadline = time.time() + self.config.round_timeout_s
        self.grid.begin_phase(report.round, devices, deadline, announced=devices)
        self.grid.on_progress = lambda done, total: self.show(report, f"{label} {done}/{total}")
        try:
            replies = list(self.grid.send_and_receive(make(), timeout=self.config.round_timeout_s))
        finally:
            self.grid.on_progress = None
            report.add_phase(self.grid.end_phase())
        return replies

    def train_round(self, number: int, arrays: ArrayRecord) -> tuple[RoundReport, ArrayRecord]:
        config = self.config
        report = RoundReport(round=number)
        started = time.monotonic()
        devices = self.wait_for_devices(report)
        if self.stop.is_set():
            report.status, report.reason = "failed", STOPPED
            report.seconds = time.monotonic() - started
            return report, arrays
        if len(devices) < config.min_clients:
            report.status = "failed"
            report.reason = f"{len(devices)} eligible device(s), need {config.min_clients}"
            report.seconds = time.monotonic() - started
            return report, arrays
        sample = self.sample(devices)
        report.sampled = len(sample)
        try:
            replies = self.phase(
                report,
                "training",
                sample,
                lambda: self.strategy.configure_train(
                    number, arrays, ConfigRecord(dict(config.train_config)), self.grid
                ),
            )
        except RunError as exc:
            replies = []
            report.reason = str(exc)
        if self.stop.is_set():
            report.reason = STOPPED
            replies = []  # a cut-short round is not aggregated
        report.clients = len(replies)
        if report.reason:
            report.status = "failed"
        elif len(replies) < config.min_clients:
            report.status = "failed"
            report.reason = f"{len(replies)} update(s) accepted, need {config.min_clients}"
        else:
            try:
                aggregated, _metrics = self.strategy.aggregate_train(number, replies)
            except Exception as exc:  # noqa: BLE001 - any strategy may refuse (bulyan: too few)
                logger.warning("round %d: aggregation failed: %s", number, exc)
                aggregated = None
                report.reason = f"aggregation failed: {exc}"
            if aggregated is None:
                report.status = "failed"
                report.reason = report.reason or "the strategy aggregated nothing"
            else:
                arrays = self.sane(number, aggregated)
                self.evaluate(report, arrays)
        self.grid.retire_weights()
        report.seconds = time.monotonic() - started
        return report, arrays

    def sane(self, number: int, arrays: ArrayRecord) -> ArrayRecord:
        """The aggregated weights, BatchNorm variances clamped at zero (torch models)."""
        if not self.model.is_torch:
            return arrays
        weights, clamped = clamp_statistics(_from_record(arrays))
        if not clamped:
            return arrays
        logger.warning("round %d: %d negative BatchNorm variance(s) set to 0", number, clamped)
        return _to_record(weights)

    def evaluate(self, report: RoundReport, arrays: ArrayRecord) -> None:
        config = self.config
        if config.eval_data is not None:
            report.metrics = evaluate_model(self.model, _from_record(arrays), config.eval_data)
            report.accuracy = report.metrics.get("accuracy")
            report.loss = report.metrics.get("loss")
            return
        devices = self.eligible()
        if not devices:
            return
        sample = self.sample(devices)
        try:
            replies = self.phase(
                report,
                "evaluating",
                sample,
                lambda: self.strategy.configure_evaluate(
                    report.round, arrays, ConfigRecord(), self.grid
                ),
            )
        except RunError as exc:
            logger.warning("round %d: no federated evaluation: %s", report.round, exc)
            return
        report.eval_clients = len(replies)
        if not replies or self.stop.is_set():
            return
        try:
            metrics = self.strategy.aggregate_evaluate(report.round, replies)
        except Exception as exc:  # noqa: BLE001 - a user strategy may raise anything
            logger.warning("round %d: evaluation aggregation failed: %s", report.round, exc)
            return
        for key in self.grid.settings.eval_metrics:
            value = _metric(metrics, key)
            if value is not None:
                report.metrics[key] = value
        report.accuracy = report.metrics.get("accuracy")
        report.loss = report.metrics.get("loss")


def _min_nodes(strategy: object, *, train: bool) -> int:
    """Fewest nodes a strategy (or the one it wraps) samples, when it says so."""
    needed = 0
    while strategy is not None:
        phase_key = "min_train_nodes" if train else "min_evaluate_nodes"
        fraction = getattr(strategy, "fraction_train" if train else "fraction_evaluate", None)
        if fraction != 0.0:
            for key in ("min_available_nodes", phase_key):
                value = getattr(strategy, key, 0)
                if isinstance(value, int) and not isinstance(value, bool):
                    needed = max(needed, value)
        strategy = getattr(strategy, "strategy", None)
    return needed


def _metric(metrics: MetricRecord | None, key: str) -> float | None:
    if metrics is None or key not in metrics:
        return None
    value = metrics[key]
    number = float(value) if isinstance(value, int | float) else math.nan
    return number if math.isfinite(number) else None


def run_training(
    hub: Hub,
    strategy: Strategy,
    config: RunConfig,
    *,
    on_round: RoundCallback | None = None,
    stop: threading.Event | None = None,
) -> RunResult:
    """Run federated rounds (see the module docstring).

    Args:
        hub: A started hub (its fleet is where devices come from).
        strategy: Any Flower Message-API strategy.
        config: The run.
        on_round: Progress callback (called from this thread).
        stop: Set it (from any thread) to end the run early (see "Stopping").

    Returns:
        Every round's report and the final global weights.

    Raises:
        RunError: a PyTorch model that no online device can train
            (:func:`check_fleet_can_train`).
    """
    if config.definition.is_torch:
        hub.sync_fleet()
        check_fleet_can_train(hub, config.definition)
    random.seed(config.seed)  # Flower's strategies sample with the global RNG
    run = _Run(hub, strategy, config, on_round, stop or threading.Event())
    arrays = _to_record(config.initial_weights)
    reports: list[RoundReport] = []
    try:
        for number in range(1, config.rounds + 1):
            if run.stop.is_set():
                logger.info("run stopped before round %d", number)
                break
            report, arrays = run.train_round(number, arrays)
            reports.append(report)
            if report.status == "ok":
                logger.info("round %d: %d client(s), accuracy %s", number, report.clients,
                            report.accuracy)  # fmt: skip
            else:
                logger.warning("round %d failed: %s", number, report.reason)
            run.show(report, "done")
    finally:
        run.grid.close()
    return RunResult(reports, _from_record(arrays))
