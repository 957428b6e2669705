"""The trainer interface: datasets, training settings, and what a trainer returns.

A :class:`Trainer` is anything with ``fit`` and ``evaluate``. The agent hands it the
round's global weights (a flat mapping of named float arrays, as in
:mod:`compress.families`), the local :class:`Dataset`, the typed
:class:`TrainConfig`, and a seeded random generator; it gets back a
:class:`FitResult` (the new local weights, how many examples they were trained on,
and training metrics) or an :class:`EvalResult`. The built-in numpy trainers live
in :mod:`edge_agent.training.numpy_trainers`; a device that can afford a
framework may plug in its own (see
:func:`edge_agent.training.numpy_trainers.register_trainer`).

Workflow for a train task::

    config = TrainConfig.from_mapping(task.config)     # TrainConfigError if bad
    result = trainer.fit(weights, train_data, config, config.rng(task.round_id))

Settings arrive from the coordinator as a flat dict of int, float, str or bool
(Flower's ``ConfigRecord`` style). :meth:`TrainConfig.from_mapping` accepts each
setting under its field name or with dashes (``batch-size``), plus the aliases
Flower's strategies and templates use (``server-round``, ``proximal-mu``,
``local-epochs``, ``learning-rate``); unknown keys are ignored with a debug log, so
a newer coordinator can send settings an older device does not know; a known key
with a bad type or value raises :class:`~edge_agent.errors.TrainConfigError`
naming it.

Randomness: :meth:`TrainConfig.rng` seeds a generator from ``seed``, the round and
any extra salt (a round id, a device id), so each round shuffles differently yet a
rerun of the same round is bit-for-bit reproducible.
"""

from __future__ import annotations

import hashlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, fields
from typing import Any, Literal, Protocol, runtime_checkable

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DataSourceError, TrainConfigError
from edge_agent.training.model_spec import ModelTask, check_task

__all__ = [
    "MAX_CLASSES",
    "OPTIMIZERS",
    "ConfigValue",
    "Dataset",
    "EvalResult",
    "FitResult",
    "FloatArray",
    "LabelArray",
    "Optimizer",
    "TrainConfig",
    "Trainer",
    "finite_float32",
    "real_array",
]

logger = logging.getLogger(__name__)

FloatArray = npt.NDArray[np.float32]
LabelArray = npt.NDArray[np.int64]

ConfigValue = int | float | str | bool
"""A value of the coordinator's flat training config."""

MAX_CLASSES = 65536
"""Labels are class indices in ``[0, MAX_CLASSES)``."""

Optimizer = Literal["sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
"""Optimizers :class:`TrainConfig` accepts."""

MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1 << 20
MAX_LR = 100.0
_MAX_SEED = 2**63 - 1
_MAX_EXAMPLES = 2**53 - 1


# --------------------------------------------------------------------------- dataset


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


# --------------------------------------------------------------------------- config


def _check_int(name: str, value: object, low: int, high: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int | np.integer):
        raise TrainConfigError(f"{name} must be an integer, got {type(value).__name__}")
    number = int(value)
    if not low <= number <= high:
        raise TrainConfigError(f"{name} must be between {low} and {high}, got {number}")
    return number


def _check_float(
    name: str, value: object, low: float, high: float, *, low_open: bool = False
) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float | np.integer | np.floating):
        raise TrainConfigError(f"{name} must be a number, got {type(value).__name__}")
    number = float(value)
    too_low = number <= low if low_open else number < low
    if not math.isfinite(number) or too_low or number > high:
        bound = f"> {low}" if low_open else f">= {low}"
        raise TrainConfigError(f"{name} must be finite, {bound} and <= {high}, got {value!r}")
    return number


# Other spellings a coordinator may use, by normalized key (dashes -> underscores).
_ALIASES = {
    "round": "server_round",
    "local_epochs": "epochs",
    "learning_rate": "lr",
}


