"""Built-in model families: their weight layout and their numpy forward pass.

fedge ships two families that train in numpy on a device and export from weights to
ONNX or TFLite without any deep-learning framework:

* ``softmax``: softmax (multinomial logistic) regression, one dense layer;
* ``mlp``: a multi-layer perceptron, dense layers with ReLU between them and a
  softmax at the end (at least two dense layers).

Weights are a flat mapping of named float arrays, as stored in an ``.npz`` file:
``W0, b0, W1, b1, ...`` where ``Wi`` has shape ``(fan_in, fan_out)`` and ``bi`` shape
``(fan_out,)``; layer ``i``'s ``fan_out`` is layer ``i+1``'s ``fan_in``. Both families
take a float32 batch ``(n, n_features)`` named :data:`INPUT_NAME` and give class
probabilities ``(n, n_classes)`` named :data:`OUTPUT_NAME`.

:func:`dense_layers` validates a mapping and returns the layers in order; everything
that consumes weights (exporters, trainers, codecs) goes through it, so there is one
definition of what a valid set of weights is.
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Literal, get_args

import numpy as np
import numpy.typing as npt

from compress.errors import FamilyError

Family = Literal["softmax", "mlp"]
FAMILIES: tuple[str, ...] = get_args(Family)

INPUT_NAME = "input"
OUTPUT_NAME = "probabilities"

FloatArray = npt.NDArray[np.float32]


@dataclass(frozen=True)
class DenseLayer:
    """One dense layer: ``y = x @ weight + bias``."""

    weight: FloatArray
    bias: FloatArray

    @property
    def fan_in(self) -> int:
        """Number of inputs of the layer."""
        return int(self.weight.shape[0])

    @property
    def fan_out(self) -> int:
        """Number of outputs of the layer."""
        return int(self.weight.shape[1])


def check_family(name: str) -> Family:
    """Return ``name`` as a :data:`Family`.

    Raises:
        FamilyError: ``name`` is not a built-in family.
    """
    if name == "softmax":
        return "softmax"
    if name == "mlp":
        return "mlp"
    raise FamilyError(f"unknown model family {name!r}; expected one of {', '.join(FAMILIES)}")


def dense_layers(family: str, weights: Mapping[str, npt.ArrayLike]) -> list[DenseLayer]:
    """Validate ``weights`` for ``family`` and return its dense layers in order.

    Arrays are converted to float32 C-contiguous copies.

    Raises:
        FamilyError: unknown family, missing/extra keys, wrong ranks or shapes,
            non-finite values, or a layer count the family does not allow.
    """
    fam = check_family(family)
    n_layers = len(weights) // 2
    expected = {f"{p}{i}" for i in range(n_layers) for p in ("W", "b")}
    if n_layers == 0 or set(weights) != expected:
        raise FamilyError(
            f"weights must be named W0, b0, ..., W{{n-1}}, b{{n-1}}; got {sorted(weights)}"
        )
    if fam == "softmax" and n_layers != 1:
        raise FamilyError(f"softmax regression has exactly one layer, got {n_layers}")
    if fam == "mlp" and n_layers < 2:
        raise FamilyError("an mlp needs at least two dense layers (one hidden layer)")
    layers: list[DenseLayer] = []
    for i in range(n_layers):
        kinds = {np.asarray(weights[f"{p}{i}"]).dtype.kind for p in ("W", "b")}
        if not kinds <= set("fiub"):
            raise FamilyError(f"layer {i}: weights must be real numbers, got dtype kinds {kinds}")
        try:
            w = np.ascontiguousarray(weights[f"W{i}"], dtype=np.float32)
            b = np.ascontiguousarray(weights[f"b{i}"], dtype=np.float32)
        except (TypeError, ValueError) as exc:
            raise FamilyError(f"layer {i}: weights are not numeric arrays: {exc}") from exc
        if w.ndim != 2 or b.ndim != 1 or b.shape[0] != w.shape[1] or 0 in w.shape:
            raise FamilyError(
                f"layer {i}: expected W{i} (fan_in, fan_out) and b{i} (fan_out,), "
                f"got {w.shape} and {b.shape}"
            )
        if layers and layers[-1].fan_out != w.shape[0]:
            raise FamilyError(
                f"layer {i}: fan_in {w.shape[0]} does not match previous fan_out "
                f"{layers[-1].fan_out}"
            )
        if not (np.isfinite(w).all() and np.isfinite(b).all()):
            raise FamilyError(f"layer {i}: weights contain NaN or infinity")
        layers.append(DenseLayer(weight=w, bias=b))
    return layers


def softmax(logits: FloatArray) -> FloatArray:
    """Row-wise softmax, numerically stable."""
    shifted = logits - logits.max(axis=1, keepdims=True)
    exp = np.exp(shifted)
    out: FloatArray = (exp / exp.sum(axis=1, keepdims=True)).astype(np.float32)
    return out


def forward(family: str, weights: Mapping[str, npt.ArrayLike], x: npt.ArrayLike) -> FloatArray:
    """Class probabilities of a family's model for a batch ``x`` of shape (n, features).

    Raises:
        FamilyError: invalid weights, or ``x`` does not match the first layer.
    """
    layers = dense_layers(family, weights)
    h = np.asarray(x, dtype=np.float32)
    if h.ndim != 2 or h.shape[1] != layers[0].fan_in:
        raise FamilyError(f"input must have shape (n, {layers[0].fan_in}), got {h.shape}")
    for i, layer in enumerate(layers):
        h = h @ layer.weight + layer.bias
        if i < len(layers) - 1:
            h = np.maximum(h, 0.0)
    return softmax(h)


def init_weights(
    family: str, layer_sizes: list[int], rng: np.random.Generator
) -> dict[str, FloatArray]:
    """He-initialised weights for ``layer_sizes`` = [features, hidden..., classes].

    Raises:
        FamilyError: the sizes do not fit the family.
    """
    if len(layer_sizes) < 2 or any(s <= 0 for s in layer_sizes):
        raise FamilyError(f"layer sizes must be >= 2 positive integers, got {layer_sizes}")
    weights: dict[str, FloatArray] = {}
    for i, (fan_in, fan_out) in enumerate(itertools.pairwise(layer_sizes)):
        scale = np.sqrt(2.0 / fan_in)
        weights[f"W{i}"] = (rng.standard_normal((fan_in, fan_out)) * scale).astype(np.float32)
        weights[f"b{i}"] = np.zeros(fan_out, dtype=np.float32)
    dense_layers(family, weights)
    return weights
