"""The data of a simulated fleet: a dataset loaded, sized for the fleet and partitioned.

:func:`fleet_data` is what ``fedge simulate`` trains on:

1. **Dataset**: ``auto`` (the default) is scikit-learn's bundled ``digits`` while it
   holds :data:`EXAMPLES_PER_AGENT` training examples per agent, else a synthetic set
   sized for the fleet; a bare ``synthetic`` (Gaussian blobs) is sized the same way and
   never below :data:`SYNTHETIC_SHAPE`; ``synthetic:n,f,c``, ``digits`` and a ``.npz``
   path (arrays ``x``, ``y``) are used as given (:func:`load_dataset`).
2. **Split**: 70/30, stratified by label and seeded; the 30 % is the coordinator's test
   set.
3. **Partition** of the 70 % over the agents (:func:`partition`: ``iid``,
   ``dirichlet:ALPHA`` or ``shards:K``), every agent holding at least
   :data:`MIN_EXAMPLES_PER_AGENT` examples.

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

from coordinator.delivery.packaging import LabelledData, load_labelled_npz
from coordinator.errors import RunError
from coordinator.sim.datasets import dirichlet_partition, load_digits_split

__all__ = [
    "EXAMPLES_PER_AGENT",
    "MIN_EXAMPLES_PER_AGENT",
    "SYNTHETIC_SHAPE",
    "FleetData",
    "fleet_data",
    "load_dataset",
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


def _split(
    x: npt.NDArray[np.float32], y: npt.NDArray[np.int64], seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], LabelledData]:
    """70/30, stratified by label, seeded."""
    rng = np.random.default_rng(seed)
    test_mask = np.zeros(len(y), dtype=bool)
    for label in np.unique(y):
        members = np.flatnonzero(y == label)
        rng.shuffle(members)
        test_mask[members[: round(0.3 * len(members))]] = True
    return x[~test_mask], y[~test_mask], LabelledData(x[test_mask], y[test_mask])


def load_dataset(
    spec: str, seed: int
) -> tuple[npt.NDArray[np.float32], npt.NDArray[np.int64], LabelledData]:
    """Training features and labels, and the held-out test set.

    ``digits`` (scikit-learn's, bundled), ``synthetic[:n_samples,n_features,n_classes]``
    (Gaussian blobs, default :data:`SYNTHETIC_SHAPE`) or the path of a ``.npz`` with
    ``x``, ``y``. (``auto``, and a bare ``synthetic`` sized for a fleet: :func:`fleet_data`.)

    Raises:
        RunError: an unknown spec, or unusable data.
    """
    if spec == "digits":
        x_train, y_train, x_test, y_test = load_digits_split(seed)
        return x_train, y_train, LabelledData(x_test, y_test)
    match = _SYNTHETIC_RE.fullmatch(spec)
    if match:
        n, features, classes = (
            (int(g) for g in match.groups()) if match.group(1) else SYNTHETIC_SHAPE
        )
        if n < 10 * classes or features < 1 or classes < 2:
            raise RunError(f"synthetic data needs n >= 10 * classes, got {spec}")
        rng = np.random.default_rng(seed)
        centers = rng.normal(0.0, 1.0, (classes, features)).astype(np.float32)
        y = rng.integers(0, classes, n).astype(np.int64)
        x = (centers[y] + rng.normal(0.0, 1.2, (n, features))).astype(np.float32)
        return _split(x, y, seed)
    path = Path(spec)
    if path.suffix != ".npz":
        raise RunError(
            f"unknown dataset {spec!r}: use digits, synthetic[:n,features,classes] or a .npz file"
        )
    data = load_labelled_npz(path)
    return _split(data.x, data.y, seed)


def partition(
    labels: npt.NDArray[np.int64], agents: int, spec: str, seed: int
) -> list[npt.NDArray[np.int64]]:
    """Example indices per agent: ``iid``, ``dirichlet:ALPHA`` or ``shards:K``.

    ``shards:K`` sorts the examples by label, cuts them into ``agents * K`` equal
    shards and deals K to each agent (the classic pathological non-IID split).

    Raises:
        RunError: an unknown spec, or too few examples for the agents.
    """
    rng = np.random.default_rng(seed)
    n = len(labels)
    kind, _, arg = spec.partition(":")
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


_MORE_DATA_HINT = "; --dataset auto or synthetic sizes the data for the fleet"


@dataclass(frozen=True)
class FleetData:
    """The data one simulation trains on, as :func:`fleet_data` chose it for the fleet."""

    dataset: str
    """The concrete dataset spec (``auto`` and a bare ``synthetic`` resolved)."""
    partition: str
    chosen: str
    """Why this dataset: ``as given``, or how ``auto``/``synthetic`` was resolved."""
    x: npt.NDArray[np.float32]
    y: npt.NDArray[np.int64]
    test: LabelledData
    parts: list[npt.NDArray[np.int64]]
    """Indices into ``x``/``y``, one array per agent."""

    def to_json(self) -> dict[str, Any]:
        """``report.json``'s ``data``: specs, reason, example counts and the one-line summary."""
        sizes = [len(p) for p in self.parts]
        return {
            "dataset": self.dataset,
            "partition": self.partition,
            "chosen": self.chosen,
            "training_examples": len(self.y),
            "test_examples": len(self.test.y),
            "examples_per_agent": {"min": min(sizes), "max": max(sizes)},
            "summary": (
                f"{self.dataset} ({self.chosen}), {self.partition}: {len(self.y)} examples, "
                f"{min(sizes)} to {max(sizes)} per agent"
            ),
        }


def _synthetic_for(agents: int) -> tuple[str, str]:
    """A bare ``synthetic`` for ``agents``, and why: :data:`EXAMPLES_PER_AGENT` training
    examples each on average (70 % of the set trains), in hundreds, never under the
    default size."""
    n, features, classes = SYNTHETIC_SHAPE
    needed = math.ceil(EXAMPLES_PER_AGENT * agents / 0.7 / 100) * 100
    why = f"sized for {agents} agents" if needed > n else "default size"
    return f"synthetic:{max(n, needed)},{features},{classes}", why


def fleet_data(dataset: str, partition_spec: str, agents: int, seed: int) -> FleetData:
    """Load ``dataset`` and partition it over ``agents`` by ``partition_spec``.

    ``auto`` is ``digits`` while it holds :data:`EXAMPLES_PER_AGENT` training examples
    per agent, else a synthetic set sized for the fleet; a bare ``synthetic`` is sized for
    the fleet the same way (never below :data:`SYNTHETIC_SHAPE`). Any other spec is used
    as given. Every agent gets at least :data:`MIN_EXAMPLES_PER_AGENT` examples.

    Raises:
        RunError: an unknown spec, unusable data, or too little for the agents.
    """
    spec, chosen = dataset, "as given"
    if dataset == "auto":
        x, y, test = load_dataset("digits", seed)
        if len(y) >= EXAMPLES_PER_AGENT * agents:
            parts = partition(y, agents, partition_spec, seed)
            return FleetData("digits", partition_spec, "auto", x, y, test, parts)
    if dataset in {"auto", "synthetic"}:
        spec, why = _synthetic_for(agents)
        too_small = "digits too small" if why == "default size" else why
        chosen = f"auto: {too_small}" if dataset == "auto" else why
    x, y, test = load_dataset(spec, seed)
    parts = partition(y, agents, partition_spec, seed)
    return FleetData(spec, partition_spec, chosen, x, y, test, parts)
