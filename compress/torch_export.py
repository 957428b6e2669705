"""Export a PyTorch model to ONNX with the output its task deploys.

At the end of a federated run the coordinator holds the global ``nn.Module``; devices
run ONNX. :func:`export_torch_onnx` wraps the module in the head its task needs and
exports it::

    nn.Module --wrap for the task--> torch.onnx (TorchScript exporter, opset 17)
        --> onnx.checker --> onnxruntime runs it and matches torch --> ONNX bytes
        --quantize_int8()--> int8 ONNX --(gate, sign, package, roll out)

What the deployed model outputs (:data:`OUTPUT_NAMES`), for an input named
``"input"``, float32 ``(batch, *sample_shape)`` with a symbolic batch dimension:

* ``classification``: ``probabilities`` ``(batch, classes)``, a softmax over the
  module's logits (like the built-in families);
* ``regression``: ``prediction``, what the module returns (``(batch,)`` or
  ``(batch, k)``);
* ``reconstruction``: ``anomaly_score`` ``(batch,)``, the mean over every value of an
  example of ``(reconstruction - input) ** 2``. The module may return its
  reconstruction in the input's shape or flattened: both are compared flat.

The exporter. ``torch.onnx.export(..., dynamo=False)`` (the TorchScript tracer) needs
nothing beyond torch and onnx; the newer ``torch.export``-based exporter also needs
the ``onnxscript`` package, which fedge does not depend on. The TorchScript exporter
is deprecated in torch >= 2.9 and warns so; that warning and the exporter's others
are recorded and re-logged at DEBUG level on this module's logger. The module is
traced with a batch of two zero examples in ``eval()`` mode (dropout off, BatchNorm
using its running statistics); its training flag is restored afterwards.

The head's nodes are named with the prefix :data:`HEAD_PREFIX` (:func:`head_nodes`
lists them), so that int8 quantization can keep them in float.

Checks, because a model that no device can run must not reach packaging: the module
must run on the sample shape and give an output that fits the task; the ONNX model
must pass ``onnx.checker``; onnxruntime must load it and reproduce torch's output on
a seeded random batch within a tolerance of ``1e-4`` (absolute) + ``1e-3``
(relative). The IR version is lowered to the oldest the opset allows, so that older
onnxruntime releases on devices load the file.

``torch``, ``onnx`` and ``onnxruntime`` are imported inside the functions: devices
import :mod:`compress` with numpy and cryptography only. Every failure is a
:class:`compress.errors.ExportError` with a one-line message.
"""

from __future__ import annotations

import io
import logging
import math
import warnings
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import numpy.typing as npt

from compress.errors import ExportError, one_line
from compress.families import INPUT_NAME
from compress.onnx_export import BATCH_DIM, MIN_OPSET

if TYPE_CHECKING:
    import torch

__all__ = ["HEAD_PREFIX", "OUTPUT_NAMES", "ModelTask", "export_torch_onnx", "head_nodes"]

logger = logging.getLogger(__name__)

ModelTask = Literal["classification", "regression", "reconstruction"]
"""The tasks of a torch model: the same literal as
``edge_agent.training.model_spec.ModelTask`` (which :mod:`compress` cannot import)."""

OUTPUT_NAMES: Mapping[ModelTask, str] = {
    "classification": "probabilities",
    "regression": "prediction",
    "reconstruction": "anomaly_score",
}
"""The exported model's output name for each task."""

HEAD_PREFIX = "fedge_head"
"""Name prefix of the task head's nodes in an exported model (see :func:`head_nodes`)."""

_MODULE_SCOPE = "/model/"
"""Name prefix the exporter gives the wrapped module's nodes (the head's attribute)."""

_TRACE_ROWS = 2
"""Examples in the tracing batch: more than one, so that no size-1 shortcut is traced."""

_CHECK_ROWS = 3
"""Examples in the batch that onnxruntime must reproduce torch's output on."""

_ATOL, _RTOL = 1e-4, 1e-3
_ORT_LOG_FATAL = 4
_INSTALL_HINT = "install it with `pip install 'fedge[torch,coordinator]'`"


