"""Tests for compress.tflite_export: the models load and run in the real TFLite runtime."""

from __future__ import annotations

import sys

import numpy as np
import numpy.typing as npt
import pytest
from ai_edge_litert import schema_py_generated as tfl
from ai_edge_litert.interpreter import Interpreter

from compress.errors import ExportError, FamilyError
from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, forward, init_weights
from compress.tflite_export import FILE_IDENTIFIER, SCHEMA_VERSION, export_tflite

CASES = [("softmax", [8, 3]), ("mlp", [16, 32, 32, 5])]


def _weights(family: str, sizes: list[int], seed: int) -> dict[str, FloatArray]:
    """Seeded weights with non-zero biases, so the biases are exercised too."""
    rng = np.random.default_rng(seed)
    weights = init_weights(family, sizes, rng)
    for name, value in weights.items():
        if name.startswith("b"):
            weights[name] = (rng.standard_normal(value.shape) * 0.5).astype(np.float32)
    return weights


def _run(model: bytes, x: npt.NDArray[np.float32]) -> npt.NDArray[np.float32]:
    interpreter = Interpreter(model_content=model)
    (inp,) = interpreter.get_input_details()
    interpreter.resize_tensor_input(inp["index"], list(x.shape))
    interpreter.allocate_tensors()
    interpreter.set_tensor(inp["index"], x)
    interpreter.invoke()
    (out,) = interpreter.get_output_details()
    result: npt.NDArray[np.float32] = interpreter.get_tensor(out["index"])
    return result


@pytest.mark.parametrize(("family", "sizes"), CASES)
def test_input_and_output_details(family: str, sizes: list[int]) -> None:
    interpreter = Interpreter(model_content=export_tflite(family, _weights(family, sizes, 0)))
    (inp,) = interpreter.get_input_details()
    (out,) = interpreter.get_output_details()
    assert inp["name"] == INPUT_NAME
    assert out["name"] == OUTPUT_NAME
    assert inp["dtype"] == np.float32
    assert out["dtype"] == np.float32
    assert list(inp["shape"]) == [1, sizes[0]]
    assert list(inp["shape_signature"]) == [-1, sizes[0]]
    assert list(out["shape"]) == [1, sizes[-1]]


@pytest.mark.parametrize(("family", "sizes"), CASES)
@pytest.mark.parametrize("batch", [1, 7])
def test_matches_numpy_forward(family: str, sizes: list[int], batch: int) -> None:
    weights = _weights(family, sizes, seed=42)
    x = np.random.default_rng(7).standard_normal((batch, sizes[0])).astype(np.float32)
    got = _run(export_tflite(family, weights), x)
    assert got.shape == (batch, sizes[-1])
    np.testing.assert_allclose(got, forward(family, weights, x), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-5)


def test_relu_is_applied_on_hidden_layers_only() -> None:
    # Negative hidden pre-activations must be clipped; the logits must not be.
    weights = _weights("mlp", [4, 8, 3], seed=3)
    weights["b0"] = np.full(8, -0.5, dtype=np.float32)
    weights["b1"] = np.array([-5.0, 0.0, 5.0], dtype=np.float32)
    x = np.random.default_rng(11).standard_normal((16, 4)).astype(np.float32)
    got = _run(export_tflite("mlp", weights), x)
    np.testing.assert_allclose(got, forward("mlp", weights, x), rtol=1e-5, atol=1e-6)


def test_flatbuffer_layout() -> None:
    weights = _weights("mlp", [4, 6, 3], seed=5)
    model = export_tflite("mlp", weights)
    assert model[4:8] == FILE_IDENTIFIER
    parsed = tfl.ModelT.InitFromPackedBuf(model, 0)
    assert parsed.version == SCHEMA_VERSION
    assert parsed.buffers[0].data is None  # the empty sentinel
    (subgraph,) = parsed.subgraphs
    codes = [parsed.operatorCodes[op.opcodeIndex].builtinCode for op in subgraph.operators]
    assert codes == [
        tfl.BuiltinOperator.FULLY_CONNECTED,
        tfl.BuiltinOperator.FULLY_CONNECTED,
        tfl.BuiltinOperator.SOFTMAX,
    ]
    fused = [op.builtinOptions.fusedActivationFunction for op in subgraph.operators[:2]]
    assert fused == [tfl.ActivationFunctionType.RELU, tfl.ActivationFunctionType.NONE]
    assert subgraph.operators[2].builtinOptions.beta == 1.0
    # FC weights are stored [out, in], as little-endian float32, 16-byte aligned.
    for i in range(2):
        fc = subgraph.operators[i]
        w_tensor = subgraph.tensors[fc.inputs[1]]
        assert list(w_tensor.shape) == list(weights[f"W{i}"].T.shape)
        data = np.ascontiguousarray(weights[f"W{i}"].T, dtype="<f4").tobytes()
        assert parsed.buffers[w_tensor.buffer].data.tobytes() == data
        assert model.find(data) % 16 == 0
    # Every non-constant tensor points to the sentinel buffer.
    constant = {t for op in subgraph.operators[:2] for t in op.inputs[1:]}
    for index, tensor in enumerate(subgraph.tensors):
        assert (tensor.buffer != 0) == (index in constant)
        assert tensor.type == tfl.TensorType.FLOAT32


def test_export_is_deterministic() -> None:
    weights = _weights("mlp", [16, 32, 32, 5], seed=9)
    assert export_tflite("mlp", weights) == export_tflite("mlp", dict(weights))


@pytest.mark.parametrize(
    ("family", "weights"),
    [
        ("cnn", {"W0": np.ones((2, 2)), "b0": np.ones(2)}),
        ("softmax", {"W0": np.ones((2, 3)), "b0": np.ones(2)}),
        ("softmax", {"W0": np.ones((2, 3)), "b0": np.ones(3), "W1": np.ones((3, 2))}),
        ("mlp", {"W0": np.ones((2, 3)), "b0": np.ones(3)}),
        (
            "mlp",
            {"W0": np.ones((2, 3)), "b0": np.ones(3), "W1": np.ones((4, 2)), "b1": np.ones(2)},
        ),
        ("softmax", {"W0": np.full((2, 3), np.nan), "b0": np.ones(3)}),
        ("softmax", {}),
    ],
)
def test_invalid_weights_raise_family_error(
    family: str, weights: dict[str, npt.NDArray[np.float64]]
) -> None:
    with pytest.raises(FamilyError):
        export_tflite(family, weights)


def test_missing_extra_raises_export_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "flatbuffers", None)  # makes the import fail
    with pytest.raises(ExportError, match=r"pip install 'fedge\[tflite\]'"):
        export_tflite("softmax", _weights("softmax", [8, 3], seed=0))
