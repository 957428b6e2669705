"""Built-in numpy trainers for the ``softmax`` and ``mlp`` families, and the registry.

:class:`DenseTrainer` trains the dense models of :mod:`compress.families` (the same
weight names ``W0, b0, W1, b1, ...`` and shapes, validated by
:func:`compress.families.dense_layers`): ReLU hidden layers, a softmax output and
the mean cross-entropy loss, minimised by mini-batch SGD with momentum or by Adam,
for ``epochs`` local passes over the data in a freshly shuffled order each pass.
:class:`SoftmaxTrainer` and :class:`MlpTrainer` are the two families' trainers.

The loss a fit minimises, for weights ``w`` and the round's global weights ``g``::

    mean cross-entropy + weight_decay/2 * sum ||W_i||^2 + proximal_mu/2 * ||w - g||^2

(the last term is FedProx; weight decay applies to weight matrices, not biases;
with Adam both are added to the gradient, as plain L2). Everything is float32; the
softmax and the cross-entropy are computed from logits with the log-sum-exp shift,
so they neither overflow nor take the log of 0. Floating-point overflow during
training (a learning rate far too high) is caught and reported as
:class:`~edge_agent.errors.TrainingError` rather than returning NaN weights.

Memory: besides the data, a fit holds two or three copies of the weights (current,
global, optimizer state) and one mini-batch's activations; evaluation runs in
chunks of ``eval_batch_size`` rows.

Registry: :func:`trainer_for` returns a fresh trainer for a family name. A device
with its own model code calls :func:`register_trainer` at start-up with a factory
(any callable returning a :class:`~edge_agent.training.trainer.Trainer`), for a
new family or, with ``replace=True``, instead of a built-in one.
"""

from __future__ import annotations

import logging
import re
import threading
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np

from compress.errors import FamilyError
from compress.families import DenseLayer, check_family, dense_layers
from edge_agent.errors import DataSourceError, NoDataError, TrainingError
from edge_agent.training.trainer import (
    Dataset,
    EvalResult,
    FitResult,
    FloatArray,
    LabelArray,
    TrainConfig,
    Trainer,
)

__all__ = [
    "DEFAULT_EVAL_BATCH_SIZE",
    "DenseTrainer",
    "MlpTrainer",
    "SoftmaxTrainer",
    "TrainerFactory",
    "register_trainer",
    "registered_families",
    "trainer_for",
    "unregister_trainer",
]

logger = logging.getLogger(__name__)

DEFAULT_EVAL_BATCH_SIZE = 1024
"""Rows per chunk when evaluating."""

_ADAM_BETA1 = 0.9
_ADAM_BETA2 = 0.999
_ADAM_EPS = 1e-8

TrainerFactory = Callable[[], Trainer]
"""Makes a trainer; a class with a no-argument constructor is one."""


# ------------------------------------------------------------------------ numerics


def _log_softmax_loss(logits: FloatArray, labels: LabelArray) -> tuple[FloatArray, FloatArray, int]:
    """Per-example cross-entropy, probabilities, and correct predictions.

    Returns:
        ``(losses (n,), probabilities (n, classes), number correct)``.
    """
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_norm = np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    log_probs = shifted - log_norm
    rows = np.arange(labels.shape[0])
    losses: FloatArray = -log_probs[rows, labels]
    probs: FloatArray = np.exp(log_probs)
    correct = int((logits.argmax(axis=1) == labels).sum())
    return losses, probs, correct


def _forward(params: list[FloatArray], x: FloatArray) -> tuple[list[FloatArray], FloatArray]:
    """Forward pass; returns the inputs of every layer and the output logits."""
    inputs = [x]
    h = x
    n_layers = len(params) // 2
    for i in range(n_layers):
        z = h @ params[2 * i] + params[2 * i + 1]
        if i < n_layers - 1:
            h = np.maximum(z, 0.0)
            inputs.append(h)
        else:
            return inputs, z
    raise AssertionError("unreachable: a model has at least one layer")


class _Sgd:
    """Mini-batch SGD with (heavy-ball) momentum: ``v = m*v + g; w -= lr*v``."""

    def __init__(self, params: list[FloatArray], lr: float, momentum: float) -> None:
        self._lr = np.float32(lr)
        self._momentum = np.float32(momentum)
        self._velocity = [np.zeros_like(p) for p in params] if momentum > 0 else None

    def step(self, params: list[FloatArray], grads: list[FloatArray]) -> None:
        """Update ``params`` in place from ``grads``."""
        for i, param in enumerate(params):
            direction = grads[i]
            if self._velocity is not None:
                velocity = self._velocity[i]
                np.multiply(velocity, self._momentum, out=velocity)
                np.add(velocity, direction, out=velocity)
                direction = velocity
            np.subtract(param, self._lr * direction, out=param)


