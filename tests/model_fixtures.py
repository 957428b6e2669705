"""Small models for runtime-level tests: a softmax ONNX model and a scriptable fake.

A test module takes the fixtures by binding them to its own names::

    from tests import model_fixtures

    weights = model_fixtures.weights
    runtime = model_fixtures.runtime
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import numpy as np
import pytest

from compress.families import FloatArray, init_weights
from compress.onnx_export import export_onnx
from edge_agent.runtime.base import EngineModel, TensorInfo
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel

N_FEATURES = 4
N_CLASSES = 3


def softmax_weights(seed: int = 0) -> dict[str, FloatArray]:
    """Random weights of an ``N_FEATURES`` -> ``N_CLASSES`` softmax model."""
    return init_weights("softmax", [N_FEATURES, N_CLASSES], np.random.default_rng(seed))


def softmax_runtime(weights: dict[str, FloatArray]) -> OnnxRuntimeModel:
    """The softmax model with ``weights``, exported to ONNX and loaded in onnxruntime."""
    return OnnxRuntimeModel.from_bytes(export_onnx("softmax", weights))


@pytest.fixture(scope="module")
def weights() -> dict[str, FloatArray]:
    """The weights of :func:`runtime`'s model (seed 0)."""
    return softmax_weights()


@pytest.fixture(scope="module")
def runtime(weights: dict[str, FloatArray]) -> OnnxRuntimeModel:
    """The softmax model with :func:`weights`, in onnxruntime."""
    return softmax_runtime(weights)


class FakeRuntime(EngineModel):
    """A runtime whose run() is a plain function."""

    def __init__(
        self,
        run: Callable[[Mapping[str, np.ndarray]], dict[str, np.ndarray]],
        inputs: list[TensorInfo] | None = None,
        outputs: list[TensorInfo] | None = None,
    ) -> None:
        super().__init__(
            inputs or [TensorInfo("x", (None, 2), "float32")],
            outputs or [TensorInfo("y", (None, 2), "float32")],
        )
        self._run = run

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return self._run(feeds)
