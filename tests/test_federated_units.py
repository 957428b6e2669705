"""Pure parts of federated training: run settings, round reports, evaluation, partitions."""

from __future__ import annotations

import math
import re
from collections import Counter
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest

from compress.errors import CodecError, FamilyError
from coordinator.delivery.packaging import LabelledData
from coordinator.errors import RunError
from coordinator.federated.runs import RoundReport, RunConfig, RunResult, evaluate_weights
from coordinator.federated.tasks import PhaseStats, node_id_of
from coordinator.sim.datasets import dirichlet_partition

WEIGHTS = {"W0": np.zeros((3, 3), np.float32), "b0": np.zeros(3, np.float32)}

ROUND_KEYS = {
    "round",
    "status",
    "reason",
    "accuracy",
    "loss",
    "metrics",
    "clients",
    "sampled",
    "uplink_bytes",
    "downlink_bytes",
    "rejected",
    "failures",
    "dropped",
    "timed_out",
    "late",
    "clipped_examples",
    "eval_clients",
    "seconds",
}


def config(**fields: Any) -> RunConfig:
    return RunConfig(model="digits", family="softmax", initial_weights=WEIGHTS, **fields)


# --------------------------------------------------------------------------- RunConfig


def test_config_defaults_are_valid() -> None:
    run = config()
    assert run.rounds >= 1
    assert 1 <= run.min_clients <= run.clients_per_round


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"rounds": 0}, "rounds"),
        ({"rounds": -3}, "rounds"),
        ({"min_clients": 0}, "min_clients"),
        ({"min_clients": 5, "clients_per_round": 4}, "min_clients (5)"),
        ({"clients_per_round": 0, "min_clients": 0}, "min_clients"),
        ({"round_timeout_s": 0.0}, "timeouts"),
        ({"round_timeout_s": -1.0}, "timeouts"),
        ({"round_timeout_s": math.nan}, "timeouts"),
        ({"gather_s": 0.0}, "timeouts"),
        ({"gather_s": -0.5}, "timeouts"),
        ({"gather_s": math.nan}, "timeouts"),
        ({"max_examples_per_update": 0}, "max_examples_per_update"),
        ({"max_examples_per_update": 10**9 + 1}, "max_examples_per_update"),
        ({"norm_multiple": 0.5}, "norm_multiple"),
        ({"norm_multiple": math.nan}, "norm_multiple"),
    ],
)
def test_config_refuses_bad_values(fields: dict[str, Any], message: str) -> None:
    with pytest.raises(RunError, match=re.escape(message)):
        config(**fields)


def test_config_min_clients_equal_to_clients_per_round_is_fine() -> None:
    run = config(min_clients=4, clients_per_round=4, rounds=1)
    assert (run.min_clients, run.clients_per_round, run.rounds) == (4, 4, 1)


@pytest.mark.parametrize("codec", ["zip", "topk:0", "topk:1.5", "int4", "FP32", ""])
def test_config_refuses_an_invalid_codec(codec: str) -> None:
    with pytest.raises(CodecError):
        config(codec=codec)


@pytest.mark.parametrize("codec", ["fp32", "fp16", "int8", "topk:0.01", "topk:0.1+int8"])
def test_config_accepts_valid_codecs(codec: str) -> None:
    assert config(codec=codec).codec == codec


# --------------------------------------------------------------------------- RoundReport


def phase(**fields: Any) -> PhaseStats:
    stats = PhaseStats(
        uplink_bytes=fields.get("uplink", 0),
        downlink_bytes=fields.get("downlink", 0),
        tasks=fields.get("tasks", 0),
        late=fields.get("late", 0),
        clipped_examples=fields.get("clipped", 0),
    )
    stats.outcomes.update(fields.get("outcomes", {}))
    stats.rejected.update(fields.get("rejected", {}))
    stats.failures.update(fields.get("failures", {}))
    return stats


def test_add_phase_sums_every_figure() -> None:
    report = RoundReport(round=3)
    report.add_phase(
        phase(
            uplink=100,
            downlink=1000,
            late=1,
            clipped=2,
            outcomes={"done": 3, "offline": 1, "timed_out": 2, "rejected": 2},
            rejected={"too_large": 1, "malformed": 1},
            failures={"no_data": 1},
        )
    )
    report.add_phase(
        phase(
            uplink=50,
            downlink=7,
            late=2,
            clipped=1,
            outcomes={"done": 1, "offline": 2},
            rejected={"too_large": 2, "non_finite": 1},
            failures={"no_data": 2, "train_failed": 1},
        )
    )
    assert report.uplink_bytes == 150
    assert report.downlink_bytes == 1007
    assert report.late == 3
    assert report.clipped_examples == 3
    assert report.dropped == 3
    assert report.timed_out == 2
    assert report.rejected == {"too_large": 3, "malformed": 1, "non_finite": 1}
    assert report.failures == {"no_data": 3, "train_failed": 1}
    # figures the phases do not carry are left alone
    assert (report.clients, report.sampled, report.status) == (0, 0, "ok")


