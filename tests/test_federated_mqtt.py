"""Federated rounds against a real mosquitto: 10 in-process agents, Flower strategies.

The fleet (module-scoped) is ten agents holding Dirichlet(0.5) shards of digits and
one agent without data. Runs use a fresh model name per codec/strategy so top-k
residuals start empty, and every run is seeded (sampling, local training, codecs,
aggregation order), so the figures are reproducible.
"""

from __future__ import annotations

import itertools
import json
import math
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
import pytest
from flwr.app import Array, ArrayRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp.strategy import FedAvg
from typer.testing import CliRunner

from compress.codecs import encode_update, kept_entries, layout_of, parse_codec
from compress.families import init_weights
from compress.keys import PRIVATE_KEY_NAME
from coordinator.cli.app import app
from coordinator.delivery.deliveries import Artifact
from coordinator.federated import grid as grid_module
from coordinator.federated.runs import RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy, wrap_dp
from coordinator.federated.tasks import node_id_of
from coordinator.federated.update_check import MAX_EXAMPLES
from coordinator.link.fleet import Target
from edge_agent.agent import Agent
from edge_agent.training.data import LocalData
from edge_agent.training.numpy_trainers import trainer_for
from edge_agent.training.residuals import ResidualStore
from edge_agent.training.trainer import TrainConfig
from tests.federated_support import LAYERS, TRAIN_CONFIG, FederatedFleet, device_ids
from tests.fleet_support import Mosquitto, open_deliveries, password, wait_for

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def module_broker_users() -> list[str]:
    return device_ids(11)


