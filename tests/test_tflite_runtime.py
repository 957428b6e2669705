"""The TFLite runtime adapter and the format -> runtime loader."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compress.families import INPUT_NAME, OUTPUT_NAME, forward, init_weights
from compress.keys import generate_signing_key, save_keypair
from compress.onnx_export import export_onnx
from compress.tflite_export import export_tflite
from coordinator.cli.app import app
from edge_agent.cli import main as agent_main
from edge_agent.errors import ModelRuntimeError
from edge_agent.runtime import tflite_runtime
from edge_agent.runtime.base import accuracy
from edge_agent.runtime.loader import available_runtimes, load_model
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.runtime.tflite_runtime import TfliteModel

WEIGHTS = init_weights("mlp", [8, 16, 3], np.random.default_rng(3))
MODEL = export_tflite("mlp", WEIGHTS)


def test_tensor_info_has_dynamic_batch() -> None:
    model = TfliteModel.from_bytes(MODEL)
    assert [(t.name, t.shape, t.dtype) for t in model.inputs] == [
        (INPUT_NAME, (None, 8), "float32")
    ]
    assert [(t.name, t.shape) for t in model.outputs] == [(OUTPUT_NAME, (None, 3))]


@pytest.mark.parametrize(
    ("model", "threads", "message"),
    [
        (MODEL, 0, "threads must be a positive integer"),
        (MODEL, True, "threads must be a positive integer"),
        (MODEL, "2", "threads must be a positive integer"),
        (b"", 1, "model must be non-empty bytes"),
        ("text", 1, "model must be non-empty bytes"),
    ],
)
def test_load_arguments_are_checked_before_the_interpreter(
    model: bytes, threads: int, message: str
) -> None:
    with pytest.raises(ModelRuntimeError, match=message):
        TfliteModel.from_bytes(model, threads=threads)


@pytest.mark.parametrize("rows", [1, 5, 2, 7])
def test_predicts_like_numpy_for_any_batch(rows: int) -> None:
    model = TfliteModel.from_bytes(MODEL)
    x = np.random.default_rng(rows).random((rows, 8), dtype=np.float32)
    np.testing.assert_allclose(model.predict(x), forward("mlp", WEIGHTS, x), rtol=1e-5, atol=1e-6)


def test_batch_size_can_change_between_calls() -> None:
    model = TfliteModel.from_bytes(MODEL)
    rng = np.random.default_rng(0)
    for rows in (4, 1, 7, 7, 2):
        x = rng.random((rows, 8), dtype=np.float32)
        assert model.predict(x).shape == (rows, 3)


def test_accuracy_helper_works_with_tflite() -> None:
    model = TfliteModel.from_bytes(MODEL)
    x = np.random.default_rng(1).random((40, 8), dtype=np.float32)
    y = forward("mlp", WEIGHTS, x).argmax(axis=1)
    assert accuracy(model, x, y, batch_size=16) == 1.0


def test_concurrent_calls_are_serialised() -> None:
    model = TfliteModel.from_bytes(MODEL)
    rng = np.random.default_rng(2)
    batches = [rng.random((n, 8), dtype=np.float32) for n in (1, 3, 5, 7) * 5]
    results: list[bool] = []

    def work(x: np.ndarray) -> None:
        results.append(bool(np.allclose(model.predict(x), forward("mlp", WEIGHTS, x), atol=1e-5)))

    threads = [threading.Thread(target=work, args=(b,)) for b in batches]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == [True] * len(batches)


@pytest.mark.parametrize(
    ("feeds", "message"),
    [
        ({"wrong": np.zeros((1, 8), np.float32)}, "inputs do not match the model"),
        ({INPUT_NAME: np.zeros((1, 8), np.float64)}, "float32"),
        ({INPUT_NAME: np.zeros((1, 9), np.float32)}, "shape"),
    ],
)
def test_bad_inputs(feeds: dict[str, np.ndarray], message: str) -> None:
    with pytest.raises(ModelRuntimeError, match=message):
        TfliteModel.from_bytes(MODEL).run(feeds)


@pytest.mark.parametrize("model", [b"not a model", b"", MODEL[: len(MODEL) // 2]])
def test_bad_model_bytes(model: bytes) -> None:
    with pytest.raises(ModelRuntimeError):
        TfliteModel.from_bytes(model)


def test_bad_thread_count() -> None:
    with pytest.raises(ModelRuntimeError, match="threads"):
        TfliteModel.from_bytes(MODEL, threads=0)


def test_missing_runtime_is_a_clear_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(tflite_runtime, "TFLITE_MODULES", ("no_such_module.interpreter",))
    with pytest.raises(ModelRuntimeError, match=r"fedge\[tflite\]"):
        TfliteModel.from_bytes(MODEL)
    assert not tflite_runtime.tflite_available()


def test_loader_picks_the_adapter() -> None:
    assert isinstance(load_model("tflite", MODEL), TfliteModel)
    assert isinstance(load_model("onnx", export_onnx("mlp", WEIGHTS)), OnnxRuntimeModel)
    with pytest.raises(ModelRuntimeError, match="no runtime"):
        load_model("pickle", b"x")
    assert available_runtimes() == {"onnxruntime", "tflite"}


def test_package_and_verify_a_tflite_model(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    save_keypair(generate_signing_key(), tmp_path / "keys")
    (tmp_path / "m.tflite").write_bytes(MODEL)
    runner = CliRunner()
    base = [
        "model",
        "package",
        str(tmp_path / "m.tflite"),
        "--name",
        "toy",
        "--version",
        "2",
        "--key",
        str(tmp_path / "keys/signing.key"),
        "--out",
        str(tmp_path / "t.fedge"),
    ]
    refused = runner.invoke(app, base)
    assert refused.exit_code == 1
    assert "--quantize none" in refused.output
    result = runner.invoke(app, [*base, "--quantize", "none", "--json"])
    assert result.exit_code == 0, result.output
    trust = ["--trust", str(tmp_path / "keys/signing.pub")]
    assert agent_main(["verify", str(tmp_path / "t.fedge"), *trust, "--runtime", "tflite"]) == 0
    assert "tflite, none" in capsys.readouterr().out
    assert agent_main(["verify", str(tmp_path / "t.fedge"), *trust]) == 0
    capsys.readouterr()
    assert (
        agent_main(["verify", str(tmp_path / "t.fedge"), *trust, "--runtime", "onnxruntime"]) == 1
    )
    assert "tflite runtime" in capsys.readouterr().err
