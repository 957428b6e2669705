"""Tests for edge_agent.runtime: the ModelRuntime interface and its onnxruntime adapter."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Mapping

import numpy as np
import onnx
import pytest

from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, forward, init_weights
from compress.onnx_export import export_onnx
from edge_agent.errors import AgentError, ModelRuntimeError
from edge_agent.runtime.base import (
    ModelRuntime,
    TensorInfo,
    accuracy,
    convert_input,
    predict_single,
)
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel

N_FEATURES = 6
N_CLASSES = 4


@pytest.fixture(scope="module")
def weights() -> dict[str, FloatArray]:
    return init_weights("mlp", [N_FEATURES, 16, N_CLASSES], np.random.default_rng(0))


@pytest.fixture(scope="module")
def runtime(weights: dict[str, FloatArray]) -> OnnxRuntimeModel:
    return OnnxRuntimeModel.from_bytes(export_onnx("mlp", weights))


@pytest.fixture(scope="module")
def x() -> FloatArray:
    return np.random.default_rng(1).standard_normal((50, N_FEATURES)).astype(np.float32)


def _model(
    nodes: list[onnx.NodeProto],
    inputs: list[onnx.ValueInfoProto],
    outputs: list[onnx.ValueInfoProto],
    initializers: list[onnx.TensorProto] | None = None,
) -> bytes:
    helper = onnx.helper
    graph = helper.make_graph(nodes, "test", inputs, outputs, initializer=initializers or [])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def _value(name: str, elem_type: int, shape: list[int | str]) -> onnx.ValueInfoProto:
    info: onnx.ValueInfoProto = onnx.helper.make_tensor_value_info(name, elem_type, shape)
    return info


FLOAT = onnx.TensorProto.FLOAT


# --- the onnxruntime adapter ---------------------------------------------------------


def test_is_a_model_runtime(runtime: OnnxRuntimeModel) -> None:
    assert isinstance(runtime, ModelRuntime)


def test_signature(runtime: OnnxRuntimeModel) -> None:
    assert runtime.inputs == [TensorInfo(INPUT_NAME, (None, N_FEATURES), "float32")]
    assert runtime.outputs == [TensorInfo(OUTPUT_NAME, (None, N_CLASSES), "float32")]
    runtime.inputs.clear()  # a copy: the runtime's own list is untouched
    assert len(runtime.inputs) == 1


def test_run_and_predict(
    runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: FloatArray
) -> None:
    want = forward("mlp", weights, x)

    out = runtime.run({INPUT_NAME: x})

    assert list(out) == [OUTPUT_NAME]
    np.testing.assert_allclose(out[OUTPUT_NAME], want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(runtime.predict(x), want, rtol=1e-5, atol=1e-6)
    # predict converts to the input dtype; run does not.
    np.testing.assert_allclose(
        runtime.predict(x.astype(np.float64).tolist()), want, rtol=1e-5, atol=1e-6
    )


@pytest.mark.parametrize("threads", [1, 2])
def test_threads(weights: dict[str, FloatArray], x: FloatArray, threads: int) -> None:
    model = OnnxRuntimeModel.from_bytes(export_onnx("mlp", weights), threads=threads)
    np.testing.assert_allclose(model.predict(x), forward("mlp", weights, x), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("threads", [0, -1, True, 1.5, "2"])
def test_bad_threads(weights: dict[str, FloatArray], threads: int) -> None:
    with pytest.raises(ModelRuntimeError, match="threads"):
        OnnxRuntimeModel.from_bytes(export_onnx("mlp", weights), threads=threads)


@pytest.mark.parametrize(
    "model", [b"", b"not a model", b"\x08\x07" + b"\xff" * 40], ids=["empty", "text", "garbage"]
)
def test_invalid_model(model: bytes) -> None:
    with pytest.raises(ModelRuntimeError) as info:
        OnnxRuntimeModel.from_bytes(model)
    assert isinstance(info.value, AgentError)
    assert "\n" not in str(info.value)


def test_truncated_model(weights: dict[str, FloatArray]) -> None:
    data = export_onnx("mlp", weights)
    with pytest.raises(ModelRuntimeError, match="cannot load"):
        OnnxRuntimeModel.from_bytes(data[: len(data) - 100])


def test_unknown_operator() -> None:
    model = _model(
        [onnx.helper.make_node("Frobnicate", ["a"], ["b"])],
        [_value("a", FLOAT, [1])],
        [_value("b", FLOAT, [1])],
    )
    with pytest.raises(ModelRuntimeError, match="cannot load"):
        OnnxRuntimeModel.from_bytes(model)


def test_non_numeric_output_is_refused() -> None:
    model = _model(
        [onnx.helper.make_node("Cast", ["a"], ["b"], to=onnx.TensorProto.STRING)],
        [_value("a", FLOAT, [2])],
        [_value("b", onnx.TensorProto.STRING, [2])],
    )
    with pytest.raises(ModelRuntimeError, match="output 'b' has type tensor\\(string\\)"):
        OnnxRuntimeModel.from_bytes(model)


@pytest.mark.parametrize(
    ("feeds", "match"),
    [
        ({}, "missing \\['input'\\]"),
        ({"x": np.ones((1, N_FEATURES), np.float32)}, "unknown \\['x'\\]"),
        (
            {INPUT_NAME: np.ones((1, N_FEATURES), np.float32), "x": np.ones(1)},
            "unknown \\['x'\\]",
        ),
        ({INPUT_NAME: np.ones((1, N_FEATURES), np.float64)}, "must be float32, got float64"),
        ({INPUT_NAME: np.ones((1, N_FEATURES + 1), np.float32)}, "shape \\(\\?, 6\\)"),
        ({INPUT_NAME: np.ones(N_FEATURES, np.float32)}, "shape \\(\\?, 6\\), got \\(6,\\)"),
        ({INPUT_NAME: [[1.0] * N_FEATURES]}, "numpy array"),
    ],
    ids=["missing", "unknown", "extra", "dtype", "width", "rank", "list"],
)
def test_bad_feeds(runtime: OnnxRuntimeModel, feeds: Mapping[str, np.ndarray], match: str) -> None:
    with pytest.raises(ModelRuntimeError, match=match):
        runtime.run(feeds)


@pytest.mark.parametrize(
    "x", [np.ones((2, 3), np.float32), [["a"] * N_FEATURES]], ids=["width", "strings"]
)
def test_predict_bad_input(runtime: OnnxRuntimeModel, x: FloatArray) -> None:
    with pytest.raises(ModelRuntimeError):
        runtime.predict(x)


def test_kernel_failure_is_translated() -> None:
    """A dynamic feature dimension passes the pre-checks; onnxruntime's MatMul fails."""
    model = _model(
        [onnx.helper.make_node("MatMul", ["a", "w"], ["b"])],
        [_value("a", FLOAT, ["batch", "features"])],
        [_value("b", FLOAT, ["batch", 3])],
        [onnx.numpy_helper.from_array(np.ones((8, 3), np.float32), "w")],
    )
    runtime = OnnxRuntimeModel.from_bytes(model)
    assert runtime.inputs == [TensorInfo("a", (None, None), "float32")]
    with pytest.raises(ModelRuntimeError, match=r"^inference failed: .*MatMul") as info:
        runtime.run({"a": np.ones((2, 5), np.float32)})
    assert "\n" not in str(info.value)