def _salt_int(value: int | str) -> int:
    """A non-negative integer for seeding from an int or a string (stable hash)."""
    if isinstance(value, bool):
        raise TypeError("rng salt must be an int or a str, not a bool")
    if isinstance(value, int):
        return value if value >= 0 else (-value << 1) | 1  # injective for negatives
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).digest()
    return int.from_bytes(digest[:8], "big")


@dataclass(frozen=True, kw_only=True)
class TrainConfig:
    """Typed settings of one local training run.

    Attributes:
        epochs: Passes over the local data (1..1000).
        batch_size: Examples per mini-batch (1..2**20).
        lr: Learning rate (> 0, <= 100). Adam usually wants 0.001-0.01.
        optimizer: ``"sgd"`` (mini-batch SGD with momentum) or ``"adam"``.
        momentum: SGD momentum in ``[0, 1)`` (ignored by Adam, whose betas are
            0.9 and 0.999).
        weight_decay: L2 penalty on the weight matrices (not the biases), in
            ``[0, 1]``.
        proximal_mu: FedProx coefficient (>= 0): adds ``mu/2 * ||w - w_global||^2``
            to the loss, which keeps local weights near the round's global ones.
        seed: Base seed (>= 0) of shuffling and sampling.
        server_round: The federated round number (>= 0), mixed into the seed.
        max_examples: Train on at most this many examples (a seeded random
            sample) per round; None for all.

    Raises:
        TrainConfigError: A value has the wrong type or is out of range.
    """

    epochs: int = 1
    batch_size: int = 32
    lr: float = 0.1
    optimizer: Optimizer = "sgd"
    momentum: float = 0.9
    weight_decay: float = 0.0
    proximal_mu: float = 0.0
    seed: int = 0
    server_round: int = 0
    max_examples: int | None = None

    def __post_init__(self) -> None:
        """Check every value (see the class docstring)."""
        setters: dict[str, object] = {
            "epochs": _check_int("epochs", self.epochs, 1, MAX_EPOCHS),
            "batch_size": _check_int("batch_size", self.batch_size, 1, MAX_BATCH_SIZE),
            "lr": _check_float("lr", self.lr, 0.0, MAX_LR, low_open=True),
            "momentum": _check_float("momentum", self.momentum, 0.0, 1.0),
            "weight_decay": _check_float("weight_decay", self.weight_decay, 0.0, 1.0),
            "proximal_mu": _check_float("proximal_mu", self.proximal_mu, 0.0, 1e6),
            "seed": _check_int("seed", self.seed, 0, _MAX_SEED),
            "server_round": _check_int("server_round", self.server_round, 0, _MAX_SEED),
        }
        if setters["momentum"] == 1.0:
            raise TrainConfigError("momentum must be below 1, got 1.0")
        if not isinstance(self.optimizer, str) or self.optimizer.lower() not in OPTIMIZERS:
            raise TrainConfigError(
                f"optimizer must be one of {', '.join(OPTIMIZERS)}, got {self.optimizer!r}"
            )
        setters["optimizer"] = self.optimizer.lower()
        if self.max_examples is not None:
            setters["max_examples"] = _check_int(
                "max_examples", self.max_examples, 1, _MAX_EXAMPLES
            )
        for name, value in setters.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_mapping(cls, config: Mapping[str, ConfigValue]) -> TrainConfig:
        """Build the settings from the coordinator's flat config dict.

        Keys are field names, with dashes or underscores (``batch-size``), or the
        aliases ``server-round``/``round``, ``local-epochs`` and ``learning-rate``.
        Missing keys take their defaults; ``max_examples`` of 0 means no cap (a
        flat config has no ``None``). Unknown keys are ignored (debug log).

        Args:
            config: Key -> int, float, str or bool.

        Returns:
            The validated settings.

        Raises:
            TrainConfigError: A known key has a bad type or value, or one setting is
                given twice (under two spellings) with different values.
        """
        known = {f.name for f in fields(cls)}
        values: dict[str, object] = {}
        sources: dict[str, str] = {}
        for key, value in config.items():
            name = str(key).strip().lower().replace("-", "_")
            name = _ALIASES.get(name, name)
            if name not in known:
                logger.debug("training config: ignoring unknown key %r", key)
                continue
            if name in values and values[name] != value:
                raise TrainConfigError(
                    f"{key} and {sources[name]} both set {name}, to different values "
                    f"({value!r} and {values[name]!r})"
                )
            values[name] = value
            sources[name] = str(key)
        if values.get("max_examples") == 0 and not isinstance(values["max_examples"], bool):
            values["max_examples"] = None
        try:
            return cls(**values)  # type: ignore[arg-type]
        except TrainConfigError as exc:
            raise TrainConfigError(f"bad training config: {exc}") from exc

    def to_mapping(self) -> dict[str, ConfigValue]:
        """The settings as a flat dict that :meth:`from_mapping` reads back.

        Returns:
            Field name -> value; ``max_examples`` of None becomes 0.
        """
        out: dict[str, ConfigValue] = {}
        for f in fields(self):
            value = getattr(self, f.name)
            out[f.name] = 0 if value is None else value
        return out

    def rng(self, *salt: int | str) -> np.random.Generator:
        """A generator seeded by ``seed``, ``server_round`` and ``salt``.

        The same settings and salt always give the same stream; a different round,
        seed or salt gives an unrelated one.

        Args:
            salt: Extra values mixed into the seed, e.g. the task's round id (a
                string) or the device id; strings are hashed (sha256).

        Returns:
            A fresh :class:`numpy.random.Generator`.
        """
        entropy = [self.seed, self.server_round, *(_salt_int(s) for s in salt)]
        return np.random.default_rng(np.random.SeedSequence(entropy))


