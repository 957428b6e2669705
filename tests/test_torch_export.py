"""compress.torch_export: each task's deployed output, checked in onnxruntime, and refusals."""

from __future__ import annotations

import logging
import sys

import numpy as np
import onnx
import onnxruntime
import pytest
import torch

from compress.errors import ExportError
from compress.quantize import quantize_int8
from compress.torch_export import (
    HEAD_PREFIX,
    OUTPUT_NAMES,
    ModelTask,
    export_torch_onnx,
    head_nodes,
)

torch.set_num_threads(1)


class TinyCnn(torch.nn.Module):
    """Images (1, 8, 8) -> 3 logits, with BatchNorm (eval mode matters) and dropout."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3, padding=1)
        self.norm = torch.nn.BatchNorm2d(4)
        self.drop = torch.nn.Dropout(0.5)
        self.head = torch.nn.Linear(4 * 4 * 4, 3)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.nn.functional.max_pool2d(torch.relu(self.norm(self.conv(x))), 2)
        out: torch.Tensor = self.head(self.drop(h.flatten(1)))
        return out


class FlatAutoencoder(torch.nn.Module):
    """(2, 6) windows -> a flattened reconstruction (12,)."""

    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(
            torch.nn.Flatten(), torch.nn.Linear(12, 3), torch.nn.ReLU(), torch.nn.Linear(3, 12)
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)  # type: ignore[no-any-return]


class ShapedAutoencoder(FlatAutoencoder):
    """The same, but its reconstruction keeps the input's shape."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x).reshape(x.shape)  # type: ignore[no-any-return]


def _module(task: ModelTask) -> tuple[torch.nn.Module, tuple[int, ...]]:
    torch.manual_seed(0)
    if task == "classification":
        cnn = TinyCnn()
        with torch.no_grad():  # non-trivial running statistics
            cnn.norm.running_mean.uniform_(-0.5, 0.5)  # type: ignore[union-attr]
            cnn.norm.running_var.uniform_(0.5, 2.0)  # type: ignore[union-attr]
        return cnn, (1, 8, 8)
    if task == "regression":
        layers = (torch.nn.Linear(5, 8), torch.nn.Tanh(), torch.nn.Linear(8, 2))
        return torch.nn.Sequential(*layers), (5,)
    return FlatAutoencoder(), (2, 6)


def _run(model: bytes, x: np.ndarray) -> np.ndarray:
    session = onnxruntime.InferenceSession(model, providers=["CPUExecutionProvider"])
    return np.asarray(session.run(None, {"input": x})[0])


def _torch_output(module: torch.nn.Module, task: ModelTask, x: np.ndarray) -> np.ndarray:
    """What the deployed model must output, computed in plain torch."""
    module.eval()
    with torch.no_grad():
        out = module(torch.from_numpy(x))
        if task == "classification":
            out = torch.softmax(out, dim=-1)
        elif task == "reconstruction":
            out = ((out.reshape(x.shape) - torch.from_numpy(x)) ** 2).flatten(1).mean(dim=1)
    return out.numpy()  # type: ignore[no-any-return]


@pytest.mark.parametrize("task", ["classification", "regression", "reconstruction"])
def test_export_matches_torch(task: ModelTask) -> None:
    module, shape = _module(task)
    module.train()

    model = export_torch_onnx(module, shape, task)

    assert module.training  # restored
    proto = onnx.load_model_from_string(model)
    (inp,) = proto.graph.input
    (out,) = proto.graph.output
    assert inp.name == "input"
    assert out.name == OUTPUT_NAMES[task]
    assert inp.type.tensor_type.shape.dim[0].dim_param == "batch"
    assert [d.dim_value for d in inp.type.tensor_type.shape.dim[1:]] == list(shape)
    assert [o.version for o in proto.opset_import if o.domain in ("", "ai.onnx")] == [17]
    assert proto.ir_version == 8  # the oldest IR of opset 17: older device runtimes load it
    for rows in (1, 7):  # the batch dimension is dynamic
        x = np.random.default_rng(rows).standard_normal((rows, *shape)).astype(np.float32)
        got = _run(model, x)
        want = _torch_output(module, task, x)
        assert got.shape == want.shape
        np.testing.assert_allclose(got, want, atol=1e-5, rtol=1e-4)
    if task == "classification":
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    if task == "reconstruction":
        assert got.shape == (7,)


def test_shaped_reconstruction_gives_the_same_scores() -> None:
    torch.manual_seed(0)
    flat = FlatAutoencoder()
    shaped = ShapedAutoencoder()
    shaped.load_state_dict(flat.state_dict())
    x = np.random.default_rng(0).standard_normal((4, 2, 6)).astype(np.float32)
    got = _run(export_torch_onnx(shaped, (2, 6), "reconstruction"), x)
    np.testing.assert_allclose(
        got, _run(export_torch_onnx(flat, (2, 6), "reconstruction"), x), atol=1e-6
    )
    assert got.shape == (4,)
    assert (got > 0).all()


