"""The interface every on-device inference runtime implements.

After an artifact has been verified (see :mod:`compress`), the agent hands its model
bytes to a runtime adapter and from then on only talks to the :class:`ModelRuntime`
interface::

    verified payload --OnnxRuntimeModel.from_bytes()--> ModelRuntime
        .inputs / .outputs   -> check the model fits what the deployment declares
        .run(feeds)          -> named tensors in, named tensors out
        .predict(x)          -> single-input, single-output convenience
        accuracy(rt, x, y)   -> local evaluation (telemetry, rollout health checks)

Implementations: :class:`edge_agent.runtime.onnx_runtime.OnnxRuntimeModel`
(onnxruntime, always available) and
:class:`edge_agent.runtime.tflite_runtime.TfliteModel` (LiteRT or tflite-runtime, when
installed); :func:`edge_agent.runtime.loader.load_model` picks one by model format.
Both derive from :class:`EngineModel` (the tensors they declared at load time) and
check what they are given with the same helpers: :func:`check_load_args` for the
model bytes and thread count, :func:`check_feeds` for every ``run``.
Implementations translate their engine's exceptions into
:class:`edge_agent.errors.ModelRuntimeError`, so callers never see a foreign error.

This module is pure: numpy only, no inference engine.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from functools import cached_property
from typing import Any, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_agent.errors import ModelRuntimeError

__all__ = [
    "EngineModel",
    "ModelRuntime",
    "TensorInfo",
    "accuracy",
    "check_feeds",
    "check_load_args",
    "predict_single",
]


@dataclass(frozen=True)
class TensorInfo:
    """Name, shape and element type of a model input or output.

    Attributes:
        name: The tensor's name in the model.
        shape: One entry per dimension; ``None`` for a dynamic (symbolic or unknown)
            dimension such as the batch size.
        dtype: The numpy dtype name (``"float32"``, ``"int64"``, ``"uint8"`` ...).
    """

    name: str
    shape: tuple[int | None, ...]
    dtype: str

    @cached_property
    def numpy_dtype(self) -> np.dtype[Any]:
        """:attr:`dtype` as a numpy dtype (computed once: this is on the hot path)."""
        return np.dtype(self.dtype)

    def accepts(self, array: np.ndarray) -> str | None:
        """Why ``array`` cannot be fed to this tensor, or ``None`` if it can."""
        if array.dtype != self.numpy_dtype:
            return f"input {self.name!r} must be {self.dtype}, got {array.dtype}"
        if array.ndim != len(self.shape) or any(
            want is not None and want != got
            for want, got in zip(self.shape, array.shape, strict=True)
        ):
            return f"input {self.name!r} must have shape {self.shape_text()}, got {array.shape}"
        return None

    def shape_text(self) -> str:
        """The shape with ``?`` for dynamic dimensions, e.g. ``(?, 64)``."""
        dims = ", ".join("?" if d is None else str(d) for d in self.shape)
        return f"({dims},)" if len(self.shape) == 1 else f"({dims})"


@runtime_checkable
class ModelRuntime(Protocol):
    """A loaded model that runs inference on this device.

    Implementations subclass this protocol explicitly to inherit :meth:`predict`.
    """

    @property
    def inputs(self) -> list[TensorInfo]:
        """The model's inputs, in the model's order."""
        ...

    @property
    def outputs(self) -> list[TensorInfo]:
        """The model's outputs, in the model's order."""
        ...

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once.

        Args:
            feeds: One array per input, by name, with exactly the input's dtype and
                a shape that matches its static dimensions.

        Returns:
            Every output, by name.

        Raises:
            ModelRuntimeError: missing or unknown inputs, wrong dtype or shape, or
                the engine failed.
        """
        ...

    def predict(self, x: npt.ArrayLike) -> np.ndarray:
        """Run a single-input, single-output model on ``x``.

        ``x`` is converted to the input's dtype first (e.g. float64 -> float32).

        Raises:
            ModelRuntimeError: the model does not have exactly one input and one
                output, ``x`` cannot be converted or has the wrong shape, or the
                engine failed.
        """
        return predict_single(self, x)


class EngineModel(ModelRuntime):
    """What every engine adapter shares: the tensors its model declared at load time.

    Args:
        inputs: The model's inputs, in the model's order.
        outputs: The model's outputs, in the model's order.
    """

    def __init__(self, inputs: list[TensorInfo], outputs: list[TensorInfo]) -> None:
        self._inputs = list(inputs)
        self._outputs = list(outputs)

    @property
    def inputs(self) -> list[TensorInfo]:
        """The model's inputs, in the model's order."""
        return list(self._inputs)

    @property
    def outputs(self) -> list[TensorInfo]:
        """The model's outputs, in the model's order."""
        return list(self._outputs)


def check_load_args(model: object, threads: object) -> bytes:
    """Check what an adapter's ``from_bytes`` is given, before the engine sees it.

    Returns:
        The model as ``bytes``.

    Raises:
        ModelRuntimeError: ``threads`` is not a positive integer, or ``model`` is not
            non-empty bytes.
    """
    if isinstance(threads, bool) or not isinstance(threads, int) or threads < 1:
        raise ModelRuntimeError(f"threads must be a positive integer, got {threads!r}")
    if not isinstance(model, bytes | bytearray | memoryview) or len(model) == 0:
        raise ModelRuntimeError("model must be non-empty bytes")
    return bytes(model)


