"""The feedback buffer: labelled examples kept on the device for the next rounds.

:class:`FeedbackBuffer` holds the examples that labelled feedback produced
(:mod:`edge_agent.training.feedback` joins predictions and labels; the HTTP API
receives them) and hands them to :class:`~edge_agent.training.data.LocalData` as a
:class:`~edge_agent.training.trainer.Dataset`:

1. ``buffer = FeedbackBuffer(data_dir / "feedback")`` loads what a previous run
   stored;
2. ``buffer.add_many(rows, labels)`` stores examples, all or none, and drops the
   oldest beyond the bounds (default at most 10,000 examples and 64 MiB of
   features) in the same transaction;
3. ``buffer.dataset()`` is every example held, oldest first.

Storage: :class:`~edge_agent.durable_log.DurableLog`, the agent's one crash-safe
log (``feedback.db`` in the directory; with ``fsync=True``, the default, an example
is on the disk before :meth:`FeedbackBuffer.add_many` returns). One record per
example: the label (u32, little-endian) then the features (float32,
little-endian). On open, records whose content is unusable (a label out of range,
non-finite or ragged features, a feature count other than the newest examples')
are deleted with a warning. The examples are also held in memory, for
:meth:`FeedbackBuffer.dataset`.

An agent upgraded in place finds the buffer of its earlier version (the CRC record
file ``feedback.log``): on open, :mod:`edge_agent.legacy_formats` imports its good
records in their order (damaged ones are skipped with a warning, as the old reader
did) and deletes the file once the import committed.

Thread-safe (one lock); not multi-process safe: one agent owns its directory.
"""

from __future__ import annotations

import itertools
import logging
import struct
import threading
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from edge_agent.durable_log import DurableLog
from edge_agent.errors import ConfigError, DataSourceError, InvalidLabelError, StateError
from edge_agent.legacy_formats import feedback_files, import_legacy, read_feedback_log
from edge_agent.training.trainer import MAX_CLASSES, Dataset, FloatArray

__all__ = [
    "DEFAULT_FEEDBACK_MAX_BYTES",
    "DEFAULT_FEEDBACK_MAX_EXAMPLES",
    "FEEDBACK_FILE",
    "MAX_FEATURES",
    "FeedbackBuffer",
    "as_rows",
    "check_labels",
]

logger = logging.getLogger(__name__)

MAX_FEATURES = 65536
"""Most features of one example (one record is at most 256 KiB of features)."""

DEFAULT_FEEDBACK_MAX_EXAMPLES = 10_000
"""Labelled examples :class:`FeedbackBuffer` keeps by default."""

DEFAULT_FEEDBACK_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of features :class:`FeedbackBuffer` keeps by default."""

FEEDBACK_FILE = "feedback.db"
"""Name of the buffer's database file in its directory."""

_LABEL = struct.Struct("<I")

Example = tuple[int, int, FloatArray]
"""``(seq, label, row)`` of one stored example."""


def as_rows(inputs: npt.ArrayLike) -> FloatArray:
    """Inputs as a float32 (rows, features) matrix: a 1-D input is one row.

    Raises:
        DataSourceError: Not real numbers, empty, not finite, or too many features.
    """
    try:
        raw = np.asarray(inputs)
    except (TypeError, ValueError) as exc:
        raise DataSourceError(f"inputs are not a numeric array: {exc}") from exc
    if raw.dtype.kind not in "fiub":
        raise DataSourceError(f"inputs must be real numbers, got dtype {raw.dtype}")
    if raw.ndim == 0 or raw.size == 0:
        raise DataSourceError(f"inputs must have at least one value per row, got {raw.shape}")
    rows = raw.reshape(1, -1) if raw.ndim == 1 else raw.reshape(raw.shape[0], -1)
    if rows.shape[1] > MAX_FEATURES:
        raise DataSourceError(f"{rows.shape[1]} features per row, more than {MAX_FEATURES}")
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
        out: FloatArray = np.array(rows, dtype=np.float32, order="C")  # always a copy
    if not np.isfinite(out).all():
        raise DataSourceError("inputs contain NaN or infinity")
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


def _encode(label: int, row: FloatArray) -> bytes:
    return _LABEL.pack(label) + row.astype("<f4", copy=False).tobytes()


