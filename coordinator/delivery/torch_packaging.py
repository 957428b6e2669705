"""Packaging a PyTorch model: export, int8, a quality gate per task, sign.

The last step of a federated run of a torch model (and of ``fedge train --model``):
the global ``nn.Module`` becomes a signed int8 ONNX artifact ready for ``fedge
deploy`` or a staged rollout. :func:`package_torch` runs::

    nn.Module --export_torch_onnx()--> fp32 ONNX (the task's output head)
        --quantize_int8(calibration)--> int8 ONNX (static QDQ; the head stays float)
        --evaluate both on held-out data, gate--> refuse (QualityGateError) or go on
        --the caller's gate (e.g. the deployed model's)--> refuse or go on
        --anomaly threshold (reconstruction)--> health check from calibration rows
        --reference profile of the calibration rows with the fp32 model's outputs
        --sign_and_write()--> artifact file

The task head (softmax, anomaly score) is kept in float32 and reads the unquantized
values of its inputs (``float_nodes`` of :func:`compress.quantize.quantize_int8`):
calibration data of normal examples does not cover the input values and scores of
anomalies, and a quantized score clipped to the normal range would hide them (on the
tests' autoencoder the int8 ROC-AUC fell from 1.0 to 0.97 before this).

The gate compares the int8 model with the fp32 model on ``evaluation`` with the
task's metric (:data:`METRIC_NAMES`), both run in onnxruntime exactly as a device
runs them:

* ``classification``: accuracy; refused (:class:`~coordinator.errors.AccuracyDropError`)
  when int8 is more than ``max_accuracy_drop`` percentage points below fp32;
* ``regression``: mean squared error; refused
  (:class:`~coordinator.errors.QualityGateError`) when int8's MSE is more than
  ``max_error_increase`` (a fraction: 0.10 = 10 %) above fp32's;
* ``reconstruction``: ROC-AUC of the anomaly score against the anomaly flags;
  refused (``QualityGateError``) when int8's AUC is more than ``max_auc_drop`` below
  fp32's.

Anomaly threshold: a reconstruction artifact also records ``anomaly_threshold`` in its
metadata, the ``threshold_quantile`` quantile (0.99 by default) of the int8 model's
anomaly scores on the evaluation's *normal* examples (flag 0). Those are held out
from training, so the threshold reflects the score of unseen normal inputs; scores
above it are anomalies, about 1 % of normal inputs being flagged at 0.99. Without
evaluation data no gate runs and no threshold is recorded.

The health check's reference inputs are the first calibration examples (the issue
asks for references from the calibration data: representative inputs the coordinator
holds), with the int8 model's outputs for them. The metadata records ``task``,
``metric``, ``fp32_metric``, ``int8_metric`` (with evaluation), ``fp32_bytes``,
``accuracy`` for classifiers (as :func:`~coordinator.delivery.packaging.package_model`
does) and ``anomaly_threshold``; values are decimal text.

Inputs are checked before the slow work starts (:class:`PackagingError`); the
export and quantization raise their own :mod:`compress` errors.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from compress.errors import MetricError
from compress.keys import SigningKey
from compress.lineage import Lineage
from compress.metrics import mean_squared_error, roc_auc
from compress.quantize import quantize_int8
from compress.torch_export import export_torch_onnx, head_nodes
from coordinator.delivery.packaging import (
    DEFAULT_EXPIRY,
    EVAL_BATCH,
    ArtifactFields,
    LabelledData,
    PackagedModelGate,
    PackageResult,
    batched_outputs,
    check_identity,
    health_checks,
    reference_profile,
    sign_and_write,
)
from coordinator.errors import AccuracyDropError, PackagingError, QualityGateError
from edge_agent.runtime.base import ModelRuntime, accuracy
from edge_agent.runtime.loader import load_model
from edge_agent.training.model_spec import TASKS, ModelTask

if TYPE_CHECKING:
    import torch

__all__ = ["METRIC_NAMES", "package_torch", "task_metric"]

logger = logging.getLogger(__name__)

METRIC_NAMES: Mapping[ModelTask, str] = {
    "classification": "accuracy",
    "regression": "mse",
    "reconstruction": "auc",
}
"""The metric the quality gate compares, per task."""

QUANTIZATION = "int8-static"


def package_torch(
    module: torch.nn.Module,
    *,
    task: ModelTask,
    sample_shape: tuple[int, ...],
    name: str,
    version: int,
    keys: Sequence[SigningKey],
    out: Path,
    calibration: npt.NDArray[np.float32],
    evaluation: LabelledData | None,
    now: datetime,
    metadata: Mapping[str, str] | None = None,
    max_accuracy_drop: float = 1.0,
    max_error_increase: float = 0.10,
    max_auc_drop: float = 0.02,
    threshold_quantile: float = 0.99,
    gate: PackagedModelGate | None = None,
    lineage: Lineage | None = None,
) -> PackageResult:
    """Export, quantize, gate, sign and write a torch model. See the module docstring.

    Args:
        module: The trained model (not modified).
        task: ``classification``, ``regression`` or ``reconstruction``.
        sample_shape: One example's shape, e.g. ``(1, 8, 8)``.
        name: The artifact's model name.
        version: Its version, at least 1.
        keys: Every key signs the manifest (k-of-n trust).
        out: Where the artifact is written (atomically).
        calibration: Representative inputs ``(n, *sample_shape)`` for static int8
            quantization; its first rows become the health check's references.
        evaluation: Held-out data labelled for ``task``, or ``None`` (no gate).
        now: The current time (the manifest's ``created``).
        metadata: Extra manifest metadata; the figures above are added.
        max_accuracy_drop: Percentage points of accuracy int8 may lose.
        max_error_increase: Fraction by which int8's MSE may exceed fp32's.
        max_auc_drop: ROC-AUC int8 may lose.
        threshold_quantile: Quantile of normal scores that sets the anomaly
            threshold, in ``(0, 1]``.
        gate: Called with the int8 model and its metric after the quantization
            gate, before signing (needs ``evaluation``); raises to refuse.
        lineage: Where the model came from (:mod:`compress.lineage`), for the manifest.

    Returns:
        The result; ``metric_name`` is the task's, ``fp32_accuracy`` and
        ``packaged_accuracy`` are set for classifiers only.

    Raises:
        PackagingError: a bad task, identity, bound, calibration or evaluation data.
        QualityGateError: int8 falls behind fp32 by more than allowed
            (``AccuracyDropError`` for classifiers), or ``gate`` refused; no artifact
            is written.
        CompressError: export, quantization or signing failed (``ExportError``,
            ``QuantizationError`` ...).
        edge_agent.errors.ModelRuntimeError: onnxruntime cannot run the model.
    """
    if task not in TASKS:
        raise PackagingError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    expires = check_identity(name, version, keys, now, DEFAULT_EXPIRY)
    bounds = _Bounds(max_accuracy_drop, max_error_increase, max_auc_drop, threshold_quantile)
    bounds.check()
    calib = _examples(calibration, sample_shape, "calibration data")
    if evaluation is not None:
        _check_evaluation(evaluation, task, sample_shape)
    elif gate is not None:
        raise PackagingError("a packaging gate compares metrics: give evaluation data")

    fp32_model = export_torch_onnx(module, sample_shape, task)
    int8_model = quantize_int8(fp32_model, calibration=calib, float_nodes=head_nodes(fp32_model))
    fp32 = load_model("onnx", fp32_model)
    int8 = load_model("onnx", int8_model)

    fp32_metric = int8_metric = threshold = None
    if evaluation is not None:
        fp32_metric = task_metric(fp32, evaluation)
        int8_metric = task_metric(int8, evaluation)
        logger.info("%s %s: fp32 %.6g, int8 %.6g", name, METRIC_NAMES[task], fp32_metric,
                    int8_metric)  # fmt: skip
        _gate(task, fp32_metric, int8_metric, bounds)
        if gate is not None:
            gate(int8, int8_metric)
        if task == "reconstruction":
            normal = evaluation.x[evaluation.y == 0]
            threshold = float(np.quantile(batched_outputs(int8, normal), threshold_quantile))

    fields = ArtifactFields(
        name=name,
        version=version,
        model_format="onnx",
        quantization=QUANTIZATION,
        created=now,
        expires=expires,
        metadata=_metadata(
            metadata,
            task,
            fp32_bytes=len(fp32_model),
            fp32_metric=fp32_metric,
            int8_metric=int8_metric,
            threshold=threshold,
        ),
        lineage=lineage,
    )
    manifest = sign_and_write(
        fields,
        int8_model,
        runtime=int8,
        checks=health_checks(int8, calib),
        keys=keys,
        out=out,
        reference=reference_profile(fp32, calib, task),
    )
    classifier = task == "classification"
    return PackageResult(
        manifest=manifest,
        path=out,
        fp32_bytes=len(fp32_model),
        packaged_bytes=len(int8_model),
        fp32_accuracy=fp32_metric if classifier else None,
        packaged_accuracy=int8_metric if classifier else None,
        metric_name=METRIC_NAMES[task],
        fp32_metric=fp32_metric,
        packaged_metric=int8_metric,
        anomaly_threshold=threshold,
    )


@dataclass(frozen=True)
class _Bounds:
    """How far int8 may fall behind fp32, and the anomaly threshold's quantile."""

    max_accuracy_drop: float
    max_error_increase: float
    max_auc_drop: float
    threshold_quantile: float

    def check(self) -> None:
        """Raises: PackagingError: a bound is not finite, or the quantile not in (0, 1]."""
        for bound_name in ("max_accuracy_drop", "max_error_increase", "max_auc_drop"):
            value = getattr(self, bound_name)
            if not math.isfinite(value):
                raise PackagingError(f"{bound_name} must be a finite number, got {value}")
        if not 0.0 < self.threshold_quantile <= 1.0:
            raise PackagingError(
                f"threshold_quantile must be in (0, 1], got {self.threshold_quantile}"
            )


def _examples(
    x: npt.ArrayLike, sample_shape: tuple[int, ...], what: str
) -> npt.NDArray[np.float32]:
    """``x`` as float32 examples of ``sample_shape``.

    Raises:
        PackagingError: empty, not numeric and finite, or examples of another shape.
    """
    arr = np.asarray(x)
    if arr.ndim < 1 or len(arr) == 0 or tuple(arr.shape[1:]) != tuple(sample_shape):
        raise PackagingError(
            f"{what} must be examples (n, {', '.join(map(str, sample_shape))}) with n >= 1, "
            f"got shape {arr.shape}"
        )
    if arr.dtype.kind not in "fiu" or not np.isfinite(arr).all():
        raise PackagingError(f"{what} must be finite numbers")
    return np.ascontiguousarray(arr, dtype=np.float32)


def _check_evaluation(data: LabelledData, task: ModelTask, sample_shape: tuple[int, ...]) -> None:
    """Raises: PackagingError: ``data`` is not labelled for ``task`` on examples of this shape."""
    if data.task != task:
        raise PackagingError(f"evaluation data is labelled for {data.task}, the model does {task}")
    _examples(data.x, sample_shape, "evaluation x")
    if len(data.y) != len(data.x):
        raise PackagingError(
            f"evaluation has {len(data.x)} examples but {len(data.y)} labels or targets"
        )
    if task == "reconstruction":
        normal = int(np.count_nonzero(data.y == 0))
        if normal == 0 or normal == len(data.y):
            raise PackagingError(
                "reconstruction evaluation needs normal (y = 0) and anomalous (y = 1) "
                f"examples for its ROC-AUC gate; got {normal} normal of {len(data.y)}"
            )


def task_metric(runtime: ModelRuntime, data: LabelledData) -> float:
    """The task's metric (:data:`METRIC_NAMES`) of ``runtime`` on ``data``.

    Classification accuracy is :func:`edge_agent.runtime.base.accuracy`, as
    :func:`~coordinator.delivery.packaging.package_model` measures it.

    Raises:
        PackagingError: the evaluation's targets do not fit the model's outputs.
    """
    if data.task == "classification":
        return accuracy(runtime, data.x, data.y, batch_size=EVAL_BATCH)
    try:
        if data.task == "regression":
            return mean_squared_error(batched_outputs(runtime, data.x), data.y)
        return roc_auc(batched_outputs(runtime, data.x), data.y)
    except MetricError as exc:
        raise PackagingError(f"evaluation data does not fit the model's output: {exc}") from exc


def _gate(task: ModelTask, fp32: float, int8: float, bounds: _Bounds) -> None:
    """Refuse an int8 model that falls behind the fp32 one by more than allowed.

    Raises:
        AccuracyDropError: classification, more than ``max_accuracy_drop`` points lost.
        QualityGateError: regression MSE or reconstruction AUC beyond its bound.
    """
    if task == "classification":
        drop = 100.0 * (fp32 - int8)
        if drop > bounds.max_accuracy_drop:
            raise AccuracyDropError(
                f"int8 accuracy {100 * int8:.2f}% is {drop:.2f} points below fp32 "
                f"{100 * fp32:.2f}% (allowed: {bounds.max_accuracy_drop:.2f}); calibrate with more "
                "representative data"
            )
    elif task == "regression":
        increase = (int8 - fp32) / fp32 if fp32 > 0 else (0.0 if int8 == fp32 else math.inf)
        if increase > bounds.max_error_increase:
            raise QualityGateError(
                f"int8 MSE {int8:.6g} is {100 * increase:.2f}% above fp32 MSE {fp32:.6g} "
                f"(allowed: {100 * bounds.max_error_increase:.2f}%); calibrate with more "
                "representative data"
            )
    elif fp32 - int8 > bounds.max_auc_drop:
        raise QualityGateError(
            f"int8 ROC-AUC {int8:.4f} is {fp32 - int8:.4f} below fp32 {fp32:.4f} "
            f"(allowed: {bounds.max_auc_drop:.4f}); calibrate with more representative data"
        )


def _metadata(
    extra: Mapping[str, str] | None,
    task: ModelTask,
    *,
    fp32_bytes: int,
    fp32_metric: float | None,
    int8_metric: float | None,
    threshold: float | None,
) -> dict[str, str]:
    """The manifest metadata: ``extra`` plus the figures of this packaging."""
    metadata = dict(extra or {})
    metadata.update(task=task, metric=METRIC_NAMES[task], fp32_bytes=str(fp32_bytes))
    if fp32_metric is not None and int8_metric is not None:
        metadata.update(fp32_metric=f"{fp32_metric:.6g}", int8_metric=f"{int8_metric:.6g}")
        if task == "classification":
            metadata["accuracy"] = f"{int8_metric:.6f}"
    if threshold is not None:
        metadata["anomaly_threshold"] = repr(threshold)
    return metadata
