"""The feedback buffer: labelled examples kept on the device for the next rounds.

:class:`FeedbackBuffer` holds the examples that labelled feedback produced
(:mod:`edge_agent.training.feedback` joins predictions and labels; the HTTP API
receives them) and hands them to :class:`~edge_agent.training.data.LocalData` as a
:class:`~edge_agent.training.trainer.Dataset`:

1. ``buffer = FeedbackBuffer(data_dir / "feedback")`` loads what a previous run
   stored;
2. ``buffer.add_many(examples, labels)`` stores examples with class labels, or
   ``buffer.add_targets(examples, targets)`` examples with float targets (a
   regression model's feedback), all or none, and drops the oldest beyond the
   bounds (default at most 10,000 examples and 64 MiB) in the same transaction;
3. ``buffer.dataset(task)`` is every example held, oldest first, for a task.

An example is an input of any shape the served model takes: a row ``(features,)``,
an image ``(1, 28, 28)``, a window ``(channels, steps)``; at most
:data:`MAX_FEATURES` values in at most :data:`MAX_EXAMPLE_DIMS` dimensions. Batches
are ``(n, *example_shape)``; a 1-D batch is one row. What it is labelled with is
either a **class label** (an integer in ``[0, MAX_CLASSES)``; for an anomaly
detector 0 = normal, 1 = anomaly) or **float targets** (one number, or
``outputs`` numbers, per example; at most :data:`MAX_TARGETS`). The buffer holds one
kind at a time, of one example shape and target width: examples that do not fit
those already held are refused with a
:class:`~edge_agent.errors.DataSourceError` (after a model change, :meth:`clear`
it). :meth:`FeedbackBuffer.dataset` builds the dataset of a task: class labels for
``classification``; float targets for ``regression``; for ``reconstruction`` the
inputs of the examples labelled 0 (normal: an autoencoder learns normal data only).
Feedback of the other kind raises :class:`~edge_agent.errors.DataSourceError`.

Storage: :class:`~edge_agent.durable_log.DurableLog`, the agent's one crash-safe
log (``feedback.db`` in the directory; with ``fsync=True``, the default, an example
is on the disk before :meth:`FeedbackBuffer.add_many` returns). One record per
example, little-endian:

* a row with a class label keeps the original format, so an older agent still
  reads it: the label (u32) then the values (float32);
* any other example: the magic ``FBX2``, the kind (u8: 0 label, 1 targets), the
  example's rank (u8), the target width (u16: 0 for a label or one scalar target,
  else the number of targets), each dimension (u32), the label (u32) or the targets
  (float32), then the values (float32).

On open, records whose content is unusable (a label out of range, non-finite or
ragged values, a bad header) or whose layout (kind, example shape, target width)
differs from the newest example's are deleted with a warning. The examples are also
held in memory, for :meth:`FeedbackBuffer.dataset`. The byte bound counts the
values of the inputs and of float targets (labels are not counted).

An agent upgraded in place finds the buffer of its earlier version (the CRC record
file ``feedback.log``): on open, :mod:`edge_agent.legacy_formats` imports its good
records in their order (damaged ones are skipped with a warning, as the old reader
did) and deletes the file once the import committed.

Thread-safe (one lock); not multi-process safe: one agent owns its directory.
"""

from __future__ import annotations

import itertools
import logging
import math
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
from edge_agent.training.feedback_records import (
    MAX_EXAMPLE_DIMS,
    MAX_FEATURES,
    MAX_TARGETS,
    Example,
    FeedbackKind,
    as_examples,
    check_labels,
    check_targets,
    decode_record,
    describe_layout,
    encode_record,
)
from edge_agent.training.model_spec import ModelTask, check_task
from edge_agent.training.trainer import MAX_CLASSES, Dataset

__all__ = [
    "DEFAULT_FEEDBACK_MAX_BYTES",
    "DEFAULT_FEEDBACK_MAX_EXAMPLES",
    "FEEDBACK_FILE",
    "MAX_EXAMPLE_DIMS",
    "MAX_FEATURES",
    "MAX_TARGETS",
    "FeedbackBuffer",
    "FeedbackKind",
    "as_examples",
    "check_labels",
    "check_targets",
]

logger = logging.getLogger(__name__)

DEFAULT_FEEDBACK_MAX_EXAMPLES = 10_000
"""Labelled examples :class:`FeedbackBuffer` keeps by default."""

