"""The onnxruntime adapter: run ONNX models (float32 or int8) on the device.

Workflow::

    model = OnnxRuntimeModel.from_bytes(verified_payload, threads=1)
    model.inputs, model.outputs          # TensorInfo: check the model fits
    probabilities = model.predict(batch)  # or model.run({"input": batch})

``from_bytes`` builds an ``onnxruntime.InferenceSession`` on the CPU execution
provider with a fixed number of intra-op threads (devices share their cores with the
agent's other work; one thread is the predictable default), sequential execution,
and the engine's own logging limited to fatal messages: a device's journal is not
flooded, and errors are not logged twice since each one reaches the caller as an
exception.

Every onnxruntime failure (invalid model bytes, unsupported operators, wrong input
name, dtype or shape, a kernel error) surfaces as
:class:`edge_agent.errors.ModelRuntimeError` with a one-line message. Inputs are
checked against the model's declared names, dtypes and static dimensions before
they reach onnxruntime, so the common mistakes get precise messages.

Only tensor inputs and outputs are supported (fedge's runtimes exchange numpy
arrays); a model with sequence or map outputs (e.g. sklearn-onnx's ``ZipMap``) is
refused at load time.

Only ``onnxruntime`` and numpy are imported: the ``onnx`` package is not needed on
devices.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import numpy as np
import onnxruntime as ort

from compress.errors import one_line
from edge_agent.errors import ModelRuntimeError
from edge_agent.runtime.base import EngineModel, TensorInfo, check_feeds, check_load_args

__all__ = ["OnnxRuntimeModel"]

logger = logging.getLogger(__name__)

_PROVIDERS = ["CPUExecutionProvider"]
# onnxruntime: 0 verbose, 1 info, 2 warning, 3 error, 4 fatal. Errors are not logged by
# the engine because every one of them reaches the caller as a ModelRuntimeError.
_LOG_SEVERITY = 4

# onnxruntime's type strings -> numpy dtype names.
_DTYPES = {
    "tensor(float)": "float32",
    "tensor(double)": "float64",
    "tensor(float16)": "float16",
    "tensor(int8)": "int8",
    "tensor(int16)": "int16",
    "tensor(int32)": "int32",
    "tensor(int64)": "int64",
    "tensor(uint8)": "uint8",
    "tensor(uint16)": "uint16",
    "tensor(uint32)": "uint32",
    "tensor(uint64)": "uint64",
    "tensor(bool)": "bool",
}


class OnnxRuntimeModel(EngineModel):
    """A model loaded into an onnxruntime ``InferenceSession`` (CPU).

    Create instances with :meth:`from_bytes`. Safe to share between threads
    (``InferenceSession.run`` is thread-safe).
    """

    def __init__(self, session: Any) -> None:
        """Wrap an existing ``onnxruntime.InferenceSession``; prefer :meth:`from_bytes`.

        Raises:
            ModelRuntimeError: the session has non-tensor inputs or outputs, or
                tensors of a type numpy cannot hold.
        """
        super().__init__(
            [_tensor_info(arg, "input") for arg in session.get_inputs()],
            [_tensor_info(arg, "output") for arg in session.get_outputs()],
        )
        self._session = session
        self._output_names = [info.name for info in self._outputs]

    @classmethod
    def from_bytes(cls, model: bytes, *, threads: int = 1) -> OnnxRuntimeModel:
        """Load a serialized ONNX model.

        Args:
            model: The model file's bytes (already verified by the trust core).
            threads: Intra-op threads onnxruntime may use (``>= 1``).

        Returns:
            The loaded model.

        Raises:
            ModelRuntimeError: ``threads`` is not a positive integer, or onnxruntime
                cannot load the model (invalid bytes, unsupported operators or
                opset), or the model has non-tensor inputs or outputs.
        """
        blob = check_load_args(model, threads)
        options = ort.SessionOptions()
        options.intra_op_num_threads = threads
        options.inter_op_num_threads = 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = _LOG_SEVERITY
        try:
            session = ort.InferenceSession(blob, sess_options=options, providers=_PROVIDERS)
        except Exception as exc:  # onnxruntime's exceptions derive from Exception only
            raise ModelRuntimeError(f"onnxruntime cannot load the model: {one_line(exc)}") from exc
        runtime = cls(session)
        logger.debug(
            "loaded ONNX model (%d bytes, %d threads): inputs %s, outputs %s",
            len(model),
            threads,
            runtime.inputs,
            runtime.outputs,
        )
        return runtime

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once (see :meth:`ModelRuntime.run`).

        Raises:
            ModelRuntimeError: missing or unknown inputs, wrong dtype or shape, or
                onnxruntime failed.
        """
        prepared = check_feeds(self._inputs, feeds)
        try:
            results = self._session.run(self._output_names, prepared)
        except Exception as exc:  # onnxruntime's exceptions derive from Exception only
            raise ModelRuntimeError(f"inference failed: {one_line(exc)}") from exc
        return {
            name: np.asarray(value) for name, value in zip(self._output_names, results, strict=True)
        }


def _tensor_info(arg: Any, kind: str) -> TensorInfo:
    """A :class:`TensorInfo` from an onnxruntime ``NodeArg``.

    Raises:
        ModelRuntimeError: not a tensor of a type numpy can hold.
    """
    dtype = _DTYPES.get(str(arg.type))
    if dtype is None:
        raise ModelRuntimeError(
            f"{kind} {arg.name!r} has type {arg.type}; only numeric and bool tensors are supported"
        )
    shape = tuple(dim if isinstance(dim, int) and dim >= 0 else None for dim in arg.shape)
    return TensorInfo(name=str(arg.name), shape=shape, dtype=dtype)
