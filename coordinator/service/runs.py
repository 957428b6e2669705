"""Federated runs started through the service: one at a time, in the background.

:class:`RunManager` turns a :class:`~coordinator.service.operations.RunRequest` into a
:class:`~coordinator.federated.runs.RunConfig` and a Flower strategy, records the
run in the store (``running``), and drives
:func:`~coordinator.federated.runs.run_training` on a thread. Each round is recorded as
it starts (``running``) and again when it ends (``ok`` or ``failed``, with the
:class:`~coordinator.federated.runs.RoundReport`'s figures), so ``fedge rounds status``
shows progress while the run goes on.

When the run ends the run is ``finished`` (at least one round succeeded) or
``failed``. An operator may stop it (:meth:`RunManager.stop_run`): no further
round starts, the round going on ends ``failed`` with reason ``stopped by
<actor>`` and the run is ``interrupted``. A service that stops in the middle
marks the run ``interrupted`` and its current round ``failed`` with reason
``interrupted``, and stops the run's thread the same way; a service that was
killed does the same at its next start (:meth:`recover`). Interrupted runs are
not resumed: a new run starts from fresh weights.

:func:`training_config` and :func:`run_strategy` turn a request into the run and
its strategy; ``fedge train`` uses them too (with its own starting weights,
evaluation data and update bound, see :func:`training_config`), so both front ends
read the same settings the same way.

``RunRequest.config`` keys (all optional but ``features`` and ``classes``):
``model`` (``model``), ``family`` (``mlp``; or ``softmax``), ``features``,
``classes``, ``hidden`` (``[64]``), ``clients_per_round`` (10, at least
``min_clients``), ``seed`` (0), ``strategy_args`` (dict) and ``train`` (dict sent to
devices with each task: ``epochs``, ``lr``, ``batch_size``...). Aggregation safety
(:mod:`coordinator.federated.round_screen`): ``robust`` (false; true clips each
update to the round's median norm and weight), ``max_examples_per_update``
(100000: the most examples one update weighs) and ``norm_multiple`` (10: updates
over this multiple of the round's median norm are rejected).

A PyTorch model instead: ``model_spec`` (``module:function`` or ``zoo:<name>``;
the family is then ``torch`` and ``model`` defaults to the spec's name), ``task``
(``classification``, ``regression`` or ``reconstruction``; default: the factory's
``task`` attribute, else classification), ``input_shape`` (list of positive
integers, one example's shape) and ``num_outputs`` (classes or regression targets;
not needed for reconstruction); both sizes default to the evaluation data's.
``features``, ``classes``, ``hidden`` and ``family`` do not go with ``model_spec``.
The coordinator builds the starting weights, so the factory must be importable
here too; devices train it only where installed and allowed (see
:func:`~coordinator.federated.runs.check_fleet_can_train`).
"""

from __future__ import annotations

import dataclasses
import logging
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt
from flwr.serverapp.strategy import Strategy

from compress.errors import CompressError
from compress.families import FAMILIES
from coordinator.delivery.packaging import LabelledData
from coordinator.errors import CoordinatorError, NotFoundError, RunError
from coordinator.federated.models import ModelDef, implied_outputs, model_def_for, model_task
from coordinator.federated.models import initial_weights as initial_weights_of
from coordinator.federated.round_screen import (
    DEFAULT_MAX_EXAMPLES_PER_UPDATE,
    DEFAULT_NORM_MULTIPLE,
)
from coordinator.federated.runs import (
    STOPPED,
    RoundReport,
    RunConfig,
    RunResult,
    check_fleet_can_train,
    run_training,
)
from coordinator.federated.strategies import build_strategy
from coordinator.federated.update_check import DEFAULT_MAX_UPDATE_NORM
from coordinator.link.port import Hub
from coordinator.service.operations import RunRequest
from coordinator.service.store import RunRow, RunState, Store
from edge_agent.training.model_spec import TORCH_FAMILY, parse_model_spec

__all__ = ["FinishListener", "RunManager", "run_strategy", "training_config"]

logger = logging.getLogger(__name__)

FinishListener = Callable[[str, RunState, RunResult | None, RunConfig], None]
"""What :meth:`RunManager.on_finish` calls when a run ends."""

