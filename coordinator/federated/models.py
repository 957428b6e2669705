"""What a federated run trains: the model, its task, and how the coordinator scores it.

A run trains either a **built-in family** (``softmax``, ``mlp``: numpy models on rows
of features, classification only) or a **PyTorch factory** named by a model spec
``module.path:function`` (family ``torch``), for one of three tasks:
``classification``, ``regression`` or ``reconstruction`` (anomaly detection).
:class:`ModelDef` holds that choice with the input shape and output count the model
is built for; everything that sends, starts or scores a model reads it:

1. :func:`model_def_for` turns what an operator typed (``--model mlp`` or
   ``--model mypkg.models:cnn``, ``--task``) and the data's shape into a
   :class:`ModelDef`. A spec is canonical (``zoo:small_cnn`` becomes
   ``edge_agent.training.zoo:small_cnn``, as devices list it in their status); the
   task is ``--task``, else the factory's own ``task`` attribute, else
   classification.
2. :func:`initial_weights` gives the seeded starting weights (the torch ones come
   from building the module once: :mod:`edge_agent.training.torch_models`);
   :func:`torch_module` builds the module holding given (final) weights, for
   packaging.
3. Train tasks carry :attr:`ModelDef.family`, :attr:`ModelDef.spec`,
   :attr:`ModelDef.task` and :meth:`ModelDef.model_args` to the devices.
4. :func:`evaluate_model` scores global weights on the coordinator's labelled data:
   classification ``accuracy`` and ``loss`` (mean cross-entropy), regression
   ``mse``, ``mae`` and ``loss`` (= MSE), reconstruction ``auc`` (ROC-AUC of the
   anomaly score against the anomaly flags) and ``loss`` (mean reconstruction error
   on the normal rows). :data:`PRIMARY_METRIC` names each task's headline figure
   and :data:`HIGHER_IS_BETTER` its direction.

PyTorch is imported only when a torch model is built, initialised or evaluated.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from compress.families import FAMILIES, forward, init_weights
from coordinator.delivery.packaging import LabelledData
from coordinator.errors import RunError
from edge_agent.errors import TrainingError
from edge_agent.training.model_spec import (
    TASKS,
    TORCH_FAMILY,
    ModelTask,
    check_task,
    parse_model_spec,
)

if TYPE_CHECKING:
    import torch

__all__ = [
    "EVAL_METRIC_KEYS",
    "HIGHER_IS_BETTER",
    "PRIMARY_METRIC",
    "ModelDef",
    "Weights",
    "check_eval_data",
    "evaluate_model",
    "implied_outputs",
    "initial_weights",
    "model_def_for",
    "model_task",
    "torch_module",
]

Weights = dict[str, npt.NDArray[np.float32]]
ConfigValue = int | float | str | bool

PRIMARY_METRIC: dict[str, str] = {
    "classification": "accuracy",
    "regression": "mse",
    "reconstruction": "auc",
}
"""The headline metric of each task (what ``final_metrics`` leads with)."""

HIGHER_IS_BETTER: dict[str, bool] = {
    "classification": True,
    "regression": False,
    "reconstruction": True,
}
"""Whether a larger :data:`PRIMARY_METRIC` is a better model."""

EVAL_METRIC_KEYS: dict[str, tuple[str, ...]] = {
    "classification": ("loss", "accuracy"),
    "regression": ("loss", "mse", "mae"),
    "reconstruction": ("loss", "reconstruction_error"),
}
"""The metrics devices report when they evaluate a model of each task on their own
held-out data (:class:`~edge_agent.training.trainer.EvalResult.metrics`); federated
evaluation averages exactly these."""


@dataclass(frozen=True)
class ModelDef:
    """The model a run trains.

    Attributes:
        family: ``softmax``, ``mlp`` or ``torch``.
        task: ``classification`` (the only task of the built-in families),
            ``regression`` or ``reconstruction``.
        spec: For ``torch``: the factory ``module:function`` (made canonical:
            ``zoo:<name>`` is expanded, as devices list it); else empty.
        input_shape: One example's shape (``(features,)`` for the built-in families,
            e.g. ``(1, 28, 28)`` for images); empty when unknown (a run started
            from given weights).
        num_outputs: Classes (classification), targets (regression); for
            reconstruction what the factory is given (the input's size by default).
    """

    family: str
    task: ModelTask = "classification"
    spec: str = ""
    input_shape: tuple[int, ...] = ()
    num_outputs: int = 0

    def __post_init__(self) -> None:
        """Check the values.

        Raises:
            RunError: an unknown family or task, a torch model without a spec or
                shape, a spec for a built-in family, a built-in family for a task
                other than classification, or non-positive sizes.
        """
        if self.task not in TASKS:
            raise RunError(f"unknown task {self.task!r}; expected one of {', '.join(TASKS)}")
        if any(not isinstance(d, int) or d < 1 for d in self.input_shape):
            raise RunError(f"input shape must be positive integers, got {self.input_shape}")
        if self.num_outputs < 0:
            raise RunError(f"num_outputs must not be negative, got {self.num_outputs}")
        if self.is_torch:
            if not self.spec:
                raise RunError("a torch model needs a model spec (module:function)")
            try:  # devices list canonical specs: zoo:small_cnn -> edge_agent.training.zoo:...
                object.__setattr__(self, "spec", str(parse_model_spec(self.spec)))
            except TrainingError as exc:
                raise RunError(str(exc)) from exc
            if not self.input_shape or self.num_outputs < 1:
                raise RunError(
                    f"{self.spec} needs an input shape and an output count "
                    f"(got {self.input_shape} and {self.num_outputs})"
                )
            return
        if self.family not in FAMILIES:
            raise RunError(
                f"unknown model family {self.family!r}; expected one of "
                f"{', '.join((*FAMILIES, TORCH_FAMILY))}"
            )
        if self.spec:
            raise RunError(f"the built-in family {self.family} takes no model spec")
        if self.task != "classification":
            raise RunError(
                f"the built-in family {self.family} only does classification; "
                f"use a PyTorch model (--model module:function) for {self.task}"
            )

    @property
    def is_torch(self) -> bool:
        """Whether the model is a PyTorch factory."""
        return self.family == TORCH_FAMILY

    @property
    def label(self) -> str:
        """What the model is, for people: the spec, else the family."""
        return self.spec or self.family

    def model_args(self) -> dict[str, ConfigValue]:
        """The factory's keyword arguments as train tasks carry them (empty for
        the built-in families): ``input_shape`` as text ``"1,28,28"``, ``num_outputs``."""
        if not self.is_torch:
            return {}
        from edge_agent.training.torch_models import (  # noqa: PLC0415
            model_args_of,
        )

        args: dict[str, ConfigValue] = model_args_of(self.input_shape, self.num_outputs)
        return args


def _torch_task(spec: str) -> ModelTask | None:
    """The factory's declared task (imports its module)."""
    from edge_agent.training.torch_models import (  # noqa: PLC0415
        factory_task,
    )

    task: ModelTask | None = factory_task(spec)
    return task


