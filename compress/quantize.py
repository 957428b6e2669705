"""int8 quantization of ONNX models with ``onnxruntime.quantization``.

Deployment artifacts are int8 by default: weights shrink about 4x (float32 -> int8)
and integer kernels are usually faster on the CPUs that edge devices have. The
workflow, all in memory (bytes in, bytes out)::

    fp32 ONNX bytes --quantize_int8()--> int8 ONNX bytes --(sign, package, roll out)

:func:`quantize_int8` offers the two post-training modes of onnxruntime:

**Dynamic** (``calibration=None``, the default). Weights are quantized to int8 ahead
of time (``QuantType.QInt8``, symmetric, per output channel); activations are
quantized on the fly, per batch, from their observed range (``DynamicQuantizeLinear``
+ ``MatMulInteger``). It needs no data, cannot be mis-calibrated, and is the right
choice for dense models such as fedge's ``softmax`` and ``mlp`` families and
whenever no representative inputs are at hand on the coordinator (the usual case in
federated learning, where the data stays on devices).

**Static** (``calibration=`` a float32 batch of representative inputs, ``(n,
*example_shape)`` for a model with one float input of any rank: rows ``(n, features)``,
images ``(n, channels, height, width)``, sensor windows ``(n, channels, steps)``). The
model is
run on the calibration batch first and each activation's range is recorded
(``MinMax``); the ranges are then frozen into the model as ``QuantizeLinear`` /
``DequantizeLinear`` pairs around every quantizable operator (the ``QDQ`` format,
which onnxruntime's CPU kernels fuse into integer operators). Activations are uint8
(asymmetric: ReLU outputs are non-negative, so no code is wasted on negative
values), weights int8 per channel, the combination onnxruntime recommends for CPUs
with dot-product instructions (x86 VNNI, ARMv8.2+). Static models skip the run-time
range computation, so they are faster for convolutional models and required by
integer-only accelerators; their accuracy depends on the calibration set covering
the inputs the device will see (a few hundred training samples are usually enough).
Every activation is quantized, the final softmax included: a static model's class
probabilities come in steps of 1/255, which leaves the arg-max (the predicted class)
intact but limits fine-grained confidence thresholds.
Use :func:`load_calibration` to read such a batch from an ``.npz`` file.
``float_nodes`` keeps named nodes in float32 and feeds them the unquantized values
of their inputs (an output head whose range the calibration data cannot cover, such
as an anomaly score; see :mod:`compress.torch_export`).

Pre-processing. onnxruntime recommends running
``onnxruntime.quantization.shape_inference.quant_pre_process`` (ONNX shape inference
plus onnxruntime's graph optimizations, e.g. fusing ``MatMul`` + ``Add`` into
``Gemm``) before quantizing, and logs a warning on the root logger when a model has
not been pre-processed. :func:`quantize_int8` always runs it, so the warning is not
emitted because its advice has been followed, not because it was silenced. Symbolic
shape inference (a step meant for transformer models, which needs ``sympy``) is
skipped: ONNX shape inference fully describes the models fedge exports. Python
warnings raised by onnx/onnxruntime while quantizing are recorded and re-logged at
DEBUG level on this module's logger instead of leaking to the caller.

Checks. The input model is parsed and checked with ``onnx.checker``, and loaded once
into onnxruntime before quantizing; the result is loaded again afterwards. This
matters because ``quant_pre_process`` only logs a failed optimization and the
quantizer passes unknown operators through, so neither would notice a model that no
device can run.

The quantizer works on files, so each call uses a private temporary directory that
is removed afterwards. ``onnx`` and ``onnxruntime.quantization`` are imported inside
the functions (``fedge[coordinator]``); this module imports with numpy only. Every
failure becomes :class:`compress.errors.QuantizationError` with a one-line message.
"""

from __future__ import annotations

import logging
import os
import tempfile
import warnings
from collections.abc import Callable, Collection, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.errors import QuantizationError, one_line
from compress.fileio import load_npz

