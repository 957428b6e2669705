"""The JSON routes of the local inference endpoint: a request body in, an answer out.

:mod:`edge_agent.serving.http_api` reads and checks the request (access, length,
media type) and calls one of these with the body; each returns the 200 answer or
raises a :class:`~edge_agent.serving.http_bodies.RequestError` that the endpoint
sends as is. Typed errors of the model server map to statuses in one place
(:func:`_model_errors`):

* :func:`predict_route` (``POST /v1/predict``): :meth:`ModelServer.predict`;
* :func:`feedback_route` (``POST /v1/feedback``): the agent's feedback handler;
* :func:`explain_route` (``POST /v1/explain``): :meth:`ModelServer.explain`, the
  occlusion attributions of one input (:mod:`edge_agent.monitoring.explain`),
  e.g.::

    curl -s -H 'Content-Type: application/json' \\
         -d '{"inputs": [[0.5, -1.0, 2.0, 0.25]], "target": 1}' \\
         http://127.0.0.1:8080/v1/explain

    {"model":"iris","version":3,"target":1,"label":1,"score":0.71,
     "baseline_score":0.2,"attributions":[0.01,0.02,0.55,0.3],"view":"vector",
     "groups":[4],"baseline":"median","flat":false,"evaluations":6,"calls":1,
     "latency_ms":0.4}

Every error is JSON, ``{"error": {"code": "...", "message": "..."}}``:

====  ==========================================================================
400   ``malformed``: the body is not one strict JSON object (parsed by
      :func:`compress.strictjson.loads_strict`: ``NaN``, ``Infinity``, numbers
      that overflow a double, duplicate keys, lone surrogates and nesting deeper
      than :data:`edge_agent.serving.http_bodies.MAX_JSON_DEPTH` are refused), not an object with
      exactly the key ``inputs``, or holds something other than numbers and lists;
      a bad ``Content-Length``. ``runtime_error``: the runtime failed on the inputs.
401   ``unauthorized``: a bearer token is configured and the request (to any path
      but ``/v1/health``) lacks ``Authorization: Bearer <token>`` or has another
      one; with a ``WWW-Authenticate: Bearer`` header.
404   ``not_found``: unknown path; ``no_model`` on ``GET /v1/model``.
405   ``method_not_allowed`` (with an ``Allow`` header).
408   ``timeout``: the body did not arrive within ``timeout_s``.
411   ``length_required``: no ``Content-Length`` (chunked bodies are not accepted).
413   ``too_large``: ``Content-Length`` over ``max_body_bytes``, refused before
      reading the body.
415   ``unsupported_media_type``: a POST body without ``Content-Type:
      application/json`` (a ``charset`` parameter, if any, must be ``utf-8``).
      Required, so that a web page cannot post to the endpoint without a CORS
      preflight (which it never grants).
421   ``host_not_allowed``: the ``Host`` header is missing or names a host this
      endpoint does not answer to (DNS rebinding; see
      :mod:`edge_agent.serving.http_access`).
422   ``invalid_input``: the inputs do not fit the served model's manifest; the
      error carries ``"reason"``: ``dtype`` (cannot be converted to the input's
      dtype), ``shape`` (rank, fixed dimensions or input names), ``nan`` (NaN or
      infinite values) or ``out_of_range`` (outside the reference profile's value
      range). Refused before the model runs, logged, and counted by reason in the
      telemetry window summary (:mod:`edge_agent.monitoring`).
      ``cannot_explain`` (``POST /v1/explain``): the error carries ``"reason"``:
      ``examples`` (not exactly one example), ``inputs`` (a model with several
      inputs), ``target`` (not a column of the model's first output) or
      ``too_costly`` (more than
      :data:`~edge_agent.monitoring.explain.MAX_EVALUATIONS` evaluations).
500   ``internal``: an unexpected error, logged with its traceback; the response
      says nothing more.
503   ``no_model``: no model is installed yet.
====  ==========================================================================
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any, Protocol

from edge_agent.errors import (
    ExplainError,
    InvalidInputError,
    ModelRuntimeError,
    NoModelError,
    StateError,
    TrainingError,
    UnknownPredictionError,
)
from edge_agent.serving.http_bodies import (
    RequestError,
    parse_explain_body,
    parse_feedback_body,
    parse_predict_body,
)
from edge_agent.serving.server import ModelServer

__all__ = ["FeedbackHandler", "explain_route", "feedback_route", "predict_route"]


class FeedbackHandler(Protocol):
    """Stores the label(s) or target(s) of a prediction; returns how many examples.

    Called as ``handler(prediction_id, label)`` or ``handler(prediction_id,
    target=target)``, with the values of :class:`~edge_agent.serving.http_bodies.FeedbackBody`.
    """

    def __call__(
        self,
        prediction_id: str,
        label: int | list[int] | None = None,
        *,
        target: float | list[float] | list[list[float]] | None = None,
    ) -> int:
        """Store the feedback; raise the agent's typed errors when it cannot be."""
        ...


@contextlib.contextmanager
def _model_errors() -> Iterator[None]:
    """The model server's typed errors as responses: 503, 422 (with the reason), 400."""
    try:
        yield
    except NoModelError as exc:
        raise RequestError(503, exc.code, str(exc)) from exc
    except (InvalidInputError, ExplainError) as exc:
        raise RequestError(422, exc.code, str(exc), reason=exc.reason) from exc
    except ModelRuntimeError as exc:
        raise RequestError(400, exc.code, str(exc)) from exc


def predict_route(models: ModelServer, body: bytes) -> dict[str, Any]:
    """``POST /v1/predict``: the prediction's JSON form."""
    inputs = parse_predict_body(body)
    with _model_errors():
        prediction = models.predict(inputs)
    return prediction.to_json()


def explain_route(models: ModelServer, body: bytes) -> dict[str, Any]:
    """``POST /v1/explain``: the explanation's JSON form."""
    inputs, target = parse_explain_body(body)
    with _model_errors():
        explanation = models.explain(inputs, target)
    return explanation.to_json()


def feedback_route(handler: FeedbackHandler | None, body: bytes) -> dict[str, Any]:
    """``POST /v1/feedback``: ``{"stored": N}``; 404 when feedback is off."""
    if handler is None:
        raise RequestError(404, "not_found", "labelled feedback is off on this agent")
    feedback = parse_feedback_body(body)
    try:
        if feedback.target is not None:
            stored = handler(feedback.prediction_id, target=feedback.target)
        else:
            stored = handler(feedback.prediction_id, feedback.label)
    except UnknownPredictionError as exc:
        raise RequestError(404, exc.code, str(exc)) from exc
    except TrainingError as exc:
        raise RequestError(400, exc.code, str(exc)) from exc
    except StateError as exc:
        raise RequestError(503, exc.code, str(exc)) from exc
    return {"stored": stored}
