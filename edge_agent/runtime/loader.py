"""Pick the runtime adapter for a model format, and say which runtimes a device has.

The manifest's ``format`` names the model file type (``onnx``, ``tflite``);
:data:`compress.trust.RUNTIME_FOR_FORMAT` names the runtime each one needs. This module
is the one place that maps those names to adapter classes:

* :func:`load_model` loads verified model bytes with the right adapter;
* :func:`available_runtimes` lists the runtimes importable here, for the device
  profile the trust core checks a manifest against (``DeviceProfile.runtimes``).
"""

from __future__ import annotations

from compress.trust import RUNTIME_FOR_FORMAT
from edge_agent.errors import ModelRuntimeError
from edge_agent.runtime.base import ModelRuntime
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.runtime.tflite_runtime import TfliteModel, tflite_available

__all__ = ["available_runtimes", "load_model"]


def available_runtimes() -> frozenset[str]:
    """Runtime names (as in ``RUNTIME_FOR_FORMAT``) this device can use."""
    runtimes = {RUNTIME_FOR_FORMAT["onnx"]}
    if tflite_available():
        runtimes.add(RUNTIME_FOR_FORMAT["tflite"])
    return frozenset(runtimes)


def load_model(model_format: str, model: bytes, *, threads: int = 1) -> ModelRuntime:
    """Load model bytes of ``model_format`` with its runtime adapter.

    Raises:
        ModelRuntimeError: an unknown format, a missing runtime, or a model the
            runtime cannot load.
    """
    if model_format == "onnx":
        return OnnxRuntimeModel.from_bytes(model, threads=threads)
    if model_format == "tflite":
        return TfliteModel.from_bytes(model, threads=threads)
    raise ModelRuntimeError(f"no runtime for model format {model_format!r}")