_KEYS = frozenset(
    [
        "model",
        "family",
        "features",
        "classes",
        "hidden",
        "clients_per_round",
        "seed",
        "strategy_args",
        "train",
        "model_spec",
        "task",
        "input_shape",
        "num_outputs",
        "robust",
        "max_examples_per_update",
        "norm_multiple",
    ]
)
_BUILTIN_ONLY = ("family", "features", "classes", "hidden")
_TORCH_ONLY = ("input_shape", "num_outputs")
_SCALAR = (int, float, str, bool)


def _int(config: Mapping[str, Any], key: str, default: int | None, low: int) -> int:
    value = config.get(key, default)
    if value is None:
        raise RunError(f"config.{key} is required")
    if isinstance(value, bool) or not isinstance(value, int) or value < low:
        raise RunError(f"config.{key} must be an integer >= {low}, not {value!r}")
    return value


def _features(data: LabelledData | None) -> int | None:
    return None if data is None else int(data.x.shape[1])


def _classes(data: LabelledData | None) -> int | None:
    return None if data is None else int(data.y.max()) + 1


def _outputs(data: LabelledData | None, task: str) -> int | None:
    """The output count the data implies: classes, regression targets, none."""
    return None if data is None else implied_outputs(task, data.y)


def _input_shape(config: Mapping[str, Any], data: LabelledData | None) -> tuple[int, ...]:
    value = config.get("input_shape")
    if value is None:
        if data is None:
            raise RunError("config.input_shape is required (the shape of one example)")
        return tuple(int(d) for d in data.x.shape[1:])
    if (
        not isinstance(value, list)
        or not value
        or not all(isinstance(d, int) and not isinstance(d, bool) and d >= 1 for d in value)
    ):
        raise RunError(f"config.input_shape must be a list of positive integers, not {value!r}")
    return tuple(value)


def _torch_model(config: Mapping[str, Any], eval_data: LabelledData | None) -> ModelDef:
    """The PyTorch model of a ``model_spec`` request."""
    mixed = [key for key in _BUILTIN_ONLY if key in config and key != "family"]
    if mixed or config.get("family", TORCH_FAMILY) != TORCH_FAMILY:
        raise RunError(
            f"config.model_spec does not go with {', '.join(mixed) or 'family'}: "
            f"give input_shape and num_outputs"
        )
    spec, task = config["model_spec"], config.get("task")
    if not isinstance(spec, str) or (task is not None and not isinstance(task, str)):
        raise RunError("config.model_spec and config.task must be strings")
    if ":" not in spec:
        raise RunError(f"config.model_spec {spec!r} must be module.path:function or zoo:<name>")
    chosen = model_task(spec, task)  # imports the factory when no task is given
    shape = _input_shape(config, eval_data)
    low = 0 if chosen == "reconstruction" else 1
    outputs = _int(config, "num_outputs", _outputs(eval_data, chosen), low)
    return model_def_for(spec, chosen, shape, outputs)


def training_config(
    request: RunRequest,
    *,
    initial_weights: Mapping[str, npt.NDArray[np.float32]] | None = None,
    eval_data: LabelledData | None = None,
    max_update_norm: float = DEFAULT_MAX_UPDATE_NORM,
) -> RunConfig:
    """The training run a request describes.

    The service passes the request alone: fresh weights, seeded, for ``features``
    and ``classes``; devices evaluate each round. ``fedge train`` (which runs the
    rounds in its own process) adds what only that process holds: starting weights
    (then ``features`` and ``classes`` are not needed), evaluation data (evaluated
    here after each round; ``features`` and ``classes`` default to its shape) and
    the bound on update norms.

    Raises:
        RunError: an unknown key, a missing or out-of-range value.
        CodecError: an invalid codec.
    """
    config = request.config
    unknown = sorted(set(config) - _KEYS)
    if unknown:
        raise RunError(f"unknown run setting(s): {', '.join(unknown)}")
    if "model_spec" in config:
        model, model_def, weights = _torch_model_and_weights(config, initial_weights, eval_data)
    else:
        model, model_def, weights = _builtin_model_and_weights(config, initial_weights, eval_data)
    return _run_config(
        request,
        model=model,
        model_def=model_def,
        initial_weights=weights,
        eval_data=eval_data,
        max_update_norm=max_update_norm,
    )


