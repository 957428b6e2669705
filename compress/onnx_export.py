"""Export a built-in model family's weights to ONNX.

The coordinator ends a federated run with a flat mapping of weights
(``W0, b0, W1, b1, ...``, see :mod:`compress.families`). Deployment needs a model
file that the device's runtime loads, so :func:`export_onnx` turns those weights into
a serialized ONNX ``ModelProto``::

    weights --dense_layers()--> [DenseLayer, ...] --export_onnx()--> ONNX bytes
        --quantize_int8()--> int8 ONNX bytes --(sign, package, roll out)

The graph uses only standard ``ai.onnx`` operators, one chain per dense layer::

    input[batch, n_features] -> MatMul(W0) -> Add(b0) -> Relu -> ... ->
        MatMul(W{n-1}) -> Add(b{n-1}) -> Softmax(axis=-1) -> probabilities[batch, n_classes]

``MatMul`` + ``Add`` (rather than ``Gemm``) is deliberate: onnxruntime's *dynamic*
quantizer handles ``MatMul`` but not ``Gemm``, and its static (QDQ) quantizer handles
both. The batch dimension is symbolic (``"batch"``), so one file serves any batch size.

The ``onnx`` package is a coordinator-side dependency (``fedge[coordinator]``); it is
imported inside :func:`export_onnx` so that :mod:`compress` imports with only numpy and
cryptography installed, as devices need.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import numpy.typing as npt

from compress.errors import ExportError
from compress.families import INPUT_NAME, OUTPUT_NAME, dense_layers

__all__ = ["BATCH_DIM", "MIN_OPSET", "export_onnx"]

BATCH_DIM = "batch"
"""Name of the symbolic batch dimension of the input and output."""

MIN_OPSET = 13
"""Lowest opset accepted: ``Softmax(axis=-1)`` has row-wise semantics from opset 13 on."""

_PRODUCER = "fedge"


def export_onnx(family: str, weights: Mapping[str, npt.ArrayLike], *, opset: int = 17) -> bytes:
    """Export a built-in family's weights to a serialized ONNX model.

    Args:
        family: A built-in family name (``"softmax"`` or ``"mlp"``).
        weights: The family's weights, ``W0, b0, ...`` (validated by
            :func:`compress.families.dense_layers`).
        opset: The ``ai.onnx`` opset to target, at least :data:`MIN_OPSET`.

    Returns:
        The serialized ``ModelProto``: input :data:`compress.families.INPUT_NAME`
        (float32, ``[batch, n_features]``), output
        :data:`compress.families.OUTPUT_NAME` (float32, ``[batch, n_classes]``).

    Raises:
        FamilyError: ``family`` is unknown or ``weights`` do not fit it.
        ExportError: the ``onnx`` package is not installed, ``opset`` is out of
            range, or the built model fails ``onnx.checker``.
    """
    layers = dense_layers(family, weights)
    onnx = _import_onnx()
    if not isinstance(opset, int) or isinstance(opset, bool):
        raise ExportError(f"opset must be an integer, got {opset!r}")
    max_opset = int(onnx.defs.onnx_opset_version())
    if not MIN_OPSET <= opset <= max_opset:
        raise ExportError(f"opset {opset} is not supported; choose one in {MIN_OPSET}..{max_opset}")

    helper = onnx.helper
    numpy_helper = onnx.numpy_helper
    float_type = onnx.TensorProto.FLOAT

    initializers: list[Any] = []
    nodes: list[Any] = []
    current = INPUT_NAME
    last = len(layers) - 1
    for i, layer in enumerate(layers):
        w_name, b_name = f"W{i}", f"b{i}"
        initializers.append(numpy_helper.from_array(layer.weight, name=w_name))
        initializers.append(numpy_helper.from_array(layer.bias, name=b_name))
        matmul_out, logits = f"dense{i}_matmul", f"dense{i}_logits"
        nodes.append(helper.make_node("MatMul", [current, w_name], [matmul_out], name=f"MatMul{i}"))
        nodes.append(helper.make_node("Add", [matmul_out, b_name], [logits], name=f"Add{i}"))
        if i < last:
            activated = f"dense{i}_relu"
            nodes.append(helper.make_node("Relu", [logits], [activated], name=f"Relu{i}"))
            current = activated
        else:
            nodes.append(
                helper.make_node("Softmax", [logits], [OUTPUT_NAME], name="Softmax", axis=-1)
            )

    graph = helper.make_graph(
        nodes,
        f"fedge_{family}",
        inputs=[
            helper.make_tensor_value_info(INPUT_NAME, float_type, [BATCH_DIM, layers[0].fan_in])
        ],
        outputs=[
            helper.make_tensor_value_info(OUTPUT_NAME, float_type, [BATCH_DIM, layers[-1].fan_out])
        ],
        initializer=initializers,
    )
    model = helper.make_model(
        graph,
        opset_imports=[helper.make_opsetid("", opset)],
        producer_name=_PRODUCER,
        doc_string=f"fedge built-in family {family!r}",
    )
    # Keep the IR version as old as the opset allows so that older onnxruntime
    # releases on devices (>= 1.17, see pyproject) can load the file.
    model.ir_version = int(helper.find_min_ir_version_for(list(model.opset_import)))
    try:
        onnx.checker.check_model(model, full_check=True)
    except (onnx.checker.ValidationError, onnx.shape_inference.InferenceError) as exc:
        raise ExportError(f"exported {family} model failed the ONNX checker: {exc}") from exc
    data: bytes = model.SerializeToString()
    return data


def _import_onnx() -> Any:
    """Import and return the ``onnx`` package.

    Raises:
        ExportError: ``onnx`` is not installed.
    """
    try:
        import onnx  # noqa: PLC0415 - optional dependency, imported lazily on purpose
        import onnx.checker  # noqa: PLC0415
        import onnx.numpy_helper  # noqa: PLC0415
        import onnx.shape_inference  # noqa: PLC0415
    except ImportError as exc:
        raise ExportError(
            "exporting to ONNX needs the 'onnx' package; install it with "
            "`pip install 'fedge[coordinator]'`"
        ) from exc
    return onnx
