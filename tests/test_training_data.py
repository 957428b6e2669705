"""Tests for edge_agent.training.data: npz and CSV files plus feedback as one Dataset."""

from __future__ import annotations

import logging
import os
import re
from pathlib import Path

import numpy as np
import pytest

from edge_agent.errors import ConfigError, DataSourceError, NoDataError, TrainConfigError
from edge_agent.training.data import LocalData, load_csv_dataset, load_npz_dataset
from edge_agent.training.feedback import FeedbackBuffer


def write_npz(path: Path, x: object, y: object, **extra: object) -> Path:
    np.savez(path, x=x, y=y, **extra)  # type: ignore[arg-type]
    return path


def write_text(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


@pytest.fixture
def data_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "training"
    directory.mkdir()
    return directory


# --------------------------------------------------------------------------- npz


def test_npz_files_concatenate_in_name_order(data_dir: Path) -> None:
    write_npz(data_dir / "b.npz", np.full((2, 3), 2.0), np.array([2, 2]))
    write_npz(data_dir / "a.npz", np.ones((3, 3), np.float64), np.array([0, 1, 0], np.int32))
    data = LocalData(data_dir).load()
    assert len(data) == 5
    assert data.x.dtype == np.float32
    assert data.y.tolist() == [0, 1, 0, 2, 2]
    assert data.x[:, 0].tolist() == [1, 1, 1, 2, 2]


def test_npz_extra_arrays_are_ignored(tmp_path: Path) -> None:
    path = write_npz(tmp_path / "d.npz", np.ones((2, 2)), np.array([0, 1]), meta=np.zeros(3))
    assert len(load_npz_dataset(path)) == 2


@pytest.mark.parametrize(
    ("arrays", "message"),
    [
        ({"x": np.ones((2, 2))}, "missing y"),
        ({"y": np.zeros(2, int)}, "missing x"),
        ({"x": np.ones(2), "y": np.zeros(2, int)}, "shape"),
        ({"x": np.ones((2, 2)), "y": np.array([0.5, 1])}, "whole numbers"),
        ({"x": np.ones((2, 2)), "y": np.zeros(3, int)}, "2 examples but 3 labels"),
        ({"x": np.array([[np.nan, 1.0]]), "y": np.zeros(1, int)}, "NaN"),
    ],
)
def test_npz_with_bad_arrays_names_the_file(
    tmp_path: Path, arrays: dict[str, np.ndarray], message: str
) -> None:
    path = tmp_path / "bad.npz"
    np.savez(path, **arrays)  # type: ignore[arg-type]
    with pytest.raises(DataSourceError, match=message) as caught:
        load_npz_dataset(path)
    assert str(path) in str(caught.value)


def test_corrupt_or_oversized_npz_is_a_data_source_error(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"PK\x03\x04 this is not really a zip file")
    with pytest.raises(DataSourceError, match=r"garbage\.npz"):
        load_npz_dataset(garbage)
    big = write_npz(tmp_path / "big.npz", np.ones((100, 10)), np.zeros(100, int))
    with pytest.raises(DataSourceError, match="too large"):
        load_npz_dataset(big, max_bytes=1000)


def test_npz_with_object_arrays_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "pickled.npz"
    np.savez(path, x=np.array([[1, "a"]], dtype=object), y=np.zeros(1, int))
    with pytest.raises(DataSourceError, match=r"pickled\.npz"):
        load_npz_dataset(path)


# --------------------------------------------------------------------------- csv


def test_csv_without_header(tmp_path: Path) -> None:
    path = write_text(tmp_path / "d.csv", "0.5,1.5,0\n2,3,1\n-1,4e-1,2\n")
    data = load_csv_dataset(path)
    assert data is not None
    assert data.x.tolist() == [[0.5, 1.5], [2.0, 3.0], [-1.0, pytest.approx(0.4)]]
    assert data.y.tolist() == [0, 1, 2]


def test_csv_with_header_blank_lines_comments_and_bom(tmp_path: Path) -> None:
    text = "\ufeff# exported by the sensor\n\nf1, f2, label\n1,2,1\n\n3,4,0\n# done\n"
    data = load_csv_dataset(write_text(tmp_path / "d.csv", text))
    assert data is not None
    assert data.x.tolist() == [[1.0, 2.0], [3.0, 4.0]]
    assert data.y.tolist() == [1, 0]


def test_csv_with_crlf_line_ends(tmp_path: Path) -> None:
    path = tmp_path / "d.csv"
    path.write_bytes(b"a,b,y\r\n1,2,0\r\n3,4,1\r\n")
    data = load_csv_dataset(path)
    assert data is not None
    assert data.y.tolist() == [0, 1]


def test_csv_header_only_or_empty(tmp_path: Path) -> None:
    header_only = load_csv_dataset(write_text(tmp_path / "h.csv", "0,1,2,label\n"))
    assert header_only is not None
    assert (len(header_only), header_only.num_features) == (0, 3)
    assert load_csv_dataset(write_text(tmp_path / "e.csv", "\n  \n# nothing\n")) is None
    assert load_csv_dataset(write_text(tmp_path / "z.csv", "")) is None


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("1,2,0\n3,x,1\n", "could not convert"),
        ("a,b,y\n1,2,0\n3,4\n", "number of columns changed"),
        ("1,2,0.5\n", "whole numbers"),
        ("1,2,-1\n", "class indices"),
        ("1\n2\n", "at least two columns"),
        ("label\n", "at least two columns"),
        ("a,b,y\n1,2,3,0\n", "header has 3 columns"),
        ("1,nan,0\n", "NaN"),
        ("1,oops,0\n", "could not convert"),
        ("0,1,label\n1,2,0\n3,4\n", "number of columns changed"),
        ("1,1e39,0\n", "NaN"),
    ],
)
def test_malformed_csv_names_the_file(tmp_path: Path, text: str, message: str) -> None:
    path = write_text(tmp_path / "bad.csv", text)
    with pytest.raises(DataSourceError, match=message) as caught:
        load_csv_dataset(path)
    assert str(path) in str(caught.value)