class _Adam:
    """Adam (Kingma & Ba) with bias correction; betas 0.9 and 0.999."""

    def __init__(self, params: list[FloatArray], lr: float) -> None:
        self._lr = lr
        self._m = [np.zeros_like(p) for p in params]
        self._v = [np.zeros_like(p) for p in params]
        self._t = 0

    def step(self, params: list[FloatArray], grads: list[FloatArray]) -> None:
        """Update ``params`` in place from ``grads``."""
        self._t += 1
        step_size = np.float32(
            self._lr * np.sqrt(1.0 - _ADAM_BETA2**self._t) / (1.0 - _ADAM_BETA1**self._t)
        )
        b1, b2 = np.float32(_ADAM_BETA1), np.float32(_ADAM_BETA2)
        eps = np.float32(_ADAM_EPS)
        for param, grad, mean, var in zip(params, grads, self._m, self._v, strict=True):
            np.multiply(mean, b1, out=mean)
            np.add(mean, (1 - b1) * grad, out=mean)
            np.multiply(var, b2, out=var)
            np.add(var, (1 - b2) * (grad * grad), out=var)
            np.subtract(param, step_size * mean / (np.sqrt(var) + eps), out=param)


# ------------------------------------------------------------------------ trainer


class DenseTrainer:
    """Trains and evaluates a built-in dense family (``softmax`` or ``mlp``) in numpy.

    Args:
        family: ``"softmax"`` or ``"mlp"``.
        eval_batch_size: Rows per chunk in :meth:`evaluate` and
            :meth:`predict_proba` (bounds memory).

    Raises:
        TrainingError: ``family`` is not a built-in dense family, or
            ``eval_batch_size`` is below 1.
    """

    def __init__(self, family: str, *, eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> None:
        try:
            self._family: str = check_family(family)
        except FamilyError as exc:
            raise TrainingError(str(exc)) from exc
        if eval_batch_size < 1:
            raise TrainingError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self._eval_batch_size = eval_batch_size

    @property
    def family(self) -> str:
        """The model family this trainer handles."""
        return self._family

    def __repr__(self) -> str:
        return f"{type(self).__name__}(family={self._family!r})"

    # ----------------------------------------------------------------- checks

    def _layers(self, weights: Mapping[str, Any]) -> list[DenseLayer]:
        try:
            return dense_layers(self._family, weights)
        except FamilyError as exc:
            raise TrainingError(f"unusable {self._family} weights: {exc}") from exc

    def _check_data(self, layers: list[DenseLayer], data: Dataset, what: str) -> None:
        if not isinstance(data, Dataset):
            raise TrainingError(f"{what} data must be a Dataset, got {type(data).__name__}")
        if data.task != "classification":
            raise TrainingError(
                f"the {self._family} trainer learns classification only, not {data.task}; "
                "train a PyTorch model for that task (family torch)"
            )
        if data.x.ndim != 2:
            raise TrainingError(
                f"the {self._family} trainer takes rows of features, shape (n, features); "
                f"these examples have shape {data.sample_shape}: flatten them or train a "
                "PyTorch model (family torch)"
            )
        if len(data) == 0:
            raise NoDataError(f"no examples to {what} on")
        if data.num_features != layers[0].fan_in:
            raise DataSourceError(
                f"the data has {data.num_features} features but the model expects "
                f"{layers[0].fan_in}"
            )
        n_classes = layers[-1].fan_out
        if data.num_classes > n_classes:
            raise DataSourceError(
                f"label {data.num_classes - 1} is out of range for a model with "
                f"{n_classes} classes (labels must be 0..{n_classes - 1})"
            )

    # -------------------------------------------------------------------- fit

    def fit(
        self,
        weights: Mapping[str, FloatArray],
        data: Dataset,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Train from ``weights`` on ``data`` for ``config.epochs`` epochs.

        ``weights`` are not modified. The shuffling (and the ``max_examples``
        sample) come from ``rng`` only, so equal inputs give equal weights.

        Args:
            weights: The global weights ``W0, b0, ...`` of this trainer's family.
            data: The training examples.
            config: Epochs, batch size, optimizer, regularisation.
            rng: Source of all randomness.

        Returns:
            The trained weights (float32, same names and shapes), the number of
            examples trained on, and the metrics ``train_loss`` (mean cross-entropy,
            without the regularisation terms) and ``train_accuracy`` over the last
            epoch, measured on each batch before its update.

        Raises:
            TrainingError: Unusable weights, ``data`` is not a classification
                dataset of rows ``(n, features)``, or training diverged (non-finite
                loss or weights: lower the learning rate).
            NoDataError: ``data`` is empty.
            DataSourceError: The data's feature count does not match the weights,
                or a label is not a class of the model.
        """
        layers = self._layers(weights)
        self._check_data(layers, data, "train")
        data = data.capped(config.max_examples, rng)
        global_params: list[FloatArray] = []
        for layer in layers:
            global_params += [layer.weight, layer.bias]
        params = [p.copy() for p in global_params]
        try:
            with np.errstate(over="raise", invalid="raise", divide="raise"):
                loss, accuracy = self._train(params, global_params, data, config, rng)
        except FloatingPointError as exc:
            raise TrainingError(
                f"training diverged ({exc}); lower the learning rate (lr={config.lr})"
            ) from exc
        if not (np.isfinite(loss) and all(np.isfinite(p).all() for p in params)):
            raise TrainingError(
                f"training diverged (non-finite loss or weights); lower the learning "
                f"rate (lr={config.lr})"
            )
        new_weights: dict[str, FloatArray] = {}
        for i in range(len(layers)):
            new_weights[f"W{i}"] = params[2 * i]
            new_weights[f"b{i}"] = params[2 * i + 1]
        logger.debug(
            "%s: trained %d examples for %d epochs: loss %.4f, accuracy %.4f",
            self._family,
            len(data),
            config.epochs,
            loss,
            accuracy,
        )
        return FitResult(
            weights=new_weights,
            num_examples=len(data),
            metrics={"train_loss": loss, "train_accuracy": accuracy},
        )

    @staticmethod
    def _train(
        params: list[FloatArray],
        global_params: list[FloatArray],
        data: Dataset,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> tuple[float, float]:
        """The training loop; updates ``params`` in place, returns last-epoch metrics."""
        optimizer: _Sgd | _Adam
        if config.optimizer == "adam":
            optimizer = _Adam(params, config.lr)
        else:
            optimizer = _Sgd(params, config.lr, config.momentum)
        decay = np.float32(config.weight_decay)
        mu = np.float32(config.proximal_mu)
        n = len(data)
        labels = data.labels
        n_layers = len(params) // 2
        total_loss = 0.0
        correct = 0
        for _ in range(config.epochs):
            total_loss = 0.0
            correct = 0
            order = rng.permutation(n)
            for start in range(0, n, config.batch_size):
                idx = order[start : start + config.batch_size]
                xb, yb = data.x[idx], labels[idx]
                inputs, logits = _forward(params, xb)
                losses, probs, hits = _log_softmax_loss(logits, yb)
                total_loss += float(losses.sum(dtype=np.float64))
                correct += hits
                # d(mean CE)/d logits = (softmax - onehot) / batch
                g = probs
                g[np.arange(yb.shape[0]), yb] -= 1.0
                g /= np.float32(yb.shape[0])
                grads: list[FloatArray] = [np.empty(0, np.float32)] * len(params)
                for i in reversed(range(n_layers)):
                    grads[2 * i] = inputs[i].T @ g
                    grads[2 * i + 1] = g.sum(axis=0)
                    if i > 0:
                        g = (g @ params[2 * i].T) * (inputs[i] > 0)
                if decay:
                    for i in range(n_layers):
                        grads[2 * i] += decay * params[2 * i]
                if mu:
                    for grad, param, anchor in zip(grads, params, global_params, strict=True):
                        np.add(grad, mu * (param - anchor), out=grad)
                optimizer.step(params, grads)
        return total_loss / n, correct / n

    # --------------------------------------------------------------- evaluate

    def evaluate(self, weights: Mapping[str, FloatArray], data: Dataset) -> EvalResult:
        """Mean cross-entropy and accuracy of ``weights`` on ``data``.

        Args:
            weights: Weights of this trainer's family.
            data: The examples.

        Returns:
            Loss, accuracy and the number of examples.

        Raises:
            TrainingError: Unusable weights, or ``data`` is not a classification
                dataset of rows ``(n, features)``.
            NoDataError: ``data`` is empty.
            DataSourceError: Feature count or labels do not fit the weights.
        """
        layers = self._layers(weights)
        self._check_data(layers, data, "evaluate")
        params: list[FloatArray] = []
        for layer in layers:
            params += [layer.weight, layer.bias]
        total_loss = 0.0
        correct = 0
        with np.errstate(over="ignore", invalid="ignore"):
            for start in range(0, len(data), self._eval_batch_size):
                stop = start + self._eval_batch_size
                _, logits = _forward(params, data.x[start:stop])
                losses, _, hits = _log_softmax_loss(logits, data.labels[start:stop])
                total_loss += float(losses.sum(dtype=np.float64))
                correct += hits
        n = len(data)
        loss = total_loss / n
        if not np.isfinite(loss):
            raise TrainingError("evaluation loss is not finite: the weights overflow on this data")
        return EvalResult(loss=loss, accuracy=correct / n, num_examples=n)

    def predict_proba(self, weights: Mapping[str, FloatArray], x: FloatArray) -> FloatArray:
        """Class probabilities for rows ``x``, as :func:`compress.families.forward`.

        Raises:
            TrainingError: Unusable weights, or ``x`` does not have the model's
                feature count.
        """
        layers = self._layers(weights)
        rows = np.asarray(x, dtype=np.float32)
        if rows.ndim != 2 or rows.shape[1] != layers[0].fan_in:
            raise TrainingError(f"input must have shape (n, {layers[0].fan_in}), got {rows.shape}")
        params: list[FloatArray] = []
        for layer in layers:
            params += [layer.weight, layer.bias]
        out = np.empty((rows.shape[0], layers[-1].fan_out), np.float32)
        for start in range(0, rows.shape[0], self._eval_batch_size):
            _, logits = _forward(params, rows[start : start + self._eval_batch_size])
            shifted = logits - logits.max(axis=1, keepdims=True)
            exp = np.exp(shifted)
            out[start : start + self._eval_batch_size] = exp / exp.sum(axis=1, keepdims=True)
        return out


class SoftmaxTrainer(DenseTrainer):
    """:class:`DenseTrainer` for ``softmax`` regression."""

    def __init__(self, *, eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> None:
        super().__init__("softmax", eval_batch_size=eval_batch_size)


class MlpTrainer(DenseTrainer):
    """:class:`DenseTrainer` for the ``mlp`` family."""

    def __init__(self, *, eval_batch_size: int = DEFAULT_EVAL_BATCH_SIZE) -> None:
        super().__init__("mlp", eval_batch_size=eval_batch_size)


# ------------------------------------------------------------------------ registry

_FAMILY_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,63}")
_BUILTIN: dict[str, TrainerFactory] = {"softmax": SoftmaxTrainer, "mlp": MlpTrainer}
_registry: dict[str, TrainerFactory] = dict(_BUILTIN)
_registry_lock = threading.Lock()


def register_trainer(family: str, factory: TrainerFactory, *, replace: bool = False) -> None:
    """Make :func:`trainer_for` use ``factory`` for ``family``.

    Args:
        family: The family name (1-64 of ``[A-Za-z0-9_.-]``, as in train tasks).
        factory: A callable returning a :class:`Trainer`, called once per
            :func:`trainer_for` call.
        replace: Allow replacing a registered trainer (a built-in included).

    Raises:
        TrainingError: Invalid family name or factory, or the family already has
            a trainer and ``replace`` is false.
    """
    if not isinstance(family, str) or not _FAMILY_RE.fullmatch(family):
        raise TrainingError(f"invalid family name {family!r}")
    if not callable(factory):
        raise TrainingError(f"trainer factory for {family!r} is not callable")
    with _registry_lock:
        if family in _registry and not replace:
            raise TrainingError(
                f"family {family!r} already has a trainer; pass replace=True to replace it"
            )
        _registry[family] = factory
    logger.info("training: registered a trainer for family %r", family)


def unregister_trainer(family: str) -> None:
    """Undo :func:`register_trainer`: built-in families get their built-in trainer back.

    Unknown families are ignored.
    """
    with _registry_lock:
        if family in _BUILTIN:
            _registry[family] = _BUILTIN[family]
        else:
            _registry.pop(family, None)


def registered_families() -> tuple[str, ...]:
    """The families :func:`trainer_for` knows, sorted."""
    with _registry_lock:
        return tuple(sorted(_registry))


def trainer_for(family: str) -> Trainer:
    """A fresh trainer for ``family``.

    Raises:
        TrainingError: No trainer is registered for ``family``, or its factory
            failed or returned something that is not a trainer.
    """
    with _registry_lock:
        factory = _registry.get(family)
        known = sorted(_registry)
    if factory is None:
        raise TrainingError(
            f"no trainer for model family {family!r}; known families: {', '.join(known)}"
        )
    try:
        trainer = factory()
    except TrainingError:
        raise
    except Exception as exc:
        raise TrainingError(f"trainer factory for {family!r} failed: {exc}") from exc
    if not isinstance(trainer, Trainer):
        raise TrainingError(
            f"trainer factory for {family!r} returned {type(trainer).__name__}, "
            "which has no fit/evaluate methods"
        )
    return trainer
