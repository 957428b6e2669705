"""Tests for compress.quantize: int8 models stay close to float32 and fail cleanly.

The slow test at the end is the acceptance test of int8 deployment: a 64-512-512-10
MLP trained on scikit-learn's digits must shrink at least 3.5x and lose at most half
a percentage point of test accuracy, with dynamic and with static quantization.
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import numpy as np
import onnx
import pytest

from compress.errors import QuantizationError
from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, init_weights
from compress.onnx_export import export_onnx
from compress.quantize import CALIBRATION_KEY, load_calibration, quantize_int8
from edge_agent.runtime.base import accuracy
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel

N_FEATURES = 32


@pytest.fixture(scope="module")
def fp32_model() -> bytes:
    """A seeded 32-128-64-10 MLP with non-zero biases."""
    rng = np.random.default_rng(0)
    weights = init_weights("mlp", [N_FEATURES, 128, 64, 10], rng)
    for name, value in weights.items():
        if name.startswith("b"):
            weights[name] = (rng.standard_normal(value.shape) * 0.1).astype(np.float32)
    return export_onnx("mlp", weights)


@pytest.fixture(scope="module")
def inputs() -> FloatArray:
    return np.random.default_rng(1).random((256, N_FEATURES), dtype=np.float32)


def _ops(model: bytes) -> set[str]:
    return {node.op_type for node in onnx.load_model_from_string(model).graph.node}


def _opset_domains(model: bytes) -> list[str]:
    return [opset.domain for opset in onnx.load_model_from_string(model).opset_import]


def test_dynamic_is_close(fp32_model: bytes, inputs: FloatArray) -> None:
    int8 = quantize_int8(fp32_model)

    assert "MatMulInteger" in _ops(int8)
    assert _opset_domains(int8) == [""]  # only what the graph uses, for older runtimes
    reference = OnnxRuntimeModel.from_bytes(fp32_model)
    quantized = OnnxRuntimeModel.from_bytes(int8)
    assert quantized.inputs == reference.inputs
    assert quantized.outputs == reference.outputs
    want, got = reference.predict(inputs), quantized.predict(inputs)
    np.testing.assert_allclose(got, want, atol=0.03)
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97
    # A small model: graph overhead keeps the ratio below the 3.5x of large models.
    assert len(int8) < len(fp32_model) / 2.5


def test_static_is_close(fp32_model: bytes, inputs: FloatArray) -> None:
    int8 = quantize_int8(fp32_model, calibration=inputs[:128])

    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8)
    assert _opset_domains(int8) == [""]
    reference = OnnxRuntimeModel.from_bytes(fp32_model)
    quantized = OnnxRuntimeModel.from_bytes(int8)
    assert quantized.inputs == reference.inputs
    assert quantized.outputs == reference.outputs
    # Held-out rows: the calibration batch was rows 0..127. The softmax output is
    # quantized too (uint8, steps of 1/255), hence the looser tolerance.
    want, got = reference.predict(inputs[128:]), quantized.predict(inputs[128:])
    np.testing.assert_allclose(got, want, atol=0.06)
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.97
    # A small model: graph overhead keeps the ratio below the 3.5x of large models.
    assert len(int8) < len(fp32_model) / 2.5


def test_per_tensor(fp32_model: bytes, inputs: FloatArray) -> None:
    per_tensor = quantize_int8(fp32_model, per_channel=False)
    assert len(per_tensor) < len(quantize_int8(fp32_model))
    got = OnnxRuntimeModel.from_bytes(per_tensor).predict(inputs)
    np.testing.assert_allclose(
        got, OnnxRuntimeModel.from_bytes(fp32_model).predict(inputs), atol=0.05
    )


def test_calibration_dtype_is_converted(fp32_model: bytes, inputs: FloatArray) -> None:
    as_float64 = quantize_int8(fp32_model, calibration=inputs[:64].astype(np.float64))
    assert as_float64 == quantize_int8(fp32_model, calibration=inputs[:64])


def test_softmax_family(inputs: FloatArray) -> None:
    weights = init_weights("softmax", [N_FEATURES, 4], np.random.default_rng(2))
    fp32 = export_onnx("softmax", weights)
    want = OnnxRuntimeModel.from_bytes(fp32).predict(inputs)
    for int8 in (quantize_int8(fp32), quantize_int8(fp32, calibration=inputs)):
        np.testing.assert_allclose(
            OnnxRuntimeModel.from_bytes(int8).predict(inputs), want, atol=0.03
        )


def test_no_preprocessing_warning(
    fp32_model: bytes, inputs: FloatArray, caplog: pytest.LogCaptureFixture
) -> None:
    """The model is pre-processed, so onnxruntime has nothing to warn about."""
    with caplog.at_level(logging.WARNING):
        quantize_int8(fp32_model)
        quantize_int8(fp32_model, calibration=inputs)
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize(
    "model",
    [b"", b"not an onnx model", b"\x08\x07" + b"\xff" * 40, b"\x08\x08"],
    ids=["empty", "text", "garbage", "no-graph"],
)
def test_invalid_model_bytes(model: bytes) -> None:
    with pytest.raises(QuantizationError, match=r"ONNX model|empty"):
        quantize_int8(model)


def test_truncated_model(fp32_model: bytes) -> None:
    with pytest.raises(QuantizationError, match="not a valid ONNX model"):
        quantize_int8(fp32_model[: len(fp32_model) // 2])


def _custom_op_model() -> bytes:
    """Passes onnx.checker (custom domains are not checked) but onnxruntime cannot load it."""
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Frobnicate", [INPUT_NAME], [OUTPUT_NAME], domain="com.example")],
        "custom",
        [helper.make_tensor_value_info(INPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info(OUTPUT_NAME, onnx.TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(
        graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.example", 1)]
    )
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def test_model_onnxruntime_cannot_load() -> None:
    with pytest.raises(QuantizationError, match="onnxruntime cannot load the model"):
        quantize_int8(_custom_op_model())


def test_onnxruntime_failure_is_translated(
    fp32_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    import onnxruntime.quantization  # noqa: PLC0415

    def broken(*args: object, **kwargs: object) -> None:
        raise RuntimeError("boom\nsecond line")

    monkeypatch.setattr(onnxruntime.quantization, "quantize_dynamic", broken)
    with pytest.raises(
        QuantizationError, match=r"^dynamic quantization failed: RuntimeError: boom$"
    ):
        quantize_int8(fp32_model)


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (np.ones((4, N_FEATURES + 1), np.float32), r"examples have shape \(33,\).*\(32\)"),
        (np.ones(N_FEATURES, np.float32), "2-D"),
        (np.ones((0, N_FEATURES), np.float32), "non-empty"),
        (np.ones((2, 2, N_FEATURES), np.float32), r"examples have shape \(2, 32\)"),
        (np.full((4, N_FEATURES), np.nan, np.float32), "NaN"),
        (np.full((4, N_FEATURES), 1e300), "NaN or infinity"),
        (np.full((4, N_FEATURES), "a"), "real numbers"),
        (np.ones((4, N_FEATURES), complex), "real numbers"),
    ],
    ids=["features", "1d", "empty", "3d", "nan", "overflow", "strings", "complex"],
)
def test_bad_calibration(fp32_model: bytes, calibration: FloatArray, match: str) -> None:
    with pytest.raises(QuantizationError, match=match):
        quantize_int8(fp32_model, calibration=calibration)


def _conv_model(shape: tuple[int | str, ...]) -> bytes:
    """A one-Conv model over images (batch, 1, 8, 8); ``shape`` is its declared input."""
    helper = onnx.helper
    rng = np.random.default_rng(3)
    weight = onnx.numpy_helper.from_array(rng.standard_normal((2, 1, 3, 3), np.float32), "w")
    graph = helper.make_graph(
        [helper.make_node("Conv", ["input", "w"], ["out"], pads=[1, 1, 1, 1])],
        "conv",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, list(shape))],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 2, "h", "w"])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


@pytest.mark.parametrize("shape", [("batch", 1, 8, 8), ("batch", 1, "h", "w")])
def test_static_calibration_of_images(shape: tuple[int | str, ...]) -> None:
    """Calibration examples of any rank: (n, channels, height, width) for a conv net."""
    fp32 = _conv_model(shape)
    images = np.random.default_rng(4).random((96, 1, 8, 8), dtype=np.float32)

    int8 = quantize_int8(fp32, calibration=images[:64])

    assert {"QuantizeLinear", "DequantizeLinear", "Conv"} <= _ops(int8)
    want = OnnxRuntimeModel.from_bytes(fp32).predict(images[64:])
    got = OnnxRuntimeModel.from_bytes(int8).predict(images[64:])
    assert got.shape == (32, 2, 8, 8)
    np.testing.assert_allclose(got, want, atol=0.05)


@pytest.mark.parametrize(
    ("calibration", "match"),
    [
        (np.ones((4, 1, 8, 9), np.float32), r"\(1, 8, 9\), the model's input takes .*\(1, 8, 8\)"),
        (np.ones((4, 64), np.float32), r"examples have shape \(64,\)"),
        (np.ones((4, 1, 1, 8, 8), np.float32), r"examples have shape \(1, 1, 8, 8\)"),
        (np.ones((0, 1, 8, 8), np.float32), "non-empty"),
    ],
    ids=["width", "rows", "rank", "empty"],
)
def test_bad_image_calibration(calibration: FloatArray, match: str) -> None:
    with pytest.raises(QuantizationError, match=match):
        quantize_int8(_conv_model(("batch", 1, 8, 8)), calibration=calibration)


def test_calibration_needs_a_batched_input() -> None:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Relu", ["input"], ["out"])],
        "vector",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, [4])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, [4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(QuantizationError, match=r"float32 input \(batch, \.\.\.\)"):
        quantize_int8(model.SerializeToString(), calibration=np.ones((2, 4), np.float32))


def _matmul_minus_input() -> bytes:
    """out = input @ (0.001 * I) - input, the Sub named "head_sub"."""
    helper = onnx.helper
    weight = onnx.numpy_helper.from_array(np.eye(4, dtype=np.float32) * 1e-3, "w")
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["input", "w"], ["h"], name="body_matmul"),
            helper.make_node("Sub", ["h", "input"], ["out"], name="head_sub"),
        ],
        "head",
        [helper.make_tensor_value_info("input", onnx.TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("out", onnx.TensorProto.FLOAT, ["batch", 4])],
        initializer=[weight],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    data: bytes = model.SerializeToString()
    return data


def test_float_nodes_read_unquantized_inputs() -> None:
    """Inputs beyond the calibration range reach a float node unclipped."""
    fp32 = _matmul_minus_input()
    calibration = np.random.default_rng(5).random((32, 4), dtype=np.float32)  # in [0, 1)
    far = np.full((2, 4), 10.0, np.float32)

    clipped = OnnxRuntimeModel.from_bytes(quantize_int8(fp32, calibration=calibration))
    int8 = quantize_int8(fp32, calibration=calibration, float_nodes=["head_sub"])

    assert clipped.predict(far)[0, 0] > -1.5  # the quantized Sub sees input clipped to ~1
    np.testing.assert_allclose(OnnxRuntimeModel.from_bytes(int8).predict(far), -10.0, atol=0.01)
    proto = onnx.load_model_from_string(int8)
    (sub,) = [node for node in proto.graph.node if node.name == "head_sub"]
    assert "input" in sub.input
    assert "MatMul" in _ops(int8)  # the body is still quantized (QDQ around MatMul)
    assert {"QuantizeLinear", "DequantizeLinear"} <= _ops(int8)
    assert "out" in {out for node in proto.graph.node for out in node.output}


def test_float_nodes_must_exist() -> None:
    with pytest.raises(QuantizationError, match="float_nodes names no node of the model: nope"):
        quantize_int8(_matmul_minus_input(), float_nodes=["head_sub", "nope"])


def test_calibration_needs_one_input() -> None:
    helper = onnx.helper
    graph = helper.make_graph(
        [helper.make_node("Add", ["a", "b"], ["c"])],
        "two_inputs",
        [
            helper.make_tensor_value_info("a", onnx.TensorProto.FLOAT, ["batch", 4]),
            helper.make_tensor_value_info("b", onnx.TensorProto.FLOAT, ["batch", 4]),
        ],
        [helper.make_tensor_value_info("c", onnx.TensorProto.FLOAT, ["batch", 4])],
    )
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    with pytest.raises(QuantizationError, match="exactly one input"):
        quantize_int8(model.SerializeToString(), calibration=np.ones((2, 4), np.float32))


def test_missing_onnxruntime_quantization(
    fp32_model: bytes, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime.quantization", None)
    with pytest.raises(QuantizationError, match=r"fedge\[coordinator\]"):
        quantize_int8(fp32_model)


def test_missing_onnx(fp32_model: bytes, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(QuantizationError, match=r"fedge\[coordinator\]"):
        quantize_int8(fp32_model)


# --- load_calibration ---------------------------------------------------------------


def test_load_calibration(tmp_path: Path) -> None:
    batch = np.random.default_rng(0).random((10, 3))
    path = tmp_path / "calib.npz"
    assert CALIBRATION_KEY == "x"
    np.savez(path, x=batch)

    loaded = load_calibration(path)

    assert loaded.dtype == np.float32
    assert loaded.flags.c_contiguous
    np.testing.assert_array_equal(loaded, batch.astype(np.float32))
    assert np.array_equal(load_calibration(str(path)), loaded)


def test_load_calibration_of_images(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.ones((5, 1, 8, 8), np.float64))
    assert load_calibration(path).shape == (5, 1, 8, 8)


def test_load_calibration_compressed(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez_compressed(path, x=np.ones((2, 3), np.float32), extra=np.zeros(1))
    assert load_calibration(path).shape == (2, 3)


def test_load_calibration_missing_file(tmp_path: Path) -> None:
    with pytest.raises(QuantizationError, match="no such calibration file"):
        load_calibration(tmp_path / "nope.npz")


def test_load_calibration_missing_key(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, features=np.ones((2, 3)))
    with pytest.raises(QuantizationError, match=r"no array named 'x' \(found: features\)"):
        load_calibration(path)


@pytest.mark.parametrize(
    ("array", "match"),
    [
        (np.ones(3), "2-D"),
        (np.ones((0, 3)), "non-empty"),
        (np.array([[1.0, np.inf]]), "infinity"),
        (np.array([["a", "b"]]), "real numbers"),
    ],
)
def test_load_calibration_bad_array(tmp_path: Path, array: FloatArray, match: str) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=array)
    with pytest.raises(QuantizationError, match=match):
        load_calibration(path)


def test_load_calibration_refuses_pickles(tmp_path: Path) -> None:
    path = tmp_path / "calib.npz"
    np.savez(path, x=np.array([[1.0, None]], dtype=object))
    with pytest.raises(QuantizationError, match="cannot read"):
        load_calibration(path)


def test_load_calibration_not_npz(tmp_path: Path) -> None:
    npy = tmp_path / "calib.npy"
    np.save(npy, np.ones((2, 3)))
    with pytest.raises(QuantizationError, match=r"not an \.npz archive"):
        load_calibration(npy)
    text = tmp_path / "calib.txt"
    text.write_text("1 2 3\n")
    with pytest.raises(QuantizationError, match="cannot read"):
        load_calibration(text)
    with pytest.raises(QuantizationError, match="is a directory"):
        load_calibration(tmp_path)


# --- acceptance: digits ----------------------------------------------------------------


@pytest.mark.slow
def test_digits_mlp_int8_size_and_accuracy() -> None:
    from coordinator.sim.datasets import load_digits_split, train_reference_mlp  # noqa: PLC0415

    x_train, y_train, x_test, y_test = load_digits_split(0)
    weights = train_reference_mlp(x_train, y_train, hidden=(512, 512), seed=0)
    assert [weights[f"W{i}"].shape for i in range(3)] == [(64, 512), (512, 512), (512, 10)]
    fp32 = export_onnx("mlp", weights)
    calibration = x_train[np.random.default_rng(0).choice(len(x_train), 256, replace=False)]

    fp32_acc = 100 * accuracy(OnnxRuntimeModel.from_bytes(fp32), x_test, y_test)
    print(f"\ndigits MLP 64-512-512-10: fp32 {len(fp32)} bytes, test accuracy {fp32_acc:.2f}%")
    assert fp32_acc >= 95.0
    for mode, int8 in (
        ("dynamic", quantize_int8(fp32)),
        ("static", quantize_int8(fp32, calibration=calibration)),
    ):
        int8_acc = 100 * accuracy(OnnxRuntimeModel.from_bytes(int8), x_test, y_test)
        print(
            f"  int8 {mode:7s}: {len(int8)} bytes (x{len(fp32) / len(int8):.2f} smaller), "
            f"test accuracy {int8_acc:.2f}% (drop {fp32_acc - int8_acc:+.2f} pp)"
        )
        assert len(int8) <= len(fp32) / 3.5, mode
        assert fp32_acc - int8_acc <= 0.5, mode


def test_a_quantizer_output_that_does_not_parse_is_a_typed_error() -> None:
    import compress.quantize as quantize  # noqa: PLC0415 - the private post-processing steps

    garbage = b"\x0a\xff\xff\xff"  # a truncated protobuf field
    with pytest.raises(QuantizationError, match="cannot parse the quantized model"):
        quantize._prune_opset_imports(garbage)
    with pytest.raises(QuantizationError, match="cannot parse the quantized model"):
        quantize._unquantized_inputs(garbage, ("head",))
