"""The data of ``fedge simulate``: datasets, partitions, and data sized for any fleet.

Pure: no broker, no agents. The defaults (``--dataset auto``, and a bare ``synthetic``
as in the simulation issue's command, both with ``--partition dirichlet:0.5``) must give
every agent enough examples for any fleet the command accepts, up to MAX_AGENTS.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import RunError
from coordinator.sim.fleet_data import (
    EXAMPLES_PER_AGENT,
    MIN_EXAMPLES_PER_AGENT,
    fleet_data,
    load_dataset,
    partition,
)
from coordinator.sim.simulate import MAX_AGENTS, SimulationConfig

DEFAULT_PARTITION = "dirichlet:0.5"


def test_the_defaults_are_auto_and_dirichlet() -> None:
    config = SimulationConfig(out=Path("run"))
    assert (config.dataset, config.partition) == ("auto", DEFAULT_PARTITION)


@pytest.mark.parametrize("dataset", ["auto", "synthetic"])
@pytest.mark.parametrize("agents", [1, 20, 300, 1000, MAX_AGENTS])
def test_the_default_data_fits_any_fleet(dataset: str, agents: int) -> None:
    data = fleet_data(dataset, DEFAULT_PARTITION, agents, seed=0)

    assert len(data.parts) == agents
    assert min(len(p) for p in data.parts) >= MIN_EXAMPLES_PER_AGENT
    covered = np.sort(np.concatenate(data.parts))
    assert np.array_equal(covered, np.arange(len(data.y)))
    assert len(data.y) >= EXAMPLES_PER_AGENT * agents
    summary = data.to_json()
    assert summary["dataset"] == data.dataset
    assert summary["examples_per_agent"]["min"] >= MIN_EXAMPLES_PER_AGENT
    assert summary["summary"].startswith(f"{data.dataset} (")
    assert f"), {DEFAULT_PARTITION}: " in summary["summary"]


def test_auto_is_digits_while_digits_is_big_enough_then_synthetic_for_the_fleet() -> None:
    small = fleet_data("auto", DEFAULT_PARTITION, 20, seed=0)
    assert (small.dataset, small.chosen) == ("digits", "auto")
    big = fleet_data("auto", DEFAULT_PARTITION, 1000, seed=0)
    assert big.dataset == "synthetic:28600,32,10"
    assert big.chosen == "auto: sized for 1000 agents"
    assert big.to_json()["summary"].startswith(
        "synthetic:28600,32,10 (auto: sized for 1000 agents), dirichlet:0.5: 20022 examples, "
    )
    middle = fleet_data("auto", DEFAULT_PARTITION, 100, seed=0)
    assert (middle.dataset, middle.chosen) == ("synthetic:6000,32,10", "auto: digits too small")


def test_a_bare_synthetic_keeps_its_default_size_for_small_fleets() -> None:
    data = fleet_data("synthetic", DEFAULT_PARTITION, 20, seed=0)
    assert (data.dataset, data.chosen) == ("synthetic:6000,32,10", "default size")
    assert fleet_data("synthetic", DEFAULT_PARTITION, 300, seed=0).chosen == "sized for 300 agents"
    x, y, _test = load_dataset("synthetic", seed=0)
    assert np.array_equal(data.x, x)
    assert np.array_equal(data.y, y)


def test_a_dataset_given_explicitly_is_used_as_given() -> None:
    data = fleet_data("synthetic:600,8,3", "iid", 6, seed=1)
    assert (data.dataset, data.chosen) == ("synthetic:600,8,3", "as given")


def test_too_little_explicit_data_is_refused_with_a_hint() -> None:
    with pytest.raises(RunError, match=r"no Dirichlet\(0.5\).*--dataset auto or synthetic"):
        fleet_data("synthetic:600,8,3", DEFAULT_PARTITION, 100, seed=0)
    with pytest.raises(RunError, match=r"too few for 3000 agents; --dataset auto"):
        fleet_data("synthetic:6000,32,10", "iid", 3000, seed=0)


def test_datasets_and_partitions() -> None:
    x, y, test = load_dataset("synthetic:600,8,3", seed=1)
    assert x.shape[1] == 8 == test.x.shape[1]
    assert len(y) + len(test.y) == 600
    for spec in ("iid", "dirichlet:0.3", "shards:2"):
        parts = partition(y, 6, spec, seed=0)
        joined = sorted(i for p in parts for i in p.tolist())
        assert joined == list(range(len(y)))
    pathological = partition(y, 6, "shards:1", seed=0)
    assert all(len(set(y[p].tolist())) <= 2 for p in pathological)
    for bad in ("nope", "dirichlet:x", "dirichlet:0", "shards:0", "iid:3"):
        with pytest.raises(RunError):
            partition(y, 6, bad, seed=0)
    with pytest.raises(RunError):
        load_dataset("mnist", seed=0)


def test_reference_models_train_or_say_they_did_not_converge() -> None:
    from coordinator.sim.datasets import (  # noqa: PLC0415 (scikit-learn behind it)
        load_digits_split,
        train_reference_mlp,
        train_reference_softmax,
    )

    x, y, _x_test, _y_test = load_digits_split()
    x, y = x[:300], y[:300]
    softmax = train_reference_softmax(x, y)
    assert softmax["W0"].shape == (x.shape[1], 10)
    with pytest.raises(ValueError, match="logistic regression did not converge within max_iter=1"):
        train_reference_softmax(x, y, max_iter=1)
    with pytest.raises(ValueError, match="the MLP did not converge within max_iter=1 epochs"):
        train_reference_mlp(x, y, hidden=(8,), max_iter=1)
