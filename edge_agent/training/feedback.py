"""Labelled feedback: learn from predictions whose true label arrives later.

An application asks the agent for a prediction, acts on it, and later learns what
the right answer was (the user corrected it, the event happened or did not). It
posts that label with the prediction's id, and the example becomes local training
data for the next federated round. Three pieces:

1. :class:`PredictionLog` remembers the input rows of the last ``capacity``
   predictions (default 1024, bounded in bytes too), in memory only: the agent
   calls :meth:`PredictionLog.record` after each successful prediction, from
   whichever HTTP thread served it.
2. :class:`FeedbackBuffer` keeps labelled examples on disk (default at most 10,000
   and 64 MiB of features; the oldest are dropped beyond either bound) and hands
   them to :class:`~edge_agent.training.data.LocalData` as a
   :class:`~edge_agent.training.trainer.Dataset`.
3. :class:`FeedbackCollector` joins them: :meth:`FeedbackCollector.record_feedback`
   looks the prediction up, checks the label(s), stores the labelled rows and
   forgets the prediction (each prediction is labelled at most once). An unknown,
   expired or already labelled id raises
   :class:`~edge_agent.errors.UnknownPredictionError`; a label that is not an
   integer in ``[0, num_classes)``, or a label count that does not match the
   prediction's rows, raises :class:`~edge_agent.errors.InvalidLabelError`.

On-disk format of the buffer: one append-only file ``feedback.log`` in its
directory (mode 0o600). Each example is one record::

    magic "FBK1" | payload length (u32, big-endian) | CRC-32 of payload (u32, BE)
    payload = label (u32, little-endian) | features (float32, little-endian)

:meth:`FeedbackBuffer.add` appends the records of one call in a single write,
flushes and (by default) ``fsync``s before the examples count as stored. A crash
mid-write leaves a truncated last record; a damaged disk block leaves a record
whose CRC does not match. On open, such records are skipped with a warning (the
reader resynchronises on the next magic), and the file is rewritten with the good
records only. Dropping the oldest examples does not touch the file at once: when
it holds a quarter more than the bounds, it is compacted, i.e. rewritten whole
with :func:`compress.fileio.atomic_write` (temporary file, ``fsync``, rename), so
a crash during compaction leaves the old file or the new one, never a mix. A
failed append is cut back off the file (or, if even that fails, the next write
rewrites the file whole), so one bad write never hides later records.

All three classes are thread-safe (one lock each); the buffer is not
multi-process safe: one agent owns its directory.
"""

from __future__ import annotations

import logging
import os
import re
import struct
import threading
import zlib
from collections import OrderedDict, deque
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from compress.fileio import atomic_write, fsync_directory
from edge_agent.errors import (
    ConfigError,
    DataSourceError,
    InvalidLabelError,
    StateError,
    TrainingError,
    UnknownPredictionError,
)
from edge_agent.training.trainer import MAX_CLASSES, Dataset, FloatArray

__all__ = [
    "DEFAULT_FEEDBACK_MAX_BYTES",
    "DEFAULT_FEEDBACK_MAX_EXAMPLES",
    "DEFAULT_LOG_CAPACITY",
    "DEFAULT_LOG_MAX_BYTES",
    "FEEDBACK_FILE",
    "MAX_FEATURES",
    "MAX_ROWS_PER_PREDICTION",
    "RECORD_HEADER_BYTES",
    "FeedbackBuffer",
    "FeedbackCollector",
    "PredictionLog",
]

logger = logging.getLogger(__name__)

DEFAULT_LOG_CAPACITY = 1024
"""Predictions :class:`PredictionLog` remembers by default."""

DEFAULT_LOG_MAX_BYTES = 16 * 1024 * 1024
"""Bytes of input rows :class:`PredictionLog` holds by default."""

MAX_ROWS_PER_PREDICTION = 256
"""Default most rows of one prediction the log keeps (bigger batches are not kept)."""

MAX_FEATURES = 65536
"""Most features of one example (one record is at most 256 KiB of features)."""

DEFAULT_FEEDBACK_MAX_EXAMPLES = 10_000
"""Labelled examples :class:`FeedbackBuffer` keeps by default."""

