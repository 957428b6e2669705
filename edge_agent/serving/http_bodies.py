"""Request bodies of the local inference endpoint: strict JSON in, checked values out.

:mod:`edge_agent.serving.http_api` reads a body (bounded by its ``Content-Length``)
and hands it here:

* :func:`parse_predict_body`: ``{"inputs": [[...], ...]}`` or
  ``{"inputs": {"name": [[...]]}}``, numbers and lists only;
* :func:`parse_feedback_body`: ``{"prediction_id": "...", "label": N or [N, ...]}``
  (class labels) or ``{"prediction_id": "...", "target": X or [X, ...] or [[X, ...],
  ...]}`` (a regression model's true values: one number per example, or a list of
  its outputs per example);
* :func:`parse_explain_body`: a predict body with an optional ``"target"`` (a
  class index, an integer >= 0);
* :func:`is_json_media_type`: whether a declared ``Content-Type`` is JSON in UTF-8.

Bodies are parsed by :func:`compress.strictjson.loads_strict`, the project's one
strict parser (no ``NaN``/``Infinity``, no numbers that overflow a double, no
duplicate keys, no lone surrogates, nesting at most :data:`MAX_JSON_DEPTH`);
whitespace around the object is allowed (RFC 8259; some clients end the body with
a newline). Every refusal is a :class:`RequestError` (a
:class:`~edge_agent.errors.ProtocolError`) that the endpoint answers as is: status
400, code ``malformed``, and the reason.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from compress.strictjson import loads_strict
from edge_agent.errors import ProtocolError

__all__ = [
    "MAX_JSON_DEPTH",
    "FeedbackBody",
    "RequestError",
    "is_json_media_type",
    "parse_explain_body",
    "parse_feedback_body",
    "parse_predict_body",
]

MAX_JSON_DEPTH = 32
"""Deepest nesting of a request body (a batch of 4-D inputs by name needs 6)."""

_JSON_WHITESPACE = b" \t\r\n"


class RequestError(ProtocolError):
    """An error response: status, stable code, message, extra headers, and for a
    refused input (422) the reason it was refused.

    Raised by the endpoint too (:mod:`edge_agent.serving.http_api`), and subclassed
    by the access checks (:mod:`edge_agent.serving.http_access`).
    """

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        headers: Mapping[str, str] | None = None,
        *,
        reason: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers: Mapping[str, str] = dict(headers or {})
        self.reason = reason


_JSON_TYPES = {str: "a string", dict: "an object", type(None): "null"}


def _check_numbers(value: Any, where: str) -> None:
    """Raise 400 unless ``value`` is a number or nested lists of numbers (booleans ok).

    Iterative, so deep nesting cannot exhaust the stack.
    """
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, list):
            stack.extend(item)
        elif not isinstance(item, int | float):  # bool is an int
            found = _JSON_TYPES.get(type(item), type(item).__name__)
            raise RequestError(
                400, "malformed", f"{where} must hold only numbers and lists, found {found}"
            )


def is_json_media_type(value: str) -> bool:
    """``application/json``, optionally with ``charset=utf-8`` (any case, quoted or not)."""
    media_type, *params = (part.strip() for part in value.split(";"))
    if media_type.lower() != "application/json":
        return False
    for param in params:
        key, _, val = param.partition("=")
        if key.strip().lower() == "charset" and val.strip().strip('"').lower() not in (
            "utf-8",
            "utf8",
        ):
            return False
    return True


def _parse_object(body: bytes) -> dict[str, Any]:
    """A strict JSON object (:func:`compress.strictjson.loads_strict`).

    Whitespace around the object is allowed (RFC 8259; some clients end the body with
    a newline); everything else the strict parser refuses is refused here.

    Raises:
        RequestError: 400, the body is not one strict JSON object.
    """
    try:
        return loads_strict(
            body.strip(_JSON_WHITESPACE), ValueError, what="the body", max_depth=MAX_JSON_DEPTH
        )
    except ValueError as exc:
        raise RequestError(400, "malformed", str(exc)) from None


@dataclass(frozen=True)
class FeedbackBody:
    """A checked feedback request: the prediction and exactly one of label and target.

    Attributes:
        prediction_id: The id ``/v1/predict`` answered with.
        label: Class index(es): an int, or a non-empty list of ints.
        target: True value(s): a number, a non-empty list of numbers, or a non-empty
            list of equally long non-empty lists of numbers.
    """

    prediction_id: str
    label: int | list[int] | None = None
    target: float | list[float] | list[list[float]] | None = None


_FEEDBACK_FORM = (
    'the body must be {"prediction_id": "...", "label": N or [N, ...]} or '
    '{"prediction_id": "...", "target": X or [X, ...] or [[X, ...], ...]}'
)


def _is_number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _is_target(value: object) -> bool:
    """A number, a non-empty list of numbers, or of equally long lists of numbers."""
    if _is_number(value):
        return True
    if not isinstance(value, list) or not value:
        return False
    if all(_is_number(item) for item in value):
        return True
    return (
        all(isinstance(item, list) and item and all(_is_number(v) for v in item) for item in value)
        and len({len(item) for item in value}) == 1
    )


def parse_feedback_body(body: bytes) -> FeedbackBody:
    """The ``prediction_id`` and ``label`` or ``target`` of a feedback request body.

    Raises:
        RequestError: 400, not of the form :data:`_FEEDBACK_FORM` describes.
    """
    doc = _parse_object(body)
    if set(doc) not in ({"prediction_id", "label"}, {"prediction_id", "target"}):
        raise RequestError(400, "malformed", _FEEDBACK_FORM)
    prediction_id = doc["prediction_id"]
    if not isinstance(prediction_id, str):
        raise RequestError(400, "malformed", '"prediction_id" must be a string')
    if "target" in doc:
        target = doc["target"]
        if not _is_target(target):
            raise RequestError(
                400,
                "malformed",
                '"target" must be a number, a list of numbers (one per example) or a list '
                "of equally long lists of numbers (the outputs of each example)",
            )
        return FeedbackBody(prediction_id, target=target)
    label = doc["label"]
    labels = label if isinstance(label, list) else [label]
    if not labels or not all(isinstance(x, int) and not isinstance(x, bool) for x in labels):
        raise RequestError(400, "malformed", '"label" must be an integer or a list of integers')
    return FeedbackBody(prediction_id, label=label)


def parse_predict_body(body: bytes) -> Any:
    """The ``inputs`` of a predict request body.

    Raises:
        RequestError: 400, the body is not strict JSON of the expected form.
    """
    return _inputs(_parse_object(body), {"inputs"})


def parse_explain_body(body: bytes) -> tuple[Any, int | None]:
    """The ``inputs`` and optional ``target`` of an explain request body.

    Raises:
        RequestError: 400, the body is not strict JSON of the expected form.
    """
    doc = _parse_object(body)
    inputs = _inputs(doc, {"inputs", "target"})
    target = doc.get("target")
    if target is not None and (isinstance(target, bool) or not isinstance(target, int)):
        raise RequestError(400, "malformed", '"target" must be an integer (a class index)')
    if target is not None and target < 0:
        raise RequestError(400, "malformed", '"target" must be >= 0')
    return inputs, target


def _inputs(doc: dict[str, Any], allowed: set[str]) -> Any:
    """The checked ``inputs`` of a request body that may hold only ``allowed`` keys."""
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise RequestError(
            400, "malformed", f"unknown fields {unknown}; expected only {sorted(allowed)}"
        )
    if "inputs" not in doc:
        raise RequestError(400, "malformed", 'the body must have an "inputs" field')
    inputs = doc["inputs"]
    if isinstance(inputs, dict):
        if not inputs:
            raise RequestError(400, "malformed", '"inputs" must name at least one input')
        for name, value in inputs.items():
            _check_numbers(value, f"input {name[:64]!r}")
    else:
        _check_numbers(inputs, '"inputs"')
    return inputs
