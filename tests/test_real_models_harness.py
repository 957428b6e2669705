"""The pure parts of benchmarks/real_models.py: gates, request batching, the docs section.

The benchmark itself (federated runs, agent processes, deploys) is run by hand; these
tests pin down how it judges and reports what it measured, so a failed gate can never be
shown as passed.
"""

from __future__ import annotations

import importlib
import json
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import pytest

BENCHMARKS = Path(__file__).resolve().parent.parent / "benchmarks"
LIMITS = {"max_accuracy_drop": 1.0, "max_error_increase": 0.10, "max_auc_drop": 0.02}


@pytest.fixture(scope="module")
def rm() -> ModuleType:
    """benchmarks/real_models.py, imported as the script imports its neighbours."""
    sys.path.insert(0, str(BENCHMARKS))
    try:
        return importlib.import_module("real_models")
    finally:
        sys.path.remove(str(BENCHMARKS))


# ------------------------------------------------------------------- gates


def test_images_gates_pass_within_three_points_and_above_the_mlp(rm: ModuleType) -> None:
    gates = rm.issue_gates("images", {"accuracy": 0.95}, {"accuracy": 0.97}, mlp_accuracy=0.90)
    assert [g.passed for g in gates] == [True, True]
    assert gates[0].value == pytest.approx(0.02)


def test_images_gates_fail_four_points_below_central_or_not_above_the_mlp(
    rm: ModuleType,
) -> None:
    below = rm.issue_gates("images", {"accuracy": 0.93}, {"accuracy": 0.97}, mlp_accuracy=0.5)
    assert [g.passed for g in below] == [False, True]
    tie = rm.issue_gates("images", {"accuracy": 0.97}, {"accuracy": 0.97}, mlp_accuracy=0.97)
    assert [g.passed for g in tie] == [True, False]
    assert (tie[1].quantity, tie[1].op, tie[1].limit) == ("CNN - MLP federated accuracy", ">", 0)


def test_a_missing_figure_fails_its_gate(rm: ModuleType) -> None:
    gates = rm.issue_gates("images", {}, {"accuracy": 0.97}, mlp_accuracy=None)
    assert [g.passed for g in gates] == [False, False]
    assert gates[0].value is None
    (anomaly,) = rm.issue_gates("anomaly", {}, {"auc": 0.9}, deployed=None)
    assert not anomaly.passed


def test_sensor_gate_allows_five_points(rm: ModuleType) -> None:
    (ok,) = rm.issue_gates("sensor", {"accuracy": 0.91}, {"accuracy": 0.95})
    (bad,) = rm.issue_gates("sensor", {"accuracy": 0.89}, {"accuracy": 0.95})
    assert [ok.passed, bad.passed] == [True, False]


def test_anomaly_gate_judges_the_deployed_auc(rm: ModuleType) -> None:
    final = {"auc": 0.99}  # the fp32 federated AUC does not count: the deployed one does
    (ok,) = rm.issue_gates("anomaly", final, {"auc": 0.90}, deployed=0.86)
    (bad,) = rm.issue_gates("anomaly", final, {"auc": 0.90}, deployed=0.84)
    assert [ok.passed, bad.passed] == [True, False]
    (better,) = rm.issue_gates("anomaly", final, {"auc": 0.80}, deployed=0.95)
    assert better.passed  # one-sided: beating the centralized model passes


def test_regression_gate_is_ten_percent_of_central_mse(rm: ModuleType) -> None:
    (ok,) = rm.issue_gates("regression", {"mse": 3250.0}, {"mse": 3000.0})
    (bad,) = rm.issue_gates("regression", {"mse": 3400.0}, {"mse": 3000.0})
    (zero,) = rm.issue_gates("regression", {"mse": 1.0}, {"mse": 0.0})
    assert [ok.passed, bad.passed, zero.passed] == [True, False, False]


def test_unknown_kind_is_refused(rm: ModuleType) -> None:
    with pytest.raises(ValueError, match="unknown workload kind"):
        rm.issue_gates("audio", {}, {})


