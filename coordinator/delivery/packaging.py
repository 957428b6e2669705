"""Packaging: from a model file to a signed, quantized artifact.

Workflow of :func:`package_model` (what ``fedge model package`` runs):

1. read the model (ONNX, or TFLite) and load it with its on-device runtime
   (:func:`edge_agent.runtime.loader.load_model`), which both validates it and tells
   us its input and output names, shapes and dtypes;
2. quantize an ONNX model to int8 (dynamic, or static when calibration data is
   given) unless ``quantize="none"``; TFLite models are packaged as they are;
3. when evaluation data is given, measure the accuracy of the fp32 and the int8 model
   and refuse (:class:`~coordinator.errors.AccuracyDropError`) when int8 loses more
   than the allowed number of percentage points;
4. when a ``gate`` is given (``fedge train --package --baseline``: the deployed-model
   gate of :mod:`coordinator.delivery.baseline`), hand it the packaged model and its
   metric on the evaluation data; it raises to refuse, before anything is signed;
5. record a health check: a few reference inputs (from the evaluation or calibration
   data, else a seeded random batch) and the packaged model's own outputs for them,
   which an agent reproduces before it switches to the model;
6. compute the reference profile (:func:`reference_profile`,
   :mod:`compress.profile`) of the evaluation inputs (else the calibration data) with
   the *fp32* model's outputs: what agents validate inputs against and the
   coordinator measures drift against. Its task is the evaluation data's, else
   ``classification`` when the model's output is ``(n, K)`` with 2 <= K <= 100,
   else ``regression``. Without reference data, or for a model it cannot describe
   (several inputs, more than 100 classes), the artifact has no profile (logged);
7. build the manifest (with the request's ``lineage`` record when given:
   :mod:`compress.lineage`, :mod:`coordinator.delivery.lineage`), sign it with every
   given key (k-of-n), and write the artifact file atomically.

The function takes a typed :class:`PackageRequest` and the current time, and returns a
:class:`PackageResult` with every figure the CLI prints; it does no printing itself.

Steps 5 to 7 are shared with :func:`coordinator.delivery.torch_packaging.package_torch`
(PyTorch models, any task): :func:`check_identity` refuses a bad name, version or key
list before any slow work, :func:`health_checks` turns reference inputs into the
checks a manifest can carry, :func:`reference_profile` computes the profile, and
:func:`sign_and_write` fits the manifest under its size limit, signs it and writes
the artifact.
"""

from __future__ import annotations

import hashlib
import logging
import math
import tempfile
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from compress.artifact import write_artifact
from compress.errors import CompressError, ManifestError, ProfileError
from compress.fileio import load_npz, read_bounded
from compress.keys import SigningKey
from compress.lineage import NAME_RE, Lineage
from compress.manifest import (
    MAX_PAYLOAD_BYTES,
    HealthCheck,
    Manifest,
    ReferenceTensor,
    TensorSpec,
)
from compress.onnx_export import export_onnx
from compress.profile import MAX_CLASSES, ReferenceProfile, profile_from_data
from compress.quantize import quantize_int8
from compress.signing import sign_manifest
from coordinator.errors import AccuracyDropError, PackagingError
from edge_agent.runtime.base import ModelRuntime, TensorInfo, accuracy
from edge_agent.runtime.loader import load_model
from edge_agent.training.model_spec import TASKS, ModelTask

logger = logging.getLogger(__name__)

Quantize = Literal["int8", "none"]
HEALTH_CHECK_ROWS = 4
#: Reference rows a profile is computed from at most (the first ones).
PROFILE_ROWS = 20_000
#: Examples per inference call while running reference data through a model.
EVAL_BATCH = 256
#: Model file suffix -> manifest format.
MODEL_FORMATS = {".onnx": "onnx", ".tflite": "tflite"}
MAX_DATA_FILE_BYTES = 2 * 1024 * 1024 * 1024
DEFAULT_EXPIRY = timedelta(days=365)
"""How long a packaged artifact stays valid unless asked otherwise."""

PackagedModelGate = Callable[[ModelRuntime, float], None]
"""A last check before signing: called with the packaged model (loaded as a device
loads it) and its metric on the evaluation data; raises a
:class:`~coordinator.errors.PackagingError` to refuse, and then nothing is written."""


@dataclass(frozen=True)
class LabelledData:
    """Held-out examples ``x`` and what they should give, ``y``, for a task.

    Attributes:
        x: float32 examples ``(n, ...)``: rows ``(n, features)``, images, windows.
        y: per task: ``classification`` integer class labels ``(n,)``;
            ``regression`` float targets ``(n,)`` or ``(n, k)``; ``reconstruction``
            anomaly flags ``(n,)``, int64, ``1`` = anomaly, ``0`` = normal.
        task: The task the data is labelled for.
    """

    x: npt.NDArray[np.float32]
    y: npt.NDArray[Any]
    task: ModelTask = "classification"