def test_add_phase_does_not_alias_the_phase_counters() -> None:
    stats = phase(rejected={"malformed": 1})
    report = RoundReport(round=1)
    report.add_phase(stats)
    report.rejected["malformed"] += 5
    assert stats.rejected["malformed"] == 1


def test_add_empty_phase_changes_nothing() -> None:
    report = RoundReport(round=1, uplink_bytes=5, rejected={"x": 1})
    before = report.to_json()
    report.add_phase(PhaseStats())
    assert report.to_json() == before


def test_round_to_json_has_the_documented_keys_and_values() -> None:
    report = RoundReport(
        round=2,
        status="failed",
        reason="1 update(s) accepted, need 2",
        accuracy=0.75,
        loss=0.5,
        metrics={"accuracy": 0.75, "loss": 0.5},
        clients=1,
        sampled=4,
        uplink_bytes=10,
        downlink_bytes=20,
        rejected={"too_large": 1},
        failures={"no_data": 2},
        dropped=1,
        timed_out=1,
        late=3,
        clipped_examples=2,
        eval_clients=0,
        seconds=1.23456,
    )
    data = report.to_json()
    assert set(data) == ROUND_KEYS
    assert data["round"] == 2
    assert data["status"] == "failed"
    assert data["reason"] == "1 update(s) accepted, need 2"
    assert data["accuracy"] == 0.75
    assert data["loss"] == 0.5
    assert data["metrics"] == {"accuracy": 0.75, "loss": 0.5}
    assert data["clients"] == 1
    assert data["sampled"] == 4
    assert data["uplink_bytes"] == 10
    assert data["downlink_bytes"] == 20
    assert data["rejected"] == {"too_large": 1}
    assert data["failures"] == {"no_data": 2}
    assert (data["dropped"], data["timed_out"], data["late"]) == (1, 1, 3)
    assert data["clipped_examples"] == 2
    assert data["seconds"] == 1.235
    # a copy: changing the JSON does not change the report
    data["rejected"]["too_large"] = 99
    data["metrics"]["loss"] = 99.0
    assert report.rejected == {"too_large": 1}
    assert report.metrics["loss"] == 0.5


def test_round_to_json_of_an_unmeasured_round() -> None:
    data = RoundReport(round=1).to_json()
    assert data["accuracy"] is None
    assert data["loss"] is None
    assert data["metrics"] == {}
    assert data["rejected"] == {}


# --------------------------------------------------------------------------- RunResult


def result(*reports: RoundReport) -> RunResult:
    return RunResult(rounds=list(reports), weights=dict(WEIGHTS))


def test_final_accuracy_is_the_last_measured_one() -> None:
    rounds = [
        RoundReport(round=1, accuracy=0.5),
        RoundReport(round=2, accuracy=0.7),
        RoundReport(round=3, status="failed", reason="x"),
    ]
    assert result(*rounds).final_accuracy == 0.7
    assert result(*rounds[:1]).final_accuracy == 0.5
    assert result(RoundReport(round=1), RoundReport(round=2)).final_accuracy is None
    assert result().final_accuracy is None


def test_final_accuracy_of_zero_counts() -> None:
    run = result(RoundReport(round=1, accuracy=0.9), RoundReport(round=2, accuracy=0.0))
    assert run.final_accuracy == 0.0


def test_final_metrics_are_those_of_the_last_round_that_measured_any() -> None:
    rounds = [
        RoundReport(round=1, loss=2.0, metrics={"mse": 2.0, "mae": 1.0, "loss": 2.0}),
        RoundReport(round=2, loss=1.0, metrics={"mse": 1.0, "mae": 0.5, "loss": 1.0}),
        RoundReport(round=3, status="failed", reason="x"),
    ]
    run = result(*rounds)
    assert run.final_metrics == {"mse": 1.0, "mae": 0.5, "loss": 1.0}
    assert run.final_accuracy is None  # a regression run measures no accuracy
    assert run.to_json()["final_metrics"] == run.final_metrics
    run.final_metrics["mse"] = 9.0  # a copy
    assert rounds[1].metrics["mse"] == 1.0
    assert result(RoundReport(round=1)).final_metrics == {}


