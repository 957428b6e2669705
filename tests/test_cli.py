"""The ``fedge`` and ``fedge-agent`` command lines, end to end on real files."""

from __future__ import annotations

import json
import shutil
import stat
import subprocess
import sys
from datetime import timedelta
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from compress.artifact import write_artifact
from compress.families import forward, init_weights
from compress.keys import generate_signing_key, save_keypair
from compress.onnx_export import export_onnx
from compress.signing import sign_manifest
from coordinator.cli.app import app
from edge_agent.cli import main as agent_main
from edge_agent.protocol import MOSQUITTO_ACL
from tests.conftest import NOW, PAYLOAD, make_manifest

runner = CliRunner()
BIN = Path(sys.executable).parent


def fedge(*args: str | Path) -> tuple[int, str]:
    result = runner.invoke(app, [str(a) for a in args], catch_exceptions=False)
    return result.exit_code, result.output


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    """keys/, w.npz (an mlp), model.onnx and data.npz labelled by the fp32 model."""
    save_keypair(generate_signing_key(), tmp_path / "keys")
    rng = np.random.default_rng(0)
    weights = init_weights("mlp", [16, 128, 4], rng)
    np.savez(tmp_path / "w.npz", **weights)
    (tmp_path / "model.onnx").write_bytes(export_onnx("mlp", weights))
    x = rng.random((200, 16), dtype=np.float32)
    np.savez(tmp_path / "data.npz", x=x, y=forward("mlp", weights, x).argmax(axis=1))
    return tmp_path


@pytest.fixture
def artifact(workdir: Path) -> Path:
    code, out = fedge(
        "model",
        "package",
        workdir / "model.onnx",
        "--name",
        "toy",
        "--version",
        "3",
        "--key",
        workdir / "keys/signing.key",
        "--out",
        workdir / "toy.fedge",
    )
    assert code == 0, out
    return workdir / "toy.fedge"


def test_console_scripts_print_help() -> None:
    for script in ("fedge", "fedge-agent"):
        exe = shutil.which(script, path=str(BIN)) or shutil.which(script)
        assert exe, f"{script} is not installed"
        out = subprocess.run([exe, "--help"], capture_output=True, text=True, check=True)
        assert "usage" in out.stdout.lower()
    out = subprocess.run(
        [shutil.which("fedge", path=str(BIN)) or "fedge", "model", "--help"],
        capture_output=True,
        text=True,
        check=True,
    )
    for command in ("export", "package", "inspect"):
        assert command in out.stdout


def test_keys_generate(tmp_path: Path) -> None:
    code, out = fedge("keys", "generate", "--out", tmp_path / "keys")
    assert code == 0, out
    private = tmp_path / "keys/signing.key"
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    code, key_id = fedge("keys", "id", tmp_path / "keys/signing.pub")
    assert code == 0
    assert key_id.strip() in out
    assert fedge("keys", "id", private)[1] == key_id
    code, out = fedge("keys", "generate", "--out", tmp_path / "keys")
    assert code == 1
    assert "refusing to overwrite" in out


def test_export_onnx_and_tflite(workdir: Path) -> None:
    code, out = fedge(
        "model",
        "export",
        "--family",
        "mlp",
        "--weights",
        workdir / "w.npz",
        "--out",
        workdir / "m.onnx",
    )
    assert code == 0, out
    assert (workdir / "m.onnx").read_bytes() == (workdir / "model.onnx").read_bytes()
    code, out = fedge(
        "model",
        "export",
        "--family",
        "mlp",
        "--weights",
        workdir / "w.npz",
        "--out",
        workdir / "m.tflite",
        "--format",
        "tflite",
    )
    assert code == 0, out
    assert (workdir / "m.tflite").read_bytes()[4:8] == b"TFL3"


@pytest.mark.parametrize(
    ("family", "weights", "message"),
    [
        ("softmax", "w.npz", "exactly one layer"),
        ("cnn", "w.npz", "unknown model family"),
        ("mlp", "missing.npz", "no such weights file"),
        ("mlp", "data.npz", "W0, b0"),
        ("mlp", "keys/signing.pub", "not a readable .npz"),
    ],
)
def test_export_errors_are_one_line(workdir: Path, family: str, weights: str, message: str) -> None:
    code, out = fedge(
        "model",
        "export",
        "--family",
        family,
        "--weights",
        workdir / weights,
        "--out",
        workdir / "m.onnx",
    )
    assert code == 1
    assert message in out
    assert out.startswith("error:")
    assert len(out.strip().splitlines()) == 1


