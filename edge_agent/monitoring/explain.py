"""Explanations on the device: occlusion attributions computed with the served model.

Which parts of one input made the model answer what it did? :func:`explain` hides
one part of the input at a time (replaces it by a *baseline*) and measures how much
the model's score for the explained class drops. It only runs the deployed model
(ONNX or TFLite, whatever it is), so it works for any model, with no gradients::

    plan = occlusion_plan(x.shape[1:], profile)      # groups and baseline values
    result = explain(run, x, plan, target=None)      # run: rows -> first output
    result.attributions                              # one number per group

Groups (:func:`occlusion_plan`; they follow the reference profile's features,
:mod:`compress.profile`, so an attribution names the same thing as a drift score):

* vector ``(d,)`` (and anything of 4 or more dimensions, flattened): one group per
  value, or 64 contiguous groups when ``d > 64`` (the profile's features);
* image ``(C, H, W)``: per channel group (at most 4) a 4x4 grid of cells (row-major),
  the profile's features: at most 64 patches;
* sequence ``(C, T)``: per channel group (at most 8) and time segment (at most
  ``64 // channel groups``): at most 64 groups.

Baseline: the value a hidden part takes. With a reference profile it is the
feature's reference median (the profile's middle decile edge; for a sequence, the
median of the channel's mean), so a hidden part looks "typical"; without a profile
it is 0. Integer inputs get the rounded, clipped median.

Rows evaluated: the input itself, the all-baseline input and one row per group, at
most :data:`MAX_EVALUATIONS` (66), in **one** runtime call when the model's batch
dimension is dynamic (every fedge-packaged model), else in calls of its fixed batch
size. The score is the model's first output for the target column (its
probability, or logit when the model outputs logits; a regression model's value):
``attribution[g] = score(input) - score(input with group g hidden)``; positive
means the part supports the answer. ``baseline_score`` is the score of the
all-baseline input.

Refusals are :class:`~edge_agent.errors.ExplainError` (logged here): not exactly
one example (``examples``), a target outside the first output (``target``), a
model with several inputs or a plan that does not fit the input (``inputs``), more
rows than the bound (``too_costly``, e.g. a caller's own plan).
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.profile import MAX_FEATURES, ReferenceProfile, View, feature_view
from edge_agent.errors import ExplainError, ModelRuntimeError

__all__ = [
    "MAX_EVALUATIONS",
    "MAX_GROUPS",
    "Explanation",
    "Occlusion",
    "explain",
    "occlusion_plan",
    "refuse_explain",
]

logger = logging.getLogger(__name__)

MAX_GROUPS = MAX_FEATURES
"""Most groups of one explanation (64, as many as the profile's features)."""
MAX_EVALUATIONS = MAX_GROUPS + 2
"""Most model evaluations (rows) of one explanation: the input, the all-baseline
input and one per group."""

_IMAGE_CHANNELS = 4
_GRID = 4
_SEQUENCE_CHANNELS = 8
_PROFILE_SEQUENCE_CHANNELS = 32
_MEDIAN_EDGE = 4  # inner edges are the deciles 0.1 .. 0.9: index 4 is the median


def _block_ids(size: int, blocks: int) -> npt.NDArray[np.intp]:
    """The block of each of ``size`` positions cut into ``blocks`` contiguous, nearly
    equal blocks, as :func:`compress.profile.features` cuts them."""
    if size <= blocks:
        return np.arange(size, dtype=np.intp)
    bounds = (np.arange(blocks + 1) * size) // blocks
    return np.repeat(np.arange(blocks, dtype=np.intp), np.diff(bounds))


@dataclass(frozen=True, eq=False)
class Occlusion:
    """How one example's values are grouped and what a hidden group becomes.

    Attributes:
        view: ``vector``, ``sequence`` or ``image``.
        groups: The grid of groups: ``(G,)`` (vector), ``(channel groups, segments)``
            (sequence), ``(channel groups, rows, columns)`` (image).
        ids: Example-shaped: the group of each value (``0 .. G-1``, row-major).
        baseline: Example-shaped float64 replacement values.
        source: ``median`` (the profile's) or ``zero``.
    """

    view: View
    groups: tuple[int, ...]
    ids: npt.NDArray[np.intp]
    baseline: npt.NDArray[np.float64]
    source: str

    @property
    def count(self) -> int:
        """G, the number of groups."""
        return math.prod(self.groups)


def occlusion_plan(example_shape: Sequence[int], profile: ReferenceProfile | None) -> Occlusion:
    """The groups and baseline for examples of ``example_shape`` (no batch dimension).

    The profile's medians are used when its ``input_shape`` is ``example_shape``;
    otherwise (or without a profile) the baseline is 0.
    """
    shape = tuple(int(d) for d in example_shape)
    view = feature_view(shape)
    if view == "image":
        c, h, w = shape
        ch, rows = _block_ids(c, _IMAGE_CHANNELS), _block_ids(h, _GRID)
        cols = _block_ids(w, _GRID)
        groups: tuple[int, ...] = (int(ch[-1]) + 1, int(rows[-1]) + 1, int(cols[-1]) + 1)
        ids = (ch[:, None, None] * groups[1] + rows[None, :, None]) * groups[2] + cols[None, None]
        feature_ids = ids  # one profile feature per patch
    elif view == "sequence":
        c, t = shape
        ch = _block_ids(c, _SEQUENCE_CHANNELS)
        segments = _block_ids(t, MAX_GROUPS // (int(ch[-1]) + 1))
        groups = (int(ch[-1]) + 1, int(segments[-1]) + 1)
        ids = ch[:, None] * groups[1] + segments[None, :]
        # the profile's first features are the means of its 32 channel groups
        feature_ids = np.broadcast_to(_block_ids(c, _PROFILE_SEQUENCE_CHANNELS)[:, None], shape)
    else:
        size = math.prod(shape)
        flat = _block_ids(size, MAX_FEATURES)
        groups = (int(flat[-1]) + 1,)
        ids = flat.reshape(shape)
        feature_ids = ids
    if profile is not None and profile.input_shape == shape:
        medians = profile.edge_array()[:, _MEDIAN_EDGE]
        baseline, source = medians[feature_ids], "median"
    else:
        baseline, source = np.zeros(shape, dtype=np.float64), "zero"
    return Occlusion(view, groups, np.asarray(ids, np.intp), np.asarray(baseline), source)


@dataclass(frozen=True)
class Explanation:
    """The attributions of one input.

    Attributes:
        model: The model that was explained, and its ``version``.
        target: The explained column of the first output (the predicted class by
            default).
        label: The predicted class (arg-max of a 2-D first output), else None.
        score: The model's score for ``target`` on the input.
        baseline_score: Its score on the all-baseline input.
        attributions: Per group, ``score`` minus the score with that group hidden.
        view: How the groups were made, ``groups`` their grid, ``baseline`` where
            the hidden values came from (``median`` or ``zero``).
        flat: No part moved the score at all (every attribution is 0): typical of a
            confident int8 model, whose probabilities move in steps of 1/255 and
            saturate; the explanation then says nothing about the parts.
        evaluations: Rows the model evaluated; ``calls``: runtime calls made.
        latency_ms: Wall time of the explanation.
    """

    model: str
    version: int
    target: int
    label: int | None
    score: float
    baseline_score: float
    attributions: tuple[float, ...]
    view: str
    groups: tuple[int, ...]
    baseline: str
    flat: bool
    evaluations: int
    calls: int
    latency_ms: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form (non-finite numbers as ``None``)."""
        return {
            "model": self.model,
            "version": self.version,
            "target": self.target,
            "label": self.label,
            "score": _finite(self.score),
            "baseline_score": _finite(self.baseline_score),
            "attributions": [_finite(a) for a in self.attributions],
            "view": self.view,
            "groups": list(self.groups),
            "baseline": self.baseline,
            "flat": self.flat,
            "evaluations": self.evaluations,
            "calls": self.calls,
            "latency_ms": self.latency_ms,
        }


def _finite(value: float) -> float | None:
    return value if math.isfinite(value) else None


def refuse_explain(reason: str, message: str, model: str) -> ExplainError:
    """The typed refusal of an explanation (logged here, once per refused request)."""
    logger.warning("refused to explain a prediction of %s (%s): %s", model, reason, message)
    return ExplainError(message, reason=reason)


def _rows(x: np.ndarray, plan: Occlusion) -> np.ndarray:
    """``[x, all-baseline, x with group 0 hidden, ...]`` in ``x``'s dtype."""
    example = x[0]
    baseline = plan.baseline
    if example.dtype.kind in "iub":
        info = np.iinfo(example.dtype) if example.dtype.kind != "b" else None
        baseline = np.rint(baseline)
        if info is not None:
            baseline = np.clip(baseline, info.min, info.max)
    base = baseline.astype(example.dtype)
    rows = np.repeat(x, plan.count + 2, axis=0)
    rows[1] = base
    flat = rows[2:].reshape(plan.count, -1)  # a view: each value is hidden in its group's row
    flat[plan.ids.reshape(-1), np.arange(flat.shape[1])] = base.reshape(-1)
    return rows


def _evaluate(
    run: Callable[[np.ndarray], np.ndarray], rows: np.ndarray, batch: int | None
) -> tuple[np.ndarray, int]:
    """The first output for ``rows``: one call, or calls of a fixed ``batch`` (the
    last one padded with copies of the first row). Returns it and the calls made."""
    n = rows.shape[0]
    if batch is None or batch == n:
        return np.asarray(run(rows)), 1
    outputs = []
    for start in range(0, n, batch):
        chunk = rows[start : start + batch]
        if chunk.shape[0] < batch:
            pad = np.repeat(rows[:1], batch - chunk.shape[0], axis=0)
            chunk = np.concatenate([chunk, pad])
        outputs.append(np.asarray(run(chunk)))
    return np.concatenate(outputs)[:n], len(outputs)


def explain(
    run: Callable[[np.ndarray], np.ndarray],
    x: np.ndarray,
    plan: Occlusion,
    *,
    target: int | None = None,
    batch: int | None = None,
    model: str = "model",
    version: int = 0,
    clock: Callable[[], float] = time.perf_counter,
) -> Explanation:
    """Occlusion attributions of the one example in ``x`` (shape ``(1, *example)``).

    Args:
        run: Runs the model on rows ``(n, *example)``; returns its first output.
        x: The validated input, one example with its batch dimension.
        plan: :func:`occlusion_plan` for ``x.shape[1:]``.
        target: The first output's column to explain; None: the predicted class
            (column 0 for a single-column output).
        batch: The model's fixed batch size, or None when it is dynamic.
        model: Its name and ``version``, for the answer and the log.
        clock: Monotonic clock in seconds (for ``latency_ms``).

    Raises:
        ExplainError: not one example, a bad target, or more rows than
            :data:`MAX_EVALUATIONS`; refused before the model runs (but for the
            target, checked on its output).
        ModelRuntimeError: the runtime failed, or its output has not one row per row.
    """
    start = clock()
    if x.ndim < 1 or x.shape[0] != 1:
        message = f"explain takes exactly one example, got shape {tuple(x.shape)}"
        raise refuse_explain("examples", message, model)
    if plan.ids.shape != x.shape[1:]:
        raise refuse_explain(
            "inputs", f"a plan for shape {plan.ids.shape} cannot explain shape {x.shape}", model
        )
    evaluations = plan.count + 2
    if evaluations > MAX_EVALUATIONS:
        raise refuse_explain(
            "too_costly",
            f"{evaluations} evaluations for groups {plan.groups}; at most {MAX_EVALUATIONS}",
            model,
        )
    output, calls = _evaluate(run, _rows(x, plan), batch)
    if output.ndim < 1 or output.shape[0] != evaluations or output.size == 0:
        message = f"{model}: expected {evaluations} output rows, got shape {tuple(output.shape)}"
        logger.error("cannot explain: %s", message)
        raise ModelRuntimeError(message)
    scores = output.reshape(evaluations, -1).astype(np.float64)
    columns = scores.shape[1]
    label = int(np.argmax(scores[0])) if output.ndim == 2 else None
    if target is None:
        target = int(np.argmax(scores[0])) if columns > 1 else 0
    elif not 0 <= target < columns:
        raise refuse_explain(
            "target", f"target {target} is not a column of the output (0..{columns - 1})", model
        )
    column = scores[:, target]
    attributions = column[0] - column[2:]
    return Explanation(
        model=model,
        version=version,
        target=target,
        label=label,
        score=float(column[0]),
        baseline_score=float(column[1]),
        attributions=tuple(float(v) for v in attributions),
        view=plan.view,
        groups=plan.groups,
        baseline=plan.source,
        flat=not np.any(attributions),
        evaluations=evaluations,
        calls=calls,
        latency_ms=(clock() - start) * 1000.0,
    )