@dataclass(frozen=True)
class PackageRequest:
    """Everything ``fedge model package`` was asked to do."""

    model_path: Path
    name: str
    version: int
    keys: Sequence[SigningKey]
    out: Path
    quantize: Quantize = "int8"
    calibration: npt.NDArray[np.float32] | None = None
    evaluation: LabelledData | None = None
    max_accuracy_drop: float = 1.0
    expires_in: timedelta = DEFAULT_EXPIRY
    hardware_tags: tuple[str, ...] = ()
    metadata: dict[str, str] = field(default_factory=dict)
    seed: int = 0
    gate: PackagedModelGate | None = None
    lineage: Lineage | None = None


@dataclass(frozen=True)
class PackageResult:
    """What packaging produced, for people and for ``--json``.

    ``metric_name`` is the task's quality metric (``accuracy``, ``mse``, ``auc``);
    ``fp32_metric`` and ``packaged_metric`` its value for the float32 and the packaged
    model on the evaluation data (``None`` without it). ``fp32_accuracy`` and
    ``packaged_accuracy`` are the same figures for classification, ``None`` otherwise.
    ``anomaly_threshold`` is set for reconstruction models (see ``package_torch``).
    """

    manifest: Manifest
    path: Path
    fp32_bytes: int
    packaged_bytes: int
    fp32_accuracy: float | None
    packaged_accuracy: float | None
    metric_name: str = "accuracy"
    fp32_metric: float | None = None
    packaged_metric: float | None = None
    anomaly_threshold: float | None = None

    @property
    def size_ratio(self) -> float:
        """fp32 size divided by packaged size."""
        return self.fp32_bytes / self.packaged_bytes

    @property
    def accuracy_drop(self) -> float | None:
        """Percentage points lost by quantization, when evaluated."""
        if self.fp32_accuracy is None or self.packaged_accuracy is None:
            return None
        return 100.0 * (self.fp32_accuracy - self.packaged_accuracy)


def load_labelled_npz(path: Path, task: ModelTask = "classification") -> LabelledData:
    """Load evaluation data: an ``.npz`` with ``x`` (n, ...) and ``y`` for ``task``.

    ``y`` holds integer class labels ``(n,)`` for classification, real targets
    ``(n,)`` or ``(n, k)`` for regression, and integer anomaly flags ``(n,)`` (0 or 1)
    for reconstruction (see :class:`LabelledData`).

    Raises:
        PackagingError: missing or unreadable file, missing keys, bad shapes, dtypes
            or values.
    """
    arrays = load_npz(path, max_bytes=MAX_DATA_FILE_BYTES, error=PackagingError,
                      what="evaluation data file")  # fmt: skip
    if "x" not in arrays or "y" not in arrays:
        raise PackagingError(f"{path}: expected arrays 'x' and 'y', found {sorted(arrays)}")
    try:
        return checked_labelled(arrays["x"], arrays["y"], task)
    except PackagingError as exc:
        raise PackagingError(f"{path}: {exc}") from exc


def checked_labelled(x: npt.ArrayLike, y: npt.ArrayLike, task: ModelTask) -> LabelledData:
    """Validate evaluation arrays for ``task`` and convert them (see :class:`LabelledData`).

    Raises:
        PackagingError: an unknown task; ``x`` not a finite numeric batch of at least
            2-D; ``y`` not one label, target or flag per example of the task's kind.
    """
    if task not in TASKS:
        raise PackagingError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    x_arr, y_arr = np.asarray(x), np.asarray(y)
    if x_arr.ndim < 2 or len(x_arr) == 0 or y_arr.ndim == 0 or len(x_arr) != len(y_arr):
        raise PackagingError(
            f"expected x of shape (n, ...) and one y per example, got {x_arr.shape} and "
            f"{y_arr.shape}"
        )
    if x_arr.dtype.kind not in "fiu":
        raise PackagingError("x must be numeric")
    if not np.isfinite(x_arr).all():
        raise PackagingError("x contains NaN or infinity")
    if task == "regression":
        if y_arr.ndim > 2 or y_arr.dtype.kind not in "fiu" or not np.isfinite(y_arr).all():
            raise PackagingError("regression targets y must be finite numbers, (n,) or (n, k)")
        return LabelledData(x=x_arr.astype(np.float32), y=y_arr.astype(np.float32), task=task)
    if y_arr.ndim != 1 or y_arr.dtype.kind not in "iu":
        what = "class labels" if task == "classification" else "anomaly flags (0/1)"
        raise PackagingError(
            f"y must be integer {what} of shape (n,), got {y_arr.dtype} {y_arr.shape}"
        )
    if task == "reconstruction" and not np.isin(y_arr, (0, 1)).all():
        raise PackagingError("reconstruction y must be anomaly flags: 0 (normal) or 1 (anomaly)")
    return LabelledData(x=x_arr.astype(np.float32), y=y_arr.astype(np.int64), task=task)