def test_sensor_cnn_static_int8_keeps_the_class() -> None:
    """A 1-D CNN over (channels, steps) windows: export, then int8 with N-D calibration."""
    torch.manual_seed(0)
    cnn = torch.nn.Sequential(
        torch.nn.Conv1d(3, 8, 5, padding=2),
        torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool1d(1),
        torch.nn.Flatten(),
        torch.nn.Linear(8, 4),
    )
    fp32 = export_torch_onnx(cnn, (3, 20), "classification")
    windows = np.random.default_rng(0).standard_normal((300, 3, 20)).astype(np.float32)

    int8 = quantize_int8(fp32, calibration=windows[:200], float_nodes=head_nodes(fp32))

    assert "QuantizeLinear" in {
        node.op_type for node in onnx.load_model_from_string(int8).graph.node
    }
    want, got = _run(fp32, windows[200:]), _run(int8, windows[200:])
    np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)  # the softmax stayed float
    assert np.mean(got.argmax(axis=1) == want.argmax(axis=1)) >= 0.9


def test_head_nodes() -> None:
    """The task head is marked, so that quantization can keep it in float."""
    heads = {
        task: head_nodes(export_torch_onnx(*_module(task), task))
        for task in ("classification", "regression", "reconstruction")
    }
    assert heads["classification"] == (f"{HEAD_PREFIX}/Softmax",)
    assert heads["regression"] == ()
    assert {f"{HEAD_PREFIX}/Sub", f"{HEAD_PREFIX}/ReduceMean"} <= set(heads["reconstruction"])
    with pytest.raises(ExportError, match="not an ONNX model"):
        head_nodes(b"\x08\x07" + b"\xff" * 20)


def test_export_warnings_do_not_leak(caplog: pytest.LogCaptureFixture) -> None:
    """The deprecated TorchScript exporter warns; under -W error that would fail."""
    module, shape = _module("regression")
    with caplog.at_level(logging.DEBUG, logger="compress.torch_export"):
        export_torch_onnx(module, shape, "regression")
    assert "torch.onnx warning" in caplog.text


class ReturnsTuple(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return x, x


class Flat3d(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.unsqueeze(1)


class Fails(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        raise RuntimeError("no forward\ntraceback")


class Branches(torch.nn.Module):
    """Python control flow on values: the trace (zeros) keeps the other branch."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2 if float(x.abs().sum()) > 0 else x


class Untraceable(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.from_numpy(np.sort(x.numpy(), axis=-1).copy()).flatten(1)


def _linear() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Linear(4, 2)


@pytest.mark.parametrize(
    ("module", "shape", "task", "match"),
    [
        (object(), (4,), "regression", "expected a torch.nn.Module, got object"),
        (_linear(), (4,), "ranking", "unknown task 'ranking'"),
        (_linear(), (), "regression", "non-empty tuple of positive integers"),
        (_linear(), (4, 0), "regression", "non-empty tuple of positive integers"),
        (_linear(), [4], "regression", "non-empty tuple of positive integers"),
        (_linear(), (5,), "regression", r"fails on a batch of shape \(n, 5\): RuntimeError"),
        (Fails(), (4,), "regression", r"RuntimeError: no forward$"),
        (ReturnsTuple(), (4,), "regression", "one float tensor, got tuple"),
        (Flat3d(), (4,), "classification", r"logits \(batch, classes\), got \(2, 1, 4\)"),
        (Flat3d(), (4, 3), "regression", r"\(batch,\) or \(batch, outputs\)"),
        (_linear(), (4,), "reconstruction", r"reconstruction of the input \(4,\).*\(2,\)"),
        (Branches(), (4,), "regression", r"prediction differ from torch's .*difference 1\.\d"),
        (Untraceable(), (4,), "reconstruction", "onnxruntime cannot run the exported model"),
    ],
    ids=[
        "not-a-module", "task", "empty-shape", "zero-dim", "list-shape", "wrong-shape",
        "forward-raises", "tuple-output", "3d-logits", "3d-regression", "reconstruction-size",
        "branches", "untraceable",
    ],
)  # fmt: skip
def test_refusals(module: object, shape: object, task: str, match: str) -> None:
    with pytest.raises(ExportError, match=match):
        export_torch_onnx(module, shape, task)  # type: ignore[arg-type]


@pytest.mark.parametrize("opset", [12, True, "17"])
def test_bad_opset(opset: object) -> None:
    with pytest.raises(ExportError, match="opset must be an integer >= 13"):
        export_torch_onnx(_linear(), (4,), "regression", opset=opset)  # type: ignore[arg-type]


def test_missing_torch(monkeypatch: pytest.MonkeyPatch) -> None:
    module = _linear()
    monkeypatch.setitem(sys.modules, "torch", None)
    with pytest.raises(ExportError, match=r"needs torch.*fedge\[torch"):
        export_torch_onnx(module, (4,), "regression")


def test_missing_onnxruntime(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "onnxruntime", None)
    with pytest.raises(ExportError, match="needs onnxruntime"):
        export_torch_onnx(_linear(), (4,), "regression")