def model_task(model: str, task: str | None) -> ModelTask:
    """The task of a model: ``task`` when given, else a factory's declared ``task``
    (imports its module), else classification.

    Raises:
        RunError: an unknown task, a malformed spec, a factory that cannot be imported.
    """
    try:
        if task is not None:
            return check_task(task)
        if ":" not in model:
            return "classification"
        return _torch_task(str(parse_model_spec(model))) or "classification"
    except TrainingError as exc:
        raise RunError(str(exc)) from exc


def implied_outputs(task: str, *targets: npt.ArrayLike) -> int:
    """The ``num_outputs`` a model needs for data labelled with ``targets``.

    Classification: one more than the largest label over all of ``targets`` (say,
    the training and the test labels); regression: the target width of the first
    (1 for ``(n,)``, ``k`` for ``(n, k)``); reconstruction: 0.
    """
    if task == "classification":
        return max(int(np.max(y)) for y in targets) + 1
    if task == "regression":
        first = np.asarray(targets[0])
        return 1 if first.ndim == 1 else int(first.shape[1])
    return 0


def model_def_for(
    model: str,
    task: str | None,
    sample_shape: Sequence[int],
    num_outputs: int,
) -> ModelDef:
    """The model an operator names.

    Args:
        model: A built-in family (``softmax``, ``mlp``) or a model spec
            (``module.path:function``, ``zoo:<name>``).
        task: The task given (``--task``), or None: the factory's ``task``
            attribute, else classification.
        sample_shape: One example's shape (from the data).
        num_outputs: Classes or regression targets; for reconstruction 0 means the
            size of one example.

    Returns:
        The model, with a canonical spec.

    Raises:
        RunError: neither a family nor a well-formed spec, an unknown task, a
            factory that cannot be imported, or sizes that do not fit.
    """
    shape = tuple(int(d) for d in sample_shape)
    chosen = model_task(model, task)
    if ":" not in model:
        return ModelDef(model, chosen, input_shape=shape, num_outputs=num_outputs)
    try:
        spec = str(parse_model_spec(model))
    except TrainingError as exc:
        raise RunError(str(exc)) from exc
    if chosen == "reconstruction" and num_outputs == 0 and shape:
        num_outputs = math.prod(shape)
    return ModelDef(TORCH_FAMILY, chosen, spec, shape, num_outputs)


