"""Local training data: files in a directory plus labelled feedback, as one Dataset.

A device's examples come from up to three sources, loaded by :class:`LocalData`
into one :class:`~edge_agent.training.trainer.Dataset` for a task
(``classification``, ``regression`` or ``reconstruction``):

* ``*.npz`` files in the data directory, each with an array ``x`` of shape
  ``(n, ...)``: rows ``(n, features)``, images ``(n, 1, 28, 28)``, sensor windows
  ``(n, channels, steps)``; and an array ``y``: class indices (n,) for
  classification, float targets (n,) or (n, outputs) for regression. ``y`` is
  required for those two tasks; reconstruction (anomaly detection) ignores it, so
  a file of normal examples may hold ``x`` alone. Other arrays are ignored. They
  are read with :func:`compress.fileio.load_npz`, which bounds both the file and
  what it unpacks to and never unpickles.
* ``*.csv`` files in the same directory: rows of comma-separated numbers, one
  example per line. For classification and regression the **last** column is the
  label or target and the others are the features; for reconstruction **every**
  column is a feature (a CSV of normal readings needs no label column). The first
  non-blank line is a header (and skipped) when its last field is not a number (so
  a data row with a typo in a feature is an error, not a header); blank lines and
  lines starting with ``#`` are ignored. Parsed by :func:`numpy.loadtxt`.
* a :class:`~edge_agent.training.feedback.FeedbackBuffer` of labelled feedback,
  as :meth:`~edge_agent.training.feedback.FeedbackBuffer.dataset` gives it for the
  task.

Files are taken in name order (hidden files, sub-directories and other suffixes
are ignored), then the feedback, so the same files give the same dataset. Every
file is bounded by ``max_file_bytes`` and all loaded arrays together by
``max_total_bytes``. All files must have the same example shape (and, for
regression, the same number of targets): a file that differs is an error naming
both files. Feedback that does not fit the files (the served model takes another
input shape than the data was collected for, or its feedback is for another task)
is left out with a warning: it cannot be trained on with these files, and refusing
the whole data set for it would stop the device from training at all.

Workflow::

    data = LocalData(Path("/var/lib/fedge-agent/training"), feedback=buffer)
    train, test = data.split(holdout_fraction=0.2, seed=config.seed, task="regression")
    data.describe()        # counts for the agent's status, never raw data

:meth:`LocalData.load` caches the dataset of the last task loaded and reloads when
that task changes, a file is added, removed or changed (name, size or mtime) or the
feedback changes. :meth:`LocalData.describe` reports the task last loaded; before
any, it only counts the examples (a device announces its data before it knows what
it will train). Problems raise :class:`~edge_agent.errors.DataSourceError` naming
the file; having no examples at all raises its subclass
:class:`~edge_agent.errors.NoDataError`.
"""

from __future__ import annotations

import io
import logging
import re
import stat
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from compress.fileio import load_npz, read_bounded
from edge_agent.errors import AgentError, ConfigError, DataSourceError, NoDataError
from edge_agent.training.feedback import FeedbackBuffer
from edge_agent.training.model_spec import ModelTask, check_task
from edge_agent.training.trainer import Dataset

__all__ = [
    "DATA_SUFFIXES",
    "DEFAULT_MAX_FILE_BYTES",
    "DEFAULT_MAX_TOTAL_BYTES",
    "LocalData",
    "SourceInfo",
    "load_csv_dataset",
    "load_npz_dataset",
]

logger = logging.getLogger(__name__)

DEFAULT_MAX_FILE_BYTES = 32 * 1024 * 1024
"""Largest data file :class:`LocalData` reads by default (and most it unpacks to)."""

DEFAULT_MAX_TOTAL_BYTES = 256 * 1024 * 1024
"""Most bytes of arrays :class:`LocalData` loads from all sources together by default."""

DATA_SUFFIXES = (".npz", ".csv")
"""Suffixes of the files :class:`LocalData` reads (case-insensitive)."""

_CONTENT_LINE_RE = re.compile(r"^[ \t]*([^\s#][^\r\n]*)", re.MULTILINE)

_Y_MEANING = {"classification": "class labels", "regression": "float targets"}