def check_feeds(inputs: list[TensorInfo], feeds: Mapping[str, object]) -> dict[str, np.ndarray]:
    """Check ``feeds`` against a model's inputs before an engine sees them.

    Every adapter calls this first, so a wrong name, type, dtype or shape gets the
    same precise message whatever the engine.

    Returns:
        The feeds as a dict of numpy arrays, in the model's input order.

    Raises:
        ModelRuntimeError: missing or unknown input names, a value that is not a numpy
            array, or a dtype or shape the input does not accept.
    """
    expected = {info.name for info in inputs}
    missing = sorted(expected - feeds.keys())
    unknown = sorted(str(k) for k in set(feeds.keys()) - expected)
    if missing or unknown:
        raise ModelRuntimeError(
            f"inputs do not match the model: missing {missing}, unknown {unknown}; "
            f"expected {sorted(expected)}"
        )
    prepared: dict[str, np.ndarray] = {}
    for info in inputs:
        array = feeds[info.name]
        if not isinstance(array, np.ndarray):
            raise ModelRuntimeError(
                f"input {info.name!r} must be a numpy array, got {type(array).__name__}"
            )
        problem = info.accepts(array)
        if problem is not None:
            raise ModelRuntimeError(problem)
        prepared[info.name] = array
    return prepared


def convert_input(value: npt.ArrayLike, info: TensorInfo) -> np.ndarray:
    """``value`` as an array of ``info``'s dtype, refusing lossy overflow.

    Raises:
        ModelRuntimeError: the value cannot be converted, or overflows the dtype
            (e.g. ``1e39`` for float32, instead of a silent ``inf``).
    """
    target = info.numpy_dtype
    if isinstance(value, np.ndarray) and value.dtype == target:
        return value
    try:
        with np.errstate(over="raise", invalid="raise"):
            if target.kind in "iu":  # numpy < 2 wraps out-of-range ints: check first
                _check_integer_range(np.asarray(value), target)
            return np.asarray(value, dtype=target)
    except (TypeError, ValueError, OverflowError, FloatingPointError) as exc:
        raise ModelRuntimeError(
            f"cannot convert input {info.name!r} to {info.dtype}: {exc}"
        ) from exc


def _check_integer_range(array: np.ndarray, target: np.dtype[Any]) -> None:
    """Raise OverflowError when ``array`` holds values ``target`` cannot represent."""
    if array.size == 0 or array.dtype.kind not in "iuf":
        return
    bounds = np.iinfo(target)
    low, high = array.min(), array.max()
    if not (np.isfinite(low) and np.isfinite(high)) or low < bounds.min or high > bounds.max:
        raise OverflowError(f"values outside [{bounds.min}, {bounds.max}]")


def predict_single(runtime: ModelRuntime, x: npt.ArrayLike) -> np.ndarray:
    """:meth:`ModelRuntime.predict` for any runtime (also structural implementations).

    Raises:
        ModelRuntimeError: see :meth:`ModelRuntime.predict`.
    """
    inputs, outputs = runtime.inputs, runtime.outputs
    if len(inputs) != 1 or len(outputs) != 1:
        raise ModelRuntimeError(
            f"predict() needs a model with one input and one output, this one has "
            f"{len(inputs)} and {len(outputs)}; use run()"
        )
    info = inputs[0]
    try:
        array = np.asarray(x, dtype=np.dtype(info.dtype))
    except (TypeError, ValueError, OverflowError) as exc:
        raise ModelRuntimeError(f"cannot convert input to {info.dtype}: {exc}") from exc
    return runtime.run({info.name: array})[outputs[0].name]


def accuracy(
    runtime: ModelRuntime, x: npt.ArrayLike, y: npt.ArrayLike, batch_size: int = 256
) -> float:
    """Fraction of rows of ``x`` whose arg-max prediction equals the label in ``y``.

    The model must map a batch ``(n, ...)`` to scores ``(n, n_classes)`` (class
    probabilities or logits). If the model's batch dimension is fixed, that size is
    used instead of ``batch_size``.

    Args:
        runtime: A single-input, single-output classifier.
        x: Inputs, one row per sample.
        y: Integer class labels, one per row of ``x``.
        batch_size: Rows per inference call.

    Returns:
        Accuracy in ``[0, 1]``.

    Raises:
        ValueError: ``x`` and ``y`` are empty or differ in length, or
            ``batch_size < 1``.
        ModelRuntimeError: the model is not a single-input, single-output
            classifier of that shape, or inference failed.
    """
    x_arr = np.asarray(x)
    y_arr = np.asarray(y).reshape(-1)
    if x_arr.ndim == 0 or x_arr.shape[0] == 0 or x_arr.shape[0] != y_arr.shape[0]:
        raise ValueError(
            f"need a non-empty x and one label per row, got x {x_arr.shape} and y {y_arr.shape}"
        )
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    inputs = runtime.inputs
    if len(inputs) == 1 and inputs[0].shape and inputs[0].shape[0] is not None:
        batch_size = inputs[0].shape[0]
        if x_arr.shape[0] % batch_size:
            raise ModelRuntimeError(
                f"the model takes batches of exactly {batch_size} rows; "
                f"{x_arr.shape[0]} rows do not divide into them"
            )
    correct = 0
    for start in range(0, x_arr.shape[0], batch_size):
        scores = runtime.predict(x_arr[start : start + batch_size])
        rows = min(batch_size, x_arr.shape[0] - start)
        if scores.ndim != 2 or scores.shape[0] != rows:
            raise ModelRuntimeError(
                f"expected class scores of shape ({rows}, n_classes), got {scores.shape}"
            )
        correct += int(np.count_nonzero(scores.argmax(axis=1) == y_arr[start : start + rows]))
    return correct / int(x_arr.shape[0])
