"""On-device monitoring: input validation, window summaries, their way into telemetry."""

from __future__ import annotations

import logging

import numpy as np
import pytest

from compress.families import forward
from compress.manifest import Manifest, TensorSpec
from compress.profile import ReferenceProfile, bin_counts, features, profile_from_data
from edge_agent.errors import InvalidInputError, ModelRuntimeError
from edge_agent.monitoring import ServingMonitor, SummaryWindow, check_input
from edge_agent.protocol import WindowSummary
from edge_agent.runtime.base import TensorInfo
from edge_agent.serving.server import LoadedModel, ModelServer
from edge_agent.serving.telemetry import ProcessSampler, TelemetryCollector
from tests.conftest import make_manifest
from tests.model_fixtures import N_CLASSES, N_FEATURES, softmax_runtime, softmax_weights

RNG = np.random.default_rng(11)
WEIGHTS = softmax_weights(0)
REFERENCE = RNG.normal(size=(500, N_FEATURES)).astype(np.float32)


def _profile() -> ReferenceProfile:
    return profile_from_data(REFERENCE, forward("softmax", WEIGHTS, REFERENCE), "classification")


def _manifest(profile: ReferenceProfile | None) -> Manifest:
    return make_manifest(
        inputs=(TensorSpec("input", (None, N_FEATURES)),),
        outputs=(TensorSpec("probabilities", (None, N_CLASSES)),),
        health_check=None,
        reference=profile,
    )


def _loaded(profile: ReferenceProfile | None, version: int = 1) -> LoadedModel:
    return LoadedModel(
        name="digits",
        version=version,
        sha256="ab" * 32,
        format="onnx",
        slot="a",
        runtime=softmax_runtime(WEIGHTS),
        installed_at=0.0,
        manifest=_manifest(profile),
    )


# --- check_input ---------------------------------------------------------------------

SPEC = TensorInfo("input", (None, 3), "float32")


@pytest.mark.parametrize(
    ("x", "value_range", "reason"),
    [
        (np.zeros((2, 3), np.float32), (-1.0, 1.0), None),
        (np.zeros((2, 4), np.float32), None, "shape"),
        (np.zeros((2, 3, 1), np.float32), None, "shape"),
        (np.array([[0.0, np.nan, 0.0]], np.float32), None, "nan"),
        (np.array([[0.0, np.inf, 0.0]], np.float32), (-1.0, 1.0), "nan"),
        (np.array([[0.0, 1.5, 0.0]], np.float32), (-1.0, 1.0), "out_of_range"),
        (np.array([[-1.5, 0.0, 0.0]], np.float32), (-1.0, 1.0), "out_of_range"),
        (np.array([[5, 6, 7]], np.int64), None, None),
        (np.zeros((0, 3), np.float32), (-1.0, 1.0), None),
    ],
)
def test_check_input(
    x: np.ndarray, value_range: tuple[float, float] | None, reason: str | None
) -> None:
    problem = check_input(x, SPEC, value_range)
    assert (problem.reason if problem else None) == reason


# --- refusals by the model server ----------------------------------------------------


@pytest.mark.parametrize(
    ("inputs", "reason"),
    [
        ([[1.0, 2.0, 3.0]], "shape"),
        ([[1.0, float("nan"), 0.0, 0.0]], "nan"),
        ([[1e6, 0.0, 0.0, 0.0]], "out_of_range"),
        ([["a", "b", "c", "d"]], "dtype"),
        ({"image": [[0.0] * 4]}, "shape"),
    ],
)
def test_invalid_inputs_are_refused_counted_and_logged(
    inputs: object, reason: str, caplog: pytest.LogCaptureFixture
) -> None:
    monitor = ServingMonitor()
    server = ModelServer(monitor=monitor)
    model = _loaded(_profile())
    server.activate(model)
    with (
        caplog.at_level(logging.WARNING, logger="edge_agent.monitoring.validation"),
        pytest.raises(InvalidInputError) as info,
    ):
        server.predict(inputs)  # type: ignore[arg-type]
    assert info.value.reason == reason
    assert info.value.code == "invalid_input"
    assert isinstance(info.value, ModelRuntimeError)  # callers catching the base still do
    assert f"({reason})" in caplog.text
    summary = monitor.close(model.name, model.version, model.profile)
    assert summary is not None
    assert summary.n == 0
    assert getattr(summary.invalid, reason) == 1
    assert summary.invalid.total == 1


def test_out_of_range_needs_a_profile() -> None:
    server = ModelServer(monitor=ServingMonitor())
    server.activate(_loaded(None))
    prediction = server.predict([[1e6, 0.0, 0.0, 0.0]])  # no reference range: served
    assert prediction.labels is not None
    with pytest.raises(InvalidInputError, match="NaN"):
        server.predict([[np.nan, 0.0, 0.0, 0.0]])


def test_valid_inputs_are_served_as_without_monitoring() -> None:
    x = RNG.normal(size=(7, N_FEATURES)).astype(np.float32)
    plain = ModelServer()
    plain.activate(_loaded(_profile()))
    watched = ModelServer(monitor=ServingMonitor())
    watched.activate(_loaded(_profile()))
    np.testing.assert_array_equal(
        plain.predict(x).outputs["probabilities"], watched.predict(x).outputs["probabilities"]
    )


