"""Reference profiles: what a model's inputs and outputs looked like at packaging.

Drift is measured by comparing what a deployed model receives with what it was
packaged for. This module turns model inputs into a few scalar *features*, bins them
at the reference data's deciles and keeps the shares, so that a device only has to
count how many of its inputs fall in each bin (:func:`bin_counts`) and the
coordinator compares those counts with the shares (PSI, Jensen-Shannon).

Features (:func:`features`, at most :data:`MAX_FEATURES` = 64 per example; the view
depends only on the shape of one example, :func:`feature_view`):

* ``vector`` -- ``(d,)``: the ``d`` values; when ``d > 64``, 64 contiguous groups, each
  its mean. Examples of 4 or more dimensions are flattened and treated the same way;
* ``sequence`` -- ``(C, T)``, channel-major like fedge's sensor windows
  (``sensor_cnn`` takes ``(channels, steps)``): per channel, the mean over time, then
  per channel the standard deviation (``[mean_0..mean_C-1, std_0..std_C-1]``); more
  than 32 channels are pooled into 32 contiguous groups first (the mean of each
  group's channels at every step);
* ``image`` -- ``(C, H, W)``: per channel, the mean over each cell of a 4x4 grid
  (``min(4, H)`` x ``min(4, W)`` cells, row-major); more than 4 channels are pooled
  into 4 contiguous groups first. Grayscale images are ``(1, H, W)``: a 2-D example
  is a sequence.

Every feature is a mean over contiguous blocks (``np.add.reduceat``) or a standard
deviation: vectorised numpy, no Python loop per feature or per example.

A :class:`ReferenceProfile` (``profile_from_data(x, outputs, task)``) holds, for the
reference data (the packager's calibration or evaluation examples and the fp32
model's outputs for them):

* ``edges[f]``: 9 inner bin edges per feature at the deciles (6 significant digits)
  and ``reference[f][b]``: the share of reference rows in bin ``b`` (10 bins; bin
  ``b`` holds ``edges[b-1] <= v < edges[b]``, see :func:`bin_counts`);
* ``value_range``: the smallest and largest input value, widened by 10 % of the
  span on each side -- the agent refuses inputs outside it (``out_of_range``);
* ``classes``: the share of each predicted class (classification), else None;
* ``confidence``: for classification the max probability, binned at fixed edges
  0.1..0.9 (``max_prob``); for reconstruction the anomaly score, binned at its
  deciles (``score``); None for regression.

The profile travels as the optional ``reference`` field of the signed manifest
(:mod:`compress.manifest`). Its JSON form is strict (every list sized, every share
in [0, 1] and summing to 1, edges non-decreasing) and bounded: at most
:data:`MAX_PROFILE_BYTES` (16 KiB) for 64 features and 100 classes.
"""

from __future__ import annotations

import itertools
import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from compress.errors import ProfileError
from compress.strictjson import FieldReader, JsonObject, decode_canonical, encode_canonical

__all__ = [
    "BINS",
    "CONFIDENCE_EDGES",
    "MAX_CLASSES",
    "MAX_FEATURES",
    "MAX_PROFILE_BYTES",
    "ConfidenceProfile",
    "ReferenceProfile",
    "are_logits",
    "bin_counts",
    "class_probabilities",
    "confidence_values",
    "feature_count",
    "feature_view",
    "features",
    "profile_from_data",
]

logger = logging.getLogger(__name__)

MAX_FEATURES = 64
BINS = 10
MAX_CLASSES = 100
MAX_PROFILE_BYTES = 16 * 1024
MAX_INPUT_DIMS = 8
#: Fixed inner edges of the ``max_prob`` confidence bins.
CONFIDENCE_EDGES: tuple[float, ...] = (0.1, 0.2, 0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9)
#: Margin added to each side of ``value_range``, as a fraction of the span.
RANGE_MARGIN = 0.1
#: Shares are written with this many decimals (keeps the profile within its budget).
SHARE_DECIMALS = 5
#: A share list may sum to 1 within this tolerance (rounding of the shares).
SHARE_TOLERANCE = 1e-3

_IMAGE_CHANNELS = 4
_GRID = 4
_SEQUENCE_CHANNELS = 32

Task = Literal["classification", "regression", "reconstruction"]
TASKS: tuple[Task, ...] = ("classification", "regression", "reconstruction")
View = Literal["vector", "sequence", "image"]
ConfidenceKind = Literal["max_prob", "score"]

FloatArray = npt.NDArray[np.float32]


