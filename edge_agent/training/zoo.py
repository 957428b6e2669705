"""The built-in zoo: small PyTorch models to federate as they are, or to copy.

Each entry is a *factory*, the form every user model takes: a function with the
keyword arguments ``input_shape`` (the shape of one example, without the batch
dimension) and ``num_outputs``, returning an ``nn.Module`` that maps a batch
``(n, *input_shape)`` to

* logits ``(n, num_outputs)`` for classification (no softmax: the trainer's loss
  and the ONNX export add it);
* predictions ``(n, num_outputs)`` for regression;
* the reconstruction of the input, ``(n, *input_shape)``, for reconstruction
  (anomaly detection: the exported model outputs the reconstruction error).

A factory declares its task with an attribute ``task`` (see
:func:`edge_agent.training.torch_models.factory_task`); without it the task
comes from the run (``--task``, default classification). Spec them as
``zoo:<name>`` (``edge_agent.training.zoo:<name>``).

The models are small (tens of thousands of weights: a Raspberry Pi trains them)
and use only layers that ``torch.onnx`` exports and int8 static quantization
handles (Conv, MaxPool, GlobalAveragePool, Gemm, ReLU, Reshape). PyTorch is
imported inside each factory, so importing the zoo does not load it. A shape a
model cannot take raises :class:`~edge_agent.errors.TrainingError`.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

from edge_agent.errors import TrainingError
from edge_agent.training.torch_models import require_torch

if TYPE_CHECKING:
    import torch

__all__ = ["dense_autoencoder", "mlp_regressor", "sensor_cnn", "small_cnn"]


def _outputs(model: str, num_outputs: int) -> int:
    if isinstance(num_outputs, bool) or not isinstance(num_outputs, int) or num_outputs < 1:
        raise TrainingError(f"{model} needs num_outputs >= 1, got {num_outputs!r}")
    return num_outputs


def small_cnn(input_shape: tuple[int, ...], num_outputs: int) -> torch.nn.Module:
    """A CNN for small images ``(channels, height, width)`` -> class logits.

    Two 3x3 convolutions (16 and 32 channels, ReLU, 2x2 max-pool each), then one
    dense layer. About 20k weights for 1x28x28 (MNIST), 5k for 1x8x8 (digits).

    Raises:
        TrainingError: ``input_shape`` is not ``(C, H, W)`` with H, W >= 4, or
            ``num_outputs`` < 1.
    """
    if len(input_shape) != 3 or min(input_shape[1:]) < 4:
        raise TrainingError(
            f"small_cnn takes images (channels, height, width) of at least 4x4, got {input_shape}"
        )
    classes = _outputs("small_cnn", num_outputs)
    channels, height, width = input_shape
    require_torch()
    from torch import nn  # noqa: PLC0415 - importing the zoo must not load torch

    return nn.Sequential(
        nn.Conv2d(channels, 16, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Conv2d(16, 32, kernel_size=3, padding=1),
        nn.ReLU(),
        nn.MaxPool2d(2),
        nn.Flatten(),
        nn.Linear(32 * (height // 4) * (width // 4), classes),
    )


def sensor_cnn(input_shape: tuple[int, ...], num_outputs: int) -> torch.nn.Module:
    """A 1-D CNN for sensor windows ``(channels, steps)`` -> class logits.

    Two convolutions over time (kernel 5, 32 and 64 channels, ReLU), a global
    average over the steps (any window length), and one dense layer.

    Raises:
        TrainingError: ``input_shape`` is not ``(channels, steps)``, or
            ``num_outputs`` < 1.
    """
    if len(input_shape) != 2:
        raise TrainingError(f"sensor_cnn takes windows (channels, steps), got {input_shape}")
    classes = _outputs("sensor_cnn", num_outputs)
    require_torch()
    from torch import nn  # noqa: PLC0415 - importing the zoo must not load torch

    return nn.Sequential(
        nn.Conv1d(input_shape[0], 32, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.Conv1d(32, 64, kernel_size=5, padding=2),
        nn.ReLU(),
        nn.AdaptiveAvgPool1d(1),
        nn.Flatten(),
        nn.Linear(64, classes),
    )


def dense_autoencoder(input_shape: tuple[int, ...], num_outputs: int = 0) -> torch.nn.Module:
    """A dense autoencoder for examples of any shape (flattened): F -> 32 -> 8 -> 32 -> F.

    Its output is the reconstruction, reshaped back to ``input_shape``; trained on
    normal data, a large reconstruction error flags an anomaly. ``num_outputs`` is
    ignored.
    """
    del num_outputs  # the output is the input's shape
    if not input_shape:
        raise TrainingError("dense_autoencoder needs an input_shape")
    features = math.prod(input_shape)
    require_torch()
    from torch import nn  # noqa: PLC0415 - importing the zoo must not load torch

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(features, 32),
        nn.ReLU(),
        nn.Linear(32, 8),
        nn.ReLU(),
        nn.Linear(8, 32),
        nn.ReLU(),
        nn.Linear(32, features),
        nn.Unflatten(1, tuple(input_shape)),
    )


dense_autoencoder.task = "reconstruction"  # type: ignore[attr-defined]


def mlp_regressor(input_shape: tuple[int, ...], num_outputs: int) -> torch.nn.Module:
    """A regressor for rows ``(features,)`` (other shapes are flattened): F -> 64 -> 32 -> outputs.

    Raises:
        TrainingError: ``num_outputs`` < 1.
    """
    if not input_shape:
        raise TrainingError("mlp_regressor needs an input_shape")
    outputs = _outputs("mlp_regressor", num_outputs)
    require_torch()
    from torch import nn  # noqa: PLC0415 - importing the zoo must not load torch

    return nn.Sequential(
        nn.Flatten(),
        nn.Linear(math.prod(input_shape), 64),
        nn.ReLU(),
        nn.Linear(64, 32),
        nn.ReLU(),
        nn.Linear(32, outputs),
    )


mlp_regressor.task = "regression"  # type: ignore[attr-defined]