def test_package_reports_sizes_and_accuracy(workdir: Path) -> None:
    code, out = fedge(
        "model",
        "package",
        workdir / "model.onnx",
        "--name",
        "toy",
        "--version",
        "1",
        "--key",
        workdir / "keys/signing.key",
        "--out",
        workdir / "t.fedge",
        "--eval",
        workdir / "data.npz",
        "--json",
    )
    assert code == 0, out
    report = json.loads(out)
    assert report["manifest"]["quantization"] == "int8-dynamic"
    assert report["packaged_bytes"] < report["fp32_bytes"]
    assert report["fp32_accuracy"] == 1.0
    assert report["accuracy_drop_points"] <= 1.0


def test_package_static_with_calibration(workdir: Path) -> None:
    code, out = fedge(
        "model",
        "package",
        workdir / "model.onnx",
        "--name",
        "toy",
        "--version",
        "1",
        "--key",
        workdir / "keys/signing.key",
        "--out",
        workdir / "t.fedge",
        "--calibration",
        workdir / "data.npz",
    )
    assert code == 0, out
    assert "int8-static" in out
    # The calibration rows give the reference profile, which inspect shows briefly.
    code, out = fedge("model", "inspect", workdir / "t.fedge", "--no-verify")
    assert code == 0, out
    assert "16 features (vector (16,))" in out


def test_package_refuses_a_large_accuracy_drop(workdir: Path) -> None:
    # A huge weight on a feature that is always zero does not change fp32 predictions,
    # but it sets the int8 scale of every output column, which wipes out the rest.
    rng = np.random.default_rng(1)
    weights = init_weights("mlp", [16, 128, 4], rng)
    weights["W0"][0, :] = 1e4
    x = rng.random((300, 16), dtype=np.float32)
    x[:, 0] = 0.0
    (workdir / "fragile.onnx").write_bytes(export_onnx("mlp", weights))
    np.savez(workdir / "fragile.npz", x=x, y=forward("mlp", weights, x).argmax(axis=1))
    code, out = fedge(
        "model",
        "package",
        workdir / "fragile.onnx",
        "--name",
        "toy",
        "--version",
        "1",
        "--key",
        workdir / "keys/signing.key",
        "--out",
        workdir / "f.fedge",
        "--eval",
        workdir / "fragile.npz",
    )
    assert code == 1
    assert "points below fp32" in out
    assert not (workdir / "f.fedge").exists()


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--name", "Bad Name"], "model name"),
        (["--key", "keys/signing.pub"], "private key"),
        (["--eval", "w.npz"], "expected arrays 'x' and 'y'"),
        (["--calibration", "missing.npz"], "missing.npz"),
    ],
)
def test_package_input_errors(workdir: Path, args: list[str], message: str) -> None:
    base = {"--name": "toy", "--key": "keys/signing.key"}
    extra: list[str] = []
    for flag, value in zip(args[::2], args[1::2], strict=True):
        if flag in base:
            base[flag] = value
        else:
            extra += [flag, str(workdir / value)]
    code, out = fedge(
        "model",
        "package",
        workdir / "model.onnx",
        "--version",
        "1",
        "--name",
        base["--name"],
        "--key",
        workdir / base["--key"],
        "--out",
        workdir / "t.fedge",
        *extra,
    )
    assert code == 1
    assert message in out


def test_package_missing_model(workdir: Path) -> None:
    code, out = fedge(
        "model",
        "package",
        workdir / "nope.onnx",
        "--name",
        "toy",
        "--version",
        "1",
        "--key",
        workdir / "keys/signing.key",
        "--out",
        workdir / "t.fedge",
    )
    assert code == 1
    assert "no such model file" in out


def test_inspect_verified(artifact: Path, workdir: Path) -> None:
    code, out = fedge("model", "inspect", artifact, "--trust", workdir / "keys/signing.pub")
    assert code == 0, out
    assert "verified" in out
    assert "toy" in out
    code, out = fedge(
        "model", "inspect", artifact, "--trust", workdir / "keys/signing.pub", "--json"
    )
    report = json.loads(out)
    assert report["verified"] is True
    assert report["manifest"]["version"] == 3
    assert report["manifest"]["health_check"]["inputs"]["input"]["shape"] == [4, 16]


