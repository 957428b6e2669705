"""``POST /v1/feedback`` of the local endpoint, over real sockets on 127.0.0.1."""

from __future__ import annotations

import http.client
import json
import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from edge_agent.errors import (
    DataSourceError,
    InvalidLabelError,
    StateError,
    UnknownPredictionError,
)
from edge_agent.runtime.base import TensorInfo
from edge_agent.serving.http_api import FeedbackHandler, HttpConfig, LocalHttpServer
from edge_agent.serving.server import LoadedModel, ModelServer, Prediction
from edge_agent.training.feedback import FeedbackBuffer, FeedbackCollector, PredictionLog
from tests.model_fixtures import FakeRuntime

LOCAL = "127.0.0.1"
PATH = "/v1/feedback"

Address = tuple[str, int]
Handler = FeedbackHandler


class RecordingHandler:
    """A feedback handler that records its calls and answers or raises as told.

    A call with a label is recorded as ``(id, label)``, one with a target as ``(id,
    {"target": target})``.
    """

    def __init__(self, stored: int = 1, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stored = stored
        self.error = error

    def __call__(
        self, prediction_id: str, label: int | list[int] | None = None, *, target: Any = None
    ) -> int:
        self.calls.append((prediction_id, label if target is None else {"target": target}))
        if self.error is not None:
            raise self.error
        return self.stored


@pytest.fixture
def serve() -> Iterator[Callable[[Handler | None], Address]]:
    started: list[LocalHttpServer] = []

    def start(handler: Handler | None) -> Address:
        endpoint = LocalHttpServer(ModelServer(), HttpConfig(host=LOCAL, port=0), feedback=handler)
        endpoint.start()
        started.append(endpoint)
        return endpoint.address

    yield start
    for endpoint in started:
        endpoint.stop()


def call(
    address: Address, method: str, body: bytes | None = None, content_type: str | None = None
) -> tuple[int, dict[str, str], Any]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        headers = {} if content_type is None else {"Content-Type": content_type}
        conn.request(method, PATH, body=body, headers=headers)
        response = conn.getresponse()
        data = response.read()
        return response.status, dict(response.getheaders()), json.loads(data) if data else None
    finally:
        conn.close()


def post(address: Address, document: Any) -> tuple[int, Any]:
    body = document if isinstance(document, bytes) else json.dumps(document).encode()
    status, _, answer = call(address, "POST", body, "application/json")
    return status, answer


def error_code(answer: Any) -> str:
    assert set(answer) == {"error"}
    assert set(answer["error"]) == {"code", "message"}
    code: str = answer["error"]["code"]
    return code


# --------------------------------------------------------------------------- success


@pytest.mark.parametrize(
    ("label", "stored"),
    [(3, 1), (0, 1), ([2], 1), ([1, 0, 4], 3)],
)
def test_stored_count_and_handler_arguments(
    serve: Callable[[Handler | None], Address], label: int | list[int], stored: int
) -> None:
    handler = RecordingHandler(stored=stored)
    address = serve(handler)
    status, answer = post(address, {"prediction_id": "pred-1", "label": label})
    assert status == 200
    assert answer == {"stored": stored}
    assert handler.calls == [("pred-1", label)]
    assert type(handler.calls[0][1]) is type(label)


@pytest.mark.parametrize(
    "target", [21.5, 3, [0.5, -1.0], [[1.0, 2.0]], [[1, 2], [3.5, 4]]], ids=str
)
def test_targets_reach_the_handler_as_targets(
    serve: Callable[[Handler | None], Address], target: Any
) -> None:
    handler = RecordingHandler(stored=2)
    address = serve(handler)
    status, answer = post(address, {"prediction_id": "pred-1", "target": target})
    assert (status, answer) == (200, {"stored": 2})
    assert handler.calls == [("pred-1", {"target": target})]


def test_key_order_does_not_matter(serve: Callable[[Handler | None], Address]) -> None:
    handler = RecordingHandler()
    address = serve(handler)
    status, _ = post(address, b'{"label": 7, "prediction_id": "abc"}')
    assert status == 200
    assert handler.calls == [("abc", 7)]


def test_without_content_type_the_body_is_refused(
    serve: Callable[[Handler | None], Address],
) -> None:
    # A form or text/plain post from a web page needs no CORS preflight; a JSON one does.
    handler = RecordingHandler()
    address = serve(handler)
    status, _, answer = call(address, "POST", b'{"prediction_id": "p", "label": 1}')
    assert status == 415
    assert error_code(answer) == "unsupported_media_type"
    assert handler.calls == []


# --------------------------------------------------------------------------- malformed


@pytest.mark.parametrize(
    "body",
    [
        pytest.param(b"{not json", id="bad-json"),
        pytest.param(b"", id="empty-body"),
        pytest.param(b'{"prediction_id": "p", "label": NaN}', id="nan"),
        pytest.param(b'{"prediction_id": "p", "prediction_id": "q", "label": 1}', id="dup-key"),
        pytest.param(b"[1, 2]", id="array"),
        pytest.param(b'"text"', id="string"),
        pytest.param(b'{"label": 1}', id="missing-id"),
        pytest.param(b'{"prediction_id": "p"}', id="missing-label"),
        pytest.param(b"{}", id="empty-object"),
        pytest.param(b'{"prediction_id": "p", "label": 1, "extra": 0}', id="extra-key"),
        pytest.param(b'{"prediction_id": 5, "label": 1}', id="numeric-id"),
        pytest.param(b'{"prediction_id": null, "label": 1}', id="null-id"),
        pytest.param(b'{"prediction_id": "p", "label": 1.5}', id="float-label"),
        pytest.param(b'{"prediction_id": "p", "label": 1.0}', id="whole-float-label"),
        pytest.param(b'{"prediction_id": "p", "label": "1"}', id="string-label"),
        pytest.param(b'{"prediction_id": "p", "label": null}', id="null-label"),
        pytest.param(b'{"prediction_id": "p", "label": true}', id="bool-label"),
        pytest.param(b'{"prediction_id": "p", "label": [1, false]}', id="bool-in-list"),
        pytest.param(b'{"prediction_id": "p", "label": []}', id="empty-list"),
        pytest.param(b'{"prediction_id": "p", "label": [1, 2.5]}', id="float-in-list"),
        pytest.param(b'{"prediction_id": "p", "label": [[1]]}', id="nested-list"),
        pytest.param(b'{"prediction_id": "p", "label": {"a": 1}}', id="object-label"),
        pytest.param(b'{"prediction_id": "p", "label": 1, "target": 1.0}', id="label-and-target"),
        pytest.param(b'{"prediction_id": "p", "target": true}', id="bool-target"),
        pytest.param(b'{"prediction_id": "p", "target": "1.5"}', id="string-target"),
        pytest.param(b'{"prediction_id": "p", "target": null}', id="null-target"),
        pytest.param(b'{"prediction_id": "p", "target": []}', id="empty-target"),
        pytest.param(b'{"prediction_id": "p", "target": [[]]}', id="empty-outputs"),
        pytest.param(b'{"prediction_id": "p", "target": [1.0, [2.0]]}', id="mixed-target"),
        pytest.param(b'{"prediction_id": "p", "target": [[1.0], [1.0, 2.0]]}', id="ragged"),
        pytest.param(b'{"prediction_id": "p", "target": [[[1.0]]]}', id="too-deep"),
        pytest.param(b'{"prediction_id": "p", "target": [1.0, false]}', id="bool-in-target"),
        pytest.param(b'{"prediction_id": "p", "target": {"a": 1.0}}', id="object-target"),
        pytest.param(b'{"target": 1.0}', id="target-without-id"),
    ],
)
def test_malformed_bodies_never_reach_the_handler(
    serve: Callable[[Handler | None], Address], body: bytes
) -> None:
    handler = RecordingHandler()
    address = serve(handler)
    status, answer = post(address, body)
    assert status == 400
    assert error_code(answer) == "malformed"
    assert handler.calls == []


def test_wrong_content_type_is_refused(serve: Callable[[Handler | None], Address]) -> None:
    handler = RecordingHandler()
    address = serve(handler)
    status, _, answer = call(address, "POST", b'{"prediction_id": "p", "label": 1}', "text/plain")
    assert status == 415
    assert error_code(answer) == "unsupported_media_type"
    assert handler.calls == []


# --------------------------------------------------------------------------- handler errors


@pytest.mark.parametrize(
    ("error", "status", "code"),
    [
        (UnknownPredictionError("prediction p is unknown"), 404, "unknown_prediction"),
        (InvalidLabelError("label 12 is out of range"), 400, "bad_label"),
        (DataSourceError("rows have 3 features, buffer holds 4"), 400, DataSourceError.code),
        (StateError("disk full"), 503, "state_error"),
    ],
)
def test_handler_errors_map_to_statuses(
    serve: Callable[[Handler | None], Address], error: Exception, status: int, code: str
) -> None:
    handler = RecordingHandler(error=error)
    address = serve(handler)
    got, answer = post(address, {"prediction_id": "p", "label": 12})
    assert got == status
    assert error_code(answer) == code
    assert answer["error"]["message"] == str(error)
    assert handler.calls == [("p", 12)]


def test_unexpected_handler_error_is_a_bare_500(
    serve: Callable[[Handler | None], Address], caplog: pytest.LogCaptureFixture
) -> None:
    address = serve(RecordingHandler(error=RuntimeError("secret detail")))
    with caplog.at_level(logging.ERROR, logger="edge_agent.serving.http_api"):
        status, answer = post(address, {"prediction_id": "p", "label": 1})
    assert "secret detail" in caplog.text  # logged with its traceback, not answered
    assert status == 500
    assert error_code(answer) == "internal"
    assert "secret detail" not in json.dumps(answer)


# --------------------------------------------------------------------------- routing


def test_not_found_when_feedback_is_off(serve: Callable[[Handler | None], Address]) -> None:
    address = serve(None)
    status, answer = post(address, {"prediction_id": "p", "label": 1})
    assert status == 404
    assert error_code(answer) == "not_found"
    assert "feedback" in answer["error"]["message"]


@pytest.mark.parametrize("method", ["GET", "PUT", "DELETE"])
def test_other_methods_are_not_allowed(
    serve: Callable[[Handler | None], Address], method: str
) -> None:
    handler = RecordingHandler()
    address = serve(handler)
    status, headers, answer = call(address, method)
    assert status == 405
    assert headers["Allow"] == "POST"
    assert error_code(answer) == "method_not_allowed"
    assert handler.calls == []


# --------------------------------------------------------------------------- end to end


@pytest.fixture
def collector(tmp_path: Path) -> FeedbackCollector:
    return FeedbackCollector(PredictionLog(), FeedbackBuffer(tmp_path / "feedback", fsync=False))


def test_feedback_through_the_real_collector_lands_in_the_buffer(
    serve: Callable[[Handler | None], Address], collector: FeedbackCollector, tmp_path: Path
) -> None:
    address = serve(collector.record_feedback)
    assert collector.remember("pred-a", [[0.5, -1.0, 2.0, 0.25]])
    assert collector.remember("pred-b", [[1.0, 1.0, 1.0, 1.0], [2.0, 2.0, 2.0, 2.0]])

    assert post(address, {"prediction_id": "pred-a", "label": 3}) == (200, {"stored": 1})
    assert post(address, {"prediction_id": "pred-b", "label": [0, 1]}) == (200, {"stored": 2})

    data = collector.buffer.dataset()
    assert data is not None
    np.testing.assert_array_equal(
        data.x, np.array([[0.5, -1.0, 2.0, 0.25], [1, 1, 1, 1], [2, 2, 2, 2]], np.float32)
    )
    np.testing.assert_array_equal(data.y, [3, 0, 1])
    # on disk too: a fresh buffer over the same directory holds the same examples
    reopened = FeedbackBuffer(tmp_path / "feedback", fsync=False).dataset()
    assert reopened is not None
    np.testing.assert_array_equal(reopened.y, [3, 0, 1])


def test_real_collector_refusals(
    serve: Callable[[Handler | None], Address], collector: FeedbackCollector
) -> None:
    address = serve(collector.record_feedback)
    collector.remember("pred-1", [[0.0, 1.0]])
    collector.remember("pred-2", [[0.0, 1.0], [1.0, 0.0]])

    status, answer = post(address, {"prediction_id": "never-seen", "label": 1})
    assert (status, error_code(answer)) == (404, "unknown_prediction")

    status, answer = post(address, {"prediction_id": "pred-2", "label": 1})  # two rows
    assert (status, error_code(answer)) == (400, "bad_label")

    status, answer = post(address, {"prediction_id": "pred-1", "label": -1})
    assert (status, error_code(answer)) == (400, "bad_label")

    assert collector.buffer.dataset() is None  # nothing stored by refusals

    assert post(address, {"prediction_id": "pred-1", "label": 1}) == (200, {"stored": 1})
    status, answer = post(address, {"prediction_id": "pred-1", "label": 1})  # labelled already
    assert (status, error_code(answer)) == (404, "unknown_prediction")
    assert len(collector.buffer) == 1


def test_invalid_prediction_id_is_unknown(
    serve: Callable[[Handler | None], Address], collector: FeedbackCollector
) -> None:
    address = serve(collector.record_feedback)
    status, answer = post(address, {"prediction_id": "../../etc/passwd", "label": 1})
    assert (status, error_code(answer)) == (404, "unknown_prediction")


# ----------------------------------------------- any example shape, float targets


def image_model(collector: FeedbackCollector) -> ModelServer:
    """A model server over 1x2x3 images (3 classes) whose predictions the collector
    remembers, as the agent wires them."""

    def remember(prediction: Prediction, inputs: Any) -> None:
        collector.remember(prediction.id, inputs)

    runtime = FakeRuntime(
        lambda feeds: {"probabilities": np.full((len(feeds["input"]), 3), 1 / 3, np.float32)},
        inputs=[TensorInfo("input", (None, 1, 2, 3), "float32")],
        outputs=[TensorInfo("probabilities", (None, 3), "float32")],
    )
    server = ModelServer(on_prediction=remember)
    server.activate(
        LoadedModel(
            name="camera",
            version=1,
            sha256="0" * 64,
            format="onnx",
            slot="a",
            runtime=runtime,
            installed_at=1_790_000_000.0,
        )
    )
    return server


def post_to(address: Address, path: str, document: Any) -> tuple[int, Any]:
    conn = http.client.HTTPConnection(*address, timeout=10)
    try:
        body = json.dumps(document).encode()
        conn.request("POST", path, body=body, headers={"Content-Type": "application/json"})
        response = conn.getresponse()
        return response.status, json.loads(response.read())
    finally:
        conn.close()


@pytest.fixture
def image_endpoint(collector: FeedbackCollector) -> Iterator[Address]:
    endpoint = LocalHttpServer(
        image_model(collector),
        HttpConfig(host=LOCAL, port=0),
        feedback=collector.record_feedback,
    )
    with endpoint:
        yield endpoint.address


def test_image_predictions_are_labelled_over_http(
    image_endpoint: Address, collector: FeedbackCollector, tmp_path: Path
) -> None:
    images = np.arange(12, dtype=np.float32).reshape(2, 1, 2, 3)
    status, answer = post_to(image_endpoint, "/v1/predict", {"inputs": images.tolist()})
    assert status == 200
    stored = post(image_endpoint, {"prediction_id": answer["id"], "label": [2, 0]})
    assert stored == (200, {"stored": 2})
    data = FeedbackBuffer(tmp_path / "feedback", fsync=False).dataset()
    assert data is not None
    np.testing.assert_array_equal(data.x, images)
    assert data.labels.tolist() == [2, 0]


def test_a_regression_target_for_an_image_prediction(
    image_endpoint: Address, collector: FeedbackCollector
) -> None:
    image = np.ones((1, 1, 2, 3)).tolist()
    _, answer = post_to(image_endpoint, "/v1/predict", {"inputs": image})
    status, error = post(image_endpoint, {"prediction_id": answer["id"], "target": [1.0, 2.0]})
    assert (status, error_code(error)) == (400, "bad_label")  # 2 targets, 1 example
    assert "list of one list" in error["error"]["message"]
    assert post(image_endpoint, {"prediction_id": answer["id"], "target": [[1.0, 2.0]]}) == (
        200,
        {"stored": 1},
    )
    data = collector.buffer.dataset("regression")
    assert data is not None
    assert (data.x.shape, data.y.tolist()) == ((1, 1, 2, 3), [[1.0, 2.0]])
    # The buffer now holds targets: a class label for the next prediction does not fit.
    _, answer = post_to(image_endpoint, "/v1/predict", {"inputs": image})
    status, error = post(image_endpoint, {"prediction_id": answer["id"], "label": 1})
    assert (status, error_code(error)) == (400, "bad_data")
    assert "clear()" in error["error"]["message"]
    assert answer["id"] in collector.log  # kept for a retry