def test_multiple_inputs() -> None:
    model = _model(
        [onnx.helper.make_node("Add", ["a", "b"], ["c"])],
        [_value("a", FLOAT, [2]), _value("b", FLOAT, [2])],
        [_value("c", FLOAT, [2])],
    )
    runtime = OnnxRuntimeModel.from_bytes(model)
    one = np.ones(2, np.float32)
    np.testing.assert_array_equal(runtime.run({"a": one, "b": one})["c"], [2.0, 2.0])
    with pytest.raises(ModelRuntimeError, match="one input and one output"):
        runtime.predict(one)


# --- accuracy and the interface itself -----------------------------------------------


def test_accuracy(runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: FloatArray) -> None:
    predicted = forward("mlp", weights, x).argmax(axis=1)
    assert accuracy(runtime, x, predicted) == 1.0
    labels = predicted.copy()
    labels[:10] = (labels[:10] + 1) % N_CLASSES
    assert accuracy(runtime, x, labels) == pytest.approx(0.8)
    for batch_size in (1, 7, 50, 1000):
        assert accuracy(runtime, x, labels, batch_size=batch_size) == pytest.approx(0.8)


@pytest.mark.parametrize(
    ("rows", "labels", "batch_size"),
    [(5, 4, 256), (0, 0, 256), (5, 5, 0)],
    ids=["length", "empty", "batch"],
)
def test_accuracy_bad_arguments(
    runtime: OnnxRuntimeModel, rows: int, labels: int, batch_size: int
) -> None:
    with pytest.raises(ValueError, match=r"x|batch_size"):
        accuracy(
            runtime,
            np.zeros((rows, N_FEATURES), np.float32),
            np.zeros(labels, np.int64),
            batch_size=batch_size,
        )