def export_torch_onnx(
    module: torch.nn.Module, sample_shape: tuple[int, ...], task: ModelTask, *, opset: int = 17
) -> bytes:
    """Export ``module`` with its task's output head to a serialized ONNX model.

    Args:
        module: The trained model; not modified (its training flag is restored).
        sample_shape: The shape of one example, without the batch dimension, e.g.
            ``(1, 28, 28)`` for images or ``(features,)`` for rows.
        task: ``"classification"``, ``"regression"`` or ``"reconstruction"``.
        opset: The ``ai.onnx`` opset, at least
            :data:`compress.onnx_export.MIN_OPSET`.

    Returns:
        The ONNX model: input ``"input"`` float32 ``(batch, *sample_shape)``, output
        ``OUTPUT_NAMES[task]`` (see the module docstring).

    Raises:
        ExportError: torch, onnx or onnxruntime is missing; bad arguments; the
            module fails on the sample shape or its output does not fit the task;
            the exporter fails; or the ONNX model does not check, load or reproduce
            the module's output.
    """
    torch = _import_torch()
    shape = _check_arguments(torch, module, sample_shape, task, opset)
    head = _head(torch, module, task)
    was_training = module.training
    module.eval()
    try:
        rng = np.random.default_rng(0)
        check_input = rng.standard_normal((_CHECK_ROWS, *shape)).astype(np.float32)
        with torch.no_grad():
            try:
                _check_output(module(torch.zeros((_TRACE_ROWS, *shape))), task, shape)
                expected = head(torch.from_numpy(check_input)).numpy()
            except ExportError:
                raise
            except Exception as exc:  # whatever the user's forward raises
                raise ExportError(
                    f"the module fails on a batch of shape (n, {', '.join(map(str, shape))}):"
                    f" {one_line(exc)}"
                ) from exc
        data = _export(torch, head, shape, task, opset)
    finally:
        module.train(was_training)
    data = _check_model(data, opset, task)
    _check_reproduces(data, task, check_input, expected)
    logger.debug("exported %s model %s to ONNX: %d bytes", task, type(module).__name__, len(data))
    return data


def _import_torch() -> Any:
    """Import and return ``torch``.

    Raises:
        ExportError: torch is not installed.
    """
    try:
        import torch  # noqa: PLC0415 - optional and heavy, imported lazily on purpose
    except ImportError as exc:
        raise ExportError(f"exporting a PyTorch model needs torch; {_INSTALL_HINT}") from exc
    return torch


def _check_arguments(
    torch: Any, module: object, sample_shape: object, task: object, opset: object
) -> tuple[int, ...]:
    """Validate the arguments of :func:`export_torch_onnx`; return the sample shape.

    Raises:
        ExportError: any argument is of the wrong type or out of range.
    """
    if not isinstance(module, torch.nn.Module):
        raise ExportError(f"expected a torch.nn.Module, got {type(module).__name__}")
    if task not in OUTPUT_NAMES:
        raise ExportError(f"unknown task {task!r}; expected one of {', '.join(OUTPUT_NAMES)}")
    if (
        not isinstance(sample_shape, tuple)
        or not sample_shape
        or not all(isinstance(d, int) and not isinstance(d, bool) and d > 0 for d in sample_shape)
    ):
        raise ExportError(
            f"sample_shape must be a non-empty tuple of positive integers, got {sample_shape!r}"
        )
    if isinstance(opset, bool) or not isinstance(opset, int) or opset < MIN_OPSET:
        raise ExportError(f"opset must be an integer >= {MIN_OPSET}, got {opset!r}")
    return sample_shape


