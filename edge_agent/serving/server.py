"""The model that answers predictions on this device, swapped atomically on install.

The agent installs a verified, health-checked model and hands it to one
:class:`ModelServer`; the local HTTP endpoint (:mod:`edge_agent.serving.http_api`) and any
in-process caller ask that server for predictions::

    server = ModelServer(observer=telemetry)           # no model yet: NoModelError
    old = server.activate(LoadedModel(name="digits", version=3, ..., runtime=rt))
    prediction = server.predict([[0.1, 0.2, ...]])     # or {"input": [[...]]}
    prediction.labels, prediction.to_json()
    server.health()                                    # {"status": "ok", "model": {...}}

Swapping is atomic: :meth:`ModelServer.activate` replaces the active model under a
lock and returns the previous one. A prediction takes a reference to the active model
under the same lock and runs outside it, so predictions never wait for each other, and
a prediction that started on the old model finishes on it even if a new one is
activated meanwhile (runtimes are safe to share between threads).

Inputs are converted to each model input's dtype with ``np.asarray(x, dtype=...)``,
as :func:`edge_agent.runtime.base.predict_single` does, except that a value that
overflows the dtype (``1e39`` for float32, ``300`` for uint8) is refused rather than
turned into ``inf`` or wrapped. For convenience, a 1-D input given to a model input
that is 2-D ``(batch, features)`` is treated as a single row (shape ``(1, n)``).

Then every input is validated (:mod:`edge_agent.monitoring.validation`) against the
model's manifest (its input specs and reference profile; the runtime's specs for a
model activated without a manifest) before the model runs: a conversion failure,
input names or a shape that do not fit, NaN/inf, or values outside the profile's
range are refused with :class:`~edge_agent.errors.InvalidInputError` (``reason``
``dtype``, ``shape``, ``nan`` or ``out_of_range``), logged and counted by reason in
the optional :class:`~edge_agent.monitoring.ServingMonitor`, which also counts every
valid prediction into the window summary that telemetry sends.

:meth:`ModelServer.explain` answers occlusion attributions of one input
(:mod:`edge_agent.monitoring.explain`): validated the same way, but neither counted
as a prediction nor summarised; the optional :class:`ExplanationObserver` counts it.

Every prediction call, successful or not (including calls made while no model is
active), is reported to the optional :class:`PredictionObserver` with its latency, which is how
the agent's telemetry counts requests, errors and latencies. An observer that raises
is logged and otherwise ignored: telemetry never fails a prediction.
"""

from __future__ import annotations

import logging
import secrets
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Protocol

import numpy as np
import numpy.typing as npt

from compress.errors import CompressError
from compress.manifest import Manifest
from compress.profile import ReferenceProfile
from edge_agent.errors import ModelRuntimeError, NoModelError
from edge_agent.monitoring.explain import Explanation, explain, occlusion_plan, refuse_explain
from edge_agent.monitoring.summary import ServingMonitor
from edge_agent.monitoring.validation import InputProblem, TensorShape, check_input, refusal
from edge_agent.runtime.base import ModelRuntime, TensorInfo, convert_input

__all__ = [
    "PREDICTION_ID_BYTES",
    "ExplanationObserver",
    "LoadedModel",
    "ModelServer",
    "Prediction",
    "PredictionObserver",
]

logger = logging.getLogger(__name__)

PREDICTION_ID_BYTES = 16
"""Random bytes of a prediction id (128 bits, 22 URL-safe characters). An id is the
only handle on a prediction's inputs that ``POST /v1/feedback`` accepts, so it must
not be guessable: a counter would let anyone label other clients' predictions."""


def _tensor_json(info: TensorInfo) -> dict[str, Any]:
    return {"name": info.name, "dtype": info.dtype, "shape": list(info.shape)}