@dataclass(frozen=True)
class SourceInfo:
    """One source of examples, as reported by :meth:`LocalData.describe`.

    Attributes:
        name: The file name (or ``"feedback"``).
        kind: ``"npz"``, ``"csv"`` or ``"feedback"``.
        examples: Examples it contributed.
    """

    name: str
    kind: Literal["npz", "csv", "feedback"]
    examples: int


def _dataset(path: Path, x: npt.ArrayLike, y: npt.ArrayLike | None, task: ModelTask) -> Dataset:
    try:
        return Dataset.from_arrays(x, y, task)
    except DataSourceError as exc:
        raise DataSourceError(f"{path}: {exc}") from exc


def _npz_arrays(path: Path, max_bytes: int) -> tuple[npt.NDArray[Any], npt.NDArray[Any] | None]:
    """The arrays ``x`` and ``y`` (None when absent) of an ``.npz`` file.

    Raises:
        DataSourceError: The file is missing, too large, not a readable ``.npz``, or
            has no ``x``.
    """
    arrays = load_npz(path, max_bytes=max_bytes, error=DataSourceError, what="training data file")
    if "x" not in arrays:
        raise DataSourceError(
            f"{path}: a training data file needs an array 'x' of examples; missing x "
            f"(found {', '.join(sorted(arrays)) or 'none'})"
        )
    extra = sorted(set(arrays) - {"x", "y"})
    if extra:
        logger.debug("training data: %s: ignoring arrays %s", path, extra)
    return arrays["x"], arrays.get("y")