_ModelAndWeights = tuple[str, ModelDef, Mapping[str, npt.NDArray[np.float32]]]
"""The run's model name, its model and the starting weights."""


def _builtin_model_and_weights(
    config: Mapping[str, Any],
    initial_weights: Mapping[str, npt.NDArray[np.float32]] | None,
    eval_data: LabelledData | None,
) -> _ModelAndWeights:
    """:func:`training_config`'s model of a built-in family (no ``config.model_spec``)."""
    if config.get("task", "classification") != "classification":
        raise RunError(
            f"the built-in families only do classification; config.task "
            f"{config['task']!r} needs a PyTorch model (config.model_spec)"
        )
    if any(key in config for key in _TORCH_ONLY):
        raise RunError(
            "config.input_shape and config.num_outputs are for PyTorch models "
            "(config.model_spec); the built-in families take features and classes"
        )
    family = config.get("family", "mlp")
    if family not in FAMILIES:
        raise RunError(f"config.family must be one of {', '.join(FAMILIES)}")
    hidden = config.get("hidden", [64]) if family == "mlp" else []
    if not isinstance(hidden, list) or not all(
        isinstance(h, int) and not isinstance(h, bool) and h >= 1 for h in hidden
    ):
        raise RunError("config.hidden must be a list of positive integers")
    model = _model_name(config, "model")
    model_def = ModelDef(family)
    if initial_weights is None:
        features = _int(config, "features", _features(eval_data), 1)
        classes = _int(config, "classes", _classes(eval_data), 2)
        model_def = ModelDef(family, input_shape=(features,), num_outputs=classes)
        initial_weights = initial_weights_of(model_def, _int(config, "seed", 0, 0), hidden)
    return model, model_def, initial_weights


def _model_name(config: Mapping[str, Any], default: str) -> str:
    """``config.model``: the name of the run's model and artifact (``default`` if absent).

    Raises:
        RunError: it is not a non-empty string.
    """
    model = config.get("model", default)
    if not isinstance(model, str) or not model:
        raise RunError("config.model must be a non-empty string")
    return model


def _torch_model_and_weights(
    config: Mapping[str, Any],
    initial_weights: Mapping[str, npt.NDArray[np.float32]] | None,
    eval_data: LabelledData | None,
) -> _ModelAndWeights:
    """:func:`training_config`'s model of a PyTorch factory (``config.model_spec``)."""
    model_def = _torch_model(config, eval_data)
    model = _model_name(config, parse_model_spec(model_def.spec).name)
    if initial_weights is None:
        initial_weights = initial_weights_of(model_def, _int(config, "seed", 0, 0))
    return model, model_def, initial_weights


def _run_config(
    request: RunRequest,
    *,
    model: str,
    model_def: ModelDef,
    initial_weights: Mapping[str, npt.NDArray[np.float32]],
    eval_data: LabelledData | None,
    max_update_norm: float,
) -> RunConfig:
    """The run of a request, its model and starting weights (the settings both kinds share)."""
    config = request.config
    train = config.get("train", {})
    if not isinstance(train, dict) or not all(isinstance(v, _SCALAR) for v in train.values()):
        raise RunError("config.train must map names to numbers, strings or booleans")
    seed = _int(config, "seed", 0, 0)
    clients = _int(config, "clients_per_round", max(10, request.min_clients), 1)
    robust = config.get("robust", False)
    if not isinstance(robust, bool):
        raise RunError(f"config.robust must be true or false, not {robust!r}")
    multiple = config.get("norm_multiple", DEFAULT_NORM_MULTIPLE)
    if isinstance(multiple, bool) or not isinstance(multiple, int | float):
        raise RunError(f"config.norm_multiple must be a number, not {multiple!r}")
    return RunConfig(
        model=model,
        family=model_def.family,
        model_def=model_def,
        initial_weights=initial_weights,
        rounds=request.rounds,
        clients_per_round=clients,
        min_clients=request.min_clients,
        round_timeout_s=request.round_timeout_s,
        codec=request.codec,
        train_config={"seed": seed, **train},
        eval_data=eval_data,
        seed=seed,
        max_update_norm=max_update_norm,
        max_examples_per_update=_int(
            config, "max_examples_per_update", DEFAULT_MAX_EXAMPLES_PER_UPDATE, 1
        ),
        norm_multiple=float(multiple),
        robust=robust,
    )