def test_result_to_json_totals() -> None:
    rounds = [
        RoundReport(round=1, accuracy=0.4, uplink_bytes=10, downlink_bytes=100),
        RoundReport(round=2, status="failed", reason="x", uplink_bytes=1, downlink_bytes=50),
        RoundReport(round=3, accuracy=0.6, uplink_bytes=5, downlink_bytes=25),
        RoundReport(round=4, status="failed", reason="y"),
    ]
    data = result(*rounds).to_json()
    assert set(data) == {
        "rounds",
        "final_accuracy",
        "final_metrics",
        "rounds_ok",
        "rounds_failed",
        "uplink_bytes",
        "downlink_bytes",
    }
    assert [r["round"] for r in data["rounds"]] == [1, 2, 3, 4]
    assert all(set(r) == ROUND_KEYS for r in data["rounds"])
    assert data["final_accuracy"] == 0.6
    assert (data["rounds_ok"], data["rounds_failed"]) == (2, 2)
    assert data["uplink_bytes"] == 16
    assert data["downlink_bytes"] == 175


def test_empty_result_to_json() -> None:
    data = result().to_json()
    assert data["rounds"] == []
    assert (data["rounds_ok"], data["rounds_failed"]) == (0, 0)
    assert (data["uplink_bytes"], data["downlink_bytes"]) == (0, 0)


# --------------------------------------------------------------------------- evaluate_weights


def test_evaluate_weights_on_a_hand_made_softmax_model() -> None:
    # logits = 2 * x + b: the predicted class is the largest feature (b breaks no tie)
    weights = {"W0": 2.0 * np.eye(3, dtype=np.float32), "b0": np.zeros(3, np.float32)}
    x = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0], [0.0, 0.0, 1.0], [1.0, 0.0, 0.0]], np.float32)
    y = np.array([0, 1, 0, 2], np.int64)  # rows 0 and 1 right, rows 2 and 3 wrong
    accuracy, loss = evaluate_weights("softmax", weights, LabelledData(x, y))
    assert accuracy == pytest.approx(0.5)
    p_right = math.exp(2) / (math.exp(2) + 2)  # probability of the hot class
    p_wrong = 1 / (math.exp(2) + 2)
    expected = -(2 * math.log(p_right) + 2 * math.log(p_wrong)) / 4
    assert loss == pytest.approx(expected, rel=1e-5)


def test_evaluate_weights_with_biases_and_a_perfect_model() -> None:
    weights = {"W0": np.zeros((2, 3), np.float32), "b0": np.array([0.0, 3.0, 0.0], np.float32)}
    x = np.random.default_rng(0).standard_normal((5, 2)).astype(np.float32)
    y = np.ones(5, np.int64)
    accuracy, loss = evaluate_weights("softmax", weights, LabelledData(x, y))
    assert accuracy == 1.0
    assert loss == pytest.approx(-math.log(math.exp(3) / (math.exp(3) + 2)), rel=1e-5)


def test_evaluate_weights_loss_is_finite_for_confident_mistakes() -> None:
    weights = {"W0": np.zeros((1, 2), np.float32), "b0": np.array([0.0, 200.0], np.float32)}
    data = LabelledData(np.zeros((2, 1), np.float32), np.zeros(2, np.int64))
    accuracy, loss = evaluate_weights("softmax", weights, data)
    assert accuracy == 0.0
    assert math.isfinite(loss)
    assert loss == pytest.approx(-math.log(1e-12))


def test_evaluate_weights_refuses_mismatched_inputs() -> None:
    data = LabelledData(np.zeros((2, 4), np.float32), np.zeros(2, np.int64))
    with pytest.raises(FamilyError):
        evaluate_weights("softmax", WEIGHTS, data)


# --------------------------------------------------------------------------- dirichlet_partition


def labels(per_class: int = 60, classes: int = 10) -> npt.NDArray[np.int64]:
    rng = np.random.default_rng(42)
    y = np.repeat(np.arange(classes, dtype=np.int64), per_class)
    rng.shuffle(y)
    return y


def label_entropy(y: npt.NDArray[np.int64], part: npt.NDArray[np.int64]) -> float:
    counts = np.bincount(y[part], minlength=int(y.max()) + 1).astype(np.float64)
    p = counts[counts > 0] / counts.sum()
    return float(-(p * np.log(p)).sum())


def mean_entropy(y: npt.NDArray[np.int64], alpha: float) -> float:
    entropies = [
        label_entropy(y, part)
        for seed in range(5)
        for part in dirichlet_partition(y, 8, alpha, seed=seed, min_examples=1)
    ]
    return float(np.mean(entropies))