DEFAULT_FEEDBACK_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of features :class:`FeedbackBuffer` keeps by default."""

FEEDBACK_FILE = "feedback.log"
"""Name of the buffer's record file in its directory."""

_MAGIC = b"FBK1"
_HEADER = struct.Struct(">4sII")
RECORD_HEADER_BYTES = _HEADER.size
"""Bytes in front of each record's payload."""
_LABEL = struct.Struct("<I")
_MAX_PAYLOAD = _LABEL.size + 4 * MAX_FEATURES
_RECORD_OVERHEAD = RECORD_HEADER_BYTES + _LABEL.size
_ID_RE = re.compile(r"[A-Za-z0-9_.:-]{1,128}")
# atomic_write's temporary files: ".<final name>.<random>.tmp".
_TMP_RE = re.compile(rf"\.{re.escape(FEEDBACK_FILE)}\..+\.tmp", re.DOTALL)


def _check_id(prediction_id: object) -> str:
    if not isinstance(prediction_id, str) or not _ID_RE.fullmatch(prediction_id):
        shown = prediction_id[:80] if isinstance(prediction_id, str) else prediction_id
        raise UnknownPredictionError(
            f"invalid prediction id {shown!r}: expected 1-128 of [A-Za-z0-9_.:-]"
        )
    return prediction_id


def _as_rows(inputs: npt.ArrayLike) -> FloatArray:
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


# ------------------------------------------------------------------ prediction log


class PredictionLog:
    """The input rows of the most recent predictions, by prediction id (in memory).

    Args:
        capacity: Most predictions remembered (>= 1); the oldest are forgotten.
        max_bytes: Most bytes of rows held (>= 1); the oldest are forgotten.
        max_rows: Predictions with more rows than this are not remembered.

    Raises:
        ConfigError: A bound is below 1.
    """

    def __init__(
        self,
        capacity: int = DEFAULT_LOG_CAPACITY,
        *,
        max_bytes: int = DEFAULT_LOG_MAX_BYTES,
        max_rows: int = MAX_ROWS_PER_PREDICTION,
    ) -> None:
        if capacity < 1 or max_bytes < 1 or max_rows < 1:
            raise ConfigError(
                f"prediction log bounds must be >= 1, got capacity={capacity} "
                f"max_bytes={max_bytes} max_rows={max_rows}"
            )
        self._capacity = capacity
        self._max_bytes = max_bytes
        self._max_rows = max_rows
        self._lock = threading.Lock()
        self._rows: OrderedDict[str, FloatArray] = OrderedDict()
        self._bytes = 0

    def __len__(self) -> int:
        """The number of predictions remembered."""
        with self._lock:
            return len(self._rows)

    def __contains__(self, prediction_id: object) -> bool:
        """Whether ``prediction_id`` is remembered."""
        with self._lock:
            return prediction_id in self._rows

    @property
    def size_bytes(self) -> int:
        """Bytes of rows held."""
        with self._lock:
            return self._bytes

    def record(self, prediction_id: str, inputs: npt.ArrayLike) -> bool:
        """Remember the inputs of prediction ``prediction_id`` (a copy, float32).

        A 1-D input is one row; an input of more dimensions is flattened to one
        row per entry of its first axis. Inputs that could never become training
        examples (non-finite, non-numeric, too many rows or bytes) are not kept,
        which is logged at debug level: recording never fails a prediction.
        Recording an id again replaces its rows.

        Args:
            prediction_id: The prediction's id (1-128 of ``[A-Za-z0-9_.:-]``).
            inputs: The rows the model was given.

        Returns:
            Whether the rows were kept.

        Raises:
            UnknownPredictionError: ``prediction_id`` is not a valid id.
        """
        _check_id(prediction_id)
        try:
            rows = _as_rows(inputs)
        except DataSourceError as exc:
            logger.debug("prediction log: not keeping %s: %s", prediction_id, exc)
            return False
        if rows.shape[0] > self._max_rows or rows.nbytes > self._max_bytes:
            logger.debug(
                "prediction log: not keeping %s: %d rows, %d bytes is over the bounds",
                prediction_id,
                rows.shape[0],
                rows.nbytes,
            )
            return False
        with self._lock:
            self._discard(prediction_id)
            while self._rows and (
                len(self._rows) >= self._capacity or self._bytes + rows.nbytes > self._max_bytes
            ):
                oldest = next(iter(self._rows))
                self._discard(oldest)
            self._rows[prediction_id] = rows
            self._bytes += rows.nbytes
        return True

    def get(self, prediction_id: str) -> FloatArray | None:
        """The rows of ``prediction_id`` (read-only), or None if not remembered."""
        with self._lock:
            return self._rows.get(prediction_id)

    def pop(self, prediction_id: str) -> FloatArray | None:
        """Forget ``prediction_id``; return its rows, or None if not remembered."""
        with self._lock:
            return self._discard(prediction_id)

    def _discard(self, prediction_id: str) -> FloatArray | None:
        rows = self._rows.pop(prediction_id, None)
        if rows is not None:
            self._bytes -= rows.nbytes
        return rows