@pytest.mark.parametrize(
    ("task", "fp32", "deployed", "passed"),
    [
        ("classification", 0.95, 0.945, True),  # 0.5 points
        ("classification", 0.95, 0.93, False),  # 2 points
        ("regression", 3000.0, 3200.0, True),  # +6.7 %
        ("regression", 3000.0, 3400.0, False),  # +13 %
        ("regression", 0.0, 1.0, False),  # no relative increase of a zero error
        ("reconstruction", 0.95, 0.94, True),
        ("reconstruction", 0.95, 0.92, False),
    ],
)
def test_deployment_gate_is_the_packaging_gate(
    rm: ModuleType, task: str, fp32: float, deployed: float, passed: bool
) -> None:
    assert rm.deployment_gate(task, fp32, deployed, LIMITS).passed is passed


def test_task_metric_per_task(rm: ModuleType) -> None:
    probabilities = np.array([[0.9, 0.1], [0.2, 0.8], [0.6, 0.4]])
    assert rm.task_metric("classification", probabilities, np.array([0, 1, 1])) == (
        "accuracy",
        pytest.approx(2 / 3),
    )
    name, mse = rm.task_metric("regression", np.array([[1.0], [3.0]]), np.array([2.0, 3.0]))
    assert (name, mse) == ("mse", pytest.approx(0.5))
    name, auc = rm.task_metric("reconstruction", np.array([0.1, 0.2, 0.9]), np.array([0, 0, 1]))
    assert (name, auc) == ("auc", pytest.approx(1.0))
    with pytest.raises(ValueError, match="unknown task"):
        rm.task_metric("ranking", probabilities, np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="class probabilities"):
        rm.task_metric("classification", np.array([0.1, 0.9]), np.array([0, 1]))


# ------------------------------------------------------------------- batching


def test_request_batches_cover_every_row_in_order_under_the_limit(rm: ModuleType) -> None:
    rng = np.random.default_rng(0)
    x = rng.normal(size=(101, 1, 8, 8)).astype(np.float32)
    limit = 20_000
    batches = rm.request_batches(x, limit)
    assert len(batches) > 1
    assert np.array_equal(np.concatenate([np.arange(101)[b] for b in batches]), np.arange(101))
    for part in batches:
        assert len(json.dumps({"inputs": x[part].tolist()})) <= limit
    # float32 values survive the JSON round trip exactly
    assert np.array_equal(np.asarray(json.loads(json.dumps(x.tolist())), np.float32), x)


def test_request_batches_refuse_an_example_over_the_limit(rm: ModuleType) -> None:
    assert rm.request_batches(np.zeros((0, 4), np.float32), 100) == []
    with pytest.raises(ValueError, match="over the 100 byte limit"):
        rm.request_batches(np.full((2, 64), 0.123456789, np.float32), 100)


# ------------------------------------------------------------------- selection


def test_selected_workloads(rm: ModuleType) -> None:
    assert [w.name for w in rm.selected(None, mnist=False)] == [
        "images", "sensor", "anomaly", "regression",
    ]  # fmt: skip
    assert [w.name for w in rm.selected("images", mnist=True)] == ["images", "images-mnist"]
    with pytest.raises(SystemExit, match="--only"):
        rm.selected("audio", mnist=False)


def test_workloads_are_those_of_the_issue(rm: ModuleType) -> None:
    for workload in rm.WORKLOADS.values():
        assert workload.agents == 10
        if workload.kind in ("images", "sensor"):
            assert workload.partition == "dirichlet:0.5"
        assert workload.mlp_baseline is (workload.kind == "images")


# ------------------------------------------------------------------- output