def test_csv_that_is_not_utf8_or_too_large(tmp_path: Path) -> None:
    binary = tmp_path / "bin.csv"
    binary.write_bytes(b"\xff\xfe\x00\x01,2,3\n")
    with pytest.raises(DataSourceError, match="UTF-8"):
        load_csv_dataset(binary)
    big = write_text(tmp_path / "big.csv", "1,2,0\n" * 100)
    with pytest.raises(DataSourceError, match="too large"):
        load_csv_dataset(big, max_bytes=100)


def test_npz_and_csv_together(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 2)), np.array([0, 0]))
    write_text(data_dir / "b.csv", "x1,x2,y\n5,6,1\n")
    data = LocalData(data_dir).load()
    assert data.y.tolist() == [0, 0, 1]
    assert data.x[-1].tolist() == [5, 6]


# ----------------------------------------------------------------- the directory


def test_mismatched_feature_counts_name_both_files(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 2)), np.array([0, 0]))
    write_text(data_dir / "b.csv", "1,2,3,0\n")
    with pytest.raises(DataSourceError, match=r"b\.csv has 3 features but a\.npz has 2"):
        LocalData(data_dir).load()


def test_empty_directory_is_no_data(data_dir: Path) -> None:
    with pytest.raises(NoDataError, match="no training examples"):
        LocalData(data_dir).load()
    write_text(data_dir / "empty.csv", "a,b,y\n")
    with pytest.raises(NoDataError):
        LocalData(data_dir).load()


def test_missing_directory_is_a_data_source_error(tmp_path: Path) -> None:
    with pytest.raises(DataSourceError, match="does not exist") as caught:
        LocalData(tmp_path / "nowhere").load()
    assert not isinstance(caught.value, NoDataError)
    assert caught.value.code == "bad_data"
    blocker = write_text(tmp_path / "file", "")
    with pytest.raises(DataSourceError, match="not a directory"):
        LocalData(blocker).load()