__all__ = ["CALIBRATION_KEY", "load_calibration", "quantize_int8"]

logger = logging.getLogger(__name__)

CALIBRATION_KEY = "x"
"""Name of the array inside a calibration ``.npz`` file."""

MAX_CALIBRATION_FILE_BYTES = 1024 * 1024 * 1024
"""Largest calibration file accepted (checked before reading)."""

_CALIBRATION_BATCH = 64
"""Rows fed to onnxruntime per calibration step (bounds the calibrator's memory)."""

_ORT_LOG_FATAL = 4
"""onnxruntime log severity that hides errors (they surface as exceptions instead)."""

_INSTALL_HINT = "install it with `pip install 'fedge[coordinator]'`"

FloatArray = npt.NDArray[np.float32]


def quantize_int8(
    model: bytes,
    *,
    calibration: npt.NDArray[np.float32] | None = None,
    per_channel: bool = True,
    float_nodes: Collection[str] = (),
) -> bytes:
    """Quantize a float32 ONNX model to int8.

    Args:
        model: A serialized float32 ONNX model.
        calibration: ``None`` for dynamic quantization; otherwise a float batch of
            representative inputs ``(n, *example_shape)`` for static (QDQ)
            quantization of a model with one float input of the same rank, whose
            static (non-batch) dimensions the examples must match.
        per_channel: Quantize weights with one scale per output channel (more
            accurate, a few percent larger) instead of one per tensor.
        float_nodes: Names of nodes to keep in float32 (not quantized), e.g. an
            output head whose values the calibration data does not cover; every name
            must be a node of ``model``.

    Returns:
        The serialized int8 model; same input and output names, shapes and dtypes.

    Raises:
        QuantizationError: ``onnx``/``onnxruntime.quantization`` is not installed,
            ``model`` is not a valid ONNX model, ``calibration`` is empty, not
            finite, or its examples do not fit the model's input, ``float_nodes``
            names a node the model does not have, or onnxruntime fails.
    """
    proto = _parse_model(model)
    keep_float = sorted(set(float_nodes))
    unknown = sorted(set(keep_float) - {node.name for node in proto.graph.node})
    if unknown:
        raise QuantizationError(f"float_nodes names no node of the model: {', '.join(unknown)}")
    calib: FloatArray | None = None
    input_name = ""
    if calibration is not None:
        input_name, example_dims = _single_float_input(proto)
        calib = _check_calibration(calibration, example_dims)
    quantization = _import_quantization()
    _check_loads(model, "the model")

    with tempfile.TemporaryDirectory(prefix="fedge-quantize-") as tmp:
        src = Path(tmp) / "model.onnx"
        pre = Path(tmp) / "model.pre.onnx"
        out = Path(tmp) / "model.int8.onnx"
        src.write_bytes(model)
        _run(
            "pre-processing",
            quantization.shape_inference.quant_pre_process,
            src,
            pre,
            skip_symbolic_shape=True,
        )
        if calib is None:
            _run(
                "dynamic quantization",
                quantization.quantize_dynamic,
                pre,
                out,
                weight_type=quantization.QuantType.QInt8,
                per_channel=per_channel,
                nodes_to_exclude=keep_float,
            )
        else:
            _run(
                "static quantization",
                quantization.quantize_static,
                pre,
                out,
                _BatchReader(input_name, calib),
                quant_format=quantization.QuantFormat.QDQ,
                activation_type=quantization.QuantType.QUInt8,
                weight_type=quantization.QuantType.QInt8,
                calibrate_method=quantization.CalibrationMethod.MinMax,
                per_channel=per_channel,
                nodes_to_exclude=keep_float,
            )
        try:
            data = out.read_bytes()
        except OSError as exc:
            raise QuantizationError(f"onnxruntime did not write a quantized model: {exc}") from exc
    if keep_float:
        data = _unquantized_inputs(data, keep_float)
    data = _prune_opset_imports(data)
    _check_loads(data, "the quantized model")
    logger.debug(
        "quantized model to int8 (%s): %d -> %d bytes",
        "dynamic" if calib is None else "static",
        len(model),
        len(data),
    )
    return data


