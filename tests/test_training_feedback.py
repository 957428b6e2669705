"""Tests for edge_agent.training.feedback: prediction log, on-disk buffer, collector."""

from __future__ import annotations

import logging
import sqlite3
import stat
import struct
import threading
from contextlib import closing
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.durable_log import DAMAGED_SUFFIX
from edge_agent.errors import (
    ConfigError,
    DataSourceError,
    InvalidLabelError,
    StateError,
    TrainingError,
    UnknownPredictionError,
)
from edge_agent.training.feedback import (
    FEEDBACK_FILE,
    MAX_FEATURES,
    FeedbackBuffer,
    FeedbackCollector,
    PredictionLog,
)
from edge_agent.training.feedback_records import MAX_EXAMPLE_DIMS, MAX_TARGETS
from edge_agent.training.trainer import MAX_CLASSES


def open_buffer(tmp_path: Path, **kwargs: Any) -> FeedbackBuffer:
    kwargs.setdefault("fsync", False)
    return FeedbackBuffer(tmp_path / "feedback", **kwargs)


def row(i: int, features: int = 3) -> np.ndarray:
    return np.arange(features, dtype=np.float32) + 10 * i


def contents(buffer: FeedbackBuffer) -> list[tuple[int, list[float]]]:
    data = buffer.dataset()
    if data is None:
        return []
    return [(int(label), x.tolist()) for x, label in zip(data.x, data.y, strict=True)]


def records(path: Path) -> list[bytes]:
    """The records in the buffer's database, read by another connection."""
    with closing(sqlite3.connect(path)) as db:
        return [bytes(r[0]) for r in db.execute("SELECT data FROM records ORDER BY seq")]


def checkpointed_size(path: Path) -> int:
    """The database file's size once its write-ahead log was copied into it."""
    with closing(sqlite3.connect(path)) as db:
        db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    return path.stat().st_size


def insert(path: Path, record: bytes) -> None:
    """Store a raw record, as something other than the buffer might have."""
    with closing(sqlite3.connect(path, isolation_level=None)) as db:
        db.execute("INSERT INTO records (data) VALUES (?)", (record,))


def fill(buffer: FeedbackBuffer, count: int, start: int = 0) -> None:
    for i in range(start, start + count):
        buffer.add(row(i), i % 5)


def expected(indices: range) -> list[tuple[int, list[float]]]:
    return [(i % 5, row(i).tolist()) for i in indices]


# ------------------------------------------------------------------ prediction log


def test_log_records_copies_as_float32_rows() -> None:
    log = PredictionLog()
    inputs = np.array([1, 2, 3], dtype=np.int64)
    assert log.record("p1", inputs)
    inputs[0] = 99
    rows = log.get("p1")
    assert rows is not None
    assert rows.dtype == np.float32
    assert rows.tolist() == [[1.0, 2.0, 3.0]]
    assert not rows.flags.writeable
    assert "p1" in log
    assert len(log) == 1
    assert log.size_bytes == 12
    assert log.get("nope") is None


def test_log_keeps_the_example_shape_of_batches() -> None:
    log = PredictionLog()
    assert log.record("images", np.ones((2, 1, 4, 4)))  # two 1x4x4 images
    images = log.get("images")
    assert images is not None
    assert images.shape == (2, 1, 4, 4)
    assert log.record("windows", np.zeros((3, 2, 5), np.float64))  # 3 windows, 2 channels
    windows = log.get("windows")
    assert windows is not None
    assert (windows.shape, windows.dtype) == ((3, 2, 5), np.float32)


