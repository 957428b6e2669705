"""Feedback examples and their records: what one labelled example is, checked.

:class:`~edge_agent.training.feedback_buffer.FeedbackBuffer` stores examples that
:mod:`edge_agent.training.feedback` built from predictions and their labels; this
module holds the pure part both share:

* :func:`as_examples` turns a prediction's inputs into a batch ``(n,
  *example_shape)`` (1-D: one row) and bounds it (:data:`MAX_FEATURES` values,
  :data:`MAX_EXAMPLE_DIMS` dimensions per example);
* :func:`check_labels` and :func:`check_targets` check class labels and float
  targets;
* :class:`Example` is one stored example; :func:`encode_record` and
  :func:`decode_record` are its record format (described in
  :mod:`edge_agent.training.feedback_buffer`); decoding never raises: an unusable
  record decodes to None.
"""

from __future__ import annotations

import math
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_agent.errors import DataSourceError, InvalidLabelError
from edge_agent.training.trainer import MAX_CLASSES, FloatArray, finite_float32, real_array

__all__ = [
    "MAX_EXAMPLE_DIMS",
    "MAX_FEATURES",
    "MAX_TARGETS",
    "Example",
    "FeedbackKind",
    "as_examples",
    "check_labels",
    "check_targets",
    "decode_record",
    "describe_layout",
    "encode_record",
]

MAX_FEATURES = 65536
"""Most values of one example (one record is at most 256 KiB of values)."""

MAX_EXAMPLE_DIMS = 8
"""Most dimensions of one example (an image ``(1, 28, 28)`` has 3)."""

MAX_TARGETS = 1024
"""Most float targets of one example (a regression model's outputs)."""

FeedbackKind = Literal["label", "target"]
"""What the buffer's examples are labelled with: class labels or float targets."""

_LABEL = struct.Struct("<I")
_MAGIC = b"FBX2"
_HEADER = struct.Struct("<4sBBH")  # magic, kind (0 label, 1 targets), rank, target width
_KIND_CODES: dict[str, int] = {"label": 0, "target": 1}


@dataclass(frozen=True, slots=True, eq=False)
class Example:
    """One stored example: its record's ``seq``, input ``x`` and label or targets.

    Attributes:
        seq: The record's sequence number in the buffer's log (0 before storing).
        x: The input, read-only float32 of the example's shape.
        label: The class index (kind ``label``); 0 for targets.
        target: The float targets, shape ``()`` or ``(width,)`` (kind ``target``);
            None for a label.
    """

    seq: int
    x: FloatArray
    label: int  # the class index (kind "label"); 0 for targets
    target: FloatArray | None  # shape () or (width,) (kind "target"); None for labels

    @property
    def kind(self) -> FeedbackKind:
        """``"label"`` or ``"target"``."""
        return "label" if self.target is None else "target"

    @property
    def layout(self) -> tuple[str, tuple[int, ...], tuple[int, ...] | None]:
        """What examples held together must share: kind, input shape, target shape."""
        return (self.kind, self.x.shape, None if self.target is None else self.target.shape)

    @property
    def nbytes(self) -> int:
        """Bytes counted against the buffer's bound (inputs and float targets)."""
        return self.x.nbytes + (0 if self.target is None else self.target.nbytes)


def describe_layout(layout: tuple[str, tuple[int, ...], tuple[int, ...] | None]) -> str:
    """:attr:`Example.layout` in words, for error messages."""
    kind, shape, target = layout
    shape_text = "x".join(str(d) for d in shape)
    if kind == "label":
        return f"examples of shape ({shape_text}) with class labels"
    width = "one target" if not target else f"{target[0]} targets"
    return f"examples of shape ({shape_text}) with {width} each"