def feature_view(input_shape: Sequence[int]) -> View:
    """How examples of ``input_shape`` (one example, no batch dimension) become features.

    ``(C, T)`` is a ``sequence``, ``(C, H, W)`` an ``image``, anything else a
    ``vector`` (flattened).
    """
    if len(input_shape) == 2:
        return "sequence"
    if len(input_shape) == 3:
        return "image"
    return "vector"


def feature_count(input_shape: Sequence[int]) -> int:
    """The number of features :func:`features` gives for examples of ``input_shape``."""
    view = feature_view(input_shape)
    if view == "sequence":
        return 2 * min(input_shape[0], _SEQUENCE_CHANNELS)
    if view == "image":
        channels, height, width = input_shape
        return min(channels, _IMAGE_CHANNELS) * min(height, _GRID) * min(width, _GRID)
    return min(math.prod(input_shape), MAX_FEATURES)


def _block_means(x: FloatArray, axis: int, blocks: int) -> FloatArray:
    """Means of ``blocks`` contiguous, nearly equal blocks along ``axis``."""
    size = x.shape[axis]
    if size <= blocks:
        return x
    bounds = (np.arange(blocks + 1) * size) // blocks
    sums = np.add.reduceat(x, bounds[:-1], axis=axis)
    shape = [1] * x.ndim
    shape[axis] = blocks
    return (sums / np.diff(bounds).reshape(shape)).astype(np.float32, copy=False)


def features(x: npt.ArrayLike) -> FloatArray:
    """The ``(n, F)`` float32 features of a batch ``x`` of shape ``(n, *input_shape)``.

    Raises:
        ProfileError: ``x`` has no batch dimension or no values per example.
    """
    batch = np.asarray(x, dtype=np.float32)
    if batch.ndim < 1 or batch.shape[0] < 1 or any(d < 1 for d in batch.shape[1:]):
        raise ProfileError(f"features need a non-empty batch (n, ...), got shape {batch.shape}")
    n = batch.shape[0]
    view = feature_view(batch.shape[1:])
    if view == "sequence":
        seq = _block_means(batch, 1, _SEQUENCE_CHANNELS)
        both = np.concatenate([seq.mean(axis=2), seq.std(axis=2)], axis=1)
        return np.asarray(both, dtype=np.float32)
    if view == "image":
        img = _block_means(batch, 1, _IMAGE_CHANNELS)
        img = _block_means(_block_means(img, 2, _GRID), 3, _GRID)
        return img.reshape(n, -1)
    return _block_means(batch.reshape(n, -1), 1, MAX_FEATURES)


def bin_counts(edges: npt.NDArray[np.float64], values: FloatArray) -> npt.NDArray[np.int64]:
    """How many rows of ``values`` ``(n, F)`` fall in each of the 10 bins of each
    feature, for inner ``edges`` ``(F, 9)``: ``(F, 10)`` counts.

    Bin ``b`` holds ``edges[b-1] <= v < edges[b]`` (bin 0 everything below the first
    edge, bin 9 everything from the last one up). Values are compared in their own
    dtype (float32 features: the edges are cast to it), the same way at packaging
    and on the device. One comparison per inner edge over the whole ``(n, F)`` block:
    ``at_least[j]`` rows per feature are ``>= edges[j]``, and a bin's count is the
    difference of two neighbours.
    """
    n = values.shape[0]
    cast = edges.astype(values.dtype, copy=False)
    at_least = np.stack([np.count_nonzero(values >= cast[:, j], axis=0) for j in range(BINS - 1)])
    bounds = np.concatenate(
        [np.full((1, edges.shape[0]), n), at_least, np.zeros((1, edges.shape[0]), np.int64)]
    )
    return np.asarray((bounds[:-1] - bounds[1:]).T, dtype=np.int64)


def are_logits(outputs: npt.ArrayLike) -> bool:
    """Whether classifier ``outputs`` ``(n, K)`` are logits rather than probabilities
    (rows in [0, 1] summing to 1 within 1e-3). Decided once, at packaging, on the fp32
    model's outputs and recorded in the profile: an int8 model's probabilities can miss
    a sum of 1 by a quantization step per class, so a device never guesses."""
    out = np.asarray(outputs, dtype=np.float64)
    if out.ndim != 2 or out.size == 0:
        return False
    return not (
        out.min() >= 0.0 and out.max() <= 1.0 and np.abs(out.sum(axis=1) - 1.0).max() <= 1e-3
    )