def test_inspect_without_trust(artifact: Path) -> None:
    code, out = fedge("model", "inspect", artifact)
    assert code == 1
    assert "--trust" in out
    code, out = fedge("model", "inspect", artifact, "--no-verify")
    assert code == 0
    assert "NOT verified" in out


def _tamper_manifest(path: Path) -> None:
    path.write_bytes(path.read_bytes().replace(b'"version":3', b'"version":4', 1))


def _tamper_payload(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x55
    path.write_bytes(bytes(data))


def _truncate(path: Path) -> None:
    path.write_bytes(path.read_bytes()[:-7])


def _not_an_artifact(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 this is a zip, honest")


def _expired(path: Path) -> None:
    signer = generate_signing_key()
    save_keypair(signer, path.parent / "old-keys")
    manifest = make_manifest(created=NOW - timedelta(days=400), expires=NOW - timedelta(days=35))
    write_artifact(path, sign_manifest(manifest, [signer]), PAYLOAD)


@pytest.mark.parametrize(
    ("damage", "trust", "code_name", "message"),
    [
        (_tamper_manifest, "keys/signing.pub", "bad_signature", "does not verify"),
        (None, "other.pub", "unknown_key", "no trusted key"),
        (_tamper_payload, "keys/signing.pub", "payload_hash", "sha256"),
        (_truncate, "keys/signing.pub", "payload_length", "declares"),
        (_not_an_artifact, "keys/signing.pub", "not_an_artifact", "not a fedge artifact"),
        (_expired, "old-keys/signing.pub", "expired", "expired at"),
    ],
)
def test_inspect_rejects_with_one_line_reason(
    artifact: Path, workdir: Path, damage: object, trust: str, code_name: str, message: str
) -> None:
    if damage is not None:
        damage(artifact)  # type: ignore[operator]
    (workdir / "other.pub").write_bytes(generate_signing_key().public_key.to_pem())
    code, out = fedge("model", "inspect", artifact, "--trust", workdir / trust)
    assert code == 1
    assert out.startswith("error:")
    assert message in out
    assert len(out.strip().splitlines()) == 1
    code, out = fedge("model", "inspect", artifact, "--trust", workdir / trust, "--json")
    assert code == 1
    assert json.loads(out)["error"]["code"] == code_name


def test_agent_verify(artifact: Path, workdir: Path, capsys: pytest.CaptureFixture[str]) -> None:
    trust = ["--trust", str(workdir / "keys/signing.pub")]
    assert agent_main(["verify", str(artifact), *trust]) == 0
    assert "verified: toy v3" in capsys.readouterr().out
    assert agent_main(["verify", str(artifact), *trust, "--installed-version", "3"]) == 1
    assert "not newer than v3" in capsys.readouterr().err
    assert agent_main(["verify", str(artifact), *trust, "--runtime", "tflite", "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["error"]["code"] == "incompatible_device"
    _tamper_payload(artifact)
    assert agent_main(["verify", str(artifact), *trust]) == 1
    assert "sha256" in capsys.readouterr().err


def test_agent_without_command_prints_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert agent_main([]) == 2  # usage error
    assert "verify" in capsys.readouterr().out


def test_broker_acl_prints_the_shipped_acl() -> None:
    result = runner.invoke(app, ["broker", "acl"])
    assert result.exit_code == 0
    assert result.stdout == MOSQUITTO_ACL


def test_data_digits_writes_seeded_shards_and_a_test_set(tmp_path: Path) -> None:
    first = runner.invoke(app, ["data", "digits", "--clients", "4", "--alpha", "0.3",
                                "--out", str(tmp_path / "a"), "--json"])  # fmt: skip
    again = runner.invoke(app, ["data", "digits", "--clients", "4", "--alpha", "0.3",
                                "--out", str(tmp_path / "b"), "--json"])  # fmt: skip
    assert first.exit_code == 0, first.output
    doc = json.loads(first.stdout)
    assert len(doc["shards"]) == 4
    ys = []
    for shard in doc["shards"]:
        with np.load(Path(shard) / "local.npz") as arrays:
            ys.append(arrays["y"])
    with np.load(tmp_path / "a" / "test.npz") as test:
        test_size = len(test["y"])
    assert sum(len(y) for y in ys) + test_size == 1797  # all of digits, once
    assert doc["examples"] == [len(y) for y in ys]
    assert json.loads(again.stdout)["examples"] == doc["examples"]
    # Dirichlet(0.3): no device sees every class equally.
    assert any(np.bincount(y, minlength=10).max() > 3 * len(y) / 10 for y in ys)
