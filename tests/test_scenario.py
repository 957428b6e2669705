"""``fedge simulate --scenario``: the drift loop closes, the control run stays quiet (slow).

Each test runs the scenario in-process: the embedded broker, the coordinator
service with a retraining policy, six real agents predicting on their digits
shards every second (see :mod:`coordinator.scenario.drift_loop`).
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from typer.testing import CliRunner

from coordinator.cli.app import app
from coordinator.errors import RunError
from coordinator.scenario.drift_loop import ScenarioConfig, recovery, run_scenario
from coordinator.sim.scenario_data import scenario_data, shift, shift_shard

runner = CliRunner(mix_stderr=False)
LOOP = ["shift", "trigger", "run_start", "run_end", "rollout_start", "rollout_complete"]


@pytest.mark.slow
def test_drift_is_detected_retrained_rolled_out_and_recovered(tmp_path: Path) -> None:
    report = run_scenario(ScenarioConfig(out=tmp_path, scenario="drift", ticks=60, shift_tick=5))
    on_disk = json.loads((tmp_path / "report.json").read_text())
    assert on_disk["summary"] == report["summary"]
    assert (tmp_path / "report.png").stat().st_size > 10_000
    events = [e["event"] for e in report["events"]]
    assert events == LOOP
    ticks = [e["tick"] for e in report["events"]]
    assert ticks == sorted(ticks)
    summary = report["summary"]
    assert summary["detection_windows"] <= 10, summary
    assert summary["retraining_runs"] == 1
    assert summary["final_version"] == 2
    # v1 is lost on rotated digits; v2, trained on the devices' shifted data, is not.
    assert summary["accuracy_post_shift_v1"] < 0.3
    assert summary["accuracy_post_final"] > 0.85, summary
    assert summary["recovered"], summary
    timeline = report["timeline"]
    assert {row["tick"] for row in timeline} == set(range(len(timeline)))
    before = [row["drift"] for row in timeline[:5] if row["drift"] is not None]
    assert before
    assert max(before) < 0.25  # no drift before the shift
    assert max(row["drift"] or 0.0 for row in timeline) >= 0.25
    assert timeline[-1]["serving_version"] == 2


@pytest.mark.slow
def test_the_control_run_raises_no_alarm_and_retrains_nothing(tmp_path: Path) -> None:
    """Through the CLI: ``fedge simulate --scenario control`` exits 0 with no alarm."""
    args = ["simulate", "--scenario", "control", "--ticks", "30", "--out", str(tmp_path)]
    result = runner.invoke(app, [*args, "--json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    summary = report["summary"]
    assert report["events"] == []
    assert summary["false_alarms"] == 0, summary
    assert summary["drift_alarm_ticks"] == 0
    assert summary["retraining_runs"] == 0
    assert report["ticks_run"] == 30
    assert all(row["serving_version"] == 1 for row in report["timeline"])
    scored = [row for row in report["timeline"] if row["drift"] is not None]
    assert scored, "the service scored no window"
    assert (tmp_path / "report.png").exists()


def test_the_cli_names_a_bad_scenario(tmp_path: Path) -> None:
    result = runner.invoke(app, ["simulate", "--scenario", "flood", "--out", str(tmp_path)])
    assert result.exit_code == 1
    assert "--scenario must be one of drift, control" in result.stderr
    assert not (tmp_path / "report.json").exists()


def test_recovery_is_within_two_points_on_the_fleet_and_on_shifted_rows() -> None:
    # v1 at 97 %; the final model at 96 % unshifted and 93 % shifted, a third shifted.
    result = recovery(0.97, pre=0.96, post=0.93, shifted_share=1 / 3)
    assert result["accuracy_post_shift_fleet_final"] == pytest.approx(0.95)
    assert result["recovered"]  # 2.0 points down on the fleet's traffic
    assert not result["recovered_on_shifted_devices"]  # 4 points down on rotated rows
    assert not recovery(0.97, pre=0.96, post=0.92, shifted_share=1 / 3)["recovered"]
    assert recovery(0.97, pre=0.97, post=0.95, shifted_share=0.5)["recovered_on_shifted_devices"]


def test_scenario_settings_are_checked(tmp_path: Path) -> None:
    with pytest.raises(RunError, match="--scenario must be one of drift, control"):
        ScenarioConfig(out=tmp_path, scenario="flood")
    with pytest.raises(RunError, match="shift tick"):
        ScenarioConfig(out=tmp_path, ticks=10, shift_tick=10)
    with pytest.raises(RunError, match="shifted share"):
        ScenarioConfig(out=tmp_path, shifted_share=1.0)


def test_the_shift_rotates_images_and_rewrites_the_shifted_shards(tmp_path: Path) -> None:
    data = scenario_data(tmp_path, agents=6, shifted_share=0.3, seed=0)
    assert len(data.shifted) == 2
    x, y = data.streams[data.shifted[0]]
    moved = shift(x)
    assert moved.shape == x.shape
    assert np.array_equal(np.sort(moved, axis=1), np.sort(x, axis=1))  # same values
    assert not np.array_equal(moved, x)
    assert np.array_equal(shift(shift(shift(shift(x)))), x)  # four quarter turns
    shard = data.shards[data.shifted[0]]
    shift_shard(shard, x, y)
    with np.load(shard / "local.npz") as written:
        assert np.array_equal(written["x"], moved)
        assert np.array_equal(written["y"], y)
    assert sorted(p.name for p in shard.iterdir()) == ["local.npz"]
    assert np.array_equal(data.post.x, shift(data.pre.x))
