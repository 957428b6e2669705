"""The TFLite adapter: run ``.tflite`` models with LiteRT (or tflite-runtime).

Workflow::

    model = TfliteModel.from_bytes(verified_payload, threads=1)
    model.inputs, model.outputs           # TensorInfo, dynamic dims from shape_signature
    probabilities = model.predict(batch)   # or model.run({"input": batch})

The interpreter comes from ``ai_edge_litert`` (the ``fedge[tflite]`` extra) or, where
that is what a device has, from ``tflite_runtime`` (which needs numpy < 2); both are
imported only when a TFLite model is loaded, so devices without them run ONNX models
as before. A model whose batch dimension is dynamic (``shape_signature`` -1, as
:func:`compress.tflite_export.export_tflite` writes) accepts any batch size: the input
is resized and tensors re-allocated when the batch size changes.

A TFLite interpreter is not thread-safe, so :meth:`TfliteModel.run` holds a lock.
Every failure (no runtime installed, invalid model bytes, wrong input name, dtype or
shape, a kernel error) surfaces as :class:`edge_agent.errors.ModelRuntimeError`.
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import threading
from collections.abc import Mapping
from typing import Any

import numpy as np

from compress.errors import one_line
from edge_agent.errors import ModelRuntimeError
from edge_agent.runtime.base import EngineModel, TensorInfo, check_feeds, check_load_args

__all__ = ["TFLITE_MODULES", "TfliteModel", "tflite_available"]

logger = logging.getLogger(__name__)

#: Interpreter modules tried in order.
TFLITE_MODULES = ("ai_edge_litert.interpreter", "tflite_runtime.interpreter")


def _interpreter_class() -> Any:
    """The first importable TFLite ``Interpreter`` class.

    Raises:
        ModelRuntimeError: neither LiteRT nor tflite-runtime is installed.
    """
    for name in TFLITE_MODULES:
        try:
            return importlib.import_module(name).Interpreter
        except ImportError:
            continue
    raise ModelRuntimeError(
        "no TFLite runtime is installed: pip install 'fedge[tflite]' (or tflite-runtime)"
    )


def tflite_available() -> bool:
    """True if a TFLite interpreter can be imported on this device."""
    return any(importlib.util.find_spec(name.split(".")[0]) is not None for name in TFLITE_MODULES)


def _tensor_info(detail: Mapping[str, Any]) -> TensorInfo:
    signature = detail.get("shape_signature")
    dims = signature if signature is not None and len(signature) else detail["shape"]
    shape = tuple(int(d) if int(d) >= 0 else None for d in dims)
    return TensorInfo(name=str(detail["name"]), shape=shape, dtype=np.dtype(detail["dtype"]).name)


class TfliteModel(EngineModel):
    """A model loaded into a TFLite interpreter. Create with :meth:`from_bytes`."""

    def __init__(self, interpreter: Any) -> None:
        """Wrap an interpreter whose tensors are allocated; prefer :meth:`from_bytes`."""
        self._interpreter = interpreter
        self._lock = threading.Lock()
        self._input_details = list(interpreter.get_input_details())
        self._output_details = list(interpreter.get_output_details())
        super().__init__(
            [_tensor_info(d) for d in self._input_details],
            [_tensor_info(d) for d in self._output_details],
        )

    @classmethod
    def from_bytes(cls, model: bytes, *, threads: int = 1) -> TfliteModel:
        """Load a serialized TFLite model.

        Raises:
            ModelRuntimeError: no TFLite runtime, bad ``threads``, or a model the
                interpreter cannot load.
        """
        blob = check_load_args(model, threads)
        interpreter_class = _interpreter_class()
        try:
            interpreter = interpreter_class(model_content=blob, num_threads=threads)
            interpreter.allocate_tensors()
        except Exception as exc:  # the interpreter raises ValueError/RuntimeError and more
            raise ModelRuntimeError(f"TFLite cannot load the model: {one_line(exc)}") from exc
        runtime = cls(interpreter)
        logger.debug(
            "loaded TFLite model (%d bytes): inputs %s, outputs %s",
            len(model),
            runtime.inputs,
            runtime.outputs,
        )
        return runtime

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        """Run the model once (see :meth:`ModelRuntime.run`).

        Raises:
            ModelRuntimeError: missing or unknown inputs, wrong dtype or shape, or the
                interpreter failed.
        """
        prepared = check_feeds(self._inputs, feeds)
        with self._lock:
            try:
                resized = False
                for detail in self._input_details:
                    array = prepared[detail["name"]]
                    current = self._interpreter.get_input_details()
                    now = next(d["shape"] for d in current if d["index"] == detail["index"])
                    if tuple(now) != array.shape:
                        self._interpreter.resize_tensor_input(detail["index"], array.shape)
                        resized = True
                if resized:
                    self._interpreter.allocate_tensors()
                for detail in self._input_details:
                    self._interpreter.set_tensor(
                        detail["index"], np.ascontiguousarray(prepared[detail["name"]])
                    )
                self._interpreter.invoke()
                return {
                    str(d["name"]): np.array(self._interpreter.get_tensor(d["index"]))
                    for d in self._output_details
                }
            except Exception as exc:  # the interpreter raises ValueError/RuntimeError
                raise ModelRuntimeError(f"inference failed: {one_line(exc)}") from exc
