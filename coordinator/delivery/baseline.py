"""The deployed-model gate: sign a new model only if it is no worse than the deployed one.

A federated run's result is whatever its devices sent; ``fedge train --package``
used to sign it unseen. With ``--baseline ARTIFACT`` (the signed artifact that is
deployed now) it signs only a model that beats or matches that one on the same
evaluation data, with the task's metric, both run in onnxruntime as a device runs
them:

1. :func:`load_baseline`, before any round runs: read the artifact (its signatures
   verified against the trusted keys when they are given, else only its structure
   and payload hash checked, with a warning), check that it is a model of the same
   task (manifest ``metadata.task``, classification when absent, as the built-in
   models are packaged) taking examples of the evaluation data's shape, load it with
   :func:`edge_agent.runtime.loader.load_model` and measure its metric
   (:func:`~coordinator.delivery.torch_packaging.task_metric`: accuracy, MSE or
   ROC-AUC) on the evaluation data. Its expiry is not checked: an expired deployed
   model is one to replace, and still the figure to beat.
2. :meth:`Baseline.gate` makes the
   :data:`~coordinator.delivery.packaging.PackagedModelGate` the packaging functions
   call with the new int8 model and its metric just before signing: a model with
   other outputs than the baseline is refused (:class:`PackagingError`), and so is a
   model worse by more than ``tolerance`` in the metric's own units
   (:class:`WorseThanBaselineError`, with both figures), unless ``allow_worse``: then
   it is packaged with a warning. Either way the comparison is logged.

The direction of the metric (higher or lower is better) is the caller's to give
(:data:`coordinator.federated.models.HIGHER_IS_BETTER`): this layer sits below
``federated``.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from compress.artifact import read_artifact_unverified
from compress.errors import CompressError
from compress.manifest import Manifest, TensorSpec
from compress.signing import TrustedKeys, verify_signatures
from coordinator.delivery.packaging import LabelledData, PackagedModelGate
from coordinator.delivery.torch_packaging import METRIC_NAMES, task_metric
from coordinator.errors import PackagingError, WorseThanBaselineError
from edge_agent.errors import ModelRuntimeError
from edge_agent.runtime.base import ModelRuntime, TensorInfo
from edge_agent.runtime.loader import load_model

__all__ = ["Baseline", "load_baseline"]

logger = logging.getLogger(__name__)

DEFAULT_TASK = "classification"
"""The task of an artifact whose manifest names none (built-in models)."""


@dataclass(frozen=True)
class Baseline:
    """The deployed model and its figure on the evaluation data.

    Attributes:
        path: The artifact file.
        manifest: Its manifest.
        metric: The task's metric name (``accuracy``, ``mse``, ``auc``).
        value: The baseline's metric on the evaluation data.
        higher_is_better: The metric's direction.
        verified: Whether its signatures were checked against trusted keys.
    """

    path: Path
    manifest: Manifest
    metric: str
    value: float
    higher_is_better: bool
    verified: bool

    def describe(self) -> str:
        """E.g. ``digits v3 (accuracy 0.912)``."""
        return f"{self.manifest.name} v{self.manifest.version} ({self.metric} {self.value:.4g})"

    def worse_by(self, value: float) -> float:
        """How much worse ``value`` is than the baseline (negative: better)."""
        return self.value - value if self.higher_is_better else value - self.value

    def gate(self, *, tolerance: float = 0.0, allow_worse: bool = False) -> PackagedModelGate:
        """The check the packaging functions run on the new model before signing.

        Raises (from the returned function):
            PackagingError: the new model's outputs differ from the baseline's.
            WorseThanBaselineError: worse by more than ``tolerance`` (and not
                ``allow_worse``).
        """
        if not (math.isfinite(tolerance) and tolerance >= 0):
            raise PackagingError(f"the baseline tolerance must be >= 0, got {tolerance}")

        def check(model: ModelRuntime, value: float) -> None:
            self._check_outputs(model.outputs)
            worse = self.worse_by(value)
            figures = (
                f"new model {self.metric} {value:.4g}, deployed {self.describe()}, "
                f"tolerance {tolerance:g}"
            )
            if worse <= tolerance:
                logger.info("new model is no worse than the deployed one: %s", figures)
                return
            if allow_worse:
                logger.warning("packaging a model worse than the deployed one (--allow-worse): "
                               "%s", figures)  # fmt: skip
                return
            logger.error("refusing to package a model worse than the deployed one: %s", figures)
            raise WorseThanBaselineError(
                f"the new model is worse than the deployed one: {figures}; nothing was "
                "signed (--allow-worse packages it anyway)"
            )

        return check

    def _check_outputs(self, outputs: Sequence[TensorInfo]) -> None:
        """Raises: PackagingError: other outputs than the baseline's (batch size aside)."""
        new = [_per_example(o.shape) for o in outputs]
        old = [_per_example(o.shape) for o in self.manifest.outputs]
        if new != old:
            _refuse(f"the new model's outputs {new} differ from the deployed model's {old} "
                    f"({self.path}): not a model of the same kind")  # fmt: skip


def load_baseline(
    path: Path,
    evaluation: LabelledData,
    *,
    higher_is_better: bool,
    trusted: TrustedKeys | None = None,
) -> Baseline:
    """Read the deployed model's artifact and measure it on ``evaluation``.

    Raises:
        PackagingError: the artifact cannot be read, is not signed by ``trusted``, is
            for another task or input shape, or cannot be run on ``evaluation``.
    """
    try:
        signed, payload = read_artifact_unverified(path)
        manifest = signed.manifest if trusted is None else verify_signatures(signed, trusted)
    except CompressError as exc:
        _refuse(f"baseline {path}: {exc}")
    if trusted is None:
        logger.warning("baseline %s: signatures not checked (no trusted keys given)", path)
    task = manifest.metadata.get("task", DEFAULT_TASK)
    if task != evaluation.task:
        _refuse(f"baseline {path} is a {task} model ({manifest.name}); the new model does "
                f"{evaluation.task}")  # fmt: skip
    _check_inputs(path, manifest.inputs, evaluation)
    try:
        value = task_metric(load_model(manifest.format, payload), evaluation)
    except (ModelRuntimeError, ValueError) as exc:
        _refuse(f"baseline {path} cannot be evaluated on the evaluation data: {exc}")
    except PackagingError as exc:
        _refuse(f"baseline {path}: {exc}")
    baseline = Baseline(
        path=path,
        manifest=manifest,
        metric=METRIC_NAMES[evaluation.task],
        value=value,
        higher_is_better=higher_is_better,
        verified=trusted is not None,
    )
    logger.info("baseline %s: %s on %d evaluation examples", path, baseline.describe(),
                len(evaluation.x))  # fmt: skip
    return baseline


def _per_example(shape: tuple[int | None, ...]) -> tuple[int | None, ...]:
    return tuple(shape[1:])


def _check_inputs(path: Path, inputs: tuple[TensorSpec, ...], evaluation: LabelledData) -> None:
    """Raises: PackagingError: the baseline does not take one input of the examples' shape."""
    example = tuple(evaluation.x.shape[1:])
    shapes = [_per_example(i.shape) for i in inputs]
    fits = len(shapes) == 1 and len(shapes[0]) == len(example)
    if not fits or any(d is not None and d != e for d, e in zip(shapes[0], example, strict=True)):
        _refuse(f"baseline {path} takes inputs {shapes}; the evaluation examples have shape "
                f"{example}: not a model of the same kind")  # fmt: skip


def _refuse(message: str) -> NoReturn:
    logger.error("%s", message)
    raise PackagingError(message)
