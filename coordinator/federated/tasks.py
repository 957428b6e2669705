"""The federated grid's values: device tasks, settings, per-phase figures, metrics.

:class:`~coordinator.federated.grid.MqttGrid` sends one :class:`Task` per device
and phase, and counts each phase in :class:`PhaseStats`; :class:`GridSettings` is
what it needs beyond the strategy's messages. A device's Flower node id is derived
from its id (:func:`node_id_of`); a task carries the scalar entries of the Flower
config (:func:`scalar_config`); replies carry a fixed set of metrics
(:func:`metric_record`). Pure values: no I/O.
"""

from __future__ import annotations

import hashlib
import logging
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.app import Message, MetricRecord

from compress.codecs import CodecSpec
from coordinator.federated.models import EVAL_METRIC_KEYS
from coordinator.federated.round_screen import (
    DEFAULT_MAX_EXAMPLES_PER_UPDATE,
    DEFAULT_NORM_MULTIPLE,
)
from coordinator.federated.update_check import DEFAULT_MAX_UPDATE_NORM, UpdateCheck
from edge_agent.protocol import TrainTask

__all__ = [
    "EVAL_METRICS",
    "TRAIN_METRICS",
    "GridSettings",
    "PhaseStats",
    "Task",
    "TaskState",
    "metric_record",
    "node_id_of",
    "scalar_config",
]

logger = logging.getLogger(__name__)

TRAIN_METRICS = ("train_loss", "train_accuracy")
EVAL_METRICS = ("loss", "accuracy")
"""What a device's evaluation of a classifier reports (other tasks: :data:`EVAL_METRIC_KEYS`)."""


class TaskState(StrEnum):
    """Where a device's task stands."""

    SENT = "sent"
    DONE = "done"
    FAILED = "failed"
    REJECTED = "rejected"
    OFFLINE = "offline"
    TIMED_OUT = "timed_out"


@dataclass(frozen=True)
class GridSettings:
    """What the grid needs beyond the strategy's messages.

    Attributes:
        model: Model name (tasks carry it; devices keep per-model state).
        family: Model family the devices train (``softmax``, ``mlp``, ``torch``).
        codec: Update codec the devices must use.
        gather_s: Longest wait for acknowledgements before the weights are pushed.
        max_update_norm: Updates with a larger L2 norm are rejected.
        max_examples_per_update: Cap on the example count that weighs an update
            (see :mod:`coordinator.federated.round_screen`).
        norm_multiple: Updates above this multiple of the phase's median norm are
            rejected (``norm_outlier``).
        robust: Clip updates to the phase's median norm and weights to the median
            weight before the strategy sees them.
        model_spec: For ``torch``: the factory ``module:function`` (else empty).
        task: ``classification``, ``regression`` or ``reconstruction``; also picks
            the metrics an evaluate reply carries (:data:`EVAL_METRIC_KEYS`).
        model_args: The factory's keyword arguments (``input_shape``, ``num_outputs``).
        upload_budget_bytes: Most bytes of chunked uploads one device may have in
            flight; None for 4x the largest update the model allows
            (:mod:`coordinator.federated.uploads`).
        upload_dir: Where chunked uploads are spooled on disk while they arrive;
            None for a per-user directory in the system's temporary directory
            (:mod:`coordinator.federated.spool`).
    """

    model: str
    family: str
    codec: CodecSpec
    gather_s: float = 3.0
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM
    max_examples_per_update: int = DEFAULT_MAX_EXAMPLES_PER_UPDATE
    norm_multiple: float = DEFAULT_NORM_MULTIPLE
    robust: bool = False
    model_spec: str = ""
    task: str = "classification"
    model_args: Mapping[str, int | float | str | bool] = field(default_factory=dict)
    upload_budget_bytes: int | None = None
    upload_dir: Path | None = None

    @property
    def eval_metrics(self) -> tuple[str, ...]:
        """The metrics an evaluate reply carries for this task."""
        return EVAL_METRIC_KEYS.get(self.task, EVAL_METRICS)


@dataclass
class PhaseStats:
    """Figures of one phase (one ``send_and_receive``).

    Attributes:
        uplink_bytes: MQTT payload bytes received from devices for this phase.
        downlink_bytes: MQTT payload bytes published for it (tasks and chunks;
            a broadcast chunk counts once).
        tasks: Tasks sent.
        outcomes: Tasks by final :class:`TaskState`.
        rejected: Rejected updates by reason.
        failures: Device-reported failures by error code.
        late: Replies to tasks of earlier phases (dropped).
        clipped_examples: Reports whose example count exceeded what the device
            announced (or the cap) and was clipped to it.
    """

    uplink_bytes: int = 0
    downlink_bytes: int = 0
    tasks: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)
    rejected: Counter[str] = field(default_factory=Counter)
    failures: Counter[str] = field(default_factory=Counter)
    late: int = 0
    clipped_examples: int = 0


@dataclass
class Task:
    """One device's task of the current phase, and what came back.

    A train task's checked update waits in ``delta`` (with its ``norm`` and
    bounded ``examples``) until the phase's updates are screened together; then
    it becomes ``reply`` (or the task is rejected).
    """

    task_id: str
    device_id: str
    instruction: Message
    command: TrainTask
    weights: dict[str, npt.NDArray[np.float32]]
    check: UpdateCheck
    state: TaskState = TaskState.SENT
    acked: bool = False
    has_weights: bool = False
    reply: Message | None = None
    announced: int | None = None
    delta: dict[str, npt.NDArray[np.float32]] | None = None
    norm: float | None = None
    examples: int = 0
    metrics: dict[str, float] = field(default_factory=dict)


def node_id_of(device_id: str) -> int:
    """A device's Flower node id: stable, derived from its id (63-bit, never 0 or 1)."""
    digest = hashlib.sha256(device_id.encode()).digest()
    return max(2, int.from_bytes(digest[:8], "big") >> 1)


def scalar_config(config: Mapping[str, Any]) -> dict[str, int | float | str | bool]:
    """The scalar entries of a Flower ConfigRecord, as a task carries them."""
    out: dict[str, int | float | str | bool] = {}
    for key, value in config.items():
        if isinstance(value, bool | int | float | str):
            out[str(key).replace("-", "_")] = value
        else:
            logger.debug("config entry %r is not a scalar: not sent to devices", key)
    return out


def metric_record(
    metrics: Mapping[str, float], keys: tuple[str, ...], examples: int
) -> MetricRecord:
    """The fixed set of metrics strategies see (their aggregation needs equal keys)."""
    values: dict[str, int | float | list[int] | list[float]] = {"num-examples": examples}
    for key in keys:
        value = metrics.get(key)
        values[key] = float(value) if value is not None and np.isfinite(value) else 0.0
    return MetricRecord(values)