def load_calibration(path: str | os.PathLike[str]) -> FloatArray:
    """Read a calibration batch from an ``.npz`` file.

    The file holds one array under the key :data:`CALIBRATION_KEY` (``"x"``) of shape
    ``(n, *example_shape)`` (at least 2-D), ``n >= 1``, with finite real values (as
    written by
    ``numpy.savez(path, x=batch)``). Pickled objects are refused.

    Args:
        path: Path of the ``.npz`` file.

    Returns:
        The batch as a C-contiguous float32 array.

    Raises:
        QuantizationError: the file is missing or unreadable, is not an ``.npz``
            archive, has no ``x`` array, or the array is not a finite, non-empty
            numeric batch of at least 2 dimensions.
    """
    arrays = load_npz(
        Path(path), max_bytes=MAX_CALIBRATION_FILE_BYTES, error=QuantizationError,
        what="calibration file",
    )  # fmt: skip
    if CALIBRATION_KEY not in arrays:
        raise QuantizationError(
            f"{path}: no array named {CALIBRATION_KEY!r} (found: {', '.join(arrays) or 'none'})"
        )
    raw = arrays[CALIBRATION_KEY]
    try:
        return _check_calibration(raw, None)
    except QuantizationError as exc:
        raise QuantizationError(f"{path}: {exc}") from exc


class _BatchReader:
    """Feeds a calibration batch to onnxruntime in chunks.

    Satisfies ``onnxruntime.quantization.CalibrationDataReader`` structurally (its
    ``__subclasshook__`` accepts any object with ``get_next``), so this class does not
    need onnxruntime at import time.
    """

    def __init__(self, input_name: str, batch: FloatArray) -> None:
        self._chunks: Iterator[dict[str, FloatArray]] = iter(
            [
                {input_name: batch[start : start + _CALIBRATION_BATCH]}
                for start in range(0, batch.shape[0], _CALIBRATION_BATCH)
            ]
        )

    def get_next(self) -> dict[str, FloatArray] | None:
        """The next chunk of inputs, or ``None`` when the batch is exhausted."""
        return next(self._chunks, None)


def _parse_model(model: bytes) -> Any:
    """Parse and check serialized ONNX bytes.

    Raises:
        QuantizationError: ``onnx`` is missing or the bytes are not a valid model.
    """
    try:
        import onnx  # noqa: PLC0415 - optional dependency, imported lazily on purpose
        import onnx.checker  # noqa: PLC0415
    except ImportError as exc:
        raise QuantizationError(f"quantization needs the 'onnx' package; {_INSTALL_HINT}") from exc
    if not model:
        raise QuantizationError("model is empty (0 bytes)")
    try:
        proto = onnx.load_model_from_string(model)
        onnx.checker.check_model(proto)
    except Exception as exc:  # protobuf and onnx raise assorted types
        raise QuantizationError(f"not a valid ONNX model: {one_line(exc)}") from exc
    if not proto.graph.node:
        raise QuantizationError("not a valid ONNX model: the graph has no nodes")
    return proto


def _parse_quantized(model: bytes) -> Any:
    """Parse the quantizer's output (``onnx`` is loaded by :func:`_parse_model` already).

    Raises:
        QuantizationError: the bytes cannot be parsed.
    """
    import onnx  # noqa: PLC0415 - imported by _parse_model already

    try:
        return onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf raises assorted types
        raise QuantizationError(f"cannot parse the quantized model: {one_line(exc)}") from exc