def test_accuracy_fixed_batch_model() -> None:
    """A model with a fixed batch size of 2 is fed exactly 2 rows at a time."""
    w = np.eye(3, dtype=np.float32)
    model = _model(
        [onnx.helper.make_node("MatMul", ["a", "w"], ["b"])],
        [_value("a", FLOAT, [2, 3])],
        [_value("b", FLOAT, [2, 3])],
        [onnx.numpy_helper.from_array(w, "w")],
    )
    runtime = OnnxRuntimeModel.from_bytes(model)
    x = np.eye(3, dtype=np.float32)[[0, 1, 2, 0]]
    assert accuracy(runtime, x, [0, 1, 2, 1]) == 0.75
    with pytest.raises(ModelRuntimeError, match="exactly 2 rows"):
        accuracy(runtime, x[:3], [0, 1, 2])


def test_accuracy_needs_class_scores() -> None:
    model = _model(
        [onnx.helper.make_node("ReduceSum", ["a"], ["b"], keepdims=0)],
        [_value("a", FLOAT, ["batch", 3])],
        [_value("b", FLOAT, [])],
    )
    runtime = OnnxRuntimeModel.from_bytes(model)
    with pytest.raises(ModelRuntimeError, match="class scores"):
        accuracy(runtime, np.ones((4, 3), np.float32), [0, 0, 0, 0])


class _NumpyIdentity:
    """A structural ModelRuntime (no subclassing): scores are the inputs themselves."""

    @property
    def inputs(self) -> list[TensorInfo]:
        return [TensorInfo("in", (None, 3), "float32")]

    @property
    def outputs(self) -> list[TensorInfo]:
        return [TensorInfo("out", (None, 3), "float32")]

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        problem = self.inputs[0].accepts(feeds["in"])
        if problem:
            raise ModelRuntimeError(problem)
        return {"out": feeds["in"]}

    def predict(self, x: object) -> np.ndarray:
        return predict_single(self, x)  # type: ignore[arg-type]


def test_structural_runtime() -> None:
    twin = _NumpyIdentity()
    assert isinstance(twin, ModelRuntime)
    x = np.eye(3)[[2, 1, 0, 2]]
    assert accuracy(twin, x, [2, 1, 0, 0], batch_size=3) == 0.75
    with pytest.raises(ModelRuntimeError, match=r"shape \(\?, 3\), got \(1, 2\)"):
        twin.predict([[1.0, 2.0]])


def test_tensor_info_shape_text() -> None:
    assert TensorInfo("a", (None, 3), "float32").shape_text() == "(?, 3)"
    assert TensorInfo("a", (5,), "int64").shape_text() == "(5,)"
    assert TensorInfo("a", (), "float32").shape_text() == "()"


def test_edge_agent_runtime_imports_no_coordinator_packages() -> None:
    code = (
        "import sys\n"
        "import edge_agent.runtime.base, edge_agent.runtime.onnx_runtime\n"
        "bad = [m for m in ('onnx', 'sklearn', 'flwr', 'fastapi', 'typer') if m in sys.modules]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-W", "error", "-c", code], check=True)


@pytest.mark.parametrize(
    ("dtype", "value"),
    [("uint8", [300]), ("uint8", [-1]), ("int8", [128.0]), ("int64", [float("inf")])],
)
def test_convert_input_refuses_integers_out_of_range(dtype: str, value: list[float]) -> None:
    info = TensorInfo("x", (None,), dtype)
    with pytest.raises(ModelRuntimeError, match="cannot convert input 'x'"):
        convert_input(value, info)


def test_convert_input_keeps_fitting_values_and_arrays_as_they_are() -> None:
    info = TensorInfo("x", (None,), "uint8")
    assert convert_input([0, 255], info).tolist() == [0, 255]
    ready = np.array([1, 2], dtype=np.uint8)
    assert convert_input(ready, info) is ready