def _head(torch: Any, module: torch.nn.Module, task: ModelTask) -> torch.nn.Module:
    """``module`` wrapped so that its output is the task's deployed output."""

    class Classify(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.softmax(self.model(x), dim=-1)

    class AnomalyScore(torch.nn.Module):  # type: ignore[misc]
        def __init__(self) -> None:
            super().__init__()
            self.model = module

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            error = self.model(x).flatten(1) - x.flatten(1)
            return (error * error).mean(dim=1)

    if task == "classification":
        return Classify()
    if task == "reconstruction":
        return AnomalyScore()
    return module


def _check_output(output: object, task: ModelTask, shape: tuple[int, ...]) -> None:
    """Refuse the module's output on a tracing batch when it does not fit the task.

    Raises:
        ExportError: not one float tensor with a row per example, classification
            scores that are not ``(batch, classes)``, or a reconstruction whose size
            per example differs from the input's.
    """
    import torch  # noqa: PLC0415 - already imported by the caller

    if not isinstance(output, torch.Tensor) or not output.is_floating_point():
        raise ExportError(f"the module must return one float tensor, got {type(output).__name__}")
    if output.ndim == 0 or output.shape[0] != _TRACE_ROWS:
        raise ExportError(
            f"the module's output {tuple(output.shape)} has no row per example "
            f"(input batch of {_TRACE_ROWS})"
        )
    if task == "classification" and output.ndim != 2:
        raise ExportError(
            f"a classifier must return logits (batch, classes), got {tuple(output.shape)}"
        )
    if task == "regression" and output.ndim > 2:
        raise ExportError(
            f"a regressor must return (batch,) or (batch, outputs), got {tuple(output.shape)}"
        )
    if task == "reconstruction" and output[0].numel() != math.prod(shape):
        raise ExportError(
            f"an autoencoder must return a reconstruction of the input {shape} (or as many "
            f"values flattened), got {tuple(output.shape[1:])} per example"
        )


def _export(
    torch: Any, head: torch.nn.Module, shape: tuple[int, ...], task: ModelTask, opset: int
) -> bytes:
    """Run the TorchScript exporter; its warnings are re-logged at DEBUG.

    Raises:
        ExportError: the exporter fails.
    """
    output_name = OUTPUT_NAMES[task]
    buffer = io.BytesIO()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            torch.onnx.export(
                head,
                (torch.zeros((_TRACE_ROWS, *shape)),),
                buffer,
                input_names=[INPUT_NAME],
                output_names=[output_name],
                dynamic_axes={INPUT_NAME: {0: BATCH_DIM}, output_name: {0: BATCH_DIM}},
                opset_version=opset,
                do_constant_folding=True,
                dynamo=False,
            )
        except Exception as exc:  # the exporter raises assorted types
            raise ExportError(f"torch.onnx.export failed: {one_line(exc)}") from exc
        finally:
            for item in caught:
                logger.debug("torch.onnx warning: %s: %s", item.category.__name__, item.message)
    return buffer.getvalue()


def head_nodes(model: bytes) -> tuple[str, ...]:
    """Names of the nodes of the task head in a model from :func:`export_torch_onnx`.

    The softmax of a classifier and the anomaly score of an autoencoder; none for a
    regressor. Quantization keeps them in float
    (``quantize_int8(..., float_nodes=head_nodes(model))``): the score's range on
    anomalies is not in normal calibration data, and probabilities keep their
    precision.

    Raises:
        ExportError: ``model`` is not a parsable ONNX model.
    """
    onnx = _import_onnx()
    try:
        proto = onnx.load_model_from_string(model)
    except Exception as exc:  # protobuf raises assorted types
        raise ExportError(f"not an ONNX model: {one_line(exc)}") from exc
    return tuple(node.name for node in proto.graph.node if node.name.startswith(HEAD_PREFIX))


def _import_onnx() -> Any:
    """Import and return ``onnx`` (with its checker).

    Raises:
        ExportError: onnx is not installed.
    """
    try:
        import onnx  # noqa: PLC0415 - optional dependency, imported lazily on purpose
        import onnx.checker  # noqa: PLC0415
    except ImportError as exc:
        raise ExportError(f"exporting to ONNX needs the 'onnx' package; {_INSTALL_HINT}") from exc
    return onnx


def _mark_head(model: Any, task: ModelTask) -> None:
    """Prefix the head's node names with :data:`HEAD_PREFIX`.

    The exporter names nodes by module scope: the wrapped module's under
    ``/model/``, the head's at the top. Nothing is marked (with a warning) if no
    node carries the module's scope, e.g. if a torch release names nodes otherwise.
    """
    if task == "regression":
        return
    if not any(node.name.startswith(_MODULE_SCOPE) for node in model.graph.node):
        logger.warning("cannot tell the %s head from the module in the export", task)
        return
    for node in model.graph.node:
        if not node.name.startswith(_MODULE_SCOPE):
            node.name = HEAD_PREFIX + node.name


def _check_model(data: bytes, opset: int, task: ModelTask) -> bytes:
    """Check the exported model, mark its head and lower its IR version.

    The IR version becomes the oldest its opsets allow.

    Raises:
        ExportError: onnx is missing or the model fails ``onnx.checker``.
    """
    onnx = _import_onnx()
    try:
        model = onnx.load_model_from_string(data)
        _mark_head(model, task)
        model.ir_version = int(onnx.helper.find_min_ir_version_for(list(model.opset_import)))
        onnx.checker.check_model(model, full_check=True)
    except Exception as exc:  # onnx and protobuf raise assorted types
        raise ExportError(f"the exported model fails the ONNX checker: {one_line(exc)}") from exc
    logger.debug("exported ONNX model: opset %d, IR version %d", opset, model.ir_version)
    checked: bytes = model.SerializeToString()
    return checked


def _check_reproduces(
    data: bytes, task: ModelTask, x: npt.NDArray[np.float32], expected: npt.NDArray[np.float32]
) -> None:
    """Run the ONNX model in onnxruntime and compare with torch's output.

    Raises:
        ExportError: onnxruntime is missing, cannot load or run the model, or its
            output differs from ``expected``.
    """
    try:
        import onnxruntime  # noqa: PLC0415 - coordinator-side dependency
    except ImportError as exc:
        raise ExportError(f"checking the export needs onnxruntime; {_INSTALL_HINT}") from exc
    options = onnxruntime.SessionOptions()
    options.log_severity_level = _ORT_LOG_FATAL
    options.intra_op_num_threads = 1
    try:
        session = onnxruntime.InferenceSession(data, options, providers=["CPUExecutionProvider"])
        (got,) = session.run([OUTPUT_NAMES[task]], {INPUT_NAME: x})
    except Exception as exc:  # onnxruntime's exceptions derive from Exception only
        raise ExportError(f"onnxruntime cannot run the exported model: {one_line(exc)}") from exc
    got = np.asarray(got)
    if got.shape != expected.shape or not np.allclose(got, expected, atol=_ATOL, rtol=_RTOL):
        worst = float(np.max(np.abs(got - expected))) if got.shape == expected.shape else math.inf
        raise ExportError(
            f"the exported model's {OUTPUT_NAMES[task]} differ from torch's "
            f"(shapes {got.shape} vs {expected.shape}, largest difference {worst:.3g})"
        )
