"""Explanations on the device: occlusion attributions, their limits, the HTTP route.

The models are built so that the right answer is known: a softmax model (ONNX, run
by onnxruntime) whose only non-zero weights are those of feature ``J``, an image
model that looks at one 4x4-grid patch, a sequence model that looks at one channel
late in the window. Each explanation must name that feature, patch or segment.
"""

from __future__ import annotations

import json
import logging
import re
import shlex
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from compress.families import FloatArray
from compress.keys import SigningKey
from compress.manifest import TensorSpec
from compress.onnx_export import export_onnx
from compress.profile import ReferenceProfile, profile_from_data
from coordinator.delivery.deliveries import Artifact
from coordinator.link.fleet import Target
from edge_agent.errors import ExplainError, InvalidInputError, ModelRuntimeError, NoModelError
from edge_agent.monitoring import ServingMonitor
from edge_agent.monitoring.explain import (
    MAX_EVALUATIONS,
    Occlusion,
    explain,
    occlusion_plan,
)
from edge_agent.protocol import TelemetryBatch, decode, encode
from edge_agent.runtime.base import ModelRuntime, TensorInfo
from edge_agent.runtime.onnx_runtime import OnnxRuntimeModel
from edge_agent.serving import http_routes
from edge_agent.serving.http_api import HttpConfig, LocalHttpServer
from edge_agent.serving.server import LoadedModel, ModelServer
from edge_agent.serving.telemetry import ProcessSampler, TelemetryCollector
from tests.conftest import make_manifest
from tests.fleet_support import (
    FEATURES,
    InProcessFleet,
    Mosquitto,
    coordinator,
    make_artifact,
    open_deliveries,
    wait_for,
)
from tests.model_fixtures import N_FEATURES, FakeRuntime, softmax_runtime, softmax_weights
from tests.test_http_api import call

D = 8
J = 5
RNG = np.random.default_rng(3)
TOKEN = "t" * 32


def _only_j_weights() -> dict[str, FloatArray]:
    w = np.zeros((D, 2), np.float32)
    w[J] = (-3.0, 3.0)
    return {"W0": w, "b0": np.zeros(2, np.float32)}


def _only_j_runtime() -> OnnxRuntimeModel:
    return OnnxRuntimeModel.from_bytes(export_onnx("softmax", _only_j_weights()))


def _reference() -> np.ndarray:
    return RNG.normal(loc=0.5, scale=1.0, size=(400, D)).astype(np.float32)


def _profile(runtime: ModelRuntime) -> ReferenceProfile:
    rows = _reference()
    return profile_from_data(rows, runtime.predict(rows), "classification")


def _loaded(runtime: ModelRuntime, profile: ReferenceProfile | None = None) -> LoadedModel:
    manifest = None
    if profile is not None:
        manifest = make_manifest(
            inputs=(TensorSpec("input", (None, D)),),
            outputs=(TensorSpec("probabilities", (None, 2)),),
            health_check=None,
            reference=profile,
        )
    return LoadedModel(
        name="only-j",
        version=2,
        sha256="cd" * 32,
        format="onnx",
        slot="a",
        runtime=runtime,
        installed_at=0.0,
        manifest=manifest,
    )


