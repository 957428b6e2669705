"""The trainer interface: datasets, training settings, and what a trainer returns.

A :class:`Trainer` is anything with ``fit`` and ``evaluate``. The agent hands it the
round's global weights (a flat mapping of named float arrays, as in
:mod:`compress.families`), the local :class:`Dataset`, the typed
:class:`TrainConfig`, and a seeded random generator; it gets back a
:class:`FitResult` (the new local weights, how many examples they were trained on,
and training metrics) or an :class:`EvalResult`. Datasets (validation and
conversion of the arrays, splits) are :mod:`edge_agent.training.dataset`'s,
re-exported here. The built-in numpy trainers live in
:mod:`edge_agent.training.numpy_trainers`; a device that can afford a framework may
plug in its own (see :func:`edge_agent.training.numpy_trainers.register_trainer`).

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
from collections.abc import Mapping
from dataclasses import dataclass, field, fields
from typing import Literal, Protocol, runtime_checkable

import numpy as np

from edge_agent.errors import TrainConfigError
from edge_agent.training.dataset import (
    MAX_CLASSES,
    Dataset,
    FloatArray,
    LabelArray,
    finite_float32,
    real_array,
)

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

ConfigValue = int | float | str | bool
"""A value of the coordinator's flat training config."""

Optimizer = Literal["sgd", "adam"]
OPTIMIZERS: tuple[str, ...] = ("sgd", "adam")
"""Optimizers :class:`TrainConfig` accepts."""

MAX_EPOCHS = 1000
MAX_BATCH_SIZE = 1 << 20
MAX_LR = 100.0
_MAX_SEED = 2**63 - 1
_MAX_EXAMPLES = 2**53 - 1


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
