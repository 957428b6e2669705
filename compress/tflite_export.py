"""Export a built-in family's weights to a TFLite model, without TensorFlow.

A ``.tflite`` file is a FlatBuffer of the TFLite schema (``schema.fbs``, file
identifier ``TFL3``). The built-in families are a chain of dense layers, so their
graph is small enough to write table by table instead of converting a TensorFlow
graph: exporting needs no TensorFlow (hundreds of megabytes, and no wheels for many
of the machines fedge runs on), only the ``flatbuffers`` runtime and the Python
builder functions that FlatBuffers generated from the TFLite schema, which
``ai-edge-litert`` ships as ``ai_edge_litert.schema_py_generated``. Both come with the
optional ``tflite`` extra and are imported lazily, inside :func:`export_tflite`.

The workflow:

1. :func:`compress.families.dense_layers` validates the weights (one definition of a
   valid model for every consumer).
2. The graph is planned as plain values: tensors, constant buffers and operators.

   * Tensor ``0`` is the input, named :data:`compress.families.INPUT_NAME`, float32,
     shape ``[1, n_features]`` with shape signature ``[-1, n_features]`` so that a
     runtime may resize the batch (``resize_tensor_input``).
   * One ``FULLY_CONNECTED`` operator per dense layer, with inputs ``[x, W, b]``.
     TFLite stores FC weights as ``[out, in]``, so ``W`` (``(fan_in, fan_out)`` in
     fedge) is transposed. Hidden layers fuse a ``RELU``; the last layer fuses
     nothing and produces the logits.
   * One ``SOFTMAX`` operator (``beta = 1.0``) produces the output tensor, named
     :data:`compress.families.OUTPUT_NAME`.
   * Buffer ``0`` is the empty sentinel buffer that every non-constant tensor points
     to; each weight and bias has its own buffer of little-endian float32 bytes,
     aligned to 16 bytes in the file like the TFLite converter does.

3. The plan is serialized bottom-up with a ``flatbuffers.Builder``: buffers, tensors,
   operator codes, operators, the subgraph, then the root ``Model`` table
   (schema version 3), finished with the ``TFL3`` file identifier.

Only float32 is written; quantization of deployment models goes through ONNX.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from compress.errors import ExportError
from compress.families import INPUT_NAME, OUTPUT_NAME, DenseLayer, dense_layers

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 3
"""The TFLite schema version written in the ``Model`` table."""

FILE_IDENTIFIER = b"TFL3"
"""The FlatBuffers file identifier of TFLite models (bytes 4 to 8 of the file)."""

_DATA_ALIGNMENT = 16
_SUBGRAPH_NAME = "main"

_INSTALL_HINT = (
    "TFLite export needs the optional 'tflite' extra (flatbuffers and ai-edge-litert): "
    "pip install 'fedge[tflite]'"
)


@dataclass(frozen=True)
class _TensorSpec:
    """A tensor of the graph; ``buffer`` 0 means "no data" (not a constant)."""

    name: str
    shape: tuple[int, ...]
    buffer: int = 0
    batched: bool = False  # first dimension is the batch: -1 in shape_signature


@dataclass(frozen=True)
class _OperatorSpec:
    """An operator: a FULLY_CONNECTED (``relu`` fused or not) or the final SOFTMAX."""

    kind: Literal["fully_connected", "softmax"]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    relu: bool = False


@dataclass(frozen=True)
class _GraphPlan:
    """Everything the flatbuffer holds, as plain values."""

    tensors: list[_TensorSpec]
    buffers: list[bytes]  # buffers[0] is the empty sentinel
    operators: list[_OperatorSpec]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]


def export_tflite(family: str, weights: Mapping[str, npt.ArrayLike]) -> bytes:
    """Export a built-in family's weights to a float32 TFLite model.

    The model takes a float32 batch ``(n, n_features)`` named
    :data:`compress.families.INPUT_NAME` (declared ``[1, n_features]`` with a dynamic
    batch, so resize the input for other batch sizes) and returns the class
    probabilities named :data:`compress.families.OUTPUT_NAME`, the same values as
    :func:`compress.families.forward` up to float rounding.

    Args:
        family: a built-in family name (``"softmax"`` or ``"mlp"``).
        weights: the family's weights, ``W0, b0, W1, b1, ...`` (see
            :mod:`compress.families`).

    Returns:
        The bytes of a ``.tflite`` file.

    Raises:
        FamilyError: ``family`` is unknown or ``weights`` do not form a valid model
            of it.
        ExportError: the optional ``tflite`` extra (``flatbuffers``,
            ``ai-edge-litert``) is not installed, or the model could not be built.
    """
    layers = dense_layers(family, weights)
    try:
        import flatbuffers  # noqa: PLC0415  (optional extra)
        from ai_edge_litert import schema_py_generated as tfl  # noqa: PLC0415
    except (ImportError, OSError) as exc:
        raise ExportError(f"{_INSTALL_HINT} ({exc})") from exc

    plan = _plan_graph(layers)
    try:
        model = _serialize(flatbuffers, tfl, plan, description=f"fedge {family} model")
    except (ValueError, TypeError, AttributeError, OverflowError) as exc:
        raise ExportError(f"could not build the TFLite flatbuffer: {exc}") from exc
    logger.debug(
        "exported %s model to TFLite: %d layers, %d bytes", family, len(layers), len(model)
    )
    return model


def _float32_bytes(array: npt.NDArray[np.float32]) -> bytes:
    """Little-endian, C-ordered float32 bytes of ``array``."""
    return np.ascontiguousarray(array, dtype="<f4").tobytes()


def _plan_graph(layers: Sequence[DenseLayer]) -> _GraphPlan:
    """Lay out tensors, buffers and operators for a chain of dense layers."""
    tensors = [_TensorSpec(INPUT_NAME, (1, layers[0].fan_in), batched=True)]
    buffers = [b""]
    operators: list[_OperatorSpec] = []
    current = 0
    for i, layer in enumerate(layers):
        last = i == len(layers) - 1
        buffers.append(_float32_bytes(layer.weight.T))
        tensors.append(
            _TensorSpec(f"dense_{i}/weight", (layer.fan_out, layer.fan_in), len(buffers) - 1)
        )
        buffers.append(_float32_bytes(layer.bias))
        tensors.append(_TensorSpec(f"dense_{i}/bias", (layer.fan_out,), len(buffers) - 1))
        out_name = "logits" if last else f"dense_{i}/relu"
        tensors.append(_TensorSpec(out_name, (1, layer.fan_out), batched=True))
        out = len(tensors) - 1
        operators.append(
            _OperatorSpec("fully_connected", (current, out - 2, out - 1), (out,), relu=not last)
        )
        current = out
    tensors.append(_TensorSpec(OUTPUT_NAME, (1, layers[-1].fan_out), batched=True))
    output = len(tensors) - 1
    operators.append(_OperatorSpec("softmax", (current,), (output,)))
    return _GraphPlan(tensors, buffers, operators, inputs=(0,), outputs=(output,))


def _int32_vector(builder: Any, values: Sequence[int]) -> int:
    """Write a vector of int32 and return its offset."""
    offset: int = builder.CreateNumpyVector(np.asarray(values, dtype="<i4"))
    return offset


def _offset_vector(builder: Any, offsets: Sequence[int]) -> int:
    """Write a vector of table offsets (in order) and return its offset."""
    builder.StartVector(4, len(offsets), 4)
    for off in reversed(offsets):
        builder.PrependUOffsetTRelative(off)
    result: int = builder.EndVector()
    return result


def _write_buffer(builder: Any, tfl: Any, data: bytes) -> int:
    """Write a ``Buffer`` table; its data starts on a 16-byte boundary."""
    data_offset = None
    if data:
        # Pad so that the bytes end (they are written back to front) on the alignment.
        builder.Prep(_DATA_ALIGNMENT, len(data))
        data_offset = builder.CreateNumpyVector(np.frombuffer(data, dtype=np.uint8))
    tfl.BufferStart(builder)
    if data_offset is not None:
        tfl.BufferAddData(builder, data_offset)
    offset: int = tfl.BufferEnd(builder)
    return offset


def _write_tensor(builder: Any, tfl: Any, spec: _TensorSpec) -> int:
    """Write a float32 ``Tensor`` table."""
    name = builder.CreateString(spec.name)
    shape = _int32_vector(builder, spec.shape)
    signature = None
    if spec.batched:
        signature = _int32_vector(builder, (-1, *spec.shape[1:]))
    tfl.TensorStart(builder)
    tfl.TensorAddShape(builder, shape)
    tfl.TensorAddType(builder, tfl.TensorType.FLOAT32)
    tfl.TensorAddBuffer(builder, spec.buffer)
    tfl.TensorAddName(builder, name)
    if signature is not None:
        tfl.TensorAddShapeSignature(builder, signature)
    offset: int = tfl.TensorEnd(builder)
    return offset


def _write_operator_code(builder: Any, tfl: Any, builtin: int) -> int:
    """Write an ``OperatorCode`` for a builtin operator, version 1."""
    tfl.OperatorCodeStart(builder)
    # Readers of old schemas only see the int8 field; codes above 127 put 127 there.
    tfl.OperatorCodeAddDeprecatedBuiltinCode(builder, min(builtin, 127))
    tfl.OperatorCodeAddBuiltinCode(builder, builtin)
    tfl.OperatorCodeAddVersion(builder, 1)
    offset: int = tfl.OperatorCodeEnd(builder)
    return offset


def _write_operator(builder: Any, tfl: Any, spec: _OperatorSpec, opcode_index: int) -> int:
    """Write an ``Operator`` with its builtin options table."""
    inputs = _int32_vector(builder, spec.inputs)
    outputs = _int32_vector(builder, spec.outputs)
    if spec.kind == "fully_connected":
        tfl.FullyConnectedOptionsStart(builder)
        activation = (
            tfl.ActivationFunctionType.RELU if spec.relu else tfl.ActivationFunctionType.NONE
        )
        tfl.FullyConnectedOptionsAddFusedActivationFunction(builder, activation)
        options = tfl.FullyConnectedOptionsEnd(builder)
        options_type = tfl.BuiltinOptions.FullyConnectedOptions
    else:
        tfl.SoftmaxOptionsStart(builder)
        tfl.SoftmaxOptionsAddBeta(builder, 1.0)
        options = tfl.SoftmaxOptionsEnd(builder)
        options_type = tfl.BuiltinOptions.SoftmaxOptions
    tfl.OperatorStart(builder)
    tfl.OperatorAddOpcodeIndex(builder, opcode_index)
    tfl.OperatorAddInputs(builder, inputs)
    tfl.OperatorAddOutputs(builder, outputs)
    tfl.OperatorAddBuiltinOptionsType(builder, options_type)
    tfl.OperatorAddBuiltinOptions(builder, options)
    offset: int = tfl.OperatorEnd(builder)
    return offset


def _serialize(flatbuffers: Any, tfl: Any, plan: _GraphPlan, description: str) -> bytes:
    """Serialize ``plan`` into the bytes of a TFLite model."""
    size_hint = sum(len(b) + _DATA_ALIGNMENT for b in plan.buffers) + 1024
    builder = flatbuffers.Builder(size_hint)

    # Children before parents: a table can only refer to what is already written.
    buffers = [_write_buffer(builder, tfl, data) for data in plan.buffers]
    tensors = [_write_tensor(builder, tfl, spec) for spec in plan.tensors]

    builtin = {
        "fully_connected": tfl.BuiltinOperator.FULLY_CONNECTED,
        "softmax": tfl.BuiltinOperator.SOFTMAX,
    }
    kinds = list(dict.fromkeys(op.kind for op in plan.operators))
    opcode_index = {kind: i for i, kind in enumerate(kinds)}
    opcodes = [_write_operator_code(builder, tfl, builtin[kind]) for kind in kinds]
    operators = [_write_operator(builder, tfl, op, opcode_index[op.kind]) for op in plan.operators]

    tensors_vec = _offset_vector(builder, tensors)
    inputs_vec = _int32_vector(builder, plan.inputs)
    outputs_vec = _int32_vector(builder, plan.outputs)
    operators_vec = _offset_vector(builder, operators)
    subgraph_name = builder.CreateString(_SUBGRAPH_NAME)
    tfl.SubGraphStart(builder)
    tfl.SubGraphAddTensors(builder, tensors_vec)
    tfl.SubGraphAddInputs(builder, inputs_vec)
    tfl.SubGraphAddOutputs(builder, outputs_vec)
    tfl.SubGraphAddOperators(builder, operators_vec)
    tfl.SubGraphAddName(builder, subgraph_name)
    subgraph = tfl.SubGraphEnd(builder)

    opcodes_vec = _offset_vector(builder, opcodes)
    subgraphs_vec = _offset_vector(builder, [subgraph])
    buffers_vec = _offset_vector(builder, buffers)
    description_str = builder.CreateString(description)
    tfl.ModelStart(builder)
    tfl.ModelAddVersion(builder, SCHEMA_VERSION)
    tfl.ModelAddOperatorCodes(builder, opcodes_vec)
    tfl.ModelAddSubgraphs(builder, subgraphs_vec)
    tfl.ModelAddDescription(builder, description_str)
    tfl.ModelAddBuffers(builder, buffers_vec)
    model = tfl.ModelEnd(builder)
    builder.Finish(model, file_identifier=FILE_IDENTIFIER)
    return bytes(builder.Output())