@dataclass(frozen=True)
class LoadedModel:
    """A model installed on this device and ready to serve.

    Attributes:
        name: The model name from its manifest.
        version: The manifest version.
        sha256: The payload's sha256 (hex), as pinned by the manifest.
        format: The model file format (``"onnx"``, ``"tflite"``).
        slot: The install slot the model file lives in (e.g. ``"a"`` or ``"b"``).
        runtime: The loaded model.
        installed_at: When the model was installed (unix seconds).
        manifest: Its verified manifest (input specs and reference profile for
            validation and summaries); None for a model activated without one.
    """

    name: str
    version: int
    sha256: str
    format: str
    slot: str
    runtime: ModelRuntime
    installed_at: float
    manifest: Manifest | None = None

    @property
    def profile(self) -> ReferenceProfile | None:
        """The manifest's reference profile, if any."""
        return None if self.manifest is None else self.manifest.reference

    def info(self) -> dict[str, Any]:
        """A JSON-able description: identity, slot, install time, inputs and outputs.

        Returns:
            ``name``, ``version``, ``sha256``, ``format``, ``slot``, ``installed_at``,
            and ``inputs`` / ``outputs`` as lists of ``{"name", "dtype", "shape"}``
            (``None`` in a shape for a dynamic dimension).
        """
        return {
            "name": self.name,
            "version": self.version,
            "sha256": self.sha256,
            "format": self.format,
            "slot": self.slot,
            "installed_at": self.installed_at,
            "inputs": [_tensor_json(t) for t in self.runtime.inputs],
            "outputs": [_tensor_json(t) for t in self.runtime.outputs],
        }


def _json_values(array: np.ndarray) -> Any:
    """``array.tolist()``, with non-finite floats as ``None`` (strict JSON has no NaN)."""
    if array.dtype.kind in "fc":
        finite = np.isfinite(array)
        if not finite.all():
            values = array.astype(object)
            values[~finite] = None
            return values.tolist()
    return array.tolist()


# eq=False: the outputs are numpy arrays, which do not compare to a single bool.
@dataclass(frozen=True, eq=False)
class Prediction:
    """The answer to one :meth:`ModelServer.predict` call.

    Attributes:
        id: A random identifier (:data:`PREDICTION_ID_BYTES` bytes, URL-safe base64)
            for logs, correlation and labelled feedback.
        model: The name of the model that answered.
        version: Its version.
        outputs: Every model output, by name.
        labels: The arg-max over the last axis of the model's first output when that
            output is 2-D (one class index per row of a classifier), else ``None``.
        latency_ms: Wall time of the call, conversion of the inputs included.
    """

    id: str
    model: str
    version: int
    outputs: dict[str, np.ndarray]
    labels: tuple[int, ...] | None
    latency_ms: float

    def to_json(self) -> dict[str, Any]:
        """A JSON-able form: outputs as nested lists (non-finite floats as ``None``)."""
        return {
            "id": self.id,
            "model": self.model,
            "version": self.version,
            "outputs": {name: _json_values(value) for name, value in self.outputs.items()},
            "labels": None if self.labels is None else list(self.labels),
            "latency_ms": self.latency_ms,
        }


class PredictionObserver(Protocol):
    """Receives one report per prediction call (the agent's telemetry implements it)."""

    def record(self, latency_s: float, *, ok: bool) -> None:
        """Record one call.

        Args:
            latency_s: The call's duration in seconds.
            ok: Whether it returned a prediction.
        """
        ...


class ExplanationObserver(Protocol):
    """Counts explanations (the agent's telemetry, apart from its predictions)."""

    def record_explanation(self) -> None:
        """Count one explanation served."""
        ...


def _convert(value: npt.ArrayLike, info: TensorInfo) -> np.ndarray | InputProblem:
    """``value`` as an array of ``info``'s dtype (1-D -> one row for a 2-D input), or
    the ``dtype`` problem when it cannot be converted or overflows the dtype."""
    try:
        array = convert_input(value, info)
    except ModelRuntimeError as exc:
        return InputProblem("dtype", str(exc))
    if array.ndim == 1 and len(info.shape) == 2:
        array = array[np.newaxis, :]
    return array