# ------------------------------------------------------------------ feedback buffer


def _encode(label: int, row: FloatArray) -> bytes:
    payload = _LABEL.pack(label) + row.astype("<f4", copy=False).tobytes()
    return _HEADER.pack(_MAGIC, len(payload), zlib.crc32(payload)) + payload


def _decode_one(blob: bytes, pos: int) -> tuple[int, tuple[int, FloatArray] | None] | None:
    """Parse the record at ``pos``.

    Returns:
        None when no well-formed record starts there (bad magic or length, cut
        short, CRC mismatch); otherwise the offset after it and the example, or
        None for a well-formed record whose content is unusable (label out of
        range, non-finite features).
    """
    if len(blob) - pos < RECORD_HEADER_BYTES:
        return None
    magic, length, crc = _HEADER.unpack_from(blob, pos)
    start = pos + RECORD_HEADER_BYTES
    end = start + length
    if (
        magic != _MAGIC
        or not _LABEL.size < length <= _MAX_PAYLOAD
        or (length - _LABEL.size) % 4
        or end > len(blob)
        or zlib.crc32(blob[start:end]) != crc
    ):
        return None
    (label,) = _LABEL.unpack_from(blob, start)
    row = np.frombuffer(blob[start + _LABEL.size : end], dtype="<f4").astype(np.float32)
    if label >= MAX_CLASSES or not np.isfinite(row).all():
        return end, None
    row.setflags(write=False)
    return end, (int(label), row)


def _decode_all(blob: bytes) -> tuple[list[tuple[int, FloatArray]], int]:
    """Parse every record; return the good examples and the number of bad spots.

    After a damaged region the reader resynchronises on the next magic; a record
    found there counts only if its length and CRC check out.
    """
    records: list[tuple[int, FloatArray]] = []
    damaged = 0
    pos = 0
    while pos < len(blob):
        parsed = _decode_one(blob, pos)
        if parsed is None:
            damaged += 1
            found = blob.find(_MAGIC, pos + 1)
            if found < 0:
                break
            pos = found
            continue
        pos, record = parsed
        if record is None:
            damaged += 1
        else:
            records.append(record)
    return records, damaged