def _spec(info: TensorInfo) -> TensorSpec:
    return TensorSpec(name=info.name, shape=tuple(info.shape), dtype=info.dtype)


def health_checks(
    runtime: ModelRuntime, reference: npt.NDArray[np.float32] | None, *, seed: int = 0
) -> Iterator[HealthCheck]:
    """Health checks from the most reference rows to one row, for the manifest to try.

    The reference inputs are the first :data:`HEALTH_CHECK_ROWS` rows of
    ``reference``, or a batch of uniform random inputs drawn with ``seed`` when it is
    ``None``; the expected outputs are ``runtime``'s own (the packaged model's).
    Nothing is yielded (and a warning is logged) when the model's input is not a
    batch of float32 examples of a fixed shape.
    """
    info = runtime.inputs[0] if len(runtime.inputs) == 1 else None
    if info is None or info.dtype != "float32" or any(d is None for d in info.shape[1:]):
        logger.warning("model input is not a float batch; packaging without a health check")
        return
    if reference is None:
        dims = tuple(int(d) for d in info.shape[1:] if d is not None)
        batch = np.random.default_rng(seed).random((HEALTH_CHECK_ROWS, *dims), dtype=np.float32)
    else:
        batch = np.ascontiguousarray(reference[:HEALTH_CHECK_ROWS], dtype=np.float32)
    outputs = runtime.run({info.name: batch})
    for rows in range(len(batch), 0, -1):
        try:
            yield HealthCheck(
                inputs={info.name: ReferenceTensor.from_array(batch[:rows])},
                outputs={k: ReferenceTensor.from_array(v[:rows]) for k, v in outputs.items()},
            )
        except ManifestError:
            continue  # too many values for a manifest: try fewer rows