def initial_weights(model: ModelDef, seed: int, hidden: int | Sequence[int] = 64) -> Weights:
    """Seeded starting weights of a model.

    Args:
        model: The model (its input shape and output count must be known).
        seed: Seeds the initialisation.
        hidden: MLP hidden layer sizes (one size or one per layer; ignored by the
            other families).

    Raises:
        RunError: the model's sizes are unknown.
        FamilyError: sizes a built-in family refuses.
        TrainingError: the factory cannot be built (torch missing, a bad factory).
    """
    if not model.input_shape or model.num_outputs < 1:
        raise RunError(f"{model.label}: the input shape and output count are needed")
    if model.is_torch:
        from edge_agent.training.torch_models import (  # noqa: PLC0415
            initial_weights as torch_initial_weights,
        )

        weights: Weights = torch_initial_weights(
            model.spec,
            task=model.task,
            input_shape=model.input_shape,
            num_outputs=model.num_outputs,
            seed=seed,
        )
        return weights
    if len(model.input_shape) != 1:
        raise RunError(
            f"the {model.family} family takes rows of features, not examples of shape "
            f"{model.input_shape}"
        )
    sizes = [hidden] if isinstance(hidden, int) else list(hidden)
    layers = [model.input_shape[0], *(sizes if model.family == "mlp" else []), model.num_outputs]
    return init_weights(model.family, layers, np.random.default_rng(seed))


def check_eval_data(model: ModelDef, data: LabelledData) -> None:
    """Check that labelled data can score a model.

    Raises:
        RunError: another task, another example shape, no examples, labels out of
            range, or (reconstruction) flags that are not 0/1 or lack one kind.
    """
    if data.task != model.task:
        raise RunError(f"the evaluation data is for {data.task}, the model for {model.task}")
    if len(data.x) == 0 or len(data.x) != len(data.y):
        raise RunError(
            f"the evaluation data needs examples and one y per example, got "
            f"{data.x.shape} and {np.shape(data.y)}"
        )
    if model.input_shape and tuple(data.x.shape[1:]) != model.input_shape:
        raise RunError(
            f"the evaluation examples have shape {tuple(data.x.shape[1:])}, "
            f"{model.label} takes {model.input_shape}"
        )
    y = np.asarray(data.y)
    if model.task == "classification":
        if y.ndim != 1 or y.dtype.kind not in "iu":
            raise RunError("classification labels must be integers of shape (n,)")
        if model.num_outputs and (y.min() < 0 or y.max() >= model.num_outputs):
            raise RunError(f"labels must be in 0..{model.num_outputs - 1}")
    elif model.task == "reconstruction":
        flags = set(np.unique(y).tolist())
        if y.ndim != 1 or flags != {0, 1}:
            raise RunError(
                "reconstruction needs anomaly flags y of 0 (normal) and 1 (anomaly), "
                f"both present; got values {sorted(flags)[:5]}"
            )
    elif not np.isfinite(y.astype(np.float64)).all():
        raise RunError("regression targets must be finite")


VARIANCE_SUFFIX = "running_var"
"""BatchNorm's running variance: a buffer averaged like a weight, never below zero."""


def clamp_statistics(weights: Mapping[str, npt.NDArray[np.float32]]) -> tuple[Weights, int]:
    """The weights with every BatchNorm running variance clamped at zero.

    Buffers travel and are aggregated like weights (``docs/architecture.md``); an
    average of variances is a variance, but a device's update may push one below
    zero, and a negative variance makes BatchNorm output NaN on every device.

    Returns:
        The weights (negative variances set to 0) and how many values were clamped.
    """
    out: Weights = {}
    clamped = 0
    for name, value in weights.items():
        array = np.asarray(value, dtype=np.float32)
        if name.endswith(VARIANCE_SUFFIX):
            negative = int(np.count_nonzero(array < 0))
            if negative:
                clamped += negative
                array = np.maximum(array, np.float32(0.0))
        out[name] = array
    return out, clamped