def _feeds(
    inputs: list[TensorInfo], given: npt.ArrayLike | Mapping[str, npt.ArrayLike]
) -> dict[str, np.ndarray] | InputProblem:
    """Build the feeds of a model from an array-like or a mapping of them, or the
    problem: ``shape`` for an array-like given to a model with several inputs or
    input names that do not match the model's, ``dtype`` for values that cannot be
    converted."""
    if isinstance(given, Mapping):
        expected = {info.name for info in inputs}
        names = {str(name) for name in given}
        if names != expected or len(given) != len(expected):
            return InputProblem(
                "shape",
                f"inputs do not match the model: missing {sorted(expected - names)}, "
                f"unknown {sorted(names - expected)}; expected {sorted(expected)}",
            )
        pairs = [(info.name, given[info.name], info) for info in inputs]
    elif len(inputs) != 1:
        return InputProblem(
            "shape",
            f"the model has {len(inputs)} inputs "
            f"{sorted(info.name for info in inputs)}; pass them by name",
        )
    else:
        pairs = [(inputs[0].name, given, inputs[0])]
    feeds = {}
    for name, value, info in pairs:
        array = _convert(value, info)
        if isinstance(array, InputProblem):
            return array
        feeds[name] = array
    return feeds


def _validated(model: LoadedModel, given: Any) -> dict[str, np.ndarray] | InputProblem:
    """The model's feeds from ``given``, checked against its manifest, or the problem."""
    runtime = model.runtime
    feeds = _feeds(runtime.inputs, given)
    if isinstance(feeds, InputProblem):
        return feeds
    manifest, profile = model.manifest, model.profile
    specs: dict[str, TensorShape] = {info.name: info for info in runtime.inputs}
    profiled = None
    if manifest is not None:
        specs.update({spec.name: spec for spec in manifest.inputs if spec.name in specs})
        profiled = manifest.inputs[0].name
    for name, array in feeds.items():
        value_range = profile.value_range if profile is not None and name == profiled else None
        problem = check_input(array, specs[name], value_range)
        if problem is not None:
            return problem
    return feeds