def test_other_files_hidden_files_and_subdirectories_are_ignored(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((1, 2)), np.array([1]))
    write_text(data_dir / "README.txt", "not data")
    write_text(data_dir / ".partial.csv", "garbage,,,\n")
    (data_dir / "sub.csv").mkdir()
    write_text(data_dir / "UPPER.CSV", "1,2,0\n")
    assert len(LocalData(data_dir).load()) == 2


def test_a_bad_file_fails_the_load(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((1, 2)), np.array([1]))
    write_text(data_dir / "b.csv", "1,oops,0\n")
    with pytest.raises(DataSourceError, match=r"b\.csv"):
        LocalData(data_dir).load()


def test_total_size_is_bounded(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((100, 10)), np.zeros(100, int))
    write_npz(data_dir / "b.npz", np.zeros((100, 10)), np.zeros(100, int))
    assert len(LocalData(data_dir, max_total_bytes=10_000).load()) == 200
    with pytest.raises(DataSourceError, match=r"exceeds 9000 bytes at b\.npz"):
        LocalData(data_dir, max_total_bytes=9000).load()
    with pytest.raises(DataSourceError, match="too large"):
        LocalData(data_dir, max_file_bytes=1000).load()


def test_bounds_must_be_positive(data_dir: Path) -> None:
    with pytest.raises(ConfigError):
        LocalData(data_dir, max_file_bytes=0)
    with pytest.raises(ConfigError):
        LocalData(data_dir, max_total_bytes=0)


# ------------------------------------------------------------------- feedback


def test_feedback_is_appended_after_the_files(data_dir: Path, tmp_path: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 2)), np.array([0, 0]))
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add([7.0, 8.0], 1)
    data = LocalData(data_dir, feedback=buffer).load()
    assert data.y.tolist() == [0, 0, 1]
    assert data.x[-1].tolist() == [7, 8]


def test_feedback_only(tmp_path: Path) -> None:
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    local = LocalData(None, feedback=buffer)
    with pytest.raises(NoDataError, match="no labelled feedback"):
        local.load()
    buffer.add([1.0, 2.0, 3.0], 2)
    assert local.load().y.tolist() == [2]


def test_feedback_with_other_features_than_the_files_is_left_out(
    data_dir: Path, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 2)), np.array([0, 0]))
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add([1.0, 2.0, 3.0], 0)
    local = LocalData(data_dir, feedback=buffer)
    with caplog.at_level(logging.WARNING, logger="edge_agent.training.data"):
        data = local.load()
    assert len(data) == 2
    assert "leaving out 1 feedback examples" in caplog.text
    assert "the feedback has 3 features but a.npz has 2" in caplog.text
    assert [s["name"] for s in local.describe()["sources"]] == ["a.npz"]


# ---------------------------------------------------------- caching and reloading


def test_load_is_cached_until_something_changes(data_dir: Path, tmp_path: Path) -> None:
    path = write_npz(data_dir / "a.npz", np.zeros((2, 2)), np.array([0, 0]))
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    local = LocalData(data_dir, feedback=buffer)
    first = local.load()
    assert local.load() is first

    write_npz(data_dir / "b.npz", np.ones((1, 2)), np.array([1]))
    second = local.load()
    assert len(second) == 3

    write_npz(path, np.zeros((4, 2)), np.array([0, 0, 0, 0]))
    stat = path.stat()
    os.utime(path, ns=(stat.st_atime_ns, stat.st_mtime_ns + 10**9))
    third = local.load()
    assert len(third) == 5

    buffer.add([3.0, 3.0], 1)
    assert len(local.load()) == 6

    (data_dir / "b.npz").unlink()
    assert len(local.load()) == 5