def class_probabilities(outputs: npt.ArrayLike, *, logits: bool | None = None) -> FloatArray:
    """Rows of class probabilities: the softmax of ``outputs`` when they are logits,
    else ``outputs`` as they are. ``logits`` None decides with :func:`are_logits`.

    Raises:
        ProfileError: ``outputs`` is not ``(n, K)`` with 2 <= K <= 100.
    """
    out = np.asarray(outputs, dtype=np.float32)
    if out.ndim != 2 or not 2 <= out.shape[1] <= MAX_CLASSES:
        raise ProfileError(f"class outputs must be (n, K) with 2 <= K <= 100, got {out.shape}")
    if not (are_logits(out) if logits is None else logits):
        return out
    shifted = np.exp(out - out.max(axis=1, keepdims=True))
    return np.asarray(shifted / shifted.sum(axis=1, keepdims=True), dtype=np.float32)


def confidence_values(x: npt.ArrayLike, outputs: npt.ArrayLike, task: str) -> FloatArray | None:
    """The confidence signal per row: max probability (classification), anomaly score
    (reconstruction: the model's score ``(n,)``/``(n, 1)``, or the mean squared
    reconstruction error when the output has the input's shape), None (regression).

    Raises:
        ProfileError: outputs that do not fit the task.
    """
    if task == "classification":
        return np.asarray(class_probabilities(outputs).max(axis=1), dtype=np.float32)
    if task != "reconstruction":
        return None
    out = np.asarray(outputs, dtype=np.float32)
    batch = np.asarray(x, dtype=np.float32)
    n = batch.shape[0]
    if out.size == n:
        return out.reshape(n)
    if out.shape == batch.shape:
        return np.asarray(((out - batch) ** 2).reshape(n, -1).mean(axis=1), dtype=np.float32)
    raise ProfileError(
        f"reconstruction outputs must be a score per row or the input's shape "
        f"{batch.shape}, got {out.shape}"
    )


def _sig6(value: float) -> float:
    return float(f"{value:.6g}")


def _shares(counts: npt.NDArray[np.int64], rows: int) -> tuple[float, ...]:
    return tuple(round(float(c) / rows, SHARE_DECIMALS) for c in counts)


def _deciles(values: FloatArray) -> npt.NDArray[np.float64]:
    """Inner decile edges per column of ``values`` ``(n, F)``: ``(F, 9)``, 6 digits."""
    q = np.quantile(values.astype(np.float64), np.arange(1, BINS) / BINS, axis=0).T
    rounded = np.vectorize(_sig6, otypes=[np.float64])(q)
    return np.asarray(rounded, dtype=np.float64).reshape(values.shape[1], BINS - 1)


@dataclass(frozen=True)
class ConfidenceProfile:
    """The reference distribution of the confidence signal.

    Attributes:
        kind: ``max_prob`` (classification) or ``score`` (reconstruction).
        edges: 9 non-decreasing inner bin edges.
        reference: 10 shares (sum 1).
        logits: ``max_prob`` only: the model outputs logits, and the max probability
            is that of their softmax (else its outputs are the probabilities).
    """

    kind: ConfidenceKind
    edges: tuple[float, ...]
    reference: tuple[float, ...]
    logits: bool = False

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {
            "kind": self.kind,
            "edges": list(self.edges),
            "reference": list(self.reference),
            "logits": self.logits,
        }


