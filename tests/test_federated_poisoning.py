"""One device cannot own a federated run: attacks on the aggregate, played on a MemoryHub.

Each device here is a function of the test: it announces ``train_examples`` in its
status and answers every task on the spot with an acknowledgement and an update
(or an evaluation), as an agent would, but with whatever example count and
update size the test gives it. The coordinator side is the real one: sampling,
:class:`~coordinator.federated.grid.MqttGrid`, the update checks, the round
screen and Flower's FedAvg.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from compress.codecs import encode_update, parse_codec
from coordinator.federated.runs import RunConfig, RunResult, run_training
from coordinator.federated.strategies import build_strategy
from coordinator.federated.update_check import MAX_EXAMPLES, UPDATE_ARRAY
from coordinator.link.memory import MemoryHub, Published
from edge_agent.protocol import (
    EvalReport,
    Status,
    TaskAck,
    TaskAction,
    TrainTask,
    UpdateReport,
)

WEIGHTS = {"W0": np.zeros((3, 2), np.float32), "b0": np.zeros(2, np.float32)}
HONEST = 0.25  # what an honest device adds to every weight


@dataclass
class Behaviour:
    """How one played device answers."""

    step: float = HONEST  # added to every weight
    examples: int = 10  # claimed in update and eval reports
    loss: float = 1.0  # claimed in eval reports


class Devices:
    """Devices that answer every task on the spot (``on_publish`` of the hub)."""

    def __init__(self) -> None:
        self.hub = MemoryHub(on_publish=self.answer)
        self.behaviour: dict[str, Behaviour] = {}

    def join(self, device_id: str, *, announced: int = 10, **behaviour: float) -> None:
        """Bring a device online, announcing ``announced`` local examples."""
        self.behaviour[device_id] = Behaviour(**behaviour)  # type: ignore[arg-type]
        status = Status(online=True, agent_version="1", train_examples=announced)
        self.hub.receive(device_id, status)

    def answer(self, published: Published) -> None:
        message = published.envelope().message
        if not isinstance(message, TrainTask):
            return
        device_id = published.topic.split("/")[3]
        act = self.behaviour[device_id]
        common = {"round_id": message.round_id, "task_id": message.task_id}
        self.hub.receive(device_id, TaskAck(**common, has_weights=True))
        if message.action is TaskAction.EVALUATE:
            report = EvalReport(**common, num_examples=act.examples,
                                metrics={"loss": act.loss, "accuracy": 0.5})  # fmt: skip
            self.hub.receive(device_id, report)
            return
        delta = {
            entry.name: np.full(WEIGHTS[entry.name].shape, act.step, np.float32)
            for entry in message.weights_index
        }
        update = encode_update(delta, parse_codec(message.codec), rng=np.random.default_rng(0))
        blob = np.frombuffer(update.payload, dtype=np.uint8)
        self.hub.receive(
            device_id,
            UpdateReport(**common, num_examples=act.examples, codec=message.codec,
                         arrays={UPDATE_ARRAY: blob}),
        )  # fmt: skip


@pytest.fixture
def devices() -> Iterator[Devices]:
    fleet = Devices()
    fleet.hub.start()
    yield fleet
    fleet.hub.stop()


def _run(devices: Devices, *, federated_eval: bool = False, **changes: object) -> RunResult:
    fields: dict[str, object] = {
        "model": "digits",
        "family": "softmax",
        "initial_weights": WEIGHTS,
        "rounds": 1,
        "clients_per_round": len(devices.behaviour),
        "min_clients": 1,
        "round_timeout_s": 2.0,
        "gather_s": 0.1,
        **changes,
    }
    strategy = build_strategy("fedavg", {}, federated_eval=federated_eval)
    return run_training(devices.hub, strategy, RunConfig(**fields))  # type: ignore[arg-type]


def _moved_by(result: RunResult) -> float:
    """How far the round moved every weight (they all move alike here)."""
    values = np.concatenate([value.ravel() for value in result.weights.values()])
    np.testing.assert_allclose(values, values[0], atol=1e-6)
    return float(values[0])


def _fedavg(steps: list[float], weights: list[int]) -> float:
    """What FedAvg would make of these updates, weighted so."""
    return float(np.average(steps, weights=weights))


# ------------------------------------------------------------ inflated example counts


def test_an_inflated_example_count_does_not_move_the_aggregate_more_than_an_honest_device(
    devices: Devices, caplog: pytest.LogCaptureFixture
) -> None:
    devices.join("honest-a")
    devices.join("honest-b")
    devices.join("liar", step=-HONEST, examples=MAX_EXAMPLES)  # same size, other way
    # Trusted as claimed, the liar would own the round (the attack this stops):
    assert _fedavg([HONEST, HONEST, -HONEST], [10, 10, MAX_EXAMPLES]) == pytest.approx(
        -HONEST, rel=1e-6
    )
    with caplog.at_level(logging.WARNING, logger="coordinator.federated.grid"):
        result = _run(devices)
    [report] = result.rounds
    assert (report.status, report.clients, report.rejected) == ("ok", 3, {})
    assert report.clipped_examples == 1
    assert report.to_json()["clipped_examples"] == 1
    assert _moved_by(result) == pytest.approx(HONEST / 3, abs=1e-6)  # the plain average
    [warning] = [r.getMessage() for r in caplog.records if "reported" in r.getMessage()]
    assert warning.startswith(f"liar reported {MAX_EXAMPLES} examples, announced 10")
    assert "weighted as 10" in warning


def test_an_inflated_announcement_is_bounded_by_the_cap_and_robust_mode_by_the_median(
    devices: Devices,
) -> None:
    devices.join("honest-a")
    devices.join("honest-b")
    devices.join("liar", announced=MAX_EXAMPLES, step=-HONEST, examples=MAX_EXAMPLES)
    capped = _run(devices, max_examples_per_update=1000)
    assert capped.rounds[0].clipped_examples == 1
    assert _moved_by(capped) == pytest.approx(_fedavg([HONEST, HONEST, -HONEST], [10, 10, 1000]))
    robust = _run(devices, max_examples_per_update=1000, robust=True)
    assert robust.rounds[0].status == "ok"
    assert _moved_by(robust) == pytest.approx(HONEST / 3, abs=1e-6)  # weighs like the median


def test_honest_example_counts_still_weigh_the_average(devices: Devices) -> None:
    devices.join("small", announced=10, examples=10, step=0.1)
    devices.join("large", announced=30, examples=24, step=0.5)  # some held out
    result = _run(devices)
    [report] = result.rounds
    assert (report.status, report.clipped_examples, report.rejected) == ("ok", 0, {})
    assert _moved_by(result) == pytest.approx(_fedavg([0.1, 0.5], [10, 24]), abs=1e-6)


def test_an_inflated_evaluation_count_does_not_own_the_federated_metrics(
    devices: Devices,
) -> None:
    devices.join("honest-a", loss=1.0)
    devices.join("honest-b", loss=1.0)
    devices.join("liar", loss=100.0, examples=MAX_EXAMPLES)
    [report] = _run(devices, federated_eval=True).rounds
    assert report.eval_clients == 3
    assert report.loss == pytest.approx((1.0 + 1.0 + 100.0) / 3)
    assert report.clipped_examples == 2  # its update and its evaluation


# ------------------------------------------------------------------- norm outliers


def test_an_update_far_over_the_median_norm_is_rejected_and_honest_ones_pass(
    devices: Devices, caplog: pytest.LogCaptureFixture
) -> None:
    for name in ("honest-a", "honest-b", "honest-c"):
        devices.join(name)
    devices.join("booster", step=-100 * HONEST)  # norm 71, far under max_update_norm (1e4)
    with caplog.at_level(logging.WARNING, logger="coordinator.federated.grid"):
        result = _run(devices)
    [report] = result.rounds
    assert (report.status, report.clients, report.rejected) == ("ok", 3, {"norm_outlier": 1})
    assert _moved_by(result) == pytest.approx(HONEST, abs=1e-6)
    [warning] = [r.getMessage() for r in caplog.records if "norm_outlier" in r.getMessage()]
    assert warning.startswith("rejected the update of booster: norm_outlier: update norm 70.7")
    assert "10x the round's median" in warning


def test_the_outlier_bound_follows_norm_multiple(devices: Devices) -> None:
    for name in ("honest-a", "honest-b", "honest-c"):
        devices.join(name)
    devices.join("loud", step=5 * HONEST)
    kept = _run(devices)
    assert kept.rounds[0].rejected == {}
    assert _moved_by(kept) == pytest.approx(_fedavg([HONEST] * 3 + [5 * HONEST], [10] * 4))
    strict = _run(devices, norm_multiple=4.0)
    assert strict.rounds[0].rejected == {"norm_outlier": 1}
    assert _moved_by(strict) == pytest.approx(HONEST, abs=1e-6)


def test_two_updates_are_too_few_to_call_one_an_outlier(devices: Devices) -> None:
    devices.join("honest-a")
    devices.join("loud", step=100 * HONEST)
    result = _run(devices)
    assert result.rounds[0].rejected == {}
    assert result.rounds[0].clients == 2


# --------------------------------------------------------------------- robust mode


def test_robust_mode_clips_a_large_update_to_the_median_norm(devices: Devices) -> None:
    for name in ("honest-a", "honest-b", "honest-c"):
        devices.join(name)
    devices.join("pusher", step=-8 * HONEST)  # under the outlier bound
    plain = _run(devices)
    assert _moved_by(plain) == pytest.approx((3 * HONEST - 8 * HONEST) / 4)  # taken over
    robust = _run(devices, robust=True)
    assert robust.rounds[0].rejected == {}
    assert _moved_by(robust) == pytest.approx((3 * HONEST - HONEST) / 4, abs=1e-6)


def test_robust_mode_leaves_an_honest_round_alone(devices: Devices) -> None:
    for name in ("honest-a", "honest-b", "honest-c"):
        devices.join(name)
    plain, robust = _run(devices), _run(devices, robust=True)
    assert _moved_by(plain) == _moved_by(robust) == pytest.approx(HONEST, abs=1e-6)