def _decode(record: bytes) -> tuple[int, FloatArray] | None:
    """``(label, row)`` of a record, or None when its content is unusable."""
    features = len(record) - _LABEL.size
    if features <= 0 or features % 4 or features // 4 > MAX_FEATURES:
        return None
    (label,) = _LABEL.unpack_from(record)
    row = np.frombuffer(record, dtype="<f4", offset=_LABEL.size).astype(np.float32)
    if label >= MAX_CLASSES or not np.isfinite(row).all():
        return None
    row.setflags(write=False)
    return int(label), row


class FeedbackBuffer:
    """A bounded, crash-safe on-disk store of labelled examples.

    Args:
        directory: Where ``feedback.db`` lives; created with mode 0o700 (and its
            parents) if missing.
        max_examples: Most examples kept (>= 1); the oldest are dropped.
        max_bytes: Most bytes of features kept (>= 1); the oldest are dropped.
        fsync: Sync each change to the disk before :meth:`add` returns (turn off
            only where durability against power cuts does not matter, e.g.
            simulations; a killed process loses nothing either way).

    Raises:
        ConfigError: A bound is below 1.
        StateError: The directory or its database cannot be created or read.
    """

    def __init__(
        self,
        directory: Path,
        *,
        max_examples: int = DEFAULT_FEEDBACK_MAX_EXAMPLES,
        max_bytes: int = DEFAULT_FEEDBACK_MAX_BYTES,
        fsync: bool = True,
    ) -> None:
        if max_examples < 1 or max_bytes < 1:
            raise ConfigError(
                f"feedback bounds must be >= 1, got max_examples={max_examples} "
                f"max_bytes={max_bytes}"
            )
        self._dir = Path(directory)
        self._max_examples = max_examples
        self._max_bytes = max_bytes
        self._lock = threading.Lock()
        self._examples: deque[Example] = deque()
        self._bytes = 0  # feature bytes held
        self._version = 0
        self._dropped = 0
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self._dir}: cannot create feedback directory: {exc}") from exc
        self._log = DurableLog(self._dir / FEEDBACK_FILE, durable=fsync)
        try:
            import_legacy(
                self._log,
                feedback_files(self._dir),
                lambda files: read_feedback_log(
                    files,
                    max_examples=max_examples,
                    max_bytes=max_bytes,
                    max_features=MAX_FEATURES,
                    usable=lambda record: _decode(record) is not None,
                ),
                store="feedback",
            )
        except BaseException:
            self._log.close()
            raise
        self._recover()

    def _recover(self) -> None:
        """Load the usable records; delete the others and those beyond the bounds."""
        unusable: list[int] = []
        examples: list[Example] = []
        for seq, record in self._log.records():
            decoded = _decode(record)
            if decoded is None:
                unusable.append(seq)
            else:
                examples.append((seq, *decoded))
        if unusable:
            logger.warning(
                "feedback: deleting %d record(s) with unusable content from %s",
                len(unusable),
                self._log.path,
            )
        if examples:
            width = examples[-1][2].shape[0]
            mismatched = [seq for seq, _, row in examples if row.shape[0] != width]
            if mismatched:
                logger.warning(
                    "feedback: dropping %d examples whose feature count differs from "
                    "the newest examples' %d",
                    len(mismatched),
                    width,
                )
                unusable += mismatched
                examples = [e for e in examples if e[2].shape[0] == width]
        self._examples.extend(examples)
        self._bytes = sum(row.nbytes for _, _, row in examples)
        over = [seq for seq, _, _ in itertools.islice(self._examples, self._overflow())]
        if unusable or over:
            try:
                self._log.change(delete=unusable + over)
            except StateError as exc:  # still in the file: deleted at the next open
                logger.error("feedback: cannot delete records: %s", exc)
        self._forget(len(over))
        if self._examples:
            logger.info(
                "feedback: recovered %d examples from %s", len(self._examples), self._log.path
            )

    # ---------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        """The buffer's directory."""
        return self._dir

    @property
    def path(self) -> Path:
        """The database file."""
        return self._log.path

    @property
    def version(self) -> int:
        """A counter that changes whenever the examples change (for caches)."""
        with self._lock:
            return self._version

    @property
    def dropped(self) -> int:
        """Examples dropped by the bounds since this buffer was opened."""
        with self._lock:
            return self._dropped

    @property
    def num_features(self) -> int | None:
        """The feature count of the examples held, or None when empty."""
        with self._lock:
            return int(self._examples[0][2].shape[0]) if self._examples else None

    @property
    def size_bytes(self) -> int:
        """Bytes of features held."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        """The number of examples held."""
        with self._lock:
            return len(self._examples)

    # ---------------------------------------------------------------- operations

    def add(self, x_row: npt.ArrayLike, label: int) -> None:
        """Store one labelled example (see :meth:`add_many`).

        Args:
            x_row: The features, shape (features,) or (1, features).
            label: The class index.

        Raises:
            InvalidLabelError: ``label`` is not an integer in ``[0, MAX_CLASSES)``.
            DataSourceError: ``x_row`` is not one finite row, or its feature count
                differs from the examples already held.
            StateError: The example cannot be written; it is not stored.
        """
        rows = as_rows(x_row)
        if rows.shape[0] != 1:
            raise DataSourceError(f"add() takes one row, got {rows.shape[0]}")
        self.add_many(rows, [label])

    def add_many(self, rows: npt.ArrayLike, labels: Sequence[int | np.integer[Any]]) -> None:
        """Store labelled examples, all or none, and drop the oldest beyond the bounds.

        Args:
            rows: Features, shape (n, features) (a 1-D array is one row).
            labels: One class index per row.

        Raises:
            InvalidLabelError: A label is not an integer in ``[0, MAX_CLASSES)``, or
                the number of labels differs from the number of rows.
            DataSourceError: The rows are not finite numbers, a row is larger than
                ``max_bytes``, or the feature count differs from the examples
                already held (after a model change, :meth:`clear` the buffer).
            StateError: The examples cannot be written; nothing changed.
        """
        matrix = as_rows(rows)
        checked = check_labels(labels, MAX_CLASSES)
        if len(checked) != matrix.shape[0]:
            raise InvalidLabelError(f"{len(checked)} labels for {matrix.shape[0]} rows")
        row_bytes = matrix.shape[1] * 4
        if row_bytes > self._max_bytes:
            raise DataSourceError(
                f"an example of {row_bytes} bytes does not fit the {self._max_bytes}-byte buffer"
            )
        new = [(label, matrix[i].copy()) for i, label in enumerate(checked)]
        for _, row in new:
            row.setflags(write=False)
        with self._lock:
            if self._examples and self._examples[0][2].shape[0] != matrix.shape[1]:
                raise DataSourceError(
                    f"feedback rows have {matrix.shape[1]} features but the buffer holds "
                    f"examples with {self._examples[0][2].shape[0]}; clear() it after a "
                    "model change"
                )
            drop = self._overflow(len(new), row_bytes)
            drop_held = min(drop, len(self._examples))
            kept = new[drop - drop_held :]  # more new rows than the bounds hold
            seqs = self._log.change(
                append=[_encode(label, row) for label, row in kept],
                delete=[seq for seq, _, _ in itertools.islice(self._examples, drop_held)],
            )
            self._forget(drop_held)
            self._dropped += drop - drop_held
            for seq, (label, row) in zip(seqs, kept, strict=True):
                self._examples.append((seq, label, row))
                self._bytes += row.nbytes
            self._version += 1

    def dataset(self) -> Dataset | None:
        """All examples held, oldest first, or None when there are none."""
        with self._lock:
            if not self._examples:
                return None
            x = np.stack([row for _, _, row in self._examples])
            y = np.fromiter((label for _, label, _ in self._examples), dtype=np.int64)
        return Dataset(x, y)

    def clear(self) -> None:
        """Delete every example (e.g. after a model change of input size).

        Raises:
            StateError: The deletion cannot be written; the examples are kept.
        """
        with self._lock:
            self._log.clear()
            self._examples = deque()
            self._bytes = 0
            self._version += 1

    def close(self) -> None:
        """Close the database (the buffer cannot be used afterwards)."""
        with self._lock:
            self._log.close()

    # ------------------------------------------------------------------- helpers

    def _overflow(self, new_rows: int = 0, row_bytes: int = 0) -> int:
        """How many of the oldest examples (those held, then the new rows) must go
        for the held and ``new_rows`` more of ``row_bytes`` each to fit the bounds."""
        count = len(self._examples) + new_rows
        size = self._bytes + new_rows * row_bytes
        drop = 0
        held = iter(self._examples)
        while count > self._max_examples or size > self._max_bytes:
            oldest = next(held, None)
            size -= row_bytes if oldest is None else oldest[2].nbytes
            count -= 1
            drop += 1
        return drop

    def _forget(self, count: int) -> None:
        """Drop the ``count`` oldest examples from memory (already deleted on disk)."""
        for _ in range(count):
            _, _, row = self._examples.popleft()
            self._bytes -= row.nbytes
        if count:
            self._dropped += count
            logger.debug("feedback: dropped the %d oldest examples (bounds)", count)
