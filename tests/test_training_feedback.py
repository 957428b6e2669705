"""Tests for edge_agent.training.feedback: prediction log, on-disk buffer, collector."""

from __future__ import annotations

import logging
import os
import stat
import struct
import threading
import zlib
from pathlib import Path
from typing import Any

import numpy as np
import pytest

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
    RECORD_HEADER_BYTES,
    FeedbackBuffer,
    FeedbackCollector,
    PredictionLog,
)
from edge_agent.training.trainer import MAX_CLASSES

RECORD_BYTES_3 = RECORD_HEADER_BYTES + 4 + 3 * 4  # one record of 3 features


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


def test_log_flattens_batches_per_row() -> None:
    log = PredictionLog()
    log.record("batch", np.zeros((2, 2, 3)))
    rows = log.get("batch")
    assert rows is not None
    assert rows.shape == (2, 6)


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
    assert buffer.path.stat().st_size == 2 * RECORD_BYTES_3


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


def test_buffer_drops_the_oldest_beyond_max_bytes(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_bytes=3 * 12)
    fill(buffer, 5)
    assert len(buffer) == 3
    assert buffer.size_bytes == 36
    assert contents(buffer) == expected(range(2, 5))


def test_buffer_file_is_compacted(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path, max_examples=8)
    fill(buffer, 200)
    assert len(buffer) == 8
    # Never more than a quarter over the bound plus the slack of 16 records.
    assert buffer.path.stat().st_size <= (8 * 5 // 4 + 17) * RECORD_BYTES_3
    assert contents(open_buffer(tmp_path, max_examples=8)) == expected(range(192, 200))


def test_reopen_with_smaller_bounds_keeps_the_newest(tmp_path: Path) -> None:
    fill(open_buffer(tmp_path), 20)
    smaller = open_buffer(tmp_path, max_examples=5)
    assert contents(smaller) == expected(range(15, 20))
    assert smaller.path.stat().st_size == 5 * RECORD_BYTES_3


def test_truncated_tail_is_skipped_with_a_warning(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    fill(open_buffer(tmp_path), 5)
    path = tmp_path / "feedback" / FEEDBACK_FILE
    with path.open("r+b") as stream:  # a crash in the middle of the last append
        stream.truncate(path.stat().st_size - 5)
    with caplog.at_level(logging.WARNING, logger="edge_agent.training.feedback"):
        buffer = open_buffer(tmp_path)
    assert contents(buffer) == expected(range(4))
    assert "damaged or truncated" in caplog.text
    # The damaged tail is gone from the file, so new records are not hidden behind it.
    assert path.stat().st_size == 4 * RECORD_BYTES_3
    buffer.add(row(9), 4)
    assert contents(open_buffer(tmp_path)) == [*expected(range(4)), (4, row(9).tolist())]


@pytest.mark.parametrize("where", ["magic", "length", "label", "features", "crc"])
def test_a_corrupt_record_in_the_middle_is_skipped(tmp_path: Path, where: str) -> None:
    fill(open_buffer(tmp_path), 5)
    path = tmp_path / "feedback" / FEEDBACK_FILE
    blob = bytearray(path.read_bytes())
    offset = (
        2 * RECORD_BYTES_3
        + {
            "magic": 1,
            "length": 6,
            "crc": 9,
            "label": RECORD_HEADER_BYTES,
            "features": RECORD_HEADER_BYTES + 6,
        }[where]
    )
    blob[offset] ^= 0xFF
    path.write_bytes(bytes(blob))
    buffer = open_buffer(tmp_path)
    assert contents(buffer) == [*expected(range(2)), *expected(range(3, 5))]


def test_garbage_file_and_leftover_temporary_files(tmp_path: Path) -> None:
    directory = tmp_path / "feedback"
    directory.mkdir()
    (directory / FEEDBACK_FILE).write_bytes(os.urandom(500))
    leftover = directory / f".{FEEDBACK_FILE}.abc123.tmp"
    leftover.write_bytes(b"half a rewrite")
    buffer = open_buffer(tmp_path)
    assert len(buffer) == 0
    assert not leftover.exists()
    buffer.add(row(0), 0)
    assert contents(open_buffer(tmp_path)) == expected(range(1))


def test_records_with_out_of_range_content_are_skipped(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    buffer.add(row(0), 0)
    path = buffer.path
    # A record with a valid CRC but a NaN feature (written by something else).
    payload = (7).to_bytes(4, "little") + np.array([np.nan, 1, 2], "<f4").tobytes()
    header = struct.pack(">4sII", b"FBK1", len(payload), zlib.crc32(payload))
    with path.open("ab") as stream:
        stream.write(header + payload)
    buffer.add(row(1), 1)  # appended after the bad record
    assert contents(open_buffer(tmp_path)) == [(0, row(0).tolist()), (1, row(1).tolist())]


@pytest.mark.parametrize("label", [-1, MAX_CLASSES, True, 1.0, "3", None])
def test_buffer_refuses_invalid_labels(tmp_path: Path, label: Any) -> None:
    buffer = open_buffer(tmp_path)
    with pytest.raises(InvalidLabelError):
        buffer.add(row(0), label)
    assert len(buffer) == 0
    assert not buffer.path.exists()


def test_buffer_refuses_bad_rows(tmp_path: Path) -> None:
    buffer = open_buffer(tmp_path)
    with pytest.raises(DataSourceError, match="NaN"):
        buffer.add([1.0, float("nan")], 0)
    with pytest.raises(DataSourceError, match="one row"):
        buffer.add(np.zeros((2, 3)), 0)
    with pytest.raises(InvalidLabelError, match="1 labels for 2 rows"):
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


def test_a_failed_append_is_cut_back_off_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = open_buffer(tmp_path)
    fill(buffer, 2)
    real_write = os.write

    def half_then_fail(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[:7])
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("edge_agent.training.feedback.os.write", half_then_fail)
    with pytest.raises(StateError, match="No space left"):
        buffer.add(row(2), 2)
    monkeypatch.undo()
    assert len(buffer) == 2
    assert buffer.path.stat().st_size == 2 * RECORD_BYTES_3
    buffer.add(row(3), 3)
    assert contents(open_buffer(tmp_path)) == [*expected(range(2)), (3, row(3).tolist())]


def test_when_cutting_back_fails_the_next_add_rewrites(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    buffer = open_buffer(tmp_path)
    fill(buffer, 2)
    real_write = os.write

    def half_then_fail(fd: int, data: Any) -> int:
        real_write(fd, bytes(data)[:7])
        raise OSError(5, "I/O error")

    def no_truncate(fd: int, length: int) -> None:
        raise OSError(5, "I/O error")

    monkeypatch.setattr("edge_agent.training.feedback.os.write", half_then_fail)
    monkeypatch.setattr("edge_agent.training.feedback.os.ftruncate", no_truncate)
    with pytest.raises(StateError):
        buffer.add(row(2), 2)
    monkeypatch.undo()
    assert buffer.path.stat().st_size == 2 * RECORD_BYTES_3 + 7  # garbage at the end
    buffer.add(row(3), 3)
    assert buffer.path.stat().st_size == 3 * RECORD_BYTES_3
    assert contents(open_buffer(tmp_path)) == [*expected(range(2)), (3, row(3).tolist())]


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