class ModelServer:
    """Thread-safe holder of the active model; answers predictions with it.

    Args:
        observer: Told about every :meth:`predict` call (latency, success).
        perf_clock: Monotonic clock in seconds used to time predictions.
        on_prediction: Called with each successful prediction and its inputs (the
            agent remembers them so labelled feedback can refer to them).
        monitor: Counts refused inputs by reason and valid predictions into the
            served model's window summary.
        explanations: Counts explanations (:meth:`explain`), which are neither
            predictions nor summarised.
    """

    def __init__(
        self,
        *,
        observer: PredictionObserver | None = None,
        perf_clock: Callable[[], float] = time.perf_counter,
        on_prediction: Callable[[Prediction, Any], None] | None = None,
        monitor: ServingMonitor | None = None,
        explanations: ExplanationObserver | None = None,
    ) -> None:
        self._observer = observer
        self._explanations = explanations
        self._monitor = monitor
        self._on_prediction = on_prediction
        self._perf_clock = perf_clock
        self._lock = threading.Lock()
        self._active: LoadedModel | None = None

    @property
    def active(self) -> LoadedModel | None:
        """The model that answers predictions now, if any."""
        with self._lock:
            return self._active

    def activate(self, model: LoadedModel) -> LoadedModel | None:
        """Make ``model`` the active model, atomically.

        Predictions already running on the previous model finish on it.

        Args:
            model: The newly installed model.

        Returns:
            The previously active model, or ``None``.
        """
        with self._lock:
            previous, self._active = self._active, model
        logger.info(
            "serving %s v%d (slot %s)%s",
            model.name,
            model.version,
            model.slot,
            "" if previous is None else f", replacing v{previous.version}",
        )
        return previous

    def predict(self, inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike]) -> Prediction:
        """Run the active model on ``inputs``.

        Args:
            inputs: For a single-input model, an array-like (nested lists, numpy
                array). For any model, a mapping from input name to array-like,
                with exactly the model's input names. Values are converted to each
                input's dtype; a 1-D value for a 2-D ``(batch, features)`` input is
                taken as one row.

        Returns:
            The outputs, labels (for 2-D first outputs) and latency.

        Raises:
            NoModelError: no model is active.
            InvalidInputError: the inputs do not fit the model's manifest (names,
                dtype conversion, shape, NaN/inf, value range): refused, with a reason.
            ModelRuntimeError: the runtime failed.
        """
        start = self._perf_clock()
        try:
            prediction = self._run(inputs, start)
        except BaseException:
            self._report(self._perf_clock() - start, ok=False)
            raise
        self._report(prediction.latency_ms / 1000.0, ok=True)
        if self._on_prediction is not None:
            try:
                self._on_prediction(prediction, inputs)
            except Exception:
                logger.exception("prediction hook failed; the prediction is unaffected")
        return prediction

    def explain(
        self, inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike], target: int | None = None
    ) -> Explanation:
        """Occlusion attributions of the active model for one input
        (:mod:`edge_agent.monitoring.explain`).

        The input is converted and validated as for :meth:`predict` (refusals are
        logged but not counted in the window summary, and the explanation is not a
        prediction: it is counted by the ``explanations`` observer only).

        Raises:
            NoModelError: no model is active.
            InvalidInputError: the input does not fit the model's manifest.
            ExplainError: not one example, a model with several inputs, a bad target.
            ModelRuntimeError: the runtime failed.
        """
        with self._lock:
            model = self._active
        if model is None:
            raise NoModelError("no model is installed yet")
        runtime = model.runtime
        if len(runtime.inputs) != 1 or not runtime.outputs:
            message = f"{model.name} has {len(runtime.inputs)} inputs; explain takes one"
            raise refuse_explain("inputs", message, model.name)
        feeds = _validated(model, inputs)
        if isinstance(feeds, InputProblem):
            raise refusal(feeds, model.name)
        info, output = runtime.inputs[0], runtime.outputs[0].name
        x = feeds[info.name]
        batch = info.shape[0] if info.shape and isinstance(info.shape[0], int) else None
        result = explain(
            lambda rows: runtime.run({info.name: rows})[output],
            x,
            occlusion_plan(x.shape[1:], model.profile),
            target=target,
            batch=batch,
            model=model.name,
            version=model.version,
            clock=self._perf_clock,
        )
        if self._explanations is not None:
            try:
                self._explanations.record_explanation()
            except Exception:
                logger.exception("explanation observer failed; the explanation is unaffected")
        return result

    def health(self) -> dict[str, Any]:
        """The serving state, JSON-able.

        Returns:
            ``{"status": "ok", "model": LoadedModel.info()}`` when a model is
            active, else ``{"status": "no_model", "model": None}``.
        """
        model = self.active
        if model is None:
            return {"status": "no_model", "model": None}
        return {"status": "ok", "model": model.info()}

    def _run(self, inputs: npt.ArrayLike | Mapping[str, npt.ArrayLike], start: float) -> Prediction:
        """:meth:`predict` without the report to the observer.

        Raises:
            NoModelError: no model is active.
            ModelRuntimeError: bad inputs, or the runtime failed.
        """
        with self._lock:
            model = self._active  # a reference: a concurrent activate() cannot change it
        if model is None:
            raise NoModelError("no model is installed yet")
        runtime = model.runtime
        feeds = _validated(model, inputs)
        if isinstance(feeds, InputProblem):
            if self._monitor is not None:
                self._monitor.refused(model.name, model.version, model.profile, feeds.reason)
            raise refusal(feeds, model.name)
        outputs = runtime.run(feeds)
        first = outputs.get(runtime.outputs[0].name) if runtime.outputs else None
        profiled = None if model.manifest is None else feeds.get(model.manifest.inputs[0].name)
        if self._monitor is not None and profiled is not None and first is not None:
            self._summarise(model, profiled, first)
        labels = (
            tuple(int(i) for i in first.argmax(axis=-1))
            if first is not None and first.ndim == 2 and first.shape[-1] > 0
            else None
        )
        return Prediction(
            id=secrets.token_urlsafe(PREDICTION_ID_BYTES),
            model=model.name,
            version=model.version,
            outputs=outputs,
            labels=labels,
            latency_ms=(self._perf_clock() - start) * 1000.0,
        )

    def _summarise(self, model: LoadedModel, x: np.ndarray, first: np.ndarray) -> None:
        assert self._monitor is not None
        try:
            self._monitor.observe(model.name, model.version, model.profile, x, first)
        except CompressError as exc:  # outputs that do not fit the profile: no summary
            logger.warning("cannot summarise a prediction of %s: %s", model.name, exc)

    def _report(self, latency_s: float, *, ok: bool) -> None:
        if self._observer is None:
            return
        try:
            self._observer.record(latency_s, ok=ok)
        except Exception:
            logger.exception("prediction observer failed; the prediction is unaffected")
