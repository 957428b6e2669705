"""Tests for edge_agent.serving: the active model, atomic swaps and predictions."""

from __future__ import annotations

import dataclasses
import json
import logging
import re
import threading
from collections.abc import Callable, Iterator, Mapping

import numpy as np
import pytest

from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, forward
from edge_agent.errors import ModelRuntimeError, NoModelError
from edge_agent.runtime.base import ModelRuntime, TensorInfo
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.serving.server import LoadedModel, ModelServer, Prediction
from tests import model_fixtures
from tests.model_fixtures import (
    N_CLASSES,
    N_FEATURES,
    FakeRuntime,
    softmax_runtime,
    softmax_weights,
)

INSTALLED_AT = 1_790_000_000.0

weights = model_fixtures.weights
runtime = model_fixtures.runtime


@pytest.fixture(scope="module")
def x() -> FloatArray:
    return np.random.default_rng(1).standard_normal((5, N_FEATURES)).astype(np.float32)


def loaded(runtime: ModelRuntime, version: int = 1, name: str = "digits") -> LoadedModel:
    return LoadedModel(
        name=name,
        version=version,
        sha256="ab" * 32,
        format="onnx",
        slot="a",
        runtime=runtime,
        installed_at=INSTALLED_AT,
    )


class Recorder:
    """A PredictionObserver that keeps every report."""

    def __init__(self) -> None:
        self.calls: list[tuple[float, bool]] = []

    def record(self, latency_s: float, *, ok: bool) -> None:
        self.calls.append((latency_s, ok))


def ticking(*values: float) -> Callable[[], float]:
    """A fake perf clock returning ``values`` in order."""
    it: Iterator[float] = iter(values)
    return lambda: next(it)


# --- no model -------------------------------------------------------------------------


def test_no_model() -> None:
    observer = Recorder()
    server = ModelServer(observer=observer, perf_clock=ticking(5.0, 5.5))

    assert server.active is None
    assert server.health() == {"status": "no_model", "model": None}
    with pytest.raises(NoModelError, match="no model"):
        server.predict([[1.0, 2.0]])
    assert observer.calls == [(0.5, False)]


# --- activation -----------------------------------------------------------------------


def test_activate_returns_previous(runtime: OnnxRuntimeModel) -> None:
    server = ModelServer()
    first, second = loaded(runtime, 1), loaded(runtime, 2)

    assert server.activate(first) is None
    assert server.active is first
    assert server.activate(second) is first
    assert server.active is second


def test_health_and_info(runtime: OnnxRuntimeModel) -> None:
    server = ModelServer()
    server.activate(loaded(runtime, 7))

    health = server.health()

    assert health["status"] == "ok"
    assert health["model"] == {
        "name": "digits",
        "version": 7,
        "sha256": "ab" * 32,
        "format": "onnx",
        "slot": "a",
        "installed_at": INSTALLED_AT,
        "inputs": [{"name": INPUT_NAME, "dtype": "float32", "shape": [None, N_FEATURES]}],
        "outputs": [{"name": OUTPUT_NAME, "dtype": "float32", "shape": [None, N_CLASSES]}],
    }
    assert json.loads(json.dumps(health)) == health