class FeedbackBuffer:
    """A bounded, crash-safe on-disk store of labelled examples.

    Args:
        directory: Where ``feedback.log`` lives; created with mode 0o700 (and its
            parents) if missing.
        max_examples: Most examples kept (>= 1); the oldest are dropped.
        max_bytes: Most bytes of features kept (>= 1); the oldest are dropped.
        fsync: Flush each write to the disk before :meth:`add` returns (turn off
            only where durability does not matter, e.g. simulations).

    Raises:
        ConfigError: A bound is below 1.
        StateError: The directory cannot be created or read, or a damaged file
            cannot be rewritten.
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
        self._path = self._dir / FEEDBACK_FILE
        self._max_examples = max_examples
        self._max_bytes = max_bytes
        self._fsync = fsync
        self._lock = threading.Lock()
        self._examples: deque[tuple[int, FloatArray]] = deque()
        self._bytes = 0  # feature bytes held in memory
        self._file_records = 0  # records in the file (kept or already dropped)
        self._file_bytes = 0  # the file's length up to its last good record
        self._rewrite_needed = False
        self._version = 0
        self._dropped = 0
        try:
            self._dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        except OSError as exc:
            raise StateError(f"{self._dir}: cannot create feedback directory: {exc}") from exc
        self._recover()

    # ------------------------------------------------------------------ recovery

    def _read_limit(self) -> int:
        return 2 * (self._max_bytes + self._max_examples * _RECORD_OVERHEAD) + 2 * (
            RECORD_HEADER_BYTES + _MAX_PAYLOAD
        )

    def _read_file(self) -> tuple[bytes, int]:
        """Delete crash leftovers; read the record file (its last bytes if oversized).

        Returns:
            The bytes read and how many leading bytes were skipped.

        Raises:
            StateError: The directory or the file cannot be read.
        """
        try:
            for path in self._dir.iterdir():
                if _TMP_RE.fullmatch(path.name):
                    logger.info("feedback: deleting %s, left over from an interrupted write", path)
                    path.unlink(missing_ok=True)
            with self._path.open("rb") as stream:
                size = os.fstat(stream.fileno()).st_size
                limit = self._read_limit()
                skipped = max(0, size - limit)
                if skipped:
                    logger.warning(
                        "feedback: %s is %d bytes, more than its bounds allow; reading the last %d",
                        self._path,
                        size,
                        limit,
                    )
                    stream.seek(skipped)
                return stream.read(limit), skipped
        except FileNotFoundError:
            return b"", 0
        except OSError as exc:
            raise StateError(f"{self._path}: cannot read feedback: {exc}") from exc

    def _recover(self) -> None:
        """Load the good records of the file, skip damaged ones, rewrite if needed."""
        blob, skipped = self._read_file()
        if not blob and not skipped:
            return
        records, damaged = _decode_all(blob)
        if damaged:
            logger.warning(
                "feedback: skipped %d damaged or truncated region(s) of %s; kept %d examples",
                damaged,
                self._path,
                len(records),
            )
        if records:
            width = records[-1][1].shape[0]
            mismatched = sum(1 for _, row in records if row.shape[0] != width)
            if mismatched:
                logger.warning(
                    "feedback: dropping %d examples whose feature count differs from "
                    "the newest examples' %d",
                    mismatched,
                    width,
                )
                records = [r for r in records if r[1].shape[0] == width]
        for record in records:
            self._examples.append(record)
            self._bytes += record[1].nbytes
        self._file_records = len(records)
        self._file_bytes = len(blob)
        self._trim()
        if damaged or skipped or len(self._examples) < len(records):
            try:
                self._rewrite()
            except StateError as exc:  # keep what was read; the next add rewrites
                logger.error("feedback: cannot rewrite the recovered file: %s", exc)
        if self._examples:
            logger.info("feedback: recovered %d examples from %s", len(self._examples), self._path)

    # ---------------------------------------------------------------- properties

    @property
    def directory(self) -> Path:
        """The buffer's directory."""
        return self._dir

    @property
    def path(self) -> Path:
        """The record file."""
        return self._path

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
            return int(self._examples[0][1].shape[0]) if self._examples else None

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
        rows = _as_rows(x_row)
        if rows.shape[0] != 1:
            raise DataSourceError(f"add() takes one row, got {rows.shape[0]}")
        self.add_many(rows, [label])

    def add_many(self, rows: npt.ArrayLike, labels: Sequence[int | np.integer[Any]]) -> None:
        """Store labelled examples, all or none, then drop the oldest beyond the bounds.

        Args:
            rows: Features, shape (n, features) (a 1-D array is one row).
            labels: One class index per row.

        Raises:
            InvalidLabelError: A label is not an integer in ``[0, MAX_CLASSES)``, or
                the number of labels differs from the number of rows.
            DataSourceError: The rows are not finite numbers, a row is larger than
                ``max_bytes``, or the feature count differs from the examples
                already held (after a model change, :meth:`clear` the buffer).
            StateError: The examples cannot be written; none is stored.
        """
        matrix = _as_rows(rows)
        checked = _check_labels(labels, MAX_CLASSES)
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
            if self._examples and self._examples[0][1].shape[0] != matrix.shape[1]:
                raise DataSourceError(
                    f"feedback rows have {matrix.shape[1]} features but the buffer holds "
                    f"examples with {self._examples[0][1].shape[0]}; clear() it after a "
                    "model change"
                )
            if self._rewrite_needed:
                self._rewrite(extra=new)
            else:
                self._append(new)
            for record in new:
                self._examples.append(record)
                self._bytes += record[1].nbytes
            self._version += 1
            self._trim()
            if self._file_is_oversized(row_bytes):
                try:
                    self._rewrite()
                except StateError as exc:  # the examples are stored; compaction can wait
                    logger.error("feedback: compaction failed: %s", exc)

    def dataset(self) -> Dataset | None:
        """All examples held, oldest first, or None when there are none."""
        with self._lock:
            if not self._examples:
                return None
            x = np.stack([row for _, row in self._examples])
            y = np.fromiter((label for label, _ in self._examples), dtype=np.int64)
        return Dataset(x, y)

    def clear(self) -> None:
        """Delete every example (e.g. after a model change of input size).

        Raises:
            StateError: The file cannot be rewritten.
        """
        with self._lock:
            kept = (self._examples, self._bytes)
            self._examples = deque()
            self._bytes = 0
            try:
                self._rewrite()
            except StateError:
                self._examples, self._bytes = kept
                raise
            self._version += 1

    # ------------------------------------------------------------------- helpers

    def _trim(self) -> None:
        """Drop the oldest examples beyond the bounds (memory only; compaction later)."""
        dropped = 0
        while self._examples and (
            len(self._examples) > self._max_examples or self._bytes > self._max_bytes
        ):
            _, row = self._examples.popleft()
            self._bytes -= row.nbytes
            dropped += 1
        if dropped:
            self._dropped += dropped
            logger.debug("feedback: dropped the %d oldest examples (bounds)", dropped)

    def _file_is_oversized(self, row_bytes: int) -> bool:
        """Whether the file holds a quarter more than the bounds (plus 16 records)."""
        slack_records = 16
        return self._file_records > self._max_examples * 5 // 4 + slack_records or (
            self._file_bytes
            > (self._max_bytes + self._max_examples * _RECORD_OVERHEAD) * 5 // 4
            + slack_records * (_RECORD_OVERHEAD + row_bytes)
        )

    def _append(self, records: Sequence[tuple[int, FloatArray]]) -> None:
        """Append ``records`` to the file in one write (cut back off on failure).

        Raises:
            StateError: The file cannot be opened or written.
        """
        blob = b"".join(_encode(label, row) for label, row in records)
        existed = self._path.exists()
        try:
            fd = os.open(self._path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
        except OSError as exc:
            raise StateError(f"{self._path}: cannot open feedback file: {exc}") from exc
        try:
            written = 0
            view = memoryview(blob)
            while written < len(blob):
                written += os.write(fd, view[written:])
            if self._fsync:
                os.fsync(fd)
        except OSError as exc:
            self._cut_back(fd)
            raise StateError(f"{self._path}: cannot write feedback: {exc}") from exc
        finally:
            os.close(fd)
        if not existed and self._fsync:
            fsync_directory(self._dir)
        self._file_records += len(records)
        self._file_bytes += len(blob)

    def _cut_back(self, fd: int) -> None:
        """Remove a partial append; if that fails too, rewrite the file next time."""
        try:
            os.ftruncate(fd, self._file_bytes)
        except OSError as exc:
            logger.error("feedback: cannot cut a failed write off %s: %s", self._path, exc)
            self._rewrite_needed = True

    def _rewrite(self, extra: Sequence[tuple[int, FloatArray]] = ()) -> None:
        """Replace the file with the examples held (plus ``extra``), atomically.

        Raises:
            StateError: The file cannot be written; the old one is left as it was.
        """
        records = [*self._examples, *extra]
        blob = b"".join(_encode(label, row) for label, row in records)
        try:
            atomic_write(self._path, blob, mode=0o600)
        except OSError as exc:
            self._rewrite_needed = True
            raise StateError(f"{self._path}: cannot rewrite feedback file: {exc}") from exc
        self._rewrite_needed = False
        self._file_records = len(records)
        self._file_bytes = len(blob)


# ------------------------------------------------------------------ labels, collector


def _check_labels(labels: object, bound: int) -> list[int]:
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


class FeedbackCollector:
    """Turns (prediction id, true label) reports into stored training examples.

    Args:
        log: Where the agent records each prediction's inputs.
        buffer: Where labelled examples are stored.
        num_classes: Labels must be below this (default :data:`MAX_CLASSES`);
            :meth:`record_feedback` can narrow it per call (the installed model's
            class count).

    Raises:
        ConfigError: ``num_classes`` is not in ``[1, MAX_CLASSES]``.
    """

    def __init__(
        self, log: PredictionLog, buffer: FeedbackBuffer, *, num_classes: int = MAX_CLASSES
    ) -> None:
        if not 1 <= num_classes <= MAX_CLASSES:
            raise ConfigError(f"num_classes must be in [1, {MAX_CLASSES}], got {num_classes}")
        self._log = log
        self._buffer = buffer
        self._num_classes = num_classes
        self._lock = threading.Lock()

    @property
    def log(self) -> PredictionLog:
        """The prediction log."""
        return self._log

    @property
    def buffer(self) -> FeedbackBuffer:
        """The labelled-example buffer."""
        return self._buffer

    def remember(self, prediction_id: str, inputs: npt.ArrayLike) -> bool:
        """Record a prediction's inputs (see :meth:`PredictionLog.record`).

        Returns:
            Whether they were kept.

        Raises:
            UnknownPredictionError: ``prediction_id`` is not a valid id.
        """
        return self._log.record(prediction_id, inputs)

    def record_feedback(
        self,
        prediction_id: str,
        label: int | np.integer[Any] | Sequence[int | np.integer[Any]],
        *,
        num_classes: int | None = None,
    ) -> int:
        """Store the true label(s) of prediction ``prediction_id`` as training examples.

        A one-row prediction takes one label (an int, or a list of one); a
        prediction of several rows takes a list with one label per row. Once
        stored, the prediction is forgotten, so a second report for the same id is
        refused; when storing fails, it stays in the log and the report can be
        retried.

        Args:
            prediction_id: The id the prediction was answered with.
            label: The true class index, or one per row.
            num_classes: Labels must be below this (default: the collector's).

        Returns:
            The number of examples stored.

        Raises:
            UnknownPredictionError: The id is malformed, was never recorded, has been
                forgotten (the log keeps only recent predictions), or was already
                labelled.
            InvalidLabelError: A label is not an integer in ``[0, num_classes)``, or
                the number of labels does not match the prediction's rows.
            DataSourceError: The rows do not fit the examples already stored (a
                different feature count).
            StateError: The examples cannot be written.
        """
        _check_id(prediction_id)
        bound = self._num_classes if num_classes is None else num_classes
        if isinstance(bound, bool) or not isinstance(bound, int) or not 1 <= bound <= MAX_CLASSES:
            raise TrainingError(f"num_classes must be in [1, {MAX_CLASSES}], got {bound!r}")
        with self._lock:
            rows = self._log.get(prediction_id)
            if rows is None:
                raise UnknownPredictionError(
                    f"prediction {prediction_id} is unknown, too old (only the last "
                    "predictions are remembered) or already labelled"
                )
            n_rows = int(rows.shape[0])
            if isinstance(label, int | np.integer) and not isinstance(label, bool | np.bool_):
                if n_rows != 1:
                    raise InvalidLabelError(
                        f"prediction {prediction_id} has {n_rows} rows: give a list of "
                        f"{n_rows} labels, one per row"
                    )
                labels = _check_labels([label], bound)
            else:
                labels = _check_labels(label, bound)
                if len(labels) != n_rows:
                    raise InvalidLabelError(
                        f"prediction {prediction_id} has {n_rows} row(s) but "
                        f"{len(labels)} label(s) were given"
                    )
            self._buffer.add_many(rows, labels)
            self._log.pop(prediction_id)
        logger.debug("feedback: stored %d example(s) from %s", n_rows, prediction_id)
        return n_rows
