"""Tests for edge_agent.ota.health: the install-time health check."""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping

import numpy as np
import pytest

from compress.families import INPUT_NAME, OUTPUT_NAME, FloatArray, forward
from compress.manifest import HealthCheck, ReferenceTensor
from edge_agent.errors import HealthCheckError, InstallError, ModelRuntimeError
from edge_agent.ota.health import HealthReport, run_health_check
from edge_agent.runtime.base import ModelRuntime, TensorInfo
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from tests import model_fixtures
from tests.model_fixtures import N_CLASSES, N_FEATURES, FakeRuntime

weights = model_fixtures.weights
runtime = model_fixtures.runtime


@pytest.fixture(scope="module")
def x() -> np.ndarray:
    # float64 on purpose: the check converts reference inputs to the model's dtype.
    return np.random.default_rng(1).standard_normal((2, N_FEATURES))


def make_check(
    x: np.ndarray, expected: np.ndarray, output: str = OUTPUT_NAME, **kwargs: float
) -> HealthCheck:
    return HealthCheck(
        inputs={INPUT_NAME: ReferenceTensor.from_array(x)},
        outputs={output: ReferenceTensor.from_array(expected)},
        **kwargs,
    )


def clock(*values: float) -> Callable[[], float]:
    calls = iter(values)
    return lambda: next(calls)