def _fake(
    fn: Callable[[np.ndarray], np.ndarray], shape: tuple[int | None, ...], outputs: int = 2
) -> tuple[FakeRuntime, list[int]]:
    """A FakeRuntime computing ``fn(rows)``; the list gets each call's row count."""
    calls: list[int] = []

    def run(feeds: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        rows = feeds["x"]
        calls.append(rows.shape[0])
        return {"y": np.asarray(fn(rows), np.float32)}

    runtime = FakeRuntime(
        run, [TensorInfo("x", shape, "float32")], [TensorInfo("y", (None, outputs), "float32")]
    )
    return runtime, calls


# --- the informative part is found ----------------------------------------------------


def test_vector_attributions_name_the_only_feature_that_matters() -> None:
    server = ModelServer()
    server.activate(_loaded(_only_j_runtime()))
    x = np.full(D, 0.2, np.float32)
    x[J] = 1.0
    result = server.explain(x)  # a 1-D input is one row, as for predict
    assert result.label == 1
    assert result.target == 1
    assert result.view == "vector"
    assert result.groups == (D,)
    assert result.baseline == "zero"
    assert result.evaluations == D + 2
    assert result.calls == 1
    attributions = np.array(result.attributions)
    assert int(np.argmax(attributions)) == J
    assert attributions[J] > 0.3
    np.testing.assert_allclose(np.delete(attributions, J), 0.0, atol=1e-6)
    assert not result.flat
    assert result.baseline_score == pytest.approx(0.5, abs=1e-6)  # all zeros: no evidence
    # the other class: the same feature, with the opposite sign
    other = server.explain(x, target=0)
    assert other.target == 0
    assert other.label == 1
    assert int(np.argmin(other.attributions)) == J
    assert other.attributions[J] < -0.3


def test_the_baseline_is_the_profile_median() -> None:
    runtime = _only_j_runtime()
    profile = _profile(runtime)
    plan = occlusion_plan((D,), profile)
    assert plan.source == "median"
    np.testing.assert_allclose(plan.baseline, profile.edge_array()[:, 4])
    assert plan.baseline[J] == pytest.approx(0.5, abs=0.2)  # the reference's centre
    server = ModelServer()
    server.activate(_loaded(runtime, profile))
    x = np.full((1, D), 0.5, np.float32)
    x[0, J] = 2.0
    result = server.explain(x)
    assert result.baseline == "median"
    assert int(np.argmax(result.attributions)) == J
    # hiding feature J at its median gives the all-median score
    assert result.score - result.attributions[J] == pytest.approx(result.baseline_score, abs=1e-5)


def test_image_attributions_name_the_patch_that_matters() -> None:
    def patch_score(rows: np.ndarray) -> np.ndarray:
        s = rows[:, 0, 0:2, 6:8].mean(axis=(1, 2))  # the top-right cell of a 4x4 grid
        return np.stack([-s, s], axis=1)

    runtime, calls = _fake(patch_score, (None, 1, 8, 8))
    server = ModelServer()
    server.activate(_loaded(runtime))
    image = np.ones((1, 1, 8, 8), np.float32)
    result = server.explain(image)
    assert result.view == "image"
    assert result.groups == (1, 4, 4)
    assert calls == [18]
    assert result.evaluations == 18
    assert int(np.argmax(result.attributions)) == 3  # row 0, column 3
    assert result.attributions[3] == pytest.approx(1.0)
    assert sum(abs(a) for i, a in enumerate(result.attributions) if i != 3) == 0


def test_sequence_attributions_name_the_channel_and_the_segment() -> None:
    def late_channel_2(rows: np.ndarray) -> np.ndarray:
        s = rows[:, 2, 15:].sum(axis=1)
        return np.stack([-s, s], axis=1)

    runtime, _calls = _fake(late_channel_2, (None, 3, 20))
    server = ModelServer()
    server.activate(_loaded(runtime))
    result = server.explain(np.ones((3, 20), np.float32)[np.newaxis])
    assert result.view == "sequence"
    assert result.groups == (3, 20)
    grid = np.array(result.attributions).reshape(3, 20)
    assert set(zip(*np.nonzero(grid), strict=True)) == {(2, t) for t in range(15, 20)}


def test_a_large_input_is_grouped_into_at_most_64_parts() -> None:
    plan = occlusion_plan((3, 32, 32), None)
    assert plan.groups == (3, 4, 4)
    assert plan.count == 48
    plan = occlusion_plan((1000,), None)
    assert plan.groups == (64,)
    assert set(np.unique(plan.ids)) == set(range(64))
    plan = occlusion_plan((40, 500), None)
    assert plan.groups == (8, 8)
    assert plan.count + 2 <= MAX_EVALUATIONS


def test_integer_inputs_get_a_rounded_clipped_baseline() -> None:
    seen: list[np.ndarray] = []

    def run(rows: np.ndarray) -> np.ndarray:
        seen.append(rows)
        return rows.astype(np.float32).sum(axis=1, keepdims=True)

    plan = Occlusion("vector", (2,), np.arange(2), np.array([300.4, 7.6]), "median")
    result = explain(run, np.array([[1, 2]], np.uint8), plan)
    assert seen[0].dtype == np.uint8
    assert seen[0].tolist() == [[1, 2], [255, 8], [255, 2], [1, 8]]
    assert result.label is None or result.label == 0
    assert result.attributions == (1 - 255, 2 - 8)


# --- limits and refusals ---------------------------------------------------------------


def test_a_fixed_batch_model_is_evaluated_in_calls_of_its_batch() -> None:
    runtime, calls = _fake(lambda rows: rows[:, :2], (1, 3))  # e.g. a TFLite model
    server = ModelServer()
    server.activate(_loaded(runtime))
    result = server.explain([[0.0, 2.0, 1.0]])
    assert calls == [1] * 5
    assert result.calls == 5
    assert result.evaluations == 5
    assert result.label == 1
    assert result.attributions == (0.0, 2.0, 0.0)


def test_padding_to_a_fixed_batch() -> None:
    calls: list[int] = []

    def run(rows: np.ndarray) -> np.ndarray:
        calls.append(rows.shape[0])
        return rows * 2

    result = explain(run, np.array([[1.0, 3.0]], np.float32), occlusion_plan((2,), None), batch=3)
    assert calls == [3, 3]
    assert result.calls == 2
    assert result.evaluations == 4
    assert result.target == 1
    assert result.attributions == (0.0, 6.0)


def test_more_than_one_example_is_refused(caplog: pytest.LogCaptureFixture) -> None:
    server = ModelServer()
    server.activate(_loaded(_only_j_runtime()))
    with caplog.at_level(logging.WARNING), pytest.raises(ExplainError) as info:
        server.explain(np.zeros((2, D), np.float32))
    assert info.value.reason == "examples"
    assert info.value.code == "cannot_explain"
    assert "refused to explain a prediction of only-j (examples)" in caplog.text


def test_a_target_outside_the_output_is_refused() -> None:
    server = ModelServer()
    server.activate(_loaded(_only_j_runtime()))
    with pytest.raises(ExplainError) as info:
        server.explain(np.zeros(D, np.float32), target=2)
    assert info.value.reason == "target"


def test_a_plan_over_the_bound_is_refused_before_the_model_runs() -> None:
    runs: list[int] = []
    big = Occlusion("vector", (100,), np.arange(100), np.zeros(100), "zero")
    with pytest.raises(ExplainError) as info:
        explain(lambda rows: runs.append(1) or rows, np.zeros((1, 100), np.float32), big)
    assert info.value.reason == "too_costly"
    assert runs == []


def test_a_model_with_several_inputs_is_refused() -> None:
    runtime = FakeRuntime(
        lambda feeds: {"y": np.zeros((1, 2), np.float32)},
        [TensorInfo("a", (None, 2), "float32"), TensorInfo("b", (None, 2), "float32")],
    )
    server = ModelServer()
    server.activate(_loaded(runtime))
    with pytest.raises(ExplainError) as info:
        server.explain({"a": [[0.0, 0.0]], "b": [[0.0, 0.0]]})
    assert info.value.reason == "inputs"


def test_bad_input_is_refused_as_for_predict_and_not_summarised() -> None:
    runtime = _only_j_runtime()
    monitor = ServingMonitor()
    server = ModelServer(monitor=monitor)
    model = _loaded(runtime, _profile(runtime))
    server.activate(model)
    for bad, reason in (
        ([np.nan] * D, "nan"),
        ([0.0] * (D - 1), "shape"),
        ([99.0] * D, "out_of_range"),
    ):
        with pytest.raises(InvalidInputError) as info:
            server.explain(bad)
        assert info.value.reason == reason
    server.explain(np.zeros(D, np.float32))
    summary = monitor.close(model.name, model.version, model.profile)
    assert summary is not None
    assert summary.n == 0
    assert summary.invalid.total == 0


def test_an_output_without_one_row_per_evaluation_is_a_runtime_error(
    caplog: pytest.LogCaptureFixture,
) -> None:
    plan = occlusion_plan((2,), None)
    with caplog.at_level(logging.ERROR), pytest.raises(ModelRuntimeError) as info:
        explain(lambda rows: rows[:1], np.zeros((1, 2), np.float32), plan, model="m")
    assert "expected 4 output rows" in str(info.value)
    assert "cannot explain: m: expected 4 output rows" in caplog.text


def test_non_finite_scores_are_null_in_json() -> None:
    def run(rows: np.ndarray) -> np.ndarray:
        out = rows.copy()
        out[2, 1] = np.inf  # hiding feature 0 blows the score up
        return out

    result = explain(run, np.ones((1, 2), np.float32), occlusion_plan((2,), None), target=1)
    answer = json.loads(json.dumps(result.to_json(), allow_nan=False))
    assert answer["attributions"] == [None, 1.0]


def test_a_score_no_part_moves_is_flagged_flat() -> None:
    saturated = np.array([[0.0, 254 / 255]], np.float32)  # an int8 softmax at its top
    result = explain(
        lambda rows: np.repeat(saturated, len(rows), axis=0),
        np.ones((1, 3), np.float32),
        occlusion_plan((3,), None),
    )
    assert result.flat
    assert result.to_json()["flat"] is True
    assert result.attributions == (0.0, 0.0, 0.0)


def test_no_model() -> None:
    with pytest.raises(NoModelError):
        ModelServer().explain([0.0])


# --- telemetry -----------------------------------------------------------------------------


def test_explanations_are_counted_apart_from_predictions() -> None:
    clock = [1000.0]
    telemetry = TelemetryCollector(
        clock=lambda: clock[0], process=ProcessSampler(clock=lambda: clock[0])
    )
    server = ModelServer(observer=telemetry, explanations=telemetry)
    server.activate(_loaded(_only_j_runtime()))
    server.predict(np.zeros(D, np.float32))
    server.explain(np.zeros(D, np.float32))
    server.explain(np.zeros(D, np.float32))
    assert telemetry.totals.predictions == 1
    assert telemetry.totals.explanations == 2
    record = telemetry.close_window(model="only-j", version=2)
    assert record.predictions == 1
    assert record.explanations == 2
    assert sum(record.histogram.counts) == 1
    batch = TelemetryBatch(seq=0, records=(record,))
    wire = encode(batch, sender="pi-1", sent_at=clock[0])
    assert b'"explanations":2' in wire.replace(b" ", b"")
    decoded = decode(wire).message
    assert isinstance(decoded, TelemetryBatch)
    assert decoded.records[0].explanations == 2
    quiet = telemetry.close_window(model="only-j", version=2)
    assert quiet.explanations == 0
    assert b"explanations" not in encode(
        TelemetryBatch(seq=1, records=(quiet,)), sender="pi-1", sent_at=1.0
    )


# --- over HTTP -----------------------------------------------------------------------------


@pytest.fixture
def endpoint() -> Iterator[tuple[str, int]]:
    server = ModelServer()
    server.activate(_loaded(_only_j_runtime()))
    with LocalHttpServer(server, HttpConfig(host="127.0.0.1", port=0, token=TOKEN)) as http:
        yield http.address


def _explain(address: tuple[str, int], body: object, token: str | None = TOKEN) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    status, _headers, answer = call(
        address, "POST", "/v1/explain", json.dumps(body).encode(), headers
    )
    return status, answer


def test_http_explain_answers_the_attributions(endpoint: tuple[str, int]) -> None:
    x = [0.2] * D
    x[J] = 1.0
    status, answer = _explain(endpoint, {"inputs": [x]})
    assert status == 200, answer
    assert answer["model"] == "only-j"
    assert answer["version"] == 2
    assert answer["label"] == 1
    assert answer["target"] == 1
    assert len(answer["attributions"]) == D
    assert int(np.argmax(answer["attributions"])) == J
    assert answer["evaluations"] == D + 2
    assert answer["calls"] == 1
    status, answer = _explain(endpoint, {"inputs": [x], "target": 0})
    assert status == 200
    assert answer["target"] == 0


@pytest.mark.parametrize(
    ("body", "status", "code", "reason"),
    [
        ({"inputs": [[0.0] * D, [0.0] * D]}, 422, "cannot_explain", "examples"),
        ({"inputs": [[0.0] * D], "target": 7}, 422, "cannot_explain", "target"),
        ({"inputs": [[0.0] * (D + 1)]}, 422, "invalid_input", "shape"),
        ({"inputs": [[0.0] * D], "target": -1}, 400, "malformed", None),
        ({"inputs": [[0.0] * D], "target": True}, 400, "malformed", None),
        ({"inputs": [[0.0] * D], "extra": 1}, 400, "malformed", None),
    ],
)
def test_http_explain_refusals(
    endpoint: tuple[str, int], body: object, status: int, code: str, reason: str | None
) -> None:
    got, answer = _explain(endpoint, body)
    assert got == status, answer
    assert answer["error"]["code"] == code
    assert answer["error"].get("reason") == reason


def test_http_explain_keeps_the_access_rules(endpoint: tuple[str, int]) -> None:
    status, answer = _explain(endpoint, {"inputs": [[0.0] * D]}, token=None)
    assert status == 401
    assert answer["error"]["code"] == "unauthorized"
    status, _headers, answer = call(
        endpoint, "GET", "/v1/explain", None, {"Authorization": f"Bearer {TOKEN}"}
    )
    assert status == 405


# --- Agent.explain on an in-process agent -----------------------------------------------------


@pytest.fixture
def broker_users() -> list[str]:
    return ["pi-1"]


@pytest.mark.slow
def test_agent_explain_uses_the_deployed_model_and_its_profile(
    tmp_path: Path, broker: Mosquitto, fleet: InProcessFleet, signing_key: SigningKey
) -> None:
    agent = fleet.start("pi-1", private_loop=True)
    coord = coordinator(broker)
    try:
        with pytest.raises(NoModelError):
            agent.explain(np.zeros(FEATURES, np.float32))
        wait_for(lambda: any(r.device_id == "pi-1" and r.online for r in coord.fleet()),
                 what="pi-1 online")  # fmt: skip
        artifact = Artifact.load(make_artifact(tmp_path, signing_key, version=1))
        with open_deliveries(coord) as ops:
            assert ops.wait(ops.deploy(artifact, Target.parse("all")), timeout=30).succeeded
        row = np.random.default_rng(4).random((1, FEATURES), dtype=np.float32)
        result = agent.explain(row)
        assert (result.model, result.version) == ("digits", 1)
        assert result.baseline == "median"
        assert agent.predict(row).labels == (result.label,)
        assert len(result.attributions) == FEATURES
        assert result.calls == 1
    finally:
        coord.stop()


def test_the_docstring_example_of_the_route_works() -> None:
    doc = http_routes.__doc__ or ""
    command = re.search(r"curl .*?/v1/explain", doc, re.DOTALL)
    shown = re.search(r"(\{\"model\".*?\})\n", doc, re.DOTALL)
    assert command is not None
    assert shown is not None
    args = shlex.split(command.group(0).replace("\\\n", " "))
    body = args[args.index("-d") + 1]
    server = ModelServer()
    server.activate(_loaded(softmax_runtime(softmax_weights(0))))
    with LocalHttpServer(server, HttpConfig(host="127.0.0.1", port=0)) as http:
        status, _headers, answer = call(
            http.address, "POST", "/v1/explain", body.encode(),
            {"Content-Type": "application/json"},
        )  # fmt: skip
    assert status == 200, answer
    assert set(answer) == set(json.loads(shown.group(1)))
    assert answer["target"] == 1
    assert len(answer["attributions"]) == N_FEATURES