def as_examples(inputs: npt.ArrayLike) -> FloatArray:
    """Inputs as a read-only float32 batch ``(n, *example_shape)``; 1-D is one row.

    The first axis counts examples; the rest is one example's shape.

    Raises:
        DataSourceError: Not real numbers, empty, not finite, an example of more
            than :data:`MAX_FEATURES` values or :data:`MAX_EXAMPLE_DIMS` dimensions.
    """
    raw = real_array(inputs, "inputs")
    if raw.ndim == 0 or raw.size == 0:
        raise DataSourceError(f"inputs must have at least one value per example, got {raw.shape}")
    batch = raw.reshape(1, -1) if raw.ndim == 1 else raw
    if batch.ndim - 1 > MAX_EXAMPLE_DIMS:
        raise DataSourceError(
            f"an example has {batch.ndim - 1} dimensions, more than {MAX_EXAMPLE_DIMS}"
        )
    values = math.prod(batch.shape[1:])
    if values > MAX_FEATURES:
        raise DataSourceError(f"{values} values per example, more than {MAX_FEATURES}")
    out = finite_float32(batch, "inputs", copy=True)
    out.setflags(write=False)
    return out


def check_labels(labels: object, bound: int) -> list[int]:
    """Labels as a list of ints in ``[0, bound)``.

    Raises:
        InvalidLabelError: Not a sequence of integers (booleans are not), or one out
            of range.
    """
    if isinstance(labels, str | bytes) or not isinstance(labels, Sequence | np.ndarray):
        raise InvalidLabelError(f"labels must be a list of integers, got {type(labels).__name__}")
    out: list[int] = []
    for label in labels:
        if isinstance(label, bool | np.bool_) or not isinstance(label, int | np.integer):
            raise InvalidLabelError(f"a label must be an integer, got {type(label).__name__}")
        value = int(label)
        if not 0 <= value < bound:
            raise InvalidLabelError(f"label {value} is out of range: expected 0..{bound - 1}")
        out.append(value)
    return out


def _is_number(value: object) -> bool:
    return isinstance(value, int | float | np.integer | np.floating) and not isinstance(
        value, bool | np.bool_
    )


def _is_list(value: object) -> bool:
    return isinstance(value, Sequence | np.ndarray) and not isinstance(value, str | bytes)


def _target_array(targets: object) -> npt.NDArray[Any]:
    """Numbers, a list of numbers or a list of equally long lists of numbers."""
    if _is_number(targets):
        return np.array([targets], dtype=np.float64)
    if isinstance(targets, np.ndarray):
        if targets.dtype.kind not in "fiu":
            raise InvalidLabelError(f"targets must be numbers, got dtype {targets.dtype}")
        return targets.astype(np.float64).reshape(-1) if targets.ndim == 0 else targets
    if not _is_list(targets):
        raise InvalidLabelError(f"targets must be numbers, got {type(targets).__name__}")
    items = list(targets)  # type: ignore[call-overload]
    if all(_is_number(item) for item in items):
        return np.array(items, dtype=np.float64)
    if items and all(_is_list(item) and all(_is_number(v) for v in item) for item in items):
        widths = {len(item) for item in items}
        if len(widths) != 1:
            raise InvalidLabelError(f"every example needs as many targets; got {sorted(widths)}")
        return np.array([list(item) for item in items], dtype=np.float64)
    raise InvalidLabelError(
        "targets must be a number, a list of numbers (one per example) or a list of "
        "lists of numbers (several outputs per example); booleans and text are not numbers"
    )


def check_targets(targets: object, count: int) -> FloatArray:
    """Float targets of ``count`` examples: shape ``(count,)`` or ``(count, outputs)``.

    A single number is the target of one example; a list has one entry per example,
    a number or a list of ``outputs`` numbers.

    Raises:
        InvalidLabelError: Not numbers, not finite in float32, too many outputs, or
            not one entry per example.
    """
    try:
        array = _target_array(targets)
    except OverflowError as exc:  # an int beyond any float
        raise InvalidLabelError("targets must be finite numbers within float32") from exc
    if array.ndim not in (1, 2) or (array.ndim == 2 and not 1 <= array.shape[1] <= MAX_TARGETS):
        raise InvalidLabelError(
            f"targets must have shape (examples,) or (examples, 1..{MAX_TARGETS}), "
            f"got {array.shape}"
        )
    if array.shape[0] != count:
        hint = (
            "; for several outputs of one example give a list of one list"
            if count == 1 and array.ndim == 1
            else ""
        )
        raise InvalidLabelError(
            f"{array.shape[0]} target(s) for {count} example(s): give one per example{hint}"
        )
    with np.errstate(over="ignore", invalid="ignore"):
        out: FloatArray = np.ascontiguousarray(array, dtype=np.float32)
    if not np.isfinite(out).all():
        raise InvalidLabelError("targets must be finite numbers within float32")
    return out


