"""The torch trainer: trains, evaluates and runs a PyTorch model factory on local data.

:class:`TorchTrainer` implements :class:`~edge_agent.training.trainer.Trainer` for a
model spec (see :mod:`edge_agent.training.torch_models`), so the round participant
drives it exactly like the numpy trainers: weights in (named float32 arrays, the
``state_dict`` layout of :mod:`~edge_agent.training.torch_models`), a
:class:`~edge_agent.training.trainer.Dataset` of the trainer's task and example
shape, a :class:`~edge_agent.training.trainer.TrainConfig` and a seeded numpy
generator; weights out.

What a fit minimises, for weights ``w`` and the round's global weights ``g``::

    task loss + proximal_mu/2 * ||w - g||^2 (trainable parameters only)

with ``weight_decay`` as the optimizer's L2 term on weight tensors of rank >= 2
(not biases or normalisation scales, like the numpy trainers). The task loss:

* ``classification``: cross-entropy of the module's logits ``(n, num_outputs)``;
* ``regression``: mean squared error between the module's output (``(n, k)`` or
  ``(n,)``, reshaped to the targets) and the targets ``(n,)`` or ``(n, k)``;
* ``reconstruction``: mean squared error between the module's output and its input.

:meth:`TorchTrainer.predict` returns what the deployed ONNX model outputs (see
``compress.torch_export``): class probabilities, predictions, or the per-example
anomaly score (mean squared reconstruction error).

Reproducibility: all randomness comes from the ``rng`` argument. A fit draws the
torch seed (dropout, anything random in the module) from it and shuffles with it,
runs with ``torch.use_deterministic_algorithms(True, warn_only=True)``, and
restores PyTorch's global random state, thread count and determinism setting
afterwards; the same weights, data, config and generator state give bit-identical
weights on one machine. ``num_threads`` bounds the CPU a fit uses (the agent leaves a
core for inference). Memory: the data stays in numpy; only one mini-batch at a
time becomes a tensor, and evaluation runs in chunks of ``eval_batch_size``.

PyTorch is imported when the trainer is built, not when this module is.
"""

from __future__ import annotations

import contextlib
import logging
import math
import threading
from collections.abc import Iterator, Mapping
from typing import TYPE_CHECKING, Any

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DataSourceError, NoDataError, TrainConfigError, TrainingError
from edge_agent.training.model_spec import ModelSpec, ModelTask, check_task, parse_model_spec
from edge_agent.training.torch_models import (
    build_module,
    load_module_weights,
    model_args_of,
    module_weights,
    parse_model_args,
    require_torch,
)
from edge_agent.training.trainer import Dataset, EvalResult, FitResult, FloatArray, TrainConfig

if TYPE_CHECKING:
    import torch

__all__ = ["DEFAULT_TORCH_EVAL_BATCH_SIZE", "TorchTrainer"]

logger = logging.getLogger(__name__)

DEFAULT_TORCH_EVAL_BATCH_SIZE = 256
"""Examples per chunk in :meth:`TorchTrainer.evaluate` and :meth:`TorchTrainer.predict`."""

_MAX_SEED = 2**63 - 1


@contextlib.contextmanager
def _torch_settings(num_threads: int | None, *, fork_rng: bool) -> Iterator[None]:
    """Threads, determinism (and a private random state) for one call; restored after."""
    import torch  # noqa: PLC0415 - only when a torch model runs

    old_threads = torch.get_num_threads()
    old_deterministic = torch.are_deterministic_algorithms_enabled()
    old_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    rng_state = torch.random.get_rng_state() if fork_rng else None
    try:
        if num_threads is not None:
            torch.set_num_threads(num_threads)
        torch.use_deterministic_algorithms(True, warn_only=True)
        yield
    finally:
        torch.use_deterministic_algorithms(old_deterministic, warn_only=old_warn_only)
        if num_threads is not None:
            torch.set_num_threads(old_threads)
        if rng_state is not None:
            torch.random.set_rng_state(rng_state)