def _single_float_input(proto: Any) -> tuple[str, tuple[int | None, ...]]:
    """Name and example dimensions (``None`` where symbolic) of the model's only input.

    The example dimensions are the input's dimensions after the batch dimension.

    Raises:
        QuantizationError: the model does not have exactly one float32 input with a
            batch dimension and at least one more, which static calibration with a
            single batch requires.
    """
    initializers = {init.name for init in proto.graph.initializer}
    inputs = [inp for inp in proto.graph.input if inp.name not in initializers]
    if len(inputs) != 1:
        raise QuantizationError(
            f"static calibration needs a model with exactly one input, got {len(inputs)}"
        )
    inp = inputs[0]
    tensor_type = inp.type.tensor_type
    float32 = 1  # onnx.TensorProto.FLOAT
    dims = list(tensor_type.shape.dim)
    if tensor_type.elem_type != float32 or len(dims) < 2:
        raise QuantizationError(
            f"static calibration needs a float32 input (batch, ...) of at least 2-D; "
            f"{inp.name!r} is not one"
        )
    example = tuple(int(d.dim_value) if d.HasField("dim_value") else None for d in dims[1:])
    return inp.name, example


def _check_calibration(
    batch: npt.ArrayLike, example_dims: tuple[int | None, ...] | None
) -> FloatArray:
    """Validate a calibration batch and return it as C-contiguous float32.

    Args:
        batch: The calibration examples, ``(n, *example_shape)``.
        example_dims: The model input's dimensions after the batch (``None`` where
            symbolic), or ``None`` when there is no model to match (a file).

    Raises:
        QuantizationError: not a finite, non-empty, real batch of at least 2-D, or
            its examples do not have the rank and static dimensions of
            ``example_dims`` (when given).
    """
    try:
        arr = np.asarray(batch)
    except (TypeError, ValueError) as exc:
        raise QuantizationError(f"calibration data is not an array: {exc}") from exc
    if not (np.issubdtype(arr.dtype, np.floating) or np.issubdtype(arr.dtype, np.integer)):
        raise QuantizationError(f"calibration data must be real numbers, got dtype {arr.dtype}")
    if arr.ndim < 2 or arr.shape[0] == 0:
        raise QuantizationError(
            "calibration data must be a non-empty batch (n, *example_shape) of at least 2-D, "
            f"got shape {arr.shape}"
        )
    if example_dims is not None and not _fits(arr.shape[1:], example_dims):
        takes = ", ".join("?" if d is None else str(d) for d in example_dims)
        raise QuantizationError(
            f"calibration examples have shape {arr.shape[1:]}, the model's input takes "
            f"examples of shape ({takes})"
        )
    with np.errstate(over="ignore"):  # values beyond float32 become inf, refused below
        out = np.ascontiguousarray(arr, dtype=np.float32)
    if not np.isfinite(out).all():
        raise QuantizationError("calibration data contains NaN or infinity (after float32 cast)")
    return out


def _fits(example: tuple[int, ...], dims: tuple[int | None, ...]) -> bool:
    """Whether an example shape has the rank of ``dims`` and its static sizes."""
    return len(example) == len(dims) and all(
        want is None or want == got for want, got in zip(dims, example, strict=True)
    )


def _import_quantization() -> Any:
    """Import ``onnxruntime.quantization`` (and its pre-processing module).

    Raises:
        QuantizationError: it cannot be imported.
    """
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            import onnxruntime.quantization  # noqa: PLC0415 - heavy, coordinator-only
            import onnxruntime.quantization.shape_inference  # noqa: PLC0415
    except ImportError as exc:
        raise QuantizationError(
            f"quantization needs onnxruntime and onnx; {_INSTALL_HINT} ({exc})"
        ) from exc
    _relog(caught)
    return onnxruntime.quantization