def run_strategy(request: RunRequest, *, federated_eval: bool = True) -> Strategy:
    """The Flower strategy a request names, with its ``strategy_args``.

    Args:
        request: The run.
        federated_eval: Whether devices evaluate each round's model (False when
            the coordinator evaluates on its own data).

    Raises:
        RunError: ``strategy_args`` is not an object.
        StrategyError: an unknown strategy or arguments it refuses.
    """
    args = request.config.get("strategy_args", {})
    if not isinstance(args, dict):
        raise RunError("config.strategy_args must be an object")
    return build_strategy(request.strategy, args, federated_eval=federated_eval)


class RunManager:
    """Starts federated runs and records their rounds (see the module docstring)."""

    def __init__(
        self,
        hub: Hub,
        store: Store,
        *,
        clock: Callable[[], float] = time.time,
        upload_budget_bytes: int | None = None,
        upload_dir: Path | None = None,
    ) -> None:
        """Prepare; nothing runs until :meth:`start`.

        ``upload_budget_bytes`` bounds each device's chunked uploads in flight
        (None: 4x the largest update; :mod:`coordinator.federated.uploads`);
        ``upload_dir`` is where they are spooled on disk (None: the per-user
        default of :mod:`coordinator.federated.spool`).
        """
        self._upload_budget = upload_budget_bytes
        self._upload_dir = upload_dir
        self._hub = hub
        self._store = store
        self._clock = clock
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._current: str | None = None
        self._round: tuple[int, float] | None = None
        self._stop = threading.Event()  # the current run's; a new one per run
        self._stopped_by: str | None = None
        self._on_finish: FinishListener | None = None

    def on_finish(self, listener: FinishListener) -> None:
        """Call ``listener(run_id, state, result, config)`` on the run's thread when a
        run ends (``result`` None when it raised); the retraining loop takes the final
        weights from it. A listener's error is logged, never raised."""
        self._on_finish = listener

    def config_of(self, request: RunRequest) -> RunConfig:
        """The run a request describes, with this service's upload budget and directory.

        Raises:
            RunError: bad settings (see :func:`training_config`).
            CodecError: an invalid codec.
        """
        return dataclasses.replace(
            training_config(request),
            upload_budget_bytes=self._upload_budget,
            upload_dir=self._upload_dir,
        )

    def recover(self) -> list[str]:
        """Mark runs a killed service left ``running`` as interrupted; their ids."""
        now = self._clock()
        ids = self._store.mark_interrupted_runs(now)
        for run_id in ids:
            self._fail_running_rounds(run_id, now)
            logger.warning("run %s was interrupted by a restart", run_id)
        return ids

    def start(self, request: RunRequest, *, actor: str) -> RunRow:
        """Start a run in the background.

        Raises:
            RunError: bad settings, a PyTorch model no online device can train,
                or a run is already going.
            StrategyError: an unknown strategy or arguments it refuses.
        """
        config = self.config_of(request)
        check_fleet_can_train(self._hub, config.definition)
        strategy = run_strategy(request)
        with self._lock:
            if self._current is not None:
                raise RunError(f"run {self._current} is still going; one run at a time")
            run_id = f"run-{uuid.uuid4().hex[:12]}"
            settings = {
                "rounds": request.rounds,
                "strategy": request.strategy,
                "codec": request.codec,
                "min_clients": request.min_clients,
                "round_timeout_s": request.round_timeout_s,
                **request.config,
            }
            row = self._store.create_run(run_id, config=settings, created_by=actor,
                                         at=self._clock())  # fmt: skip
            self._current = run_id
            self._stop, self._stopped_by = threading.Event(), None
            self._thread = threading.Thread(
                target=self._run, args=(run_id, strategy, config, self._stop),
                name=f"run-{run_id}", daemon=True,
            )  # fmt: skip
            self._thread.start()
        logger.info("run %s started by %s: %d rounds of %s", run_id, actor, request.rounds,
                    request.strategy)  # fmt: skip
        return row

    def current(self) -> str | None:
        """The id of the run going now, if any."""
        with self._lock:
            return self._current

    def stop_run(self, run_id: str, *, actor: str, wait_s: float = 5.0) -> None:
        """Stop the run going now (see the module docstring).

        Waits up to ``wait_s`` for its thread to record the end.

        Raises:
            NotFoundError: no such run.
            RunError: that run is not running.
        """
        with self._lock:
            if self._current != run_id:
                row = self._store.run(run_id)
                if row is None:
                    raise NotFoundError(f"no run {run_id!r}")
                raise RunError(f"run {run_id} is not running ({row.state})")
            self._stopped_by = actor
            self._stop.set()
            thread = self._thread
        logger.info("run %s: stop requested by %s", run_id, actor)
        if thread is not None:
            thread.join(wait_s)

    def stop(self) -> None:
        """Mark the run going now interrupted and tell its thread to stop."""
        with self._lock:
            run_id, self._current = self._current, None
            self._stop.set()
        if run_id is None:
            return
        now = self._clock()
        try:
            self._store.finish_run(run_id, state=RunState.INTERRUPTED, at=now)
            self._fail_running_rounds(run_id, now)
        except CoordinatorError as exc:
            logger.error("run %s: cannot mark it interrupted: %s", run_id, exc)
        logger.warning("run %s interrupted by the service stopping", run_id)

    def _fail_running_rounds(self, run_id: str, now: float) -> None:
        for round_row in self._store.rounds(run_id):
            if round_row.status == "running":
                self._store.record_round(run_id, round_row.round, status="failed",
                                         metrics=round_row.metrics, reason="interrupted",
                                         started_at=round_row.started_at,
                                         finished_at=now)  # fmt: skip

    def _run(self, run_id: str, strategy: Any, config: RunConfig, stop: threading.Event) -> None:
        def on_round(report: RoundReport, what: str) -> None:
            if self._current != run_id:
                return  # interrupted: the store already says so
            reason = report.reason
            if reason == STOPPED and self._stopped_by is not None:
                reason = f"stopped by {self._stopped_by}"
            now = self._clock()
            if self._round is None or self._round[0] != report.round:
                self._round = (report.round, now)
            started = self._round[1]
            done = what == "done"
            try:
                self._store.record_round(
                    run_id, report.round, status=report.status if done else "running",
                    metrics=_finite(report.to_json()), started_at=started,
                    finished_at=now if done else None, reason=reason,
                )  # fmt: skip
            except CoordinatorError as exc:
                logger.error("run %s: round %d not recorded: %s", run_id, report.round, exc)

        state, result = RunState.FAILED, None
        try:
            result = run_training(self._hub, strategy, config, on_round=on_round, stop=stop)
            cut_short = len(result.rounds) < config.rounds or any(
                r.reason == STOPPED for r in result.rounds
            )
            if stop.is_set() and cut_short:
                state = RunState.INTERRUPTED
            elif any(r.status == "ok" for r in result.rounds):
                state = RunState.FINISHED
        except (CoordinatorError, CompressError, ValueError) as exc:
            logger.error("run %s failed: %s", run_id, exc)
        except Exception:
            logger.exception("run %s failed", run_id)
        with self._lock:
            if self._current != run_id:
                return
            self._current = None
        try:
            self._store.finish_run(run_id, state=state, at=self._clock())
        except CoordinatorError as exc:
            logger.error("run %s: cannot record its end: %s", run_id, exc)
        logger.info("run %s %s", run_id, state)
        if self._on_finish is not None:
            try:
                self._on_finish(run_id, state, result, config)
            except Exception:
                logger.exception("run %s: the finish listener failed", run_id)


def _finite(document: dict[str, Any]) -> dict[str, Any]:
    """NaN and infinities (a diverged loss) become None, which JSON can hold (also in
    nested objects such as ``metrics``)."""
    return {
        k: _finite(v)
        if isinstance(v, dict)
        else None
        if isinstance(v, float) and not np.isfinite(v)
        else v
        for k, v in document.items()
    }