def batched_outputs(runtime: ModelRuntime, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    """The model's first output for every example of ``x``, :data:`EVAL_BATCH` at a time."""
    parts = [runtime.predict(x[i : i + EVAL_BATCH]) for i in range(0, len(x), EVAL_BATCH)]
    out: npt.NDArray[np.float32] = np.concatenate(parts).astype(np.float32)
    return out


def reference_profile(
    fp32: ModelRuntime, x: npt.NDArray[np.float32] | None, task: ModelTask | None
) -> ReferenceProfile | None:
    """The reference profile of inputs ``x`` with the fp32 model's outputs, or None.

    ``task`` None: ``classification`` when the first output is ``(n, K)`` with
    2 <= K <= 100, else ``regression``. At most :data:`PROFILE_ROWS` rows are used.
    None (with a log line) without ``x``, for a model that does not take one float
    batch, or when the data cannot be profiled (:class:`ProfileError`): the profile
    is optional and the artifact is still packaged.
    """
    info = fp32.inputs[0] if len(fp32.inputs) == 1 else None
    if x is None or info is None or info.dtype != "float32":
        logger.warning("packaging without a reference profile: %s",
                       "no reference data" if x is None else "not one float input")  # fmt: skip
        return None
    rows = np.ascontiguousarray(x[:PROFILE_ROWS], dtype=np.float32)
    outputs = batched_outputs(fp32, rows)
    if task is None:
        out_shape = fp32.outputs[0].shape
        k = out_shape[1] if len(out_shape) == 2 else None
        task = "classification" if k is not None and 2 <= k <= MAX_CLASSES else "regression"
    try:
        return profile_from_data(rows, outputs, task)
    except ProfileError as exc:
        logger.warning("packaging without a reference profile: %s", exc)
        return None


def _accuracy(runtime: ModelRuntime, data: LabelledData | None) -> float | None:
    return None if data is None else accuracy(runtime, data.x, data.y)


def _fitting_manifest(fields: dict[str, Any], checks: Iterator[HealthCheck]) -> Manifest:
    """The manifest with the largest health check that keeps it under the size limit.

    A signed manifest travels in one deploy message, so its size is bounded
    (:data:`compress.manifest.MAX_MANIFEST_BYTES`); a model with wide inputs gets fewer
    reference rows, or none, rather than an artifact that cannot be deployed.

    Raises:
        PackagingError: the manifest is invalid or too large even without a check.
    """
    for check in checks:
        try:
            return Manifest(**fields, health_check=check)
        except ManifestError as exc:
            logger.info("health check of %d row(s) does not fit: %s",
                        next(iter(check.inputs.values())).shape[0], exc)  # fmt: skip
    try:
        manifest = Manifest(**fields, health_check=None)
    except CompressError as exc:
        raise PackagingError(f"cannot describe this model in a manifest: {exc}") from exc
    logger.warning(
        "packaging %s without a health check: reference data does not fit", fields["name"]
    )
    return manifest


def check_identity(
    name: str, version: int, keys: Sequence[SigningKey], now: datetime, expires_in: timedelta
) -> datetime:
    """Refuse an artifact identity that cannot be signed, before any slow work starts.

    Returns:
        The manifest's expiry time.

    Raises:
        PackagingError: no keys, a bad name or version, or an expiry past year 9999.
    """
    if not keys:
        raise PackagingError("at least one signing key is required")
    if not NAME_RE.fullmatch(name):
        raise PackagingError(
            f"model name {name!r} must be 1-64 characters of a-z, 0-9, '.', '_', '-'"
            " starting with a letter or digit"
        )
    if version < 1:
        raise PackagingError(f"version must be a positive integer, got {version}")
    try:
        return now + expires_in
    except OverflowError as exc:
        raise PackagingError(f"expiry {expires_in} after now is past year 9999") from exc


def _check_request(request: PackageRequest, now: datetime) -> tuple[str, datetime]:
    """Refuse a request that cannot succeed before any slow work starts.

    Returns:
        The model format and the manifest's expiry time.

    Raises:
        PackagingError: unknown model type, TFLite with int8, no keys, bad name or
            version, a non-finite accuracy bound, an expiry past year 9999, or a gate
            without evaluation data.
    """
    model_format = MODEL_FORMATS.get(request.model_path.suffix.lower())
    if model_format is None:
        raise PackagingError(
            f"{request.model_path}: expected an ONNX (.onnx) or TFLite (.tflite) model file"
        )
    if model_format == "tflite" and request.quantize != "none":
        raise PackagingError(
            "int8 quantization works on ONNX models: package the ONNX export, or pass "
            "--quantize none to ship this TFLite model as it is"
        )
    expires = check_identity(request.name, request.version, request.keys, now, request.expires_in)
    if not math.isfinite(request.max_accuracy_drop):
        raise PackagingError("--max-accuracy-drop must be a finite number")
    if request.gate is not None and request.evaluation is None:
        raise PackagingError("a packaging gate compares metrics: give evaluation data")
    return model_format, expires


@dataclass(frozen=True)
class ArtifactFields:
    """What the manifest says about a packaged model besides its health check."""

    name: str
    version: int
    model_format: str
    quantization: str
    created: datetime
    expires: datetime
    hardware_tags: tuple[str, ...] = ()
    metadata: Mapping[str, str] = field(default_factory=dict)
    lineage: Lineage | None = None


def sign_and_write(
    fields: ArtifactFields,
    model: bytes,
    *,
    runtime: ModelRuntime,
    checks: Iterator[HealthCheck],
    keys: Sequence[SigningKey],
    out: Path,
    reference: ReferenceProfile | None = None,
) -> Manifest:
    """Describe ``model`` in a manifest, sign it with every key and write the artifact.

    ``runtime`` is ``model`` loaded (its inputs and outputs go into the manifest);
    the manifest carries ``reference`` (the reference profile, if any) and the largest
    of ``checks`` that fits its size limit.

    Returns:
        The manifest written (unsigned form).

    Raises:
        PackagingError: the model cannot be described in a manifest.
        CompressError: signing or writing failed (its own typed subclass).
    """
    manifest_fields = {
        "name": fields.name,
        "version": fields.version,
        "format": fields.model_format,
        "sha256": hashlib.sha256(model).hexdigest(),
        "length": len(model),
        "inputs": tuple(_spec(t) for t in runtime.inputs),
        "outputs": tuple(_spec(t) for t in runtime.outputs),
        "quantization": fields.quantization,
        "created": fields.created,
        "expires": fields.expires,
        "hardware_tags": tuple(sorted(set(fields.hardware_tags))),
        "metadata": dict(fields.metadata),
        "reference": reference,
        "lineage": fields.lineage,
    }
    manifest = _fitting_manifest(manifest_fields, checks)
    signed = sign_manifest(manifest, keys)
    write_artifact(out, signed, model)
    logger.info("wrote %s to %s", manifest.summary(), out)
    return manifest


def package_model(request: PackageRequest, *, now: datetime) -> PackageResult:
    """Quantize, evaluate, sign and write an artifact. See the module docstring.

    Raises:
        PackagingError: unreadable model or data, or a model fedge cannot package.
        AccuracyDropError: int8 lost more than ``max_accuracy_drop`` points.
        QualityGateError: (or another PackagingError) the request's ``gate`` refused.
        CompressError: quantization or signing failed (its own typed subclass).
        edge_agent.errors.ModelRuntimeError: onnxruntime cannot load or run the model.
    """
    model_format, expires = _check_request(request, now)
    fp32_model = read_bounded(
        request.model_path, max_bytes=MAX_PAYLOAD_BYTES, error=PackagingError, what="model file"
    )
    fp32 = load_model(model_format, fp32_model)
    if request.quantize == "int8":
        packaged_model = quantize_int8(fp32_model, calibration=request.calibration)
        scheme = "int8-static" if request.calibration is not None else "int8-dynamic"
        packaged = load_model(model_format, packaged_model)
    else:
        packaged_model, scheme, packaged = fp32_model, "none", fp32

    fp32_acc = _accuracy(fp32, request.evaluation)
    packaged_acc = fp32_acc if packaged is fp32 else _accuracy(packaged, request.evaluation)
    if fp32_acc is not None and packaged_acc is not None:
        drop = 100.0 * (fp32_acc - packaged_acc)
        logger.info("accuracy fp32 %.4f, %s %.4f (drop %.2f points)", fp32_acc, scheme,
                    packaged_acc, drop)  # fmt: skip
        if drop > request.max_accuracy_drop:
            raise AccuracyDropError(
                f"int8 accuracy {100 * packaged_acc:.2f}% is {drop:.2f} points below fp32 "
                f"{100 * fp32_acc:.2f}% (allowed: {request.max_accuracy_drop:.2f}); try "
                "--calibration with representative data, or --quantize none"
            )
        if request.gate is not None:
            request.gate(packaged, packaged_acc)

    metadata = dict(request.metadata)
    metadata["fp32_bytes"] = str(len(fp32_model))
    if packaged_acc is not None:
        metadata["accuracy"] = f"{packaged_acc:.6f}"
    fields = ArtifactFields(
        name=request.name,
        version=request.version,
        model_format=model_format,
        quantization=scheme,
        created=now,
        expires=expires,
        hardware_tags=request.hardware_tags,
        metadata=metadata,
        lineage=request.lineage,
    )
    evaluation = request.evaluation
    reference = evaluation.x if evaluation is not None else request.calibration
    manifest = sign_and_write(
        fields,
        packaged_model,
        runtime=packaged,
        checks=health_checks(packaged, reference, seed=request.seed),
        keys=request.keys,
        out=request.out,
        reference=reference_profile(fp32, reference, evaluation.task if evaluation else None),
    )
    return PackageResult(
        manifest=manifest,
        path=request.out,
        fp32_bytes=len(fp32_model),
        packaged_bytes=len(packaged_model),
        fp32_accuracy=fp32_acc,
        packaged_accuracy=packaged_acc,
        fp32_metric=fp32_acc,
        packaged_metric=packaged_acc,
    )


def package_weights(
    family: str,
    weights: Mapping[str, npt.ArrayLike],
    *,
    name: str,
    version: int,
    keys: Sequence[SigningKey],
    out: Path,
    evaluation: LabelledData | None = None,
    metadata: Mapping[str, str] | None = None,
    now: datetime,
    gate: PackagedModelGate | None = None,
    lineage: Lineage | None = None,
) -> PackageResult:
    """Export a built-in family's weights to ONNX and package them (int8, signed).

    Static int8 calibration uses the first 256 evaluation rows when given; ``gate``
    (which needs ``evaluation``) sees the int8 model and its accuracy before signing;
    the manifest carries ``lineage`` when given.

    Raises:
        As :func:`package_model`, and FamilyError for weights that do not fit the family.
    """
    with tempfile.TemporaryDirectory(prefix="fedge-package-") as tmp:
        model_path = Path(tmp) / f"{name}.onnx"
        model_path.write_bytes(export_onnx(family, weights))
        return package_model(
            PackageRequest(
                model_path=model_path,
                name=name,
                version=version,
                keys=keys,
                out=out,
                calibration=None if evaluation is None else evaluation.x[:256],
                evaluation=evaluation,
                metadata=dict(metadata or {}),
                gate=gate,
                lineage=lineage,
            ),
            now=now,
        )