# --------------------------------------------------------------------------- results


@dataclass(frozen=True, eq=False)
class FitResult:
    """What :meth:`Trainer.fit` returns.

    Attributes:
        weights: The locally trained weights, same names and shapes as the input,
            float32.
        num_examples: Examples trained on (after any ``max_examples`` cap); the
            weight of this update in federated averaging.
        metrics: Finite training metrics, e.g. ``train_loss`` and
            ``train_accuracy`` (over the last epoch).
    """

    weights: dict[str, FloatArray]
    num_examples: int
    metrics: dict[str, float]


@dataclass(frozen=True)
class EvalResult:
    """What :meth:`Trainer.evaluate` returns.

    Attributes:
        loss: The task's loss: mean cross-entropy (classification), mean squared
            error (regression, reconstruction).
        accuracy: Share of examples whose most probable class is the label; None
            for other tasks.
        num_examples: Examples evaluated.
        extra: Further finite metrics of the task (e.g. ``mse``, ``mae``).
    """

    loss: float
    accuracy: float | None
    num_examples: int
    extra: dict[str, float] = field(default_factory=dict)

    def metrics(self) -> dict[str, float]:
        """``{"loss": ..., "accuracy": ...}`` plus the task's own metrics, for an eval report.

        ``accuracy`` is left out when None (regression, reconstruction).
        """
        out = {"loss": self.loss}
        if self.accuracy is not None:
            out["accuracy"] = self.accuracy
        out.update(self.extra)
        return out


@runtime_checkable
class Trainer(Protocol):
    """Trains and evaluates one model family on local data.

    Implementations must not modify the weights they are given, must draw all
    randomness from the ``rng`` argument (so a run is reproducible), and must
    raise :class:`~edge_agent.errors.TrainingError` (or a subclass) for weights or
    data they cannot use.
    """

    def fit(
        self,
        weights: Mapping[str, FloatArray],
        data: Dataset,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Train from ``weights`` on ``data``; return the new weights.

        Raises:
            TrainingError: The weights or data are unusable, or training diverged.
        """
        ...

    def evaluate(self, weights: Mapping[str, FloatArray], data: Dataset) -> EvalResult:
        """Loss and accuracy of ``weights`` on ``data``.

        Raises:
            TrainingError: The weights or data are unusable.
        """
        ...