def test_log_does_not_keep_examples_beyond_the_value_and_rank_bounds() -> None:
    log = PredictionLog(max_bytes=1 << 30)
    assert log.record("largest", np.zeros((1, 1, MAX_FEATURES), np.float32))
    assert not log.record("too-many-values", np.zeros((1, 2, MAX_FEATURES // 2 + 1)))
    assert not log.record("too-many-dims", np.zeros((1,) * (MAX_EXAMPLE_DIMS + 2)))
    assert log.record("deepest", np.zeros((1,) * (MAX_EXAMPLE_DIMS + 1)))


def test_log_forgets_the_oldest_beyond_capacity() -> None:
    log = PredictionLog(capacity=3)
    for i in range(5):
        log.record(f"p{i}", [float(i)])
    assert len(log) == 3
    assert "p0" not in log
    assert "p1" not in log
    assert all(f"p{i}" in log for i in (2, 3, 4))
    log.record("p2", [7.0])  # re-recording refreshes and replaces
    log.record("p5", [5.0])
    assert "p3" not in log
    rows = log.get("p2")
    assert rows is not None
    assert rows.tolist() == [[7.0]]


def test_log_bytes_and_rows_bounds() -> None:
    log = PredictionLog(capacity=100, max_bytes=40, max_rows=2)
    assert log.record("a", np.zeros(4))  # 16 bytes
    assert log.record("b", np.zeros(4))  # 32 bytes
    assert log.record("c", np.zeros(4))  # would be 48: "a" goes
    assert "a" not in log
    assert log.size_bytes == 32
    assert not log.record("big", np.zeros(11))  # 44 bytes alone
    assert not log.record("many", np.zeros((3, 1)))
    assert len(log) == 2


@pytest.mark.parametrize(
    "inputs", [[1.0, float("nan")], [float("inf")], [], "text", np.array([["a"]]), 3.0]
)
def test_log_does_not_keep_unusable_inputs(inputs: Any) -> None:
    log = PredictionLog()
    assert not log.record("p", inputs)
    assert "p" not in log


@pytest.mark.parametrize("bad_id", ["", "a b", "x" * 129, "é", None, 12])
def test_log_refuses_malformed_ids(bad_id: Any) -> None:
    with pytest.raises(UnknownPredictionError, match="invalid prediction id"):
        PredictionLog().record(bad_id, [1.0])


def test_log_pop_forgets() -> None:
    log = PredictionLog()
    log.record("p", [1.0, 2.0])
    rows = log.pop("p")
    assert rows is not None
    assert rows.tolist() == [[1.0, 2.0]]
    assert log.pop("p") is None
    assert len(log) == 0
    assert log.size_bytes == 0


def test_log_bounds_must_be_positive() -> None:
    with pytest.raises(ConfigError):
        PredictionLog(capacity=0)
    with pytest.raises(ConfigError):
        PredictionLog(max_bytes=0)
    with pytest.raises(ConfigError):
        PredictionLog(max_rows=0)


def test_log_is_thread_safe() -> None:
    log = PredictionLog(capacity=50)
    barrier = threading.Barrier(8)

    def worker(t: int) -> None:
        barrier.wait()
        for i in range(200):
            log.record(f"t{t}-{i}", [float(i), float(t)])
            log.get(f"t{t}-{i - 1}")
            if i % 7 == 0:
                log.pop(f"t{t}-{i - 3}")

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(log) == 50
    assert log.size_bytes == 50 * 8


# ------------------------------------------------------------------ feedback buffer


def test_buffer_starts_empty_in_a_private_directory(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    assert len(buffer) == 0
    assert buffer.dataset() is None
    assert buffer.num_features is None
    assert stat.S_IMODE(buffer.directory.stat().st_mode) == 0o700


def test_buffer_add_and_dataset(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    version = buffer.version
    buffer.add(row(0), 1)
    buffer.add(row(1).reshape(1, 3), 4)
    assert buffer.version != version
    assert len(buffer) == 2
    assert buffer.num_features == 3
    assert contents(buffer) == [(1, row(0).tolist()), (4, row(1).tolist())]
    assert stat.S_IMODE(buffer.path.stat().st_mode) == 0o600
    assert buffer.path.name == FEEDBACK_FILE
    assert len(records(buffer.path)) == 2  # on the disk when add() returned


def test_buffer_persists_across_reopen(tmp_path: Path) -> None:
    buffer = FeedbackBuffer(tmp_path / "feedback")  # fsync on: the default
    fill(buffer, 7)
    reopened = open_buffer(tmp_path)
    assert contents(reopened) == expected(range(7))
    fill(reopened, 2, start=7)
    assert contents(open_buffer(tmp_path)) == expected(range(9))


def test_buffer_drops_the_oldest_beyond_max_examples(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_examples=10)
    fill(buffer, 25)
    assert len(buffer) == 10
    assert buffer.dropped == 15
    assert contents(buffer) == expected(range(15, 25))
    assert contents(open_buffer(tmp_path, max_examples=10)) == expected(range(15, 25))


def test_one_call_with_more_rows_than_the_bounds_keeps_its_newest(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_examples=3)
    fill(buffer, 2)
    buffer.add_many(np.stack([row(i) for i in range(2, 7)]), [i % 5 for i in range(2, 7)])
    assert contents(buffer) == expected(range(4, 7))
    assert buffer.dropped == 4
    assert contents(open_buffer(tmp_path, max_examples=3)) == expected(range(4, 7))
    assert len(records(buffer.path)) == 3


def test_buffer_drops_the_oldest_beyond_max_bytes(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_bytes=3 * 12)
    fill(buffer, 5)
    assert len(buffer) == 3
    assert buffer.size_bytes == 36
    assert contents(buffer) == expected(range(2, 5))


def test_the_file_does_not_grow_beyond_the_bounds(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_examples=8)
    fill(buffer, 200)
    size = checkpointed_size(buffer.path)
    fill(buffer, 800, start=200)
    assert len(buffer) == 8
    assert len(records(buffer.path)) == 8  # dropped examples are deleted at once
    assert checkpointed_size(buffer.path) <= size  # their space is reused
    assert contents(open_buffer(tmp_path, max_examples=8)) == expected(range(992, 1000))


def test_reopen_with_smaller_bounds_keeps_the_newest(tmp_path: Path) -> None:
    fill(open_buffer(tmp_path), 20)
    smaller = open_buffer(tmp_path, max_examples=5)
    assert contents(smaller) == expected(range(15, 20))
    assert smaller.dropped == 15
    assert contents(open_buffer(tmp_path)) == expected(range(15, 20))  # deleted on disk


def test_a_damaged_database_is_set_aside(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    directory = tmp_path / "feedback"
    directory.mkdir()
    (directory / FEEDBACK_FILE).write_bytes(b"\x00garbage" * 500)
    buffer = open_buffer(tmp_path)
    assert len(buffer) == 0
    assert "not a usable database" in caplog.text
    assert (directory / (FEEDBACK_FILE + DAMAGED_SUFFIX)).exists()
    buffer.add(row(0), 0)
    assert contents(open_buffer(tmp_path)) == expected(range(1))


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(b"", id="empty"),
        pytest.param(struct.pack("<I", 1), id="no-features"),
        pytest.param(struct.pack("<I", 1) + b"\x00" * 13, id="ragged"),
        pytest.param(struct.pack("<I", MAX_CLASSES) + bytes(12), id="label-out-of-range"),
        pytest.param(struct.pack("<I", 1) + np.array([np.nan, 1, 2], "<f4").tobytes(), id="nan"),
        pytest.param(struct.pack("<I", 1) + bytes(16), id="other-width"),
    ],
)
def test_records_with_unusable_content_are_skipped_and_deleted(
    tmp_path: Path, record: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(row(0), 0)
    insert(buffer.path, record)
    buffer.add(row(1), 1)  # after the bad record: the newest decide the width
    with caplog.at_level(logging.WARNING, logger="edge_agent.training.feedback_buffer"):
        reopened = open_buffer(tmp_path)
    assert contents(reopened) == expected(range(2))
    assert caplog.records
    assert len(records(buffer.path)) == 2


@pytest.mark.parametrize("label", [-1, MAX_CLASSES, True, 1.0, "3", None])
def test_buffer_refuses_invalid_labels(tmp_path: Path, label: Any) -> None:
    buffer = open_buffer(tmp_path)
    with pytest.raises(InvalidLabelError):
        buffer.add(row(0), label)
    assert len(buffer) == 0
    assert records(buffer.path) == []


def test_buffer_refuses_bad_rows(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    with pytest.raises(DataSourceError, match="NaN"):
        buffer.add([1.0, float("nan")], 0)
    with pytest.raises(DataSourceError, match="one example"):
        buffer.add(np.zeros((2, 3)), 0)
    with pytest.raises(InvalidLabelError, match="1 labels for 2 examples"):
        buffer.add_many(np.zeros((2, 3)), [0])
    small = open_buffer(tmp_path / "small", max_bytes=8)
    with pytest.raises(DataSourceError, match="does not fit"):
        small.add(row(0), 0)


def test_buffer_refuses_a_different_feature_count_until_cleared(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(row(0), 0)
    with pytest.raises(DataSourceError, match="clear"):
        buffer.add(row(0, features=4), 0)
    buffer.clear()
    assert len(buffer) == 0
    buffer.add(row(0, features=4), 2)
    assert contents(open_buffer(tmp_path)) == [(2, row(0, features=4).tolist())]


def test_add_many_is_all_or_nothing(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    with pytest.raises(InvalidLabelError):
        buffer.add_many(np.zeros((3, 3)), [0, 1, -1])
    assert len(buffer) == 0
    buffer.add_many(np.stack([row(0), row(1)]), [0, 1])
    assert contents(buffer) == expected(range(2))


def test_a_failed_write_stores_nothing(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_examples=4000)
    fill(buffer, 2)
    db = buffer._log._db  # a full disk: the file may not grow any more
    db.execute(f"PRAGMA max_page_count = {db.execute('PRAGMA page_count').fetchone()[0]}")
    many = np.ones((3999, 3), np.float32)
    with pytest.raises(StateError, match=rf"{FEEDBACK_FILE}.*full"):
        buffer.add_many(many, [1] * 3999)  # would drop the oldest example too
    assert contents(buffer) == expected(range(2))
    assert buffer.dropped == 0
    db.execute("PRAGMA max_page_count = 1073741823")
    buffer.add(row(3), 3)
    reopened = open_buffer(tmp_path, max_examples=4000)
    assert contents(reopened) == [*expected(range(2)), (3, row(3).tolist())]


def test_unusable_directory_is_a_state_error(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_bytes(b"")
    with pytest.raises(StateError, match=str(blocker)):
        FeedbackBuffer(blocker / "feedback")


def test_buffer_bounds_must_be_positive(tmp_path: Path) -> None:
    with pytest.raises(ConfigError):
        open_buffer(tmp_path, max_examples=0)
    with pytest.raises(ConfigError):
        open_buffer(tmp_path, max_bytes=0)


def test_concurrent_adds_from_threads(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_examples=1000)
    barrier = threading.Barrier(8)
    errors: list[Exception] = []

    def worker(t: int) -> None:
        try:
            barrier.wait()
            for i in range(50):
                buffer.add(np.array([t, i, t * 100 + i], np.float32), t)
                if i % 10 == 0:
                    buffer.dataset()
                    len(buffer)
        except Exception as exc:  # noqa: BLE001  # pragma: no cover - reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(t,)) for t in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    want = {(t, (float(t), float(i), float(t * 100 + i))) for t in range(8) for i in range(50)}

    def as_set(b: FeedbackBuffer) -> set[tuple[int, tuple[float, ...]]]:
        return {(label, tuple(x)) for label, x in contents(b)}

    assert len(buffer) == 400
    assert as_set(buffer) == want
    reopened = open_buffer(tmp_path, max_examples=1000)
    assert len(reopened) == 400
    assert as_set(reopened) == want
    # Each thread's own examples stay in its order.
    data = reopened.dataset()
    assert data is not None
    for t in range(8):
        mine = data.x[data.y == t][:, 1]
        assert mine.tolist() == sorted(mine.tolist())


# ------------------------------------------------------------------ the collector


@pytest.fixture
def collector(tmp_path: Path) -> FeedbackCollector:
    return FeedbackCollector(PredictionLog(capacity=4), open_buffer(tmp_path), num_classes=10)


def test_feedback_for_a_one_row_prediction(collector: FeedbackCollector) -> None:
    assert collector.remember("p1", np.array([[1.0, 2.0, 3.0]]))
    assert collector.record_feedback("p1", 7) == 1
    assert contents(collector.buffer) == [(7, [1.0, 2.0, 3.0])]
    assert "p1" not in collector.log
    collector.remember("p2", [4.0, 5.0, 6.0])
    assert collector.record_feedback("p2", [np.int64(2)]) == 1
    assert len(collector.buffer) == 2


def test_feedback_for_a_batch_needs_one_label_per_row(collector: FeedbackCollector) -> None:
    collector.remember("batch", np.arange(9, dtype=np.float32).reshape(3, 3))
    with pytest.raises(InvalidLabelError, match="3 rows: give a list of 3 labels"):
        collector.record_feedback("batch", 1)
    with pytest.raises(InvalidLabelError, match="3 row\\(s\\) but 2 label"):
        collector.record_feedback("batch", [1, 2])
    assert "batch" in collector.log  # refused feedback does not consume the prediction
    assert collector.record_feedback("batch", [0, 1, 2]) == 3
    assert contents(collector.buffer) == [(0, [0, 1, 2]), (1, [3, 4, 5]), (2, [6, 7, 8])]


@pytest.mark.parametrize("label", [-1, 10, True, 2.0, "2", None, [1.5], [[1]], {"a": 1}])
def test_feedback_with_an_invalid_label(collector: FeedbackCollector, label: Any) -> None:
    collector.remember("p", [1.0, 2.0, 3.0])
    with pytest.raises(InvalidLabelError) as caught:
        collector.record_feedback("p", label)
    assert caught.value.code == "bad_label"
    assert len(collector.buffer) == 0
    assert "p" in collector.log


def test_feedback_label_bound_can_be_narrowed_per_call(collector: FeedbackCollector) -> None:
    collector.remember("p", [1.0, 2.0, 3.0])
    with pytest.raises(InvalidLabelError, match=r"0\.\.2"):
        collector.record_feedback("p", 3, num_classes=3)
    assert collector.record_feedback("p", 2, num_classes=3) == 1
    collector.remember("q", [1.0, 2.0, 3.0])
    with pytest.raises(TrainingError, match="num_classes"):
        collector.record_feedback("q", 0, num_classes=0)
    with pytest.raises(ConfigError):
        FeedbackCollector(collector.log, collector.buffer, num_classes=0)


def test_feedback_for_unknown_forgotten_or_labelled_predictions(
    collector: FeedbackCollector,
) -> None:
    with pytest.raises(UnknownPredictionError, match="unknown") as caught:
        collector.record_feedback("never", 1)
    assert caught.value.code == "unknown_prediction"
    for i in range(5):  # capacity 4: p0 is forgotten
        collector.remember(f"p{i}", [float(i)] * 3)
    with pytest.raises(UnknownPredictionError):
        collector.record_feedback("p0", 1)
    collector.record_feedback("p1", 1)
    with pytest.raises(UnknownPredictionError):
        collector.record_feedback("p1", 1)  # labelled once only
    with pytest.raises(UnknownPredictionError, match="invalid prediction id"):
        collector.record_feedback("../../etc", 1)
    assert len(collector.buffer) == 1


def test_failed_storage_keeps_the_prediction_for_a_retry(collector: FeedbackCollector) -> None:
    collector.buffer.add([0.0, 0.0], 0)  # the buffer now holds 2-feature examples
    collector.remember("p", [1.0, 2.0, 3.0])
    with pytest.raises(DataSourceError, match="clear"):
        collector.record_feedback("p", 1)
    assert "p" in collector.log
    collector.buffer.clear()
    assert collector.record_feedback("p", 1) == 1


def test_concurrent_feedback_for_the_same_prediction_is_stored_once(
    collector: FeedbackCollector,
) -> None:
    collector.remember("p", [1.0, 2.0, 3.0])
    barrier = threading.Barrier(8)
    outcomes: list[str] = []
    lock = threading.Lock()

    def worker() -> None:
        barrier.wait()
        try:
            collector.record_feedback("p", 1)
            result = "stored"
        except UnknownPredictionError:
            result = "unknown"
        with lock:
            outcomes.append(result)

    threads = [threading.Thread(target=worker) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert sorted(outcomes) == ["stored"] + ["unknown"] * 7
    assert len(collector.buffer) == 1


# ------------------------------------------- examples of any shape, float targets


def image(i: int) -> np.ndarray:
    """One 1x2x3 'image' as a batch of one."""
    return (np.arange(6, dtype=np.float32).reshape(1, 1, 2, 3) + 10 * i).astype(np.float32)


def test_buffer_keeps_images_with_their_shape_across_reopen(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(image(0), 3)
    buffer.add_many(np.concatenate([image(1), image(2)]), [0, 1])
    assert (buffer.sample_shape, buffer.num_features, buffer.kind) == ((1, 2, 3), 6, "label")
    assert buffer.size_bytes == 3 * 6 * 4
    for held in (buffer, open_buffer(tmp_path)):
        data = held.dataset()
        assert data is not None
        assert data.x.shape == (3, 1, 2, 3)
        np.testing.assert_array_equal(data.x[2], image(2)[0])
        assert data.labels.tolist() == [3, 0, 1]
    stored = records(buffer.path)
    assert all(record.startswith(b"FBX2") for record in stored)  # the tagged format
    assert len(stored[0]) == 8 + 3 * 4 + 4 + 6 * 4


def test_rows_with_labels_keep_the_original_record_format(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(row(0), 4)
    (record,) = records(buffer.path)
    assert record == struct.pack("<I", 4) + row(0).astype("<f4").tobytes()  # older agents read it


@pytest.mark.parametrize(
    ("targets", "expected_y"),
    [
        pytest.param([1.5, -2.0], [1.5, -2.0], id="one-per-example"),
        pytest.param(np.array([3, 4]), [3.0, 4.0], id="integers"),
        pytest.param([[1.0, 2.0], [3.0, 4.5]], [[1.0, 2.0], [3.0, 4.5]], id="two-outputs"),
    ],
)
def test_buffer_keeps_float_targets_for_regression(
    tmp_path: Path, targets: Any, expected_y: list[Any]
) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add_targets(np.stack([row(0), row(1)]), targets)
    assert buffer.kind == "target"
    for held in (buffer, open_buffer(tmp_path)):
        data = held.dataset("regression")
        assert data is not None
        assert data.task == "regression"
        assert data.y.dtype == np.float32
        assert data.y.tolist() == expected_y
        np.testing.assert_array_equal(data.x, np.stack([row(0), row(1)]))
    width = 2 if isinstance(expected_y[0], list) else 1
    assert buffer.size_bytes == 2 * (3 + width) * 4  # inputs and float targets count


def test_targets_of_image_inputs(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add_targets(image(0), np.array(0.25))  # a 0-d array is one number
    data = open_buffer(tmp_path).dataset("regression")
    assert data is not None
    assert (data.x.shape, data.y.tolist()) == ((1, 1, 2, 3), [0.25])


@pytest.mark.parametrize(
    ("targets", "message"),
    [
        pytest.param([True, 1.0], "booleans", id="bool"),
        pytest.param(["1", "2"], "text", id="text"),
        pytest.param(None, "must be numbers", id="none"),
        pytest.param([1.0, float("nan")], "finite", id="nan"),
        pytest.param([1.0, float("inf")], "finite", id="inf"),
        pytest.param([1.0, 1e39], "finite", id="beyond-float32"),
        pytest.param([[1.0], [1.0, 2.0]], "as many targets", id="ragged"),
        pytest.param([1.0, 2.0, 3.0], r"3 target\(s\) for 2 example", id="count"),
        pytest.param([], r"0 target\(s\)", id="empty"),
        pytest.param(np.zeros((2, MAX_TARGETS + 1)), "shape", id="too-many-outputs"),
        pytest.param(np.zeros((2, 1, 1)), "shape", id="3-d"),
        pytest.param(np.array(["a", "b"]), "dtype", id="text-array"),
        pytest.param([1.0, 10**400], "finite", id="huge-int"),
    ],
)
def test_buffer_refuses_invalid_targets(tmp_path: Path, targets: Any, message: str) -> None:
    buffer = open_buffer(tmp_path)
    with pytest.raises(InvalidLabelError, match=message):
        buffer.add_targets(np.stack([row(0), row(1)]), targets)
    assert len(buffer) == 0
    assert records(buffer.path) == []


@pytest.mark.parametrize(
    ("first", "then", "message"),
    [
        pytest.param(
            lambda b: b.add(image(0), 1),
            lambda b: b.add(row(0, features=6), 1),
            r"shape \(6\) with class labels but the buffer holds examples of shape \(1x2x3\)",
            id="image-then-row",
        ),
        pytest.param(
            lambda b: b.add(row(0), 1),
            lambda b: b.add_targets(row(1), 2.5),
            "with one target each but the buffer holds .* with class labels",
            id="labels-then-targets",
        ),
        pytest.param(
            lambda b: b.add_targets(row(0), [[1.0, 2.0]]),
            lambda b: b.add_targets(row(1), 2.5),
            "with one target each but the buffer holds .* with 2 targets each",
            id="target-widths",
        ),
    ],
)
def test_buffer_refuses_examples_that_do_not_fit_until_cleared(
    tmp_path: Path, first: Any, then: Any, message: str
) -> None:
    buffer = open_buffer(tmp_path)
    first(buffer)
    with pytest.raises(DataSourceError, match=message):
        then(buffer)
    assert len(buffer) == 1
    buffer.clear()
    then(buffer)
    assert len(open_buffer(tmp_path)) == 1


def test_dataset_for_each_task(tmp_path: Path) -> None:
    labels = open_buffer(tmp_path / "labels")
    labels.add_many(np.stack([row(i) for i in range(4)]), [0, 1, 0, 1])  # 1 = anomaly
    normal = labels.dataset("reconstruction")
    assert normal is not None
    assert normal.task == "reconstruction"
    np.testing.assert_array_equal(normal.x, np.stack([row(0), row(2)]))
    with pytest.raises(DataSourceError, match=r"holds class labels; regression needs float"):
        labels.dataset("regression")
    targets = open_buffer(tmp_path / "targets")
    targets.add_targets(row(0), 1.0)
    for task in ("classification", "reconstruction"):
        with pytest.raises(DataSourceError, match=f"holds float targets; {task} needs class"):
            targets.dataset(task)  # type: ignore[arg-type]
    anomalies = open_buffer(tmp_path / "anomalies")
    anomalies.add(row(0), 1)
    assert anomalies.dataset("reconstruction") is None  # no normal example to learn from


def tagged(kind: int, shape: tuple[int, ...], width: int, value: bytes, x: bytes) -> bytes:
    head = struct.pack("<4sBBH", b"FBX2", kind, len(shape), width)
    return head + struct.pack(f"<{len(shape)}I", *shape) + value + x


GOOD_X = np.zeros(6, "<f4").tobytes()


@pytest.mark.parametrize(
    "record",
    [
        pytest.param(b"FBX2\x00", id="short-header"),
        pytest.param(tagged(2, (1, 2, 3), 0, struct.pack("<I", 1), GOOD_X), id="bad-kind"),
        pytest.param(tagged(0, (), 0, struct.pack("<I", 1), GOOD_X), id="rank-0"),
        pytest.param(tagged(0, (1,) * 9, 0, struct.pack("<I", 1), GOOD_X[:4]), id="rank-9"),
        pytest.param(tagged(0, (1, 2, 3), 2, struct.pack("<I", 1), GOOD_X), id="label-width"),
        pytest.param(tagged(1, (6,), MAX_TARGETS + 1, b"", GOOD_X), id="too-many-targets"),
        pytest.param(tagged(0, (0, 2, 3), 0, struct.pack("<I", 1), b""), id="zero-dim"),
        pytest.param(tagged(0, (1, 2, 3), 0, struct.pack("<I", 1), GOOD_X[:-4]), id="short"),
        pytest.param(tagged(0, (1, 2, 3), 0, struct.pack("<I", 1), GOOD_X + b"\0"), id="long"),
        pytest.param(
            tagged(0, (1, 2, 3), 0, struct.pack("<I", MAX_CLASSES), GOOD_X), id="label-range"
        ),
        pytest.param(
            tagged(1, (1, 2, 3), 0, np.array([np.nan], "<f4").tobytes(), GOOD_X), id="nan-target"
        ),
        pytest.param(
            tagged(0, (1, 2, 3), 0, struct.pack("<I", 1), np.full(6, np.inf, "<f4").tobytes()),
            id="inf-input",
        ),
        pytest.param(tagged(0, (1, 1, 65537), 0, struct.pack("<I", 1), b""), id="too-big"),
    ],
)
def test_tagged_records_with_unusable_content_are_deleted(
    tmp_path: Path, record: bytes, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(image(0), 0)
    insert(buffer.path, record)
    buffer.add(image(1), 1)
    with caplog.at_level(logging.WARNING, logger="edge_agent.training.feedback_buffer"):
        reopened = open_buffer(tmp_path)
    data = reopened.dataset()
    assert data is not None
    assert data.labels.tolist() == [0, 1]
    assert "unusable content" in caplog.text
    assert len(records(buffer.path)) == 2


def test_a_sound_tagged_record_written_elsewhere_is_read(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add_targets(image(0), [[1.0, 2.0]])
    target = np.array([5.0, 6.0], "<f4").tobytes()
    insert(buffer.path, tagged(1, (1, 2, 3), 2, target, np.ones(6, "<f4").tobytes()))
    data = open_buffer(tmp_path).dataset("regression")
    assert data is not None
    assert data.y.tolist() == [[1.0, 2.0], [5.0, 6.0]]
    assert data.x[1].tolist() == np.ones((1, 2, 3)).tolist()


def test_on_open_the_newest_example_decides_the_layout(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(row(0, features=6), 1)
    buffer.add(row(1, features=6), 2)
    insert(buffer.path, tagged(0, (1, 2, 3), 0, struct.pack("<I", 4), GOOD_X))  # a new model
    with caplog.at_level(logging.WARNING, logger="edge_agent.training.feedback_buffer"):
        reopened = open_buffer(tmp_path)
    assert "dropping 2 examples" in caplog.text
    assert "shape (1x2x3) with class labels" in caplog.text
    data = reopened.dataset()
    assert data is not None
    assert (data.x.shape, data.labels.tolist()) == ((1, 1, 2, 3), [4])
    assert len(records(buffer.path)) == 1


def test_feedback_for_an_image_prediction(collector: FeedbackCollector) -> None:
    images = np.concatenate([image(0), image(1)])
    assert collector.remember("img", images.tolist())  # as JSON would give them
    assert collector.record_feedback("img", [7, 2]) == 2
    data = collector.buffer.dataset()
    assert data is not None
    np.testing.assert_array_equal(data.x, images)
    assert data.labels.tolist() == [7, 2]


@pytest.mark.parametrize(
    ("inputs", "target", "expected_y"),
    [
        pytest.param([[1.0, 2.0, 3.0]], 21.5, [21.5], id="one-number"),
        pytest.param([1.0, 2.0, 3.0], [21], [21.0], id="list-of-one"),
        pytest.param([[1.0, 2.0, 3.0]] * 2, [0.5, -1.0], [0.5, -1.0], id="per-example"),
        pytest.param([[1.0, 2.0, 3.0]], [[1.0, 2.0]], [[1.0, 2.0]], id="two-outputs"),
    ],
)
def test_feedback_with_a_float_target(
    collector: FeedbackCollector, inputs: Any, target: Any, expected_y: list[Any]
) -> None:
    collector.remember("reg", inputs)
    assert collector.record_feedback("reg", target=target) == len(expected_y)
    assert "reg" not in collector.log
    data = collector.buffer.dataset("regression")
    assert data is not None
    assert data.y.tolist() == expected_y


def test_feedback_with_a_target_for_an_image_model(collector: FeedbackCollector) -> None:
    collector.remember("img", image(0))
    assert collector.record_feedback("img", target=3.25) == 1
    data = collector.buffer.dataset("regression")
    assert data is not None
    assert (data.x.shape, data.y.tolist()) == ((1, 1, 2, 3), [3.25])


def test_feedback_target_refusals_keep_the_prediction(collector: FeedbackCollector) -> None:
    collector.remember("p", [1.0, 2.0, 3.0])
    with pytest.raises(InvalidLabelError, match="exactly one of a label"):
        collector.record_feedback("p")
    with pytest.raises(InvalidLabelError, match="exactly one of a label"):
        collector.record_feedback("p", 1, target=1.0)
    with pytest.raises(InvalidLabelError, match="give a list of one list"):
        collector.record_feedback("p", target=[1.0, 2.0])  # 2 targets, 1 example
    with pytest.raises(InvalidLabelError, match="finite"):
        collector.record_feedback("p", target=float("nan"))
    with pytest.raises(InvalidLabelError):
        collector.record_feedback("p", target=True)
    collector.buffer.add([0.0, 0.0, 0.0], 1)  # the buffer holds class labels
    with pytest.raises(DataSourceError, match="clear"):
        collector.record_feedback("p", target=1.0)
    assert "p" in collector.log
    assert len(collector.buffer) == 1
    collector.buffer.clear()
    assert collector.record_feedback("p", target=1.0) == 1