@pytest.fixture(scope="module")
def fleet(
    module_broker: Mosquitto, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[FederatedFleet]:
    root = tmp_path_factory.mktemp("federated")
    running = FederatedFleet.start(module_broker, root, 10, without_data=1)
    yield running
    running.stop()


@pytest.fixture(scope="module")
def clean_fp32(fleet: FederatedFleet) -> RunResult:
    return fleet.run(codec="fp32")


def _accuracy(result: RunResult) -> float:
    accuracy = result.final_accuracy
    assert accuracy is not None
    return accuracy


def _uplink(result: RunResult) -> int:
    return sum(r.uplink_bytes for r in result.rounds)


def test_fp32_fedavg_reaches_90_percent_on_the_held_out_set(clean_fp32: RunResult) -> None:
    assert all(r.status == "ok" for r in clean_fp32.rounds)
    assert [r.clients for r in clean_fp32.rounds] == [10] * 20
    assert _accuracy(clean_fp32) >= 0.90
    first = clean_fp32.rounds[0]
    assert first.accuracy is not None
    assert first.accuracy < _accuracy(clean_fp32)
    # An fp32 update of the 64-256-10 MLP is 4 bytes per weight, from each of 10 devices.
    n_weights = sum(a * b + b for a, b in itertools.pairwise(LAYERS))
    assert all(r.uplink_bytes > 10 * 4 * n_weights for r in clean_fp32.rounds)
    # The weights go down once per round (broadcast), not once per device.
    assert all(4 * n_weights < r.downlink_bytes < 2 * 4 * n_weights for r in clean_fp32.rounds)


def test_the_device_without_data_is_never_sampled(
    fleet: FederatedFleet, clean_fp32: RunResult
) -> None:
    assert all(r.sampled == 10 for r in clean_fp32.rounds)
    assert fleet.extra[0].rounds.completed == 0
    assert all(agent.rounds.completed >= 20 for agent in fleet.agents)


def test_topk_int8_stays_within_a_point_of_fp32_with_30x_fewer_bytes_up(
    fleet: FederatedFleet, clean_fp32: RunResult
) -> None:
    compressed = fleet.run(codec="topk:0.03+int8")
    assert all(r.status == "ok" for r in compressed.rounds)
    assert _accuracy(compressed) >= _accuracy(clean_fp32) - 0.010
    ratio = _uplink(clean_fp32) / _uplink(compressed)
    assert ratio >= 30, ratio


def _local_fit(fleet: FederatedFleet, index: int, weights: dict[str, Any]) -> tuple[Any, int]:
    """What device ``index`` computes in round 1 (its training is seeded)."""
    device_id = fleet.agents[index].device_id
    config = TrainConfig.from_mapping({**TRAIN_CONFIG, "seed": 0, "server_round": 1})
    train, _ = LocalData(fleet.shards[index]).split(0.2, seed=config.seed)
    fitted = trainer_for("mlp").fit(weights, train, config, config.rng("r1", device_id))
    return fitted.weights, fitted.num_examples


def test_fedavg_equals_flowers_own_fedavg_on_the_same_client_updates(fleet: FederatedFleet) -> None:
    ours = fleet.run(codec="fp32", rounds=1, model="parity")
    initial = init_weights("mlp", LAYERS, np.random.default_rng(0))
    replies = []
    for index in range(len(fleet.agents)):
        weights, examples = _local_fit(fleet, index, initial)
        instruction = Message(RecordDict({}), node_id_of(fleet.agents[index].device_id),
                              MessageType.TRAIN)  # fmt: skip
        instruction.metadata.__dict__["_message_id"] = f"m{index}"
        content = RecordDict(
            {
                "arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in weights.items()}),
                "metrics": MetricRecord({"num-examples": examples}),
            }
        )
        replies.append(Message(content, reply_to=instruction))
    theirs, _ = FedAvg().aggregate_train(1, replies)
    assert theirs is not None
    for name, array in theirs.items():
        np.testing.assert_allclose(ours.weights[name], array.numpy(), rtol=0, atol=1e-6)


def _patch_encode(monkeypatch: pytest.MonkeyPatch, agent: Agent, make: Any) -> None:
    original = agent.rounds._encode

    def encode(task: Any, config: Any, weights: Any, trained: Any, residual: Any) -> Any:
        def payload(task: Any, config: Any, weights: Any, trained: Any) -> Any:
            return original(task, config, weights, trained, residual)[0]

        return make(payload, task, config, weights, trained), None

    monkeypatch.setattr(agent.rounds, "_encode", encode)


def test_malformed_updates_are_rejected_and_never_aggregated(
    fleet: FederatedFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    def nan(original: Any, *args: Any) -> npt.NDArray[np.uint8]:
        payload = original(*args).copy()
        payload[2:6] = np.frombuffer(np.float32(np.nan).tobytes(), dtype=np.uint8)
        return payload

    def wrong_shape(_original: Any, _task: Any, _config: Any, weights: Any, _t: Any) -> Any:
        smaller = {k: np.zeros(np.asarray(v).shape[:1] + (3,) * (np.ndim(v) - 1), np.float32)
                   for k, v in weights.items()}  # fmt: skip
        encoded = encode_update(smaller, parse_codec("fp32"), rng=np.random.default_rng(0))
        return np.frombuffer(encoded.payload, dtype=np.uint8)

    def huge(original: Any, task: Any, config: Any, weights: Any, trained: Any) -> Any:
        blown = {k: np.asarray(v) + 1e6 for k, v in trained.items()}
        return original(task, config, weights, blown)

    def oversized(original: Any, *args: Any) -> npt.NDArray[np.uint8]:
        return np.concatenate([original(*args), np.zeros(200_000, dtype=np.uint8)])

    bad = {0: nan, 1: wrong_shape, 2: huge, 3: oversized}
    for index, make in bad.items():
        _patch_encode(monkeypatch, fleet.agents[index], make)
    result = fleet.run(codec="fp32", rounds=3, min_clients=5, model="hostile")
    for report in result.rounds:
        assert report.status == "ok"
        assert report.clients == 6
        assert report.rejected == {"non_finite": 1, "malformed": 1, "too_large": 1,
                                   "oversized": 1}  # fmt: skip
    assert all(np.all(np.isfinite(w)) for w in result.weights.values())
    assert _accuracy(result) > 0.5


def _sign_flip(original: Any, task: Any, config: Any, weights: Any, trained: Any) -> Any:
    flipped = {k: weights[k] - 10 * (np.asarray(trained[k]) - weights[k]) for k in weights}
    return original(task, config, weights, flipped)


def _flip_once(original: Any, task: Any, config: Any, weights: Any, trained: Any) -> Any:
    flipped = {k: weights[k] - (np.asarray(trained[k]) - weights[k]) for k in weights}
    return original(task, config, weights, flipped)


def test_robust_aggregation_resists_sign_flipping_devices_and_plain_fedavg_does_not(
    fleet: FederatedFleet, clean_fp32: RunResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    for agent in fleet.agents[:2]:
        _patch_encode(monkeypatch, agent, _sign_flip)
    clean = _accuracy(clean_fp32)
    # Plain FedAvg, the round's norm screen turned off: the attack works.
    attacked_avg = _accuracy(
        fleet.run(strategy="fedavg", model="attacked-avg", norm_multiple=math.inf)
    )
    # By default, updates over 10x the round's median norm are rejected.
    screened = fleet.run(strategy="fedavg", model="attacked-screened")
    # --robust (screen off): the flipped updates are clipped to the median norm.
    robust = fleet.run(strategy="fedavg", model="attacked-robust", norm_multiple=math.inf,
                       robust=True)  # fmt: skip
    median = _accuracy(fleet.run(strategy="fedmedian", model="attacked-median"))
    multikrum = _accuracy(
        fleet.run(
            strategy="multikrum",
            strategy_args=("num_malicious_nodes=2", "num_nodes_to_select=6"),
            model="attacked-krum",
        )
    )
    assert attacked_avg < clean - 0.10, (attacked_avg, clean)
    assert sum(r.rejected.get("norm_outlier", 0) for r in screened.rounds) > 0
    assert _accuracy(screened) >= clean - 0.08, (_accuracy(screened), clean)
    assert _accuracy(robust) >= clean - 0.05, (_accuracy(robust), clean)
    assert median >= clean - 0.03, (median, clean)
    assert multikrum >= clean - 0.03, (multikrum, clean)


def test_a_device_claiming_a_billion_examples_weighs_what_it_announced(
    fleet: FederatedFleet, clean_fp32: RunResult, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One device sends sign-flipped updates of honest size claiming 10^9 examples:
    trusted, FedAvg would follow it alone; bounded by its announcement, it is one of ten."""
    liar = fleet.agents[0]
    _patch_encode(monkeypatch, liar, _flip_once)
    send = liar.rounds._send_update

    def inflated(task: Any, _examples: int, metrics: Any, update: Any) -> bool:
        return send(task, MAX_EXAMPLES, metrics, update)

    monkeypatch.setattr(liar.rounds, "_send_update", inflated)
    result = fleet.run(strategy="fedavg", model="inflated-count")
    for report in result.rounds:
        assert (report.status, report.rejected, report.clipped_examples) == ("ok", {}, 1)
    clean = _accuracy(clean_fp32)
    assert _accuracy(result) >= clean - 0.03, (_accuracy(result), clean)
    # The attack, were the claim trusted (the bound patched out of the grid):
    monkeypatch.setattr(grid_module, "bounded_examples", lambda reported, *_: reported)
    trusted = fleet.run(strategy="fedavg", model="inflated-trusted")
    assert _accuracy(trusted) < clean - 0.10, (_accuracy(trusted), clean)


def test_a_straggler_times_out_and_its_late_reply_is_dropped(
    fleet: FederatedFleet, monkeypatch: pytest.MonkeyPatch
) -> None:
    replies_at: list[float] = []  # when the coordinator counted a training reply
    finished = False
    changed = threading.Condition()

    def on_round(_report: Any, what: str) -> None:
        if what.startswith("training"):
            with changed:
                replies_at.append(time.time())
                changed.notify_all()

    straggler = fleet.agents[0].rounds
    send_update = straggler._send_update

    def slow(task: Any, *args: Any) -> bool:
        """Answer once a later round's replies come in (past this task's deadline): late.

        (It holds the agent's worker, so the next round's task waits behind the reply.)
        """
        with changed:
            changed.wait_for(lambda: finished or any(t > task.deadline for t in replies_at),
                             timeout=60.0)  # fmt: skip
        return send_update(task, *args)

    monkeypatch.setattr(straggler, "_send_update", slow)
    try:
        result = fleet.run(rounds=3, round_timeout_s=1.5, min_clients=5, model="straggler",
                           on_round=on_round)  # fmt: skip
    finally:
        with changed:
            finished = True
            changed.notify_all()
    assert all(r.status == "ok" for r in result.rounds)
    assert all(r.clients == 9 and r.timed_out == 1 for r in result.rounds)
    assert sum(r.late for r in result.rounds) >= 1


def test_a_round_without_enough_devices_fails_and_the_run_goes_on(fleet: FederatedFleet) -> None:
    result = fleet.run(
        rounds=2, clients_per_round=12, min_clients=11, round_timeout_s=0.5, model="short"
    )
    assert [r.status for r in result.rounds] == ["failed", "failed"]
    assert "need 11" in result.rounds[0].reason
    initial = init_weights("mlp", LAYERS, np.random.default_rng(0))
    assert all(np.array_equal(result.weights[k], v) for k, v in initial.items())


def test_federated_evaluation_reports_device_accuracy(fleet: FederatedFleet) -> None:
    result = fleet.run(rounds=3, eval_data=False, model="fedeval")
    assert all(r.status == "ok" for r in result.rounds)
    assert all(r.eval_clients == 10 for r in result.rounds)
    assert _accuracy(result) > 0.6
    # Evaluation of round r and training of round r+1 use the same weights:
    # they are downloaded once, so only the evaluation phase carries them.
    assert all(r.downlink_bytes > 0 for r in result.rounds)


def test_differential_privacy_wrapper_runs_unchanged(fleet: FederatedFleet) -> None:
    weights = init_weights("mlp", LAYERS, np.random.default_rng(0))
    strategy = wrap_dp(
        build_strategy("fedavg", {}, federated_eval=False),
        noise_multiplier=0.01, clipping_norm=5.0, num_sampled_clients=10,
    )  # fmt: skip
    config = RunConfig(
        model="dp", family="mlp", initial_weights=weights, rounds=3, clients_per_round=10,
        min_clients=8, round_timeout_s=30, train_config=TRAIN_CONFIG, eval_data=fleet.test_set,
    )  # fmt: skip
    result = run_training(fleet.hub, strategy, config)
    assert all(r.status == "ok" for r in result.rounds)
    plain = fleet.run(rounds=3, model="dp-plain")
    assert not np.allclose(result.weights["W0"], plain.weights["W0"], atol=1e-6)
    assert _accuracy(result) > 0.5


def test_updates_larger_than_one_message_are_uploaded_in_chunks(fleet: FederatedFleet) -> None:
    result = fleet.run(rounds=1, layers=[64, 1024, 10], model="wide", clients_per_round=3,
                       min_clients=3)  # fmt: skip
    (report,) = result.rounds
    assert report.status == "ok"
    assert report.clients == 3
    assert report.uplink_bytes > 3 * 4 * (64 * 1024 + 1024 * 10)  # > 256 KiB each


def test_topk_residuals_are_kept_on_the_device(fleet: FederatedFleet) -> None:
    fleet.run(codec="topk:0.01", rounds=1, model="residual")
    store = ResidualStore(fleet.root / fleet.agents[0].device_id / "residuals")
    initial = init_weights("mlp", LAYERS, np.random.default_rng(0))
    # The agent saves the residual once its update went out, so the round may end
    # (the coordinator has the update) a moment before the file is written.
    residual = wait_for(lambda: store.load("residual", layout_of(initial)),
                        what="the stored residual")  # fmt: skip
    # All but the 1 % sent stayed on the device, to be sent in later rounds.
    kept = kept_entries(parse_codec("topk:0.01"), layout_of(initial))
    assert sum(int(np.count_nonzero(v)) for v in residual.values()) > 10 * kept


def test_fedge_train_cli_reports_rounds_and_packages_a_deployable_artifact(
    fleet: FederatedFleet, tmp_path: Path
) -> None:
    test_file = tmp_path / "test.npz"
    np.savez(test_file, x=fleet.test_set.x, y=fleet.test_set.y)
    secret = tmp_path / "coordinator.password"
    secret.write_text(password("coordinator"))
    artifact = tmp_path / "digits.fedge"
    args = [
        "train",
        "--broker",
        fleet.broker.url,
        "--password-file",
        str(secret),
        "--model",
        "cli-digits",
        "--family",
        "mlp",
        "--hidden",
        "64",
        "--rounds",
        "3",
        "--clients-per-round",
        "10",
        "--min-clients",
        "8",
        "--round-timeout",
        "30",
        "--strategy",
        "fedprox",
        "--strategy-arg",
        "proximal_mu=0.01",
        "--codec",
        "topk:0.05+int8",
        "--epochs",
        "2",
        "--eval-data",
        str(test_file),
        "--out",
        str(tmp_path / "weights.npz"),
        "--package",
        str(artifact),
        "--key",
        str(fleet.trust.parent / PRIVATE_KEY_NAME),
        "--json",
    ]
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert [r["round"] for r in report["rounds"]] == [1, 2, 3]
    for fields in report["rounds"]:
        assert {"accuracy", "loss", "clients", "uplink_bytes", "downlink_bytes"} <= set(fields)
        assert fields["status"] == "ok"
        assert fields["clients"] == 10
    assert report["final_accuracy"] == report["rounds"][-1]["accuracy"] > 0.5
    assert set(np.load(tmp_path / "weights.npz")) == {"W0", "b0", "W1", "b1"}
    # The artifact is signed by the fleet's key: deploy it and predict with it.
    with open_deliveries(fleet.hub) as ops:
        delivery = ops.deploy(Artifact.load(artifact), Target.parse("device:dev00"))
        outcome = ops.wait(delivery, timeout=30)
    assert outcome.succeeded
    prediction = fleet.agents[0].predict(fleet.test_set.x[:20])
    assert prediction.model == "cli-digits"
    labels = np.asarray(prediction.labels)
    assert np.mean(labels == fleet.test_set.y[:20]) > 0.5


def test_fedge_train_cli_refuses_a_bad_codec_in_one_line(fleet: FederatedFleet) -> None:
    args = [
        "train",
        "--broker",
        fleet.broker.url,
        "--model",
        "x",
        "--features",
        "64",
        "--classes",
        "10",
        "--codec",
        "topk:2",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 1
    assert "error:" in result.output
    assert "Traceback" not in result.output


def test_a_strategy_needing_more_nodes_than_the_round_offers_fails_the_round(
    fleet: FederatedFleet,
) -> None:
    result = fleet.run(rounds=1, strategy_args=("min_train_nodes=20",), model="greedy")
    (report,) = result.rounds
    assert report.status == "failed"
    assert "needs 20 nodes" in report.reason


def test_fedge_train_cli_prints_a_round_table_and_a_summary(
    fleet: FederatedFleet, tmp_path: Path
) -> None:
    secret = tmp_path / "coordinator.password"
    secret.write_text(password("coordinator"))
    args = [
        "train", "--broker", fleet.broker.url, "--password-file", str(secret),
        "--model", "cli-table", "--features", "64", "--classes", "10", "--rounds", "2",
        "--clients-per-round", "4", "--min-clients", "4", "--codec", "int8",
    ]  # fmt: skip
    result = CliRunner().invoke(app, args, catch_exceptions=False)
    assert result.exit_code == 0, result.output
    assert "final accuracy" in result.stdout  # federated evaluation on the devices
    assert "2 round(s) ok, 0 failed" in result.stdout
    assert "4/4" in result.stdout  # accepted of sampled, per round
