"""Local training data: :class:`Dataset`, validated and converted once.

Every source of examples on a device (the ``.npz`` file of ``[training] data``,
the labelled-feedback buffer, a simulation's shard) ends up as a :class:`Dataset`:

1. construction checks the arrays and converts them once (``x`` to finite,
   C-contiguous float32 of rank >= 2; ``y`` to what the task learns from: int64 class
   indices, float32 targets, or nothing for reconstruction), raising
   :class:`~edge_agent.errors.DataSourceError` with what is wrong;
2. :meth:`Dataset.concatenate`, :meth:`Dataset.take`, :meth:`Dataset.capped` and
   :meth:`Dataset.split` (a stratified, seeded holdout) make new datasets without
   checking again;
3. the trainers (:mod:`edge_agent.training.trainer`) read ``x`` and ``y`` as they are.

:func:`real_array` and :func:`finite_float32` are the array checks, shared with the
feedback records.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DataSourceError, TrainConfigError
from edge_agent.training.model_spec import ModelTask, check_task

__all__ = ["MAX_CLASSES", "Dataset", "FloatArray", "LabelArray", "finite_float32", "real_array"]

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]

MAX_CLASSES = 65536
"""Labels are class indices in ``[0, MAX_CLASSES)``."""


def real_array(value: object, what: str) -> npt.NDArray[Any]:
    """``value`` as a numpy array of real numbers (bool, integers or floats), not converted.

    ``what`` names the values in the error (``"features"``, ``"inputs"`` ...).

    Raises:
        DataSourceError: ``value`` is not an array of real numbers.
    """
    try:
        raw = np.asarray(value)
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"{what} are not a numeric array: {exc}") from exc
    if raw.dtype.kind not in "fiub":
        raise DataSourceError(f"{what} must be real numbers, got dtype {raw.dtype}")
    return raw


def finite_float32(raw: npt.NDArray[Any], what: str, *, copy: bool = False) -> FloatArray:
    """``raw`` as C-contiguous float32, every value finite.

    Without ``copy`` an array already in that form is returned as it is.
    Values beyond float32's range become infinity and are refused.

    Raises:
        DataSourceError: a value is NaN or infinite (as float32).
    """
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
        if copy:
            out: FloatArray = np.array(raw, dtype=np.float32, order="C")
        else:
            out = np.ascontiguousarray(raw, dtype=np.float32)
    if not np.isfinite(out).all():
        raise DataSourceError(f"{what} contain NaN or infinity (or values beyond float32)")
    return out


def _as_features(x: object) -> FloatArray:
    """Validate and convert a batch of examples (see :class:`Dataset`)."""
    raw = real_array(x, "features")
    if raw.ndim < 2 or 0 in raw.shape[1:]:
        raise DataSourceError(
            f"features must have shape (n, ...) with every example dimension >= 1, got {raw.shape}"
        )
    return finite_float32(raw, "features")


def _as_labels(y: object) -> LabelArray:
    """Validate and convert a label vector (see :class:`Dataset`)."""
    try:
        raw = np.asarray(y)
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"labels are not a numeric array: {exc}") from exc
    if raw.ndim != 1:
        raise DataSourceError(f"labels must have shape (n,), got {raw.shape}")
    if raw.dtype.kind == "f":
        if not (np.isfinite(raw).all() and (raw == np.round(raw)).all()):
            raise DataSourceError("labels must be whole numbers (class indices)")
    elif raw.dtype.kind not in "iu":
        raise DataSourceError(f"labels must be integers, got dtype {raw.dtype}")
    if raw.size and (raw.min() < 0 or raw.max() >= MAX_CLASSES):
        raise DataSourceError(
            f"labels must be class indices in [0, {MAX_CLASSES}), "
            f"got values from {raw.min()} to {raw.max()}"
        )
    labels: LabelArray = np.ascontiguousarray(raw, dtype=np.int64)
    return labels


def _as_targets(y: object) -> FloatArray:
    """Validate and convert regression targets (see :class:`Dataset`)."""
    raw = real_array(y, "targets")
    if raw.ndim not in (1, 2) or (raw.ndim == 2 and raw.shape[1] == 0):
        raise DataSourceError(f"targets must have shape (n,) or (n, outputs), got {raw.shape}")
    return finite_float32(raw, "targets")


@dataclass(frozen=True, eq=False)
class Dataset:
    """Examples ``x`` (n, ...) and what the task learns from them, ``y``.

    Construction validates and converts: ``x`` becomes float32 (C-contiguous; arrays
    already in that form are used as they are, not copied). ``x`` may have any
    rank >= 2: ``(n, features)`` rows, ``(n, 1, 28, 28)`` images, ``(n, channels,
    steps)`` sensor windows. What ``y`` holds depends on ``task``:

    * ``classification``: int64 class indices (n,), each in ``[0, MAX_CLASSES)``
      (whole-number floats are accepted);
    * ``regression``: float32 targets (n,) or (n, outputs);
    * ``reconstruction``: nothing (``y`` is ignored; pass None through
      :meth:`from_arrays`); stored as a float32 array of shape (n, 0).

    A dataset may be empty (n = 0) but always knows its example shape.

    Attributes:
        x: float32 examples, shape (n, ...), all finite.
        y: Labels, targets or an (n, 0) placeholder (see above).
        task: The learning task the ``y`` fits.

    Raises:
        DataSourceError: ``x`` is not a finite real array of rank >= 2, ``y`` does
            not fit the task, or their lengths differ.
        TrainConfigError: ``task`` is not a known task.
    """

    x: FloatArray
    y: npt.NDArray[Any]
    task: ModelTask = "classification"

    def __post_init__(self) -> None:
        """Validate and convert the arrays (see the class docstring)."""
        task = check_task(self.task)
        x = _as_features(self.x)
        y: npt.NDArray[Any]
        if task == "reconstruction":
            y = np.zeros((x.shape[0], 0), np.float32)
        elif self.y is None:  # from_arrays passes None
            raise DataSourceError(f"{task} needs y (labels or targets); got none")
        elif task == "classification":
            y = _as_labels(self.y)
        else:
            y = _as_targets(self.y)
        if x.shape[0] != y.shape[0]:
            raise DataSourceError(f"{x.shape[0]} examples but {y.shape[0]} labels/targets")
        object.__setattr__(self, "x", x)
        object.__setattr__(self, "y", y)
        object.__setattr__(self, "task", task)

    @property
    def labels(self) -> LabelArray:
        """``y`` as class labels (classification only).

        Raises:
            DataSourceError: this dataset is not for classification.
        """
        if self.task != "classification":
            raise DataSourceError(f"a {self.task} dataset has no class labels")
        labels: LabelArray = self.y
        return labels

    @classmethod
    def from_arrays(
        cls, x: npt.ArrayLike, y: npt.ArrayLike | None, task: ModelTask = "classification"
    ) -> Dataset:
        """A dataset from any array-likes (lists, float64 or integer arrays ...).

        The same as the constructor, typed for inputs that are not yet float32 and
        int64.

        Raises:
            DataSourceError: As the constructor.
        """
        return cls(x, y, task)  # type: ignore[arg-type]  # __post_init__ converts

    @classmethod
    def empty(
        cls, sample_shape: int | tuple[int, ...], task: ModelTask = "classification"
    ) -> Dataset:
        """A dataset with no examples of shape ``sample_shape`` (an int: rows of that width).

        Raises:
            DataSourceError: a dimension is below 1.
        """
        shape = (sample_shape,) if isinstance(sample_shape, int) else tuple(sample_shape)
        y = np.zeros(0, np.float32 if task == "regression" else np.int64)
        return cls(np.zeros((0, *shape), np.float32), y, check_task(task))

    @classmethod
    def concatenate(cls, parts: Sequence[Dataset]) -> Dataset:
        """All examples of ``parts``, in order.

        Raises:
            DataSourceError: ``parts`` is empty, or their example shapes, tasks or
                target widths differ.
        """
        if not parts:
            raise DataSourceError("nothing to concatenate")
        shapes = {part.sample_shape for part in parts}
        if len(shapes) > 1:
            widths = sorted(str(s) for s in shapes)
            if all(len(s) == 1 for s in shapes):
                widths = sorted(str(s[0]) for s in shapes)
                raise DataSourceError(f"datasets have different feature counts: {widths}")
            raise DataSourceError(f"datasets have different example shapes: {widths}")
        tasks = {part.task for part in parts}
        if len(tasks) > 1:
            raise DataSourceError(f"datasets are for different tasks: {sorted(tasks)}")
        if len(parts) == 1:
            return parts[0]
        try:
            y = np.concatenate([part.y for part in parts])
        except ValueError as exc:
            raise DataSourceError(f"targets do not fit together: {exc}") from exc
        return cls(np.concatenate([part.x for part in parts]), y, parts[0].task)

    def __len__(self) -> int:
        """The number of examples."""
        return int(self.x.shape[0])

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example (``(features,)`` for rows)."""
        return tuple(int(d) for d in self.x.shape[1:])

    @property
    def num_features(self) -> int:
        """Values per example (the column count of rows)."""
        return int(np.prod(self.sample_shape))

    @property
    def num_classes(self) -> int:
        """One more than the largest label (0 when empty or not classification)."""
        if self.task != "classification" or not len(self):
            return 0
        return int(self.labels.max()) + 1

    def take(self, indices: npt.NDArray[np.integer[Any]]) -> Dataset:
        """The examples at ``indices``, in that order (a copy).

        Raises:
            IndexError: an index is out of range.
        """
        return Dataset(self.x[indices], self.y[indices], self.task)

    def capped(self, max_examples: int | None, rng: np.random.Generator) -> Dataset:
        """At most ``max_examples`` examples: a sample drawn from ``rng``, in data order.

        The dataset itself when it is no larger than ``max_examples`` or the cap
        is None (:attr:`TrainConfig.max_examples`); no randomness is drawn then.
        """
        if max_examples is None or len(self) <= max_examples:
            return self
        return self.take(np.sort(rng.choice(len(self), size=max_examples, replace=False)))

    def split(self, holdout_fraction: float = 0.2, seed: int = 0) -> tuple[Dataset, Dataset]:
        """Split into (train, held-out) sets, deterministically for a given ``seed``.

        The examples are permuted with a generator seeded by ``seed`` and the first
        ``round(n * holdout_fraction)`` go to the held-out set; with a fraction above
        0 and at least two examples, each side gets at least one. The same data and
        seed always give the same split; each side keeps the original order.

        Args:
            holdout_fraction: Share of examples held out, in ``[0, 1)``.
            seed: Non-negative seed of the permutation.

        Returns:
            ``(train, test)``.

        Raises:
            TrainConfigError: ``holdout_fraction`` is outside ``[0, 1)`` or ``seed``
                is negative.
        """
        if isinstance(holdout_fraction, bool) or not (
            isinstance(holdout_fraction, int | float) and 0.0 <= holdout_fraction < 1.0
        ):
            raise TrainConfigError(f"holdout_fraction must be in [0, 1), got {holdout_fraction!r}")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise TrainConfigError(f"seed must be a non-negative integer, got {seed!r}")
        n = len(self)
        n_test = round(n * holdout_fraction)
        if holdout_fraction > 0 and n >= 2:
            n_test = min(max(n_test, 1), n - 1)
        order = np.random.default_rng(seed).permutation(n)
        test_idx = np.sort(order[:n_test])
        train_idx = np.sort(order[n_test:])
        return self.take(train_idx), self.take(test_idx)
