"""Local training data: files in a directory plus labelled feedback, as one Dataset.

A device's examples come from up to three sources, loaded by :class:`LocalData`
into one :class:`~edge_agent.training.trainer.Dataset`:

* ``*.npz`` files in the data directory, each with an array ``x`` (n, features)
  of real numbers and an array ``y`` (n,) of integer class labels (other arrays
  are ignored). They are read with :func:`compress.fileio.load_npz`, which bounds
  both the file and what it unpacks to and never unpickles.
* ``*.csv`` files in the same directory: comma-separated numbers, one example per
  line, the **last** column the integer label. The first non-blank line is a header
  (and skipped) when its last field, the label column's name, is not a number (so
  a data row with a typo in a feature is an error, not a header); blank lines and
  lines starting with ``#`` are ignored. Parsed by :func:`numpy.loadtxt`.
* a :class:`~edge_agent.training.feedback.FeedbackBuffer` of labelled feedback.

Files are taken in name order (hidden files, sub-directories and other suffixes
are ignored), then the feedback, so the same files give the same dataset. Every
file is bounded by ``max_file_bytes`` and all loaded arrays together by
``max_total_bytes``. All sources must have the same number of features.

Workflow::

    data = LocalData(Path("/var/lib/fedge-agent/training"), feedback=buffer)
    train, test = data.split(holdout_fraction=0.2, seed=config.seed)
    data.describe()        # counts for the agent's status, never raw data

:meth:`LocalData.load` caches the dataset and reloads when a file is added,
removed or changed (name, size or mtime) or the feedback changes. Problems raise
:class:`~edge_agent.errors.DataSourceError` naming the file; having no examples
at all raises its subclass :class:`~edge_agent.errors.NoDataError`.
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
from edge_agent.training.model_spec import ModelTask
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


def _dataset(path: Path, x: npt.ArrayLike, y: npt.ArrayLike) -> Dataset:
    try:
        return Dataset.from_arrays(x, y)
    except DataSourceError as exc:
        raise DataSourceError(f"{path}: {exc}") from exc


def load_npz_dataset(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Dataset:
    """Read examples from an ``.npz`` file with arrays ``x`` and ``y``.

    Args:
        path: The file.
        max_bytes: Most bytes of the file, and of the arrays it unpacks to.

    Returns:
        The examples.

    Raises:
        DataSourceError: The file is missing, too large, not a readable ``.npz``,
            lacks ``x`` or ``y``, or holds arrays that do not form a dataset.
    """
    arrays = load_npz(path, max_bytes=max_bytes, error=DataSourceError, what="training data file")
    missing = [key for key in ("x", "y") if key not in arrays]
    if missing:
        raise DataSourceError(
            f"{path}: a training data file needs arrays 'x' and 'y'; missing "
            f"{', '.join(missing)} (found {', '.join(sorted(arrays)) or 'none'})"
        )
    extra = sorted(set(arrays) - {"x", "y"})
    if extra:
        logger.debug("training data: %s: ignoring arrays %s", path, extra)
    return _dataset(path, arrays["x"], arrays["y"])


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def load_csv_dataset(path: Path, *, max_bytes: int = DEFAULT_MAX_FILE_BYTES) -> Dataset | None:
    """Read examples from a CSV file whose last column is the integer label.

    The first non-blank, non-comment line is a header when its last field (the
    label column's name) is not a number. Blank lines and ``#`` comments are
    skipped.

    Args:
        path: The file (UTF-8, optionally with a byte-order mark).
        max_bytes: Most bytes of the file.

    Returns:
        The examples, or None when the file holds no data rows and no header to
        tell its feature count.

    Raises:
        DataSourceError: The file is missing, too large, not UTF-8, has rows of
            different lengths, fewer than two columns, a value that is not a
            number, a label that is not a whole number in range, or non-finite
            values.
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
        if not has_header:
            return None
        if len(header_fields) < 2:
            raise DataSourceError(
                f"{path}: needs at least two columns (features, then the label), "
                f"the header has {len(header_fields)}"
            )
        return Dataset.empty(len(header_fields) - 1)
    try:
        table = np.loadtxt(io.StringIO(body), delimiter=",", dtype=np.float64, ndmin=2)
    except ValueError as exc:
        where = " (rows counted from the first line after the header)" if has_header else ""
        raise DataSourceError(f"{path}: malformed CSV: {exc}{where}") from exc
    if table.shape[1] < 2:
        raise DataSourceError(
            f"{path}: needs at least two columns (features, then the label), got {table.shape[1]}"
        )
    if has_header and len(header_fields) != table.shape[1]:
        raise DataSourceError(
            f"{path}: the header has {len(header_fields)} columns but the rows have "
            f"{table.shape[1]}"
        )
    labels = table[:, -1].copy()
    with np.errstate(over="ignore", invalid="ignore"):  # overflow -> inf, refused below
        features = table[:, :-1].astype(np.float32)
    del table
    if not np.isfinite(features).all():
        raise DataSourceError(f"{path}: features contain NaN, infinity or values beyond float32")
    return _dataset(path, features, labels)


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
        self._signature: tuple[Any, ...] | None = None
        self._cached: Dataset | None = None
        self._sources: tuple[SourceInfo, ...] = ()

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

    def load(self) -> Dataset:
        """All local examples: the files in name order, then the feedback.

        Returns the cached dataset when nothing changed since the last load.

        Returns:
            The examples (at least one).

        Raises:
            DataSourceError: The directory is missing, a file is unreadable or
                malformed, feature counts differ between sources, or the data is
                larger than ``max_total_bytes``; the message names the file.
            NoDataError: There are no examples at all.
        """
        with self._lock:
            files = self._list_files()
            version = None if self._feedback is None else self._feedback.version
            signature = (tuple((p.name, s, m) for p, s, m in files), version)
            if signature == self._signature and self._cached is not None:
                return self._cached
            dataset, sources = self._load(files)
            self._signature = signature
            self._cached = dataset
            self._sources = sources
            logger.info(
                "training data: %d examples with %d features from %d source(s)",
                len(dataset),
                dataset.num_features,
                len(sources),
            )
            return dataset

    def _load(
        self, files: Sequence[tuple[Path, int, int]]
    ) -> tuple[Dataset, tuple[SourceInfo, ...]]:
        parts: list[Dataset] = []
        sources: list[SourceInfo] = []
        origin: str | None = None
        total = 0

        def take(part: Dataset, info: SourceInfo) -> None:
            nonlocal total, origin
            if parts and part.num_features != parts[0].num_features:
                raise DataSourceError(
                    f"{info.name} has {part.num_features} features but {origin} has "
                    f"{parts[0].num_features}; all local data must have the same features"
                )
            total += part.x.nbytes + part.y.nbytes
            if total > self._max_total_bytes:
                raise DataSourceError(
                    f"local training data exceeds {self._max_total_bytes} bytes at {info.name}; "
                    "remove files or raise the limit"
                )
            if origin is None:
                origin = info.name
            parts.append(part)
            sources.append(info)

        for path, _, _ in files:
            if path.suffix.lower() == ".npz":
                part: Dataset | None = load_npz_dataset(path, max_bytes=self._max_file_bytes)
                kind: Literal["npz", "csv"] = "npz"
            else:
                part = load_csv_dataset(path, max_bytes=self._max_file_bytes)
                kind = "csv"
            if part is None:
                logger.debug("training data: %s holds no data rows", path)
                continue
            take(part, SourceInfo(name=path.name, kind=kind, examples=len(part)))
        if self._feedback is not None:
            feedback = self._feedback.dataset()
            if feedback is not None:
                take(feedback, SourceInfo(name="feedback", kind="feedback", examples=len(feedback)))
        examples = sum(len(part) for part in parts)
        if examples == 0:
            where = f" in {self._dir}" if self._dir is not None else ""
            feedback_note = " and no labelled feedback" if self._feedback is not None else ""
            raise NoDataError(f"no training examples{where}{feedback_note}")
        return Dataset.concatenate(parts), tuple(sources)

    def split(
        self, holdout_fraction: float = 0.2, seed: int = 0, *, task: ModelTask = "classification"
    ) -> tuple[Dataset, Dataset]:
        """Load (see :meth:`load`) and split into (train, held-out) sets for ``task``.

        See :meth:`Dataset.split`: deterministic for the same data and ``seed``. For
        ``reconstruction`` the labels are dropped; for ``regression`` they are the
        float targets.

        Raises:
            DataSourceError: As :meth:`load`.
            NoDataError: There are no examples.
            TrainConfigError: ``holdout_fraction`` or ``seed`` is out of range.
        """
        dataset = self.load()
        if task == "reconstruction":
            dataset = Dataset.from_arrays(dataset.x, None, task="reconstruction")
        elif task == "regression":
            targets = dataset.y.astype(np.float32)
            dataset = Dataset.from_arrays(dataset.x, targets, task="regression")
        return dataset.split(holdout_fraction, seed)

    def describe(self) -> dict[str, Any]:
        """Counts for the agent's status (never the data itself); does not raise.

        Returns:
            ``directory`` (str or None), ``examples``, ``features`` (None when
            unknown), ``feedback_examples``, ``sources`` (a list of ``{"name",
            "kind", "examples"}``) and ``error`` (None, or ``{"code", "message"}``
            when the data cannot be loaded).
        """
        error: dict[str, str] | None = None
        try:
            dataset: Dataset | None = self.load()
        except AgentError as exc:
            dataset = None
            error = {"code": exc.code, "message": str(exc)}
        with self._lock:
            sources = self._sources if dataset is not None else ()
        return {
            "directory": None if self._dir is None else str(self._dir),
            "examples": 0 if dataset is None else len(dataset),
            "features": None if dataset is None else dataset.num_features,
            "feedback_examples": 0 if self._feedback is None else len(self._feedback),
            "sources": [{"name": s.name, "kind": s.kind, "examples": s.examples} for s in sources],
            "error": error,
        }
