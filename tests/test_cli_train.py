"""``fedge train`` with a PyTorch model spec: what it refuses before it connects, and
the model options shared with ``fedge rounds start`` (coordinator.cli.training_options).

The rounds themselves are tested over mosquitto (tests/test_federated_mqtt.py) and
on a MemoryHub (tests/test_federated_torch_runs.py)."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import typer
from typer.testing import CliRunner

from coordinator.cli import train as train_command
from coordinator.cli.app import app, use_current_directory
from coordinator.cli.training_options import aggregation_settings, input_shape, model_settings
from coordinator.federated.runs import RunConfig, RunResult

runner = CliRunner()
NOWHERE = "mqtt://127.0.0.1:1"  # nothing listens: these commands must fail before connecting


def fedge_train(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", "--broker", NOWHERE, *args])
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


# --------------------------------------------------------------------------- model_settings


def test_a_name_is_a_built_in_model_as_before() -> None:
    settings = model_settings(model="digits", name=None, family="softmax", task=None,
                              shape=None, outputs=None)  # fmt: skip
    assert settings == {"model": "digits", "family": "softmax"}
    assert model_settings(model=None, name=None, family=None, task=None, shape=None,
                          outputs=None) == {}  # fmt: skip


def test_a_spec_is_a_pytorch_model_named_after_its_function() -> None:
    settings = model_settings(model="zoo:dense_autoencoder", name=None, family=None,
                              task="reconstruction", shape="1,16", outputs=None)  # fmt: skip
    assert settings == {
        "model": "dense-autoencoder",
        "model_spec": "zoo:dense_autoencoder",
        "task": "reconstruction",
        "input_shape": [1, 16],
    }
    named = model_settings(model="my_pkg.models:tiny_cnn", name="cam", family=None, task=None,
                           shape=None, outputs=3)  # fmt: skip
    assert named == {"model": "cam", "model_spec": "my_pkg.models:tiny_cnn", "num_outputs": 3}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"model": "zoo:small_cnn", "family": "mlp"}, "--family is for the built-in models"),
        ({"model": "pkg:f:g"}, "must be module.path:function"),
        ({"model": "digits", "task": "reconstruction"}, "--task reconstruction need(s)"),
        ({"model": "digits", "outputs": 2}, "--outputs need(s) a PyTorch model"),
        ({"model": None, "name": "x"}, "--name need(s) a PyTorch model"),
    ],
)
def test_model_settings_refuse_options_that_do_not_fit(
    fields: dict[str, object], message: str
) -> None:
    given: dict[str, object] = {"model": None, "name": None, "family": None, "task": None,
                                "shape": None, "outputs": None}  # fmt: skip
    with pytest.raises(typer.BadParameter, match=message.replace("(", r"\(").replace(")", r"\)")):
        model_settings(**{**given, **fields})  # type: ignore[arg-type]


@pytest.mark.parametrize(("text", "shape"), [(None, None), ("4", [4]), ("1, 28,28", [1, 28, 28])])
def test_input_shape(text: str | None, shape: list[int] | None) -> None:
    assert input_shape(text) == shape


@pytest.mark.parametrize("text", ["", "1,,2", "0", "1,-2", "1.5", "a"])
def test_input_shape_refuses_what_is_not_positive_integers(text: str) -> None:
    with pytest.raises(typer.BadParameter, match="positive integers"):
        input_shape(text)


# --------------------------------------------------------------------------- fedge train


def test_aggregation_settings_leave_out_what_was_not_given() -> None:
    assert aggregation_settings(False, None, None) == {}
    assert aggregation_settings(True, 500, 4.0) == {
        "robust": True, "max_examples_per_update": 500, "norm_multiple": 4.0,
    }  # fmt: skip


def test_train_hands_the_aggregation_options_to_the_run(monkeypatch: pytest.MonkeyPatch) -> None:
    runs: list[RunConfig] = []

    @contextmanager
    def no_broker(_connection: Any) -> Iterator[None]:
        yield None

    def record(_hub: Any, _strategy: Any, config: RunConfig, **_: Any) -> RunResult:
        runs.append(config)
        return RunResult(rounds=[], weights=dict(config.initial_weights))

    monkeypatch.setattr(train_command, "connected", no_broker)
    monkeypatch.setattr(train_command, "_run", record)
    common = ("--model", "m", "--family", "softmax", "--features", "4", "--classes", "2",
              "--json")  # fmt: skip
    fedge_train(*common)
    fedge_train(*common, "--robust", "--max-examples-per-update", "500", "--norm-multiple", "4")
    assert [(r.robust, r.max_examples_per_update, r.norm_multiple) for r in runs] == [
        (False, 100_000, 10.0), (True, 500, 4.0),
    ]  # fmt: skip


@pytest.mark.parametrize(
    ("args", "exit_code", "message"),
    [
        pytest.param(("--model", "m", "--norm-multiple", "0.5"), 2, "--norm-multiple",
                     id="norm-multiple-below-one"),
        pytest.param(("--model", "zoo:small_cnn", "--task", "classification"), 1,
                     "give --eval-data, or --input-shape and --outputs, for zoo:small_cnn",
                     id="spec-without-sizes-or-data"),
        pytest.param(("--model", "zoo:small_cnn", "--family", "mlp"), 2,
                     "--family is for the built-in models", id="family-with-a-spec"),
        pytest.param(("--model", "digits", "--task", "regression"), 2,
                     "--task regression need(s) a PyTorch model",
                     id="task-built-in-cannot-learn"),
        pytest.param(("--model", "zoo:small_cnn", "--task", "ranking"), 2, "ranking",
                     id="unknown-task"),
    ],
)  # fmt: skip
def test_train_refuses_bad_options(args: tuple[str, ...], exit_code: int, message: str) -> None:
    code, output = fedge_train(*args)
    assert code == exit_code
    assert message in output


def test_train_refuses_to_package_a_spec_without_evaluation_data(tmp_path: Path) -> None:
    code, output = fedge_train("--model", "zoo:small_cnn", "--task", "classification",
                               "--input-shape", "1,8,8", "--outputs", "10",
                               "--package", str(tmp_path / "a.fedge"))  # fmt: skip
    assert code == 1
    assert "--package of a PyTorch model needs --eval-data" in output
    assert "BrokerError" not in output  # refused before connecting
    assert not (tmp_path / "a.fedge").exists()


def test_train_reads_the_evaluation_data_for_the_task(tmp_path: Path) -> None:
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.zeros((4, 3), np.float32), y=np.array([0.5, 1.0, 2.0, 3.0]))
    code, output = fedge_train("--model", "mypkg.models:reg", "--task", "classification",
                               "--eval-data", str(data))  # fmt: skip
    assert code == 1
    assert "y must be integer class labels" in output  # float targets are no class labels


def test_train_checks_the_evaluation_data_against_the_model(tmp_path: Path) -> None:
    data = tmp_path / "eval.npz"
    np.savez(data, x=np.zeros((4, 64), np.float32), y=np.array([0, 1, 0, 1]))
    init = tmp_path / "init.npz"
    np.savez(init, w=np.zeros((2, 2), np.float32))
    code, output = fedge_train(
        "--model", "mypkg.models:cnn", "--task", "classification", "--input-shape", "1,8,8",
        "--outputs", "2", "--eval-data", str(data), "--init", str(init),
    )  # fmt: skip
    assert code == 1
    assert "the evaluation examples have shape (64,), mypkg.models:cnn takes (1, 8, 8)" in output


# --------------------------------------------------------------------------- sys.path


def test_the_current_directory_comes_first_on_the_path(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    (tmp_path / "fedge_cwd_probe_models.py").write_text("VALUE = 42\n")
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p != str(tmp_path)])
    monkeypatch.chdir(tmp_path)
    use_current_directory()
    use_current_directory()  # once only
    assert sys.path[0] == str(tmp_path)
    assert sys.path.count(str(tmp_path)) == 1
    monkeypatch.delitem(sys.modules, "fedge_cwd_probe_models", raising=False)
    import fedge_cwd_probe_models  # type: ignore[import-not-found]  # noqa: PLC0415

    assert fedge_cwd_probe_models.VALUE == 42
    monkeypatch.delitem(sys.modules, "fedge_cwd_probe_models")