def test_split_is_deterministic(data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    write_npz(data_dir / "a.npz", rng.normal(size=(40, 3)), rng.integers(0, 2, 40))
    local = LocalData(data_dir)
    train, test = local.split(0.25, seed=3)
    again_train, again_test = LocalData(data_dir).split(0.25, seed=3)
    assert (len(train), len(test)) == (30, 10)
    assert np.array_equal(train.x, again_train.x)
    assert np.array_equal(test.y, again_test.y)
    _, other_test = local.split(0.25, seed=4)
    assert not np.array_equal(test.x, other_test.x)


# ------------------------------------------------------------------- describe


def test_describe_counts_sources(data_dir: Path, tmp_path: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 2)), np.array([0, 0]))
    write_text(data_dir / "b.csv", "1,2,1\n3,4,0\n5,6,1\n")
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add([0.0, 1.0], 1)
    local = LocalData(data_dir, feedback=buffer)
    counted = local.describe()  # before any load: counted, whatever the task
    local.load()
    summary = local.describe()  # the task last loaded
    assert counted == {**summary, "task": None, "features": None, "sample_shape": None}
    assert summary == {
        "directory": str(data_dir),
        "task": "classification",
        "examples": 6,
        "features": 2,
        "sample_shape": [2],
        "feedback_examples": 1,
        "sources": [
            {"name": "a.npz", "kind": "npz", "examples": 2},
            {"name": "b.csv", "kind": "csv", "examples": 3},
            {"name": "feedback", "kind": "feedback", "examples": 1},
        ],
        "error": None,
    }


def test_describe_reports_errors_instead_of_raising(tmp_path: Path, data_dir: Path) -> None:
    missing = LocalData(tmp_path / "nowhere").describe()
    assert missing["examples"] == 0
    assert missing["sources"] == []
    assert missing["error"]["code"] == "bad_data"
    assert "does not exist" in missing["error"]["message"]
    empty = LocalData(data_dir).describe()
    assert empty["error"]["code"] == "no_data"
    assert empty["features"] is None


# ------------------------------------------------ examples of any shape, any task


def test_npz_images_and_windows_keep_their_shape(data_dir: Path) -> None:
    rng = np.random.default_rng(0)
    write_npz(data_dir / "a.npz", rng.random((5, 1, 4, 4)), rng.integers(0, 3, 5))
    write_npz(data_dir / "b.npz", rng.random((2, 1, 4, 4), np.float32), np.array([1, 2]))
    data = LocalData(data_dir).load()
    assert (data.x.shape, data.x.dtype, data.task) == ((7, 1, 4, 4), np.float32, "classification")
    windows = data_dir.parent / "windows"
    windows.mkdir()
    write_npz(windows / "w.npz", rng.random((6, 3, 20)), np.arange(6) % 2)
    train, test = LocalData(windows).split(0.5, seed=1)
    assert (train.x.shape, test.x.shape) == ((3, 3, 20), (3, 3, 20))


@pytest.mark.parametrize("y_shape", [(4,), (4, 2)])
def test_npz_regression_targets(data_dir: Path, y_shape: tuple[int, ...]) -> None:
    y = np.linspace(-1.5, 2.5, int(np.prod(y_shape))).reshape(y_shape)
    write_npz(data_dir / "r.npz", np.ones((4, 2, 3)), y)
    data = LocalData(data_dir).load("regression")
    assert data.task == "regression"
    assert data.y.shape == y_shape
    np.testing.assert_allclose(data.y, y.astype(np.float32))
    with pytest.raises(DataSourceError, match=r"r\.npz: labels must"):
        LocalData(data_dir).load("classification")