class CountingRuntime(ModelRuntime):
    """Delegates to a real runtime and counts runs."""

    def __init__(self, inner: ModelRuntime) -> None:
        self.inner = inner
        self.runs = 0

    @property
    def inputs(self) -> list[TensorInfo]:
        return self.inner.inputs

    @property
    def outputs(self) -> list[TensorInfo]:
        return self.inner.outputs

    def run(self, feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        self.runs += 1
        return self.inner.run(feeds)


def test_pass(
    runtime: OnnxRuntimeModel,
    weights: dict[str, FloatArray],
    x: np.ndarray,
    caplog: pytest.LogCaptureFixture,
) -> None:
    expected = forward("softmax", weights, x.astype(np.float32))
    counting = CountingRuntime(runtime)

    with caplog.at_level(logging.INFO, logger="edge_agent.ota.health"):
        report = run_health_check(counting, make_check(x, expected), perf_clock=clock(10.0, 10.004))

    assert isinstance(report, HealthReport)
    assert report.outputs_checked == (OUTPUT_NAME,)
    assert report.latency_ms == pytest.approx(4.0)
    assert 0.0 <= report.max_abs_error < 1e-5
    assert counting.runs == 2  # one warm-up run, one timed run
    assert "health check passed" in caplog.text


@pytest.mark.parametrize(("offset", "passes"), [(0.015, True), (0.5, False)])
def test_tolerances(
    runtime: OnnxRuntimeModel,
    weights: dict[str, FloatArray],
    x: np.ndarray,
    offset: float,
    passes: bool,
) -> None:
    expected = forward("softmax", weights, x.astype(np.float32)) + np.float32(offset)
    check = make_check(x, expected, rtol=0.0, atol=0.02)
    if passes:
        report = run_health_check(runtime, check)
        assert report.max_abs_error == pytest.approx(offset, rel=1e-3)
    else:
        with pytest.raises(HealthCheckError) as info:
            run_health_check(runtime, check)
        assert str(info.value) == (
            f"output {OUTPUT_NAME!r} differs from the reference: max abs error 0.5 "
            "(rtol=0, atol=0.02)"
        )


def test_wrong_outputs(runtime: OnnxRuntimeModel, x: np.ndarray) -> None:
    expected = np.full((2, N_CLASSES), 1.0 / N_CLASSES, dtype=np.float32)
    expected[:, 0] = 1.0
    with pytest.raises(HealthCheckError, match=r"'probabilities' differs.*max abs error") as info:
        run_health_check(runtime, make_check(x, expected))
    assert isinstance(info.value, InstallError)
    assert info.value.code == "health_check_failed"


def test_latency_over_bound(
    runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: np.ndarray
) -> None:
    expected = forward("softmax", weights, x.astype(np.float32))
    check = make_check(x, expected, max_latency_ms=50.0)

    with pytest.raises(HealthCheckError, match=r"^latency 75\.0 ms over the 50 ms bound$"):
        run_health_check(runtime, check, perf_clock=clock(1.0, 1.075))
    # Exactly on the bound passes.
    report = run_health_check(runtime, check, perf_clock=clock(0.0, 0.05))
    assert report.latency_ms == pytest.approx(50.0)


def test_missing_output(runtime: OnnxRuntimeModel, x: np.ndarray) -> None:
    check = make_check(x, np.zeros((2, N_CLASSES), np.float32), output="scores")
    with pytest.raises(
        HealthCheckError,
        match=r"expects output 'scores', which the model does not produce "
        r"\(it produces \['probabilities'\]\)",
    ):
        run_health_check(runtime, check)


def test_output_shape_mismatch(
    runtime: OnnxRuntimeModel, weights: dict[str, FloatArray], x: np.ndarray
) -> None:
    # Same values, flattened: np.allclose alone would not notice a (1, 6) broadcast.
    expected = forward("softmax", weights, x.astype(np.float32)).reshape(1, -1)
    with pytest.raises(
        HealthCheckError, match=r"'probabilities' has shape \(2, 3\), the reference has \(1, 6\)"
    ):
        run_health_check(runtime, make_check(x, expected))


def test_single_row_reference_is_not_broadcast(runtime: OnnxRuntimeModel, x: np.ndarray) -> None:
    out = runtime.run({INPUT_NAME: x.astype(np.float32)})[OUTPUT_NAME]
    with pytest.raises(HealthCheckError, match="shape"):
        run_health_check(runtime, make_check(x, out[:1]))


@pytest.mark.parametrize(
    "inputs",
    [{"image": np.zeros((2, N_FEATURES))}, {}, {INPUT_NAME: np.zeros((2, 4)), "extra": [1.0]}],
    ids=["renamed", "none", "extra"],
)
def test_reference_inputs_must_match(runtime: OnnxRuntimeModel, inputs: dict[str, object]) -> None:
    check = HealthCheck(
        inputs={k: ReferenceTensor.from_array(v) for k, v in inputs.items()},  # type: ignore[arg-type]
        outputs={OUTPUT_NAME: ReferenceTensor.from_array(np.zeros((2, N_CLASSES), np.float32))},
    )
    with pytest.raises(HealthCheckError, match="reference inputs do not match the model"):
        run_health_check(runtime, check)


def test_runtime_error_is_wrapped(runtime: OnnxRuntimeModel) -> None:
    bad_input = np.zeros((2, N_FEATURES + 1))  # the model takes 4 features
    check = make_check(bad_input, np.zeros((2, N_CLASSES), np.float32))

    with pytest.raises(HealthCheckError) as info:
        run_health_check(runtime, check)

    assert str(info.value).startswith("the model failed on the reference inputs: ")
    assert "must have shape (?, 4)" in str(info.value)
    assert isinstance(info.value.__cause__, ModelRuntimeError)


def test_runtime_failure_message_is_kept() -> None:
    def fail(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        raise ModelRuntimeError("inference failed: kernel exploded")

    failing = FakeRuntime(
        fail, [TensorInfo("x", (None, 1), "float32")], [TensorInfo("y", (None, 1), "float32")]
    )
    check = HealthCheck(
        inputs={"x": ReferenceTensor.from_array(np.zeros((1, 1), np.float32))},
        outputs={"y": ReferenceTensor.from_array(np.zeros((1, 1), np.float32))},
    )
    with pytest.raises(HealthCheckError, match="kernel exploded"):
        run_health_check(failing, check)


def test_reference_input_converted_to_integer_dtype() -> None:
    seen: dict[str, np.ndarray] = {}

    def echo(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        seen.update(feeds)
        return {"out": feeds["ids"] > 1}

    echoing = FakeRuntime(
        echo, [TensorInfo("ids", (None,), "int64")], [TensorInfo("out", (None,), "bool")]
    )
    check = HealthCheck(
        inputs={"ids": ReferenceTensor.from_array(np.array([1.0, 2.0, 3.0]))},
        outputs={"out": ReferenceTensor.from_array(np.array([False, True, True]))},
        rtol=0.0,
        atol=0.0,
    )
    report = run_health_check(echoing, check)

    assert seen["ids"].dtype == np.int64
    assert report.max_abs_error == 0.0


def test_non_finite_output_fails(runtime: OnnxRuntimeModel) -> None:
    nan = FakeRuntime(
        lambda feeds: {"y": np.array([np.nan], np.float32)},
        [TensorInfo("x", (1,), "float32")],
        [TensorInfo("y", (1,), "float32")],
    )
    check = HealthCheck(
        inputs={"x": ReferenceTensor.from_array(np.zeros(1, np.float32))},
        outputs={"y": ReferenceTensor.from_array(np.zeros(1, np.float32))},
    )
    with pytest.raises(HealthCheckError, match="max abs error nan"):
        run_health_check(nan, check)
