"""Tests for compress.onnx_export: exported models run in onnxruntime like numpy does."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import onnx
import pytest

from compress.errors import ExportError, FamilyError
from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, forward, init_weights
from compress.onnx_export import BATCH_DIM, MIN_OPSET, export_onnx
from edge_agent.runtime.base import TensorInfo
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel

CASES = [("softmax", [8, 3]), ("mlp", [16, 32, 5]), ("mlp", [16, 32, 32, 24, 5])]


def _weights(family: str, sizes: list[int], seed: int) -> dict[str, FloatArray]:
    """Seeded weights with non-zero biases, so the biases are exercised too."""
    rng = np.random.default_rng(seed)
    weights = init_weights(family, sizes, rng)
    for name, value in weights.items():
        if name.startswith("b"):
            weights[name] = (rng.standard_normal(value.shape) * 0.5).astype(np.float32)
    return weights


@pytest.mark.parametrize(("family", "sizes"), CASES)
@pytest.mark.parametrize("batch", [1, 7, 64])
def test_matches_numpy_forward(family: str, sizes: list[int], batch: int) -> None:
    weights = _weights(family, sizes, seed=3)
    runtime = OnnxRuntimeModel.from_bytes(export_onnx(family, weights))
    x = np.random.default_rng(4).standard_normal((batch, sizes[0])).astype(np.float32)

    got = runtime.predict(x)

    np.testing.assert_allclose(got, forward(family, weights, x), rtol=1e-5, atol=1e-6)
    assert got.dtype == np.float32


@pytest.mark.parametrize(("family", "sizes"), CASES)
def test_signature_and_standard_ops(family: str, sizes: list[int]) -> None:
    data = export_onnx(family, _weights(family, sizes, seed=0))
    model = onnx.load_model_from_string(data)

    assert {node.op_type for node in model.graph.node} <= {"MatMul", "Add", "Relu", "Softmax"}
    assert [(op.domain, op.version) for op in model.opset_import] == [("", 17)]
    (softmax,) = [node for node in model.graph.node if node.op_type == "Softmax"]
    assert onnx.helper.get_attribute_value(softmax.attribute[0]) == -1
    (inp,) = model.graph.input
    (out,) = model.graph.output
    assert inp.name == INPUT_NAME
    assert out.name == OUTPUT_NAME
    for value, width in ((inp, sizes[0]), (out, sizes[-1])):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
        batch_dim, feature_dim = value.type.tensor_type.shape.dim
        assert batch_dim.dim_param == BATCH_DIM
        assert feature_dim.dim_value == width
    n_layers = len(sizes) - 1
    assert sorted(init.name for init in model.graph.initializer) == sorted(
        f"{p}{i}" for i in range(n_layers) for p in "Wb"
    )
    runtime = OnnxRuntimeModel.from_bytes(data)
    assert runtime.inputs == [TensorInfo(INPUT_NAME, (None, sizes[0]), "float32")]
    assert runtime.outputs == [TensorInfo(OUTPUT_NAME, (None, sizes[-1]), "float32")]


def test_export_is_deterministic() -> None:
    weights = _weights("mlp", [6, 4, 3], seed=1)
    assert export_onnx("mlp", weights) == export_onnx("mlp", weights)


def test_accepts_float64_and_lists() -> None:
    weights = _weights("softmax", [4, 3], seed=2)
    as_lists = {name: value.astype(np.float64).tolist() for name, value in weights.items()}
    assert export_onnx("softmax", as_lists) == export_onnx("softmax", weights)


@pytest.mark.parametrize("opset", [MIN_OPSET, 17, 21])
def test_opsets(opset: int) -> None:
    weights = _weights("mlp", [5, 4, 3], seed=5)
    data = export_onnx("mlp", weights, opset=opset)
    model = onnx.load_model_from_string(data)
    assert model.opset_import[0].version == opset
    x = np.random.default_rng(6).standard_normal((3, 5)).astype(np.float32)
    got = OnnxRuntimeModel.from_bytes(data).predict(x)
    np.testing.assert_allclose(got, forward("mlp", weights, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("opset", [MIN_OPSET - 1, 10_000, True])
def test_bad_opset(opset: int) -> None:
    with pytest.raises(ExportError, match="opset"):
        export_onnx("softmax", _weights("softmax", [4, 3], seed=0), opset=opset)


@pytest.mark.parametrize(
    ("family", "weights"),
    [
        ("cnn", {"W0": np.ones((2, 2)), "b0": np.ones(2)}),
        ("softmax", {"W0": np.ones((2, 2))}),
        ("mlp", {"W0": np.ones((2, 2)), "b0": np.ones(2)}),
        ("softmax", {"W0": np.full((2, 2), np.nan), "b0": np.ones(2)}),
    ],
)
def test_invalid_weights(family: str, weights: dict[str, FloatArray]) -> None:
    with pytest.raises(FamilyError):
        export_onnx(family, weights)


def test_missing_onnx_package(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ExportError, match=r"fedge\[coordinator\]"):
        export_onnx("softmax", _weights("softmax", [4, 3], seed=0))


def test_compress_imports_without_onnx() -> None:
    code = (
        "import sys\n"
        "import compress.onnx_export, compress.quantize\n"
        "bad = [m for m in ('onnx', 'onnxruntime', 'sklearn') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)