@dataclass(frozen=True)
class ReferenceProfile:
    """A model's reference input features, value range, classes and confidence.

    Attributes:
        task: ``classification``, ``regression`` or ``reconstruction``.
        input_shape: The shape of one example (no batch dimension).
        rows: How many reference examples the profile was computed from.
        edges: Per feature, 9 non-decreasing inner bin edges.
        reference: Per feature, 10 shares of the reference rows (sum 1).
        value_range: ``(lo, hi)``: inputs outside are out of range.
        classes: Predicted-class shares (classification), else None.
        confidence: The confidence reference (None for regression).
    """

    task: Task
    input_shape: tuple[int, ...]
    rows: int
    edges: tuple[tuple[float, ...], ...]
    reference: tuple[tuple[float, ...], ...]
    value_range: tuple[float, float]
    classes: tuple[float, ...] | None
    confidence: ConfidenceProfile | None

    def __post_init__(self) -> None:
        ReferenceProfile.from_bytes(self.to_bytes())

    @property
    def view(self) -> View:
        """How inputs become features (:func:`feature_view`)."""
        return feature_view(self.input_shape)

    @property
    def feature_count(self) -> int:
        """F, the number of features."""
        return len(self.edges)

    def edge_array(self) -> npt.NDArray[np.float64]:
        """The edges as an ``(F, 9)`` array (for :func:`bin_counts`)."""
        return np.asarray(self.edges, dtype=np.float64).reshape(self.feature_count, BINS - 1)

    def to_dict(self) -> JsonObject:
        """JSON form."""
        return {
            "bins": BINS,
            "task": self.task,
            "input_shape": list(self.input_shape),
            "rows": self.rows,
            "edges": [list(e) for e in self.edges],
            "reference": [list(s) for s in self.reference],
            "value_range": list(self.value_range),
            "classes": None if self.classes is None else list(self.classes),
            "confidence": None if self.confidence is None else self.confidence.to_dict(),
        }

    def to_bytes(self) -> bytes:
        """Canonical JSON bytes."""
        return encode_canonical(self.to_dict(), ProfileError, what="reference profile")

    @classmethod
    def from_bytes(cls, data: bytes) -> ReferenceProfile:
        """Parse canonical profile bytes, strictly (at most :data:`MAX_PROFILE_BYTES`).

        Raises:
            ProfileError: too large, not JSON, schema violations, or not canonical.
        """
        return decode_canonical(
            data,
            ProfileError,
            what="reference profile",
            max_bytes=MAX_PROFILE_BYTES,
            build=lambda obj: cls.from_reader(FieldReader(obj, ProfileError, "reference")),
            encode=ReferenceProfile.to_bytes,
        )

    @classmethod
    def from_dict(cls, obj: dict[str, Any]) -> ReferenceProfile:
        """Build a profile from its JSON form, checking every field.

        Raises:
            ProfileError: a missing or invalid field.
        """
        return cls.from_reader(FieldReader(obj, ProfileError, "reference"))

    @classmethod
    def from_reader(cls, r: FieldReader) -> ReferenceProfile:
        """Parse a profile with ``r`` (whose error class the caller chose).

        Raises:
            ProfileError: (or ``r``'s error class) a missing or invalid field.
        """
        r.integer("bins", lo=BINS, hi=BINS)
        task = r.text("task", max_len=16, choices=TASKS)
        shape = tuple(
            r.each("input_shape", lambda e, k: e.integer(k, lo=1, hi=2**31), max_len=8, min_len=1)
        )
        n_features = feature_count(shape)
        edges = r.each("edges", _edges_reader, max_len=n_features, min_len=n_features)
        shares = r.each("reference", _shares_reader(BINS), max_len=n_features, min_len=n_features)
        value_range = r.each("value_range", _number, max_len=2, min_len=2)
        if value_range[0] > value_range[1]:
            raise r.fail("value_range", "lo is above hi")
        classes = None
        if r.raw("classes") is not None:
            if task != "classification":
                raise r.fail("classes", f"must be null for task {task}")
            classes = tuple(_shares_reader(None)(r, "classes"))
        elif task == "classification":
            raise r.fail("classes", "missing for a classification profile")
        confidence = _confidence_from(r, task)
        profile = object.__new__(cls)
        values = {
            "task": task,
            "input_shape": shape,
            "rows": r.integer("rows", lo=1),
            "edges": tuple(edges),
            "reference": tuple(shares),
            "value_range": (value_range[0], value_range[1]),
            "classes": classes,
            "confidence": confidence,
        }
        for key, value in values.items():  # frozen; __post_init__ would recurse
            object.__setattr__(profile, key, value)
        return profile

    def summary(self) -> str:
        """One line: ``64 features (image (3, 32, 32)), 500 rows, range [-1, 1], ...``."""
        lo, hi = self.value_range
        parts = [
            f"{self.feature_count} features ({self.view} {self.input_shape})",
            f"{self.rows} rows",
            f"range [{lo:.4g}, {hi:.4g}]",
        ]
        if self.classes is not None:
            parts.append(f"{len(self.classes)} classes")
        if self.confidence is not None:
            parts.append(f"confidence {self.confidence.kind}")
        return ", ".join(parts)


def _number(r: FieldReader, key: str) -> float:
    return r.number(key, lo=-math.inf)


def _edges_reader(r: FieldReader, key: str) -> tuple[float, ...]:
    edges = r.each(key, _number, max_len=BINS - 1, min_len=BINS - 1)
    if any(b < a for a, b in itertools.pairwise(edges)):
        raise r.fail(key, "edges must be non-decreasing")
    return tuple(edges)