def load_npz_dataset(
    path: Path, *, task: ModelTask = "classification", max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> Dataset:
    """Read the examples of an ``.npz`` file for ``task`` (see the module docstring).

    Args:
        path: The file.
        task: What the examples are for; ``y`` is required unless
            ``reconstruction`` (which ignores it).
        max_bytes: Most bytes of the file, and of the arrays it unpacks to.

    Returns:
        The examples.

    Raises:
        DataSourceError: The file is missing, too large, not a readable ``.npz``,
            lacks ``x`` (or ``y`` when the task needs it), or holds arrays that do not
            form a dataset for the task.
        TrainConfigError: ``task`` is not a task.
    """
    task = check_task(task)
    x, y = _npz_arrays(path, max_bytes)
    if task == "reconstruction":
        y = None
    elif y is None:
        raise DataSourceError(
            f"{path}: missing y: {task} needs an array 'y' of {_Y_MEANING[task]} "
            "beside 'x' (only reconstruction trains on 'x' alone)"
        )
    return _dataset(path, x, y, task)


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _csv_table(path: Path, max_bytes: int) -> tuple[npt.NDArray[np.float64] | None, int] | None:
    """The data rows of a CSV file and its column count.

    Returns:
        None when the file holds neither rows nor a header; ``(None, columns)`` for a
        header alone; else ``(table, columns)``.

    Raises:
        DataSourceError: See :func:`load_csv_dataset`.
    """
    data = read_bounded(path, max_bytes=max_bytes, error=DataSourceError, what="CSV data file")
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise DataSourceError(f"{path}: not a UTF-8 text file: {exc.reason}") from exc
    del data
    first = _CONTENT_LINE_RE.search(text)
    if first is None:
        return None
    header_fields = first.group(1).split(",")
    has_header = not _is_number(header_fields[-1].strip())
    body = text[first.end() :] if has_header else text[first.start() :]
    del text
    if _CONTENT_LINE_RE.search(body) is None:
        return (None, len(header_fields)) if has_header else None
    try:
        table = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        where = " (rows counted from the first line after the header)" if has_header else ""
        raise DataSourceError(f"{path}: malformed CSV: {exc}{where}") from exc
    if has_header and len(header_fields) != table.shape[1]:
        raise DataSourceError(
            f"{path}: the header has {len(header_fields)} columns but the rows have "
            f"{table.shape[1]}"
        )
    return table, int(table.shape[1])


def load_csv_dataset(
    path: Path, *, task: ModelTask = "classification", max_bytes: int = DEFAULT_MAX_FILE_BYTES
) -> Dataset | None:
    """Read the examples of a CSV file for ``task`` (see the module docstring).

    For classification and regression the last column is the label or target; for
    reconstruction every column is a feature. The first non-blank, non-comment line
    is a header when its last field is not a number. Blank lines and ``#`` comments
    are skipped.

    Args:
        path: The file (UTF-8, optionally with a byte-order mark).
        task: What the examples are for.
        max_bytes: Most bytes of the file.

    Returns:
        The examples, or None when the file holds no data rows and no header to
        tell its column count.

    Raises:
        DataSourceError: The file is missing, too large, not UTF-8, has rows of
            different lengths, too few columns (two, features then the label, unless
            reconstruction), a value that is not a number, a label or target that
            does not fit the task, or non-finite values.
        TrainConfigError: ``task`` is not a task.
    """
    task = check_task(task)
    read = _csv_table(path, max_bytes)
    if read is None:
        return None
    table, columns = read
    labelled = task != "reconstruction"
    if labelled and columns < 2:
        raise DataSourceError(
            f"{path}: {task} needs at least two columns (features, then the "
            f"{'label' if task == 'classification' else 'target'}), got {columns}"
        )
    width = columns - 1 if labelled else columns
    if table is None:
        return Dataset.empty(width, task)
    y = table[:, -1].copy() if labelled else None
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
        features = table[:, :width].astype(np.float32)
    del table
    if not np.isfinite(features).all():
        raise DataSourceError(f"{path}: features contain NaN, infinity or values beyond float32")
    return _dataset(path, features, y, task)


def _shape_text(shape: tuple[int, ...]) -> str:
    return f"{shape[0]} features" if len(shape) == 1 else f"examples of shape {shape}"


class LocalData:
    """The device's local training examples, from files and feedback, as one Dataset.

    Args:
        directory: The directory of ``.npz`` / ``.csv`` files, or None for
            feedback only. It must exist when data is loaded.
        feedback: Labelled feedback to include, if any.
        max_file_bytes: Largest file read (and most an ``.npz`` unpacks to).
        max_total_bytes: Most bytes of arrays loaded from all sources together.

    Raises:
        ConfigError: A bound is below 1.
    """

    def __init__(
        self,
        directory: Path | None,
        *,
        feedback: FeedbackBuffer | None = None,
        max_file_bytes: int = DEFAULT_MAX_FILE_BYTES,
        max_total_bytes: int = DEFAULT_MAX_TOTAL_BYTES,
    ) -> None:
        if max_file_bytes < 1 or max_total_bytes < 1:
            raise ConfigError(
                f"data bounds must be >= 1, got max_file_bytes={max_file_bytes} "
                f"max_total_bytes={max_total_bytes}"
            )
        self._dir = None if directory is None else Path(directory)
        self._feedback = feedback
        self._max_file_bytes = max_file_bytes
        self._max_total_bytes = max_total_bytes
        self._lock = threading.Lock()
        self._key: tuple[Any, ...] | None = None  # (signature, task) of the cached dataset
        self._cached: Dataset | None = None
        self._sources: tuple[SourceInfo, ...] = ()
        self._task: ModelTask | None = None  # the task last loaded
        self._counted: tuple[tuple[Any, ...], tuple[SourceInfo, ...]] | None = None

    @property
    def directory(self) -> Path | None:
        """The data directory, if any."""
        return self._dir

    # ------------------------------------------------------------------ loading

    def _list_files(self) -> list[tuple[Path, int, int]]:
        """Data files in name order with their size and mtime (ns).

        Raises:
            DataSourceError: The directory is missing or unreadable.
        """
        if self._dir is None:
            return []
        try:
            entries = sorted(self._dir.iterdir())
        except FileNotFoundError as exc:
            raise DataSourceError(f"{self._dir}: training data directory does not exist") from exc
        except NotADirectoryError as exc:
            raise DataSourceError(f"{self._dir}: not a directory") from exc
        except OSError as exc:
            raise DataSourceError(f"{self._dir}: cannot list training data: {exc}") from exc
        files: list[tuple[Path, int, int]] = []
        for path in entries:
            if path.name.startswith(".") or path.suffix.lower() not in DATA_SUFFIXES:
                continue
            try:
                info = path.stat()
            except OSError as exc:
                raise DataSourceError(f"{path}: cannot read training data: {exc}") from exc
            if stat.S_ISDIR(info.st_mode):
                continue
            files.append((path, info.st_size, info.st_mtime_ns))
        return files

    def _signature(self, files: Sequence[tuple[Path, int, int]]) -> tuple[Any, ...]:
        version = None if self._feedback is None else self._feedback.version
        return (tuple((p.name, s, m) for p, s, m in files), version)

    def load(self, task: ModelTask = "classification") -> Dataset:
        """All local examples for ``task``: the files in name order, then the feedback.

        Returns the cached dataset when the task and the sources did not change
        since the last load.

        Returns:
            The examples (at least one).

        Raises:
            DataSourceError: The directory is missing, a file is unreadable, malformed
                or lacks what the task needs (``y``), example shapes or target widths
                differ between files, or the data is larger than
                ``max_total_bytes``; the message names the file.
            NoDataError: There are no examples at all.
            TrainConfigError: ``task`` is not a task.
        """
        task = check_task(task)
        with self._lock:
            files = self._list_files()
            key = (self._signature(files), task)
            if key == self._key and self._cached is not None:
                return self._cached
            dataset, sources = self._load(files, task)
            self._key = key
            self._cached = dataset
            self._sources = sources
            self._task = task
            logger.info(
                "training data: %d examples of shape %s for %s from %d source(s)",
                len(dataset),
                dataset.sample_shape,
                task,
                len(sources),
            )
            return dataset

    def _load(
        self, files: Sequence[tuple[Path, int, int]], task: ModelTask
    ) -> tuple[Dataset, tuple[SourceInfo, ...]]:
        parts: list[Dataset] = []
        sources: list[SourceInfo] = []
        total = 0

        def misfit(part: Dataset, name: str) -> str | None:
            """Why ``part`` cannot join the parts taken so far, if it cannot."""
            if not parts:
                return None
            first, origin = parts[0], sources[0].name
            if part.sample_shape != first.sample_shape:
                return (
                    f"{name} has {_shape_text(part.sample_shape)} but {origin} has "
                    f"{_shape_text(first.sample_shape)}; all local data must have the same "
                    "example shape"
                )
            if part.y.shape[1:] != first.y.shape[1:]:
                return (
                    f"{name} has targets of shape {part.y.shape[1:]} per example but "
                    f"{origin} has {first.y.shape[1:]}"
                )
            return None

        def take(part: Dataset, info: SourceInfo) -> None:
            nonlocal total
            total += part.x.nbytes + part.y.nbytes
            if total > self._max_total_bytes:
                raise DataSourceError(
                    f"local training data exceeds {self._max_total_bytes} bytes at {info.name}; "
                    "remove files or raise the limit"
                )
            parts.append(part)
            sources.append(info)

        for path, _, _ in files:
            if path.suffix.lower() == ".npz":
                part: Dataset | None = load_npz_dataset(
                    path, task=task, max_bytes=self._max_file_bytes
                )
                kind: Literal["npz", "csv"] = "npz"
            else:
                part = load_csv_dataset(path, task=task, max_bytes=self._max_file_bytes)
                kind = "csv"
            if part is None:
                logger.debug("training data: %s holds no data rows", path)
                continue
            problem = misfit(part, path.name)
            if problem is not None:
                raise DataSourceError(problem)
            take(part, SourceInfo(name=path.name, kind=kind, examples=len(part)))
        feedback = self._feedback_for(task)
        if feedback is not None:
            problem = misfit(feedback, "the feedback")
            if problem is None:
                take(feedback, SourceInfo(name="feedback", kind="feedback", examples=len(feedback)))
            else:
                logger.warning(
                    "training data: leaving out %d feedback examples: %s", len(feedback), problem
                )
        examples = sum(len(part) for part in parts)
        if examples == 0:
            raise NoDataError(self._no_data_message())
        return Dataset.concatenate(parts), tuple(sources)

    def _feedback_for(self, task: ModelTask) -> Dataset | None:
        """The feedback's examples for ``task``; None (with a warning) if it has none."""
        if self._feedback is None:
            return None
        try:
            return self._feedback.dataset(task)
        except DataSourceError as exc:
            logger.warning("training data: leaving out the feedback: %s", exc)
            return None

    def _no_data_message(self) -> str:
        where = f" in {self._dir}" if self._dir is not None else ""
        feedback_note = " and no labelled feedback" if self._feedback is not None else ""
        return f"no training examples{where}{feedback_note}"

    def split(
        self, holdout_fraction: float = 0.2, seed: int = 0, task: ModelTask = "classification"
    ) -> tuple[Dataset, Dataset]:
        """Load for ``task`` (see :meth:`load`) and split into (train, held-out) sets.

        See :meth:`Dataset.split`: deterministic for the same data and ``seed``.

        Raises:
            DataSourceError: As :meth:`load`.
            NoDataError: There are no examples.
            TrainConfigError: ``holdout_fraction``, ``seed`` or ``task`` is out of
                range.
        """
        return self.load(task).split(holdout_fraction, seed)

    # ----------------------------------------------------------------- describe

    def _count(self) -> tuple[SourceInfo, ...]:
        """The examples of each source, whatever the task (cached like :meth:`load`).

        Reads every file (within the same bounds) but keeps no data: a device
        announces how much it holds before it knows what it will be asked to train.

        Raises:
            DataSourceError: The directory or a file cannot be read.
            NoDataError: There are no examples at all.
        """
        with self._lock:
            files = self._list_files()
            signature = self._signature(files)
            if self._counted is not None and self._counted[0] == signature:
                return self._counted[1]
            sources: list[SourceInfo] = []
            for path, _, _ in files:
                if path.suffix.lower() == ".npz":
                    x, _ = _npz_arrays(path, self._max_file_bytes)
                    rows = int(x.shape[0]) if x.ndim else 0
                    sources.append(SourceInfo(name=path.name, kind="npz", examples=rows))
                else:
                    read = _csv_table(path, self._max_file_bytes)
                    rows = 0 if read is None or read[0] is None else int(read[0].shape[0])
                    sources.append(SourceInfo(name=path.name, kind="csv", examples=rows))
            if self._feedback is not None and len(self._feedback):
                sources.append(
                    SourceInfo(name="feedback", kind="feedback", examples=len(self._feedback))
                )
            sources = [source for source in sources if source.examples]
            if not sources:
                raise NoDataError(self._no_data_message())
            self._counted = (signature, tuple(sources))
            return self._counted[1]

    def describe(self, task: ModelTask | None = None) -> dict[str, Any]:
        """Counts for the agent's status (never the data itself); does not raise.

        Args:
            task: The task to describe the data for; None for the task last loaded.
                Before any load (and with None) the examples of every source are only
                counted: ``task``, ``features`` and ``sample_shape`` are then None and
                problems only a task would find (a missing ``y``) are not reported.

        Returns:
            ``directory`` (str or None), ``task``, ``examples``, ``features`` and
            ``sample_shape`` (a list; both None when unknown), ``feedback_examples``,
            ``sources`` (a list of ``{"name", "kind", "examples"}``) and ``error``
            (None, or ``{"code", "message"}`` when the data cannot be loaded).
        """
        error: dict[str, str] | None = None
        dataset: Dataset | None = None
        sources: tuple[SourceInfo, ...] = ()
        chosen = self._task if task is None else task
        try:
            if chosen is None:
                sources = self._count()
            else:
                dataset = self.load(chosen)
                with self._lock:
                    sources = self._sources
        except AgentError as exc:
            error = {"code": exc.code, "message": str(exc)}
            sources, dataset = (), None
        return {
            "directory": None if self._dir is None else str(self._dir),
            "task": chosen,
            "examples": sum(s.examples for s in sources),
            "features": None if dataset is None else dataset.num_features,
            "sample_shape": None if dataset is None else list(dataset.sample_shape),
            "feedback_examples": 0 if self._feedback is None else len(self._feedback),
            "sources": [{"name": s.name, "kind": s.kind, "examples": s.examples} for s in sources],
            "error": error,
        }