@pytest.mark.parametrize(("clients", "alpha"), [(1, 0.5), (5, 0.1), (8, 1.0), (20, 100.0)])
def test_partition_covers_every_index_exactly_once(clients: int, alpha: float) -> None:
    y = labels()
    parts = dirichlet_partition(y, clients, alpha, seed=3)
    assert len(parts) == clients
    together = np.concatenate(parts)
    assert len(together) == len(y)
    np.testing.assert_array_equal(np.sort(together), np.arange(len(y)))
    for part in parts:
        assert part.dtype == np.int64
        np.testing.assert_array_equal(part, np.sort(part))


def test_partition_is_deterministic_per_seed() -> None:
    y = labels()
    first = dirichlet_partition(y, 6, 0.5, seed=11)
    again = dirichlet_partition(y, 6, 0.5, seed=11)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))


def test_different_seeds_give_different_partitions() -> None:
    y = labels()
    splits = [dirichlet_partition(y, 6, 0.5, seed=seed) for seed in range(4)]
    signatures = {tuple(tuple(part.tolist()) for part in split) for split in splits}
    assert len(signatures) == len(splits)


@pytest.mark.parametrize("min_examples", [0, 1, 10, 40])
def test_min_examples_is_honoured(min_examples: int) -> None:
    y = labels()
    for seed in range(3):
        parts = dirichlet_partition(y, 10, 0.3, seed=seed, min_examples=min_examples)
        assert min(len(part) for part in parts) >= min_examples
        assert sum(len(part) for part in parts) == len(y)


def test_min_examples_at_the_exact_limit() -> None:
    """Every client needs every example: only one split works (found by redrawing)."""
    y = np.zeros(4, np.int64)
    parts = dirichlet_partition(y, 2, 50.0, seed=0, min_examples=2)
    assert sorted(len(part) for part in parts) == [2, 2]


def test_smaller_alpha_gives_more_label_skew() -> None:
    y = labels()
    skewed, mixed, iid = mean_entropy(y, 0.05), mean_entropy(y, 1.0), mean_entropy(y, 1000.0)
    assert skewed < mixed < iid
    assert iid > 0.95 * math.log(10)  # close to uniform over the 10 classes
    assert skewed < 0.5 * math.log(10)


def test_large_alpha_is_close_to_iid_shares() -> None:
    y = labels(per_class=200)
    parts = dirichlet_partition(y, 4, 1e4, seed=0)
    for part in parts:
        shares = np.bincount(y[part], minlength=10) / len(part)
        np.testing.assert_allclose(shares, 0.1, atol=0.03)


def test_partition_accepts_a_list_of_labels() -> None:
    y = [0, 1, 2, 0, 1, 2, 0, 1, 2, 3]
    parts = dirichlet_partition(y, 2, 1.0, seed=1)
    np.testing.assert_array_equal(np.sort(np.concatenate(parts)), np.arange(10))


@pytest.mark.parametrize(
    ("clients", "alpha", "min_examples"),
    [
        (0, 1.0, 1),
        (-2, 1.0, 1),
        (3, 0.0, 1),
        (3, -1.0, 1),
        (3, math.nan, 1),
        (3, 1.0, -1),
    ],
)
def test_partition_refuses_bad_arguments(clients: int, alpha: float, min_examples: int) -> None:
    with pytest.raises(ValueError, match="clients >= 1"):
        dirichlet_partition(labels(), clients, alpha, min_examples=min_examples)


def test_partition_refuses_too_few_examples() -> None:
    with pytest.raises(ValueError, match="cannot give 7 clients 2 each"):
        dirichlet_partition(np.zeros(13, np.int64), 7, 1.0, min_examples=2)


def test_partition_gives_up_when_no_draw_satisfies_min_examples() -> None:
    """One class and a tiny alpha: one client takes (nearly) everything on every draw."""
    y = np.zeros(10, np.int64)
    with pytest.raises(ValueError, match="no Dirichlet"):
        dirichlet_partition(y, 2, 1e-4, seed=0, min_examples=4)


# --------------------------------------------------------------------------- node_id_of


def test_node_ids_are_stable_large_and_distinct() -> None:
    ids = [f"device-{i:04d}" for i in range(1000)]
    nodes = [node_id_of(device) for device in ids]
    assert nodes == [node_id_of(device) for device in ids]
    assert all(2 <= node < 2**63 for node in nodes)
    assert len(set(nodes)) == len(ids)
    assert Counter(isinstance(node, int) for node in nodes) == Counter({True: 1000})


def test_node_ids_of_similar_ids_differ() -> None:
    assert node_id_of("pi-1") != node_id_of("pi-2")
    assert node_id_of("a") != node_id_of("A")
    assert node_id_of("") >= 2