def _shares_reader(size: int | None) -> Any:
    def read(r: FieldReader, key: str) -> tuple[float, ...]:
        lo, hi = (size, size) if size is not None else (2, MAX_CLASSES)
        shares = r.each(key, lambda e, k: e.number(k, lo=0.0, hi=1.0), max_len=hi, min_len=lo)
        if abs(math.fsum(shares) - 1.0) > SHARE_TOLERANCE:
            raise r.fail(key, f"shares sum to {math.fsum(shares):.6f}, not 1")
        return tuple(shares)

    return read


def _confidence_from(r: FieldReader, task: str) -> ConfidenceProfile | None:
    conf = r.obj("confidence", optional=True)
    expected: ConfidenceKind | None = {"classification": "max_prob", "reconstruction": "score"}.get(
        task
    )  # type: ignore[assignment]
    if conf is None:
        if expected is not None:
            raise r.fail("confidence", f"missing for a {task} profile")
        return None
    if expected is None:
        raise r.fail("confidence", f"must be null for task {task}")
    conf.text("kind", max_len=16, choices=(expected,))
    edges = _edges_reader(conf, "edges")
    if expected == "max_prob" and edges != CONFIDENCE_EDGES:
        raise conf.fail("edges", f"max_prob edges must be {list(CONFIDENCE_EDGES)}")
    logits = conf.boolean("logits")
    if logits and expected != "max_prob":
        raise conf.fail("logits", "only a max_prob confidence can be of logits")
    return ConfidenceProfile(
        kind=expected,
        edges=edges,
        reference=_shares_reader(BINS)(conf, "reference"),
        logits=logits,
    )


def profile_from_data(x: npt.ArrayLike, outputs: npt.ArrayLike, task: Task) -> ReferenceProfile:
    """Compute the reference profile of reference inputs ``x`` ``(n, *input_shape)`` and
    the model's ``outputs`` for them (the primary output: probabilities or logits
    ``(n, K)``, a prediction, or an anomaly score / reconstruction).

    Raises:
        ProfileError: an unknown task, an empty or non-finite batch, outputs that do not
            fit the task, or more than 100 classes.
    """
    if task not in TASKS:
        raise ProfileError(f"unknown task {task!r}; expected one of {', '.join(TASKS)}")
    batch = np.asarray(x, dtype=np.float32)
    if batch.ndim < 2 or batch.shape[0] < 1 or batch.ndim - 1 > MAX_INPUT_DIMS:
        raise ProfileError(f"reference inputs must be a batch (n, ...), got {batch.shape}")
    if not np.isfinite(batch).all():
        raise ProfileError("reference inputs hold NaN or infinite values")
    rows = batch.shape[0]
    feats = features(batch)
    edges = _deciles(feats)
    counts = bin_counts(edges, feats)
    lo, hi = float(batch.min()), float(batch.max())
    margin = RANGE_MARGIN * (hi - lo) if hi > lo else max(abs(lo) * RANGE_MARGIN, 1e-6)
    classes = None
    confidence = None
    conf_values = confidence_values(batch, outputs, task)
    if conf_values is not None:
        if not np.isfinite(conf_values).all():
            raise ProfileError("the model's reference outputs hold NaN or infinite values")
        logits = False
        if task == "classification":
            logits = are_logits(outputs)
            probs = class_probabilities(outputs, logits=logits)
            picked = np.bincount(probs.argmax(axis=1), minlength=probs.shape[1])
            classes = _shares(picked, rows)
            conf_edges = np.asarray([CONFIDENCE_EDGES])
            kind: ConfidenceKind = "max_prob"
        else:
            conf_edges = _deciles(conf_values.reshape(rows, 1))
            kind = "score"
        conf_counts = bin_counts(conf_edges, conf_values.reshape(rows, 1))[0]
        confidence = ConfidenceProfile(
            kind=kind,
            edges=tuple(float(e) for e in conf_edges[0]),
            reference=_shares(conf_counts, rows),
            logits=logits,
        )
    profile = ReferenceProfile(
        task=task,
        input_shape=tuple(int(d) for d in batch.shape[1:]),
        rows=rows,
        edges=tuple(tuple(float(e) for e in row) for row in edges),
        reference=tuple(_shares(row, rows) for row in counts),
        value_range=(lo - margin, hi + margin),
        classes=classes,
        confidence=confidence,
    )
    logger.info("reference profile: %s", profile.summary())
    return profile