def test_reconstruction_needs_no_y(data_dir: Path, tmp_path: Path) -> None:
    np.savez(data_dir / "normal.npz", x=np.ones((3, 2, 8)))
    local = LocalData(data_dir)
    data = local.load("reconstruction")
    assert (data.task, data.x.shape, data.y.shape) == ("reconstruction", (3, 2, 8), (3, 0))
    for task in ("classification", "regression"):
        with pytest.raises(DataSourceError, match=rf"normal\.npz: missing y: {task} needs"):
            local.load(task)  # type: ignore[arg-type]
    labelled = write_npz(tmp_path / "labelled.npz", np.ones((2, 3)), np.array([5, 6]))
    assert load_npz_dataset(labelled, task="reconstruction").y.shape == (2, 0)  # y ignored


def test_mixed_example_shapes_name_both_files(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 1, 4, 4)), np.array([0, 1]))
    write_npz(data_dir / "b.npz", np.zeros((2, 16)), np.array([0, 1]))
    mixed = r"b\.npz has 16 features but a\.npz has examples of shape \(1, 4, 4\)"
    with pytest.raises(DataSourceError, match=mixed):
        LocalData(data_dir).load()
    (data_dir / "b.npz").unlink()
    write_npz(data_dir / "c.npz", np.zeros((2, 4, 4)), np.array([0, 1]))
    with pytest.raises(DataSourceError, match=r"c\.npz has examples of shape \(4, 4\)"):
        LocalData(data_dir).load()


def test_regression_target_widths_must_agree(data_dir: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 3)), np.zeros((2, 2)))
    write_npz(data_dir / "b.npz", np.zeros((2, 3)), np.zeros(2))
    with pytest.raises(DataSourceError, match=r"b\.npz has targets of shape \(\) per example"):
        LocalData(data_dir).load("regression")


def test_csv_for_each_task(tmp_path: Path) -> None:
    path = write_text(tmp_path / "d.csv", "t1,t2,value\n1,2,0.5\n3,4,1\n")
    regression = load_csv_dataset(path, task="regression")
    assert regression is not None
    assert (regression.x.tolist(), regression.y.tolist()) == ([[1, 2], [3, 4]], [0.5, 1.0])
    reconstruction = load_csv_dataset(path, task="reconstruction")  # every column a feature
    assert reconstruction is not None
    assert reconstruction.x.tolist() == [[1, 2, 0.5], [3, 4, 1]]
    single = write_text(tmp_path / "s.csv", "1\n2\n")
    one_column = load_csv_dataset(single, task="reconstruction")
    assert one_column is not None
    assert one_column.x.tolist() == [[1.0], [2.0]]
    with pytest.raises(DataSourceError, match="regression needs at least two columns"):
        load_csv_dataset(single, task="regression")
    header = load_csv_dataset(write_text(tmp_path / "h.csv", "a,b,c\n"), task="reconstruction")
    assert header is not None
    assert (len(header), header.sample_shape) == (0, (3,))
    empty_regression = load_csv_dataset(tmp_path / "h.csv", task="regression")
    assert empty_regression is not None
    assert (empty_regression.sample_shape, empty_regression.y.dtype) == ((2,), np.float32)


def test_image_feedback_joins_image_files(data_dir: Path, tmp_path: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 1, 2, 3)), np.array([0, 1]))
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add(np.full((1, 1, 2, 3), 7.0), 2)
    data = LocalData(data_dir, feedback=buffer).load()
    assert data.x.shape == (3, 1, 2, 3)
    assert data.labels.tolist() == [0, 1, 2]
    assert data.x[-1].max() == 7.0


def test_regression_feedback_joins_regression_files(data_dir: Path, tmp_path: Path) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 3)), np.array([0.5, 1.5]))
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add_targets([1.0, 2.0, 3.0], 9.25)
    local = LocalData(data_dir, feedback=buffer)
    assert local.load("regression").y.tolist() == [0.5, 1.5, 9.25]