def torch_module(
    model: ModelDef, weights: Mapping[str, npt.NDArray[np.float32]]
) -> torch.nn.Module:
    """The PyTorch model's module holding ``weights`` (e.g. a run's final weights).

    Raises:
        RunError: ``model`` is a built-in family, not a PyTorch factory.
        TrainingError: the factory cannot be built (torch missing, a bad factory),
            or the weights do not fit the module.
    """
    if not model.is_torch:
        raise RunError(f"the built-in family {model.family} has no PyTorch module")
    from edge_agent.training.torch_models import (  # noqa: PLC0415
        build_module,
        load_module_weights,
    )

    module = build_module(
        model.spec,
        input_shape=model.input_shape,
        num_outputs=model.num_outputs,
        task=model.task,
    )
    load_module_weights(module, weights)
    return module


def evaluate_model(
    model: ModelDef, weights: Mapping[str, npt.ArrayLike], data: LabelledData
) -> dict[str, float]:
    """Score a model's weights on labelled data (see the module docstring).

    Returns:
        classification ``{"accuracy", "loss"}``; regression ``{"mse", "mae",
        "loss"}``; reconstruction ``{"auc", "loss"}``.

    Raises:
        FamilyError: the weights do not fit the family or the data.
        RunError: labels out of range, predictions that do not fit the targets.
        TrainingError: the torch model cannot be built or run.
        CompressError: (reconstruction) the flags lack normal or anomalous rows.
    """
    if not model.is_torch:
        return _classification(forward(model.family, weights, data.x), data.y)
    from edge_agent.training.torch_trainer import (  # noqa: PLC0415
        TorchTrainer,
    )

    trainer = TorchTrainer(
        model.spec, task=model.task, input_shape=model.input_shape, num_outputs=model.num_outputs
    )
    arrays = {name: np.asarray(value, dtype=np.float32) for name, value in weights.items()}
    output = np.asarray(trainer.predict(arrays, data.x), dtype=np.float64)
    if model.task == "classification":
        return _classification(output, data.y)
    if model.task == "regression":
        return _regression(output, data.y)
    return _reconstruction(output, data.y)


def _classification(probabilities: npt.ArrayLike, y: npt.ArrayLike) -> dict[str, float]:
    """Accuracy and mean cross-entropy of class probabilities (n, classes)."""
    p = np.asarray(probabilities, dtype=np.float64)
    labels = np.asarray(y, dtype=np.int64)
    if p.ndim != 2 or len(p) != len(labels):
        raise RunError(f"{p.shape} class probabilities for {labels.shape} labels")
    if len(labels) and (labels.min() < 0 or labels.max() >= p.shape[1]):
        raise RunError(f"labels must be in 0..{p.shape[1] - 1} for this model")
    accuracy = float(np.mean(np.argmax(p, axis=1) == labels))
    picked = p[np.arange(len(labels)), labels]
    loss = float(-np.mean(np.log(np.clip(picked, 1e-12, 1.0))))
    return {"accuracy": accuracy, "loss": loss}


def _regression(predictions: npt.NDArray[Any], y: npt.ArrayLike) -> dict[str, float]:
    """MSE (also the loss) and MAE of predictions (n,) or (n, k) against targets."""
    from compress.metrics import (  # noqa: PLC0415
        mean_squared_error,
    )

    targets = np.asarray(y, dtype=np.float64)
    if predictions.size != targets.size or len(predictions) != len(targets):
        raise RunError(f"{predictions.shape} predictions for {targets.shape} targets")
    fitted = predictions.reshape(targets.shape)
    mse = float(mean_squared_error(fitted, targets))
    return {"mse": mse, "mae": float(np.mean(np.abs(fitted - targets))), "loss": mse}


def _reconstruction(scores: npt.NDArray[Any], y: npt.ArrayLike) -> dict[str, float]:
    """ROC-AUC of the anomaly scores against the flags; mean score of normal rows."""
    from compress.metrics import roc_auc  # noqa: PLC0415

    flags = np.asarray(y, dtype=np.int64)
    score = scores.reshape(-1)
    if score.shape != flags.shape:
        raise RunError(f"{scores.shape} anomaly scores for {flags.shape} flags")
    normal = score[flags == 0]
    loss = float(np.mean(normal)) if len(normal) else math.nan
    return {"auc": float(roc_auc(score, flags)), "loss": loss}