# --- summaries -----------------------------------------------------------------------


def test_summary_counts_match_the_inputs_sent() -> None:
    profile = _profile()
    monitor = ServingMonitor()
    server = ModelServer(monitor=monitor)
    model = _loaded(profile)
    server.activate(model)
    batches = [RNG.normal(size=(n, N_FEATURES)).astype(np.float32) for n in (1, 5, 30)]
    for batch in batches:
        server.predict(batch)
    server.predict(batches[0][0])  # one row as a 1-D input
    sent = np.concatenate([*batches, batches[0][:1]])
    summary = monitor.close(model.name, model.version, profile)
    assert summary is not None
    assert summary.n == len(sent)
    want = bin_counts(profile.edge_array(), features(sent))
    np.testing.assert_array_equal(summary.feature_counts(), want)
    probs = forward("softmax", WEIGHTS, sent)
    assert summary.classes == tuple(np.bincount(probs.argmax(axis=1), minlength=N_CLASSES))
    assert summary.confidence is not None
    conf_bins = np.minimum((probs.max(axis=1) * 10).astype(int), 9)
    assert summary.confidence == tuple(np.bincount(conf_bins, minlength=10))
    assert WindowSummary.from_json(summary.to_json()) == summary
    # The window restarted.
    after = monitor.close(model.name, model.version, profile)
    assert after is not None
    assert after.n == 0


def test_a_new_model_starts_a_new_window(caplog: pytest.LogCaptureFixture) -> None:
    profile = _profile()
    monitor = ServingMonitor()
    server = ModelServer(monitor=monitor)
    server.activate(_loaded(profile, version=1))
    server.predict(REFERENCE[:3])
    server.activate(_loaded(profile, version=2))
    with caplog.at_level(logging.INFO, logger="edge_agent.monitoring.summary"):
        server.predict(REFERENCE[:2])
    assert "dropping the partial summary window of digits v1 (3 examples)" in caplog.text
    summary = monitor.close("digits", 2, profile)
    assert summary is not None
    assert summary.n == 2


def test_no_profile_no_summary() -> None:
    monitor = ServingMonitor()
    server = ModelServer(monitor=monitor)
    server.activate(_loaded(None))
    server.predict(REFERENCE[:3])
    assert monitor.close("digits", 1, None) is None


def test_summary_window_of_a_reconstruction_profile() -> None:
    x = RNG.normal(size=(300, 2, 16)).astype(np.float32)
    scores = RNG.random(300).astype(np.float32)
    profile = profile_from_data(x, scores, "reconstruction")
    window = SummaryWindow(profile)
    window.add(x[:50], scores[:50])
    window.refuse("nan")
    summary = window.close()
    assert summary.n == 50
    assert summary.classes is None
    assert summary.confidence is not None
    assert sum(summary.confidence) == 50
    assert summary.feature_counts().shape == (4, 10)
    assert summary.invalid.nan == 1


def test_telemetry_record_carries_the_summary() -> None:
    now = [100.0]

    def clock() -> float:
        return now[0]

    collector = TelemetryCollector(
        clock=clock, process=ProcessSampler(clock=clock, cpu_time=lambda: 0.0, rss=lambda: 1)
    )
    window = SummaryWindow(_profile())
    window.add(REFERENCE[:4], forward("softmax", WEIGHTS, REFERENCE[:4]))
    now[0] = 160.0
    record = collector.close_window(model="digits", version=1, summary=window.close())
    assert record.summary is not None
    assert record.summary.n == 4
    assert (record.window_start, record.window_end) == (100.0, 160.0)
    assert collector.close_window(model=None, version=None).summary is None


def test_buffered_rows_are_all_binned() -> None:
    profile = _profile()
    window = SummaryWindow(profile)
    batches = [REFERENCE[i : i + 100] for i in range(0, 500, 100)] + [REFERENCE]  # 500 > buffer
    for batch in batches:
        window.add(batch, forward("softmax", WEIGHTS, batch))
    summary = window.close()
    sent = np.concatenate(batches)
    assert summary.n == len(sent) == 1000
    want = bin_counts(profile.edge_array(), features(sent))
    np.testing.assert_array_equal(summary.feature_counts(), want)
    assert sum(summary.classes or ()) == 1000


def test_int8_probabilities_are_not_mistaken_for_logits() -> None:
    """An int8 softmax head's rows miss a sum of 1 by quantization steps; the profile
    says the outputs are probabilities, so the device takes them as they are."""
    x = RNG.normal(size=(200, N_FEATURES)).astype(np.float32)
    probs = forward("softmax", WEIGHTS, x)
    profile = profile_from_data(x, probs, "classification")
    assert profile.confidence is not None
    assert not profile.confidence.logits
    quantized = np.round(probs * 255) / 255  # rows sum to 1 only within ~K/510
    assert np.abs(quantized.sum(axis=1) - 1).max() > 1e-3
    window = SummaryWindow(profile)
    window.add(x, quantized)
    summary = window.close()
    conf_bins = np.minimum((quantized.max(axis=1) * 10).astype(int), 9)
    assert summary.confidence == tuple(np.bincount(conf_bins, minlength=10))