def test_in_flight_prediction_finishes_on_the_old_model() -> None:
    started, release = threading.Event(), threading.Event()

    def slow(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        started.set()
        assert release.wait(10)
        return {"y": feeds["x"] * 0}

    def fast(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        return {"y": feeds["x"] + 1}

    server = ModelServer()
    server.activate(loaded(FakeRuntime(slow), 1))
    results: list[Prediction] = []
    worker = threading.Thread(target=lambda: results.append(server.predict([[1.0, 2.0]])))
    worker.start()
    assert started.wait(10)

    server.activate(loaded(FakeRuntime(fast), 2))  # does not wait for the running call
    after = server.predict([[1.0, 2.0]])
    release.set()
    worker.join(10)

    assert after.version == 2
    np.testing.assert_array_equal(after.outputs["y"], [[2.0, 3.0]])
    assert [r.version for r in results] == [1]
    np.testing.assert_array_equal(results[0].outputs["y"], [[0.0, 0.0]])


# --- predictions ----------------------------------------------------------------------


def test_predict_array_like(
    runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: FloatArray
) -> None:
    observer = Recorder()
    server = ModelServer(observer=observer, perf_clock=ticking(100.0, 100.25))
    server.activate(loaded(runtime, 3))

    prediction = server.predict(x.astype(np.float64).tolist())  # converted to float32

    want = forward("softmax", weights, x)
    assert (prediction.model, prediction.version) == ("digits", 3)
    assert list(prediction.outputs) == [OUTPUT_NAME]
    np.testing.assert_allclose(prediction.outputs[OUTPUT_NAME], want, rtol=1e-5, atol=1e-6)
    assert prediction.labels == tuple(int(i) for i in want.argmax(axis=1))
    assert prediction.latency_ms == pytest.approx(250.0)
    [(latency_s, ok)] = observer.calls
    assert latency_s == pytest.approx(0.25)
    assert ok
    assert re.fullmatch(r"[A-Za-z0-9_-]{22}", prediction.id)  # 128 random bits


def test_prediction_ids_are_unique(runtime: OnnxRuntimeModel, x: FloatArray) -> None:
    server = ModelServer()
    server.activate(loaded(runtime))
    assert len({server.predict(x).id for _ in range(20)}) == 20


def test_one_dimensional_input_is_one_row(
    runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: FloatArray
) -> None:
    server = ModelServer()
    server.activate(loaded(runtime))

    prediction = server.predict(x[0].tolist())

    assert prediction.outputs[OUTPUT_NAME].shape == (1, N_CLASSES)
    np.testing.assert_allclose(
        prediction.outputs[OUTPUT_NAME], forward("softmax", weights, x[:1]), rtol=1e-5, atol=1e-6
    )
    assert prediction.labels is not None
    assert len(prediction.labels) == 1


def test_predict_mapping(
    runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: FloatArray
) -> None:
    server = ModelServer()
    server.activate(loaded(runtime))

    prediction = server.predict({INPUT_NAME: x.tolist()})

    np.testing.assert_allclose(
        prediction.outputs[OUTPUT_NAME], forward("softmax", weights, x), rtol=1e-5, atol=1e-6
    )


def test_mapping_converts_each_input_to_its_dtype() -> None:
    seen: dict[str, np.ndarray] = {}

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.update(feeds)
        return {"y": feeds["a"] + feeds["b"]}

    runtime = FakeRuntime(
        run,
        inputs=[TensorInfo("a", (None, 2), "float32"), TensorInfo("b", (None, 2), "int64")],
        outputs=[TensorInfo("y", (None, 2), "float32")],
    )
    server = ModelServer()
    server.activate(loaded(runtime))

    prediction = server.predict({"b": [[1, 2]], "a": [1.5, 2.5]})

    assert seen["a"].dtype == np.float32
    assert seen["a"].shape == (1, 2)  # 1-D -> one row, in the mapping form too
    assert seen["b"].dtype == np.int64
    np.testing.assert_array_equal(prediction.outputs["y"], [[2.5, 4.5]])
    with pytest.raises(ModelRuntimeError, match="pass them by name"):
        server.predict([[1.0, 2.0]])


@pytest.mark.parametrize(
    ("inputs", "message"),
    [
        ({"image": [[1.0] * N_FEATURES]}, r"missing \['input'\], unknown \['image'\]"),
        ({}, r"missing \['input'\]"),
        ([[1.0, 2.0], [3.0]], "cannot convert"),
        ([["a", "b", "c", "d"]], "cannot convert"),
        ([[1e39, 0.0, 0.0, 0.0]], "cannot convert input 'input' to float32"),
        ([[1.0, 2.0]], "shape"),
        (np.zeros((2, N_FEATURES, 1)), "shape"),
    ],
    ids=["unknown-name", "no-inputs", "ragged", "strings", "overflow", "features", "rank"],
)
def test_bad_inputs(runtime: OnnxRuntimeModel, inputs: object, message: str) -> None:
    observer = Recorder()
    server = ModelServer(observer=observer)
    server.activate(loaded(runtime))

    with pytest.raises(ModelRuntimeError, match=message):
        server.predict(inputs)  # type: ignore[arg-type]
    assert [ok for _, ok in observer.calls] == [False]


def test_unexpected_runtime_failure_is_reported_and_raised() -> None:
    def broken(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise RuntimeError("kaboom")

    observer = Recorder()
    server = ModelServer(observer=observer, perf_clock=ticking(1.0, 3.0))
    server.activate(loaded(FakeRuntime(broken)))

    with pytest.raises(RuntimeError, match="kaboom"):
        server.predict([[1.0, 2.0]])
    assert observer.calls == [(2.0, False)]


def test_a_failing_observer_does_not_fail_predictions(
    runtime: OnnxRuntimeModel, x: FloatArray, caplog: pytest.LogCaptureFixture
) -> None:
    class Broken:
        def record(self, latency_s: float, *, ok: bool) -> None:
            raise ValueError("telemetry is down")

    server = ModelServer(observer=Broken())
    server.activate(loaded(runtime))

    with caplog.at_level(logging.ERROR, logger="edge_agent.serving.server"):
        prediction = server.predict(x)

    assert prediction.labels is not None
    assert any(r.exc_info and "observer failed" in r.getMessage() for r in caplog.records)


@pytest.mark.parametrize(
    ("output", "labels"),
    [
        (np.array([[0.1, 0.9], [0.8, 0.2]], np.float32), (1, 0)),
        (np.array([0.1, 0.9], np.float32), None),
        (np.zeros((1, 2, 2), np.float32), None),
        (np.zeros((2, 0), np.float32), None),
    ],
    ids=["2d", "1d", "3d", "no-classes"],
)
def test_labels(output: np.ndarray, labels: tuple[int, ...] | None) -> None:
    server = ModelServer()
    server.activate(loaded(FakeRuntime(lambda feeds: {"y": output})))
    assert server.predict([[1.0, 2.0]]).labels == labels


def test_labels_come_from_the_first_output_in_model_order() -> None:
    runtime = FakeRuntime(
        lambda feeds: {
            "second": np.array([[1.0, 0.0]], np.float32),
            "first": np.array([[0.0, 1.0]], np.float32),
        },
        outputs=[
            TensorInfo("first", (None, 2), "float32"),
            TensorInfo("second", (None, 2), "float32"),
        ],
    )
    server = ModelServer()
    server.activate(loaded(runtime))
    assert server.predict([[1.0, 2.0]]).labels == (1,)


def test_to_json() -> None:
    output = np.array([[np.nan, 0.5], [np.inf, -np.inf]], np.float32)
    server = ModelServer(perf_clock=ticking(0.0, 0.002, 0.003))
    server.activate(loaded(FakeRuntime(lambda feeds: {"y": output}), 4, name="m"))

    prediction = server.predict([[1.0, 2.0]])
    body = prediction.to_json()

    assert body == {
        "id": prediction.id,
        "model": "m",
        "version": 4,
        "outputs": {"y": [[None, 0.5], [None, None]]},
        "labels": [0, 0],
        "latency_ms": pytest.approx(2.0),
    }
    json.dumps(body, allow_nan=False)  # strict JSON


def test_to_json_integer_outputs() -> None:
    output = np.array([[1, 2]], np.int64)
    server = ModelServer()
    server.activate(loaded(FakeRuntime(lambda feeds: {"y": output})))
    assert server.predict([[1.0, 2.0]]).to_json()["outputs"] == {"y": [[1, 2]]}


def test_values_are_frozen(runtime: OnnxRuntimeModel, x: FloatArray) -> None:
    server = ModelServer()
    model = loaded(runtime)
    server.activate(model)
    prediction = server.predict(x)
    with pytest.raises(dataclasses.FrozenInstanceError):
        prediction.version = 2  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        model.version = 2  # type: ignore[misc]


def test_concurrent_predictions_during_swaps(weights: dict[str, FloatArray], x: FloatArray) -> None:
    other = softmax_weights(9)
    models = {
        1: loaded(softmax_runtime(weights), 1),
        2: loaded(softmax_runtime(other), 2),
    }
    want = {1: forward("softmax", weights, x), 2: forward("softmax", other, x)}
    observer = Recorder()
    server = ModelServer(observer=observer)
    server.activate(models[1])
    errors: list[BaseException] = []
    seen: list[int] = []

    def worker() -> None:
        try:
            for _ in range(100):
                p = server.predict(x)
                np.testing.assert_allclose(p.outputs[OUTPUT_NAME], want[p.version], rtol=1e-5)
                seen.append(p.version)
        except BaseException as exc:  # noqa: BLE001 - reported by the main thread
            errors.append(exc)

    threads = [threading.Thread(target=worker) for _ in range(4)]
    for t in threads:
        t.start()
    version = 1
    while any(t.is_alive() for t in threads):
        version = 3 - version
        server.activate(models[version])
    for t in threads:
        t.join()

    assert errors == []
    assert set(seen) <= {1, 2}
    assert len(seen) == 400
    assert len(observer.calls) == 400
    assert all(ok for _, ok in observer.calls)
