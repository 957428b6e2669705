"""``fedge train --package --baseline``: sign only a model no worse than the deployed one.

The rounds are replaced by a function that returns chosen final weights (well
trained, or the untrained starting weights), so each test decides whether the new
model is better or worse than the baseline; everything after the rounds (export,
int8, evaluation of both models in onnxruntime, the gate, signing) is the real
command. The rounds themselves are tested over mosquitto (tests/test_federated_mqtt.py).

The attack: a federated run whose result is poisoned or simply worse is signed by
``--package`` unseen. Here a model clearly worse than the deployed baseline is
refused (WorseThanBaselineError, logged, exit 1, nothing written), for a built-in
classifier and for a PyTorch regressor (lower MSE is better); a better or equal
model is packaged and verifies; ``--allow-worse`` overrides; baselines of another
task, input shape or signer are refused before any round runs.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from sklearn.datasets import load_digits
from sklearn.linear_model import LogisticRegression
from typer.testing import CliRunner

from compress.artifact import load_artifact, read_artifact_unverified
from compress.keys import (
    SigningKey,
    generate_signing_key,
    load_public_key,
    load_signing_key,
    save_keypair,
)
from compress.signing import TrustedKeys
from coordinator.cli import train as train_command
from coordinator.cli.app import app
from coordinator.delivery.baseline import load_baseline
from coordinator.delivery.lineage import parent_of
from coordinator.delivery.packaging import LabelledData, package_weights
from coordinator.errors import PackagingError, WorseThanBaselineError
from coordinator.federated.models import torch_module
from coordinator.federated.reports import RoundReport, RunResult
from coordinator.federated.runs import RunConfig
from edge_agent.runtime.loader import load_model

runner = CliRunner()
NOWHERE = "mqtt://127.0.0.1:1"  # never connected to: the rounds are replaced

Weights = dict[str, npt.NDArray[np.float32]]
Train = Callable[[RunConfig], Weights]


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Weights]:
    """Evaluation data (held-out digits) and softmax weights trained on the rest."""
    data = load_digits()
    x = (data.data / 16.0).astype(np.float32)
    y = data.target.astype(np.int64)
    fit = LogisticRegression(max_iter=500).fit(x[:1200], y[:1200])
    path = tmp_path_factory.mktemp("digits") / "eval.npz"
    np.savez(path, x=x[1200:], y=y[1200:])
    trained = {"W0": fit.coef_.T.astype(np.float32), "b0": fit.intercept_.astype(np.float32)}
    return path, trained


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """A signing key file and its public key file."""
    return save_keypair(generate_signing_key(), tmp_path_factory.mktemp("keys"))


@contextmanager
def _no_broker(_connection: Any) -> Iterator[None]:
    yield None


def _rounds(monkeypatch: pytest.MonkeyPatch, final: Train) -> None:
    """Replace the broker and the rounds: one ok round ending with ``final(config)``."""

    def run(_hub: Any, _strategy: Any, config: RunConfig, **_: Any) -> RunResult:
        return RunResult(rounds=[RoundReport(round=1, clients=2, sampled=2)], weights=final(config))

    monkeypatch.setattr(train_command, "connected", _no_broker)
    monkeypatch.setattr(train_command, "_run", run)


def untrained(config: RunConfig) -> Weights:
    return dict(config.initial_weights)


def fedge_train(*args: str) -> tuple[int, str]:
    result = runner.invoke(app, ["train", "--broker", NOWHERE, *args])
    return result.exit_code, " ".join(result.output.replace("│", " ").split())


def _rounds_must_not_run(monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(config: RunConfig) -> Weights:
        raise AssertionError("the baseline must be refused before any round runs")

    _rounds(monkeypatch, refuse)


@dataclass
class Softmax:
    """``fedge train --package`` of the built-in softmax digits model in ``tmp_path``,
    with the rounds replaced by a function returning chosen final weights."""

    monkeypatch: pytest.MonkeyPatch
    tmp_path: Path
    eval_data: Path
    trained: Weights
    key: Path
    pub: Path

    def well_trained(self, _config: RunConfig) -> Weights:
        return self.trained

    def command(self, out: str) -> tuple[str, ...]:
        return ("--model", "digits", "--family", "softmax", "--eval-data", str(self.eval_data),
                "--package", str(self.tmp_path / out), "--key", str(self.key))  # fmt: skip

    def train(self, final: Train, out: str, *extra: str) -> tuple[int, str]:
        """Package the model the rounds end with (``final(config)``) as ``out``."""
        _rounds(self.monkeypatch, final)
        return fedge_train(*self.command(out), *extra)

    def deployed(self, final: Train | None = None, *extra: str) -> Path:
        """``deployed.fedge``, packaged (the well trained model unless ``final`` is given)."""
        code, output = self.train(final or self.well_trained, "deployed.fedge", *extra)
        assert code == 0, output
        return self.tmp_path / "deployed.fedge"

    def refused_before_the_rounds(self, *extra: str) -> tuple[int, str]:
        """Train into ``new.fedge`` with rounds that fail the test if they run."""
        _rounds_must_not_run(self.monkeypatch)
        return fedge_train(*self.command("new.fedge"), *extra)


@pytest.fixture
def softmax(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    digits: tuple[Path, Weights],
    keys: tuple[Path, Path],
) -> Softmax:
    return Softmax(monkeypatch, tmp_path, *digits, *keys)


# --------------------------------------------------------------------------- built-in model


def test_a_worse_model_is_refused_and_nothing_is_written(
    softmax: Softmax, caplog: pytest.LogCaptureFixture
) -> None:
    code, output = softmax.train(softmax.well_trained, "deployed.fedge")
    assert code == 0, output
    assert "no deployed baseline compared" in output  # said when there is no --baseline

    deployed = softmax.tmp_path / "deployed.fedge"
    with caplog.at_level(logging.INFO):
        code, output = softmax.train(untrained, "new.fedge", "--baseline", str(deployed),
                                     "--baseline-trust", str(softmax.pub),
                                     "--version", "2")  # fmt: skip
    assert code == 1
    assert "the new model is worse than the deployed one" in output
    assert "new model accuracy 0." in output
    assert "deployed digits v1 (accuracy 0.9" in output
    assert not (softmax.tmp_path / "new.fedge").exists()
    refusals = [r for r in caplog.records if r.levelno == logging.ERROR
                and "refusing to package" in r.getMessage()]  # fmt: skip
    assert len(refusals) == 1


def test_a_better_or_equal_model_is_packaged(softmax: Softmax) -> None:
    deployed = softmax.deployed(untrained)
    code, output = softmax.train(softmax.well_trained, "new.fedge", "--baseline", str(deployed),
                                 "--baseline-trust", str(softmax.pub),
                                 "--version", "2")  # fmt: skip
    assert code == 0, output
    assert "no worse than the deployed digits v1 (accuracy 0.0" in output
    new = softmax.tmp_path / "new.fedge"
    trusted = TrustedKeys.of([load_public_key(softmax.pub)])
    artifact = load_artifact(new, trusted, now=datetime.now(UTC))
    assert artifact.manifest.version == 2
    assert artifact.manifest.metadata["task"] == "classification"
    # its lineage: the run's figures, trigger manual, the --baseline model as its parent
    lineage = artifact.manifest.lineage
    assert lineage is not None
    assert (lineage.rounds, lineage.strategy, lineage.codec, lineage.participants) == (
        1, "fedavg", "fp32", 2,
    )  # fmt: skip
    assert lineage.trigger.kind == "manual"
    deployed_manifest = load_artifact(deployed, trusted, now=datetime.now(UTC)).manifest
    assert lineage.parent == parent_of(deployed_manifest)
    assert deployed_manifest.lineage is not None
    assert deployed_manifest.lineage.parent is None

    # matches the baseline: "beats or matches"
    code, output = softmax.train(softmax.well_trained, "same.fedge", "--baseline", str(new),
                                 "--version", "3")  # fmt: skip
    assert code == 0, output
    assert "signatures not checked" in output  # no --trust: parsed only, and said so
    assert (softmax.tmp_path / "same.fedge").exists()


def test_allow_worse_packages_a_worse_model_with_a_warning(
    softmax: Softmax, caplog: pytest.LogCaptureFixture
) -> None:
    deployed = softmax.deployed()
    with caplog.at_level(logging.WARNING):
        code, output = softmax.train(untrained, "new.fedge", "--baseline", str(deployed),
                                     "--allow-worse", "--version", "2")  # fmt: skip
    assert code == 0, output
    assert "worse than (--allow-worse) the deployed digits v1" in output
    assert (softmax.tmp_path / "new.fedge").exists()
    assert any("--allow-worse" in r.getMessage() for r in caplog.records
               if r.levelno == logging.WARNING)  # fmt: skip


def test_a_tolerance_lets_a_slightly_worse_model_through(softmax: Softmax) -> None:
    deployed = softmax.deployed()
    code, output = softmax.train(untrained, "n.fedge", "--baseline", str(deployed),
                                 "--baseline-tolerance", "1", "--version", "2")  # fmt: skip
    assert code == 0, output


@pytest.mark.parametrize(
    ("weights", "metadata", "message"),
    [
        ({"W0": np.zeros((32, 10), np.float32), "b0": np.zeros(10, np.float32)}, {},
         "takes inputs [(32,)]; the evaluation examples have shape (64,)"),
        ({"W0": np.zeros((64, 10), np.float32), "b0": np.zeros(10, np.float32)},
         {"task": "regression"},
         "is a regression model (other); the new model does classification"),
    ],
)  # fmt: skip
def test_a_baseline_of_another_shape_or_task_is_refused_before_the_rounds(
    softmax: Softmax, weights: Weights, metadata: dict[str, str], message: str
) -> None:
    other = softmax.tmp_path / "other.fedge"
    package_weights("softmax", weights, name="other", version=1, keys=[_signing(softmax.key)],
                    out=other, metadata=metadata, now=datetime.now(UTC))  # fmt: skip
    code, output = softmax.refused_before_the_rounds("--baseline", str(other))
    assert code == 1
    assert message in output
    assert not (softmax.tmp_path / "new.fedge").exists()


def test_a_baseline_with_other_outputs_is_refused_before_signing(softmax: Softmax) -> None:
    nine = softmax.tmp_path / "nine.fedge"  # 9 classes: same input, other outputs
    trained = softmax.trained
    package_weights("softmax", {"W0": trained["W0"][:, :9], "b0": trained["b0"][:9]},
                    name="nine", version=1, keys=[_signing(softmax.key)], out=nine,
                    now=datetime.now(UTC))  # fmt: skip
    code, output = softmax.train(softmax.well_trained, "new.fedge", "--baseline", str(nine))
    assert code == 1
    assert "the new model's outputs [(10,)] differ from the deployed model's [(9,)]" in output
    assert not (softmax.tmp_path / "new.fedge").exists()


def test_a_baseline_not_signed_by_a_trusted_key_is_refused(softmax: Softmax) -> None:
    deployed = softmax.deployed()
    _, other_pub = save_keypair(generate_signing_key(), softmax.tmp_path / "other")
    trust = ("--baseline-trust", str(other_pub))
    code, output = softmax.refused_before_the_rounds("--baseline", str(deployed), *trust)
    assert code == 1
    assert f"baseline {deployed}: signed by no trusted key" in output


def test_a_version_devices_would_refuse_as_a_rollback_is_refused_before_the_rounds(
    softmax: Softmax,
) -> None:
    deployed = softmax.deployed(None, "--version", "3")
    code, output = softmax.refused_before_the_rounds("--baseline", str(deployed),
                                                     "--version", "3")  # fmt: skip
    assert code == 1
    assert "--version 3 is not above the deployed digits v3 (--baseline)" in output
    assert "give --version 4" in output
    assert not (softmax.tmp_path / "new.fedge").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--baseline", "b.fedge"), "--baseline gates --package"),
        (("--allow-worse",), "--baseline-trust are about --baseline: give --baseline"),
        (("--baseline-tolerance", "0.1"), "--baseline-trust are about --baseline: give --baseline"),
    ],
)
def test_gate_options_that_do_not_fit_are_refused(
    monkeypatch: pytest.MonkeyPatch,
    digits: tuple[Path, Weights],
    args: tuple[str, ...],
    message: str,
) -> None:
    _rounds_must_not_run(monkeypatch)
    code, output = fedge_train("--model", "digits", "--family", "softmax", "--eval-data",
                               str(digits[0]), *args)  # fmt: skip
    assert code == 1
    assert message in output


def test_the_gate_compares_in_the_direction_of_the_metric(
    tmp_path: Path, digits: tuple[Path, Weights], keys: tuple[Path, Path]
) -> None:
    eval_data, trained = digits
    deployed = tmp_path / "deployed.fedge"
    package_weights("softmax", trained, name="d", version=1, keys=[_signing(keys[0])],
                    out=deployed, now=datetime.now(UTC))  # fmt: skip
    with np.load(eval_data) as arrays:
        evaluation = LabelledData(x=arrays["x"], y=arrays["y"])
    for higher_is_better in (True, False):
        baseline = load_baseline(deployed, evaluation, higher_is_better=higher_is_better)
        better = baseline.value + 0.01 if higher_is_better else baseline.value - 0.01
        worse = baseline.value - 0.01 if higher_is_better else baseline.value + 0.01
        assert baseline.worse_by(better) < 0 < baseline.worse_by(worse)
        assert baseline.worse_by(baseline.value) == 0
    _, payload = read_artifact_unverified(deployed)
    model = load_model("onnx", payload)
    gate = load_baseline(deployed, evaluation, higher_is_better=True).gate()
    gate(model, 1.0)  # better: passes
    with pytest.raises(WorseThanBaselineError, match=r"new model accuracy 0\.5, deployed d v1"):
        gate(model, 0.5)
    with pytest.raises(PackagingError, match="tolerance must be >= 0"):
        baseline.gate(tolerance=-1.0)


def _signing(path: Path) -> SigningKey:
    return load_signing_key(path)


# --------------------------------------------------------------------------- PyTorch model


@pytest.fixture(scope="module")
def regression_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((300, 8)).astype(np.float32)
    noise = 0.5 * rng.standard_normal(300)  # an error floor int8 cannot add much to
    y = (x @ rng.standard_normal(8) + 0.5 + noise).astype(np.float32)
    path = tmp_path_factory.mktemp("regression") / "eval.npz"
    np.savez(path, x=x, y=y)
    return path


def _fitted(eval_data: Path) -> Train:
    """Train the run's module on the (here also evaluation) rows for a few seconds."""

    def fit(config: RunConfig) -> Weights:
        import torch  # noqa: PLC0415

        from edge_agent.training.torch_models import module_weights  # noqa: PLC0415

        torch.manual_seed(0)
        module = torch_module(config.definition, config.initial_weights)
        with np.load(eval_data) as arrays:
            x, y = torch.from_numpy(arrays["x"]), torch.from_numpy(arrays["y"]).reshape(-1, 1)
        optimizer = torch.optim.Adam(module.parameters(), lr=0.01)
        for _ in range(200):
            optimizer.zero_grad()
            torch.nn.functional.mse_loss(module(x), y).backward()
            optimizer.step()
        module.eval()
        return module_weights(module)

    return fit