def _prune_opset_imports(model: bytes) -> bytes:
    """Drop opset imports of domains that no node uses.

    onnxruntime's optimizer (run by ``quant_pre_process``) stamps every domain it
    knows (``ai.onnx.ml``, ``com.microsoft.nchwc``, ``org.pytorch.aten`` ...) on the
    model. Older onnxruntime releases on devices may not know those versions, and a
    device should not need them, so only the domains the graph uses are kept.

    Raises:
        QuantizationError: the quantizer's output cannot be parsed.
    """
    proto = _parse_quantized(model)
    used: set[str] = {"", "ai.onnx"}
    graphs = [proto.graph]
    nodes = [node for function in proto.functions for node in function.node]
    used.update(function.domain for function in proto.functions)
    while graphs:
        graph = graphs.pop()
        nodes.extend(graph.node)
        while nodes:
            node = nodes.pop()
            used.add(node.domain)
            for attr in node.attribute:
                graphs.extend([attr.g] if attr.HasField("g") else [])
                graphs.extend(attr.graphs)
    keep = [opset for opset in proto.opset_import if opset.domain in used]
    if len(keep) == len(proto.opset_import):
        return model
    del proto.opset_import[:]
    proto.opset_import.extend(keep)
    pruned: bytes = proto.SerializeToString()
    return pruned


def _unquantized_inputs(model: bytes, float_nodes: Collection[str]) -> bytes:
    """Feed the float nodes the float values their inputs had before quantization.

    The QDQ quantizer gives every consumer of a quantized activation ``T`` the
    round-tripped ``DequantizeLinear(QuantizeLinear(T))``, excluded nodes too, so a
    float head would still see values clipped to the calibration range (an anomaly
    score would compare a reconstruction with a clipped input). Each such input of a
    node in ``float_nodes`` is wired back to ``T``; ``QuantizeLinear`` /
    ``DequantizeLinear`` nodes left without consumers are removed.

    Raises:
        QuantizationError: the quantizer's output cannot be parsed.
    """
    proto = _parse_quantized(model)
    nodes = proto.graph.node
    producer = {out: node for node in nodes for out in node.output}
    for node in nodes:
        if node.name not in float_nodes:
            continue
        for i, name in enumerate(node.input):
            dq = producer.get(name)
            q = (
                producer.get(dq.input[0])
                if dq is not None and dq.op_type == "DequantizeLinear"
                else None
            )
            if q is not None and q.op_type == "QuantizeLinear":
                node.input[i] = q.input[0]
    outputs = {out.name for out in proto.graph.output}
    while True:
        used = outputs | {name for node in nodes for name in node.input}
        dead = [
            node
            for node in nodes
            if node.op_type in {"QuantizeLinear", "DequantizeLinear"}
            and not any(out in used for out in node.output)
        ]
        if not dead:
            break
        for node in dead:
            nodes.remove(node)
    rewired: bytes = proto.SerializeToString()
    return rewired


def _check_loads(model: bytes, what: str) -> None:
    """Make sure onnxruntime (CPU) can load ``model``.

    ``quant_pre_process`` only logs a failure of its optimization step and carries on,
    and the quantizer passes operators it does not know through unchanged, so without
    this check a model that no device could load would be returned.

    Raises:
        QuantizationError: onnxruntime cannot load ``model``.
    """
    import onnxruntime  # noqa: PLC0415 - imported by _import_quantization already

    options = onnxruntime.SessionOptions()
    options.log_severity_level = _ORT_LOG_FATAL
    options.intra_op_num_threads = 1
    try:
        onnxruntime.InferenceSession(model, options, providers=["CPUExecutionProvider"])
    except Exception as exc:  # onnxruntime's exceptions derive from Exception only
        raise QuantizationError(f"onnxruntime cannot load {what}: {one_line(exc)}") from exc


def _run(step: str, func: Callable[..., object], *args: object, **kwargs: object) -> None:
    """Call an onnxruntime quantization function, translating its failures.

    Python warnings it raises are re-logged at DEBUG level (see the module docstring).

    Raises:
        QuantizationError: ``func`` raised anything.
    """
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            func(*args, **kwargs)
        except Exception as exc:  # onnxruntime raises assorted types
            raise QuantizationError(f"{step} failed: {one_line(exc)}") from exc
        finally:
            _relog(caught)


def _relog(caught: list[warnings.WarningMessage]) -> None:
    for item in caught:
        logger.debug(
            "onnxruntime quantization warning: %s: %s", item.category.__name__, item.message
        )