DEFAULT_FEEDBACK_MAX_BYTES = 64 * 1024 * 1024
"""Bytes of values :class:`FeedbackBuffer` keeps by default."""

FEEDBACK_FILE = "feedback.db"
"""Name of the buffer's database file in its directory."""


class FeedbackBuffer:
    """A bounded, crash-safe on-disk store of labelled examples.

    Args:
        directory: Where ``feedback.db`` lives; created with mode 0o700 (and its
            parents) if missing.
        max_examples: Most examples kept (>= 1); the oldest are dropped.
        max_bytes: Most bytes of values kept (>= 1); the oldest are dropped.
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
        self._bytes = 0  # bytes of values held
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
                    usable=lambda record: decode_record(record) is not None,
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
            decoded = decode_record(record, seq)
            if decoded is None:
                unusable.append(seq)
            else:
                examples.append(decoded)
        if unusable:
            logger.warning(
                "feedback: deleting %d record(s) with unusable content from %s",
                len(unusable),
                self._log.path,
            )
        if examples:
            layout = examples[-1].layout
            mismatched = [e.seq for e in examples if e.layout != layout]
            if mismatched:
                logger.warning(
                    "feedback: dropping %d examples that differ from the newest ones (%s)",
                    len(mismatched),
                    describe_layout(layout),
                )
                unusable += mismatched
                examples = [e for e in examples if e.layout == layout]
        self._examples.extend(examples)
        self._bytes = sum(e.nbytes for e in examples)
        over = [e.seq for e in itertools.islice(self._examples, self._overflow())]
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
    def sample_shape(self) -> tuple[int, ...] | None:
        """The shape of one example held, or None when empty."""
        with self._lock:
            return tuple(self._examples[0].x.shape) if self._examples else None

    @property
    def num_features(self) -> int | None:
        """Values per example held (the feature count of rows), or None when empty."""
        shape = self.sample_shape
        return None if shape is None else math.prod(shape)

    @property
    def kind(self) -> FeedbackKind | None:
        """What the examples held are labelled with, or None when empty."""
        with self._lock:
            return self._examples[0].kind if self._examples else None

    @property
    def size_bytes(self) -> int:
        """Bytes of values held."""
        with self._lock:
            return self._bytes

    def __len__(self) -> int:
        """The number of examples held."""
        with self._lock:
            return len(self._examples)

    # ---------------------------------------------------------------- operations

    def add(self, example: npt.ArrayLike, label: int) -> None:
        """Store one example with its class label (see :meth:`add_many`).

        Args:
            example: One example as a batch of one, ``(1, *shape)``, or a 1-D row.
            label: The class index.

        Raises:
            InvalidLabelError: ``label`` is not an integer in ``[0, MAX_CLASSES)``.
            DataSourceError: ``example`` is not one finite example, or does not fit
                the examples already held.
            StateError: The example cannot be written; it is not stored.
        """
        batch = as_examples(example)
        if batch.shape[0] != 1:
            raise DataSourceError(f"add() takes one example, got {batch.shape[0]}")
        self.add_many(batch, [label])

    def add_many(self, examples: npt.ArrayLike, labels: Sequence[int | np.integer[Any]]) -> None:
        """Store examples with class labels, all or none; drop the oldest beyond the bounds.

        Args:
            examples: Inputs, shape ``(n, *shape)`` (a 1-D array is one row).
            labels: One class index per example.

        Raises:
            InvalidLabelError: A label is not an integer in ``[0, MAX_CLASSES)``, or
                the number of labels differs from the number of examples.
            DataSourceError: The inputs are not finite numbers, an example is larger
                than ``max_bytes``, or the examples do not fit those already held
                (another shape, or float targets: after a model change,
                :meth:`clear` the buffer).
            StateError: The examples cannot be written; nothing changed.
        """
        batch = as_examples(examples)
        checked = check_labels(labels, MAX_CLASSES)
        if len(checked) != batch.shape[0]:
            raise InvalidLabelError(f"{len(checked)} labels for {batch.shape[0]} examples")
        self._store([Example(0, batch[i].copy(), label, None) for i, label in enumerate(checked)])

    def add_targets(self, examples: npt.ArrayLike, targets: object) -> None:
        """Store examples with float targets, all or none (a regression model's feedback).

        Args:
            examples: Inputs, shape ``(n, *shape)`` (a 1-D array is one row).
            targets: One number per example, shape ``(n,)``, or ``outputs`` numbers
                per example, shape ``(n, outputs)`` (see :func:`check_targets`).

        Raises:
            InvalidLabelError: The targets are not finite numbers, one entry per
                example.
            DataSourceError: As :meth:`add_many` (class labels held count as not
                fitting).
            StateError: The examples cannot be written; nothing changed.
        """
        batch = as_examples(examples)
        values = check_targets(targets, batch.shape[0])
        self._store(
            [Example(0, batch[i].copy(), 0, values[i].copy()) for i in range(batch.shape[0])]
        )

    def _store(self, new: list[Example]) -> None:
        """Append ``new`` (of one layout) in one transaction, dropping the oldest."""
        for example in new:
            example.x.setflags(write=False)
            if example.target is not None:
                example.target.setflags(write=False)
        example_bytes = new[0].nbytes
        if example_bytes > self._max_bytes:
            raise DataSourceError(
                f"an example of {example_bytes} bytes does not fit the "
                f"{self._max_bytes}-byte buffer"
            )
        with self._lock:
            if self._examples and self._examples[0].layout != new[0].layout:
                raise DataSourceError(
                    f"the feedback gives {describe_layout(new[0].layout)} but the buffer "
                    f"holds {describe_layout(self._examples[0].layout)}; clear() it after "
                    "a model change"
                )
            drop = self._overflow(len(new), example_bytes)
            drop_held = min(drop, len(self._examples))
            kept = new[drop - drop_held :]  # more new examples than the bounds hold
            seqs = self._log.change(
                append=[encode_record(example) for example in kept],
                delete=[e.seq for e in itertools.islice(self._examples, drop_held)],
            )
            self._forget(drop_held)
            self._dropped += drop - drop_held
            for seq, example in zip(seqs, kept, strict=True):
                self._examples.append(Example(seq, example.x, example.label, example.target))
                self._bytes += example.nbytes
            self._version += 1

    def dataset(self, task: ModelTask = "classification") -> Dataset | None:
        """All examples held that serve ``task``, oldest first; None when there are none.

        ``classification`` takes the class labels, ``regression`` the float targets,
        ``reconstruction`` the inputs of the examples labelled 0 (normal).

        Raises:
            DataSourceError: The examples are labelled for another task (class labels
                for regression, float targets for classification or reconstruction).
            TrainConfigError: ``task`` is not a task.
        """
        task = check_task(task)
        with self._lock:
            examples = list(self._examples)
        if not examples:
            return None
        kind = examples[0].kind
        wanted = "target" if task == "regression" else "label"
        if kind != wanted:
            held = "float targets" if kind == "target" else "class labels"
            needs = (
                'float targets (POST /v1/feedback with "target")'
                if wanted == "target"
                else "class labels"
            )
            raise DataSourceError(f"the feedback holds {held}; {task} needs {needs}")
        if task == "reconstruction":
            examples = [e for e in examples if e.label == 0]
            if not examples:
                return None
            return Dataset.from_arrays(np.stack([e.x for e in examples]), None, task)
        x = np.stack([e.x for e in examples])
        if task == "regression":
            return Dataset(x, np.stack([e.target for e in examples if e.target is not None]), task)
        return Dataset(x, np.fromiter((e.label for e in examples), dtype=np.int64), task)

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

    def _overflow(self, new_examples: int = 0, example_bytes: int = 0) -> int:
        """How many of the oldest examples (those held, then the new ones) must go
        for the held and ``new_examples`` more of ``example_bytes`` each to fit the
        bounds."""
        count = len(self._examples) + new_examples
        size = self._bytes + new_examples * example_bytes
        drop = 0
        held = iter(self._examples)
        while count > self._max_examples or size > self._max_bytes:
            oldest = next(held, None)
            size -= example_bytes if oldest is None else oldest.nbytes
            count -= 1
            drop += 1
        return drop

    def _forget(self, count: int) -> None:
        """Drop the ``count`` oldest examples from memory (already deleted on disk)."""
        for _ in range(count):
            self._bytes -= self._examples.popleft().nbytes
        if count:
            self._dropped += count
            logger.debug("feedback: dropped the %d oldest examples (bounds)", count)