@pytest.mark.usefixtures("torch_one_thread")
def test_a_worse_torch_regressor_is_refused_and_a_better_one_packaged(
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    regression_data: Path,
    keys: tuple[Path, Path],
) -> None:
    key, pub = keys

    def torch_train(final: Train, out: Path, *extra: str) -> tuple[int, str]:
        _rounds(monkeypatch, final)
        return fedge_train("--model", "zoo:mlp_regressor", "--eval-data", str(regression_data),
                           "--package", str(out), "--key", str(key), "--baseline-trust", str(pub),
                           *extra)  # fmt: skip

    untrained_artifact = tmp_path / "untrained.fedge"
    code, output = torch_train(untrained, untrained_artifact)
    assert code == 1  # --baseline-trust without --baseline is refused
    assert "--baseline-trust are about --baseline: give --baseline" in output

    deployed = tmp_path / "deployed.fedge"
    _rounds(monkeypatch, _fitted(regression_data))
    code, output = fedge_train("--model", "zoo:mlp_regressor", "--eval-data",
                               str(regression_data), "--package", str(deployed), "--key",
                               str(key))  # fmt: skip
    assert code == 0, output
    signed, _ = read_artifact_unverified(deployed)
    assert signed.manifest.metadata["task"] == "regression"

    new = tmp_path / "new.fedge"
    code, output = torch_train(untrained, new, "--baseline", str(deployed), "--version", "2")
    assert code == 1
    assert "the new model is worse than the deployed one: new model mse" in output
    assert not new.exists()
    code, output = torch_train(_fitted(regression_data), new, "--baseline", str(deployed),
                               "--version", "2")  # fmt: skip
    assert code == 0, output
    assert "no worse than the deployed mlp-regressor v1 (mse" in output
    assert new.exists()
