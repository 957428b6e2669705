"""``fedge simulate`` end to end: embedded broker, mosquitto, dropouts."""

from __future__ import annotations

import json
import logging
import resource
import struct
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from typer.testing import CliRunner

from coordinator.cli.app import app
from coordinator.errors import RunError
from coordinator.sim.simulate import SimulationConfig, run_simulation
from tests.fleet_support import Mosquitto

pytestmark = pytest.mark.slow

runner = CliRunner()
FEDGE_PACKAGES = {"compress", "edge_agent", "coordinator"}


def simulate(*args: str) -> dict[str, Any]:
    result = runner.invoke(app, ["simulate", *args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report: dict[str, Any] = json.loads(result.stdout)
    return report


def assert_png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    assert data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 400
    assert height >= 300
    assert data[-8:-4] == b"IEND"


def check_run(report: dict[str, Any], out: Path, agents: int, rounds: int) -> None:
    assert json.loads((out / "report.json").read_text()) == report
    assert [r["round"] for r in report["rounds"]] == list(range(1, rounds + 1))
    for fields in report["rounds"]:
        assert {"accuracy", "loss", "clients", "uplink_bytes", "downlink_bytes"} <= set(fields)
    assert report["final_accuracy"] > 0.5  # ten classes: chance is 0.1
    assert report["centralized_accuracy"] > 0.5
    assert report["fp32_uplink_bytes_per_round"] > 0
    rollout = report["rollout"]
    assert rollout["version"] == 1
    assert rollout["agents_total"] == rollout["agents_updated"] == agents
    assert rollout["canary_installed"] == 1
    assert rollout["stages"][0] == {**rollout["stages"][0], "stage": "canary", "targeted": 1}
    assert sum(stage["installed"] for stage in rollout["stages"]) == agents
    assert_png(out / "report.png")
    assert (out / "artifacts" / "simulated-v1.fedge").stat().st_size > 0
    assert len(list((out / "agents").iterdir())) == agents


def test_simulate_on_the_embedded_broker(tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = simulate("--agents", "5", "--rounds", "3", "--out", str(out))
    check_run(report, out, agents=5, rounds=3)
    assert report["broker"] == "embedded amqtt"
    assert report["data"]["dataset"] == "digits"
    assert report["data"]["summary"].startswith("digits (auto), dirichlet:0.5: 1257 examples, ")
    assert all(r["status"] == "ok" and r["clients"] == 5 for r in report["rounds"])
    lineage = report["packaging"]["lineage"]  # the artifact's lineage, in the report too
    assert (lineage["rounds"], lineage["participants"], lineage["strategy"]) == (3, 5, "fedavg")
    assert lineage["trigger"] == {"kind": "manual"}


@pytest.fixture
def broker_users() -> list[str]:
    return [f"sim{i:02d}" for i in range(5)]


def test_simulate_against_mosquitto(tmp_path: Path, broker: Mosquitto) -> None:
    out = tmp_path / "run"
    report = simulate(
        "--agents", "5", "--rounds", "3", "--out", str(out), "--broker", broker.url,
        "--broker-password-format", "pw-{user}", "--codec", "topk:0.1+int8",
    )  # fmt: skip
    check_run(report, out, agents=5, rounds=3)
    assert report["broker"] == broker.url
    assert report["uplink_bytes_per_round"] < report["fp32_uplink_bytes_per_round"] / 4


def test_simulate_with_dropouts_records_the_rounds_that_lost_agents(tmp_path: Path) -> None:
    out = tmp_path / "run"
    report = simulate("--agents", "10", "--rounds", "5", "--dropout", "0.2", "--out", str(out))
    check_run(report, out, agents=10, rounds=5)
    dropped = report["rollout"]["dropped_per_round"]
    assert sum(dropped.values()) > 0
    for fields in report["rounds"]:
        assert fields["status"] == "ok"
        assert fields["clients"] == fields["sampled"] - fields["dropped"]
    assert any(r["dropped"] > 0 for r in report["rounds"])


@pytest.mark.parametrize(
    "args",
    [
        ["--partition", "zipf"],
        ["--dataset", "imagenet"],
        ["--agents", "2001"],
        ["--codec", "zip"],
        ["--model", "no-such-family"],
        ["--model", "zoo:resnet"],
        ["--task", "ranking"],
        ["--optimizer", "lbfgs"],
        ["--dataset", "diabetes"],  # the built-in MLP classifies; diabetes is regression
        ["--model", "zoo:small_cnn", "--dataset", "digits-images", "--task", "regression"],
    ],
)
def test_simulate_refuses_bad_options_in_one_line(tmp_path: Path, args: list[str]) -> None:
    result = runner.invoke(app, ["simulate", *args, "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "error:" in result.output
    assert "Traceback" not in result.output


def test_the_readme_main_command_fedge_simulate_with_no_arguments(tmp_path: Path) -> None:
    fedge = Path(sys.executable).parent / "fedge"
    result = subprocess.run(
        [str(fedge), "simulate"], cwd=tmp_path, capture_output=True, text=True, timeout=120,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    (run,) = (tmp_path / "runs").iterdir()
    report = json.loads((run / "report.json").read_text())
    check_run(report, run, agents=20, rounds=20)
    assert report["final_accuracy"] > 0.85
    assert "20/20 agents serve it" in result.stdout


def test_too_low_an_open_files_limit_is_refused_before_any_work(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One socket per agent: a hard limit below the need is a clear error, not a hang."""
    monkeypatch.setattr(resource, "getrlimit", lambda _which: (256, 1024))
    with pytest.raises(RunError, match=r"1000 agents need about 7256 open files.*1024"):
        run_simulation(SimulationConfig(out=tmp_path / "run", agents=1000))
    assert not (tmp_path / "run" / "data").exists()


def test_a_simulation_on_the_embedded_broker_logs_no_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """No agent gets another's retained status, and no connection is lost (amqtt's
    retained messages on connect, see coordinator.sim.embedded_broker)."""
    caplog.set_level(logging.WARNING)
    report = run_simulation(SimulationConfig(out=tmp_path / "run", agents=5, rounds=1, epochs=1))
    assert report.rollout["all_serving"]
    fedge_warnings = [
        f"{r.name}: {r.getMessage()}"
        for r in caplog.records
        if r.levelno >= logging.WARNING and r.name.split(".")[0] in FEDGE_PACKAGES
    ]
    assert fedge_warnings == []


def test_robust_reaches_the_run_and_the_report(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``fedge simulate --robust``: the rounds run with robust aggregation (clipping to
    the round's medians) and the report's config says so."""
    from coordinator.sim import simulate as simulate_module  # noqa: PLC0415

    seen: list[bool] = []
    real_run = simulate_module.run_training

    def recording(hub: Any, strategy: Any, config: Any, **kwargs: Any) -> Any:
        seen.append(config.robust)
        return real_run(hub, strategy, config, **kwargs)

    monkeypatch.setattr(simulate_module, "run_training", recording)
    out = tmp_path / "run"
    report = simulate("--agents", "3", "--rounds", "1", "--epochs", "1", "--robust",
                      "--out", str(out))  # fmt: skip
    assert seen == [True]
    assert report["config"]["robust"] is True
    assert report["rounds"][0]["status"] == "ok"
    assert report["rollout"]["all_serving"]
    assert SimulationConfig(out=out).robust is False  # off unless asked
