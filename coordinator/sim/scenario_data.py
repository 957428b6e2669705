"""The data of ``fedge simulate --scenario``: digits shards, the covariate shift, held-out sets.

:func:`scenario_data` splits the digits dataset (seeded) into

* one iid shard of training rows per agent (``<out>/data/shard<i>/local.npz``): each
  agent's local data, which it trains on in a federated run and samples its
  prediction traffic from;
* a held-out half of the test rows for the retraining policy (``holdout.npz``): the
  candidate is compared with the serving model on it. After the shift it is what the
  fleet sees: the share of rows of the shifted devices is shifted, so a candidate is
  measured (and profiled, as its reference) on the fleet's post-shift traffic;
* the other half for the report's accuracy timeline, unshifted (``pre``) and
  shifted (``post``).

The shift (:func:`shift`) rotates each 8x8 digit image by 90 degrees: pixel values
stay in the range the model was packaged with (input validation would refuse a gain
that pushes them out), while every pixel feature's distribution moves. From the
shift tick on, the shifted devices' prediction inputs *and* their local training
data are rotated (:func:`shift_shard` rewrites their ``local.npz``), so a retraining
run on their recent data learns the new inputs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

from coordinator.delivery.packaging import LabelledData
from coordinator.sim.datasets import load_digits_split
from coordinator.sim.local_fleet import save_shards

__all__ = ["ScenarioData", "scenario_data", "shift", "shift_shard"]

SIDE = 8
"""Digits images are 8x8 pixels (64 features)."""

FloatArray = npt.NDArray[np.float32]


def shift(x: FloatArray) -> FloatArray:
    """Digits rows rotated by 90 degrees (same values, moved pixels)."""
    images = x.reshape(len(x), SIDE, SIDE)
    return np.ascontiguousarray(np.rot90(images, 1, axes=(1, 2)).reshape(len(x), -1),
                                dtype=np.float32)  # fmt: skip


@dataclass(frozen=True)
class ScenarioData:
    """What a scenario's agents and report use (see the module docstring).

    Attributes:
        x_train, y_train: All training rows (the serving model v1 is trained on them).
        streams: Each agent's local rows and labels, in agent order.
        shards: Each agent's training data directory.
        shifted: Indices of the agents the shift hits.
        holdout: The policy's held-out data file.
        pre, post: The timeline's test rows, unshifted and shifted.
    """

    x_train: FloatArray
    y_train: npt.NDArray[np.int64]
    streams: list[tuple[FloatArray, npt.NDArray[np.int64]]]
    shards: list[Path]
    shifted: list[int]
    holdout: Path
    pre: LabelledData
    post: LabelledData


def scenario_data(directory: Path, *, agents: int, shifted_share: float, seed: int) -> ScenarioData:
    """Load digits, write the shards and the holdout, choose the shifted agents (seeded)."""
    x_train, y_train, x_test, y_test = load_digits_split(seed)
    rng = np.random.default_rng(seed)
    parts = [np.sort(p) for p in np.array_split(rng.permutation(len(x_train)), agents)]
    shards = save_shards(x_train, y_train, parts, directory)
    count = min(agents, max(1, round(shifted_share * agents)))
    shifted = sorted(int(i) for i in rng.choice(agents, size=count, replace=False))
    order = rng.permutation(len(x_test))
    held, timeline = order[: len(order) // 2], order[len(order) // 2 :]
    x_held = x_test[held].copy()
    moved = rng.random(len(held)) < count / agents
    x_held[moved] = shift(x_held[moved])
    holdout = directory / "holdout.npz"
    np.savez(holdout, x=x_held, y=y_test[held])
    x_eval, y_eval = x_test[timeline], y_test[timeline]
    return ScenarioData(
        x_train=x_train, y_train=y_train,
        streams=[(x_train[p], y_train[p]) for p in parts], shards=shards, shifted=shifted,
        holdout=holdout, pre=LabelledData(x_eval, y_eval), post=LabelledData(shift(x_eval), y_eval),
    )  # fmt: skip


def shift_shard(shard: Path, x: FloatArray, y: npt.NDArray[np.int64]) -> None:
    """Replace a shard's ``local.npz`` by its shifted rows, atomically (the agent reloads
    its data when the file changes; a half-written file is never seen: a dot-name is
    ignored by the agent's loader)."""
    tmp = shard / ".local-shifted.npz"
    np.savez(tmp, x=shift(x), y=y)
    os.replace(tmp, shard / "local.npz")
