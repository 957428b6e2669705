"""The data of a simulated fleet: a dataset loaded, sized for the fleet and partitioned.

:func:`fleet_data` is what ``fedge simulate`` trains on:

1. **Dataset**: ``auto`` (the default) is scikit-learn's bundled ``digits`` while it
   holds :data:`EXAMPLES_PER_AGENT` training examples per agent, else a synthetic set
   sized for the fleet; a bare ``synthetic`` (Gaussian blobs) is sized the same way and
   never below :data:`SYNTHETIC_SHAPE`; ``synthetic:n,f,c``, ``digits``, a real
   dataset of :data:`~coordinator.sim.real_datasets.REAL_DATASETS` and a ``.npz``
   path are used as given (:func:`load_fleet_dataset`). These built-in sets are
   classification on rows; a real dataset brings its own task and example shape; a
   ``.npz`` holds ``x`` (n, ...) of any shape, ``y`` (class labels, float targets or,
   for reconstruction, optional anomaly flags) and optionally ``groups`` (one integer
   per example: the device, site or person it came from).
2. **Split**: a real dataset keeps its own train/test split; the others are split
   70/30, seeded: stratified by label for classification, at random for regression,
   and for reconstruction the training part holds only normal examples (the test part
   keeps 30 % of them and every example flagged as an anomaly). The test part is the
   coordinator's test set.
3. **Partition** of the training part over the agents (:func:`partition`): ``iid``;
   ``dirichlet:ALPHA`` (label skew; for regression over
   :data:`REGRESSION_BINS` quantile bins of the target); ``shards:K``
   (classification); ``natural`` (one source per agent, by ``groups``). Every agent
   holds at least :data:`MIN_EXAMPLES_PER_AGENT` examples.

The result (:class:`FleetData`) says what was chosen and why: ``report.json``'s
``data`` entry and the ``data`` line of the command's summary.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.fileio import load_npz
from coordinator.delivery.packaging import MAX_DATA_FILE_BYTES, LabelledData
from coordinator.errors import RunError
from coordinator.sim.datasets import (
    dirichlet_partition,
    group_partition,
    load_digits_split,
    quantile_bins,
    random_test_mask,
    stratified_test_mask,
)
from coordinator.sim.real_datasets import (
    REAL_DATASETS,
    TEST_FRACTION,
    RealDataset,
    load_real_dataset,
)
from edge_agent.training.model_spec import TASKS, ModelTask

__all__ = [
    "EXAMPLES_PER_AGENT",
    "MIN_EXAMPLES_PER_AGENT",
    "REGRESSION_BINS",
    "SYNTHETIC_SHAPE",
    "FleetData",
    "fleet_data",
    "load_dataset",
    "load_fleet_dataset",
    "partition",
]

_SYNTHETIC_RE = re.compile(r"synthetic(?::(\d+),(\d+),(\d+))?")
SYNTHETIC_SHAPE = (6000, 32, 10)
"""A bare ``synthetic``: at least 6000 examples (see :func:`fleet_data`), 32 features,
10 classes."""
EXAMPLES_PER_AGENT = 20
"""Training examples per agent, on average, in the data that ``auto`` and a bare
``synthetic`` choose: enough for every agent of a Dirichlet(0.5) split to hold
:data:`MIN_EXAMPLES_PER_AGENT`, up to
:data:`~coordinator.sim.simulate.MAX_AGENTS`."""
MIN_EXAMPLES_PER_AGENT = 2
"""Fewest training examples a partition may give an agent."""


REGRESSION_BINS = 5
"""Quantile bins of a regression target that ``dirichlet:ALPHA`` skews by."""
_DATASET_CHOICES = (
    f"digits, synthetic[:n,features,classes], {', '.join(REAL_DATASETS)} or a .npz file"
)


def _split(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], LabelledData]:
    """70/30, stratified by label, seeded."""
    test_mask = stratified_test_mask(y, TEST_FRACTION, seed)
    return x[~test_mask], y[~test_mask], LabelledData(x[test_mask], y[test_mask])


def load_dataset(
    spec: str, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], LabelledData]:
    """Training features and labels, and the held-out test set, of classification data.

    ``digits`` (scikit-learn's, bundled), ``synthetic[:n_samples,n_features,n_classes]``
    (Gaussian blobs, default :data:`SYNTHETIC_SHAPE`), a real classification dataset or
    the path of a ``.npz`` with ``x``, ``y``. (``auto``, and a bare ``synthetic`` sized
    for a fleet: :func:`fleet_data`; other tasks: :func:`load_fleet_dataset`.)

    Raises:
        RunError: an unknown spec, unusable data, or data of another task.
    """
    data = load_fleet_dataset(spec, seed, "classification")
    assert data.y_train is not None  # classification
    return data.x_train, data.y_train, LabelledData(data.x_test, data.y_test)


def load_fleet_dataset(spec: str, seed: int, task: ModelTask | None = None) -> RealDataset:
    """Load ``spec`` (see the module docstring) and split it into train and test.

    Args:
        spec: ``digits``, ``synthetic[:n,features,classes]``, a name of
            :data:`~coordinator.sim.real_datasets.REAL_DATASETS` or a ``.npz`` path.
        seed: Seed of the split (and of synthetic data).
        task: The task the data is for; None: the real dataset's own, else
            classification (a ``.npz`` without ``y``: reconstruction).

    Raises:
        RunError: an unknown spec or task, unusable data, or a task the data does not
            have (:class:`~coordinator.errors.DatasetUnavailableError` when a real
            dataset's package is missing).
    """
    if task is not None and task not in TASKS:
        raise RunError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    if spec in REAL_DATASETS:
        data = load_real_dataset(spec, seed=seed)
    elif spec.endswith(".npz"):
        return _npz_dataset(Path(spec), seed, task)
    elif spec == "digits":
        x_train, y_train, x_test, y_test = load_digits_split(seed)
        data = RealDataset("digits", "classification", x_train, y_train, x_test, y_test, None, "")
    elif match := _SYNTHETIC_RE.fullmatch(spec):
        data = _synthetic(spec, match, seed)
    else:
        raise RunError(f"unknown dataset {spec!r}: use {_DATASET_CHOICES}")
    if task is not None and task != data.task:
        raise RunError(f"dataset {spec!r} is {data.task} data, not {task}")
    return data


def _synthetic(spec: str, match: re.Match[str], seed: int) -> RealDataset:
    """Gaussian blobs ``synthetic[:n,features,classes]``, split 70/30 stratified."""
    n, features, classes = (int(g) for g in match.groups()) if match.group(1) else SYNTHETIC_SHAPE
    if n < 10 * classes or features < 1 or classes < 2:
        raise RunError(f"synthetic data needs n >= 10 * classes, got {spec}")
    rng = np.random.default_rng(seed)
    centers = rng.normal(0.0, 1.0, (classes, features)).astype(np.float32)
    y = rng.integers(0, classes, n).astype(np.int64)
    x = (centers[y] + rng.normal(0.0, 1.2, (n, features))).astype(np.float32)
    x_train, y_train, test = _split(x, y, seed)
    return RealDataset(spec, "classification", x_train, y_train, test.x, test.y, None, "")


def _npz_dataset(path: Path, seed: int, task: ModelTask | None) -> RealDataset:
    """A ``.npz`` with ``x`` (n, ...), ``y`` optional, ``groups`` optional, split 70/30.

    Raises:
        RunError: an unreadable file, or arrays that do not fit each other or the task.
    """
    arrays = load_npz(path, max_bytes=MAX_DATA_FILE_BYTES, error=RunError, what="dataset file")
    x, y, groups = arrays.get("x"), arrays.get("y"), arrays.get("groups")
    if x is None or x.ndim < 2 or len(x) == 0 or x.dtype.kind not in "fiu":
        raise RunError(
            f"{path}: expected a numeric array 'x' of shape (n, ...), found "
            f"{ {k: v.shape for k, v in arrays.items()} }"
        )
    if not np.isfinite(x).all():
        raise RunError(f"{path}: x contains NaN or infinity")
    task = task or ("classification" if y is not None else "reconstruction")
    y_kinds = {"classification": "iu", "regression": "fiu", "reconstruction": "iub"}[task]
    for name, array, kinds in (("y", y, y_kinds), ("groups", groups, "iu")):
        if array is not None and (len(array) != len(x) or array.dtype.kind not in kinds):
            floats = " (float targets are for the regression task)" if name == "y" else ""
            raise RunError(
                f"{path}: {name} must have {len(x)} entries of kind {kinds!r} "
                f"for {task}, got {array.dtype} {array.shape}{floats}"
            )
    if y is None and task != "reconstruction":
        raise RunError(f"{path}: {task} needs an array 'y' (a .npz without y is reconstruction)")
    features = x.astype(np.float32)
    if task == "classification":
        assert y is not None
        if y.ndim != 1 or y.min() < 0:
            raise RunError(f"{path}: class labels y must be (n,) integers >= 0")
        test = stratified_test_mask(y, TEST_FRACTION, seed)
        train_y: npt.NDArray[Any] | None = y[~test].astype(np.int64)
        test_y = y[test].astype(np.int64)
    elif task == "regression":
        assert y is not None
        if y.ndim not in (1, 2) or not np.isfinite(y).all():
            raise RunError(f"{path}: regression targets y must be finite, (n,) or (n, k)")
        test = random_test_mask(len(x), TEST_FRACTION, seed)
        train_y, test_y = y[~test].astype(np.float32), y[test].astype(np.float32)
    else:
        flags = np.zeros(len(x), np.int64) if y is None else y.astype(np.int64)
        if flags.ndim != 1 or not np.isin(flags, (0, 1)).all():
            raise RunError(f"{path}: anomaly flags y must be (n,) values 0 or 1")
        test = stratified_test_mask(flags, TEST_FRACTION, seed) | (flags == 1)
        train_y, test_y = None, flags[test]
    if not (~test).any():
        raise RunError(f"{path}: too few examples to keep some for training")
    return RealDataset(
        str(path),
        task,
        features[~test],
        train_y,
        features[test],
        test_y,
        None if groups is None else groups[~test].astype(np.int64),
        str(path),
    )


def partition(
    labels: npt.NDArray[Any],
    agents: int,
    spec: str,
    seed: int,
    *,
    task: ModelTask = "classification",
    groups: npt.NDArray[np.int64] | None = None,
) -> list[npt.NDArray[np.int64]]:
    """Example indices per agent: ``iid``, ``dirichlet:ALPHA``, ``shards:K`` or ``natural``.

    ``shards:K`` sorts the examples by label, cuts them into ``agents * K`` equal
    shards and deals K to each agent (the classic pathological non-IID split).
    ``natural`` gives each source of ``groups`` to one agent (round-robin when there
    are more sources than agents). By task: classification takes all four;
    regression ``iid``, ``dirichlet:ALPHA`` (over :data:`REGRESSION_BINS` quantile
    bins of the target) and ``natural``; reconstruction ``iid`` and ``natural``.

    Args:
        labels: One entry per example: class labels, regression targets (n,) or
            (n, k), or for reconstruction anything of that length.
        agents: Number of agents.
        spec: The partition.
        seed: RNG seed.
        task: What ``labels`` hold.
        groups: The source of each example, for ``natural``.

    Raises:
        RunError: an unknown spec or one the task does not take, no groups for
            ``natural``, or too few examples for the agents.
    """
    kind, _, arg = spec.partition(":")
    allowed = {
        "classification": ("iid", "dirichlet", "shards", "natural"),
        "regression": ("iid", "dirichlet", "natural"),
        "reconstruction": ("iid", "natural"),
    }[task]
    if kind not in allowed:
        raise RunError(
            f"partition {spec!r}: a {task} task takes "
            f"{', '.join(_PARTITION_FORMS[k] for k in allowed)}"
        )
    if kind == "natural":
        return _natural(spec, arg, agents, groups)
    if task == "regression" and kind == "dirichlet":
        labels = quantile_bins(labels, REGRESSION_BINS)
    rng = np.random.default_rng(seed)
    n = len(labels)
    try:
        if kind == "iid" and not arg:
            order = rng.permutation(n)
            parts = np.array_split(order, agents)
        elif kind == "dirichlet":
            alpha = float(arg)
            if not alpha > 0:
                raise ValueError("dirichlet:ALPHA needs ALPHA > 0")
            try:
                return dirichlet_partition(
                    labels, agents, alpha, seed=seed, min_examples=MIN_EXAMPLES_PER_AGENT
                )
            except ValueError as exc:  # too few examples for the agents
                raise RunError(f"partition {spec!r}: {exc}{_MORE_DATA_HINT}") from exc
        elif kind == "shards":
            k = int(arg)
            if k < 1:
                raise ValueError("shards:K needs K >= 1")
            order = np.argsort(labels, kind="stable")
            shards = np.array_split(order, agents * k)
            picks = rng.permutation(agents * k)
            parts = [
                np.concatenate([shards[j] for j in picks[i * k : (i + 1) * k]])
                for i in range(agents)
            ]
        else:
            raise ValueError("use iid, dirichlet:ALPHA or shards:K")
    except ValueError as exc:
        raise RunError(f"partition {spec!r}: {exc}") from exc
    result = [np.sort(p).astype(np.int64) for p in parts]
    if min(len(p) for p in result) < MIN_EXAMPLES_PER_AGENT:
        raise RunError(f"{n} examples are too few for {agents} agents{_MORE_DATA_HINT}")
    return result


_PARTITION_FORMS = {
    "iid": "iid",
    "dirichlet": "dirichlet:ALPHA",
    "shards": "shards:K",
    "natural": "natural",
}
_MORE_DATA_HINT = "; --dataset auto or synthetic sizes the data for the fleet"


def _natural(
    spec: str, arg: str, agents: int, groups: npt.NDArray[np.int64] | None
) -> list[npt.NDArray[np.int64]]:
    """The ``natural`` partition: by the source of each example."""
    if arg:
        raise RunError(f"partition {spec!r}: natural takes no argument")
    if groups is None:
        raise RunError(
            "partition 'natural' needs to know where each example came from: this dataset "
            "has no groups (give a .npz with an array 'groups', one integer per example)"
        )
    try:
        return group_partition(groups, agents, min_examples=MIN_EXAMPLES_PER_AGENT)
    except ValueError as exc:
        raise RunError(f"partition 'natural': {exc}; use fewer agents") from exc


@dataclass(frozen=True)
class FleetData:
    """The data one simulation trains on, as :func:`fleet_data` chose it for the fleet."""

    dataset: str
    """The concrete dataset spec (``auto`` and a bare ``synthetic`` resolved)."""
    partition: str
    chosen: str
    """Why this dataset: ``as given``, or how ``auto``/``synthetic`` was resolved."""
    x: npt.NDArray[np.float32]
    """Training examples, (n, ...)."""
    y: npt.NDArray[Any] | None
    """Class labels (int64), regression targets (float32), or None (reconstruction)."""
    test: LabelledData
    parts: list[npt.NDArray[np.int64]]
    """Indices into ``x``/``y``, one array per agent."""
    task: ModelTask = "classification"
    source: str = ""
    """Package, version and file of a real dataset; a .npz's path; empty for built-ins."""
    target_scale: tuple[float, float] | None = None
    """``(mean, std)`` of a standardized regression target (see
    :class:`~coordinator.sim.real_datasets.RealDataset`)."""

    @property
    def labels(self) -> npt.NDArray[np.int64]:
        """``y`` as class labels.

        Raises:
            RunError: this is not classification data.
        """
        if self.task != "classification" or self.y is None:
            raise RunError(f"dataset {self.dataset!r} is {self.task} data, not classification")
        labels: npt.NDArray[np.int64] = self.y
        return labels

    def to_json(self) -> dict[str, Any]:
        """``report.json``'s ``data``: specs, task, reason, example counts and the summary.

        ``source`` and ``target_scale`` appear when set.
        """
        sizes = [len(p) for p in self.parts]
        body: dict[str, Any] = {
            "dataset": self.dataset,
            "partition": self.partition,
            "chosen": self.chosen,
            "task": self.task,
            "training_examples": len(self.x),
            "test_examples": len(self.test.y),
            "examples_per_agent": {"min": min(sizes), "max": max(sizes)},
            "summary": (
                f"{self.dataset} ({self.chosen}), {self.partition}: {len(self.x)} examples, "
                f"{min(sizes)} to {max(sizes)} per agent"
            ),
        }
        if self.source:
            body["source"] = self.source
        if self.target_scale is not None:
            body["target_scale"] = {"mean": self.target_scale[0], "std": self.target_scale[1]}
        return body


def _synthetic_for(agents: int) -> tuple[str, str]:
    """A bare ``synthetic`` for ``agents``, and why: :data:`EXAMPLES_PER_AGENT` training
    examples each on average (70 % of the set trains), in hundreds, never under the
    default size."""
    n, features, classes = SYNTHETIC_SHAPE
    needed = math.ceil(EXAMPLES_PER_AGENT * agents / 0.7 / 100) * 100
    why = f"sized for {agents} agents" if needed > n else "default size"
    return f"synthetic:{max(n, needed)},{features},{classes}", why


def fleet_data(
    dataset: str, partition_spec: str, agents: int, seed: int, task: ModelTask | None = None
) -> FleetData:
    """Load ``dataset`` and partition it over ``agents`` by ``partition_spec``.

    ``auto`` is ``digits`` while it holds :data:`EXAMPLES_PER_AGENT` training examples
    per agent, else a synthetic set sized for the fleet; a bare ``synthetic`` is sized for
    the fleet the same way (never below :data:`SYNTHETIC_SHAPE`). Any other spec is used
    as given (:func:`load_fleet_dataset`). Every agent gets at least
    :data:`MIN_EXAMPLES_PER_AGENT` examples.

    Args:
        dataset: The dataset spec (see the module docstring).
        partition_spec: How to share the training examples among the agents.
        agents: Number of agents.
        seed: Seed of the split, the partition and synthetic data.
        task: The task the data is for; None: the dataset's own (a real dataset's, a
            ``.npz`` without ``y``: reconstruction, else classification). ``auto`` and
            ``synthetic`` are classification data.

    Raises:
        RunError: an unknown spec, unusable data, data of another task, or too little
            for the agents (:class:`~coordinator.errors.DatasetUnavailableError` when a
            real dataset's package is missing).
    """
    spec, chosen = dataset, "as given"
    if dataset in {"auto", "synthetic"} and task not in (None, "classification"):
        raise RunError(
            f"--dataset {dataset} is classification data; for a {task} task give "
            f"one of {', '.join(REAL_DATASETS)} or a .npz file"
        )
    if dataset == "auto":
        x, y, test = load_dataset("digits", seed)
        if len(y) >= EXAMPLES_PER_AGENT * agents:
            parts = partition(y, agents, partition_spec, seed)
            return FleetData("digits", partition_spec, "auto", x, y, test, parts)
    if dataset in {"auto", "synthetic"}:
        spec, why = _synthetic_for(agents)
        too_small = "digits too small" if why == "default size" else why
        chosen = f"auto: {too_small}" if dataset == "auto" else why
    data = load_fleet_dataset(spec, seed, task)
    labels = data.y_train if data.y_train is not None else np.zeros(len(data.x_train), np.int64)
    parts = partition(
        labels, agents, partition_spec, seed, task=data.task, groups=data.groups_train
    )
    test = LabelledData(data.x_test, data.y_test, data.task)
    return FleetData(
        spec,
        partition_spec,
        chosen,
        data.x_train,
        data.y_train,
        test,
        parts,
        data.task,
        data.source,
        data.target_scale,
    )