def encode_record(example: Example) -> bytes:
    """The record of ``example`` (see :mod:`edge_agent.training.feedback_buffer`)."""
    values = example.x.astype("<f4", copy=False).tobytes()
    if example.target is None and example.x.ndim == 1:
        return _LABEL.pack(example.label) + values  # the original format
    width = 0 if example.target is None or example.target.ndim == 0 else example.target.shape[0]
    header = _HEADER.pack(_MAGIC, _KIND_CODES[example.kind], example.x.ndim, width)
    dims = struct.pack(f"<{example.x.ndim}I", *example.x.shape)
    if example.target is None:
        value = _LABEL.pack(example.label)
    else:
        value = example.target.astype("<f4", copy=False).tobytes()
    return header + dims + value + values


def _frozen(array: FloatArray) -> FloatArray | None:
    """``array`` read-only, or None when it holds a non-finite value."""
    if not np.isfinite(array).all():
        return None
    array.setflags(write=False)
    return array


def decode_record(record: bytes, seq: int = 0) -> Example | None:
    """The example of a record, or None when its content is unusable."""
    if record[: len(_MAGIC)] == _MAGIC:
        return _decode_tagged(record, seq)
    features = len(record) - _LABEL.size
    if features <= 0 or features % 4 or features // 4 > MAX_FEATURES:
        return None
    (label,) = _LABEL.unpack_from(record)
    if label >= MAX_CLASSES:
        return None
    row = _frozen(np.frombuffer(record, dtype="<f4", offset=_LABEL.size).astype(np.float32))
    return None if row is None else Example(seq, row, int(label), None)


def _tagged_layout(record: bytes) -> tuple[int, tuple[int, ...], int, int] | None:
    """``(kind, shape, width, offset of the label or targets)`` of a sound tagged
    record (see :mod:`edge_agent.training.feedback_buffer`), or None."""
    if len(record) < _HEADER.size:
        return None
    _, kind, ndim, width = _HEADER.unpack_from(record)
    offset = _HEADER.size + 4 * ndim
    if (
        kind not in (0, 1)
        or not 1 <= ndim <= MAX_EXAMPLE_DIMS
        or width > MAX_TARGETS
        or (kind == 0 and width)
        or len(record) < offset
    ):
        return None
    shape = struct.unpack_from(f"<{ndim}I", record, _HEADER.size)
    values = math.prod(shape)
    value_bytes = 4 if kind == 0 else 4 * max(width, 1)
    if min(shape) < 1 or values > MAX_FEATURES or len(record) != offset + value_bytes + 4 * values:
        return None
    return kind, shape, width, offset + value_bytes


def _decode_tagged(record: bytes, seq: int) -> Example | None:
    """The example of a tagged record, or None when its content is unusable."""
    layout = _tagged_layout(record)
    if layout is None:
        return None
    kind, shape, width, values_at = layout
    x = _frozen(np.frombuffer(record, dtype="<f4", offset=values_at).astype(np.float32))
    if x is None:
        return None
    x = x.reshape(shape)
    at = values_at - (4 if kind == 0 else 4 * max(width, 1))
    if kind == 0:
        (label,) = _LABEL.unpack_from(record, at)
        return Example(seq, x, int(label), None) if label < MAX_CLASSES else None
    raw = np.frombuffer(record, dtype="<f4", count=max(width, 1), offset=at)
    target = _frozen(raw.astype(np.float32).reshape((width,) if width else ()))
    return None if target is None else Example(seq, x, 0, target)