@pytest.mark.parametrize(
    ("task", "fill", "message"),
    [
        pytest.param(
            "regression",
            lambda b: b.add([1.0, 2.0, 3.0], 1),
            "holds class labels; regression needs float targets",
            id="labels-for-regression",
        ),
        pytest.param(
            "classification",
            lambda b: b.add_targets([1.0, 2.0, 3.0], 0.5),
            "holds float targets; classification needs class labels",
            id="targets-for-classification",
        ),
        pytest.param(
            "regression",
            lambda b: b.add_targets([1.0, 2.0, 3.0], [[0.5, 1.0]]),
            r"targets of shape \(2,\) per example but a\.npz has \(\)",
            id="target-width",
        ),
    ],
)
def test_feedback_that_does_not_fit_the_task_is_left_out(
    data_dir: Path,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
    task: str,
    fill: object,
    message: str,
) -> None:
    write_npz(data_dir / "a.npz", np.zeros((2, 3)), np.array([0, 1]))
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    fill(buffer)  # type: ignore[operator]
    with caplog.at_level(logging.WARNING, logger="edge_agent.training.data"):
        data = LocalData(data_dir, feedback=buffer).load(task)  # type: ignore[arg-type]
    assert len(data) == 2
    assert "leaving out" in caplog.text
    assert re.search(message, caplog.text)


def test_reconstruction_trains_on_feedback_labelled_normal(data_dir: Path, tmp_path: Path) -> None:
    write_text(data_dir / "normal.csv", "1,2,3\n4,5,6\n")  # reconstruction: 3 features
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add_many([[7.0, 8.0, 9.0], [0.0, 0.0, 99.0]], [0, 1])  # 1 = a real anomaly
    data = LocalData(data_dir, feedback=buffer).load("reconstruction")
    assert data.x.tolist() == [[1, 2, 3], [4, 5, 6], [7, 8, 9]]


def test_the_cache_is_per_task(data_dir: Path) -> None:
    write_text(data_dir / "d.csv", "1,2,0\n3,4,1\n")
    local = LocalData(data_dir)
    classification = local.load()
    assert local.load("classification") is classification
    reconstruction = local.load("reconstruction")
    assert reconstruction.sample_shape == (3,)
    assert local.load("reconstruction") is reconstruction
    assert local.load() is not classification  # reloaded for the other task
    assert local.load().sample_shape == (2,)
    with pytest.raises(TrainConfigError):
        local.load("clustering")  # type: ignore[arg-type]


def test_describe_counts_data_no_task_was_loaded_for(data_dir: Path, tmp_path: Path) -> None:
    np.savez(data_dir / "normal.npz", x=np.ones((3, 2, 8)))  # no y: reconstruction data
    write_text(data_dir / "more.csv", "# none\n")
    buffer = FeedbackBuffer(tmp_path / "feedback", fsync=False)
    buffer.add(np.ones((1, 2, 8)), 0)
    local = LocalData(data_dir, feedback=buffer)
    counted = local.describe()
    assert counted["error"] is None
    assert (counted["task"], counted["examples"], counted["sample_shape"]) == (None, 4, None)
    assert counted["sources"] == [
        {"name": "normal.npz", "kind": "npz", "examples": 3},
        {"name": "feedback", "kind": "feedback", "examples": 1},
    ]
    as_classification = local.describe("classification")
    assert as_classification["examples"] == 0
    assert as_classification["error"]["code"] == "bad_data"
    assert "missing y" in as_classification["error"]["message"]
    local.load("reconstruction")
    described = local.describe()
    assert (described["task"], described["examples"], described["sample_shape"]) == (
        "reconstruction",
        4,
        [2, 8],
    )
    buffer.add(np.ones((1, 2, 8)), 1)  # an anomaly: not trained on, still counted raw
    assert local.describe()["examples"] == 4
    (data_dir / "normal.npz").unlink()
    assert local.describe()["examples"] == 1


def test_describe_without_a_task_reports_unreadable_files(data_dir: Path) -> None:
    (data_dir / "bad.npz").write_bytes(b"not a zip")
    described = LocalData(data_dir).describe()
    assert described["examples"] == 0
    assert described["error"]["code"] == "bad_data"
    assert "bad.npz" in described["error"]["message"]