def _entry(rm: ModuleType, name: str, *, passed: bool, error: str | None = None) -> dict[str, Any]:
    workload = rm.WORKLOADS[name]
    gate = rm.Gate("within 5 points of centralized", "centralized - federated accuracy",
                   0.01 if passed else 0.2, "<=", 0.05, passed)  # fmt: skip
    return {
        "workload": {**workload.__dict__},
        "settings": {"seed": 0},
        "federated": {
            "metric": "accuracy",
            "final_metrics": {"accuracy": 0.9},
            "centralized_metrics": {"accuracy": 0.91},
            "seconds_per_round": 0.33,
        },
        "mlp": None,
        "deployment": None
        if error
        else {
            "fp32_metric": 0.9,
            "deployed_metric": 0.899,
            "devices": ["edge00", "edge01", "edge02"],
            "artifact_bytes": 20480,
            "deploy_to_installed_s": 0.18,
            "test_examples": 370,
            "requests": 9,
            "devices_agree": passed,
        },
        "gates": [] if error else [gate.__dict__],
        "passed": passed and error is None,
        "did_not_finish": error,
        "seconds": 12.0,
        "measured": {"timestamp": "2026-12-06T03:10:00+00:00", "command": "python x.py"},
    }


def _result(entries: dict[str, Any]) -> dict[str, Any]:
    env = {"platform": "Linux", "cpu_count": 2, "python": "3.11", "mosquitto": "mosquitto 2",
           "packages": {"torch": "2", "onnxruntime": "1"},
           "loadavg_1_5_15": [1.5, 2.0, 2.5]}  # fmt: skip
    return {"workloads": entries, "environment": env}


def test_docs_section_shows_failures_and_did_not_finish(rm: ModuleType) -> None:
    section = rm.docs_section(
        _result({
            "sensor": _entry(rm, "sensor", passed=False),
            "anomaly": _entry(rm, "anomaly", passed=False, error="RunError: no device"),
        })
    )  # fmt: skip
    assert section.startswith(rm.SECTION_HEADING + "\n")
    assert "mosquitto 2; load average 1.5, 2.0, 2.5 when it finished)" in section
    assert (
        "sensor: **FAIL** within 5 points of centralized: centralized - federated accuracy = "
        "0.2000 (must be <= 0.0500)"
    ) in section
    assert "**anomaly: did not finish**: RunError: no device" in section
    assert "| sensor | zoo:sensor_cnn | japanese-vowels |" in section
    assert "the class IS the speaker" in section
    assert "Command: `python x.py`" in section
    assert (
        "0.33 s per round, artifact 20.0 KiB installed on 3 devices in 0.18 s, 370 test "
        "examples in 9 requests, answers NOT identical across devices, 12 s in all"
    ) in section


def test_docs_section_is_written_through_the_shared_writer(rm: ModuleType, tmp_path: Path) -> None:
    """real_models writes its section with _support.write_doc_section: appended once, then
    replaced in place, keeping the other scripts' sections."""
    heading = rm.SECTION_HEADING
    docs = tmp_path / "benchmarks.md"
    original = "# Benchmarks\n\nintro\n\n## Other\n\nkept\n"
    docs.write_text(original)
    rm.write_doc_section(docs, f"{heading}\n\nfirst\n")
    appended = docs.read_text()
    assert appended == f"{original}\n{heading}\n\nfirst\n"
    docs.write_text(appended + "\n## Later\n\nalso kept\n")
    rm.write_doc_section(docs, f"{heading}\n\n### Sub\n\nsecond\n")
    replaced = docs.read_text()
    assert "first" not in replaced
    assert replaced.count(heading) == 1
    assert "### Sub\n\nsecond\n\n## Later\n\nalso kept\n" in replaced
    assert replaced.startswith(original)
    rm.write_doc_section(docs, f"{heading}\n\n### Sub\n\nsecond\n")
    assert docs.read_text() == replaced


def test_merge_results_keeps_other_workloads_in_workload_order(rm: ModuleType) -> None:
    old = _result({"regression": {"old": True}, "images": {"old": True}})
    new = _result({"images": {"new": True}})
    merged = rm.merge_results(old, new)
    assert list(merged["workloads"]) == ["images", "regression"]
    assert merged["workloads"]["images"] == {"new": True}
    assert merged["workloads"]["regression"] == {"old": True}
    assert rm.merge_results(None, new)["workloads"] == {"images": {"new": True}}
