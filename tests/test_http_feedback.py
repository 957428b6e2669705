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
from edge_agent.serving.http_api import HttpConfig, LocalHttpServer
from edge_agent.serving.server import ModelServer
from edge_agent.training.feedback import FeedbackBuffer, FeedbackCollector, PredictionLog

LOCAL = "127.0.0.1"
PATH = "/v1/feedback"

Address = tuple[str, int]
Handler = Callable[[str, "int | list[int]"], int]


class RecordingHandler:
    """A feedback handler that records its calls and answers or raises as told."""

    def __init__(self, stored: int = 1, error: Exception | None = None) -> None:
        self.calls: list[tuple[str, Any]] = []
        self.stored = stored
        self.error = error

    def __call__(self, prediction_id: str, label: int | list[int]) -> int:
        self.calls.append((prediction_id, label))
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


def test_key_order_does_not_matter(serve: Callable[[Handler | None], Address]) -> None:
    handler = RecordingHandler()
    address = serve(handler)
    status, _ = post(address, b'{"label": 7, "prediction_id": "abc"}')
    assert status == 200
    assert handler.calls == [("abc", 7)]


def test_without_content_type_the_body_is_read_as_json(
    serve: Callable[[Handler | None], Address],
) -> None:
    handler = RecordingHandler()
    address = serve(handler)
    status, _, answer = call(address, "POST", b'{"prediction_id": "p", "label": 1}')
    assert (status, answer) == (200, {"stored": 1})


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