def _hits(logits: torch.Tensor, labels: torch.Tensor | None) -> int:
    """How many rows of ``logits`` have their largest value at the label."""
    import torch  # noqa: PLC0415 - already loaded

    assert labels is not None
    return int(torch.eq(logits.argmax(dim=1), labels).sum().item())


def _batches(n: int, batch_size: int) -> list[tuple[int, int]]:
    """``(start, stop)`` of each mini-batch; a last batch of one example joins the one before.

    (BatchNorm cannot train on a batch of one, and a single example is a noisy step.)
    """
    bounds = [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] == 1:
        bounds[-2:] = [(bounds[-2][0], n)]
    return bounds


class TorchTrainer:
    """Trains and evaluates one PyTorch model factory for one task and example shape.

    The module is built once, here (its initial weights are irrelevant: every call
    loads the weights it is given). Calls on one trainer are serialised by a lock.

    Args:
        spec: The model factory (``module:function`` or ``zoo:<name>``). The
            caller has checked it against the device's allow list.
        task: The learning task.
        input_shape: The shape of one example.
        num_outputs: Classes (classification), outputs (regression); ignored
            (may be 0) for reconstruction.
        num_threads: Torch threads while training and evaluating; None leaves
            PyTorch's setting.
        eval_batch_size: Examples per chunk in :meth:`evaluate` and :meth:`predict`.

    Raises:
        TorchUnavailableError: PyTorch is not installed.
        UnknownModelError: The factory does not exist.
        TrainConfigError: A shape, count, task or thread setting is invalid.
        TrainingError: The factory failed or returned no ``nn.Module``.
    """

    def __init__(
        self,
        spec: ModelSpec | str,
        *,
        task: ModelTask,
        input_shape: tuple[int, ...],
        num_outputs: int,
        num_threads: int | None = None,
        eval_batch_size: int = DEFAULT_TORCH_EVAL_BATCH_SIZE,
    ) -> None:
        self._spec = spec if isinstance(spec, ModelSpec) else parse_model_spec(spec)
        self._task: ModelTask = check_task(task)
        self._input_shape, self._num_outputs = parse_model_args(
            model_args_of(input_shape, num_outputs)
        )
        if self._task != "reconstruction" and self._num_outputs < 1:
            raise TrainConfigError(f"a {self._task} model needs num_outputs >= 1, got 0")
        if num_threads is not None and (
            isinstance(num_threads, bool) or not isinstance(num_threads, int) or num_threads < 1
        ):
            raise TrainConfigError(f"num_threads must be an integer >= 1, got {num_threads!r}")
        if isinstance(eval_batch_size, bool) or not isinstance(eval_batch_size, int):
            raise TrainConfigError(f"eval_batch_size must be an integer, got {eval_batch_size!r}")
        if eval_batch_size < 1:
            raise TrainConfigError(f"eval_batch_size must be >= 1, got {eval_batch_size}")
        self._num_threads = num_threads
        self._eval_batch_size = eval_batch_size
        self._lock = threading.Lock()
        require_torch()
        import torch  # noqa: PLC0415 - only when a torch model is trained

        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(0)
            self._module = build_module(
                self._spec,
                input_shape=self._input_shape,
                num_outputs=self._num_outputs,
                task=self._task,
            )

    @property
    def spec(self) -> ModelSpec:
        """The model factory."""
        return self._spec

    @property
    def task(self) -> ModelTask:
        """The learning task."""
        return self._task

    @property
    def input_shape(self) -> tuple[int, ...]:
        """The shape of one example."""
        return self._input_shape

    @property
    def num_outputs(self) -> int:
        """Classes or regression outputs (0 for reconstruction if so built)."""
        return self._num_outputs

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}({str(self._spec)!r}, task={self._task!r}, "
            f"input_shape={self._input_shape}, num_outputs={self._num_outputs})"
        )

    # ----------------------------------------------------------------- checks

    def _check_data(self, data: Dataset, what: str) -> None:
        if not isinstance(data, Dataset):
            raise TrainingError(f"{what} data must be a Dataset, got {type(data).__name__}")
        if data.task != self._task:
            raise DataSourceError(f"the data is for {data.task}, the model for {self._task}")
        if data.sample_shape != self._input_shape:
            raise DataSourceError(
                f"the examples have shape {data.sample_shape} but the model takes "
                f"{self._input_shape}"
            )
        if len(data) == 0:
            raise NoDataError(f"no examples to {what} on")
        if self._task == "classification" and data.num_classes > self._num_outputs:
            raise DataSourceError(
                f"label {data.num_classes - 1} is out of range for a model with "
                f"{self._num_outputs} classes (labels must be 0..{self._num_outputs - 1})"
            )
        if self._task == "regression":
            width = 1 if data.y.ndim == 1 else int(data.y.shape[1])
            if width != self._num_outputs:
                raise DataSourceError(
                    f"the data has {width} regression target(s) per example, the model "
                    f"{self._num_outputs} output(s)"
                )

    def _forward(self, xb: torch.Tensor) -> torch.Tensor:
        """The module's output for a batch; TrainingError if the module fails."""
        try:
            out = self._module(xb)
        except Exception as exc:  # user code may raise anything
            raise TrainingError(
                f"model {self._spec} failed on a batch of shape {tuple(xb.shape)}: {exc}"
            ) from exc
        import torch  # noqa: PLC0415 - already loaded

        if not isinstance(out, torch.Tensor):
            raise TrainingError(f"model {self._spec} returned {type(out).__name__}, not a tensor")
        return out

    def _shaped(self, out: torch.Tensor, n: int, shape: tuple[int, ...], what: str) -> torch.Tensor:
        """``out`` as ``shape`` (same number of values per example), or TrainingError."""
        exact = what == "classification"  # logits must be (n, classes), not merely as many
        if (
            out.ndim == 0
            or out.shape[0] != n
            or out.numel() != math.prod(shape)
            or (exact and tuple(out.shape) != shape)
        ):
            raise TrainingError(
                f"model {self._spec} output has shape {tuple(out.shape)}; {what} needs "
                f"{shape[1:] or '()'} per example"
            )
        return out.reshape(shape)

    def _batch_loss(
        self, xb: torch.Tensor, yb: torch.Tensor | None, *, reduction: str
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(task loss with ``reduction``, the output shaped for the task)."""
        import torch.nn.functional as F  # noqa: N812, PLC0415 - the usual name

        out = self._forward(xb)
        n = int(xb.shape[0])
        if self._task == "classification":
            logits = self._shaped(out, n, (n, self._num_outputs), "classification")
            assert yb is not None
            return F.cross_entropy(logits, yb, reduction=reduction), logits
        if self._task == "regression":
            assert yb is not None
            pred = self._shaped(out, n, tuple(yb.shape), "regression")
            return F.mse_loss(pred, yb, reduction=reduction), pred
        recon = self._shaped(out, n, tuple(xb.shape), "reconstruction")
        return F.mse_loss(recon, xb, reduction=reduction), recon

    @staticmethod
    def _tensor(array: npt.NDArray[Any]) -> torch.Tensor:
        """A tensor holding a copy of ``array`` (never the caller's memory)."""
        import torch  # noqa: PLC0415 - already loaded

        return torch.from_numpy(np.array(array, copy=True))

    def _targets(self, data: Dataset, rows: slice | npt.NDArray[Any]) -> torch.Tensor | None:
        """The labels or targets of ``rows`` (None for reconstruction)."""
        return None if self._task == "reconstruction" else self._tensor(data.y[rows])

    # -------------------------------------------------------------------- fit

    def fit(
        self,
        weights: Mapping[str, FloatArray],
        data: Dataset,
        config: TrainConfig,
        rng: np.random.Generator,
    ) -> FitResult:
        """Train from ``weights`` on ``data`` for ``config.epochs`` epochs.

        ``weights`` are not modified. The ``max_examples`` sample, the shuffling
        and the torch seed come from ``rng`` only.

        Returns:
            The trained weights (float32, same names and shapes), the number of
            examples trained on, and ``train_loss`` (the task loss without the
            regularisation terms) and, for classification, ``train_accuracy``,
            over the last epoch, measured on each batch before its update.

        Raises:
            TrainingError: Unusable weights, the model fails on the data, or
                training diverged (non-finite loss: lower the learning rate).
            NoDataError: ``data`` is empty.
            DataSourceError: The data's task, example shape, labels or target
                width do not fit the model.
        """
        self._check_data(data, "train")
        data = data.capped(config.max_examples, rng)
        torch_seed = int(rng.integers(_MAX_SEED))
        with self._lock, _torch_settings(self._num_threads, fork_rng=True):
            import torch  # noqa: PLC0415 - already loaded

            torch.manual_seed(torch_seed)
            load_module_weights(self._module, weights)
            loss, accuracy = self._train(data, config, rng)
            new_weights = module_weights(self._module)
        if not all(np.isfinite(w).all() for w in new_weights.values()):
            raise TrainingError(
                f"training diverged (non-finite weights); lower the learning rate (lr={config.lr})"
            )
        metrics = {"train_loss": loss}
        if accuracy is not None:
            metrics["train_accuracy"] = accuracy
        logger.debug(
            "%s: trained %d examples for %d epochs: %s",
            self._spec,
            len(data),
            config.epochs,
            metrics,
        )
        return FitResult(weights=new_weights, num_examples=len(data), metrics=metrics)

    def _optimizer(self, config: TrainConfig) -> torch.optim.Optimizer:
        import torch  # noqa: PLC0415 - already loaded

        params = [p for p in self._module.parameters() if p.requires_grad]
        decayed = [p for p in params if p.ndim >= 2]
        plain = [p for p in params if p.ndim < 2]
        groups = [
            {"params": decayed, "weight_decay": config.weight_decay},
            {"params": plain, "weight_decay": 0.0},
        ]
        if config.optimizer == "adam":
            return torch.optim.Adam(groups, lr=config.lr)
        return torch.optim.SGD(groups, lr=config.lr, momentum=config.momentum)

    def _train(
        self, data: Dataset, config: TrainConfig, rng: np.random.Generator
    ) -> tuple[float, float | None]:
        """The training loop on the loaded module; returns last-epoch (loss, accuracy)."""
        import torch  # noqa: PLC0415 - already loaded

        module = self._module
        module.train()
        optimizer = self._optimizer(config)
        trainable = [p for p in module.parameters() if p.requires_grad]
        anchors = [p.detach().clone() for p in trainable] if config.proximal_mu else []
        classification = self._task == "classification"
        n = len(data)
        total_loss, correct = 0.0, 0
        for _ in range(config.epochs):
            total_loss, correct = 0.0, 0
            order = rng.permutation(n)
            for start, stop in _batches(n, config.batch_size):
                idx = order[start:stop]
                xb = self._tensor(data.x[idx])
                yb = self._targets(data, idx)
                loss, out = self._batch_loss(xb, yb, reduction="mean")
                if not torch.isfinite(loss):
                    raise TrainingError(
                        f"training diverged (the loss is {loss.item()}); lower the learning "
                        f"rate (lr={config.lr})"
                    )
                total_loss += float(loss.item()) * len(idx)
                if classification:
                    correct += _hits(out, yb)
                objective = loss
                if anchors:
                    proximal = torch.stack(
                        [((p - a) ** 2).sum() for p, a in zip(trainable, anchors, strict=True)]
                    ).sum()
                    objective = loss + config.proximal_mu / 2 * proximal
                optimizer.zero_grad(set_to_none=True)
                objective.backward()  # type: ignore[no-untyped-call]
                optimizer.step()
        return total_loss / n, (correct / n if classification else None)

    # --------------------------------------------------------------- evaluate

    def evaluate(self, weights: Mapping[str, FloatArray], data: Dataset) -> EvalResult:
        """The task's loss and metrics of ``weights`` on ``data``.

        * classification: ``loss`` = mean cross-entropy, ``accuracy``;
        * regression: ``loss`` = MSE, ``accuracy`` None, ``extra`` ``mse`` and ``mae``
          (means over every target value);
        * reconstruction: ``loss`` = mean squared reconstruction error, ``accuracy``
          None, ``extra`` ``reconstruction_error`` (the same number).

        Raises:
            TrainingError: Unusable weights, the model fails, or a non-finite loss.
            NoDataError: ``data`` is empty.
            DataSourceError: The data does not fit the model (as :meth:`fit`).
        """
        self._check_data(data, "evaluate")
        total, total_abs, correct = 0.0, 0.0, 0
        with self._lock, _torch_settings(self._num_threads, fork_rng=False):
            import torch  # noqa: PLC0415 - already loaded

            load_module_weights(self._module, weights)
            self._module.eval()
            with torch.no_grad():
                for start in range(0, len(data), self._eval_batch_size):
                    stop = start + self._eval_batch_size
                    xb = self._tensor(data.x[start:stop])
                    yb = (
                        None if self._task == "reconstruction" else self._tensor(data.y[start:stop])
                    )
                    loss, out = self._batch_loss(xb, yb, reduction="sum")
                    total += float(loss.item())
                    if self._task == "classification":
                        correct += _hits(out, yb)
                    elif self._task == "regression":
                        assert yb is not None
                        total_abs += float((out - yb).abs().sum().item())
        n = len(data)
        # the means are over examples (cross-entropy) or over every value (squared errors)
        values = {"classification": n, "regression": data.y.size, "reconstruction": data.x.size}
        loss_value = total / values[self._task]
        if not math.isfinite(loss_value):
            raise TrainingError("evaluation loss is not finite: the weights overflow on this data")
        if self._task == "classification":
            return EvalResult(loss=loss_value, accuracy=correct / n, num_examples=n)
        if self._task == "regression":
            extra = {"mse": loss_value, "mae": total_abs / values[self._task]}
            return EvalResult(loss=loss_value, accuracy=None, num_examples=n, extra=extra)
        extra = {"reconstruction_error": loss_value}
        return EvalResult(loss=loss_value, accuracy=None, num_examples=n, extra=extra)

    def predict(self, weights: Mapping[str, FloatArray], x: FloatArray) -> FloatArray:
        """What the deployed (fp32) ONNX model outputs for examples ``x`` (n, *input_shape).

        * classification: class probabilities (n, num_outputs) (softmax of the logits);
        * regression: predictions (n,) for one output, else (n, num_outputs);
        * reconstruction: the anomaly score (n,), each example's mean squared
          reconstruction error.

        Raises:
            TrainingError: Unusable weights, ``x`` is not finite real numbers of
                shape (n, *input_shape), or the model fails on it.
        """
        try:
            examples = np.asarray(x)
        except (TypeError, ValueError) as exc:
            raise TrainingError(f"input is not a numeric array: {exc}") from exc
        if examples.dtype.kind not in "fiu" or examples.shape[1:] != self._input_shape:
            raise TrainingError(
                f"input must be real numbers of shape (n, {', '.join(map(str, self._input_shape))})"
                f", got {examples.dtype} {examples.shape}"
            )
        with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
            examples = examples.astype(np.float32, copy=False)
        if not np.isfinite(examples).all():
            raise TrainingError("input holds NaN or infinity")
        n = int(examples.shape[0])
        width = self._num_outputs
        shape: tuple[int, ...]
        if self._task == "reconstruction" or (self._task == "regression" and width == 1):
            shape = (n,)
        else:
            shape = (n, width)
        result: FloatArray = np.empty(shape, np.float32)
        with self._lock, _torch_settings(self._num_threads, fork_rng=False):
            import torch  # noqa: PLC0415 - already loaded

            load_module_weights(self._module, weights)
            self._module.eval()
            with torch.no_grad():
                for start in range(0, n, self._eval_batch_size):
                    stop = start + self._eval_batch_size
                    xb = self._tensor(examples[start:stop])
                    out = self._forward(xb)
                    b = int(xb.shape[0])
                    if self._task == "classification":
                        logits = self._shaped(out, b, (b, width), "classification")
                        part = torch.softmax(logits, dim=1)
                    elif self._task == "regression":
                        part = self._shaped(out, b, (b, *shape[1:]), "regression")
                    else:
                        recon = self._shaped(out, b, tuple(xb.shape), "reconstruction")
                        part = ((recon - xb) ** 2).reshape(b, -1).mean(dim=1)
                    result[start:stop] = part.numpy()
        return result
